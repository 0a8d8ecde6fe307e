// What the CPU and CUDA assignment kernels share (host+device inline): the two box layouts
// behind one interface, and the threshold rules of MaxIoUAssigner.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "assign/assign.h"
#include "common/geometry.h"
#include "common/hbb_geometry.h"
#include "common/macros.h"
#include "common/types.h"

namespace dbf_ext {
namespace assign {

// Conservative axis-aligned bounds of a box: two boxes whose overlap can be positive have
// intersecting bounds (used by the CPU's spatial grid).
template <typename T>
struct Bounds {
  T x0, y0, x1, y1;
};

// (x1, y1, x2, y2) boxes with mmdetection's arithmetic (common/hbb_geometry.h).
template <typename T>
struct HorizontalBoxes {
  using Scalar = T;
  using Box = geometry::AxisAlignedBox<T>;

  static DBF_HOST_DEVICE Box load(const T* data, long long index, long long row_stride,
                                  long long col_stride) {
    return geometry::load_axis_aligned_box(data, index, row_stride, col_stride);
  }
  static DBF_HOST_DEVICE T overlap(const Box& a, const Box& b, bool iof) {
    return geometry::axis_aligned_overlap(a, b, iof);
  }
  static DBF_HOST_DEVICE bool can_overlap(const Box& box) {
    return geometry::has_positive_extent(box);
  }
  // A positive intersection needs max(x1) < min(x2) exactly: the corners are the bounds.
  static DBF_HOST_DEVICE Bounds<T> bounds(const Box& box) {
    return Bounds<T>{box.x1, box.y1, box.x2, box.y2};
  }
};

// (cx, cy, w, h, theta) boxes, clockwise (mmrotate): the arithmetic of box_iou_rotated.
template <typename T>
struct RotatedBoxes {
  using Scalar = T;
  using Box = geometry::PreparedBox<T>;

  static DBF_HOST_DEVICE Box load(const T* data, long long index, long long row_stride,
                                  long long col_stride) {
    return geometry::load_box(data, index, row_stride, col_stride, /*clockwise=*/true);
  }
  static DBF_HOST_DEVICE T overlap(const Box& a, const Box& b, bool iof) {
    return geometry::overlap_ratio(a, b, iof);
  }
  static DBF_HOST_DEVICE bool can_overlap(const Box& box) { return box.valid; }
  // overlap_ratio rejects a pair when |dcx| > extent_a + extent_b in floating point; the bounds
  // are widened by a margin far above the rounding of that test (and of cx +- extent), so the
  // grid never drops a pair that overlap_ratio would measure.
  static DBF_HOST_DEVICE Bounds<T> bounds(const Box& box) {
    const T slack = T(64) * geometry::NumericTraits<T>::epsilon;
    const T mx = box.extent_x + slack * (geometry::abs_value(box.cx) + box.extent_x);
    const T my = box.extent_y + slack * (geometry::abs_value(box.cy) + box.extent_y);
    return Bounds<T>{box.cx - mx, box.cy - my, box.cx + mx, box.cy + my};
  }
};

// Calls fn(Kind{}) with the box layout and compute type of the arguments.
template <typename F>
void dispatch_box_kind(int box_kind, int dtype, F&& fn) {
  if (box_kind != static_cast<int>(BoxKind::Horizontal) &&
      box_kind != static_cast<int>(BoxKind::Rotated)) {
    throw std::invalid_argument("dbf_ext._C: unsupported box kind " + std::to_string(box_kind));
  }
  dispatch_float(dtype_from_code(dtype), [&](auto zero) {
    using T = decltype(zero);
    if (box_kind == static_cast<int>(BoxKind::Rotated)) {
      fn(RotatedBoxes<T>{});
    } else {
      fn(HorizontalBoxes<T>{});
    }
  });
}

// The thresholds in the compute type: torch compares a float32 tensor with a Python float in
// float32, and mmdetection's comparisons are such tensor-scalar comparisons.
template <typename T>
struct Thresholds {
  T pos, neg_lo, neg_hi, min_pos, ignore_iof;

  static Thresholds from(const MaxIouAssignOptions& options) {
    return Thresholds{static_cast<T>(options.pos_iou_thr),
                      static_cast<T>(options.neg_iou_thr.first),
                      static_cast<T>(options.neg_iou_thr.second),
                      static_cast<T>(options.min_pos_iou), static_cast<T>(options.ignore_iof_thr)};
  }
};

// The overlap of an ignored box with every gt: mmdetection overwrites its overlap column with -1.
template <typename T>
DBF_HOST_DEVICE T ignored_overlap() {
  return T(-1);
}

// gt_inds of a box from its max overlap and the lowest gt index reaching it, before low-quality
// matches: -1 unless negative (0) or positive (gt + 1).
template <typename T>
DBF_HOST_DEVICE std::int64_t threshold_assignment(T max_overlap, std::int64_t argmax_gt,
                                                  const Thresholds<T>& thr) {
  std::int64_t result = -1;
  if (max_overlap >= thr.neg_lo && max_overlap < thr.neg_hi) result = 0;
  if (max_overlap >= thr.pos) result = argmax_gt + 1;
  return result;
}

}  // namespace assign
}  // namespace dbf_ext
