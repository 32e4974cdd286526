// Fast CUDA kernels of multi-scale deformable attention (selected by SPARSE_DETR_CUDA_KERNEL=fast).
//
// Same op, same per-sample math (ms_deform_attn_sample.h) as the default pair, laid out for memory
// throughput, with the techniques of DCNv4's FlashDeformAttn and of the "Efficient Multi-Scale
// Deformable Attention on GPUs" kernels:
//   * V channels per thread, read and written as one vector of up to 16 bytes (8 x bf16/fp16,
//     4 x fp32, 2 x fp64); a (query, head) row of C channels is handled by a group of
//     G = next_pow2(C / V) <= 32 lanes of one warp (lanes past C / V idle);
//   * several rows per block (blockDim = rows_per_block * G); the block first stages the sampling
//     locations and attention weights of its rows in shared memory with coalesced loads, so each is
//     read from global memory once per (query, head) instead of once per channel thread;
//   * backward: each lane forms its partial corner dot products <grad_out, value> over its V
//     channels; the group reduces them with warp shuffles, and one lane stores grad_loc / grad_attn
//     (the group owns its row: no atomics). grad_value is accumulated in fp32 (fp64 for double)
//     with atomics, vectorised (float4 / float2) on sm_90.
// Supported when C / V <= 32 and the rows' staging fits in shared memory (fast_kernel_supports);
// otherwise the default kernels run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sample.h"
#include "ms_deform_attn_cuda.h"

namespace sparse_detr {
namespace {

constexpr int kMaxLanes = 32;             // a row's group never spans two warps
constexpr int kTargetThreads = 256;       // threads per block, when shared memory allows
constexpr int64_t kSmemBudget = 40 * 1024;  // below the 48 KB that needs no opt-in

// V elements of scalar_t loaded / stored as one aligned vector.
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* __restrict__ ptr, acc_t (&out)[V]) {
  const Vec<scalar_t, V> x = *reinterpret_cast<const Vec<scalar_t, V>*>(ptr);
#pragma unroll
  for (int c = 0; c < V; ++c) out[c] = static_cast<acc_t>(x.v[c]);
}

template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* __restrict__ ptr, const acc_t (&in)[V]) {
  Vec<scalar_t, V> x;
#pragma unroll
  for (int c = 0; c < V; ++c) x.v[c] = static_cast<scalar_t>(in[c]);
  *reinterpret_cast<Vec<scalar_t, V>*>(ptr) = x;
}

// grad_value[c] += add[c] for c < V: float4 / float2 atomics where the hardware has them (sm_90).
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* ptr, const float (&add)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int c = 0; c < V; c += 4) {
      atomicAdd(reinterpret_cast<float4*>(ptr + c),
                make_float4(add[c], add[c + 1], add[c + 2], add[c + 3]));
    }
  } else if constexpr (V % 2 == 0) {
#pragma unroll
    for (int c = 0; c < V; c += 2) {
      atomicAdd(reinterpret_cast<float2*>(ptr + c), make_float2(add[c], add[c + 1]));
    }
  } else {
    atomicAdd(ptr, add[0]);
  }
#else
#pragma unroll
  for (int c = 0; c < V; ++c) atomicAdd(ptr + c, add[c]);
#endif
}

template <int V>
__device__ __forceinline__ void atomic_add_vec(double* ptr, const double (&add)[V]) {
#pragma unroll
  for (int c = 0; c < V; ++c) atomicAdd(ptr + c, add[c]);
}

