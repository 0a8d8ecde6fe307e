#include <cstdint>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "mask_to_obb/mask_to_obb.h"

namespace dbf_ext {
namespace {

// The first nonzero byte of [begin, end), or end. Zero runs are skipped 8 bytes at a time:
// most rows of an instance mask are empty.
const std::uint8_t* first_set(const std::uint8_t* begin, const std::uint8_t* end) {
  for (std::uint64_t word = 0; end - begin >= 8; begin += 8) {
    std::memcpy(&word, begin, 8);
    if (word != 0) break;
  }
  while (begin != end && *begin == 0) ++begin;
  return begin;
}

// One past the last nonzero byte of [begin, end), or begin.
const std::uint8_t* end_of_set(const std::uint8_t* begin, const std::uint8_t* end) {
  for (std::uint64_t word = 0; end - begin >= 8; end -= 8) {
    std::memcpy(&word, end - 8, 8);
    if (word != 0) break;
  }
  while (end != begin && end[-1] == 0) --end;
  return end;
}

// Writes the (begin, end) extents of every row of one mask (see mask_to_obb.h).
void scan_rows(const std::uint8_t* mask, std::int64_t height, std::int64_t width,
               std::int32_t* extents) {
  for (std::int64_t y = 0; y < height; ++y) {
    const std::uint8_t* row = mask + y * width;
    const std::uint8_t* first = first_set(row, row + width);
    const bool empty = first == row + width;
    extents[2 * y] = empty ? 0 : static_cast<std::int32_t>(first - row);
    extents[2 * y + 1] =
        empty ? 0 : static_cast<std::int32_t>(end_of_set(first, row + width) - row);
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
