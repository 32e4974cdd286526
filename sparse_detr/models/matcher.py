"""Hungarian matching between a set of predictions and the ground-truth boxes of each image.

DETR (Carion et al. 2020, Sec. 3.1) trains with a one-to-one assignment: each ground-truth object is matched to exactly
one prediction by minimising a matching cost, and every other prediction is trained to say "no object". The cost used
here is the one of the official Deformable DETR / Sparse DETR code:

    C = cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU)        (2 / 5 / 2)

The matcher is a pure function of these costs, run under ``torch.no_grad()``: the whole (B, Q, T_total) cost is built
on the model's device in one batched computation, copied to the CPU once, and scipy's ``linear_sum_assignment`` solves
each image's block. ``match_heads`` does this for every head of a training step at once: one packed device -> host copy
of all costs and valid masks, and one host -> device copy of all matched indices (each blocking copy stalls the GPU). The same matcher serves every head: the final decoder layer, the decoder auxiliary layers, the
two-stage encoder head (``enc_outputs``, one prediction per token) and Sparse DETR's encoder auxiliary heads
(``enc_aux_outputs``, one prediction per kept token). The last two carry a ``valid`` mask: predictions on padding
tokens / invalid proposals / unused top-k slots are never matched.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sparse_detr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# Cost given to invalid predictions in the batched matrix. It must stay finite (scipy rejects inf/NaN), and the
# per-image solve drops invalid rows anyway; the constant only keeps the matrix clean for anyone who inspects it.
INVALID_COST = 1e6

MatchIndices = list[tuple[Tensor, Tensor]]
FlatMatch = tuple[Tensor, Tensor, Tensor]  # (batch_idx, pred_idx, tgt_idx), see flatten_indices


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-style classification cost of every prediction against every target label.

    The cost is "focal loss if this prediction is trained positive for the label" minus "focal loss if it is trained
    negative for it" (which is what it gets when left unmatched), i.e. the change in the classification loss that the
    assignment causes. Using the focal loss, not -p as DETR's softmax matcher does, keeps the matching consistent
    with the sigmoid focal loss the criterion optimises (as Deformable DETR's matcher).

    Args:
        logits: (N, K) raw class logits.
        labels: (T,) int64 labels in [0, K).
    Returns:
        (N, T) cost.
    """
    # Only the target's own class matters for a (prediction, target) pair, so gather those logits first: (N, T).
    # COCO batches have far fewer targets than the 91 classes, so this is also the cheaper order.
    x = logits.float()[:, labels]
    prob = x.sigmoid()
    # -log(p) = softplus(-x) and -log(1 - p) = softplus(x): exact for any logit, where log(p + eps) would both
    # saturate for confident predictions and bias the cost of uncertain ones.
    pos_cost = alpha * (1 - prob).pow(gamma) * F.softplus(-x)
    neg_cost = (1 - alpha) * prob.pow(gamma) * F.softplus(x)
    return pos_cost - neg_cost


def solve_assignment(cost: Tensor, sizes: list[int], valid: Tensor | None = None) -> MatchIndices:
    """Per-image linear assignment on a batched CPU cost.

    Args:
        cost: (B, Q, T_total) on the CPU; columns are the images' targets, concatenated in batch order.
        sizes: the number of targets of each image (sums to T_total).
        valid: optional (B, Q) bool on the CPU; rows with False are never assigned.
    Returns:
        For each image, (pred_idx, tgt_idx): int64 tensors of length min(#valid predictions, #targets);
        pred_idx is sorted and tgt_idx indexes the image's own targets.
    """
    cost_np = cost.numpy()
    valid_np = None if valid is None else valid.numpy()
    indices: MatchIndices = []
    start = 0
    for b, size in enumerate(sizes):
        block = cost_np[b, :, start:start + size]  # (Q, T_b): image b's predictions vs its own targets only
        start += size
        rows = np.arange(block.shape[0]) if valid_np is None else np.flatnonzero(valid_np[b])
        if size == 0 or rows.size == 0:
            indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
            continue
        block = block[rows]
        if not np.isfinite(block).all():
            # scipy would only say "cost matrix is infeasible"; name the likely culprit instead.
            raise FloatingPointError(
                f"HungarianMatcher: non-finite matching cost in image {b} (NaN/inf in pred_logits or pred_boxes?)")
        # Solving on the valid rows only is exact: with #valid < T scipy returns a matching of every valid row
        # (min(#valid, T) pairs) and leaves the surplus targets unmatched, rather than pairing them with padding.
        pred, tgt = linear_sum_assignment(block)
        indices.append((torch.as_tensor(rows[pred], dtype=torch.int64), torch.as_tensor(tgt, dtype=torch.int64)))
    return indices


