// Shared declarations of the compiled multi-scale deformable attention op.
//
// The operator schemas are defined from Python (sparse_detr/ops/kernels.py) so that fake-tensor and
// autograd registrations exist even when this extension is not built; the C++/CUDA files only add
// device kernels with TORCH_LIBRARY_IMPL. The kernels re-check their inputs here because
// `torch.ops.sparse_detr.*` can be called directly, bypassing the Python dispatcher's validation.
//
// Shapes (Deformable DETR layout):
//   value               (N, S, H, C)        S = sum over levels of h_l * w_l
//   spatial_shapes      (L, 2) int64        (h_l, w_l) per level
//   level_start_index   (L,)   int64        offset of level l in S
//   sampling_locations  (N, Q, H, L, P, 2)  normalised (x, y) in [0, 1]
//   attention_weights   (N, Q, H, L, P)
//   output              (N, Q, H * C)       value's dtype
// sampling_locations and attention_weights share value's dtype, or are float32 for a 16-bit value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace sparse_detr {

struct AttnDims {
  int64_t N, S, H, C, L, Q, P;
};

// Which CUDA kernel pair runs the op: the default (one thread per channel) or the fast one
// (several channels per thread, see csrc/cuda/ms_deform_attn_cuda_fast.cu). Chosen from Python
// (SPARSE_DETR_CUDA_KERNEL, sparse_detr.ops.set_cuda_kernel); defined in bindings.cpp.
enum class CudaKernel : int { kDefault = 0, kFast = 1 };
CudaKernel cuda_kernel_choice();
void set_cuda_kernel_choice(CudaKernel choice);

// Mixed precision: a 16-bit value may come with float32 locations and weights (16-bit coordinates
// lose sub-pixel precision on large levels); otherwise all three share value's dtype.
inline bool coordinate_dtype_ok(at::ScalarType value, at::ScalarType loc, at::ScalarType attn) {
  if (loc != attn) return false;
  if (loc == value) return true;
  return loc == at::kFloat && (value == at::kHalf || value == at::kBFloat16);
}

inline AttnDims check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                             const at::Tensor& level_start_index,
                             const at::Tensor& sampling_locations,
                             const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must have shape (N, S, H, C), got ",
              value.sizes());
  AttnDims d{};
  d.N = value.size(0);
  d.S = value.size(1);
  d.H = value.size(2);
  d.C = value.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  d.L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == d.L,
              "ms_deform_attn: level_start_index must have shape (L,) = (", d.L, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == d.N &&
                  sampling_locations.size(2) == d.H && sampling_locations.size(3) == d.L &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must have shape (N, Q, H, L, P, 2) = (", d.N,
              ", Q, ", d.H, ", ", d.L, ", P, 2), got ", sampling_locations.sizes());
  d.Q = sampling_locations.size(1);
  d.P = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.dim() == 5 && attention_weights.size(0) == d.N &&
                  attention_weights.size(1) == d.Q && attention_weights.size(2) == d.H &&
                  attention_weights.size(3) == d.L && attention_weights.size(4) == d.P,
              "ms_deform_attn: attention_weights must have shape (N, Q, H, L, P) = (", d.N, ", ",
              d.Q, ", ", d.H, ", ", d.L, ", ", d.P, "), got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());
  TORCH_CHECK(coordinate_dtype_ok(value.scalar_type(), sampling_locations.scalar_type(),
                                  attention_weights.scalar_type()),
              "ms_deform_attn: sampling_locations and attention_weights must both have value's "
              "dtype ", value.scalar_type(), " (or float32 when value is float16/bfloat16), got ",
              sampling_locations.scalar_type(), " and ", attention_weights.scalar_type());
  const auto dev = value.device();
  TORCH_CHECK(spatial_shapes.device() == dev && level_start_index.device() == dev &&
                  sampling_locations.device() == dev && attention_weights.device() == dev,
              "ms_deform_attn: all inputs must be on value's device ", dev);
  return d;
}

}  // namespace sparse_detr
