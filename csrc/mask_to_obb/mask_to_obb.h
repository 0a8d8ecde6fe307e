// Instance masks to minimum-area rotated boxes. Semantics: dbf_ext/ops/mask_to_obb.py.
//
// Every set pixel (x, y) is the unit square [x, x+1] x [y, y+1]. The box of a mask is the
// minimum-area rectangle enclosing the union of its squares, which is the minimum-area
// rectangle enclosing their convex hull. How it is computed, exactly and in O(H) memory:
//  * Row extents: for row y, the first set column x0 and one past the last, x1 + 1.
//  * Corner levels: the hull's vertices are pixel corners, which lie on the horizontal lines
//    y = 0..H ("levels"). Level j holds the corners of rows j-1 and j; only its leftmost and its
//    rightmost corner can be hull vertices.
//  * Hull: Andrew's monotone chain, once down the leftmost corners (levels in increasing y) and
//    once up the rightmost corners (decreasing y). The levels come sorted, so no sort is needed;
//    the two chains meet at the top and bottom levels, whose extreme corners are always hull
//    vertices. Orientation tests use 64-bit integer cross products (exact): collinear corners
//    are dropped, so the hull is strictly convex, its first vertex the top level's leftmost.
//  * Rectangle: the minimum-area enclosing rectangle has a side on a hull edge, so each edge
//    direction is tried with the projections of every vertex (exact 64-bit integers), and the
//    area compared in float64. That is O(h^2) for h hull vertices, and a convex lattice polygon
//    in an n x n mask has h = O(n^(2/3)) vertices (at most about 900 at n = 4096): h^2
//    stays below the n^2 bytes read, so no rotating calipers. Ties go to the first edge in hull
//    order: the CPU loop and the CUDA reduction pick the same edge, and both compute the box with
//    the same float64 operations (no FMA contraction in either build), so they agree bit for bit
//    except theta, which comes from the platform's atan2 (within an ulp of float64).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "common/types.h"

namespace dbf_ext {

struct MaskToObbArgs {
  std::uintptr_t masks;  // contiguous (count, height, width) bytes (bool or uint8); nonzero = set
  std::int64_t count;
  std::int64_t height;
  std::int64_t width;
  DType dtype;         // of the output: Float32 or Float64
  std::uintptr_t out;  // contiguous (count, 5): cx, cy, w, h, theta (clockwise); empty mask: NaN
};

// Device scratch, allocated by Python through torch.
struct MaskToObbCudaScratch {
  std::uintptr_t row_extents;  // int32 (count, height, 2)
  std::uintptr_t hull;         // int32 (count, hull_capacity(height), 2)
};

void mask_to_obb_cpu(const MaskToObbArgs& args, int num_threads);

#if defined(DBF_EXT_WITH_CUDA)
void mask_to_obb_cuda(const MaskToObbArgs& args, const MaskToObbCudaScratch& scratch, int device,
                      std::uintptr_t stream);
#endif

namespace mask_obb {

// Mask heights and widths stay below this, so every product of coordinates fits in 64 bits.
constexpr std::int64_t kMaxSide = std::int64_t{1} << 30;

// Hull vertices a mask of `height` rows can have: each chain holds at most one corner per level.
DBF_HOST_DEVICE std::int64_t hull_capacity(std::int64_t height) { return 2 * (height + 1); }

// Row extents are stored as (begin, end) = (x0, x1 + 1); an empty row has end == 0.
DBF_HOST_DEVICE bool row_is_set(const std::int32_t* extents, std::int64_t row) {
  return extents[2 * row + 1] != 0;
}

// The leftmost (or rightmost) corner x on level `level`, from rows level-1 and level; false
// when neither row has a set pixel.
DBF_HOST_DEVICE bool level_extreme(const std::int32_t* extents, std::int64_t height,
                                   std::int64_t level, bool leftmost, std::int32_t* x) {
  bool found = false;
  for (std::int64_t row = level - 1; row <= level; ++row) {
    if (row < 0 || row >= height || !row_is_set(extents, row)) continue;
    const std::int32_t candidate = extents[2 * row + (leftmost ? 0 : 1)];
    if (!found || (leftmost ? candidate < *x : candidate > *x)) *x = candidate;
    found = true;
  }
  return found;
}

// Cross product of (a - o) and (b - o), exact in 64 bits for coordinates below 2^30.
DBF_HOST_DEVICE std::int64_t cross(const std::int32_t* o, const std::int32_t* a,
                                   const std::int32_t* b) {
  return (static_cast<std::int64_t>(a[0]) - o[0]) * (static_cast<std::int64_t>(b[1]) - o[1]) -
         (static_cast<std::int64_t>(a[1]) - o[1]) * (static_cast<std::int64_t>(b[0]) - o[0]);
}

// Appends (x, y) to the chain hull[chain_begin, size), first removing the vertices it makes
// non-convex (a straight or inward turn). Returns the new size.
DBF_HOST_DEVICE std::int64_t push_convex(std::int32_t* hull, std::int64_t chain_begin,
                                         std::int64_t size, std::int32_t x, std::int32_t y) {
  const std::int32_t point[2] = {x, y};
  // Image coordinates (y down): the hull runs down its left side and up its right side, so
  // every turn of a convex chain has a negative cross product.
  while (size - chain_begin >= 2 &&
         cross(hull + 2 * (size - 2), hull + 2 * (size - 1), point) >= 0) {
    --size;
  }
  hull[2 * size] = x;
  hull[2 * size + 1] = y;
  return size + 1;
}

// The strictly convex hull of the pixel squares, as (x, y) vertex pairs in `hull` (capacity
// hull_capacity(height)); returns the vertex count, 0 for an empty mask.
DBF_HOST_DEVICE std::int64_t hull_from_row_extents(const std::int32_t* extents, std::int64_t height,
                                                   std::int32_t* hull) {
  std::int64_t size = 0;
  std::int32_t x = 0;
  for (std::int64_t level = 0; level <= height; ++level) {
    if (level_extreme(extents, height, level, true, &x)) {
      size = push_convex(hull, 0, size, x, static_cast<std::int32_t>(level));
    }
  }
  const std::int64_t right_begin = size;
  for (std::int64_t level = height; level >= 0; --level) {
    if (level_extreme(extents, height, level, false, &x)) {
      size = push_convex(hull, right_begin, size, x, static_cast<std::int32_t>(level));
    }
  }
  return size;
}

// The enclosing rectangle with a side on hull edge `edge` (vertex edge to edge + 1), in the
// edge's frame: projections along the edge direction d (u) and its normal n = (-dy, dx) (v),
// relative to the edge's first vertex, and the squared length of d. Exact integers.
struct EdgeRectangle {
  std::int64_t dx, dy, length_sq;
  std::int64_t u_min, u_max, v_min, v_max;

