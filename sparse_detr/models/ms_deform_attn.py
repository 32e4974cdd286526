"""Multi-scale deformable attention module (Zhu et al., Deformable DETR, Sec. 4.1, Eq. 3).

Each query predicts, per head h, level l and point p, a sampling offset around its reference point
and an attention weight (softmax over the L*P samples of a head); the op
``sparse_detr.ops.ms_deform_attn`` samples the projected values there and sums them. Used as the
encoder's self-attention (queries = tokens; Sparse DETR updates only the selected tokens) and the
decoder's cross-attention, whose sampling locations and weights also build the "decoder
cross-attention map" that supervises Sparse DETR's token scorer (Roh et al., Sec. 3.2) - hence
``return_sampling``.

Submodule names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``) and
initialisation follow the official checkpoints, so their weights load unchanged.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_detr.ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels of queries and values (split evenly over the heads).
        n_levels: feature levels L.
        n_heads: attention heads H; ``d_model % n_heads`` must be 0.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by "
                             f"n_heads ({n_heads})")
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                        ("n_points", n_points)):
            if v <= 0:
                raise ValueError(f"MSDeformAttn: {name} must be positive, got {v}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.head_dim = d_model // n_heads
        n_samples = n_heads * n_levels * n_points
        self.sampling_offsets = nn.Linear(d_model, n_samples * 2)
        self.attention_weights = nn.Linear(d_model, n_samples)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official initialisation: offsets start on a circle, attention starts uniform."""
        # Offsets are the bias alone at first: head h looks in direction 2*pi*h/H, with the
        # (cos, sin) vector scaled so its larger component is 1 (a point on the unit square), and
        # point p one step further out (p + 1 pixels at every level).
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)  # (H, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((grid * steps).reshape(-1))
        # Zero logits: every sample of a head gets weight 1 / (L * P).
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
        return_sampling: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        """Attend from the queries to the multi-scale values.

        Args:
            query: (N, Q, d_model) query features (content + positional embedding).
            reference_points: (N, Q, L, 2) normalised (x, y) in [0, 1] - offsets are in pixels of
                each level - or (N, Q, L, 4) boxes (cx, cy, w, h) - offsets are in units of half
                the box size divided by n_points, so they stay inside a box-sized window.
            input_flatten: (N, S, d_model) features of all levels, flattened level after level.
            input_spatial_shapes: (L, 2) int64, (h, w) of every level.
            input_level_start_index: (L,) int64, offset of every level in S.
            input_padding_mask: optional (N, S) bool, True at padding tokens (their values are 0).
            return_sampling: also return the sampling locations and attention weights.

        Returns:
            (N, Q, d_model) output; with ``return_sampling`` a tuple
            ``(output, sampling_locations (N, Q, H, L, P, 2), attention_weights (N, Q, H, L, P))``,
            the weights already softmaxed over the L*P samples of each head.
        """
        H, L, P, C = self.n_heads, self.n_levels, self.n_points, self.head_dim
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: query must have shape (N, Q, {self.d_model}), "
                             f"got {tuple(query.shape)}")
        N, Q, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: input_flatten must have shape ({N}, S, {self.d_model}), "
                             f"got {tuple(input_flatten.shape)}")
        S = input_flatten.shape[1]
        if input_spatial_shapes.shape != (L, 2):
            raise ValueError(f"MSDeformAttn: input_spatial_shapes must have shape ({L}, 2), "
                             f"got {tuple(input_spatial_shapes.shape)}")
        if reference_points.dim() != 4 or reference_points.shape[:3] != (N, Q, L) or \
                reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"MSDeformAttn: reference_points must have shape ({N}, {Q}, {L}, 2) "
                             f"or ({N}, {Q}, {L}, 4), got {tuple(reference_points.shape)}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if input_padding_mask.shape != (N, S):
                raise ValueError(f"MSDeformAttn: input_padding_mask must have shape ({N}, {S}), "
                                 f"got {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, H, C)

        offsets = self.sampling_offsets(query).view(N, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(N, Q, H, L * P)
        weights = F.softmax(weights, -1).view(N, Q, H, L, P)

        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of level l: divide by (w_l, h_l) to normalise.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        else:
            centre = reference_points[:, :, None, :, None, :2]
            size = reference_points[:, :, None, :, None, 2:]
            locations = centre + offsets / P * size * 0.5

        # Mixed precision (autocast): value keeps its 16-bit dtype (half the bandwidth of the op's
        # largest input), while locations and weights stay fp32 - the reference points are fp32 and
        # a 16-bit location is off by up to 1/8 pixel at x = 128-256. Outside autocast all three
        # share the widest dtype (fp32, or fp64 for gradcheck).
        coord_dtype = torch.promote_types(torch.promote_types(locations.dtype, weights.dtype),
                                          torch.float32)
        if value.dtype in (torch.float16, torch.bfloat16) and coord_dtype == torch.float32:
            value_dtype = value.dtype
        else:
            value_dtype = coord_dtype = torch.promote_types(value.dtype, coord_dtype)
        output = ms_deform_attn(
            value.to(value_dtype).contiguous(),
            input_spatial_shapes,
            input_level_start_index,
            locations.to(coord_dtype).contiguous(),
            weights.to(coord_dtype).contiguous(),
        )
        output = self.output_proj(output)
        if return_sampling:
            return output, locations, weights
        return output
