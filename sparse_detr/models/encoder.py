"""The (sparse) deformable encoder of Sparse DETR (Sec. 3.1-3.3) and the token geometry it needs.

* ``grid_proposals``: one fixed box per token, the two-stage proposals (Deformable DETR App. A.4).
* ``proposal_features``: ``norm(proj(tokens))`` with padded / invalid tokens zeroed, the input of the token scorer
  and of the two-stage head.
* ``dense_reference_points``: every token's reference point on every level.
* ``SparseEncoder``: each layer updates only the kept tokens (chosen by ``selection.py``), attending to the whole
  current token map; updated tokens are scattered back in one batched op. ρ = 0 is the dense Deformable DETR
  encoder. Optional auxiliary heads score the kept tokens after every layer but the last.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_detr.models.ms_deform_attn import MSDeformAttn

__all__ = [
    "grid_proposals", "proposal_features", "dense_reference_points", "gather_tokens", "scatter_tokens",
    "EncoderLayer", "SparseEncoder",
]


# ---------------------------------------------------------------------------------------------------------------
# grid proposals and the features the scorer and the two-stage head see

def grid_proposals(padding_mask: Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One fixed box per token, as inverse-sigmoid logits (Deformable DETR App. A.4).

    Token (x, y) of level l gets centre ((x + 0.5) / valid_W_l, (y + 0.5) / valid_H_l), relative to the image's
    unpadded part of that level, and width = height = 0.05 · 2^l.

    Args:
        padding_mask: (B, S) bool, True = padding.
        shapes: the L level shapes (h_l, w_l) as Python ints, S = Σ h_l · w_l.
    Returns:
        proposals (B, S, 4) cxcywh logits, +inf where invalid (sigmoid(inf) = 1, so boxes stay finite);
        valid (B, S) bool: not padding and every coordinate inside (0.01, 0.99).
    """
    batch = padding_mask.shape[0]
    device = padding_mask.device
    boxes, start = [], 0
    for lvl, (h, w) in enumerate(shapes):  # a loop over levels only: their grids differ in shape
        level_mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~level_mask[:, :, 0]).sum(1).float().clamp(min=1)  # (B,) unpadded rows of this level
        valid_w = (~level_mask[:, 0, :]).sum(1).float().clamp(min=1)  # (B,) unpadded columns
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
    """``norm(proj(tokens))`` with padded / invalid-proposal tokens zeroed first (the official two-stage input).

    Args:
        tokens: (B, S, d) token features (backbone tokens + position before the encoder; memory after it).
        valid: (B, S) bool from ``grid_proposals``.
    Returns:
        (B, S, d).
    """
    return norm(proj(tokens.masked_fill(~valid[..., None], 0.0)))


def dense_reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Every token's reference point on every level (Deformable DETR encoder).

    The token centre is normalised by its level's *valid* size, then scaled by each level's valid ratio, so the
    point is expressed in each level's padded [0, 1] frame.

    Args:
        shapes: the L level shapes (h_l, w_l).
        valid_ratios: (B, L, 2) unpadded fraction (w, h) of every level.
    Returns:
        (B, S, L, 2) normalised (x, y).
    """
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


# ---------------------------------------------------------------------------------------------------------------
# gather / scatter of the kept tokens

def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """x (B, S, *rest) at indices (B, k) → (B, k, *rest)."""
    rest = x.shape[2:]
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    out = flat.gather(1, indices[..., None].expand(-1, -1, flat.shape[-1]))
    return out.reshape(indices.shape + rest)


def scatter_tokens(full: Tensor, indices: Tensor, kept: Tensor, valid: Tensor) -> Tensor:
    """Write the valid kept tokens back into the full map (Sec. 3.3), batched, out of place.

    Slots beyond k_b write back the value already there, so they change nothing. ``topk`` indices are unique per
    image, hence the scatter has no write conflicts and is deterministic.

    Args: full (B, S, d); indices (B, k); kept (B, k, d); valid (B, k). Returns: (B, S, d).
    """
    index = indices[..., None].expand_as(kept)
    src = torch.where(valid[..., None], kept, full.gather(1, index))
    return full.scatter(1, index, src)


# ---------------------------------------------------------------------------------------------------------------
# the encoder

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
        """Args: query, query_pos (B, k, d); reference_points (B, k, L, 2); value (B, S, d) the full token map;
        spatial_shapes (L, 2); level_start_index (L,); padding_mask (B, S). Returns: updated query (B, k, d)."""
        attn = self.self_attn(query + query_pos, reference_points, value, spatial_shapes, level_start_index,
                              padding_mask)
        query = self.norm1(query + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(torch.relu(self.linear1(query))))
        return self.norm2(query + self.dropout3(ffn))


class SparseEncoder(nn.Module):
    """A stack of ``EncoderLayer`` that updates either every token (dense) or only the kept ones (Sec. 3.3).

    Sparse: the kept tokens, their position and reference points are gathered once; layer i attends from the first
    k_i current kept tokens to the whole current map, its valid results are written back, and the updated kept
    tokens (not a re-gather) are the next layer's queries. Tokens a layer does not keep keep their values.
    """

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor, kept_indices: Optional[Tensor] = None,
                layer_valid: Optional[Sequence[Tensor]] = None, proposals: Optional[Tensor] = None,
                aux_heads: Optional[tuple[Sequence[nn.Module], Sequence[nn.Module]]] = None,
                ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Run the encoder.

        Args:
            src, pos: (B, S, d) backbone tokens and position + level embedding.
            reference_points: (B, S, L, 2) from ``dense_reference_points``.
            spatial_shapes (L, 2), level_start_index (L,), padding_mask (B, S) bool.
            kept_indices: (B, k) kept tokens sorted by decreasing score; None = dense encoder.
            layer_valid: one (B, k_i) bool per layer, k_i non-increasing ≤ k: layer i updates the first k_i kept
                tokens where True (``selection.Selection.layers``).
            proposals: (B, S, 4) grid-proposal logits, needed by ``aux_heads``.
            aux_heads: (class heads, box heads), one pair per layer but the last (Sparse DETR Sec. 3.3).
        Returns:
            memory (B, S, d); aux outputs, one dict per layer but the last: ``pred_logits`` (B, k_i, K),
            ``pred_boxes`` (B, k_i, 4) = sigmoid(proposal + offset), ``valid`` (B, k_i) (empty list without heads).
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
            if sparse:  # the cascade: layer i's set is a prefix of layer i-1's (a no-op slice without one)
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
