// Rotated RoI Align: the (K, C, PH, PW) average of bilinear samples of a (B, C, H, W) map over
// each rotated RoI's PH x PW bins, and its gradient w.r.t. the map. Semantics are mmcv's
// RoIAlignRotated (docs of dbf_ext/ops/roi_align_rotated.py, /DESIGN.md section 3):
//
//  * RoI k is (batch index, cx, cy, w, h, theta) in input pixels, theta in radians. Scaled by
//    spatial_scale; with `aligned` the centre moves by -0.5 (pixel centres at integers), without
//    it w and h are raised to at least 1.
//  * A point (xx, yy) of the RoI frame (centre at the origin, w along xx) lies at
//    (cx + xx cos t - yy sin t, cy + xx sin t + yy cos t), t = theta with `clockwise`, -theta
//    without.
//  * Bin (ph, pw) averages a grid_h x grid_w grid of samples at
//    xx = -w/2 + pw * w/PW + (ix + 0.5) * (w/PW) / grid_w (yy likewise); grid sides are
//    sampling_ratio, or ceil(h / PH) and ceil(w / PW) when it is 0. An empty grid gives 0.
//  * A sample outside [-1, H] x [-1, W] (or not a number) contributes 0; others are clamped to
//    the map and interpolated bilinearly (torchvision's roi_align rule).
//
// The Python layer checks the RoIs (finite, integral batch index in range); the kernels still
// never read outside the map: a RoI failing those checks samples nothing (zeros, no gradient).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/geometry.h"
#include "common/macros.h"
#include "common/types.h"

