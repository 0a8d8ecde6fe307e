// Rotated-box geometry shared by the CPU and CUDA kernels (host+device inline functions).
//
// Box convention: (cx, cy, w, h, theta), theta in radians. With clockwise=true (mmcv/mmrotate,
// image coordinates with y down) the w edge points along (cos theta, sin theta); clockwise=false
// negates theta.
//
// How the overlap of two boxes a and b is computed, and why it is robust:
//  * Box b is expressed in a's own frame (a's centre at the origin, a's edges on the axes), with
//    every length divided by the largest half-side of the pair. The centre difference is taken
//    before anything else, so boxes far from the origin lose no precision, and after scaling all
//    coordinates are O(1): no overflow for huge boxes, no underflow for tiny ones.
//  * Containment is decided by two exact-form tests; then iof is exactly 1 and IoU is the area
//    ratio, without going through polygon arithmetic.
//  * Otherwise b's rectangle is clipped against a's axis-aligned rectangle by four half-plane
//    clips (Sutherland-Hodgman). There is no sorting of intersection points by angle and no
//    "point inside" tolerance, which are what break the common implementations on
//    near-identical boxes (duplicate points) and on thin boxes.
//  * The result is clamped to [0, 1] and any non-number is mapped to 0.
#pragma once

#include <cfloat>
#include <cmath>

#include "common/macros.h"

