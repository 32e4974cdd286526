"""Tests of sparse_detr.ops.ms_deform_attn on the CPU: reference, C++ kernel, registration, errors.

The reference is checked against a brute-force Python loop written from the definition; the C++
kernel against the reference (float64 gradcheck, float32 within 1e-5, bfloat16 within the
documented tolerance below), under torch.compile and fake tensors; the dispatcher for its error
messages and its one-time fallback warning.
"""

import os
import subprocess
import sys

import pytest
import torch

from sparse_detr import ops
from sparse_detr.ops import dispatch, kernels, ms_deform_attn, ms_deform_attn_reference

needs_kernel = pytest.mark.skipif(not kernels.CPU_KERNEL, reason="sparse_detr._C not built")
kernel_op = torch.ops.sparse_detr.ms_deform_attn
backward_op = torch.ops.sparse_detr.ms_deform_attn_backward

# bfloat16 tolerance: on the same (bf16-representable) inputs the kernel, which accumulates in
# fp32, differs from the fp32 reference only by the final rounding of each result to bf16 (8-bit
# mantissa, relative error <= 2**-8), hence rtol = 2**-7 and atol = 1e-3 * max|reference|.
BF16_RTOL = 2.0 ** -7
BF16_ATOL_SCALE = 1e-3


def make_inputs(n=2, q=7, h=3, c=5, p=2, shapes=((4, 6), (3, 2), (1, 1)), dtype=torch.float64,
                lo=-0.25, hi=1.25, seed=0):
    """Random op inputs; locations in [lo, hi] so that some samples fall outside the map."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    starts = torch.cumsum(areas, 0) - areas
    s, levels = int(areas.sum()), len(shapes)
    value = torch.randn(n, s, h, c, generator=gen, dtype=dtype)
    loc = torch.rand(n, q, h, levels, p, 2, generator=gen, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(n, q, h, levels, p, generator=gen, dtype=dtype)
    return value, spatial_shapes, starts, loc, attn


def brute_force(value, spatial_shapes, level_start_index, loc, attn):
    """The op written from its definition, one sample and one corner at a time."""
    n_, _, h_, c_ = value.shape
    _, q_, _, l_, p_, _ = loc.shape
    out = torch.zeros(n_, q_, h_, c_, dtype=value.dtype)
    for n in range(n_):
        for q in range(q_):
            for h in range(h_):
                for lvl in range(l_):
                    height, width = spatial_shapes[lvl].tolist()
                    start = int(level_start_index[lvl])
                    for p in range(p_):
                        x = float(loc[n, q, h, lvl, p, 0]) * width - 0.5
                        y = float(loc[n, q, h, lvl, p, 1]) * height - 0.5
                        x0, y0 = int(torch.tensor(x).floor()), int(torch.tensor(y).floor())
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < height and 0 <= xx < width:
                                w = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                out[n, q, h] += attn[n, q, h, lvl, p] * w * value[n, start + yy * width + xx, h]
    return out.reshape(n_, q_, h_ * c_)


def test_reference_matches_brute_force():
    inputs = make_inputs(n=2, q=3, h=2, c=3)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), brute_force(*inputs))


def test_reference_pixel_centres_and_outside():
    # 2x2 map of one channel: the centre of pixel (row 0, col 1) is (x, y) = (0.75, 0.25).
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    loc = torch.tensor([[0.75, 0.25], [0.5, 0.5], [2.0, 0.5], [0.0, 0.25]], dtype=torch.float64)
    loc = loc.view(1, 4, 1, 1, 1, 2)
    attn = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_reference(value, shapes, starts, loc, attn).flatten()
    # pixel value; mean of the 4 pixels; fully outside; on the left edge, half a pixel left of
    # pixel 0 -> 0.5 * 1 (the other half reads the zero padding).
    torch.testing.assert_close(out, torch.tensor([2.0, 2.5, 0.0, 0.5], dtype=torch.float64))


@needs_kernel
def test_gradcheck_cpu_kernel_float64():
    # Non-square levels, a 1x1 level, N = 2, samples inside, on the border and beyond it.
    value, shapes, starts, loc, attn = make_inputs(n=2, q=6, h=2, c=3, shapes=((4, 6), (1, 1), (3, 2)))
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)   # exactly on the edges
    loc[0, 0, 1, :, 1] = torch.tensor([-0.6, 1.7], dtype=torch.float64)  # far outside
    loc[1, 1, 0, 0, 0] = torch.tensor([1.02, 0.5], dtype=torch.float64)  # just past the right edge
    args = [t.requires_grad_() for t in (value, loc, attn)]
    fn = lambda v, l, a: kernel_op(v, shapes, starts, l, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpu_kernel_matches_reference_float32(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n, q, h, c, p = (int(torch.randint(lo, hi, (1,), generator=gen))
                     for lo, hi in ((1, 4), (1, 40), (1, 5), (1, 17), (1, 5)))
    shapes = tuple((int(a), int(b)) for a, b in torch.randint(1, 12, (3, 2), generator=gen))
    inputs = make_inputs(n, q, h, c, p, shapes, dtype=torch.float32, seed=seed)
    value, shapes_t, starts, loc, attn = inputs
    leaves_k = [t.clone().requires_grad_() for t in (value, loc, attn)]
    leaves_r = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out_k = ms_deform_attn(leaves_k[0], shapes_t, starts, leaves_k[1], leaves_k[2])
    out_r = ms_deform_attn_reference(leaves_r[0], shapes_t, starts, leaves_r[1], leaves_r[2])
    torch.testing.assert_close(out_k, out_r, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out_k.shape, generator=gen)
    for gk, gr in zip(torch.autograd.grad(out_k, leaves_k, grad), torch.autograd.grad(out_r, leaves_r, grad)):
        torch.testing.assert_close(gk, gr, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_cpu_kernel_bfloat16_matches_float32_reference():
    value, shapes, starts, loc, attn = make_inputs(2, 20, 4, 16, 4, ((13, 21), (7, 11), (4, 6), (1, 1)),
                                                   dtype=torch.bfloat16, lo=-0.1, hi=1.1)
    grad = torch.randn(2, 20, 4 * 16).bfloat16()
    out = kernel_op(value, shapes, starts, loc, attn)
    grads = backward_op(grad, value, shapes, starts, loc, attn)
    leaves = [t.float().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    for got, want in zip((out,) + tuple(grads), (ref,) + ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.detach(), rtol=BF16_RTOL,
                                   atol=BF16_ATOL_SCALE * float(want.detach().abs().max()))


@needs_kernel
def test_cpu_backward_is_deterministic_across_thread_counts():
    value, shapes, starts, loc, attn = make_inputs(2, 30, 4, 8, 3, dtype=torch.float32)
    grad = torch.randn(2, 30, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = backward_op(grad, value, shapes, starts, loc, attn)
        torch.set_num_threads(max(2, threads))
        many = backward_op(grad, value, shapes, starts, loc, attn)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):  # (n, h) ownership of grad_value: bitwise equal, no atomics
        assert torch.equal(a, b)


@needs_kernel
def test_cpu_kernel_accepts_non_contiguous_direct_calls():
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    strided = value.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    torch.testing.assert_close(kernel_op(strided, shapes, starts, loc, attn),
                               kernel_op(value, shapes, starts, loc, attn))


@needs_kernel
def test_cpu_kernel_checks_level_table():
    value, shapes, starts, loc, attn = make_inputs()
    with pytest.raises(RuntimeError, match="sum"):
        kernel_op(value[:, :-1].contiguous(), shapes, starts, loc, attn)
    with pytest.raises(RuntimeError, match="outside"):
        kernel_op(value, shapes, starts + 1, loc, attn)


@needs_kernel
def test_torch_compile_fullgraph_matches_eager():
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)

    def layer(v, l, a):  # the op between ordinary ops, as in the model
        return ms_deform_attn(v * 2, shapes, starts, l, a.softmax(-1)).relu()

    def op_only(v, l, a):
        return ms_deform_attn(v, shapes, starts, l, a)

    # aot_eager traces the dispatcher, fake impls and autograd; inductor (kept to the op alone,
    # so it generates no C++ and compiles in seconds) lowers the custom op itself.
    for fn, backend in ((layer, "aot_eager"), (op_only, "inductor")):
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        eager_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        comp_leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        eager, comp = fn(*eager_leaves), compiled(*comp_leaves)
        torch.testing.assert_close(comp, eager)
        grad = torch.randn_like(eager)
        for gc, ge in zip(torch.autograd.grad(comp, comp_leaves, grad),
                          torch.autograd.grad(eager, eager_leaves, grad)):
            torch.testing.assert_close(gc, ge)


def test_fake_tensor_shape_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = make_inputs(n=3, q=11, h=2, c=7, p=3, dtype=torch.float32)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in inputs]
        out = kernel_op(*fake)  # the fake impls need no compiled code
        grads = backward_op(out, *fake)
        if kernels.CPU_KERNEL:  # the dispatcher's validation must not read fake data
            assert ms_deform_attn(*fake).shape == out.shape
    assert out.shape == (3, 11, 2 * 7) and out.dtype == torch.float32
    assert [g.shape for g in grads] == [inputs[0].shape, inputs[3].shape, inputs[4].shape]


@needs_kernel
def test_opcheck():
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(kernel_op, args)
    grad = torch.randn(2, 7, 15)
    torch.library.opcheck(backward_op, (grad, value.detach(), shapes, starts, loc.detach(), attn.detach()))


def _bad(name):
    """Mutations of valid inputs (a dict) that must be rejected, with the argument to be named."""
    cases = {
        "value rank": lambda d: d.update(value=d["value"][0]),
        "value dtype": lambda d: d.update(value=d["value"].double()),
        "value not contiguous": lambda d: d.update(value=d["value"].transpose(2, 3).contiguous().transpose(2, 3)),
        "S != sum(h*w)": lambda d: d.update(value=d["value"][:, :-1].contiguous()),
        "spatial_shapes shape": lambda d: d.update(spatial_shapes=d["spatial_shapes"][:, :1].contiguous()),
        "spatial_shapes dtype": lambda d: d.update(spatial_shapes=d["spatial_shapes"].int()),
        "level_start_index shape": lambda d: d.update(level_start_index=d["level_start_index"][:2]),
        "level_start_index values": lambda d: d.update(level_start_index=d["level_start_index"] + 1),
        "sampling_locations shape": lambda d: d.update(sampling_locations=d["sampling_locations"][..., :1].contiguous()),
        "sampling_locations heads": lambda d: d.update(sampling_locations=d["sampling_locations"][:, :, :1].contiguous()),
        "attention_weights shape": lambda d: d.update(attention_weights=d["attention_weights"][..., :1].contiguous()),
        "attention_weights dtype": lambda d: d.update(attention_weights=d["attention_weights"].half()),
        "attention_weights device": lambda d: d.update(attention_weights=d["attention_weights"].to("meta")),
    }
    return cases[name]


BAD_INPUTS = [
    ("value rank", "value", "(N, S, H, C)"),
    ("value dtype", "sampling_locations", "dtype"),
    ("value not contiguous", "value", "contiguous"),
    ("S != sum(h*w)", "spatial_shapes", "sum(h * w)"),
    ("spatial_shapes shape", "spatial_shapes", "(L, 2)"),
    ("spatial_shapes dtype", "spatial_shapes", "int64"),
    ("level_start_index shape", "level_start_index", "(L,) = (3,)"),
    ("level_start_index values", "level_start_index", "[0, 24, 30]"),
    ("sampling_locations shape", "sampling_locations", "(N, Q, H, L, P, 2) = (2, Q, 3, 3, P, 2)"),
    ("sampling_locations heads", "sampling_locations", "(N, Q, H, L, P, 2)"),
    ("attention_weights shape", "attention_weights", "(N, Q, H, L, P) = (2, 7, 3, 3, 2)"),
    ("attention_weights dtype", "attention_weights", "dtype"),
    ("attention_weights device", "attention_weights", "device"),
]


@pytest.mark.parametrize("case,argument,expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_argument(case, argument, expected):
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = dict(zip(names, make_inputs(dtype=torch.float32)))
    _bad(case)(args)
    with pytest.raises(ValueError) as info:
        ms_deform_attn(**args)
    message = str(info.value)
    assert argument in message and expected in message, message


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "CPU_KERNEL", False)
    monkeypatch.setattr(kernels, "EXTENSION_ERROR", ImportError("pretend it is not built"))
    monkeypatch.setattr(dispatch, "_warned", set())
    assert ops.backend_for("cpu") == "reference"
    inputs = make_inputs(dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="pretend it is not built") as record:
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(out, ms_deform_attn_reference(*inputs))
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        ms_deform_attn(*inputs, backend="kernel")


def test_forced_reference_does_not_warn(monkeypatch, recwarn):
    monkeypatch.setattr(dispatch, "DEFAULT_BACKEND", "reference")
    monkeypatch.setattr(dispatch, "_warned", set())
    assert ops.backend_for("cpu") == "reference"
    ms_deform_attn(*make_inputs(dtype=torch.float32))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "reference" in ops.available_backends()


def test_environment_variable_forces_reference():
    code = "from sparse_detr.ops import backend_for; print(backend_for('cpu'))"
    env = dict(os.environ, SPARSE_DETR_OPS="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