  DBF_HOST_DEVICE double area() const {
    return static_cast<double>(u_max - u_min) * static_cast<double>(v_max - v_min) /
           static_cast<double>(length_sq);
  }
};

DBF_HOST_DEVICE EdgeRectangle edge_rectangle(const std::int32_t* hull, std::int64_t count,
                                             std::int64_t edge) {
  const std::int32_t* origin = hull + 2 * edge;
  const std::int32_t* next = hull + 2 * ((edge + 1) % count);
  EdgeRectangle r;
  r.dx = static_cast<std::int64_t>(next[0]) - origin[0];
  r.dy = static_cast<std::int64_t>(next[1]) - origin[1];
  r.length_sq = r.dx * r.dx + r.dy * r.dy;
  r.u_min = r.u_max = r.v_min = r.v_max = 0;
  for (std::int64_t k = 0; k < count; ++k) {
    const std::int64_t px = static_cast<std::int64_t>(hull[2 * k]) - origin[0];
    const std::int64_t py = static_cast<std::int64_t>(hull[2 * k + 1]) - origin[1];
    const std::int64_t u = px * r.dx + py * r.dy;
    const std::int64_t v = py * r.dx - px * r.dy;
    r.u_min = u < r.u_min ? u : r.u_min;
    r.u_max = u > r.u_max ? u : r.u_max;
    r.v_min = v < r.v_min ? v : r.v_min;
    r.v_max = v > r.v_max ? v : r.v_max;
  }
  return r;
}

// Among the edges first, first + stride, ... (below count), the one of least rectangle area;
// ties keep the earliest. *edge is -1 when there is none.
DBF_HOST_DEVICE void least_area_edge(const std::int32_t* hull, std::int64_t count,
                                     std::int64_t first, std::int64_t stride, std::int64_t* edge,
                                     double* area) {
  *edge = -1;
  for (std::int64_t e = first; e < count; e += stride) {
    const double a = edge_rectangle(hull, count, e).area();
    if (*edge < 0 || a < *area) {
      *edge = e;
      *area = a;
    }
  }
}

// Writes the rectangle of `edge` as (cx, cy, w, h, theta): w along the edge direction.
template <typename T>
DBF_HOST_DEVICE void write_box(const std::int32_t* hull, std::int64_t count, std::int64_t edge,
                               T* out) {
  const EdgeRectangle r = edge_rectangle(hull, count, edge);
  const double dx = static_cast<double>(r.dx);
  const double dy = static_cast<double>(r.dy);
  const double length_sq = static_cast<double>(r.length_sq);
  const double length = sqrt(length_sq);
  const double u_mid = static_cast<double>(r.u_min + r.u_max);  // twice the centre's u
  const double v_mid = static_cast<double>(r.v_min + r.v_max);
  // centre = origin + (d * u_mid + n * v_mid) / (2 |d|^2), with n = (-dy, dx).
  out[0] = static_cast<T>(hull[2 * edge] + (dx * u_mid - dy * v_mid) / (2.0 * length_sq));
  out[1] = static_cast<T>(hull[2 * edge + 1] + (dy * u_mid + dx * v_mid) / (2.0 * length_sq));
  out[2] = static_cast<T>(static_cast<double>(r.u_max - r.u_min) / length);
  out[3] = static_cast<T>(static_cast<double>(r.v_max - r.v_min) / length);
  out[4] = static_cast<T>(atan2(dy, dx));
}

template <typename T>
DBF_HOST_DEVICE void write_empty(T* out) {
  for (int k = 0; k < 5; ++k) out[k] = static_cast<T>(NAN);
}

}  // namespace mask_obb
}  // namespace dbf_ext
