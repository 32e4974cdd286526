"""Public entry point of multi-scale deformable attention: validate, then pick a backend.

``ms_deform_attn`` runs the compiled kernel (``sparse_detr._C``, see kernels.py) when it is built
for the inputs' device and dtype, and otherwise the pure-PyTorch reference (reference.py), with a
one-time warning. Backends:

* ``"cpu"``  - C++ kernel, float32 / float64 / float16 / bfloat16;
* ``"cuda"`` - CUDA kernel, float32 / float64 / float16 / bfloat16 (needs a CUDA build);
* ``"reference"`` - ``grid_sample`` based, any device and dtype grid_sample supports.

Dtypes: ``sampling_locations`` and ``attention_weights`` have value's dtype, or float32 when value is
float16 / bfloat16 (mixed precision: a 16-bit location is off by up to 1/8 pixel at x = 128-256, so
under autocast the module keeps them in fp32). The output has value's dtype; every kernel accumulates
in fp32 (fp64 for float64); each gradient has its input's dtype. Measured against the fp32 reference on
the same numbers (tests/test_ops_precision.py): the 16-bit results (output, grad_value) within their
final rounding (relative 2**-7 for bf16, 2**-10 for fp16, plus 1e-3 of the largest value), the fp32
gradients of locations and weights within 1e-5 of the largest value.

First use: the first call per device, dtype and kernel pair checks the compiled kernel against the
reference on a small random case (forward and the gradients of value, locations and weights); a kernel
that raises or disagrees is not used again in the process: the reference takes over, with one warning
naming the kernel and the error (a CUDA kernel that never ran on a new GPU cannot silently train a
wrong model). ``SPARSE_DETR_KERNEL_CHECK=0`` turns the check off; it is skipped under compilation and
for fake tensors.

Forcing the reference: pass ``backend="reference"`` or set ``SPARSE_DETR_OPS=reference`` in the
environment (read once, at import). ``backend="kernel"`` makes a missing kernel an error instead
of a fallback.

Validation (``ValueError`` naming the argument and the expected shape) uses only shapes, dtypes,
devices and strides, so it is free under ``torch.compile`` and with fake tensors. The one
data-dependent check - ``S == sum(h * w)`` and ``level_start_index == [0, cumsum(h * w)[:-1]]`` -
runs only when the level tables are ordinary CPU tensors outside of compilation (reading them is
then a cheap host operation, not a device sync); for CUDA level tables the check is skipped, and
the CPU kernel repeats it in C++ in any case.
"""

import os
import warnings
from typing import List, Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import kernels
from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "available_backends", "backend_for"]

