// CUDA kernels of multi-scale deformable attention (forward and backward): the default pair.
//
// Registered as the CUDA implementation of `sparse_detr::ms_deform_attn` and
// `sparse_detr::ms_deform_attn_backward` (schemas defined in sparse_detr/ops/kernels.py). When the
// fast pair is selected (SPARSE_DETR_CUDA_KERNEL=fast) and supports the inputs, the registered
// functions call it instead (ms_deform_attn_cuda_fast.cu).
// value float32, float64, float16 or bfloat16; locations / weights in value's dtype or, for a 16-bit
// value, float32. Arithmetic in at::opmath_type (fp32 for the 16-bit types).
//
// One thread per (n, q, h, c), channel fastest: the C threads of one (n, q, h) share the sampling
// locations and weights (a broadcast read) and read consecutive channels of each corner pixel
// (coalesced, value is (N, S, H, C)). The per-sample math comes from ms_deform_attn_sample.h, the
// header the CPU kernel uses too.
//
// Backward:
//   * grad_value: many queries sample the same pixel, so corners are scattered with atomicAdd.
//     For float16/bfloat16 they go to an fp32 buffer that is cast once at the end, because 16-bit
//     atomics would round after every addition.
//   * grad_loc / grad_attn need a sum over the C channel threads. When C is a power of two the
//     threads of one (n, q, h) sit in aligned groups of min(C, 32) lanes of a warp and are reduced
//     with shuffles; the group's first lane then stores the result (C <= 32) or adds it atomically
//     (C > 32: several warps). Any other C falls back to one atomicAdd per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sample.h"
#include "ms_deform_attn_cuda.h"

namespace sparse_detr {
namespace {

constexpr int kThreads = 256;  // a multiple of the warp size: shuffle groups never straddle blocks

int64_t num_blocks(int64_t total) {
  // Grid-stride loops cover the rest; a few waves of blocks per SM is plenty.
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, cap));
}

// scalar_t: value / output dtype; coord_t: locations / weights dtype; acc_t: arithmetic.
template <typename scalar_t, typename coord_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const coord_t* __restrict__ loc,
                               const coord_t* __restrict__ attn, scalar_t* __restrict__ out,
                               const AttnDims d) {
  const int64_t total = d.N * d.Q * d.H * d.C;
  const int64_t LP = d.L * d.P, pixel_stride = d.H * d.C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % d.C;
    const int64_t row = i / d.C;  // (n, q, h)
    const int64_t h = row % d.H;
    const int64_t n = row / (d.H * d.Q);
    const coord_t* row_loc = loc + row * LP * 2;
    const coord_t* row_attn = attn + row * LP;
    acc_t acc = acc_t(0);
    bool nonfinite = false;
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const scalar_t* level = value + ((n * d.S + starts[l]) * d.H + h) * d.C + c;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t lp = l * d.P + p;
        BilinearSample<acc_t> s;
        const SampleStatus status = bilinear_setup<acc_t>(
            static_cast<acc_t>(row_loc[2 * lp]), static_cast<acc_t>(row_loc[2 * lp + 1]), height,
            width, s);
        if (status == SampleStatus::kInside) {
          acc += static_cast<acc_t>(row_attn[lp]) *
                 bilinear_sample<scalar_t, acc_t>(s, level, pixel_stride);
        } else if (status == SampleStatus::kNonFinite) {
          nonfinite = true;
        }
      }
    }
    out[i] = static_cast<scalar_t>(nonfinite ? sdetr_nan<acc_t>() : acc);  // out is (N, Q, H*C): flat index (row, c) == i
  }
}

