"""The encoder stage (Sparse DETR Sec. 3.2-3.3): grid proposals, the token selector it owns, the (sparse)
deformable encoder layers and their aux heads; and the token geometry it needs (reference points, gather /
scatter of the kept tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_detr.models.ms_deform_attn import MSDeformAttn
from sparse_detr.models.selection import Selection, TokenSelector
from sparse_detr.models.tokens import Tokens

__all__ = [
    "grid_proposals", "proposal_features", "dense_reference_points", "gather_tokens", "scatter_tokens",
    "EncoderLayer", "SparseEncoder", "ProposalProjection", "Encoded", "EncoderStage",
]


def grid_proposals(padding_mask: Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One box per token as logits (Deformable DETR App. A.4): the token centre in the level's unpadded part, size
    0.05 · 2^l. padding_mask (B, S); shapes: L host (h, w). Returns proposals (B, S, 4), +inf where invalid
    (sigmoid stays finite), and valid (B, S): not padding and every coordinate in (0.01, 0.99)."""
    batch = padding_mask.shape[0]
    device = padding_mask.device
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(shapes):  # a loop over levels only: their grids differ in shape
        level_mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~level_mask[:, :, 0]).sum(1).float().clamp(min=1)  # (B,) unpadded rows
        valid_w = (~level_mask[:, 0, :]).sum(1).float().clamp(min=1)
        ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        cx = (xs[None, None, :] / valid_w[:, None, None]).expand(batch, h, w)
        cy = (ys[None, :, None] / valid_h[:, None, None]).expand(batch, h, w)
        wh = torch.full_like(cx, 0.05 * 2.0 ** lvl)
        boxes.append(torch.stack((cx, cy, wh, wh), dim=-1).reshape(batch, h * w, 4))
        start += h * w
    boxes = torch.cat(boxes, dim=1)
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~padding_mask
    logits = torch.log(boxes / (1 - boxes))
    return logits.masked_fill(~valid[..., None], float("inf")), valid


def proposal_features(tokens: Tensor, valid: Tensor, proj: nn.Linear, norm: nn.LayerNorm) -> Tensor:
    """``norm(proj(tokens))`` (B, S, d) with tokens not ``valid`` (B, S) zeroed first, as the official code."""
    return norm(proj(tokens.masked_fill(~valid[..., None], 0.0)))


def dense_reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """(B, S, L, 2) (x, y): every token's centre, relative to its level's valid size, in each level's padded [0, 1]
    frame. valid_ratios (B, L, 2) is the unpadded fraction (w, h) of every level."""
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        x = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)  # (B, h*w)
        y = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        points.append(torch.stack((x, y), dim=-1))
    points = torch.cat(points, dim=1)  # (B, S, 2) relative to the valid region
    return points[:, :, None] * valid_ratios[:, None]


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, S, *rest) at indices (B, k) → (B, k, *rest)."""
    rest = x.shape[2:]
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    out = flat.gather(1, indices[..., None].expand(-1, -1, flat.shape[-1]))
    return out.reshape(indices.shape + rest)


def scatter_tokens(full: Tensor, indices: Tensor, kept: Tensor, valid: Tensor) -> Tensor:
    """full (B, S, d) with the ``valid`` (B, k) rows of kept (B, k, d) written at indices (B, k), out of place.
    Invalid slots rewrite the old value; ``topk`` indices are unique, so the scatter is deterministic."""
    index = indices[..., None].expand_as(kept)
    src = torch.where(valid[..., None], kept, full.gather(1, index))
    return full.scatter(1, index, src)


class EncoderLayer(nn.Module):
    """Post-norm deformable encoder layer: self-attention → add & norm1 → FFN → add & norm2."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, query_pos: Tensor, reference_points: Tensor, value: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor) -> Tensor:
        """query, query_pos (B, k, d); reference_points (B, k, L, 2); value (B, S, d) → query (B, k, d)."""
        attn = self.self_attn(query + query_pos, reference_points, value, spatial_shapes, level_start_index,
                              padding_mask)
        query = self.norm1(query + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(torch.relu(self.linear1(query))))
        return self.norm2(query + self.dropout3(ffn))


