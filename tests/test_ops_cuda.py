"""Tests of the CUDA deformable attention kernel (marker ``cuda``; skipped without a GPU).

Run on a GPU machine with ``pytest -m cuda`` (or ``tools/gpu_check.sh``, which builds the kernel
first). Compares the CUDA kernel with the pure-PyTorch reference in float32 / float16 / bfloat16,
forward and backward, on the same inputs; gradchecks it in float64; exercises the three ways the
backward kernel reduces over channels (C a power of two <= 32, > 32, and any other C).
"""

import pytest
import torch

from sparse_detr.ops import backend_for, kernels, ms_deform_attn, ms_deform_attn_reference

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


def make_inputs(n=2, q=37, h=4, c=32, p=4, shapes=((13, 21), (7, 11), (4, 6), (1, 1)),
                dtype=torch.float32, seed=0):
    """Op inputs on the GPU; locations in [-0.1, 1.1] so that some samples leave the map."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    starts = torch.cumsum(areas, 0) - areas
    s, levels = int(areas.sum()), len(shapes)
    value = torch.randn(n, s, h, c, generator=gen)
    loc = torch.rand(n, q, h, levels, p, 2, generator=gen) * 1.2 - 0.1
    attn = torch.rand(n, q, h, levels, p, generator=gen).softmax(-1)
    return [t.to(dtype).cuda() if t.is_floating_point() else t.cuda()
            for t in (value, spatial_shapes, starts, loc, attn)]


def assert_matches_reference(inputs, dtype):
    value, shapes, starts, loc, attn = inputs
    tol = TOLERANCES[dtype]
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                       device="cuda").to(dtype)
    out = kernel_op(value, shapes, starts, loc, attn)
    grads = backward_op(grad, value, shapes, starts, loc, attn)
    leaves = [t.float().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    for name, got, want in zip(("output", "grad_value", "grad_loc", "grad_attn"),
                               (out,) + tuple(grads), (ref,) + ref_grads):
        assert got.dtype == dtype, name
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


@pytest.mark.parametrize("channels", [5, 8, 32, 64], ids=lambda c: f"C{c}")
def test_cuda_backward_channel_reductions(channels):
    # C=5: one atomic per thread; C=8/32: one shuffle group owns each entry; C=64: two warps add.
    assert_matches_reference(make_inputs(c=channels, seed=channels), torch.float32)


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
