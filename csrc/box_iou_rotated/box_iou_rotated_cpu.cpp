#include "box_iou_rotated/box_iou_rotated.h"

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

template <typename T>
void run(const BoxIouRotatedArgs& args, int num_threads) {
  const auto p1 = prepare_all<T>(args.boxes1, args.clockwise, num_threads);
  const auto p2 = prepare_all<T>(args.boxes2, args.clockwise, num_threads);
  T* out = reinterpret_cast<T*>(args.out);
  const bool iof = args.iof;
  if (args.aligned) {
    parallel_for(args.boxes1.count, 2048, num_threads, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) out[i] = geometry::overlap_ratio(p1[i], p2[i], iof);
    });
    return;
  }
  const std::int64_t m = args.boxes2.count;
  // Rows are handed out in chunks of ~16k pairs: small enough to balance dense and empty rows.
  const std::int64_t rows_per_chunk = m > 0 ? std::max<std::int64_t>(1, 16384 / m) : 1;
  parallel_for(args.boxes1.count, rows_per_chunk, num_threads,
               [&](std::int64_t begin, std::int64_t end) {
                 for (std::int64_t i = begin; i < end; ++i) {
                   const PreparedBox<T> a = p1[i];
                   T* row = out + i * m;
                   for (std::int64_t j = 0; j < m; ++j) {
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