// Sum over aligned groups of `group` lanes (power of two <= 32); every lane of the warp calls it.
template <typename acc_t>
__device__ __forceinline__ acc_t lane_group_sum(acc_t v, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Shared-memory staging of a block: the level table, then (x, y, attention) of every sample of the
// block's rows, in acc_t. Returns the number of rows of this block.
template <typename coord_t, typename acc_t>
__device__ __forceinline__ int64_t stage_rows(unsigned char* smem, const int64_t* __restrict__ shapes,
                                              const int64_t* __restrict__ starts,
                                              const coord_t* __restrict__ loc,
                                              const coord_t* __restrict__ attn, const AttnDims& d,
                                              int64_t row0, int rows_per_block, int64_t** levels,
                                              acc_t** samples) {
  const int64_t LP = d.L * d.P;
  const int64_t rows = d.N * d.Q * d.H;
  int64_t* lv = reinterpret_cast<int64_t*>(smem);
  acc_t* sm = reinterpret_cast<acc_t*>(lv + 3 * d.L);
  for (int64_t i = threadIdx.x; i < d.L; i += blockDim.x) {
    lv[3 * i] = shapes[2 * i];
    lv[3 * i + 1] = shapes[2 * i + 1];
    lv[3 * i + 2] = starts[i];
  }
  const int64_t n_rows = std::min<int64_t>(rows_per_block, rows - row0);
  // Rows are consecutive in loc / attn ((n, q, h) flattened), so these loads are coalesced.
  for (int64_t i = threadIdx.x; i < n_rows * LP; i += blockDim.x) {
    const int64_t j = row0 * LP + i;
    sm[3 * i] = static_cast<acc_t>(loc[2 * j]);
    sm[3 * i + 1] = static_cast<acc_t>(loc[2 * j + 1]);
    sm[3 * i + 2] = static_cast<acc_t>(attn[j]);
  }
  __syncthreads();
  *levels = lv;
  *samples = sm;
  return n_rows;
}

template <typename scalar_t, typename coord_t, int V>
__global__ void fast_forward_kernel(const scalar_t* __restrict__ value,
                                    const int64_t* __restrict__ shapes,
                                    const int64_t* __restrict__ starts,
                                    const coord_t* __restrict__ loc,
                                    const coord_t* __restrict__ attn, scalar_t* __restrict__ out,
                                    const AttnDims d, const int group, const int rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_block;
  int64_t* levels;
  acc_t* samples;
  const int64_t n_rows =
      stage_rows<coord_t, acc_t>(smem, shapes, starts, loc, attn, d, row0, rows_per_block, &levels,
                                 &samples);
  const int local_row = threadIdx.x / group, lane = threadIdx.x % group;
  if (local_row >= n_rows || lane * V >= d.C) return;  // no shuffles in the forward: safe

  const int64_t row = row0 + local_row;  // (n, q, h)
  const int64_t h = row % d.H, n = row / (d.H * d.Q);
  const int64_t LP = d.L * d.P, pixel_stride = d.H * d.C;
  const acc_t* rs = samples + int64_t(local_row) * LP * 3;
  acc_t acc[V];
#pragma unroll
  for (int c = 0; c < V; ++c) acc[c] = acc_t(0);
  bool nonfinite = false;
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t height = levels[3 * l], width = levels[3 * l + 1];
    const scalar_t* level = value + ((n * d.S + levels[3 * l + 2]) * d.H + h) * d.C + lane * V;
    for (int64_t p = 0; p < d.P; ++p) {
      const acc_t* smp = rs + 3 * (l * d.P + p);
      BilinearSample<acc_t> s;
      const SampleStatus status = bilinear_setup<acc_t>(smp[0], smp[1], height, width, s);
      if (status == SampleStatus::kNonFinite) nonfinite = true;
      if (status != SampleStatus::kInside) continue;
      const acc_t a = smp[2];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (s.index[k] < 0) continue;
        acc_t v[V];
        load_vec<scalar_t, V, acc_t>(level + s.index[k] * pixel_stride, v);
        const acc_t w = value_grad_scale(s, k, a);
#pragma unroll
        for (int c = 0; c < V; ++c) acc[c] += w * v[c];
      }
    }
  }
  if (nonfinite) {
#pragma unroll
    for (int c = 0; c < V; ++c) acc[c] = sdetr_nan<acc_t>();
  }
  store_vec<scalar_t, V, acc_t>(out + row * d.C + lane * V, acc);
}

