"""Turn raw model outputs into detections in original-image pixels (what evaluation and export consume).

Sparse DETR / Deformable DETR inference (method notes, Sec. 7): sigmoid over all Q x K (query, class) scores, keep the
top ``num_select`` pairs over the flattened Q*K scores of each image, no NMS. A query may therefore appear several
times with different classes; the one-to-one training makes duplicates of the same class rare, which is why DETR-style
detectors need no NMS (DETR Sec. 3.1).

The module is stateless and loop-free over images (only the final list of dicts is built per image), so it can be
exported together with the model as one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_detr.box_ops import box_cxcywh_to_xyxy, scale_boxes


class PostProcess(nn.Module):
    """Top-k (query, class) selection and box rescaling.

    Args:
        num_select: detections kept per image (COCO evaluation uses 100). If Q*K is smaller, all pairs are kept.
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def select(self, pred_logits: Tensor, pred_boxes: Tensor, target_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Batched selection, tensors only (the path an exported graph uses: no Python lists or dicts).

        Args:
            pred_logits: (B, Q, K) raw logits; pred_boxes: (B, Q, 4) cxcywh in [0, 1].
            target_sizes: (B, 2) original image sizes as (h, w) (the targets' ``orig_size``).
        Returns:
            scores (B, n) sorted in decreasing order, labels (B, n) int64 in [0, K), boxes (B, n, 4) xyxy in
            original-image pixels, with n = min(num_select, Q*K).
        """
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
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K) raw logits and ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1]; other keys
                are ignored.
            target_sizes: (B, 2) original image sizes as (h, w), so the boxes come back in the pixels of the image
                before any resize.
        Returns:
            B dicts with ``scores`` (n,) sorted in decreasing order, ``labels`` (n,) int64, ``boxes`` (n, 4) xyxy in
            original-image pixels (see ``select``). Boxes are not clipped to the image (as in DETR; COCO evaluation
            accepts them).
        """
        scores, labels, boxes = self.select(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": lbl, "boxes": b} for s, lbl, b in zip(scores, labels, boxes)]

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}"
