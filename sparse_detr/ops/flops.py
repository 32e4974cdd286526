"""FLOP formulas of multi-scale deformable attention for ``torch.utils.flop_counter``.

``FlopCounterMode`` only counts operators it has a formula for; without one, the deformable attention op -
a large share of the encoder's work - would count as zero. Importing this module registers formulas for
``sparse_detr::ms_deform_attn`` and ``sparse_detr::ms_deform_attn_backward``::

    import sparse_detr.ops.flops  # noqa: F401  (registers the formulas)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model(images)
    counter.get_total_flops()

What is counted, per sampling point (n, q, h, l, p) and with C channels per head, in *multiply-adds*
(MACs), following exactly the arithmetic of ``csrc/ms_deform_attn_sample.h``:

forward, ``5*C + 4`` MACs
    * ``4*C``: each of the 4 bilinear corners is read and accumulated with its corner weight, per channel;
    * ``C``:   the sampled vector is scaled by the attention weight and added into the output;
    * ``4``:   the 4 corner weights ``(1-fy)(1-fx), (1-fy)fx, fy(1-fx), fy fx``.
    Address arithmetic (``x*W - 0.5``, floor, bounds checks) is not counted, as torch does not count
    indexing either.

backward, ``8*C + 16`` MACs
    * ``4*C``: the dot products <grad_output, corner value> of the 4 corners (they give the gradients of
      the attention weight and of the location);
    * ``4*C``: the value gradient, ``attention * corner weight * grad_output`` added into 4 corners;
    * ``16``:  corner weights (4), value-gradient scales (4), attention gradient (4), location gradient (4).

Conventions: torch's flop counter counts a matmul (M,K)x(K,N) as ``2*M*N*K`` FLOPs, i.e. one multiply-add =
2 FLOPs, and so do these formulas. The official Sparse DETR / Deformable DETR numbers (fvcore) count one
multiply-add as one FLOP: divide by 2 (``to_official``). Samples whose corners fall outside the map are
counted too (the count depends on shapes only, as every torch formula does).

The reference fallback (``grid_sample``) does not go through the custom op, so these formulas see only the
compiled kernels; ``sparse_detr.engine.studies.benchmark`` warns when a count ran on the reference.
This module imports nothing of the project outside ``sparse_detr.ops``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import kernels  # noqa: F401  (defines torch.ops.sparse_detr.* so they can be registered below)

__all__ = [
    "FORWARD_MACS_PER_CHANNEL", "FORWARD_MACS_PER_SAMPLE", "BACKWARD_MACS_PER_CHANNEL",
    "BACKWARD_MACS_PER_SAMPLE", "ms_deform_attn_flops", "ms_deform_attn_backward_flops", "to_official",
    "OP_PACKETS",
]

# Multiply-adds per sampling point: `PER_CHANNEL * C + PER_SAMPLE` (see the module docstring).
FORWARD_MACS_PER_CHANNEL = 5
FORWARD_MACS_PER_SAMPLE = 4
BACKWARD_MACS_PER_CHANNEL = 8
BACKWARD_MACS_PER_SAMPLE = 16
FLOPS_PER_MAC = 2  # torch.utils.flop_counter convention (matmul = 2*M*N*K)

#: The op packets that carry a formula (the benchmark uses them to report counts "without the op").
OP_PACKETS = (torch.ops.sparse_detr.ms_deform_attn, torch.ops.sparse_detr.ms_deform_attn_backward)


def _num_samples(value_shape: Sequence[int], loc_shape: Sequence[int]) -> tuple[int, int]:
    """(number of sampling points N*Q*H*L*P, channels per head C) from the value and location shapes."""
    n, q, h, levels, points, two = loc_shape
    if two != 2 or len(value_shape) != 4:
        raise ValueError(f"ms_deform_attn flops: unexpected shapes value {tuple(value_shape)}, "
                         f"sampling_locations {tuple(loc_shape)}")
    return n * q * h * levels * points, int(value_shape[3])


def ms_deform_attn_flops(value_shape: Sequence[int], sampling_locations_shape: Sequence[int]) -> int:
    """Forward FLOPs (torch convention, 1 MAC = 2 FLOPs) of one call, from value (N,S,H,C) and
    sampling_locations (N,Q,H,L,P,2) shapes. Independent of S: each sample reads 4 pixels whatever the map size."""
    samples, c = _num_samples(value_shape, sampling_locations_shape)
    return FLOPS_PER_MAC * samples * (FORWARD_MACS_PER_CHANNEL * c + FORWARD_MACS_PER_SAMPLE)


def ms_deform_attn_backward_flops(value_shape: Sequence[int], sampling_locations_shape: Sequence[int]) -> int:
    """Backward FLOPs (torch convention) of one call: gradients of value, locations and attention weights."""
    samples, c = _num_samples(value_shape, sampling_locations_shape)
    return FLOPS_PER_MAC * samples * (BACKWARD_MACS_PER_CHANNEL * c + BACKWARD_MACS_PER_SAMPLE)


def to_official(flops: float) -> float:
    """Torch-convention FLOPs -> the official (fvcore) convention, where one multiply-add is one FLOP."""
    return flops / FLOPS_PER_MAC


# The registered formulas receive the shapes of the op's arguments (flop_counter's shape_wrapper turns
# tensors into shapes), in the op schema's order.
def _forward_formula(value_shape, spatial_shapes_shape, level_start_index_shape, sampling_locations_shape,
                     attention_weights_shape, *args, out_shape=None, **kwargs) -> int:
    return ms_deform_attn_flops(value_shape, sampling_locations_shape)


def _backward_formula(grad_output_shape, value_shape, spatial_shapes_shape, level_start_index_shape,
                      sampling_locations_shape, attention_weights_shape, *args, out_shape=None,
                      **kwargs) -> int:
    return ms_deform_attn_backward_flops(value_shape, sampling_locations_shape)


def _register() -> None:
    # flop_counter keeps a global registry and raises on a duplicate: stay idempotent so that a reload of
    # this module (or a second import path) does not fail.
    from torch.utils.flop_counter import flop_registry

    for packet, formula in zip(OP_PACKETS, (_forward_formula, _backward_formula)):
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)


_register()
