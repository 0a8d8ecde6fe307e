// Greedy non-maximum suppression of rotated boxes, optionally per class. Semantics: docs/design.md
// section 3 and dbf_ext/ops/nms_rotated.py. The caller sorts by score (the order array) and
// allocates the output; the kernels only sweep.
#pragma once
#include <cstdint>

#include "common/geometry.h"
#include "common/types.h"

namespace dbf_ext {

struct NmsRotatedArgs {
  BoxArrayView boxes;     // (N, 5), clockwise convention, in the compute type
  DType dtype;            // of boxes
  std::uintptr_t order;   // int64 (N,): box indices by decreasing score, ties by lower index
  std::uintptr_t labels;  // int64 (N,) class of each box (indexed like boxes), or 0: one class
  double iou_threshold;   // suppress when IoU > iou_threshold
  std::uintptr_t keep;    // int64 (N,) output: kept box indices, by decreasing score
};

template <typename T>
DBF_HOST_DEVICE T min_value(T a, T b) {
  return b < a ? b : a;
}

// True when an upper bound of the IoU of a and b, cheap next to the exact polygon clipping,
// is below the threshold by a relative margin. The bound: IoU <= I / (A + B - I) with
// I = min(area of the intersection of the axis-aligned bounding boxes, smaller area). It rejects
// most pairs that meet only through their bounding boxes or whose areas differ by more than a
// factor 1 / threshold. Lengths are divided by the largest extent of the pair (no overflow for
// huge boxes, as in overlap_ratio); the margin is far above the bound's rounding error, so only
// pairs whose IoU is clearly at most the threshold are rejected. The comparison is strict:
// threshold 0 rejects only pairs whose bounding boxes do not overlap, exactly as overlap_ratio
// returns 0 for them.
template <typename T>
DBF_HOST_DEVICE bool iou_clearly_at_most(const geometry::PreparedBox<T>& a,
                                         const geometry::PreparedBox<T>& b, double threshold) {
  using geometry::abs_value;
  using geometry::max_value;
  const T overlap_x = a.extent_x + b.extent_x - abs_value(a.cx - b.cx);
  const T overlap_y = a.extent_y + b.extent_y - abs_value(a.cy - b.cy);
  if (overlap_x < T(0) || overlap_y < T(0)) return true;  // bounding_boxes_overlap is false
  const T inv =
      T(1) / max_value(max_value(a.extent_x, a.extent_y), max_value(b.extent_x, b.extent_y));
  // The overlap of two intervals is at most the shorter one.
  const T width = min_value(overlap_x, T(2) * min_value(a.extent_x, b.extent_x));
  const T height = min_value(overlap_y, T(2) * min_value(a.extent_y, b.extent_y));
  // Quarter areas (half sides multiplied), scaled by inv^2.
  const T quarter_a = (a.half_w * inv) * (a.half_h * inv);
  const T quarter_b = (b.half_w * inv) * (b.half_h * inv);
  const T inter =
      min_value(T(0.25) * (width * inv) * (height * inv), min_value(quarter_a, quarter_b));
  const T margin = T(1) + T(64) * geometry::NumericTraits<T>::epsilon;
  return inter * margin < static_cast<T>(threshold) * (quarter_a + quarter_b - inter);
}

// The suppression rule, shared by the CPU and CUDA kernels so that both decide alike: a
// candidate is suppressed by a kept (higher-scored) box of its class when their IoU is strictly
// greater than the threshold. The comparison is made in double, as torchvision does, so a
// float32 IoU equal to the float32 rounding of a threshold does not count as above it. Invalid
// boxes have IoU 0 with everything: they are never suppressed and suppress nothing (for the
// thresholds >= 0 that the Python layer admits).
template <typename T>
DBF_HOST_DEVICE bool suppresses(const geometry::PreparedBox<T>& kept,
                                const geometry::PreparedBox<T>& candidate, double iou_threshold) {
  if (!(kept.valid && candidate.valid) || iou_clearly_at_most(kept, candidate, iou_threshold)) {
    return false;
  }
  return static_cast<double>(geometry::overlap_ratio(kept, candidate, false)) > iou_threshold;
}

// Returns the number of kept boxes written to args.keep.
std::int64_t nms_rotated_cpu(const NmsRotatedArgs& args, int num_threads);

#if defined(DBF_EXT_WITH_CUDA)
// Boxes per tile side of the suppression mask = bits per mask word.
constexpr std::int64_t kNmsBlockBoxes = 64;

// Device scratch, allocated by the caller through torch (caching allocator), with
// row_blocks = ceil(N / 64).
struct NmsRotatedCudaScratch {
  std::uintptr_t mask;        // mask_words 64-bit words
  std::int64_t mask_words;    // >= 64 * row_blocks; the upper triangle of the mask needs
                              // 64 * row_blocks * (row_blocks + 1) / 2 words, and is computed in
                              // chunks of rows when the capacity is smaller
  std::uintptr_t removed;     // row_blocks 64-bit words, zeroed
  std::uintptr_t keep_count;  // one int64, zeroed; receives the number of kept boxes
};

// Asynchronous on `stream`: args.keep and scratch.keep_count are final once the stream reaches
// this point. Nothing is copied to the host.
void nms_rotated_cuda(const NmsRotatedArgs& args, const NmsRotatedCudaScratch& scratch, int device,
                      std::uintptr_t stream);
#endif

}  // namespace dbf_ext
