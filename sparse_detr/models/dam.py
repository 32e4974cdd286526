"""The decoder cross-attention map (DAM), the training signal of the Sparse DETR token scorer (Sec. 3.2).

Every decoder layer, head, query, level and point samples the encoder memory at a fractional location with some
attention weight. Spreading each weight bilinearly onto the 4 integer neighbours of the location and summing over
everything gives one number per encoder token: how much the decoder looks at it. The scoring network is trained to
predict the top-k_b tokens of this map per image (``selection.DAMSelector``); the map carries no gradient.

Alignment: the official code splats at (x·W_l, y·H_l) while the sampler reads at
(x·W_l − 0.5, y·H_l − 0.5) — a half-pixel shift. ``alignment="official"`` reproduces the official target (the
default, so official checkpoints see the same target); ``"aligned"`` splats where the sampler actually reads.
Corners outside the level map are dropped (not clamped).

All functions are batched: one ``scatter_add_`` over every layer, head, query, level, point and corner.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decoder_attention_map", "dam_coverage", "token_levels"]

_ALIGNMENTS = ("official", "aligned")


@torch.no_grad()
def decoder_attention_map(sampling_locations: Tensor, attention_weights: Tensor, spatial_shapes: Tensor,
                          level_start_index: Tensor, num_tokens: int, alignment: str = "official") -> Tensor:
    """Accumulate the decoder's cross-attention onto the encoder tokens.

    Args:
        sampling_locations: (B, Ld, Q, H, L, P, 2) normalised (x, y) in the padded [0, 1] frame of each level.
        attention_weights: (B, Ld, Q, H, L, P).
        spatial_shapes: (L, 2) int64 (h_l, w_l); level_start_index: (L,) int64.
        num_tokens: S.
        alignment: "official" (x·W) or "aligned" (x·W − 0.5).
    Returns:
        (B, S) float32 map, summed over layers, heads, queries and points.
    """
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
    batch = sampling_locations.shape[0]
    loc = sampling_locations.float()
    weights = attention_weights.float()
    # Level tables broadcast over the L axis of (B, Ld, Q, H, L, P).
    height = spatial_shapes[:, 0].view(1, 1, 1, 1, -1, 1)
    width = spatial_shapes[:, 1].view(1, 1, 1, 1, -1, 1)
    start = level_start_index.view(1, 1, 1, 1, -1, 1)

    x = loc[..., 0] * width
    y = loc[..., 1] * height
    if alignment == "aligned":
        x, y = x - 0.5, y - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()

    # The 4 corners on a new trailing axis: (dx, dy) = (0,0), (1,0), (0,1), (1,1).
    corner = torch.arange(4, device=loc.device)  # built on the device: no host-to-device copy
    dx, dy = corner % 2, corner // 2
    cx = x0[..., None] + dx  # (B, Ld, Q, H, L, P, 4)
    cy = y0[..., None] + dy
    wx = torch.where(dx.bool(), fx[..., None], 1 - fx[..., None])
    wy = torch.where(dy.bool(), fy[..., None], 1 - fy[..., None])
    inside = (cx >= 0) & (cx < width[..., None]) & (cy >= 0) & (cy < height[..., None])
    value = weights[..., None] * wx * wy * inside
    index = start[..., None] + cy.clamp(min=0) * width[..., None] + cx.clamp(min=0)
    index = torch.where(inside, index, torch.zeros_like(index))  # dropped corners add 0 at token 0

    dam = torch.zeros(batch, num_tokens, device=loc.device, dtype=torch.float32)
    return dam.scatter_add_(1, index.reshape(batch, -1), value.reshape(batch, -1))


def token_levels(spatial_shapes: Tensor, num_tokens: int) -> Tensor:
    """(S,) int64 level id of every flattened token."""
    sizes = spatial_shapes.prod(1)
    return torch.repeat_interleave(torch.arange(sizes.shape[0], device=sizes.device), sizes,
                                   output_size=num_tokens)


@torch.no_grad()
def dam_coverage(dam: Tensor, padding_mask: Tensor, kept_indices: Tensor, kept_valid: Tensor,
                 spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Fraction of the DAM mass on the tokens the encoder kept (a logged training curve, not a loss).

    Mass that lands on padding is left out of the total (the official statistic counts it).

    Args:
        dam: (B, S); padding_mask: (B, S); kept_indices, kept_valid: (B, k); spatial_shapes: (L, 2).
    Returns:
        coverage (B,) over all levels and coverage per level (B, L) (1 where a level has no DAM mass).
    """
    dam = dam.masked_fill(padding_mask, 0.0)
    kept = torch.zeros_like(dam).scatter_(1, kept_indices, kept_valid.to(dam.dtype))  # (B, S) 0/1
    levels = token_levels(spatial_shapes, dam.shape[1])
    num_levels = spatial_shapes.shape[0]
    total = dam.new_zeros(dam.shape[0], num_levels).index_add_(1, levels, dam)
    covered = dam.new_zeros(dam.shape[0], num_levels).index_add_(1, levels, dam * kept)
    overall = covered.sum(1) / total.sum(1).clamp(min=1e-12)
    per_level = torch.where(total > 0, covered / total.clamp(min=1e-12), torch.ones_like(total))
    return overall, per_level