class SparseEncoder(nn.Module):
    """Encoder layers that update every token (dense) or only the kept ones (Sparse DETR Sec. 3.3): gathered once,
    each layer's valid outputs scattered back and fed on (not re-gathered) to the next layer."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor, kept_indices: Optional[Tensor] = None,
                layer_valid: Optional[Sequence[Tensor]] = None, proposals: Optional[Tensor] = None,
                aux_heads: Optional[tuple[Sequence[nn.Module], Sequence[nn.Module]]] = None,
                ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Args:
            src, pos: (B, S, d) tokens and position + level embedding; reference_points (B, S, L, 2).
            kept_indices: (B, k) sorted by decreasing score; None = dense.
            layer_valid: one (B, k_i) per layer, k_i non-increasing: layer i updates its first k_i kept tokens.
            proposals: (B, S, 4) grid-proposal logits; aux_heads: (class heads, box heads), one per layer but the last.
        Returns:
            memory (B, S, d); per layer but the last {pred_logits (B, k_i, K), pred_boxes (B, k_i, 4), valid (B, k_i)}.
        """
        sparse = kept_indices is not None
        if sparse:
            if layer_valid is None or len(layer_valid) != len(self.layers):
                raise ValueError("the sparse encoder needs one layer_valid mask per layer")
            query, query_pos = gather_tokens(src, kept_indices), gather_tokens(pos, kept_indices)
            reference_points = gather_tokens(reference_points, kept_indices)
        else:
            query, query_pos = src, pos
        kept_proposals = None
        if aux_heads is not None:
            if not sparse or proposals is None:
                raise ValueError("encoder aux heads need the sparse encoder (kept tokens) and grid proposals")
            kept_proposals = gather_tokens(proposals, kept_indices)

        memory, aux_outputs, indices = src, [], kept_indices
        for i, layer in enumerate(self.layers):
            if sparse:  # layer i's set is a prefix of layer i-1's
                k_i = layer_valid[i].shape[1]
                query, query_pos, reference_points = query[:, :k_i], query_pos[:, :k_i], reference_points[:, :k_i]
                indices = indices[:, :k_i]
            query = layer(query, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                          padding_mask)
            memory = scatter_tokens(memory, indices, query, layer_valid[i]) if sparse else query
            if aux_heads is not None and i < len(self.layers) - 1:
                class_head, box_head = aux_heads[0][i], aux_heads[1][i]
                aux_outputs.append({
                    "pred_logits": class_head(query),
                    "pred_boxes": (box_head(query) + kept_proposals[:, :query.shape[1]]).sigmoid(),
                    "valid": layer_valid[i],
                })
        return memory, aux_outputs


class ProposalProjection(nn.Module):
    """``enc_output_norm(enc_output(x))`` with invalid tokens zeroed first: the input of the token selector (on the
    backbone tokens) and of the two-stage head (on the encoder memory), one set of weights shared by both."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.enc_output, self.enc_output_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """tokens (B, S, d), valid (B, S) → (B, S, d)."""
        return proposal_features(tokens, valid, self.enc_output, self.enc_output_norm)


@dataclass
class Encoded:
    """memory (B, S, d); proposals (B, S, 4) grid-proposal logits and proposal_valid (B, S), or None without a
    proposal projection; selection or None (dense); aux_outputs: per encoder layer but the last {pred_logits
    (B, k_i, K), pred_boxes (B, k_i, 4), valid (B, k_i)} (training with aux heads), else empty."""

    memory: Tensor
    proposals: Optional[Tensor]
    proposal_valid: Optional[Tensor]
    selection: Optional[Selection]
    aux_outputs: list[dict[str, Tensor]]

    def outputs(self) -> dict:
        """The detector's output entries of this stage: ``selection``, ``enc_aux_outputs``."""
        out: dict = {"selection": self.selection} if self.selection is not None else {}
        return out | ({"enc_aux_outputs": self.aux_outputs} if self.aux_outputs else {})


