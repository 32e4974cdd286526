"""Multi-scale deformable attention (the one custom op of Deformable / Sparse DETR).

Three layers, one file each:

* ``reference.py`` - pure-PyTorch ``grid_sample`` reference (readable ground truth, fallback);
* ``kernels.py``   - ``torch.library`` registration of the compiled C++/CUDA kernels
  (``torch.ops.sparse_detr.ms_deform_attn`` with fake tensor and autograd support);
* ``dispatch.py``  - ``ms_deform_attn``: input validation and backend choice.

Typical use::

    from sparse_detr.ops import ms_deform_attn
    out = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

``available_backends()`` lists what was built; ``backend_for(device, dtype)`` says what a call
would use; ``SPARSE_DETR_OPS=reference`` forces the reference. ``SPARSE_DETR_CUDA_KERNEL=fast``
(or ``set_cuda_kernel("fast")``) selects the fast CUDA kernel pair instead of the default one.
This package imports nothing else from sparse_detr.
"""

from .dispatch import DEFAULT_BACKEND, available_backends, backend_for, ms_deform_attn
from .kernels import CUDA_KERNELS, cuda_kernel, set_cuda_kernel
from .reference import ms_deform_attn_reference

__all__ = [
    "CUDA_KERNELS",
    "DEFAULT_BACKEND",
    "available_backends",
    "backend_for",
    "cuda_kernel",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "set_cuda_kernel",
]