namespace dbf_ext {
namespace geometry {

template <typename T>
struct NumericTraits;
template <>
struct NumericTraits<float> {
  static constexpr float min_normal = FLT_MIN;
  static constexpr float epsilon = FLT_EPSILON;
};
template <>
struct NumericTraits<double> {
  static constexpr double min_normal = DBL_MIN;
  static constexpr double epsilon = DBL_EPSILON;
};

template <typename T>
DBF_HOST_DEVICE T abs_value(T x) {
  return x < T(0) ? -x : x;
}

template <typename T>
DBF_HOST_DEVICE T max_value(T a, T b) {
  return a < b ? b : a;
}

// True for finite numbers; false for inf and NaN (x - x is NaN for both).
template <typename T>
DBF_HOST_DEVICE bool is_finite(T x) {
  const T d = x - x;
  return d == d;
}

DBF_HOST_DEVICE void sin_cos(float t, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(t, s, c);
#else
  *s = std::sin(t);
  *c = std::cos(t);
#endif
}

DBF_HOST_DEVICE void sin_cos(double t, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  sincos(t, s, c);
#else
  *s = std::sin(t);
  *c = std::cos(t);
#endif
}

// A box reduced to what pair tests need, computed once per box.
template <typename T>
struct PreparedBox {
  T cx, cy;
  T half_w, half_h;
  T cos_t, sin_t;        // direction of the w edge, convention already applied
  T extent_x, extent_y;  // half sizes of the axis-aligned bounding box, slightly inflated
  bool valid;            // finite, w > 0, h > 0, w*h a normal number
};

template <typename T>
DBF_HOST_DEVICE PreparedBox<T> prepare_box(T cx, T cy, T w, T h, T theta, bool clockwise) {
  PreparedBox<T> box{};
  box.valid = is_finite(cx) && is_finite(cy) && is_finite(w) && is_finite(h) && is_finite(theta) &&
              w > T(0) && h > T(0) && w * h >= NumericTraits<T>::min_normal;
  if (!box.valid) return box;
  T s, c;
  sin_cos(theta, &s, &c);
  box.cx = cx;
  box.cy = cy;
  box.half_w = T(0.5) * w;
  box.half_h = T(0.5) * h;
  box.cos_t = c;
  box.sin_t = clockwise ? s : -s;
  // Inflated so rounding never rejects a pair that overlaps by more than rounding noise.
  const T inflate = T(1) + T(8) * NumericTraits<T>::epsilon;
  box.extent_x = (box.half_w * abs_value(c) + box.half_h * abs_value(s)) * inflate;
  box.extent_y = (box.half_w * abs_value(s) + box.half_h * abs_value(c)) * inflate;
  return box;
}

// Reads box `index` of a strided (N, 5) array.
template <typename T>
DBF_HOST_DEVICE PreparedBox<T> load_box(const T* data, long long index, long long row_stride,
                                        long long col_stride, bool clockwise) {
  const T* row = data + index * row_stride;
  return prepare_box<T>(row[0], row[col_stride], row[2 * col_stride], row[3 * col_stride],
                        row[4 * col_stride], clockwise);
}

template <typename T>
DBF_HOST_DEVICE bool bounding_boxes_overlap(const PreparedBox<T>& a, const PreparedBox<T>& b) {
  return abs_value(a.cx - b.cx) <= a.extent_x + b.extent_x &&
         abs_value(a.cy - b.cy) <= a.extent_y + b.extent_y;
}

// Room for the worst case of four clips of a quadrilateral. In exact arithmetic each clip of a
// convex polygon adds at most one vertex (4 -> 8). With rounding, vertices lying on a clip line
// can alternate sides; a clip of n vertices then yields at most k + 2 min(k, n - k) <= 4n/3
// (k vertices inside), so 4 -> 6 -> 8 -> 10 -> 13.
constexpr int kMaxClippedVertices = 16;

// Keeps the part of the polygon (in_x, in_y, n) where sign * coordinate <= limit, the coordinate
// being x (along_x) or y. Crossings are placed exactly on the clip line.
template <typename T>
DBF_HOST_DEVICE int clip_polygon(const T* in_x, const T* in_y, int n, T* out_x, T* out_y,
                                 bool along_x, T sign, T limit) {
  int m = 0;
  for (int i = 0; i < n; ++i) {
    const int j = (i + 1 == n) ? 0 : i + 1;
    const T qi = sign * (along_x ? in_x[i] : in_y[i]);
    const T qj = sign * (along_x ? in_x[j] : in_y[j]);
    const bool inside_i = qi <= limit;
    const bool inside_j = qj <= limit;
    if (inside_i) {
      out_x[m] = in_x[i];
      out_y[m] = in_y[i];
      ++m;
    }
    if (inside_i != inside_j) {
      // qj - qi is non-zero and has the sign of the crossing: no division by zero.
      const T t = (limit - qi) / (qj - qi);
      if (along_x) {
        out_x[m] = sign * limit;
        out_y[m] = in_y[i] + t * (in_y[j] - in_y[i]);
      } else {
        out_x[m] = in_x[i] + t * (in_x[j] - in_x[i]);
        out_y[m] = sign * limit;
      }
      ++m;
    }
  }
  return m;
}

// Area of a polygon, as a fan of triangles from its first vertex (less cancellation than the
// plain shoelace sum when the polygon sits away from the origin).
template <typename T>
DBF_HOST_DEVICE T polygon_area(const T* x, const T* y, int n) {
  T twice_area = T(0);
  for (int i = 1; i + 1 < n; ++i) {
    twice_area += (x[i] - x[0]) * (y[i + 1] - y[0]) - (x[i + 1] - x[0]) * (y[i] - y[0]);
  }
  return T(0.5) * abs_value(twice_area);
}

// IoU (iof = false) or intersection over the area of a (iof = true) of two prepared boxes.
// Always in [0, 1]; 0 when either box is invalid or they do not overlap.
template <typename T>
DBF_HOST_DEVICE T overlap_ratio(const PreparedBox<T>& a, const PreparedBox<T>& b, bool iof) {
  if (!(a.valid && b.valid) || !bounding_boxes_overlap(a, b)) return T(0);

  const T scale = max_value(max_value(a.half_w, a.half_h), max_value(b.half_w, b.half_h));
  const T inv = T(1) / scale;
  const T aw = a.half_w * inv, ah = a.half_h * inv;
  const T bw = b.half_w * inv, bh = b.half_h * inv;
  const T dx = (b.cx - a.cx) * inv, dy = (b.cy - a.cy) * inv;

  // b's centre (u, v) and w-axis (cr, sr) in a's frame.
  const T u = dx * a.cos_t + dy * a.sin_t;
  const T v = dy * a.cos_t - dx * a.sin_t;
  const T cr = b.cos_t * a.cos_t + b.sin_t * a.sin_t;
  const T sr = b.sin_t * a.cos_t - b.cos_t * a.sin_t;
  const T acr = abs_value(cr), asr = abs_value(sr);

  const T area_a = T(4) * aw * ah;
  const T area_b = T(4) * bw * bh;

  T inter;
  const bool b_inside_a =
      abs_value(u) + bw * acr + bh * asr <= aw && abs_value(v) + bw * asr + bh * acr <= ah;
  // a's centre in b's frame is -(u cr + v sr, v cr - u sr).
  const bool a_inside_b = abs_value(u * cr + v * sr) + aw * acr + ah * asr <= bw &&
                          abs_value(v * cr - u * sr) + aw * asr + ah * acr <= bh;
  if (a_inside_b) {
    if (iof) return T(1);
    inter = area_a;
  } else if (b_inside_a) {
    inter = area_b;
  } else {
    const T ex = bw * cr, ey = bw * sr;   // half w edge of b
    const T fx = -bh * sr, fy = bh * cr;  // half h edge of b
    T px[kMaxClippedVertices], py[kMaxClippedVertices];
    T qx[kMaxClippedVertices], qy[kMaxClippedVertices];
    px[0] = u + ex + fx;
    py[0] = v + ey + fy;
    px[1] = u - ex + fx;
    py[1] = v - ey + fy;
    px[2] = u - ex - fx;
    py[2] = v - ey - fy;
    px[3] = u + ex - fx;
    py[3] = v + ey - fy;
    int n = clip_polygon(px, py, 4, qx, qy, true, T(1), aw);
    n = clip_polygon(qx, qy, n, px, py, true, T(-1), aw);
    n = clip_polygon(px, py, n, qx, qy, false, T(1), ah);
    n = clip_polygon(qx, qy, n, px, py, false, T(-1), ah);
    inter = polygon_area(px, py, n);
    const T smaller = area_a < area_b ? area_a : area_b;
    if (inter > smaller) inter = smaller;
  }

  const T ratio = iof ? inter / area_a : inter / (area_a + area_b - inter);
  if (!(ratio > T(0))) return T(0);  // also maps NaN to 0
  return ratio < T(1) ? ratio : T(1);
}

}  // namespace geometry
}  // namespace dbf_ext
