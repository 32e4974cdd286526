"""Raw outputs → detections in original-image pixels: sigmoid, top ``num_select`` over the Q·K (query, class)
scores of each image, no NMS (DETR Sec. 3.1: one-to-one matching makes duplicates rare). Stateless, exportable."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_detr.box_ops import box_cxcywh_to_xyxy, scale_boxes


class PostProcess(nn.Module):
    """Top-k (query, class) selection and box rescaling; ``num_select`` detections per image (COCO: 100)."""

    def __init__(self, num_select: int = 100):
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def select(self, pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tensors-only selection (the exported path). pred_logits (B, Q, K) raw; pred_boxes (B, Q, 4) cxcywh in
        [0, 1]; target_sizes (B, 2) original (h, w). Returns scores (B, n) decreasing, labels (B, n) int64, boxes
        (B, n, 4) xyxy original pixels, n = min(num_select, Q·K)."""
        if pred_logits.shape[0] != target_sizes.shape[0]:
            raise ValueError(f"PostProcess: {pred_logits.shape[0]} images but {target_sizes.shape[0]} target sizes")
        num_queries, num_classes = pred_logits.shape[1:]
        k = min(self.num_select, num_queries * num_classes)

        # Sigmoid, not softmax: classes are independent binary problems under the focal loss (no background class).
        prob = pred_logits.float().sigmoid().flatten(1)                     # (B, Q*K), index = q*K + c
        scores, flat_idx = prob.topk(k, dim=1)                               # (B, k), sorted descending
        query_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")  # (B, k)
        labels = flat_idx % num_classes                                      # (B, k)

        boxes = box_cxcywh_to_xyxy(pred_boxes.float())                      # (B, Q, 4)
        boxes = torch.gather(boxes, 1, query_idx[..., None].expand(-1, -1, 4))  # (B, k, 4)
        return scores, labels, scale_boxes(boxes, target_sizes.to(boxes.device))

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``select`` on ``outputs``, as B dicts of ``scores``, ``labels``, ``boxes`` (not clipped, as DETR)."""
        scores, labels, boxes = self.select(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": lbl, "boxes": b} for s, lbl, b in zip(scores, labels, boxes)]

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}"
