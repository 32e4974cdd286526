"""Deformable DETR decoder with iterative box refinement (Deformable DETR Sec. 4.1, App. A.4).

Post-norm layers: self-attention → norm2, deformable cross-attention → norm1, FFN → norm3 (official names).
``Decoder`` is the layer stack (box heads passed in); ``DecoderStage`` owns it with one class and one box head per
layer. With refinement, layer l+1 attends around layer l's detached boxes. For the DAM (Sparse DETR Sec. 3.2) it
can return every layer's sampling locations and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_detr.box_ops import inverse_sigmoid
from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.models.queries import Queries
from sparse_detr.models.tokens import Tokens

__all__ = ["DecoderLayer", "Decoder", "DecoderOutput", "Decoded", "DecoderStage", "refine_boxes"]


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """sigmoid(delta + inverse_sigmoid(reference)) (Deformable DETR App. A.4); a 2-d point offsets only the centre.

    delta (B, Q, 4) raw head output; reference (B, Q, 4) boxes or (B, Q, 2) points in [0, 1] → (B, Q, 4) cxcywh.
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
        """tgt, query_pos (B, Q, d); reference_points (B, Q, L, 4|2) in each level's padded [0, 1] frame; memory
        (B, S, d). Returns tgt (B, Q, d) and, with ``return_sampling``, (locations (B, Q, H, L, P, 2), weights
        (B, Q, H, L, P)), else None."""
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
    """hidden (Ld, B, Q, d); boxes (Ld, B, Q, 4) cxcywh with gradient; references: each layer's input reference
    (a tuple: layer 0 may have 2-d points, later layers boxes); sampling_locations (B, Ld, Q, H, L, P, 2) and
    attention_weights (B, Ld, Q, H, L, P) or None."""

    hidden: Tensor
    boxes: Tensor
    references: tuple[Tensor, ...]
    sampling_locations: Optional[Tensor] = None
    attention_weights: Optional[Tensor] = None


class Decoder(nn.Module):
    """``num_layers`` decoder layers; ``refine``: each layer's boxes become the next layer's reference."""

    def __init__(self, num_layers: int, refine: bool = False, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.refine = refine

    def forward(self, tgt: Tensor, query_pos: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, padding_mask: Tensor,
                box_heads: Sequence[nn.Module], return_sampling: bool = False) -> DecoderOutput:
        """tgt, query_pos (B, Q, d); reference (B, Q, 4) boxes or (B, Q, 2) points in the unpadded [0, 1] frame;
        memory (B, S, d); valid_ratios (B, L, 2) (w, h); padding_mask (B, S); box_heads: one per layer."""
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


@dataclass
class Decoded:
    """Per decoder layer: logits (B, Q, K) and boxes (B, Q, 4) cxcywh; aux: whether layers 0..Ld-2 are returned
    (``aux_loss``); sampling_locations (B, Ld, Q, H, L, P, 2) / attention_weights (B, Ld, Q, H, L, P) or None."""

    logits: list[Tensor]
    boxes: list[Tensor]
    aux: bool
    sampling_locations: Optional[Tensor] = None
    attention_weights: Optional[Tensor] = None

    def outputs(self) -> dict:
        """The detector's output entries of this stage: ``pred_logits``, ``pred_boxes``, ``aux_outputs``,
        ``dec_sampling_locations``, ``dec_attention_weights``."""
        out = {"pred_logits": self.logits[-1], "pred_boxes": self.boxes[-1]}
        if self.aux:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx}
                                  for lg, bx in zip(self.logits[:-1], self.boxes[:-1])]
        if self.sampling_locations is not None:  # the DAM's inputs
            out["dec_sampling_locations"] = self.sampling_locations
            out["dec_attention_weights"] = self.attention_weights
        return out


class DecoderStage(nn.Module):
    """Queries + memory → the decoder layers → per-layer class logits and boxes.

    class_embed / bbox_embed: one head per decoder layer (the same module repeated when the heads are shared);
    aux_loss: also return the outputs of every layer but the last (``aux_outputs``).
    """

    def __init__(self, stack: Decoder, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList,
                 aux_loss: bool = True) -> None:
        super().__init__()
        if not len(class_embed) == len(bbox_embed) == len(stack.layers):
            raise ValueError(f"the decoder has {len(stack.layers)} layers but {len(class_embed)} class heads and "
                             f"{len(bbox_embed)} box heads")
        self.stack, self.class_embed, self.bbox_embed, self.aux_loss = stack, class_embed, bbox_embed, aux_loss

    @property
    def has_unused_parameters(self) -> bool:
        """Whether DDP needs ``find_unused_parameters``: only refinement without aux loss leaves heads unused."""
        return self.stack.refine and not self.aux_loss and len(self.stack.layers) > 1

    def forward(self, queries: Queries, memory: Tensor, tok: Tokens, return_sampling: bool = False) -> Decoded:
        """memory (B, S, d) → every layer's class logits and boxes (and the sampling, for the DAM)."""
        dec = self.stack(queries.tgt, queries.query_pos, queries.reference, memory, tok.spatial_shapes,
                         tok.level_start_index, tok.valid_ratios, tok.padding_mask, list(self.bbox_embed),
                         return_sampling=return_sampling)
        logits = [head(hidden) for head, hidden in zip(self.class_embed, dec.hidden)]
        return Decoded(logits, list(dec.boxes), self.aux_loss, dec.sampling_locations, dec.attention_weights)
