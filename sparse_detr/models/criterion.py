"""Training losses of Sparse DETR: set-prediction losses for every head plus the token-scorer's mask loss.

``SetCriterion.forward`` returns a dict of named, UNWEIGHTED losses (method notes, Sec. 6-7):

    head                         keys                                                  matched on
    final decoder layer          loss_ce, loss_bbox, loss_giou                         its own predictions
    decoder layer i (aux)        loss_ce_{i}, loss_bbox_{i}, loss_giou_{i}              its own predictions
    two-stage encoder head       loss_ce_enc, loss_bbox_enc, loss_giou_enc              all (valid) tokens
    encoder aux layer i          loss_ce_enc_aux_{i}, loss_bbox_enc_aux_{i}, ...        its valid kept tokens
    OS backbone head             loss_ce_backbone, loss_bbox_backbone, ...              all (valid) backbone tokens
    token scorer                 loss_mask                                             (no matching)

plus logging-only ``stat_*`` values. Weights live in one dict (``build_weight_dict``) and are applied in one place
(``weighted_total``), so the trainer can log raw and weighted values side by side.

Normalisation (Deformable DETR): every box/class term is SUMMED over predictions (and classes) and divided by
``num_boxes``, the number of ground-truth boxes in the batch averaged over processes and clamped to >= 1.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from sparse_detr.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou
from sparse_detr.models.matcher import FlatMatch, HungarianMatcher, MatchIndices, flatten_indices

HEAD_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")
BACKBONE_SUFFIX = "_backbone"  # loss-key suffix of the OS head (``backbone_outputs``)


def build_weight_dict(cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0, mask: float = 1.0,
                      num_dec_layers: int = 6, num_enc_aux: int = 0, two_stage: bool = False,
                      backbone_head: bool = False) -> dict[str, float]:
    """Weight of every loss the criterion can return (Sec. 7: 2 / 5 / 2 for every head, mask 1).

    Args:
        num_dec_layers: decoder layers; the last one is the final head, the others give ``_{i}`` aux terms.
        num_enc_aux: encoder auxiliary heads (Sparse DETR: 5, after encoder layers 1..5; 0 when dense).
        two_stage: add the ``_enc`` terms of the two-stage head.
        backbone_head: add the ``_backbone`` terms of the objectness-score (OS) selection head.
    """
    head = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    suffixes = [""] + [f"_{i}" for i in range(num_dec_layers - 1)]
    if two_stage:
        suffixes.append("_enc")
    suffixes += [f"_enc_aux_{i}" for i in range(num_enc_aux)]
    if backbone_head:
        suffixes.append(BACKBONE_SUFFIX)
    weights = {name + suffix: w for suffix in suffixes for name, w in head.items()}
    weights["loss_mask"] = mask
    return weights


def weighted_total(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """THE place loss weights are applied: sum of ``weight * loss`` over the keys present in both dicts.

    Keys missing from ``weight_dict`` (``stat_*`` logging values) are ignored; weights without a loss (e.g. the mask
    weight of a dense model) are skipped.
    """
    terms = [losses[k] * w for k, w in weight_dict.items() if k in losses]
    if not terms:
        raise ValueError(f"weighted_total: no loss matches the weight dict (losses: {sorted(losses)})")
    return torch.stack(terms).sum()


def check_finite(losses: dict[str, Tensor]) -> None:
    """Raise ``FloatingPointError`` naming every non-finite loss term.

    One host sync in the common all-finite case (a single ``all()`` over the stacked values); the per-name scan only
    runs once something is wrong, so a NaN is reported with the head it came from instead of an opaque assert later.
    """
    names = list(losses)
    values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
    if bool(torch.isfinite(values).all()):
        return
    bad = [f"{k}={v:.4g}" for k, v in zip(names, values.tolist()) if not math.isfinite(v)]
    raise FloatingPointError(f"non-finite loss terms: {', '.join(bad)}")


def mask_prediction_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of the token scorer against the DAM-derived top-k targets
    (Sparse DETR's mask-prediction loss; method notes Sec. 6).

    Args:
        logits: (B, S) scorer logits.
        targets: (B, S) float in {0, 1}, built by the model without gradient.
        weights: optional (B, S) float, 1 for tokens that count (e.g. 0 on padding); absent = all tokens count.
    Returns:
        Scalar: mean over counted tokens of each image, then mean over images.
    """
    logits, targets = logits.float(), targets.to(logits.device, torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weights is None:
        return bce.mean(dim=1).mean()
    weights = weights.float()
    # where(), so a garbage logit on an uncounted token cannot turn the sum into NaN.
    bce = torch.where(weights > 0, bce * weights, torch.zeros_like(bce))
    per_image = bce.sum(dim=1) / weights.sum(dim=1).clamp(min=torch.finfo(torch.float32).eps)
    return per_image.mean()


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor | float:
    """Ground-truth boxes in the batch, averaged over processes, at least 1 (keeps gradients scale-invariant to
    how the boxes are spread over GPUs; as DETR and Deformable DETR do)."""
    count = float(sum(int(t["labels"].shape[0]) for t in targets))
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(count, device=device)
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return max(count, 1.0)


class SetCriterion(nn.Module):
    """Hungarian set loss for every prediction head plus the mask-prediction loss.

    Args:
        num_classes: K of the class heads (Sparse DETR on COCO: 91, ids used directly).
        matcher: the ``HungarianMatcher`` shared by all heads (each head is matched on its own).
        weight_dict: from ``build_weight_dict``; stored for the trainer, NOT applied here (see ``weighted_total``).
        focal_alpha, focal_gamma: sigmoid focal loss parameters (Lin et al. 2017; 0.25 / 2).
        class_agnostic_enc: train the two-stage head with every label set to 0 (plain Deformable DETR two-stage,
            binary foreground head); False = Sparse DETR's class-specific encoder head.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, class_agnostic_enc: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.class_agnostic_enc = class_agnostic_enc
        self._checked_keys = False

    def loss_labels(self, logits: Tensor, matched: tuple[Tensor, Tensor], labels: Tensor,
                    num_boxes: Tensor | float, valid: Tensor | None = None) -> Tensor:
        """Sigmoid focal loss, summed over predictions and classes, divided by ``num_boxes``.

        Deformable DETR writes this as ``focal.mean(1).sum() / num_boxes * Q``, which is the same number: the sum
        over all B*Q*K terms over ``num_boxes``. Unmatched predictions are trained towards all-zero targets
        ("no object" has no class of its own with sigmoid classification).

        Args:
            logits: (B, Q, K) raw logits.
            matched: (batch_idx, pred_idx), each (N,) on the logits' device.
            labels: (N,) int64 target labels of the matched pairs.
            valid: optional (B, Q) bool; invalid predictions contribute nothing, not even as negatives.
        """
        logits = logits.float()
        if valid is not None:
            # Zero the invalid logits BEFORE the loss: masking afterwards would still propagate NaN gradients from
            # inf/NaN logits on padding slots (0 * NaN = NaN in backward).
            logits = torch.where(valid[..., None], logits, torch.zeros_like(logits))
        target = torch.zeros_like(logits)
        target[matched[0], matched[1], labels] = 1.0
        loss = sigmoid_focal_loss(logits, target, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        if valid is not None:
            loss = loss * valid[..., None].to(loss.dtype)
        return loss.sum() / num_boxes

    @staticmethod
    def loss_boxes(src_boxes: Tensor, tgt_boxes: Tensor, num_boxes: Tensor | float) -> tuple[Tensor, Tensor]:
        """L1 on (cx, cy, w, h) and 1 - GIoU of matched pairs, each summed and divided by ``num_boxes``.

        Args:
            src_boxes, tgt_boxes: (N, 4) cxcywh in [0, 1] (N may be 0: the sums are then 0 but stay in the graph).
        Returns:
            (loss_bbox, loss_giou) scalars.
        """
        src_boxes, tgt_boxes = src_boxes.float(), tgt_boxes.float()
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def head_losses(self, head: dict[str, Tensor], targets: list[dict[str, Tensor]], num_boxes: Tensor | float,
                    suffix: str = "", match: FlatMatch | None = None) -> tuple[dict[str, Tensor],
                                                                                tuple[Tensor, Tensor, Tensor]]:
        """Match one head (unless ``match`` is given) and compute its three losses.

        Args:
            head: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4), optional ``valid`` (B, Q) bool.
            targets: the (possibly class-agnostic) targets.
            suffix: appended to every key ("", "_0", "_enc", "_enc_aux_0", ...).
            match: this head's (batch_idx, pred_idx, tgt_idx) on the device, from ``HungarianMatcher.match_heads``.
        Returns:
            (losses, (batch_idx, pred_idx, labels)): the matched pairs, (N,) each on the device, with their
            target labels.
        """
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
        """Compute every loss the outputs allow (see the module docstring for the keys).

        Args:
            outputs: the model's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs``,
                ``enc_outputs``, ``enc_aux_outputs``, ``backbone_outputs``, ``mask_logits`` / ``mask_targets`` /
                ``mask_weights``; other keys are ignored).
            targets: B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) cxcywh normalised.
        Returns:
            Named unweighted scalar losses and ``stat_*`` logging values.
        """
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            # The classic custom-dataset mistake: a head sized for one label map, targets from another.
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
                # Deformable DETR two-stage: the encoder head only separates objects from background.
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            heads.append((outputs["enc_outputs"], enc_targets, "_enc", self.class_agnostic_enc))

        # Sparse DETR encoder auxiliary loss (method notes Sec. 4): each layer's kept tokens are matched on their
        # own, with real class labels; the `valid` mask hides the slots beyond each image's k_b.
        for i, enc_aux in enumerate(outputs.get("enc_aux_outputs") or []):
            heads.append((enc_aux, targets, f"_enc_aux_{i}", False))

        # OS token selection (method §6, the paper's ablation): the objectness head on the backbone tokens is a
        # detection head like the two-stage one, class-specific (its max class logit ranks the tokens); `valid`
        # hides padding and tokens whose grid proposal is invalid. Without this loss the head would never train.
        if outputs.get("backbone_outputs") is not None:
            heads.append((outputs["backbone_outputs"], targets, BACKBONE_SUFFIX, False))

        matches = self.matcher.match_heads([h[0] for h in heads], targets, [h[3] for h in heads])
        losses = {}
        for (head, head_targets, suffix, _), match in zip(heads, matches):
            head_loss, matched = self.head_losses(head, head_targets, num_boxes, suffix, match)
            losses.update(head_loss)
            if suffix == "":
                with torch.no_grad():
                    losses["stat_class_error"] = self._class_error(outputs["pred_logits"], *matched)

        if outputs.get("mask_logits") is not None:
            losses["loss_mask"] = mask_prediction_loss(outputs["mask_logits"], outputs["mask_targets"],
                                                       outputs.get("mask_weights"))

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
        # A loss that is computed but has no weight would silently not train (e.g. enc_aux heads with a weight dict
        # built for a dense model): say so once, on the first step.
        self._checked_keys = True
        missing = [k for k in losses if not k.startswith("stat_") and k not in self.weight_dict]
        if missing:
            warnings.warn(f"SetCriterion: losses without a weight (not trained): {missing}", stacklevel=2)
