"""Pure-PyTorch reference of multi-scale deformable attention (Zhu et al., Deformable DETR, Eq. 3).

For every query q, head h, level l and point p, bilinearly sample the level-l value map of head h
at ``sampling_locations[n, q, h, l, p]`` and sum the samples weighted by
``attention_weights[n, q, h, l, p]``::

    out[n, q, h*C:(h+1)*C] = sum_{l, p} A[n, q, h, l, p] * bilinear(value_l[n, :, :, h, :], loc[n, q, h, l, p])

``F.grid_sample`` does the sampling, with the conventions of the op: coordinates in [0, 1] map to
grid_sample's [-1, 1] with ``align_corners=False`` (pixel coordinate ``x * W - 0.5``) and samples
outside the map read zeros (``padding_mode="zeros"``).

This is the readable ground truth the compiled kernels are tested against, and the fallback when
the extension is not built. It is slow and memory-hungry (it materialises every sample:
N*H*C*Q*L*P numbers) and reads the level table on the host (``.tolist()``), so under
``torch.compile`` it causes a graph break; the compiled kernel has neither limitation.
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_reference"]


def _levels(spatial_shapes: Tensor, level_start_index: Tensor) -> List[Tuple[int, int, int]]:
    """(start, height, width) of every level, as Python ints (a host read of two tiny tensors)."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    return [(int(s), int(h), int(w)) for s, (h, w) in zip(starts, shapes)]


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``grid_sample``.

    Args:
        value: (N, S, H, C) values of all levels, flattened level after level (S = sum h_l * w_l).
        spatial_shapes: (L, 2) int64, (h_l, w_l) of every level.
        level_start_index: (L,) int64, offset of level l inside S.
        sampling_locations: (N, Q, H, L, P, 2) normalised (x, y); [0, 1] covers the map.
        attention_weights: (N, Q, H, L, P) weights of the samples (normally softmaxed over L*P).

    Returns:
        (N, Q, H*C) attended values in value's dtype; channels of head h are ``[h*C, (h+1)*C)``.

    No input validation: ``sparse_detr.ops.ms_deform_attn`` validates before it calls this.
    """
    N, _, H, C = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    # Mixed precision (16-bit value, fp32 locations/weights): sample in the wider dtype, return
    # value's dtype; autograd casts each gradient back to its input's dtype.
    out_dtype = value.dtype
    compute = torch.promote_types(value.dtype, sampling_locations.dtype)
    value = value.to(compute)
    sampling_locations = sampling_locations.to(compute)
    attention_weights = attention_weights.to(compute)
    # grid_sample's grid lives in [-1, 1]: -1 is the left edge of the first pixel.
    grids = 2 * sampling_locations - 1

    # Per level, sample every head at once by folding heads into grid_sample's batch dimension:
    # input (N*H, C, h, w), grid (N*H, Q, P, 2) -> (N*H, C, Q, P).
    samples = []
    for lvl, (start, height, width) in enumerate(_levels(spatial_shapes, level_start_index)):
        v = value[:, start:start + height * width]  # (N, h*w, H, C)
        v = v.permute(0, 2, 3, 1).reshape(N * H, C, height, width)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(N * H, Q, P, 2)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    sampled = torch.stack(samples, dim=-2)  # (N*H, C, Q, L, P)

    weights = attention_weights.transpose(1, 2).reshape(N * H, 1, Q, L, P)
    out = (sampled * weights).sum(dim=(-2, -1))  # (N*H, C, Q)
    # (N*H, C, Q) -> (N, H*C, Q) -> (N, Q, H*C): head-major channels, as in the kernels.
    return out.view(N, H * C, Q).transpose(1, 2).contiguous().to(out_dtype)
