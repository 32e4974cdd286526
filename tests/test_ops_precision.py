"""Mixed precision and non-finite inputs of sparse_detr.ops.ms_deform_attn on the CPU.

Mixed dtype: value in bfloat16 / float16 with sampling_locations and attention_weights in float32,
the layout MSDeformAttn uses under autocast. The C++ kernel and the reference are checked against
the float32 reference run on the same (16-bit-representable) numbers; each gradient must come back
in its input's dtype.

Non-finite locations: a NaN or +-inf location must give NaN (in the output and in the gradients of
that sample's weight and location), as the grid_sample reference does, instead of a silent 0.
"""

import pytest
import torch

from sparse_detr.ops import kernels, ms_deform_attn, ms_deform_attn_reference

from test_ops import make_inputs

needs_kernel = pytest.mark.skipif(not kernels.CPU_KERNEL, reason="sparse_detr._C not built")
kernel_op = torch.ops.sparse_detr.ms_deform_attn
backward_op = torch.ops.sparse_detr.ms_deform_attn_backward

# Tolerances of the mixed-dtype op against the fp32 reference on the same numbers. Everything is
# accumulated in fp32, so the 16-bit results (output, grad_value) differ from the reference only by
# their final rounding (relative 2**-8 for bf16, 2**-11 for fp16): rtol = twice that, atol = 1e-3 of
# the largest reference value for results near 0. grad_sampling_locations and grad_attention_weights
# are fp32 results of fp32 arithmetic: the fp32 tolerance of the other tests (1e-5) relative to the
# largest entry.
RTOL_16 = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
ATOL_SCALE_16 = 1e-3
FP32_SCALE = 1e-5

SHAPES = ((13, 21), (7, 11), (4, 6), (1, 1))
HALF_DTYPES = [torch.bfloat16, torch.float16]


def mixed_inputs(dtype, seed=0, q=20):
    """16-bit value, fp32 locations and weights (some samples outside the map)."""
    value, shapes, starts, loc, attn = make_inputs(2, q, 4, 16, 4, SHAPES, dtype=torch.float32,
                                                   lo=-0.1, hi=1.1, seed=seed)
    return value.to(dtype), shapes, starts, loc, attn


def reference_fp32(value, shapes, starts, loc, attn, grad):
    leaves = [t.float().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out.detach(),) + torch.autograd.grad(out, leaves, grad.float())


def assert_close_to(got, want, dtype):
    scale = float(want.abs().max())
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=FP32_SCALE, atol=FP32_SCALE * scale)
    else:
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=RTOL_16[dtype], atol=ATOL_SCALE_16 * scale)


@needs_kernel
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mixed_kernel_matches_float32_reference(dtype):
    value, shapes, starts, loc, attn = mixed_inputs(dtype)
    grad = torch.randn(2, 20, 4 * 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = kernel_op(value, shapes, starts, loc, attn)
    grads = backward_op(grad, value, shapes, starts, loc, attn)
    want = reference_fp32(value, shapes, starts, loc, attn, grad)
    assert [t.dtype for t in (out,) + tuple(grads)] == [dtype, dtype, torch.float32, torch.float32]
    for got, w in zip((out,) + tuple(grads), want):
        assert_close_to(got, w, dtype)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mixed_autograd_gives_each_gradient_in_its_inputs_dtype(dtype, backend):
    if backend == "auto" and not kernels.CPU_KERNEL:
        pytest.skip("sparse_detr._C not built")
    value, shapes, starts, loc, attn = mixed_inputs(dtype, seed=3)
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    assert out.dtype == dtype
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(out, leaves, grad)
    assert [g.dtype for g in got] == [dtype, torch.float32, torch.float32]
    want = reference_fp32(value, shapes, starts, loc, attn, grad)
    for g, w in zip((out.detach(),) + got, want):
        assert_close_to(g, w, dtype)


@needs_kernel
def test_mixed_is_more_accurate_than_16bit_locations():
    # Why the coordinates stay fp32: on a 167-pixel-wide level, bf16 locations move the samples.
    shapes = torch.tensor([[100, 167]])
    starts = torch.tensor([0])
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(1, 100 * 167, 2, 8, generator=gen).bfloat16()
    loc = torch.rand(1, 50, 2, 1, 4, 2, generator=gen) * 0.2 + 0.75
    attn = torch.rand(1, 50, 2, 1, 4, generator=gen)
    want = ms_deform_attn_reference(value.float(), shapes, starts, loc, attn)
    mixed = ms_deform_attn(value, shapes, starts, loc, attn).float()
    all16 = ms_deform_attn(value, shapes, starts, loc.bfloat16(), attn.bfloat16()).float()
    assert (mixed - want).abs().max() < 0.25 * (all16 - want).abs().max()


@needs_kernel
def test_mixed_under_compile_and_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, shapes, starts, loc, attn = mixed_inputs(torch.bfloat16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (value, shapes, starts, loc, attn)]
        out = kernel_op(*fake)
        grads = backward_op(out, *fake)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]

    def fn(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in (value, loc, attn)]
    leaves_e = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out_c, out_e = compiled(*leaves_c), fn(*leaves_e)
    torch.testing.assert_close(out_c, out_e)
    for gc, ge in zip(torch.autograd.grad(out_c.float().sum(), leaves_c),
                      torch.autograd.grad(out_e.float().sum(), leaves_e)):
        assert gc.dtype == ge.dtype
        torch.testing.assert_close(gc, ge)
    torch.library.opcheck(kernel_op, (leaves_e[0].detach().requires_grad_(), shapes, starts,
                                      leaves_e[1].detach().requires_grad_(),
                                      leaves_e[2].detach().requires_grad_()))


