"""Training losses: a Hungarian set loss for every head plus the token selector's own losses.

``SetCriterion.forward`` returns named, unweighted losses (Sparse DETR Sec. 3.2-3.4), each head matched on its own:

    final decoder layer      loss_ce, loss_bbox, loss_giou
    decoder layer i (aux)    loss_ce_{i}, loss_bbox_{i}, loss_giou_{i}
    two-stage head           loss_*_enc           (its ``valid`` masks tokens)
    encoder aux layer i      loss_*_enc_aux_{i}   (its ``valid`` masks slots)
    token selector           loss_mask, or the OS head's loss_*_backbone (selection.py)

plus logging-only ``stat_*`` values; weights are applied by ``weighted_total`` only. Every term is summed and
divided by ``num_boxes``, the batch's ground-truth boxes averaged over processes, at least 1 (Deformable DETR).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from sparse_detr.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from sparse_detr.models.matcher import FlatMatch, HungarianMatcher, MatchIndices, flatten_indices
from sparse_detr.models.selection import SelectorLosses, TokenSelector

def build_weight_dict(cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0, num_dec_layers: int = 6,
                      num_enc_aux: int = 0, two_stage: bool = False) -> dict[str, float]:
    """Weight of every detection-head loss key (the selector adds its own: ``TokenSelector.loss_weights``)."""
    head = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    suffixes = [""] + [f"_{i}" for i in range(num_dec_layers - 1)]
    if two_stage:
        suffixes.append("_enc")
    suffixes += [f"_enc_aux_{i}" for i in range(num_enc_aux)]
    return {name + suffix: w for suffix in suffixes for name, w in head.items()}


def weighted_total(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """The one place loss weights are applied: sum of ``weight * loss`` over the keys in both dicts."""
    terms = [losses[k] * w for k, w in weight_dict.items() if k in losses]
    if not terms:
        raise ValueError(f"weighted_total: no loss matches the weight dict (losses: {sorted(losses)})")
    return torch.stack(terms).sum()


def check_finite(losses: dict[str, Tensor]) -> None:
    """Raise ``FloatingPointError`` naming every non-finite loss term (one host sync when all are finite)."""
    names = list(losses)
    values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
    if bool(torch.isfinite(values).all()):
        return
    bad = [f"{k}={v:.4g}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    raise FloatingPointError(f"non-finite loss terms: {', '.join(bad)}")


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor | float:
    """Ground-truth boxes in the batch, averaged over processes, at least 1 (as DETR)."""
    count = float(sum(int(t["labels"].shape[0]) for t in targets))
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(count, device=device)
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return max(count, 1.0)


class SetCriterion(nn.Module):
    """Hungarian set loss for every head (each matched on its own) plus the token selector's losses.

    weight_dict: stored for the trainer, not applied here. class_agnostic_enc: the two-stage head learns label 0
    only (Deformable DETR's binary foreground head). selector: the model's ``TokenSelector``, None = dense.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, class_agnostic_enc: bool = False,
                 selector: Optional[TokenSelector] = None):
        super().__init__()
        # Only its loss interface: the selector's modules belong to the model, not to the criterion.
        self.selector_losses = selector.losses if selector is not None else None
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_agnostic_enc = class_agnostic_enc
        self._checked_keys = False

    def loss_labels(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor,
                    num_boxes: Tensor | float, valid: Tensor | None = None) -> Tensor:
        """Sigmoid focal loss summed over B·Q·K over ``num_boxes`` (Deformable DETR's ``mean(1).sum() * Q``).

        logits (B, Q, K); matched (batch_idx, pred_idx) (N,) each; labels (N,); valid (B, Q) or None: invalid
        predictions count nothing, not even as negatives. Unmatched predictions have all-zero targets.
        """
        logits = logits.float()
        if valid is not None:
            # Zero before the loss: masking after it still lets inf/NaN logits give NaN gradients (0 * NaN).
            logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))
        target = torch.zeros_like(logits)
        target[matched[0], matched[1], labels] = 1.0
        loss = sigmoid_focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        if valid is not None:
            loss = loss * valid[..., None].to(loss.dtype)
        return loss.sum() / num_boxes

    @staticmethod
    def loss_boxes(src_boxes: Tensor, tgt_boxes: Tensor, num_boxes: Tensor | float) -> tuple[Tensor, Tensor]:
        """(loss_bbox, loss_giou): L1 and 1 - GIoU of matched (N, 4) cxcywh pairs (N may be 0), over ``num_boxes``."""
        src_boxes, tgt_boxes = src_boxes.float(), tgt_boxes.float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def head_losses(self, head: dict[str, Tensor], targets: list[dict[str, Tensor]], num_boxes: Tensor | float,
                    suffix: str = "", match: FlatMatch | None = None) -> tuple[dict[str, Tensor],
                                                                                tuple[Tensor, Tensor, Tensor]]:
        """Match one head {pred_logits (B, Q, K), pred_boxes (B, Q, 4), valid (B, Q) optional}, unless ``match``
        (its (batch_idx, pred_idx, tgt_idx) on the device, from ``HungarianMatcher.match_heads``) is given; keys
        get ``suffix``. Returns (losses, (batch_idx, pred_idx, labels)), the matched pairs (N,) each on the device."""
        logits, boxes, valid = head["pred_logits"], head["pred_boxes"], head.get("valid")
        device = logits.device
        if match is None:
            indices: MatchIndices = self.matcher.match(logits, boxes, targets, valid)
            sizes = [int(t["labels"].shape[0]) for t in targets]
            match = tuple(x.to(device) for x in flatten_indices(indices, sizes))
        batch_idx, pred_idx, tgt_idx = match
        all_labels = torch.cat([t["labels"] for t in targets]).to(device)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device)

        labels = all_labels[tgt_idx]
        loss_ce = self.loss_labels(logits, (batch_idx, pred_idx), labels, num_boxes, valid)
        loss_bbox, loss_giou = self.loss_boxes(boxes[batch_idx, pred_idx], all_boxes[tgt_idx], num_boxes)
        losses = {"loss_ce" + suffix: loss_ce, "loss_bbox" + suffix: loss_bbox, "loss_giou" + suffix: loss_giou}
        return losses, (batch_idx, pred_idx, labels)

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Every loss the model's outputs allow (keys: module docstring). targets: B dicts of ``labels`` (T_b,)
        int64 and ``boxes`` (T_b, 4) cxcywh normalised."""
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion: pred_logits has {outputs['pred_logits'].shape[-1]} classes, "
                             f"criterion built for num_classes={self.num_classes}")
        device = outputs["pred_logits"].device
        num_boxes = _num_boxes(targets, device)

        # Every head is listed first and matched in one call (one device -> host copy of all costs per step, one
        # copy of the indices back); then each head's losses: (head, targets, suffix, class-agnostic matching).
        heads = [(outputs, targets, "", False)]
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            heads.append((aux, targets, f"_{i}", False))

        if outputs.get("enc_outputs") is not None:
            enc_targets = targets
            if self.class_agnostic_enc:
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            heads.append((outputs["enc_outputs"], enc_targets, "_enc", self.class_agnostic_enc))

        # Sparse DETR Sec. 3.3: encoder aux loss on each layer's kept tokens.
        for i, enc_aux in enumerate(outputs.get("enc_aux_outputs") or []):
            heads.append((enc_aux, targets, f"_enc_aux_{i}", False))

        # The selector's share (selection.py): its loss terms and the heads it trains by the Hungarian loss.
        selector_losses = self.selector_losses(outputs, targets) if self.selector_losses else SelectorLosses()
        heads += [(head, targets, suffix, False) for suffix, head in selector_losses.matched]

        matches = self.matcher.match_heads([h[0] for h in heads], targets, [h[3] for h in heads])
        losses = {}
        for (head, head_targets, suffix, _), match in zip(heads, matches):
            head_loss, matched = self.head_losses(head, head_targets, num_boxes, suffix, match)
            losses.update(head_loss)
            if suffix == "":
                with torch.no_grad():
                    losses["stat_class_error"] = self._class_error(outputs["pred_logits"], *matched)

        losses.update(selector_losses.terms)

        if not self._checked_keys:
            self._warn_unweighted(losses)
        return losses

    @staticmethod
    def _class_error(logits: Tensor, batch_idx: Tensor, pred_idx: Tensor, labels: Tensor) -> Tensor:
        """Percentage of matched predictions whose top class is not the target class (0 when nothing matched)."""
        if pred_idx.numel() == 0:
            return torch.zeros((), device=logits.device)
        top = logits[batch_idx, pred_idx].argmax(-1)
        return 100.0 * (top != labels).float().mean()

    def _warn_unweighted(self, losses: dict[str, Tensor]) -> None:
        # A loss without a weight would silently not train: say so once.
        self._checked_keys = True
        missing = [k for k in losses if not k.startswith("stat_") and k not in self.weight_dict]
        if missing:
            warnings.warn(f"SetCriterion: losses without a weight (not trained): {missing}", stacklevel=2)
