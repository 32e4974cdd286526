"""Decoder cross-attention map (DAM), the target of the Sparse DETR token scorer (Sec. 3.2).

Every sampling weight is splatted bilinearly onto the 4 integer neighbours of its location and summed per token,
in one ``scatter_add_``; corners outside the level are dropped. ``alignment="official"`` splats at (x·W, y·H), half
a pixel off where the sampler reads (x·W − 0.5, y·H − 0.5, ``"aligned"``), as the official code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["decoder_attention_map", "token_levels"]

_ALIGNMENTS = ("official", "aligned")


@torch.no_grad()
def decoder_attention_map(sampling_locations: Tensor, attention_weights: Tensor, spatial_shapes: Tensor,
                          level_start_index: Tensor, num_tokens: int, alignment: str = "official") -> Tensor:
    """sampling_locations (B, Ld, Q, H, L, P, 2) (x, y) in each level's padded [0, 1] frame; attention_weights
    (B, Ld, Q, H, L, P); spatial_shapes (L, 2) (h, w). Returns the (B, S) float32 map, no gradient."""
    if alignment not in _ALIGNMENTS:
        raise ValueError(f"alignment must be one of {_ALIGNMENTS}, got {alignment!r}")
    batch = sampling_locations.shape[0]
    loc = sampling_locations.float()
    weights = attention_weights.float()
    # Broadcast over the L axis of (B, Ld, Q, H, L, P).
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
