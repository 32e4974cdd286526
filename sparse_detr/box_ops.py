"""Box helpers shared by the models (matcher, criterion, postprocess, two-stage proposals) and the data pipeline.

Conventions used across the project:
  * ``cxcywh``: (centre x, centre y, width, height), normalised to [0, 1] by the image size. This is what the model
    predicts and what targets store (DETR, Sec. 3.1).
  * ``xyxy``: (x0, y0, x1, y1) corners, either normalised or in pixels. IoU / GIoU are computed on this form.

Everything here is clamp-safe: degenerate boxes (zero or negative width/height, as a freshly initialised box head or a
random crop can produce) give finite values instead of the NaN that a plain ``inter / union`` produces, so a bad box
turns into a large loss that the trainer can report rather than an opaque assert deep inside the matcher.

This module imports nothing else from the project.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

# Smallest area used as a denominator. Normalised COCO boxes have areas >= ~1e-6, so this never changes a real value.
_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy. Works on any leading shape and keeps autograd."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh. Works on any leading shape and keeps autograd."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...,) area; inverted boxes count as area 0 rather than a negative area."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_terms(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection, union and enclosing-box area of two broadcastable (..., 4) xyxy tensors.

    Computed in float32 at least: under autocast the boxes may arrive in bf16, whose 8-bit mantissa makes
    ``union - inter`` for two near-identical boxes mostly rounding noise.
    """
    dtype = torch.promote_types(boxes1.dtype, torch.float32)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    area1, area2 = box_area(boxes1), box_area(boxes2)

    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter

    # Smallest box enclosing both (the "C" of the GIoU paper, Rezatofighi et al. 2019, Alg. 1).
    enc_top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    enc_bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enc_wh = (enc_bottom_right - enc_top_left).clamp(min=0)
    enclosing = enc_wh[..., 0] * enc_wh[..., 1]
    return inter, union, enclosing


def _giou_from_terms(inter: Tensor, union: Tensor, enclosing: Tensor) -> Tensor:
    # Clamping both denominators keeps two zero-area boxes at a finite GIoU (0 - 0 = 0) instead of 0/0 = NaN.
    union_c = union.clamp(min=_EPS)
    iou = inter / union_c
    return iou - (enclosing - union) / enclosing.clamp(min=_EPS)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU matrix.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
    Returns:
        (N, M) IoU in [0, 1].
    """
    inter, union, _ = _iou_terms(boxes1[:, None, :], boxes2[None, :, :])
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU matrix (used as a matching cost).

    ``torchvision.ops.generalized_box_iou`` has the same maths but divides without a guard, so one degenerate
    prediction turns the whole cost matrix into NaN; this version clamps the denominators instead.

    Args:
        boxes1: (N, 4) xyxy.
        boxes2: (M, 4) xyxy.
    Returns:
        (N, M) GIoU in [-1, 1].
    """
    return _giou_from_terms(*_iou_terms(boxes1[:, None, :], boxes2[None, :, :]))


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Element-wise GIoU of matched pairs (used by the loss: O(N) instead of the diagonal of an N x N matrix).

    Args:
        boxes1: (..., 4) xyxy.
        boxes2: (..., 4) xyxy, broadcastable with ``boxes1``.
    Returns:
        (...,) GIoU in [-1, 1].
    """
    return _giou_from_terms(*_iou_terms(boxes1, boxes2))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x``, clamped so that 0 and 1 map to finite values (about -/+ 11.5 with the default eps).

    Used to turn reference boxes in [0, 1] back into the unbounded space where the box heads add their offsets
    (Deformable DETR's iterative bounding-box refinement, Sec. 4.2 and App. A.4).
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def scale_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Scale normalised xyxy/cxcywh boxes to pixels.

    Args:
        boxes: (B, N, 4) normalised boxes.
        sizes: (B, 2) image sizes as (h, w), as targets store ``orig_size``.
    Returns:
        (B, N, 4) boxes multiplied by (w, h, w, h).
    """
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1).to(boxes.dtype)
    return boxes * scale[:, None, :]
