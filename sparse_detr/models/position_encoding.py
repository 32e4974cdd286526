"""Sine position encodings of feature maps (DETR Sec. 3.1 / Deformable DETR) and of boxes (two-stage queries).

Feature i of a coordinate t is sin(t / T^(2·(i//2)/F)) for even i and cos(...) for odd i (F features per coordinate).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine", "sine_embed_boxes"]


def _frequencies(num_pos_feats: int, temperature: float, device: torch.device) -> Tensor:
    """(F,) float32 divisors T^(2·(i//2)/F); neighbouring pairs share one so sin/cos form a pair."""
    i = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """(..., F) angles → (..., F): sin(a0), cos(a1), sin(a2), cos(a3), ... (a0 == a1, a2 == a3, ...)."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine encoding of a padded feature map; no parameters (nothing under ``backbone.1``).

    Coordinates count the valid cells (1-based), so padding does not shift them; with ``normalize`` they become
    ``(count + offset) / (valid + eps) * scale``. offset -0.5 (cell centre) is Deformable DETR's; DETR used 0.
    num_pos_feats: F per axis (2·F channels out).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W) bool, True = padding → (B, 2·F, H, W) float32, channels [0, F) y, [F, 2F) x."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # (B, H, W) 1-based row among valid rows
        x_embed = not_mask.cumsum(2)
        if self.normalize:  # the last row/column of the cumsum is the valid height/width
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        dim_t = _frequencies(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)  # (B, H, W, F)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)  # (B, H, W, F)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale:.4f}, offset={self.offset}"
        )


def sine_embed_boxes(boxes: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """boxes (..., 4) cxcywh in [0, 1] → (..., 4·F) in ``boxes.dtype``: F features of c·2π per coordinate, in the
    input order (the official ``pos_trans`` weights expect cx, cy, w, h). Computed in float32 for bf16 inputs."""
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates in the last dim, got shape {tuple(boxes.shape)}")
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
    dim_t = _frequencies(num_pos_feats, temperature, boxes.device)
    angles = boxes.to(torch.float32)[..., None] * (2 * math.pi) / dim_t  # (..., 4, F)
    return _interleave_sin_cos(angles).flatten(-2).to(boxes.dtype)
