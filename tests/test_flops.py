"""The FLOP formulas of the deformable attention op against hand counts on tiny shapes.

The hand counts below are written out from the arithmetic of one sampling point (see sparse_detr/ops/flops.py),
not computed by the formula under test.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparse_detr.ops.flops as op_flops
from sparse_detr.ops import backend_for, ms_deform_attn

# N=2 images, Q=3 queries, H=2 heads, L=2 levels (3x4 and 2x2), P=2 points, C=4 channels per head.
N, Q, H, L, P, C = 2, 3, 2, 2, 2, 4
SHAPES = torch.tensor([[3, 4], [2, 2]])
STARTS = torch.tensor([0, 12])
S = 16
SAMPLES = N * Q * H * L * P  # 48 sampling points
# forward per point: 4 corners x 4 channels + 4 channels of attention weighting + 4 corner weights = 24 MACs
HAND_FORWARD = 2 * SAMPLES * 24  # = 2304 FLOPs, torch convention (1 MAC = 2 FLOPs)
# backward per point: 4 corners x 4 channels of dot products + the same of value gradients + 16 = 48 MACs
HAND_BACKWARD = 2 * SAMPLES * 48  # = 4608


def _inputs(device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)
    value = torch.randn(N, S, H, C, generator=g)
    loc = torch.rand(N, Q, H, L, P, 2, generator=g)
    attn = torch.rand(N, Q, H, L, P, generator=g)
    tensors = [t.to(device).requires_grad_(requires_grad) for t in (value, loc, attn)]
    return tensors[0], SHAPES.to(device), STARTS.to(device), tensors[1], tensors[2]


def test_hand_counts_are_what_the_docstring_says():
    assert op_flops.ms_deform_attn_flops((N, S, H, C), (N, Q, H, L, P, 2)) == HAND_FORWARD
    assert op_flops.ms_deform_attn_backward_flops((N, S, H, C), (N, Q, H, L, P, 2)) == HAND_BACKWARD
    assert op_flops.to_official(HAND_FORWARD) == SAMPLES * 24


def test_count_does_not_depend_on_map_size():
    # Each sample reads four pixels whatever the map size: S must not enter the count.
    assert (op_flops.ms_deform_attn_flops((1, 10, 8, 32), (1, 5, 8, 4, 4, 2))
            == op_flops.ms_deform_attn_flops((1, 10_000, 8, 32), (1, 5, 8, 4, 4, 2)))
    # ... but it is linear in the number of queries (the point of Sparse DETR).
    assert (op_flops.ms_deform_attn_flops((1, 10, 8, 32), (1, 10, 8, 4, 4, 2))
            == 2 * op_flops.ms_deform_attn_flops((1, 10, 8, 32), (1, 5, 8, 4, 4, 2)))


def test_flop_counter_on_meta_tensors():
    # The op has a fake implementation, so the registered formula can be checked without any kernel.
    args = _inputs(device="meta")
    with FlopCounterMode(display=False) as counter:
        out = torch.ops.sparse_detr.ms_deform_attn(*args)
    assert out.shape == (N, Q, H * C)
    assert counter.get_total_flops() == HAND_FORWARD


@pytest.mark.skipif(backend_for("cpu", torch.float32) == "reference", reason="CPU kernel not built")
def test_flop_counter_forward_and_backward_through_the_kernel():
    value, shapes, starts, loc, attn = _inputs(requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert counter.get_total_flops() == HAND_FORWARD
    with FlopCounterMode(display=False) as counter:
        ms_deform_attn(value, shapes, starts, loc, attn).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.sparse_detr.ms_deform_attn] == HAND_FORWARD
    assert counts[torch.ops.sparse_detr.ms_deform_attn_backward] == HAND_BACKWARD
    assert out.shape == (N, Q, H * C)


def test_registration_is_idempotent():
    import importlib

    importlib.reload(op_flops)  # a second registration must not raise "duplicate registrations"
    args = _inputs(device="meta")
    with FlopCounterMode(display=False) as counter:
        torch.ops.sparse_detr.ms_deform_attn(*args)
    assert counter.get_total_flops() == HAND_FORWARD