// grad_value: acc_t buffer shaped like value; grad_loc / grad_attn: in the coordinates' dtype.
template <typename scalar_t, typename coord_t, int V>
__global__ void fast_backward_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ value,
                                     const int64_t* __restrict__ shapes,
                                     const int64_t* __restrict__ starts,
                                     const coord_t* __restrict__ loc,
                                     const coord_t* __restrict__ attn,
                                     at::opmath_type<scalar_t>* __restrict__ grad_value,
                                     coord_t* __restrict__ grad_loc,
                                     coord_t* __restrict__ grad_attn, const AttnDims d,
                                     const int group, const int rows_per_block) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_block;
  int64_t* levels;
  acc_t* samples;
  const int64_t n_rows =
      stage_rows<coord_t, acc_t>(smem, shapes, starts, loc, attn, d, row0, rows_per_block, &levels,
                                 &samples);
  // Every lane stays to the end (the shuffles need the whole warp); idle lanes add zeros.
  const int local_row = threadIdx.x / group, lane = threadIdx.x % group;
  const bool row_active = local_row < n_rows;
  const bool active = row_active && lane * V < d.C;
  const int64_t row = row0 + (row_active ? local_row : 0);
  const int64_t h = row % d.H, n = row / (d.H * d.Q);
  const int64_t LP = d.L * d.P, pixel_stride = d.H * d.C;
  const acc_t* rs = samples + int64_t(row_active ? local_row : 0) * LP * 3;

  acc_t g[V];
  if (active) {
    load_vec<scalar_t, V, acc_t>(grad_out + row * d.C + lane * V, g);
  } else {
#pragma unroll
    for (int c = 0; c < V; ++c) g[c] = acc_t(0);
  }
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t height = levels[3 * l], width = levels[3 * l + 1];
    const int64_t level_offset = ((n * d.S + levels[3 * l + 2]) * d.H + h) * d.C + lane * V;
    for (int64_t p = 0; p < d.P; ++p) {
      const int64_t lp = l * d.P + p;
      const acc_t* smp = rs + 3 * lp;
      BilinearSample<acc_t> s;
      const SampleStatus status = bilinear_setup<acc_t>(smp[0], smp[1], height, width, s);
      const acc_t a = smp[2];
      acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      if (active && status == SampleStatus::kInside) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (s.index[k] < 0) continue;
          const int64_t offset = level_offset + s.index[k] * pixel_stride;
          acc_t v[V];
          load_vec<scalar_t, V, acc_t>(value + offset, v);
          const acc_t w = value_grad_scale(s, k, a);
          acc_t add[V];
          acc_t partial = acc_t(0);
#pragma unroll
          for (int c = 0; c < V; ++c) {
            partial += g[c] * v[c];
            add[c] = w * g[c];
          }
          dot[k] = partial;
          atomic_add_vec<V>(grad_value + offset, add);
        }
      }
      // bilinear_backward is linear in dot: reduce the partial dots first, then apply it once.
#pragma unroll
      for (int k = 0; k < 4; ++k) dot[k] = lane_group_sum(dot[k], group);
      if (row_active && lane == 0) {
        acc_t ga = acc_t(0), gx = acc_t(0), gy = acc_t(0);
        if (status == SampleStatus::kInside) {
          bilinear_backward(s, dot, a, height, width, ga, gx, gy);
        } else if (status == SampleStatus::kNonFinite) {
          nonfinite_sample_backward(ga, gx, gy);
        }
        const int64_t j = row * LP + lp;
        grad_attn[j] = static_cast<coord_t>(ga);
        grad_loc[2 * j] = static_cast<coord_t>(gx);
        grad_loc[2 * j + 1] = static_cast<coord_t>(gy);
      }
    }
  }
}

// Launch geometry of the fast kernels for these inputs.
struct FastPlan {
  int vec;             // V: channels per lane
  int group;           // G: lanes per (query, head) row, a power of two <= 32
  int rows_per_block;  // rows staged per block; blockDim = rows_per_block * G (a multiple of 32)
  int64_t smem;        // dynamic shared memory bytes
};

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// V = the widest vector (<= 16 bytes) that divides C and keeps value's rows aligned. The other
// vector-accessed tensors (output, grad_value buffer: fresh allocations; grad_out: copied when
// misaligned) are aligned to 16 bytes or more.
FastPlan make_plan(const AttnDims& d, const at::Tensor& value) {
  FastPlan plan{1, 1, 1, 0};
  const int64_t elem = value.element_size();
  const int64_t acc_elem = elem == 8 ? 8 : 4;
  int vec = static_cast<int>(std::max<int64_t>(1, 16 / elem));
  while (vec > 1 && !(d.C % vec == 0 && aligned(value.data_ptr(), vec * elem))) vec /= 2;
  plan.vec = vec;
  const int64_t lanes = (d.C + vec - 1) / vec;
  int group = 1;
  while (group < lanes) group *= 2;
  plan.group = group;
  const int64_t per_row = d.L * d.P * 3 * acc_elem;
  const int64_t fixed = 3 * d.L * 8;
  int rows = kTargetThreads / std::min(group, kMaxLanes);
  const int min_rows = std::max(1, 32 / std::min(group, kMaxLanes));  // whole warps
  while (rows > min_rows && fixed + rows * per_row > kSmemBudget) rows /= 2;
  plan.rows_per_block = rows;
  plan.smem = fixed + rows * per_row;
  return plan;
}

