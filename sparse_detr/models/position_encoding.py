"""Sine position encodings for feature maps and for boxes.

Two encodings live here:

* :class:`PositionEmbeddingSine` gives every cell of a (padded) feature map a fixed 2-D sine/cosine
  code, as in DETR / Deformable DETR (method notes, Sec. 1). It has no parameters, which is why the
  official state dict has nothing under ``backbone.1``.
* :func:`sine_embed_boxes` encodes normalised boxes (cx, cy, w, h) the same way; the two-stage query
  initialisation feeds it to a Linear 512→256 + LayerNorm to make the decoder's position queries
  (method notes, Sec. 5).

Both use the transformer frequency ladder: feature ``i`` of a coordinate ``t`` is
``sin(t / T^(2·(i//2)/F))`` for even ``i`` and ``cos(...)`` of the same argument for odd ``i``
(sin and cos interleaved, one pair per frequency), with T the temperature and F features per
coordinate.
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
    """(..., F) angles → (..., F) with sin at even and cos at odd positions."""
    # Stack the even-index sines with the odd-index cosines on a new last axis and flatten it, so
    # the output order is sin(a0), cos(a1), sin(a2), cos(a3), ... (a0 == a1, a2 == a3, ...).
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine position encoding of a padded feature map (Deformable DETR variant).

    Cell coordinates are the cumulative count of non-padding cells along each axis (1-based), so a
    padded image is encoded as if it were its unpadded size. With ``normalize=True`` they are mapped
    to about [0, scale):  ``y = (cumsum_y + offset) / (valid_rows + eps) * scale``. Deformable DETR
    uses ``offset = -0.5``, i.e. the cell *centre* (row r → r + 0.5), where DETR used the cell's far
    edge (offset 0); the default follows Deformable DETR so its checkpoints see the same codes.

    Args:
        num_pos_feats: F, features per axis; the output has 2·F channels (hidden_dim // 2 in the model).
        temperature: T of the frequency ladder.
        normalize: map coordinates to [0, scale) by the image's valid size (else raw cell counts).
        scale: range of the normalised coordinates (2π by default).
        offset: added to the 1-based cell count before normalising (-0.5 = cell centre).
        eps: keeps the division finite for an all-padding row/column.
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
        """Encode a padding mask's grid.

        Args:
            mask: (B, H, W) bool, True where the cell is padding.

        Returns:
            (B, 2·F, H, W) float32: channels [0, F) encode y, channels [F, 2F) encode x.
        """
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)  # (B, H, W): 1-based row index among valid rows
        x_embed = not_mask.cumsum(2)  # (B, H, W): 1-based column index among valid columns
        if self.normalize:
            # The last row/column of the cumsum holds the valid height/width of each column/row.
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
    """Sine-encode normalised boxes, coordinate by coordinate.

    Each coordinate c ∈ [0, 1] becomes the F features of ``c · 2π`` on the frequency ladder (sin/cos
    interleaved). The four blocks are concatenated in the input's coordinate order, which in this
    project is always (cx, cy, w, h): output[..., 0:F] encodes cx, [F:2F] cy, [2F:3F] w, [3F:4F] h.
    This is the order the official two-stage query initialisation uses, so ``pos_trans`` weights load.

    Args:
        boxes: (..., 4) boxes, (cx, cy, w, h) in [0, 1] (already sigmoid-ed, not logits).
        num_pos_feats: F, features per coordinate.
        temperature: T of the frequency ladder.

    Returns:
        (..., 4·F) tensor in ``boxes.dtype`` (computed in float32 so bf16 inputs keep the fine
        frequencies).
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have 4 coordinates in the last dim, got shape {tuple(boxes.shape)}")
    if num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
    dim_t = _frequencies(num_pos_feats, temperature, boxes.device)
    angles = boxes.to(torch.float32)[..., None] * (2 * math.pi) / dim_t  # (..., 4, F)
    return _interleave_sin_cos(angles).flatten(-2).to(boxes.dtype)