def flatten_indices(indices: MatchIndices, sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Turn per-image matches into flat index tensors for batched gathering in the loss.

    Args:
        indices: the matcher's output, B pairs (pred_idx, tgt_idx).
        sizes: the number of targets of each image.
    Returns:
        (batch_idx, pred_idx, tgt_idx), each (N,) int64 on the CPU, N = total matches; ``tgt_idx`` indexes the
        batch's concatenated targets, so ``outputs[batch_idx, pred_idx]`` pairs with ``all_targets[tgt_idx]``.
    """
    counts = torch.tensor([len(pred) for pred, _ in indices], dtype=torch.int64)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0) - torch.tensor(sizes, dtype=torch.int64)
    batch_idx = torch.repeat_interleave(torch.arange(len(indices)), counts)
    pred_idx = torch.cat([pred for pred, _ in indices]) if indices else torch.empty(0, dtype=torch.int64)
    tgt_idx = torch.cat([tgt for _, tgt in indices]) if indices else torch.empty(0, dtype=torch.int64)
    return batch_idx, pred_idx, tgt_idx + torch.repeat_interleave(offsets, counts)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets by minimum total cost.

    Args:
        cost_class: weight of the focal-style classification cost.
        cost_bbox: weight of the L1 distance between (cx, cy, w, h) boxes.
        cost_giou: weight of the negative generalized IoU.
        focal_alpha, focal_gamma: focal parameters of the classification cost (same as the loss).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0, the assignment would be arbitrary")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                    valid: Tensor | None = None) -> Tensor:
        """Batched matching cost of every prediction against every target of the batch.

        Pairs across images are computed too (and thrown away by ``solve_assignment``): one flat computation on the
        device is cheaper than B small ones, and the memory (B * Q * T_total floats) stays small.

        Args:
            pred_logits: (B, Q, K) raw logits.
            pred_boxes: (B, Q, 4) cxcywh in [0, 1].
            tgt_labels: (T_total,) int64, all images' labels concatenated.
            tgt_boxes: (T_total, 4) cxcywh, concatenated in the same order.
            valid: optional (B, Q) bool; invalid rows get ``INVALID_COST``.
        Returns:
            (B, Q, T_total) float32 cost on the predictions' device.
        """
        bsz, num_queries = pred_logits.shape[:2]
        logits = pred_logits.flatten(0, 1)                      # (B*Q, K)
        boxes = pred_boxes.flatten(0, 1).float()                # (B*Q, 4)
        tgt_boxes = tgt_boxes.to(boxes)

        cost = self.cost_class * focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = cost.view(bsz, num_queries, -1)
        if valid is not None:
            # where(), not a multiply/add: invalid slots may hold inf/NaN boxes (e.g. +inf proposals on padding),
            # and those must not leak into the matrix.
            cost = torch.where(valid[..., None], cost, torch.full_like(cost, INVALID_COST))
        return cost

    @torch.no_grad()
    def match(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]],
              valid: Tensor | None = None) -> MatchIndices:
        """Match one head's predictions.

        Args:
            pred_logits: (B, Q, K); pred_boxes: (B, Q, 4) cxcywh; valid: optional (B, Q) bool.
            targets: B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) cxcywh (T_b may be 0).
        Returns:
            B pairs (pred_idx, tgt_idx) of int64 CPU tensors, each of length min(#valid, T_b).
        """
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"HungarianMatcher: {pred_logits.shape[0]} images in outputs, {len(targets)} targets")
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        if sum(sizes) == 0:
            # Nothing to match anywhere: skip the device work and the copy.
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty.clone()) for _ in sizes]
        device = pred_logits.device
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        cost = self.cost_matrix(pred_logits, pred_boxes, tgt_labels, tgt_boxes, valid)
        # The single device -> host copy of the step (for this head); everything after runs on the CPU.
        cost_cpu = cost.cpu()
        valid_cpu = None if valid is None else valid.cpu()
        return solve_assignment(cost_cpu, sizes, valid_cpu)

    @torch.no_grad()
    def match_heads(self, heads: Sequence[Mapping[str, Tensor]], targets: list[dict[str, Tensor]],
                    class_agnostic: Sequence[bool] | None = None) -> list[FlatMatch]:
        """Match several heads of one step with one device -> host and one host -> device transfer.

        Gives the same matches as ``match`` on each head; the targets are concatenated once for all heads.

        Args:
            heads: dicts with ``pred_logits`` (B, Q_h, K_h), ``pred_boxes`` (B, Q_h, 4) cxcywh, optional ``valid``
                (B, Q_h) bool, all on one device.
            targets: B dicts with ``labels`` (T_b,) int64 and ``boxes`` (T_b, 4) cxcywh (T_b may be 0).
            class_agnostic: per head, match against every label set to 0 (a binary two-stage head); default all False.
        Returns:
            Per head (batch_idx, pred_idx, tgt_idx), each (N_h,) int64 on the heads' device, as ``flatten_indices``
            gives them: ``tgt_idx`` indexes the batch's concatenated targets.
        """
        flags = [False] * len(heads) if class_agnostic is None else list(class_agnostic)
        if len(flags) != len(heads):
            raise ValueError(f"HungarianMatcher: {len(heads)} heads but {len(flags)} class_agnostic flags")
        for head in heads:
            if len(targets) != head["pred_logits"].shape[0]:
                raise ValueError(f"HungarianMatcher: {head['pred_logits'].shape[0]} images in outputs, "
                                 f"{len(targets)} targets")
        if not heads:
            return []
        device = heads[0]["pred_logits"].device
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        if sum(sizes) == 0:  # nothing to match anywhere: no device work, no copies
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return [(empty, empty, empty) for _ in heads]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        zero_labels = torch.zeros_like(tgt_labels) if any(flags) else None

        # Pack every head's (B, Q_h, T) cost and (B, Q_h) valid mask (as 0/1) into one float32 buffer.
        pieces, layout = [], []
        for head, agnostic in zip(heads, flags):
            valid = head.get("valid")
            cost = self.cost_matrix(head["pred_logits"], head["pred_boxes"], zero_labels if agnostic else tgt_labels,
                                    tgt_boxes, valid)
            pieces.append(cost.flatten())
            if valid is not None:
                pieces.append(valid.flatten().to(cost.dtype))
            layout.append((tuple(cost.shape), valid is not None))
        packed = torch.cat(pieces).cpu()  # THE device -> host transfer of the step

        flat: list[FlatMatch] = []
        offset = 0
        for (bsz, queries, total), has_valid in layout:
            cost_cpu = packed[offset:offset + bsz * queries * total].view(bsz, queries, total)
            offset += cost_cpu.numel()
            valid_cpu = None
            if has_valid:
                valid_cpu = packed[offset:offset + bsz * queries].view(bsz, queries) > 0.5
                offset += bsz * queries
            flat.append(flatten_indices(solve_assignment(cost_cpu, sizes, valid_cpu), sizes))

        # Every head's three index vectors in one (3, N_total) tensor: one host -> device transfer back.
        lengths = [int(b.numel()) for b, _, _ in flat]
        indices = torch.cat([torch.stack(f) for f in flat], dim=1)
        if device.type == "cuda":
            indices = indices.pin_memory()  # lets the copy run asynchronously
        indices = indices.to(device, non_blocking=True)
        return [tuple(part) for part in indices.split(lengths, dim=1)]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> MatchIndices:
        """Match a head given as a model-output dict (``pred_logits``, ``pred_boxes``, optional ``valid``)."""
        return self.match(outputs["pred_logits"], outputs["pred_boxes"], targets, outputs.get("valid"))

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")
