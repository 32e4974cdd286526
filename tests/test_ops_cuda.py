"""Tests of the CUDA deformable attention kernels (marker ``cuda``; skipped without a GPU).

Run on a GPU machine with ``pytest -m cuda`` (or ``tools/gpu_check.sh``, which builds the kernels
first). Every test runs for both kernel pairs (the ``cuda_kernel`` fixture: default and fast).
Compares the CUDA kernel with the pure-PyTorch reference in float32 / float16 / bfloat16 and mixed
(16-bit value, fp32 locations and weights), forward and backward, on the same inputs; gradchecks
it in float64; exercises the channel layouts of both backward kernels (C a power of two <= 32,
> 32, any other C; vector widths 8 / 4 / 2 / 1) and non-finite locations.
"""

import pytest
import torch

from sparse_detr.ops import (backend_for, cuda_kernel, kernels, ms_deform_attn, ms_deform_attn_reference,
                             set_cuda_kernel)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

kernel_op = torch.ops.sparse_detr.ms_deform_attn
backward_op = torch.ops.sparse_detr.ms_deform_attn_backward

# On identical (low-precision-representable) inputs the kernel accumulates in fp32 and differs from
# the fp32 reference by the final rounding of each output: 2**-11 relative for float16, 2**-8 for
# bfloat16. Tolerances allow twice that, plus an absolute 1e-3 * max|reference| for values near 0.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol_scale=1e-5),
    torch.float16: dict(rtol=2.0 ** -10, atol_scale=1e-3),
    torch.bfloat16: dict(rtol=2.0 ** -7, atol_scale=1e-3),
}


@pytest.fixture(autouse=True, params=kernels.CUDA_KERNELS)
def kernel_pair(request):
    """Run the test with each CUDA kernel pair selected, then restore the choice."""
    before = cuda_kernel()
    set_cuda_kernel(request.param)
    yield request.param
    set_cuda_kernel(before)


