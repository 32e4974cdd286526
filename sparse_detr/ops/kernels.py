"""The compiled deformable attention kernels, registered with ``torch.library``.

Two operators live in the ``sparse_detr`` namespace::

    sparse_detr::ms_deform_attn(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights) -> output
    sparse_detr::ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights)
        -> (grad_value, grad_sampling_locations, grad_attention_weights)

Their schemas, fake (meta) implementations and the autograd formula are defined here, in Python,
so that they exist whether or not the extension was built: shape propagation with fake tensors,
``torch.compile`` tracing and ``torch.library.opcheck`` need no compiled code. The device kernels
come from ``sparse_detr._C`` (``csrc/``), whose C++ ``TORCH_LIBRARY_IMPL`` blocks register a CPU
and, when compiled with CUDA, a CUDA implementation when the module is imported.

Shapes: value (N, S, H, C); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
sampling_locations (N, Q, H, L, P, 2); attention_weights (N, Q, H, L, P); output (N, Q, H*C).

Use ``sparse_detr.ops.ms_deform_attn`` (it validates inputs and picks a backend) rather than the raw
``torch.ops.sparse_detr.ms_deform_attn``.
"""

import os
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CPU_KERNEL", "CUDA_KERNEL", "CUDA_KERNELS", "EXTENSION_ERROR", "cuda_kernel",
           "ms_deform_attn_kernel", "set_cuda_kernel"]

if not hasattr(torch.library, "register_autograd"):  # added in torch 2.4
    raise ImportError(f"sparse_detr.ops needs torch >= 2.5 (torch.library.register_autograd); "
                      f"found torch {torch.__version__}")

# FRAGMENT rather than DEF: the C++ side only adds implementations to this namespace.
_lib = torch.library.Library("sparse_detr", "FRAGMENT")
_lib.define(
    "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights) -> Tensor"
)
_lib.define(
    "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
    "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
    "-> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("sparse_detr::ms_deform_attn", lib=_lib)
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    # Output shape only depends on shapes, never on data: (N, Q, H*C), contiguous, value's dtype.
    n, _, h, c = value.shape
    return value.new_empty((n, sampling_locations.shape[1], h * c))


@torch.library.register_fake("sparse_detr::ms_deform_attn_backward", lib=_lib)
def _backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    # The kernels return fresh contiguous gradients shaped like their inputs.
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    # One kernel computes all three gradients (they share the corner reads), so it always runs;
    # gradients nobody asked for are dropped.
    grad_value, grad_loc, grad_attn = torch.ops.sparse_detr.ms_deform_attn_backward(
        grad_output.contiguous(), value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights,
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,  # spatial_shapes: integer, not differentiable
        None,  # level_start_index: integer, not differentiable
        grad_loc if needs[3] else None,
        grad_attn if needs[4] else None,
    )


torch.library.register_autograd(
    "sparse_detr::ms_deform_attn", _backward, setup_context=_setup_context, lib=_lib
)


def _load_extension() -> Tuple[Optional[object], Optional[BaseException]]:
    """Import sparse_detr._C (registers the kernels). Returns (module or None, import error)."""
    try:
        from sparse_detr import _C  # noqa: PLC0415  (import for its registration side effect)
    except (ImportError, OSError) as err:  # not built, or built against another torch
        return None, err
    return _C, None


_C, EXTENSION_ERROR = _load_extension()
#: True when the C++ CPU kernel is available.
CPU_KERNEL: bool = _C is not None
#: True when the CUDA kernel was compiled in (it still needs a GPU at run time).
CUDA_KERNEL: bool = _C is not None and bool(_C.cuda_compiled())


#: The CUDA kernel pairs: "default" (one thread per channel, the official design) and "fast"
#: (vectorised channels, locations/weights staged once per query and head; csrc/cuda/*_fast.cu).
CUDA_KERNELS = ("default", "fast")
_CUDA_KERNEL_ENV = "SPARSE_DETR_CUDA_KERNEL"
_cuda_kernel = "default"


def set_cuda_kernel(name: str) -> None:
    """Select the CUDA kernel pair used by every later call of the op (``"default"`` or ``"fast"``).

    The fast pair falls back to the default one for inputs it does not handle (C / vector width
    > 32). Without a CUDA build the choice is only recorded.
    """
    global _cuda_kernel
    if name not in CUDA_KERNELS:
        raise ValueError(f"sparse_detr: CUDA kernel must be one of {CUDA_KERNELS}, got {name!r}")
    if _C is not None and hasattr(_C, "set_cuda_kernel"):
        _C.set_cuda_kernel(name)
    _cuda_kernel = name


def cuda_kernel() -> str:
    """The selected CUDA kernel pair (``SPARSE_DETR_CUDA_KERNEL`` at import, or ``set_cuda_kernel``)."""
    if _C is not None and hasattr(_C, "cuda_kernel"):
        return str(_C.cuda_kernel())
    return _cuda_kernel


def _cuda_kernel_from_env() -> str:
    choice = os.environ.get(_CUDA_KERNEL_ENV, "default").strip().lower() or "default"
    if choice not in CUDA_KERNELS:
        warnings.warn(f"{_CUDA_KERNEL_ENV}={choice!r} is not one of {CUDA_KERNELS}; using 'default'",
                      stacklevel=2)
        choice = "default"
    return choice


set_cuda_kernel(_cuda_kernel_from_env())


def ms_deform_attn_kernel(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                          sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The compiled op without validation or fallback: (N, S, H, C), ... -> (N, Q, H*C)."""
    return torch.ops.sparse_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