namespace dbf_ext {

// What the forward and backward passes share: the map's extent, the RoIs and the options.
struct RoiAlignRotatedGeometry {
  std::uintptr_t rois;  // (K, 6) contiguous, in the compute type
  std::int64_t num_rois;
  std::int64_t batch, channels, height, width;  // of the feature map
  std::int64_t pooled_height, pooled_width;
  double spatial_scale;
  std::int64_t sampling_ratio;  // samples per bin side; 0: adaptive
  bool aligned;
  bool clockwise;
};

struct RoiAlignRotatedForwardArgs {
  RoiAlignRotatedGeometry geometry;
  std::uintptr_t features;  // (B, C, H, W), strided, in features_dtype
  DType features_dtype;     // float64 is computed in float64, the others in float32
  std::int64_t stride_n, stride_c, stride_h, stride_w;  // in elements
  std::uintptr_t output;  // (K, C, PH, PW) contiguous, in the compute type
};

struct RoiAlignRotatedBackwardArgs {
  RoiAlignRotatedGeometry geometry;
  DType dtype;                   // the compute type: float32 or float64
  std::uintptr_t grad_output;    // (K, C, PH, PW) contiguous
  std::uintptr_t grad_features;  // (B, C, H, W) contiguous, zeroed by the caller; accumulated
};

// The CPU backward pass is deterministic: threads own disjoint channel ranges and add the
// samples of every RoI in one fixed order (RoIs in order, then for_each_tap's order).
void roi_align_rotated_forward_cpu(const RoiAlignRotatedForwardArgs& args, int num_threads);
void roi_align_rotated_backward_cpu(const RoiAlignRotatedBackwardArgs& args, int num_threads);

#if defined(DBF_EXT_WITH_CUDA)
void roi_align_rotated_forward_cuda(const RoiAlignRotatedForwardArgs& args, int device,
                                    std::uintptr_t stream);
// deterministic = false: one thread per output value adds its samples with float atomics
// (fast; the order of the additions, so the last bits, vary between runs). true: one thread per
// channel runs the CPU pass's loop (same additions in a fixed order; far less parallel).
void roi_align_rotated_backward_cuda(const RoiAlignRotatedBackwardArgs& args, bool deterministic,
                                     int device, std::uintptr_t stream);
#endif

namespace roi_align {

// Grid sides above this are cut to it: it keeps the float-to-integer conversion defined for
// absurd RoI sizes (a bin would have to be over a million pixels across for it to matter).
constexpr std::int64_t kMaxGridSide = std::int64_t{1} << 20;

DBF_HOST_DEVICE float ceil_value(float v) {
#if defined(__CUDA_ARCH__)
  return ceilf(v);
#else
  return std::ceil(v);
#endif
}

DBF_HOST_DEVICE double ceil_value(double v) {
#if defined(__CUDA_ARCH__)
  return ceil(v);
#else
  return std::ceil(v);
#endif
}

// One RoI in feature-map coordinates, computed once per RoI (per thread on CUDA).
template <typename T>
struct RoiFrame {
  bool samples;  // false: the RoI failed the checks and contributes nothing
  std::int64_t batch_index;
  T center_x, center_y;  // with the aligned shift
  T start_x, start_y;    // the RoI frame's corner: -w/2, -h/2
  T bin_w, bin_h;
  T cos_t, sin_t;  // the rotation, convention applied
  std::int64_t grid_h, grid_w;
  T count;  // samples averaged per bin, at least 1
};

template <typename T>
DBF_HOST_DEVICE std::int64_t grid_side(std::int64_t sampling_ratio, T roi_side,
                                       std::int64_t pooled_side) {
  if (sampling_ratio > 0) return sampling_ratio;
  const T cells = ceil_value(roi_side / static_cast<T>(pooled_side));
  if (!(cells > T(0))) return 0;
  return cells < static_cast<T>(kMaxGridSide) ? static_cast<std::int64_t>(cells) : kMaxGridSide;
}

template <typename T>
DBF_HOST_DEVICE RoiFrame<T> load_roi(const T* rois, std::int64_t k,
                                     const RoiAlignRotatedGeometry& g) {
  using geometry::is_finite;
  const T* roi = rois + 6 * k;
  RoiFrame<T> f{};
  const T batch = roi[0];
  f.samples = batch >= T(0) && batch < static_cast<T>(g.batch) &&
              static_cast<T>(static_cast<std::int64_t>(batch)) == batch && is_finite(roi[1]) &&
              is_finite(roi[2]) && is_finite(roi[3]) && is_finite(roi[4]) && is_finite(roi[5]);
  f.count = T(1);
  if (!f.samples) return f;
  f.batch_index = static_cast<std::int64_t>(batch);
  const T scale = static_cast<T>(g.spatial_scale);
  const T shift = g.aligned ? T(0.5) : T(0);
  f.center_x = roi[1] * scale - shift;
  f.center_y = roi[2] * scale - shift;
  T width = roi[3] * scale;
  T height = roi[4] * scale;
  if (!g.aligned) {  // mmcv's legacy mode: degenerate RoIs become 1 x 1
    width = geometry::max_value(width, T(1));
    height = geometry::max_value(height, T(1));
  }
  T sin_theta, cos_theta;
  geometry::sin_cos(roi[5], &sin_theta, &cos_theta);
  f.cos_t = cos_theta;
  f.sin_t = g.clockwise ? sin_theta : -sin_theta;
  f.start_x = -width / T(2);
  f.start_y = -height / T(2);
  f.bin_w = width / static_cast<T>(g.pooled_width);
  f.bin_h = height / static_cast<T>(g.pooled_height);
  f.grid_h = grid_side(g.sampling_ratio, height, g.pooled_height);
  f.grid_w = grid_side(g.sampling_ratio, width, g.pooled_width);
  const std::int64_t samples = f.grid_h * f.grid_w;
  f.count = samples > 0 ? static_cast<T>(samples) : T(1);
  return f;
}

// Map coordinates (x, y) of sample (iy, ix) of bin (ph, pw).
template <typename T>
DBF_HOST_DEVICE void sample_point(const RoiFrame<T>& f, std::int64_t ph, std::int64_t pw,
                                  std::int64_t iy, std::int64_t ix, T* x, T* y) {
  const T yy = f.start_y + static_cast<T>(ph) * f.bin_h +
               (static_cast<T>(iy) + T(0.5)) * f.bin_h / static_cast<T>(f.grid_h);
  const T xx = f.start_x + static_cast<T>(pw) * f.bin_w +
               (static_cast<T>(ix) + T(0.5)) * f.bin_w / static_cast<T>(f.grid_w);
  *x = f.center_x + xx * f.cos_t - yy * f.sin_t;
  *y = f.center_y + xx * f.sin_t + yy * f.cos_t;
}

// The four pixels a sample interpolates (offsets into a plane with the given strides, order
// (low y, low x), (low y, high x), (high y, low x), (high y, high x)) and their weights.
template <typename T>
struct BilinearTap {
  std::int64_t offset[4];
  T weight[4];
};

// False when the sample contributes nothing: outside [-1, H] x [-1, W], not a number, or the map
// is empty. Otherwise coordinates below 0 are raised to 0 and those past the last pixel are
// held on it.
template <typename T>
DBF_HOST_DEVICE bool bilinear_tap(T x, T y, std::int64_t height, std::int64_t width,
                                  std::int64_t stride_h, std::int64_t stride_w,
                                  BilinearTap<T>* tap) {
  if (!(y >= T(-1) && y <= static_cast<T>(height) && x >= T(-1) && x <= static_cast<T>(width)) ||
      height <= 0 || width <= 0) {
    return false;
  }
  y = geometry::max_value(y, T(0));
  x = geometry::max_value(x, T(0));
  std::int64_t y_low = static_cast<std::int64_t>(y);
  std::int64_t x_low = static_cast<std::int64_t>(x);
  std::int64_t y_high = y_low + 1;
  std::int64_t x_high = x_low + 1;
  if (y_low >= height - 1) {
    y_low = y_high = height - 1;
    y = static_cast<T>(y_low);
  }
  if (x_low >= width - 1) {
    x_low = x_high = width - 1;
    x = static_cast<T>(x_low);
  }
  const T ly = y - static_cast<T>(y_low);
  const T lx = x - static_cast<T>(x_low);
  const T hy = T(1) - ly;
  const T hx = T(1) - lx;
  tap->offset[0] = y_low * stride_h + x_low * stride_w;
  tap->offset[1] = y_low * stride_h + x_high * stride_w;
  tap->offset[2] = y_high * stride_h + x_low * stride_w;
  tap->offset[3] = y_high * stride_h + x_high * stride_w;
  tap->weight[0] = hy * hx;
  tap->weight[1] = hy * lx;
  tap->weight[2] = ly * hx;
  tap->weight[3] = ly * lx;
  return true;
}

// The interpolated value of a plane of `Format` elements at a tap.
template <typename Format, typename T>
DBF_HOST_DEVICE T interpolate(const typename Format::bits* plane, const BilinearTap<T>& tap) {
  T value = T(0);
  for (int i = 0; i < 4; ++i) {
    value += tap.weight[i] * static_cast<T>(Format::decode(plane[tap.offset[i]]));
  }
  return value;
}

// Calls fn(tap) for every sample of bin (ph, pw) of RoI frame f that contributes, in row-major
// order.
template <typename T, typename Fn>
DBF_HOST_DEVICE void for_each_bin_tap(const RoiFrame<T>& f, const RoiAlignRotatedGeometry& g,
                                      std::int64_t ph, std::int64_t pw, std::int64_t stride_h,
                                      std::int64_t stride_w, const Fn& fn) {
  if (!f.samples) return;
  for (std::int64_t iy = 0; iy < f.grid_h; ++iy) {
    for (std::int64_t ix = 0; ix < f.grid_w; ++ix) {
      T x, y;
      sample_point(f, ph, pw, iy, ix, &x, &y);
      BilinearTap<T> tap;
      if (bilinear_tap(x, y, g.height, g.width, stride_h, stride_w, &tap)) fn(tap);
    }
  }
}

// Calls fn(ph, pw, tap) for every contributing sample of every bin, bins in row-major order:
// the one order in which the CPU passes and the deterministic CUDA backward add samples.
template <typename T, typename Fn>
DBF_HOST_DEVICE void for_each_tap(const RoiFrame<T>& f, const RoiAlignRotatedGeometry& g,
                                  std::int64_t stride_h, std::int64_t stride_w, const Fn& fn) {
  for (std::int64_t ph = 0; ph < g.pooled_height; ++ph) {
    for (std::int64_t pw = 0; pw < g.pooled_width; ++pw) {
      for_each_bin_tap(f, g, ph, pw, stride_h, stride_w,
                       [&](const BilinearTap<T>& tap) { fn(ph, pw, tap); });
    }
  }
}

}  // namespace roi_align
}  // namespace dbf_ext
