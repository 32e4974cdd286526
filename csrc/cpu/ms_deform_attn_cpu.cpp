// CPU kernels of multi-scale deformable attention (forward and backward).
//
// Registered as the CPU implementation of `sparse_detr::ms_deform_attn` and
// `sparse_detr::ms_deform_attn_backward` (schemas defined in sparse_detr/ops/kernels.py).
// value: float32, float64, bfloat16 or float16; sampling_locations and attention_weights in value's
// dtype or, for a 16-bit value, in float32 (mixed precision: 16-bit coordinates would lose sub-pixel
// precision). Accumulates in float (float32, 16-bit) or double; each gradient has its input's dtype.
//
// Layout choices, for speed: value stays (N, S, H, C), so the C channels of one pixel and one head
// are contiguous and every inner loop below is a unit-stride loop over C that the compiler
// vectorises (`omp simd`). The per-sample arithmetic comes from ms_deform_attn_sample.h, the same
// header the CUDA kernel uses.
//
// Parallelism (at::parallel_for):
//   * forward:  over (n, q); each task writes its own output rows, so no atomics are needed.
//   * backward: over (n, h); grad_value[n, :, h, :] is written by many queries, but only by the
//     task that owns (n, h), so the scatter needs no atomics and is deterministic. grad_loc and
//     grad_attn entries (n, q, h, l, p) are owned by the same task.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ms_deform_attn.h"
#include "../ms_deform_attn_sample.h"