// Sum `v` over aligned groups of `group` lanes (a power of two <= 32). Every lane of the warp must
// call this (full mask), which the uniform loop bounds in backward_kernel guarantee.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// grad_value / grad_loc / grad_attn are acc_t buffers (the outputs themselves for float/double).
// `group`: lanes reduced together (see file comment); `group_owns`: group == C, so the group is
// the only writer of its grad_loc / grad_attn entries and stores instead of adding.
template <typename scalar_t, typename coord_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const coord_t* __restrict__ loc,
                                const coord_t* __restrict__ attn, acc_t* __restrict__ grad_value,
                                acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn,
                                const AttnDims d, const int group, const bool group_owns) {
  const int64_t total = d.N * d.Q * d.H * d.C;
  const int64_t LP = d.L * d.P, pixel_stride = d.H * d.C;
  // The loop bound depends on the block only, so all lanes of a warp iterate together and may
  // shuffle; lanes past the end compute on a clamped index with a zero gradient and write nothing.
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < total;
       base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i_raw = base + threadIdx.x;
    const bool active = i_raw < total;
    const int64_t i = active ? i_raw : total - 1;
    const int64_t c = i % d.C;
    const int64_t row = i / d.C;
    const int64_t h = row % d.H;
    const int64_t n = row / (d.H * d.Q);
    const coord_t* row_loc = loc + row * LP * 2;
    const coord_t* row_attn = attn + row * LP;
    const acc_t g = active ? static_cast<acc_t>(grad_out[i]) : acc_t(0);
    const bool leader = active && (c % group == 0);
    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
      const int64_t level_offset = ((n * d.S + starts[l]) * d.H + h) * d.C + c;
      const scalar_t* level = value + level_offset;
      acc_t* grad_level = grad_value + level_offset;
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t lp = l * d.P + p;
        acc_t ga = acc_t(0), gx = acc_t(0), gy = acc_t(0);
        BilinearSample<acc_t> s;
        const SampleStatus status = bilinear_setup<acc_t>(
            static_cast<acc_t>(row_loc[2 * lp]), static_cast<acc_t>(row_loc[2 * lp + 1]), height,
            width, s);
        if (status == SampleStatus::kNonFinite) {
          nonfinite_sample_backward(ga, gx, gy);  // NaN in every lane, so in the sum too
        } else if (status == SampleStatus::kInside) {
          const acc_t a = static_cast<acc_t>(row_attn[lp]);
          acc_t dot[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            dot[k] = g * corner_value<scalar_t, acc_t>(s, k, level, pixel_stride);
            if (active && s.index[k] >= 0) {
              atomicAdd(grad_level + s.index[k] * pixel_stride, value_grad_scale(s, k, a) * g);
            }
          }
          bilinear_backward(s, dot, a, height, width, ga, gx, gy);
        }
        ga = group_sum(ga, group);
        gx = group_sum(gx, group);
        gy = group_sum(gy, group);
        if (leader) {
          const int64_t j = row * LP + lp;
          if (group_owns) {
            grad_attn[j] = ga;
            grad_loc[2 * j] = gx;
            grad_loc[2 * j + 1] = gy;
          } else {
            atomicAdd(grad_attn + j, ga);
            atomicAdd(grad_loc + 2 * j, gx);
            atomicAdd(grad_loc + 2 * j + 1, gy);
          }
        }
      }
    }
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_in, const at::Tensor& shapes_in,
                                       const at::Tensor& starts_in, const at::Tensor& loc_in,
                                       const at::Tensor& attn_in) {
  const AttnDims d = check_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous();
  const at::Tensor starts = starts_in.contiguous(), loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  if (cuda_kernel_choice() == CudaKernel::kFast && fast_kernel_supports(d, value)) {
    return fast_forward_cuda(value, shapes, starts, loc, attn, d);
  }
  at::Tensor out = at::empty({d.N, d.Q, d.H * d.C}, value.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool mixed = loc.scalar_type() != value.scalar_type();  // 16-bit value, fp32 coordinates
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (mixed) {
      forward_kernel<scalar_t, float, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<float>(), attn.data_ptr<float>(), out.data_ptr<scalar_t>(), d);
    } else {
      forward_kernel<scalar_t, scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
          value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& shapes_in,
    const at::Tensor& starts_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const AttnDims d = check_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == d.N && grad_out_in.size(1) == d.Q &&
                  grad_out_in.size(2) == d.H * d.C,
              "ms_deform_attn_backward: grad_output must have shape (N, Q, H * C) = (", d.N, ", ",
              d.Q, ", ", d.H * d.C, "), got ", grad_out_in.sizes());
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor grad_out = grad_out_in.to(value_in.scalar_type()).contiguous();
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous();
  const at::Tensor starts = starts_in.contiguous(), loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  if (cuda_kernel_choice() == CudaKernel::kFast && fast_kernel_supports(d, value)) {
    return fast_backward_cuda(grad_out, value, shapes, starts, loc, attn, d);
  }

  const auto dtype = value.scalar_type();
  const bool mixed = loc.scalar_type() != dtype;
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto acc_options = value.options().dtype(low_precision ? at::kFloat : dtype);
  // Power-of-two C: reduce over aligned lane groups; otherwise one atomic per channel thread.
  const bool pow2 = d.C > 0 && (d.C & (d.C - 1)) == 0;
  const int group = pow2 ? static_cast<int>(std::min<int64_t>(d.C, 32)) : 1;
  const bool group_owns = group == d.C;

  at::Tensor grad_value = at::zeros(value.sizes(), acc_options);
  // Zero-filled only when partial sums are added atomically; otherwise every entry is stored.
  at::Tensor grad_loc = group_owns ? at::empty(loc.sizes(), acc_options)
                                   : at::zeros(loc.sizes(), acc_options);
  at::Tensor grad_attn = group_owns ? at::empty(attn.sizes(), acc_options)
                                    : at::zeros(attn.sizes(), acc_options);
  const int64_t total = d.N * d.Q * d.H * d.C;
  if (total > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dtype,
                                    "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (mixed) {
        backward_kernel<scalar_t, float, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<float>(), attn.data_ptr<float>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(),
            d, group, group_owns);
      } else {
        backward_kernel<scalar_t, scalar_t, acc_t><<<num_blocks(total), kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_attn.data_ptr<acc_t>(),
            d, group, group_owns);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Each gradient in its input's dtype (no-ops for float/double and for fp32 coordinates).
  return std::make_tuple(grad_value.to(dtype), grad_loc.to(loc.scalar_type()),
                         grad_attn.to(attn.scalar_type()));
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_IMPL(sparse_detr, CUDA, m) {
  m.impl("ms_deform_attn", &sparse_detr::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &sparse_detr::ms_deform_attn_backward_cuda);
}
