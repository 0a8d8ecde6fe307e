#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/parallel.h"
#include "mask_to_obb/mask_to_obb.h"

namespace dbf_ext {
namespace {

// Writes the (begin, end) extents of every row of one mask (see mask_to_obb.h).
void scan_rows(const std::uint8_t* mask, std::int64_t height, std::int64_t width,
               std::int32_t* extents) {
  for (std::int64_t y = 0; y < height; ++y) {
    const std::uint8_t* row = mask + y * width;
    const std::uint8_t* end = row + width;
    const std::uint8_t* first = std::find_if(row, end, [](std::uint8_t v) { return v != 0; });
    if (first == end) {
      extents[2 * y] = extents[2 * y + 1] = 0;
      continue;
    }
    const std::uint8_t* last = end - 1;
    while (*last == 0) --last;  // stops at `first` at the latest
    extents[2 * y] = static_cast<std::int32_t>(first - row);
    extents[2 * y + 1] = static_cast<std::int32_t>(last - row + 1);
  }
}

template <typename T>
void run(const MaskToObbArgs& args, int num_threads) {
  const auto* masks = reinterpret_cast<const std::uint8_t*>(args.masks);
  T* out = reinterpret_cast<T*>(args.out);
  const std::int64_t pixels = args.height * args.width;
  parallel_for(args.count, 1, num_threads, [&](std::int64_t begin, std::int64_t end) {
    std::vector<std::int32_t> extents(static_cast<size_t>(2 * args.height));
    std::vector<std::int32_t> hull(static_cast<size_t>(2 * mask_obb::hull_capacity(args.height)));
    for (std::int64_t i = begin; i < end; ++i) {
      scan_rows(masks + i * pixels, args.height, args.width, extents.data());
      const std::int64_t count =
          mask_obb::hull_from_row_extents(extents.data(), args.height, hull.data());
      if (count == 0) {
        mask_obb::write_empty(out + 5 * i);
        continue;
      }
      std::int64_t best_edge = 0;
      double best_area = 0.0;
      mask_obb::least_area_edge(hull.data(), count, 0, 1, &best_edge, &best_area);
      mask_obb::write_box(hull.data(), count, best_edge, out + 5 * i);
    }
  });
}

}  // namespace

void mask_to_obb_cpu(const MaskToObbArgs& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto zero) { run<decltype(zero)>(args, num_threads); });
}

}  // namespace dbf_ext