def make_inputs(n=2, q=37, h=4, c=32, p=4, shapes=((13, 21), (7, 11), (4, 6), (1, 1)),
                dtype=torch.float32, seed=0, coord_dtype=None):
    """Op inputs on the GPU; locations in [-0.1, 1.1] so that some samples leave the map.
    ``coord_dtype``: dtype of locations and weights (default: ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    starts = torch.cumsum(areas, 0) - areas
    s, levels = int(areas.sum()), len(shapes)
    value = torch.randn(n, s, h, c, generator=gen)
    loc = torch.rand(n, q, h, levels, p, 2, generator=gen) * 1.2 - 0.1
    attn = torch.rand(n, q, h, levels, p, generator=gen).softmax(-1)
    coord_dtype = coord_dtype or dtype
    return [value.to(dtype).cuda(), spatial_shapes.cuda(), starts.cuda(), loc.to(coord_dtype).cuda(),
            attn.to(coord_dtype).cuda()]


def assert_matches_reference(inputs, dtype):
    value, shapes, starts, loc, attn = inputs
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                       device="cuda").to(dtype)
    out = kernel_op(value, shapes, starts, loc, attn)
    grads = backward_op(grad, value, shapes, starts, loc, attn)
    leaves = [t.float().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    for name, got, want, source in zip(("output", "grad_value", "grad_loc", "grad_attn"),
                                       (out,) + tuple(grads), (ref,) + ref_grads,
                                       (value, value, loc, attn)):
        assert got.dtype == source.dtype, name  # each gradient in its input's dtype
        tol = TOLERANCES[got.dtype]
        want = want.detach()
        torch.testing.assert_close(got.float(), want, rtol=tol["rtol"],
                                   atol=tol["atol_scale"] * float(want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_cuda_kernel_is_built():
    assert kernels.CUDA_KERNEL, (
        "a GPU is visible but sparse_detr._C has no CUDA kernel: rebuild with "
        "`FORCE_CUDA=1 pip install -e . --no-build-isolation`")
    assert backend_for("cuda", torch.float16) == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_cuda_kernel_matches_reference(dtype):
    assert_matches_reference(make_inputs(dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_mixed_dtype_matches_reference(dtype):
    # The autocast layout: 16-bit value, fp32 locations and weights (their gradients in fp32).
    assert_matches_reference(make_inputs(dtype=dtype, coord_dtype=torch.float32), dtype)


@pytest.mark.parametrize("channels", [5, 6, 8, 32, 64, 256], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_backward_channel_reductions(channels, dtype):
    # Default pair: C=5/6 one atomic per thread; C=8/32 one shuffle group owns each entry; C>32
    # several warps add. Fast pair: vector widths 1 (C=5), 2 (C=6 bf16), 4 / 8, groups of 1..32
    # lanes, and C=256 fp32 (64 lanes: falls back to the default pair).
    assert_matches_reference(make_inputs(c=channels, seed=channels, q=19, dtype=dtype), dtype)


def test_cuda_unaligned_value_view():
    # A contiguous view that starts 2 elements into its storage: the fast pair must not issue
    # misaligned 16-byte loads (it narrows the vector width instead).
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.bfloat16)
    flat = torch.cat([torch.zeros(2, dtype=value.dtype, device="cuda"), value.flatten()])
    shifted = flat[2:].view(value.shape)
    assert shifted.data_ptr() % 16 != 0
    torch.testing.assert_close(kernel_op(shifted, shapes, starts, loc, attn),
                               kernel_op(value.clone(), shapes, starts, loc, attn))


def test_cuda_fast_and_default_pairs_agree():
    inputs = make_inputs(dtype=torch.bfloat16, coord_dtype=torch.float32, q=300)
    grad = torch.randn(2, 300, 128, device="cuda").bfloat16()
    results = {}
    for name in kernels.CUDA_KERNELS:
        set_cuda_kernel(name)
        results[name] = (kernel_op(*inputs),) + tuple(backward_op(grad, *inputs))
    for fast, default in zip(results["fast"], results["default"]):
        scale = float(default.float().abs().max())
        torch.testing.assert_close(fast.float(), default.float(), rtol=2.0 ** -7, atol=1e-3 * scale)


def test_cuda_nonfinite_locations_give_nan_like_the_cpu_kernel():
    value, shapes, starts, loc, attn = make_inputs(q=6, c=8, dtype=torch.float32)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[1, 3, 2, 1, 1, 1] = float("inf")
    grad = torch.randn(2, 6, 32, device="cuda")
    cpu = [t.cpu() for t in (value, shapes, starts, loc, attn)]
    out = kernel_op(value, shapes, starts, loc, attn)
    want = kernel_op(*cpu)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(want)) and torch.isnan(want).any()
    torch.testing.assert_close(out.cpu(), want, equal_nan=True, rtol=1e-5, atol=1e-5)
    for got, ref in zip(backward_op(grad, value, shapes, starts, loc, attn), backward_op(grad.cpu(), *cpu)):
        torch.testing.assert_close(got.cpu(), ref, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_cuda_gradcheck_float64():
    value, shapes, starts, loc, attn = make_inputs(n=2, q=5, h=2, c=3, p=2,
                                                   shapes=((4, 6), (1, 1), (3, 2)),
                                                   dtype=torch.float64)
    args = [t.requires_grad_() for t in (value, loc, attn)]
    fn = lambda v, l, a: kernel_op(v, shapes, starts, l, a)  # noqa: E731
    # Atomics make grad_value's summation order vary between runs: allow for it.
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, nondet_tol=1e-10)


def test_cuda_matches_cpu_kernel_float64():
    inputs = make_inputs(dtype=torch.float64)
    grad = torch.randn(2, 37, 128, dtype=torch.float64, device="cuda")
    cpu = [t.cpu() for t in inputs]
    torch.testing.assert_close(kernel_op(*inputs).cpu(), kernel_op(*cpu))
    for got, want in zip(backward_op(grad, *inputs), backward_op(grad.cpu(), *cpu)):
        torch.testing.assert_close(got.cpu(), want)


def test_cuda_dispatcher_and_compile():
    value, shapes, starts, loc, attn = make_inputs(q=9)

    def fn(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a)

    compiled = torch.compile(fn, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = compiled(*leaves)
    torch.testing.assert_close(out, kernel_op(value, shapes, starts, loc, attn))
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)
