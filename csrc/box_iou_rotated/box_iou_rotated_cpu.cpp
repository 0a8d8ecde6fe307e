#include "box_iou_rotated/box_iou_rotated.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/geometry.h"
#include "common/parallel.h"

namespace dbf_ext {
namespace {

using geometry::PreparedBox;

template <typename T>
std::vector<PreparedBox<T>> prepare_all(const BoxArrayView& boxes, bool clockwise,
                                        int num_threads) {
  std::vector<PreparedBox<T>> prepared(static_cast<size_t>(boxes.count));
  const T* data = boxes.ptr<T>();
  parallel_for(boxes.count, 4096, num_threads, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      prepared[i] = geometry::load_box(data, i, boxes.row_stride, boxes.col_stride, clockwise);
    }
  });
  return prepared;
}

// The valid boxes of a set sorted by centre x. A box can only overlap those whose centre x lies
// within its own x extent plus the largest x extent of the set: a binary search finds that
// range, so scattered pairs are never visited (everything outside keeps IoU 0).
template <typename T>
struct SweepIndex {
  std::vector<std::int64_t> order;
  std::vector<T> sorted_cx;
  T max_extent_x = T(0);

  explicit SweepIndex(const std::vector<PreparedBox<T>>& boxes) {
    for (std::int64_t j = 0; j < static_cast<std::int64_t>(boxes.size()); ++j) {
      if (!boxes[j].valid) continue;
      order.push_back(j);
      max_extent_x = std::max(max_extent_x, boxes[j].extent_x);
    }
    std::sort(order.begin(), order.end(),
              [&](std::int64_t x, std::int64_t y) { return boxes[x].cx < boxes[y].cx; });
    sorted_cx.reserve(order.size());
    for (std::int64_t j : order) sorted_cx.push_back(boxes[j].cx);
  }

  // [first, last) of `order` holding every box whose bounds may overlap `a`'s. Widened by a
  // relative margin so rounding in the final bounds test never finds a pair outside it.
  std::pair<std::int64_t, std::int64_t> candidates(const PreparedBox<T>& a) const {
    const T eps = T(16) * geometry::NumericTraits<T>::epsilon;
    const T reach = (a.extent_x + max_extent_x) * (T(1) + eps) + geometry::abs_value(a.cx) * eps;
    const auto lo = std::lower_bound(sorted_cx.begin(), sorted_cx.end(), a.cx - reach);
    const auto hi = std::upper_bound(lo, sorted_cx.end(), a.cx + reach);
    return {lo - sorted_cx.begin(), hi - sorted_cx.begin()};
  }
};

template <typename T>
void run(const BoxIouRotatedArgs& args, int num_threads) {
  const auto p1 = prepare_all<T>(args.boxes1, args.clockwise, num_threads);
  const auto p2 = prepare_all<T>(args.boxes2, args.clockwise, num_threads);
  T* out = reinterpret_cast<T*>(args.out);
  const bool iof = args.iof;
  if (args.aligned) {
    parallel_for(args.boxes1.count, 2048, num_threads, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i)
        out[i] = geometry::overlap_ratio(p1[i], p2[i], iof);
    });
    return;
  }
  const std::int64_t m = args.boxes2.count;
  const SweepIndex<T> index(p2);
  // Rows are handed out in chunks of ~16k pairs: small enough to balance dense and empty rows.
  const std::int64_t rows_per_chunk = m > 0 ? std::max<std::int64_t>(1, 16384 / m) : 1;
  parallel_for(args.boxes1.count, rows_per_chunk, num_threads,
               [&](std::int64_t begin, std::int64_t end) {
                 for (std::int64_t i = begin; i < end; ++i) {
                   const PreparedBox<T> a = p1[i];
                   T* row = out + i * m;
                   std::fill(row, row + m, T(0));
                   if (!a.valid) continue;
                   const auto [first, last] = index.candidates(a);
                   for (std::int64_t k = first; k < last; ++k) {
                     const std::int64_t j = index.order[k];
                     row[j] = geometry::overlap_ratio(a, p2[j], iof);
                   }
                 }
               });
}

}  // namespace

void box_iou_rotated_cpu(const BoxIouRotatedArgs& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto zero) { run<decltype(zero)>(args, num_threads); });
}

}  // namespace dbf_ext