namespace sparse_detr {
namespace {

// Validate the level table against S (cheap here: it is already on the host) and return it.
void check_levels_cpu(const at::Tensor& shapes, const at::Tensor& starts, const AttnDims& d) {
  const int64_t* shp = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < d.L; ++l) {
    const int64_t h = shp[2 * l], w = shp[2 * l + 1];
    TORCH_CHECK(h >= 0 && w >= 0, "ms_deform_attn: spatial_shapes[", l, "] = (", h, ", ", w,
                ") must be non-negative");
    total += h * w;
  }
  TORCH_CHECK(total == d.S, "ms_deform_attn: value has S = ", d.S,
              " tokens but sum(h * w) over spatial_shapes is ", total);
  for (int64_t l = 0; l < d.L; ++l) {
    // Bounds of every level inside value: protects the kernels against out-of-range reads.
    const int64_t area = shp[2 * l] * shp[2 * l + 1];
    TORCH_CHECK(st[l] >= 0 && st[l] + area <= d.S, "ms_deform_attn: level ", l, " spans [",
                st[l], ", ", st[l] + area, ") which is outside value's S = ", d.S);
  }
}

// scalar_t: value / output dtype; coord_t: sampling_locations / attention_weights dtype.
template <typename scalar_t, typename coord_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const coord_t* loc, const coord_t* attn, scalar_t* out, const AttnDims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = d.C, H = d.H, LP = d.L * d.P, pixel_stride = d.H * d.C;
  // ~ a few thousand flops per query and head: keep tiny problems on one thread.
  const int64_t grain = 16;
  at::parallel_for(0, d.N * d.Q, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buf(C);
    acc_t* __restrict__ acc = acc_buf.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / d.Q;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = nq * H + h;  // (n, q, h) row of loc/attn/out
        const coord_t* row_loc = loc + row * LP * 2;
        const coord_t* row_attn = attn + row * LP;
        for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * d.S + starts[l]) * H + h) * C;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t lp = l * d.P + p;
            BilinearSample<acc_t> s;
            const SampleStatus status = bilinear_setup<acc_t>(
                static_cast<acc_t>(row_loc[2 * lp]), static_cast<acc_t>(row_loc[2 * lp + 1]),
                height, width, s);
            if (status == SampleStatus::kOutside) continue;
            if (status == SampleStatus::kNonFinite) {
              for (int64_t c = 0; c < C; ++c) acc[c] = sdetr_nan<acc_t>();
              continue;
            }
            const acc_t a = static_cast<acc_t>(row_attn[lp]);
            if (all_corners_inside(s)) {
              // Interior sample: one fused pass over the channels instead of four.
              const scalar_t* __restrict__ v0 = level + s.index[0] * pixel_stride;
              const scalar_t* __restrict__ v1 = level + s.index[1] * pixel_stride;
              const scalar_t* __restrict__ v2 = level + s.index[2] * pixel_stride;
              const scalar_t* __restrict__ v3 = level + s.index[3] * pixel_stride;
              const acc_t w0 = value_grad_scale(s, 0, a), w1 = value_grad_scale(s, 1, a);
              const acc_t w2 = value_grad_scale(s, 2, a), w3 = value_grad_scale(s, 3, a);
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                acc[c] += w0 * static_cast<acc_t>(v0[c]) + w1 * static_cast<acc_t>(v1[c]) +
                          w2 * static_cast<acc_t>(v2[c]) + w3 * static_cast<acc_t>(v3[c]);
              }
              continue;
            }
            for (int k = 0; k < 4; ++k) {  // border sample: only the corners inside the map
              if (s.index[k] < 0) continue;
              const scalar_t* __restrict__ v = level + s.index[k] * pixel_stride;
              const acc_t w = value_grad_scale(s, k, a);
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(v[c]);
            }
          }
        }
        scalar_t* o = out + row * C;
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// grad_value_acc has value's shape and dtype acc_t (value itself for float/double, an fp32 buffer
// for 16-bit values so that many small contributions are not rounded one by one).
template <typename scalar_t, typename coord_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const coord_t* loc, const coord_t* attn,
                     at::opmath_type<scalar_t>* grad_value_acc, coord_t* grad_loc,
                     coord_t* grad_attn, const AttnDims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = d.C, H = d.H, LP = d.L * d.P, pixel_stride = d.H * d.C;
  at::parallel_for(0, d.N * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_buf(C);
    acc_t* __restrict__ g = g_buf.data();
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      for (int64_t q = 0; q < d.Q; ++q) {
        const int64_t row = (n * d.Q + q) * H + h;
        const coord_t* row_loc = loc + row * LP * 2;
        const coord_t* row_attn = attn + row * LP;
        coord_t* row_grad_loc = grad_loc + row * LP * 2;
        coord_t* row_grad_attn = grad_attn + row * LP;
        for (int64_t c = 0; c < C; ++c) g[c] = static_cast<acc_t>(grad_out[row * C + c]);
        for (int64_t l = 0; l < d.L; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const int64_t level_offset = ((n * d.S + starts[l]) * H + h) * C;
          const scalar_t* level = value + level_offset;
          acc_t* grad_level = grad_value_acc + level_offset;
          for (int64_t p = 0; p < d.P; ++p) {
            const int64_t lp = l * d.P + p;
            BilinearSample<acc_t> s;
            const SampleStatus status = bilinear_setup<acc_t>(
                static_cast<acc_t>(row_loc[2 * lp]), static_cast<acc_t>(row_loc[2 * lp + 1]),
                height, width, s);
            if (status != SampleStatus::kInside) {
              acc_t ga = acc_t(0), gx = acc_t(0), gy = acc_t(0);
              if (status == SampleStatus::kNonFinite) nonfinite_sample_backward(ga, gx, gy);
              row_grad_attn[lp] = static_cast<coord_t>(ga);
              row_grad_loc[2 * lp] = static_cast<coord_t>(gx);
              row_grad_loc[2 * lp + 1] = static_cast<coord_t>(gy);
              continue;
            }
            const acc_t a = static_cast<acc_t>(row_attn[lp]);
            acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
            if (all_corners_inside(s)) {
              const scalar_t* __restrict__ v0 = level + s.index[0] * pixel_stride;
              const scalar_t* __restrict__ v1 = level + s.index[1] * pixel_stride;
              const scalar_t* __restrict__ v2 = level + s.index[2] * pixel_stride;
              const scalar_t* __restrict__ v3 = level + s.index[3] * pixel_stride;
              acc_t* __restrict__ gv0 = grad_level + s.index[0] * pixel_stride;
              acc_t* __restrict__ gv1 = grad_level + s.index[1] * pixel_stride;
              acc_t* __restrict__ gv2 = grad_level + s.index[2] * pixel_stride;
              acc_t* __restrict__ gv3 = grad_level + s.index[3] * pixel_stride;
              const acc_t w0 = value_grad_scale(s, 0, a), w1 = value_grad_scale(s, 1, a);
              const acc_t w2 = value_grad_scale(s, 2, a), w3 = value_grad_scale(s, 3, a);
              acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
              for (int64_t c = 0; c < C; ++c) {
                const acc_t gc = g[c];
                d0 += gc * static_cast<acc_t>(v0[c]);
                d1 += gc * static_cast<acc_t>(v1[c]);
                d2 += gc * static_cast<acc_t>(v2[c]);
                d3 += gc * static_cast<acc_t>(v3[c]);
                gv0[c] += w0 * gc;
                gv1[c] += w1 * gc;
                gv2[c] += w2 * gc;
                gv3[c] += w3 * gc;
              }
              dot[0] = d0;
              dot[1] = d1;
              dot[2] = d2;
              dot[3] = d3;
            } else {
              for (int k = 0; k < 4; ++k) {  // corners outside the map keep dot[k] = 0
                if (s.index[k] < 0) continue;
                const scalar_t* __restrict__ v = level + s.index[k] * pixel_stride;
                acc_t* __restrict__ gv = grad_level + s.index[k] * pixel_stride;
                const acc_t w = value_grad_scale(s, k, a);
                acc_t dk = 0;
#pragma omp simd reduction(+ : dk)
                for (int64_t c = 0; c < C; ++c) {
                  dk += g[c] * static_cast<acc_t>(v[c]);
                  gv[c] += w * g[c];
                }
                dot[k] = dk;
              }
            }
            acc_t ga, gx, gy;
            bilinear_backward(s, dot, a, height, width, ga, gx, gy);
            row_grad_attn[lp] = static_cast<coord_t>(ga);
            row_grad_loc[2 * lp] = static_cast<coord_t>(gx);
            row_grad_loc[2 * lp + 1] = static_cast<coord_t>(gy);
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& shapes_in,
                                      const at::Tensor& starts_in, const at::Tensor& loc_in,
                                      const at::Tensor& attn_in) {
  const AttnDims d = check_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  // No-ops for the contiguous tensors the Python dispatcher insists on; a safety net for direct
  // torch.ops calls and for layouts chosen by a compiler.
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous();
  const at::Tensor starts = starts_in.contiguous(), loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  check_levels_cpu(shapes, starts, d);
  at::Tensor out = at::empty({d.N, d.Q, d.H * d.C}, value.options());
  if (out.numel() == 0) return out;
  const bool mixed = loc.scalar_type() != value.scalar_type();  // 16-bit value, fp32 coordinates
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half,
                                  value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    if (mixed) {
      forward_kernel<scalar_t, float>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                                      starts.data_ptr<int64_t>(), loc.data_ptr<float>(),
                                      attn.data_ptr<float>(), out.data_ptr<scalar_t>(), d);
    } else {
      forward_kernel<scalar_t, scalar_t>(value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                                         starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
                                         attn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& shapes_in,
    const at::Tensor& starts_in, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const AttnDims d = check_inputs(value_in, shapes_in, starts_in, loc_in, attn_in);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == d.N && grad_out_in.size(1) == d.Q &&
                  grad_out_in.size(2) == d.H * d.C,
              "ms_deform_attn_backward: grad_output must have shape (N, Q, H * C) = (", d.N, ", ",
              d.Q, ", ", d.H * d.C, "), got ", grad_out_in.sizes());
  // Autograd may hand us a grad_output of another dtype (e.g. under autocast): compute in value's.
  const at::Tensor grad_out = grad_out_in.to(value_in.scalar_type()).contiguous();
  const at::Tensor value = value_in.contiguous(), shapes = shapes_in.contiguous();
  const at::Tensor starts = starts_in.contiguous(), loc = loc_in.contiguous();
  const at::Tensor attn = attn_in.contiguous();
  check_levels_cpu(shapes, starts, d);

  const bool low_precision =
      value.scalar_type() == at::kBFloat16 || value.scalar_type() == at::kHalf;
  const bool mixed = loc.scalar_type() != value.scalar_type();
  at::Tensor grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(low_precision ? at::kFloat
                                                                   : value.scalar_type()));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_loc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half,
                                    value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (mixed) {
        backward_kernel<scalar_t, float>(
            grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<float>(), attn.data_ptr<float>(),
            grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<float>(),
            grad_attn.data_ptr<float>(), d);
      } else {
        backward_kernel<scalar_t, scalar_t>(
            grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
            grad_attn.data_ptr<scalar_t>(), d);
      }
    });
  }
  at::Tensor grad_value = low_precision ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return std::make_tuple(grad_value, grad_loc, grad_attn);
}

}  // namespace
}  // namespace sparse_detr

TORCH_LIBRARY_IMPL(sparse_detr, CPU, m) {
  m.impl("ms_deform_attn", &sparse_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &sparse_detr::ms_deform_attn_backward_cpu);
}
