// Axis-aligned boxes (x1, y1, x2, y2) shared by the CPU and CUDA kernels (host+device inline).
//
// The overlap arithmetic is mmdetection's (bbox_overlaps): area = (x2 - x1) * (y2 - y1) without
// the legacy +1, an intersection of non-positive width or height is empty, and the denominator
// is at least 1e-6. The operations and their order are those of torchvision.ops.box_iou as well,
// so both give bit-identical IoU wherever the union exceeds 1e-6 (every box of at least a
// thousandth of a pixel). Unlike both, non-numbers give 0 instead of NaN.
#pragma once

#include "common/geometry.h"
#include "common/macros.h"

namespace dbf_ext {
namespace geometry {

template <typename T>
struct AxisAlignedBox {
  T x1, y1, x2, y2;
  T area;  // (x2 - x1) * (y2 - y1), as mmdetection and torchvision compute it
};

template <typename T>
DBF_HOST_DEVICE T min_value(T a, T b) {
  return b < a ? b : a;
}

// Reads box `index` of a strided (N, 4) array.
template <typename T>
DBF_HOST_DEVICE AxisAlignedBox<T> load_axis_aligned_box(const T* data, long long index,
                                                        long long row_stride,
                                                        long long col_stride) {
  const T* row = data + index * row_stride;
  AxisAlignedBox<T> box;
  box.x1 = row[0];
  box.y1 = row[col_stride];
  box.x2 = row[2 * col_stride];
  box.y2 = row[3 * col_stride];
  box.area = (box.x2 - box.x1) * (box.y2 - box.y1);
  return box;
}

// A box that can overlap anything: positive, finite width and height (false when a coordinate
// is NaN or infinite). Any overlap of a box that fails this is 0: comparisons drop NaN
// operands (min/max return the other one), so without this test a NaN box would take the
// other box's extent and overlap it.
template <typename T>
DBF_HOST_DEVICE bool has_positive_extent(const AxisAlignedBox<T>& box) {
  const T w = box.x2 - box.x1;
  const T h = box.y2 - box.y1;
  return w > T(0) && h > T(0) && is_finite(w) && is_finite(h);
}

constexpr double kAxisAlignedMinDenominator = 1e-6;

// IoU (iof = false) or intersection over the area of a (iof = true). In [0, 1], never NaN.
template <typename T>
DBF_HOST_DEVICE T axis_aligned_overlap(const AxisAlignedBox<T>& a, const AxisAlignedBox<T>& b,
                                       bool iof) {
  if (!has_positive_extent(a) || !has_positive_extent(b)) return T(0);
  const T w = min_value(a.x2, b.x2) - max_value(a.x1, b.x1);
  const T h = min_value(a.y2, b.y2) - max_value(a.y1, b.y1);
  if (!(w > T(0) && h > T(0))) return T(0);
  const T inter = w * h;
  const T denominator = iof ? a.area : a.area + b.area - inter;
  const T ratio = inter / max_value(denominator, T(kAxisAlignedMinDenominator));
  if (!(ratio > T(0))) return T(0);  // also maps NaN (infinite coordinates) to 0
  return ratio < T(1) ? ratio : T(1);
}

}  // namespace geometry
}  // namespace dbf_ext
