"""The deformable DETR decoder with iterative box refinement (method notes §5; Deformable DETR Sec. 4.1, App. A.4).

Every layer is post-norm: self-attention among the queries (``nn.MultiheadAttention``) → add & ``norm2``,
deformable cross-attention into the encoder memory around the query's reference point/box → add & ``norm1``,
FFN → add & ``norm3`` (the official module names, so official checkpoints load).

The decoder is given the box heads at call time (they belong to the detector, which also registers them under
``transformer.decoder.*`` only for the official checkpoint layout). Layer l predicts
``box_l = sigmoid(head_l(h_l) + inverse_sigmoid(ref_l))`` (for a 2-d reference point the head's full
(cx, cy, w, h) output is used and only its centre gets the reference added, so the box size is the head's own).
With refinement, ``ref_{l+1} = box_l.detach()`` (gradient does not flow across layers through the boxes); without
it every layer keeps the initial reference. Plain queries + refinement (the "Deformable DETR + iterative bounding
box refinement" recipe) therefore attend around 2-d points in layer 0 and around boxes from layer 1 on. The returned
boxes keep their gradient, so the detector does not evaluate the box heads a second time.

For the DAM (method §6) the decoder can return every layer's cross-attention sampling locations and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_detr.box_ops import inverse_sigmoid
from sparse_detr.models.ms_deform_attn import MSDeformAttn

__all__ = ["DecoderLayer", "Decoder", "DecoderOutput", "refine_boxes"]


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Apply a box head's output to a reference (Deformable DETR App. A.4).

    Args:
        delta: (B, Q, 4) raw box-head output.
        reference: (B, Q, 4) boxes or (B, Q, 2) points, in [0, 1].
    Returns:
        (B, Q, 4) cxcywh boxes in [0, 1].
    """
    ref = inverse_sigmoid(reference)
    if reference.shape[-1] == 2:
        ref = torch.cat((ref, torch.zeros_like(ref)), dim=-1)
    return (delta + ref).sigmoid()


class DecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention and FFN, each followed by add & LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor,
                return_sampling: bool = False) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Args:
            tgt, query_pos: (B, Q, d) content and position queries.
            reference_points: (B, Q, L, 4) boxes or (B, Q, L, 2) points, per level, in the padded [0, 1] frame.
            memory: (B, S, d); spatial_shapes (L, 2); level_start_index (L,); padding_mask (B, S) bool.
        Returns:
            tgt (B, Q, d), and with ``return_sampling`` the cross-attention (sampling_locations (B, Q, H, L, P, 2),
            attention_weights (B, Q, H, L, P)), else None.
        """
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))

        out = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                              padding_mask, return_sampling=return_sampling)
        sampling = None
        if return_sampling:
            out, locations, weights = out
            sampling = (locations, weights)
        tgt = self.norm1(tgt + self.dropout1(out))

        ffn = self.linear2(self.dropout3(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn)), sampling


@dataclass
class DecoderOutput:
    """What ``Decoder.forward`` returns.

    hidden: (Ld, B, Q, d) every layer's output.
    boxes: (Ld, B, Q, 4) every layer's predicted boxes, cxcywh in [0, 1], with gradient.
    references: Ld tensors (B, Q, 4|2), the reference each layer attended around (its input). A tuple, not a
        stacked tensor: with plain queries and refinement, layer 0 has 2-d points and the later layers boxes.
    sampling_locations: (B, Ld, Q, H, L, P, 2) or None; attention_weights: (B, Ld, Q, H, L, P) or None.
    """

    hidden: Tensor
    boxes: Tensor
    references: tuple[Tensor, ...]
    sampling_locations: Optional[Tensor] = None
    attention_weights: Optional[Tensor] = None


class Decoder(nn.Module):
    """``num_layers`` decoder layers with optional iterative box refinement.

    Args:
        num_layers: Ld.
        refine: iterative box refinement (``with_box_refine``): each layer's boxes become the next reference.
        **layer_kwargs: ``DecoderLayer`` arguments.
    """

    def __init__(self, num_layers: int, refine: bool = False, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.refine = refine

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, padding_mask: Tensor,
                box_heads: Sequence[nn.Module], return_sampling: bool = False) -> DecoderOutput:
        """Args:
            tgt, query_pos: (B, Q, d).
            reference: (B, Q, 4) initial boxes (two-stage) or (B, Q, 2) points (plain), normalised to the image.
            memory: (B, S, d) encoder output; spatial_shapes (L, 2); level_start_index (L,).
            valid_ratios: (B, L, 2) unpadded fraction (w, h) of every level; padding_mask (B, S).
            box_heads: one box head per layer (Ld modules, possibly the same one repeated).
            return_sampling: also return the cross-attention sampling (for the DAM).
        """
        if len(box_heads) < len(self.layers):
            raise ValueError(f"decoder has {len(self.layers)} layers but got {len(box_heads)} box heads")
        # A box scales with the valid ratio on both its centre and its size: (w, h, w, h).
        ratios = valid_ratios if reference.shape[-1] == 2 else torch.cat((valid_ratios, valid_ratios), -1)
        hidden, boxes, references, locations, weights = [], [], [], [], []
        for layer, head in zip(self.layers, box_heads):
            tgt, sampling = layer(tgt, query_pos, reference[:, :, None] * ratios[:, None], memory, spatial_shapes,
                                  level_start_index, padding_mask, return_sampling=return_sampling)
            box = refine_boxes(head(tgt), reference)
            hidden.append(tgt)
            boxes.append(box)
            references.append(reference)
            if sampling is not None:
                locations.append(sampling[0])
                weights.append(sampling[1])
            if self.refine:
                reference = box.detach()
                if ratios.shape[-1] == 2:
                    ratios = torch.cat((valid_ratios, valid_ratios), -1)
        return DecoderOutput(
            hidden=torch.stack(hidden), boxes=torch.stack(boxes), references=tuple(references),
            sampling_locations=torch.stack(locations, dim=1) if return_sampling else None,
            attention_weights=torch.stack(weights, dim=1) if return_sampling else None,
        )
