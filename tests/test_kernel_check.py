"""The dispatcher's first-use check: a compiled kernel that raises or disagrees with the reference on its first
call (per device, dtype and kernel pair) is replaced by the reference with one warning; a correct one is silent."""
import warnings

import pytest
import torch

from sparse_detr.ops import dispatch, kernels
from sparse_detr.ops.reference import ms_deform_attn_reference

pytestmark = pytest.mark.skipif(not kernels.CPU_KERNEL, reason="the C++ CPU kernel is not built")


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.setattr(dispatch, "_checked", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv("SPARSE_DETR_KERNEL_CHECK", raising=False)


def _inputs(seed=3):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[4, 6], [2, 3]])
    starts = torch.tensor([0, 24])
    return (torch.randn(2, 30, 2, 8, generator=gen), shapes, starts,
            torch.rand(2, 5, 2, 2, 4, 2, generator=gen), torch.rand(2, 5, 2, 2, 4, generator=gen))


class _ScaledGrad(torch.autograd.Function):
    """Identity forward; the gradient of the locations scaled: a kernel with a wrong backward only."""

    @staticmethod
    def forward(ctx, loc):
        return loc.view_as(loc)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.5


def _call_log(monkeypatch, kernel):
    calls = []

    def spy(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(dispatch, "_kernel", spy)
    return calls


def test_a_correct_kernel_is_checked_once_and_silent(monkeypatch):
    real = dispatch._kernel
    calls = _call_log(monkeypatch, real)
    args = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dispatch.ms_deform_attn(*args)
        dispatch.ms_deform_attn(*args)
    assert len(calls) == 1 + 2  # the first-use case once, then the two calls
    torch.testing.assert_close(out, ms_deform_attn_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault", ["output", "raises", "gradient"])
def test_a_broken_kernel_falls_back_to_the_reference_with_one_warning(monkeypatch, fault):
    real = dispatch._kernel

    def broken(value, shapes, starts, loc, attn):
        if fault == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if fault == "gradient":
            return real(value, shapes, starts, _ScaledGrad.apply(loc), attn)
        return real(value, shapes, starts, loc, attn) * 1.01

    calls = _call_log(monkeypatch, broken)
    args = _inputs()
    with pytest.warns(RuntimeWarning, match="cpu kernel for torch.float32 failed its first-use check") as record:
        out = dispatch.ms_deform_attn(*args)
    message = str(record[0].message)
    assert {"output": "output differs", "raises": "illegal memory access",
            "gradient": "grad locations differs"}[fault] in message
    assert torch.equal(out, ms_deform_attn_reference(*args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check, the kernel is not called again
        dispatch.ms_deform_attn(*args)
    assert len(calls) == 1


def test_the_check_can_be_turned_off(monkeypatch):
    real = dispatch._kernel
    _call_log(monkeypatch, lambda *a: real(*a) * 2)
    monkeypatch.setenv("SPARSE_DETR_KERNEL_CHECK", "0")
    args = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dispatch.ms_deform_attn(*args)
    torch.testing.assert_close(out, 2 * ms_deform_attn_reference(*args), rtol=1e-5, atol=1e-5)