@pytest.mark.parametrize("value_dtype,loc_dtype,attn_dtype", [
    (torch.float32, torch.float64, torch.float64),   # only 16-bit values may mix
    (torch.float64, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.bfloat16),  # locations and weights must agree
    (torch.bfloat16, torch.float16, torch.float16),
])
def test_other_dtype_mixes_are_rejected(value_dtype, loc_dtype, attn_dtype):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    args = (value.to(value_dtype), shapes, starts, loc.to(loc_dtype), attn.to(attn_dtype))
    with pytest.raises(ValueError, match="dtype"):
        ms_deform_attn(*args)
    if kernels.CPU_KERNEL:  # a direct call of the kernel checks it too
        with pytest.raises(RuntimeError, match="dtype"):
            kernel_op(*args)


def _nonfinite_inputs(dtype):
    value, shapes, starts, loc, attn = make_inputs(2, 6, 2, 3, 2, dtype=dtype, seed=4)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 2, 1, 1, 1, 1] = float("inf")
    loc[1, 3, 0, 2, 0, 0] = -float("inf")
    loc[1, 4, 1, 0, 1] = float("nan")  # both coordinates
    return value, shapes, starts, loc, attn


@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_locations_give_nan_like_grid_sample(dtype, backend):
    if backend == "kernel" and not kernels.CPU_KERNEL:
        pytest.skip("sparse_detr._C not built")
    if backend == "reference" and dtype == torch.bfloat16:
        pytest.skip("grid_sample's bf16 CPU backward spreads the NaN into grad_value")
    value, shapes, starts, loc, attn = _nonfinite_inputs(dtype)
    bad = ~torch.isfinite(loc).all(-1)  # (N, Q, H, L, P): the non-finite samples
    leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_value, g_loc, g_attn = torch.autograd.grad(out, leaves, grad.to(dtype))

    # Expected from the definition, independent of both implementations: a row (n, q, h) with a
    # non-finite sample is NaN in all C channels; every other row is finite and equals the op on
    # the same inputs with the non-finite samples' weights set to 0 (their locations made finite).
    row_bad = bad.flatten(3).any(-1)  # (N, Q, H)
    out_rows = out.detach().unflatten(-1, (value.shape[2], value.shape[3]))  # (N, Q, H, C)
    assert torch.isnan(out_rows[row_bad]).all()
    assert torch.isfinite(out_rows[~row_bad]).all()
    assert torch.isnan(g_attn[bad]).all() and torch.isfinite(g_attn[~bad]).all()
    assert torch.isnan(g_loc[bad]).any(-1).all() and torch.isfinite(g_loc[~bad]).all()

    clean_loc = torch.where(bad[..., None], torch.zeros_like(loc), loc)
    clean_attn = torch.where(bad, torch.zeros_like(attn), attn)
    leaves2 = [t.clone().requires_grad_() for t in (value, clean_loc, clean_attn)]
    out2 = ms_deform_attn_reference(leaves2[0].double(), shapes, starts, leaves2[1].double(),
                                    leaves2[2].double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(out_rows[~row_bad].double(),
                               out2.unflatten(-1, out_rows.shape[-2:])[~row_bad], **tol)
    # grad_value: the non-finite samples add nothing, the finite samples of the same rows do.
    want_g_value = torch.autograd.grad(out2, leaves2[0], grad)[0]
    assert torch.isfinite(g_value).all()
    torch.testing.assert_close(g_value.double(), want_g_value.double(), **tol)