_ENV_VAR = "SPARSE_DETR_OPS"
_CHECK_ENV = "SPARSE_DETR_KERNEL_CHECK"
# Agreement with the reference on the first-use case, as a fraction of the largest reference value; 16-bit
# kernels round value and output (2**-7 for bf16), float32 ones only reorder sums.
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}
_CHOICES = ("auto", "kernel", "reference")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def _backend_from_env() -> str:
    choice = os.environ.get(_ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        warnings.warn(f"{_ENV_VAR}={choice!r} is not one of {_CHOICES}; using 'auto'", stacklevel=2)
        choice = "auto"
    return choice


#: Backend requested by the environment; a module global so torch.compile can guard on it.
DEFAULT_BACKEND: str = _backend_from_env()
_warned: set = set()
_checked: dict = {}  # (device, dtype, kernel pair) -> None (agrees) or the error text of a failed first use


def available_backends() -> List[str]:
    """Backends built into this installation, e.g. ``["reference", "cpu"]``."""
    out = ["reference"]
    if kernels.CPU_KERNEL:
        out.append("cpu")
    if kernels.CUDA_KERNEL:
        out.append("cuda")
    return out


def backend_for(device: Union[str, torch.device], dtype: Optional[torch.dtype] = None,
                backend: Optional[str] = None) -> str:
    """Backend that ``ms_deform_attn`` uses for inputs on ``device`` (of ``dtype``, if given).

    Returns ``"cpu"`` or ``"cuda"`` (compiled kernels) or ``"reference"``. ``backend`` is the
    request (``"auto"``, ``"kernel"``, ``"reference"``; default: ``SPARSE_DETR_OPS`` or auto).
    """
    request = DEFAULT_BACKEND if backend is None else backend
    if request not in _CHOICES:
        raise ValueError(f"ms_deform_attn: backend must be one of {_CHOICES}, got {request!r}")
    if request == "reference":
        return "reference"
    kind = torch.device(device).type
    built = (kind == "cpu" and kernels.CPU_KERNEL) or (kind == "cuda" and kernels.CUDA_KERNEL)
    if built and (dtype is None or dtype in _KERNEL_DTYPES[kind]):
        return kind
    if request == "kernel":
        raise RuntimeError(
            f"ms_deform_attn: no compiled kernel for device {kind!r} and dtype {dtype} "
            f"(available backends: {available_backends()}); build it with "
            "`pip install -e . --no-build-isolation` (FORCE_CUDA=1 for CUDA)"
        )
    return "reference"


def _fail(message: str) -> None:
    raise ValueError(f"ms_deform_attn: {message}")


def _check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Raise ValueError naming the offending argument and the shape it should have."""
    if value.dim() != 4:
        _fail(f"value must have shape (N, S, H, C), got {tuple(value.shape)}")
    n, s, h, c = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        _fail(f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != levels:
        _fail(f"level_start_index must have shape (L,) = ({levels},), "
              f"got {tuple(level_start_index.shape)}")
    loc = sampling_locations
    if (loc.dim() != 6 or loc.shape[0] != n or loc.shape[2] != h or loc.shape[3] != levels
            or loc.shape[5] != 2):
        _fail(f"sampling_locations must have shape (N, Q, H, L, P, 2) = ({n}, Q, {h}, {levels}, "
              f"P, 2), got {tuple(loc.shape)}")
    q, p = loc.shape[1], loc.shape[4]
    if attention_weights.dim() != 5 or tuple(attention_weights.shape) != (n, q, h, levels, p):
        _fail(f"attention_weights must have shape (N, Q, H, L, P) = ({n}, {q}, {h}, {levels}, {p}), "
              f"got {tuple(attention_weights.shape)}")

    if not value.is_floating_point():
        _fail(f"value must be a floating-point tensor, got {value.dtype}")
    mixed_ok = value.dtype in _HALF_DTYPES
    for name, t in (("sampling_locations", loc), ("attention_weights", attention_weights)):
        if t.dtype != value.dtype and not (mixed_ok and t.dtype == torch.float32):
            also = " or float32" if mixed_ok else ""
            _fail(f"{name} must have value's dtype {value.dtype}{also}, got {t.dtype}")
    if loc.dtype != attention_weights.dtype:
        _fail(f"sampling_locations ({loc.dtype}) and attention_weights ({attention_weights.dtype}) "
              "must have the same dtype")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.dtype != torch.int64:
            _fail(f"{name} must be int64, got {t.dtype}")

    named = (("value", value), ("spatial_shapes", spatial_shapes),
             ("level_start_index", level_start_index), ("sampling_locations", loc),
             ("attention_weights", attention_weights))
    for name, t in named:
        if t.device != value.device:
            _fail(f"{name} is on {t.device} but value is on {value.device}; "
                  "all inputs must be on one device")
    for name, t in named:
        # An error rather than a silent copy: a hidden .contiguous() of value costs a full copy
        # of the largest tensor in the layer on every call.
        if not t.is_contiguous():
            _fail(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                  "call .contiguous() on it")

    # Data-dependent checks: only on plain CPU tensors outside compilation (see module docstring).
    # `type(...) is Tensor` excludes fake/functional tensors and other subclasses.
    if (not torch.compiler.is_compiling() and spatial_shapes.device.type == "cpu"
            and type(spatial_shapes) is Tensor and type(level_start_index) is Tensor):
        sizes = spatial_shapes.prod(dim=1)
        total = int(sizes.sum())
        if total != s:
            _fail(f"value has S = {s} tokens but spatial_shapes {spatial_shapes.tolist()} "
                  f"gives sum(h * w) = {total}")
        expected = torch.cumsum(sizes, 0) - sizes
        if not torch.equal(level_start_index, expected):
            _fail(f"level_start_index must be {expected.tolist()} (exclusive cumsum of h * w), "
                  f"got {level_start_index.tolist()}")


def _warn_fallback(device: torch.device, dtype: torch.dtype) -> None:
    key = (device.type, dtype)
    if key in _warned:
        return
    _warned.add(key)
    reason = (f"the extension failed to import ({kernels.EXTENSION_ERROR})"
              if kernels.EXTENSION_ERROR is not None
              else f"it has no {device.type} kernel for {dtype}")
    warnings.warn(
        f"sparse_detr.ops.ms_deform_attn: using the slow pure-PyTorch reference because {reason}. "
        "Build the kernels with `pip install -e . --no-build-isolation` (FORCE_CUDA=1 for CUDA), "
        f"or set {_ENV_VAR}=reference to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def _kernel(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
            attention_weights: Tensor) -> Tensor:
    """The compiled op (one name, so that a test can substitute a broken kernel)."""
    return torch.ops.sparse_detr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                                attention_weights)


def _kernel_name(device: torch.device) -> str:
    return f"the {device.type} kernel" + (f" pair '{kernels.cuda_kernel()}'" if device.type == "cuda" else "")


def _first_use_check(device: torch.device, dtype: torch.dtype, coord_dtype: torch.dtype) -> Optional[str]:
    """Run the kernel and the reference on a small random case; None if they agree, else what went wrong."""
    gen = torch.Generator().manual_seed(0)  # its own generator: the caller's random stream is not touched
    shapes = torch.tensor([[3, 5], [2, 2]], dtype=torch.int64)
    starts = torch.tensor([0, 15], dtype=torch.int64)
    cpu = [torch.rand(2, 19, 2, 8, generator=gen), torch.rand(2, 7, 2, 2, 3, 2, generator=gen) * 1.2 - 0.1,
           torch.rand(2, 7, 2, 2, 3, generator=gen), torch.randn(2, 7, 16, generator=gen)]

    # The case's numbers rounded to the kernel's dtypes; the reference runs them in float32 at least (a 16-bit
    # reference rounds its own sums, the kernels accumulate in float32).
    cpu[0], cpu[1], cpu[2] = cpu[0].to(dtype), cpu[1].to(coord_dtype), cpu[2].to(coord_dtype)
    wide = torch.promote_types(dtype, torch.float32)

    def run(fn, value_dtype, loc_dtype):
        with torch.inference_mode(False), torch.enable_grad():
            value = cpu[0].to(device, value_dtype).requires_grad_()
            loc, attn = (t.to(device, loc_dtype).requires_grad_() for t in cpu[1:3])
            out = fn(value, shapes.to(device), starts.to(device), loc, attn)
            grads = torch.autograd.grad((out.float() * cpu[3].to(device)).sum(), (value, loc, attn))
        return [t.detach().double().cpu() for t in (out, *grads)]

    try:
        want = run(ms_deform_attn_reference, wide, torch.promote_types(coord_dtype, torch.float32))
    except Exception:  # noqa: BLE001 - no reference for this device / dtype: nothing to check against
        return None
    try:
        got = run(_kernel, dtype, coord_dtype)
    except Exception as e:  # noqa: BLE001 - whatever the kernel raises, the reference takes over
        return f"{type(e).__name__}: {e}"
    tol = _CHECK_TOLERANCE.get(dtype, 1e-2)
    for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        allowed, error = tol * max(b.abs().max().item(), 1e-6), (a - b).abs().max().item()
        if not torch.isfinite(a).all() or not error <= allowed:
            return f"{name} differs from the reference by {error:.3g} (allowed {allowed:.3g})"
    return None


def _kernel_trusted(value: Tensor, coord_dtype: torch.dtype) -> bool:
    """Whether the kernel for value's device and dtype passed its first-use check (run now if not yet)."""
    if (os.environ.get(_CHECK_ENV, "1").strip() == "0" or torch.compiler.is_compiling()
            or type(value) is not Tensor):  # fake / functional tensors: nothing can run
        return True
    key = (str(value.device), value.dtype, coord_dtype, kernels.cuda_kernel() if value.is_cuda else "")
    if key not in _checked:
        _checked[key] = _first_use_check(value.device, value.dtype, coord_dtype)
        if _checked[key] is not None:
            warnings.warn(f"sparse_detr.ops.ms_deform_attn: {_kernel_name(value.device)} for {value.dtype} failed "
                          f"its first-use check against the reference ({_checked[key]}); using the pure-PyTorch "
                          f"reference instead in this process (set {_CHECK_ENV}=0 to skip the check)",
                          RuntimeWarning, stacklevel=3)
    return _checked[key] is None


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor, *,
                   backend: Optional[str] = None) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR semantics), differentiable.

    Args:
        value: (N, S, H, C) per-head values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (h_l, w_l) of every level; sum h_l * w_l == S.
        level_start_index: (L,) int64, offset of every level in S (exclusive cumsum of h * w).
        sampling_locations: (N, Q, H, L, P, 2) normalised (x, y); [0, 1] spans the map, samples
            use ``align_corners=False`` bilinear interpolation and read zeros outside the map.
        attention_weights: (N, Q, H, L, P) weights of the samples.
        backend: ``"auto"`` (kernel if built, else reference with a one-time warning),
            ``"kernel"`` (error if not built) or ``"reference"``; default ``SPARSE_DETR_OPS``.

        The locations and weights may be float32 with a float16 / bfloat16 value (mixed precision).

    Returns:
        (N, Q, H*C) output in value's dtype; channels ``[h*C, (h+1)*C)`` belong to head h.

    Raises:
        ValueError: a wrong rank/size/dtype/device or a non-contiguous input (message names it).
        RuntimeError: ``backend="kernel"`` without a compiled kernel for the device and dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    chosen = backend_for(value.device, value.dtype, backend)
    if chosen != "reference" and not _kernel_trusted(value, sampling_locations.dtype):
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    requested = DEFAULT_BACKEND if backend is None else backend
    if chosen == "reference" and requested != "reference" and is_fake(value):
        # Shape propagation (e.g. a fake-CUDA trace on a machine without the CUDA kernel): the op's fake
        # implementation, not the reference, which reads the level sizes from the data.
        return _kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if chosen == "reference":
        if requested != "reference":
            _warn_fallback(value.device, value.dtype)
        return ms_deform_attn_reference(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return _kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