class EncoderStage(nn.Module):
    """Tokens → grid proposals → the selector's kept set → the encoder layers over it (dense without a selector) →
    memory, with aux heads on each layer's kept tokens (Sparse DETR Sec. 3.2-3.3).

    stack: the layers; selector: None = dense; proposal_proj: the selector's input projection (two-stage models);
    aux_class_embed / aux_bbox_embed: one head per layer but the last (``use_enc_aux_loss``), run in training only;
    enc_loss_padding "official": an aux head's loss counts every slot up to the batch's largest k_b.
    """

    def __init__(self, stack: SparseEncoder, selector: Optional[TokenSelector] = None,
                 proposal_proj: Optional[ProposalProjection] = None, aux_class_embed: Optional[nn.ModuleList] = None,
                 aux_bbox_embed: Optional[nn.ModuleList] = None, enc_loss_padding: str = "official") -> None:
        super().__init__()
        if selector is not None and proposal_proj is None:
            raise ValueError("a sparse encoder needs two_stage (the selector shares enc_output with the two-stage head)")
        if (aux_class_embed is not None) != (aux_bbox_embed is not None):
            raise ValueError("encoder aux heads need both class and box heads")
        if aux_class_embed is not None and selector is None:
            raise ValueError("use_enc_aux_loss needs a sparse encoder (the aux heads score the kept tokens)")
        if enc_loss_padding not in ("official", "exclude"):
            raise ValueError(f"enc_loss_padding must be 'official' or 'exclude', got {enc_loss_padding!r}")
        self.stack, self.selector, self.proposal_proj = stack, selector, proposal_proj
        self.aux_class_embed, self.aux_bbox_embed = aux_class_embed, aux_bbox_embed
        self.enc_loss_padding = enc_loss_padding

    @property
    def needs_decoder_sampling(self) -> bool:
        """Whether the selector's training target reads the decoder's sampling (the DAM)."""
        return self.selector is not None and self.selector.needs_decoder_sampling

    def _select(self, tok: Tokens, proposals: Optional[Tensor], valid: Optional[Tensor]) -> Optional[Selection]:
        if self.selector is None:
            return None
        features = self.proposal_proj(tok.src + tok.pos, valid) if self.selector.needs_features else None
        selection = self.selector(features, proposals, tok.padding_mask, tok.shapes, tok.canvas_hw, tok.image_hw)
        return selection.for_layers(len(self.stack.layers))

    def forward(self, tok: Tokens) -> Encoded:
        pad = tok.padding_mask
        proposals = valid = None
        if self.proposal_proj is not None:
            proposals, valid = grid_proposals(pad, tok.shapes)
        selection = self._select(tok, proposals, valid)
        aux_heads = None
        if self.aux_class_embed is not None and self.training:  # they only feed losses
            aux_heads = (list(self.aux_class_embed), list(self.aux_bbox_embed))
        memory, aux = self.stack(tok.src, tok.pos, dense_reference_points(tok.shapes, tok.valid_ratios),
                                 tok.spatial_shapes, tok.level_start_index, pad,
                                 kept_indices=None if selection is None else selection.indices,
                                 layer_valid=None if selection is None else selection.layer_valid,
                                 proposals=proposals, aux_heads=aux_heads)
        if aux and self.enc_loss_padding == "official":  # every slot up to the batch's largest k_b (official k)
            for head, (k_i, counts) in zip(aux, selection.layers):
                slots = torch.arange(k_i, device=pad.device)[None, :] < counts.max()
                head["valid"] = slots.expand(pad.shape[0], -1)
        return Encoded(memory, proposals, valid, selection, aux)
