// Per-sample math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Every function here is a `__host__ __device__` inline template when compiled by nvcc and a plain
// inline template when compiled by a C++ compiler, so the CPU tests exercise exactly the arithmetic
// that the GPU runs. The kernels only decide *how* to loop (channels vectorised on the CPU; one
// thread per channel in the default CUDA pair, a vector of channels per thread in the fast pair);
// *what* is computed for one sampling point lives here.
//
// Conventions (Deformable DETR, `grid_sample(..., align_corners=False, padding_mode="zeros")`):
//   * a sampling location (x, y) is normalised to [0, 1] over the level's width and height;
//   * its pixel coordinate is px = x * W - 0.5, py = y * H - 0.5 (pixel centres at integers);
//   * the four neighbouring pixels are read with bilinear weights; a neighbour outside the map reads 0;
//   * a NaN or +-inf location makes the sample NaN (its output row and its weight / location
//     gradients), as grid_sample does: a NaN in the offsets must not vanish as "outside the map".
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SDETR_FN __host__ __device__ __forceinline__
#define SDETR_UNROLL _Pragma("unroll")
#else
#define SDETR_FN inline
#define SDETR_UNROLL
#endif

namespace sparse_detr {

// floor() overloads that resolve to the right builtin in both host and device code.
SDETR_FN float sdetr_floor(float v) { return ::floorf(v); }
SDETR_FN double sdetr_floor(double v) { return ::floor(v); }

// The four neighbours of one sampling point inside one feature level.
// Corner k = 0, 1, 2, 3 is (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
template <typename acc_t>
struct BilinearSample {
  int64_t index[4];  // pixel index y * W + x inside the level, or -1 when the corner is outside the map
  acc_t weight[4];   // bilinear weight of each corner (meaningful only where index >= 0)
  acc_t fx;          // px - x0, in [0, 1): needed by the gradient w.r.t. the location
  acc_t fy;          // py - y0
};

// Where a sampling point lies relative to a level.
enum class SampleStatus {
  kOutside,    // all four corners outside the map: the sample is exactly 0, and so are its gradients
  kInside,     // at least one corner inside: `s` is filled
  kNonFinite,  // NaN or +-inf location: the sample is NaN (as grid_sample's is), see nonfinite_sample
};

// Quiet NaN in host and device code (numeric_limits is not usable in device code without flags).
template <typename acc_t>
SDETR_FN acc_t sdetr_nan() {
  return static_cast<acc_t>(NAN);
}

// Locate the sampling point (loc_x, loc_y) on a level of size height x width and fill `s` when
// the result is kInside.
template <typename acc_t>
SDETR_FN SampleStatus bilinear_setup(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                     BilinearSample<acc_t>& s) {
  const acc_t px = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t py = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // v - v is 0 for finite v and NaN for NaN and +-inf: a NaN in the offsets must reach the output
  // and the gradients (grid_sample semantics) instead of reading as "outside" and vanishing.
  if (!((px - px) == acc_t(0) && (py - py) == acc_t(0))) {
    return SampleStatus::kNonFinite;
  }
  if (!(px > acc_t(-1) && py > acc_t(-1) && px < static_cast<acc_t>(width) &&
        py < static_cast<acc_t>(height))) {
    return SampleStatus::kOutside;
  }
  const acc_t x0f = sdetr_floor(px);
  const acc_t y0f = sdetr_floor(py);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y0 = static_cast<int64_t>(y0f);
  s.fx = px - x0f;
  s.fy = py - y0f;
  const acc_t gx = acc_t(1) - s.fx;
  const acc_t gy = acc_t(1) - s.fy;

  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 < width;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 < height;
  s.index[0] = (y0_in && x0_in) ? y0 * width + x0 : -1;
  s.index[1] = (y0_in && x1_in) ? y0 * width + x0 + 1 : -1;
  s.index[2] = (y1_in && x0_in) ? (y0 + 1) * width + x0 : -1;
  s.index[3] = (y1_in && x1_in) ? (y0 + 1) * width + x0 + 1 : -1;
  s.weight[0] = gy * gx;
  s.weight[1] = gy * s.fx;
  s.weight[2] = s.fy * gx;
  s.weight[3] = s.fy * s.fx;
  return SampleStatus::kInside;
}

// A non-finite sample (kNonFinite): its value is NaN in every channel, and so are the gradients
// w.r.t. its attention weight and both location coordinates; it adds nothing to grad_value (no
// corner is known), as in grid_sample's backward.
template <typename acc_t>
SDETR_FN void nonfinite_sample_backward(acc_t& grad_attn, acc_t& grad_x, acc_t& grad_y) {
  grad_attn = sdetr_nan<acc_t>();
  grad_x = sdetr_nan<acc_t>();
  grad_y = sdetr_nan<acc_t>();
}

// True when every corner is inside the map (the common case, which the CPU kernel fuses).
template <typename acc_t>
SDETR_FN bool all_corners_inside(const BilinearSample<acc_t>& s) {
  return s.index[0] >= 0 && s.index[3] >= 0;  // corner 0 and 3 inside => 1 and 2 inside too
}

// Value of corner k for one channel. `base` points at channel c of pixel 0 of the level, and
// consecutive pixels are `pixel_stride` elements apart (H * C for the (N, S, H, C) value layout).
template <typename scalar_t, typename acc_t>
SDETR_FN acc_t corner_value(const BilinearSample<acc_t>& s, int k, const scalar_t* base,
                            int64_t pixel_stride) {
  return s.index[k] < 0 ? acc_t(0) : static_cast<acc_t>(base[s.index[k] * pixel_stride]);
}

// Bilinearly interpolated value of one channel (zeros outside the map).
template <typename scalar_t, typename acc_t>
SDETR_FN acc_t bilinear_sample(const BilinearSample<acc_t>& s, const scalar_t* base,
                               int64_t pixel_stride) {
  acc_t out = acc_t(0);
SDETR_UNROLL
  for (int k = 0; k < 4; ++k) {
    out += s.weight[k] * corner_value<scalar_t, acc_t>(s, k, base, pixel_stride);
  }
  return out;
}

// Gradients of one sample's contribution `attn * sample(loc)` to the output.
//
// `dot[k]` is <grad_output, value at corner k> over the channels the caller handles (one channel in
// the default CUDA pair, a vector of channels in the fast one, all C channels on the CPU; 0 for
// corners outside the map). Every result below is linear in `dot`, so partial sums over channels
// can be reduced before or after the call: that is what lets the same function serve all kernels.
//   grad_attn = d/d attn            = sum_k w_k dot_k                       (the sampled value)
//   grad_x    = d/d loc_x = attn * W * d sample/d px, with
//               d sample/d px = (1 - fy) (v01 - v00) + fy (v11 - v10)
//   grad_y    = d/d loc_y = attn * H * ((1 - fx) (v10 - v00) + fx (v11 - v01))
// The gradient w.r.t. the value of corner k is attn * weight[k] * grad_output (see value_grad_scale).
template <typename acc_t>
SDETR_FN void bilinear_backward(const BilinearSample<acc_t>& s, const acc_t dot[4], acc_t attn,
                                int64_t height, int64_t width, acc_t& grad_attn, acc_t& grad_x,
                                acc_t& grad_y) {
  grad_attn = s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] +
              s.weight[3] * dot[3];
  const acc_t d_px = (acc_t(1) - s.fy) * (dot[1] - dot[0]) + s.fy * (dot[3] - dot[2]);
  const acc_t d_py = (acc_t(1) - s.fx) * (dot[2] - dot[0]) + s.fx * (dot[3] - dot[1]);
  grad_x = attn * static_cast<acc_t>(width) * d_px;
  grad_y = attn * static_cast<acc_t>(height) * d_py;
}

// Factor by which grad_output is scaled before it is added to the value gradient of corner k.
template <typename acc_t>
SDETR_FN acc_t value_grad_scale(const BilinearSample<acc_t>& s, int k, acc_t attn) {
  return attn * s.weight[k];
}

}  // namespace sparse_detr