int64_t fast_blocks(const AttnDims& d, const FastPlan& plan) {
  const int64_t rows = d.N * d.Q * d.H;
  return (rows + plan.rows_per_block - 1) / plan.rows_per_block;
}

// Calls f(std::integral_constant<int, V>) for the runtime V; only widths of <= 16 bytes are compiled.
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kMax = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

// Calls f(coord_t{}) with coord_t = float for a 16-bit value with fp32 coordinates, else scalar_t.
template <typename scalar_t, typename F>
void dispatch_coord(bool mixed, F&& f) {
  if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
    if (mixed) return f(float{});
  }
  f(scalar_t{});
}

template <typename scalar_t, typename coord_t>
void launch_forward(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts,
                    const at::Tensor& loc, const at::Tensor& attn, at::Tensor& out,
                    const AttnDims& d, const FastPlan& plan) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 blocks(static_cast<unsigned>(fast_blocks(d, plan)));
  const dim3 threads(static_cast<unsigned>(plan.rows_per_block * plan.group));
  dispatch_vec<scalar_t>(plan.vec, [&](auto vec) {
    fast_forward_kernel<scalar_t, coord_t, decltype(vec)::value>
        <<<blocks, threads, plan.smem, stream>>>(
            value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(), out.data_ptr<scalar_t>(), d,
            plan.group, plan.rows_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename coord_t>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& shapes,
                     const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn,
                     at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn,
                     const AttnDims& d, const FastPlan& plan) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 blocks(static_cast<unsigned>(fast_blocks(d, plan)));
  const dim3 threads(static_cast<unsigned>(plan.rows_per_block * plan.group));
  dispatch_vec<scalar_t>(plan.vec, [&](auto vec) {
    fast_backward_kernel<scalar_t, coord_t, decltype(vec)::value>
        <<<blocks, threads, plan.smem, stream>>>(
            grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<coord_t>(), attn.data_ptr<coord_t>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<coord_t>(),
            grad_attn.data_ptr<coord_t>(), d, plan.group, plan.rows_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool fast_kernel_supports(const AttnDims& d, const at::Tensor& value) {
  const FastPlan plan = make_plan(d, value);
  const int64_t per_row = d.L * d.P * 3 * (value.element_size() == 8 ? 8 : 4);
  return plan.group <= kMaxLanes && 3 * d.L * 8 + plan.rows_per_block * per_row <= kSmemBudget;
}

at::Tensor fast_forward_cuda(const at::Tensor& value, const at::Tensor& shapes,
                             const at::Tensor& starts, const at::Tensor& loc,
                             const at::Tensor& attn, const AttnDims& d) {
  at::Tensor out = at::empty({d.N, d.Q, d.H * d.C}, value.options());
  if (out.numel() == 0) return out;
  const FastPlan plan = make_plan(d, value);
  const bool mixed = loc.scalar_type() != value.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  value.scalar_type(), "ms_deform_attn_fast_forward_cuda", [&] {
    dispatch_coord<scalar_t>(mixed, [&](auto coord) {
      launch_forward<scalar_t, decltype(coord)>(value, shapes, starts, loc, attn, out, d, plan);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fast_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value, const at::Tensor& shapes,
    const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn, const AttnDims& d) {
  const auto dtype = value.scalar_type();
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  at::Tensor grad_value =
      at::zeros(value.sizes(), value.options().dtype(low_precision ? at::kFloat : dtype));
  // Every entry is stored by its row's lane 0, so no zero fill is needed.
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_loc.numel() > 0 && value.numel() > 0) {
    const FastPlan plan = make_plan(d, value);
    // A contiguous view may start anywhere in its storage: realign it for the vector loads.
    const at::Tensor grad_out =
        aligned(grad_out_in.data_ptr(), plan.vec * value.element_size()) ? grad_out_in
                                                                          : grad_out_in.clone();
    const bool mixed = loc.scalar_type() != dtype;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dtype,
                                    "ms_deform_attn_fast_backward_cuda", [&] {
      dispatch_coord<scalar_t>(mixed, [&](auto coord) {
        launch_backward<scalar_t, decltype(coord)>(grad_out, value, shapes, starts, loc, attn,
                                                   grad_value, grad_loc, grad_attn, d, plan);
      });
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return std::make_tuple(grad_value.to(dtype), grad_loc, grad_attn);
}

}  // namespace sparse_detr
