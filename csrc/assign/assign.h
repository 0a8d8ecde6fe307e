// Fused, batched MaxIoU label assignment: mmdetection's MaxIoUAssigner.assign_wrt_overlaps
// without the (num_gts, num_boxes) overlap matrix. Semantics: docs/design.md and
// dbf_ext/assign/max_iou.py.
//
// Images are packed: the boxes of image i are rows [box_offsets[i], box_offsets[i + 1]) of
// `boxes`, and likewise for the gt boxes and the ignore boxes. Indices written to gt_inds are
// local to the image (k > 0 means the image's gt k - 1). All pointers are on the device that
// runs the kernel (host memory for the CPU kernel).
#pragma once
#include <cstdint>
#include <utility>

#include "common/types.h"

namespace dbf_ext {

// Box layouts, exported to Python as _C.BOX_KIND_CODES.
enum class BoxKind : int { Horizontal = 0, Rotated = 1 };

// MaxIoUAssigner's options: the fields of the Python dataclass MaxIoUAssignOptions
// (dbf_ext/ops/max_iou_assign.py, which states their meaning) under the same names; Python fills
// this struct field by field from it.
struct MaxIouAssignOptions {
  double pos_iou_thr = 0.5;
  std::pair<double, double> neg_iou_thr{0.0, 0.5};  // (lo, hi): lo <= max overlap < hi
  double min_pos_iou = 0.0;
  bool gt_max_assign_all = true;
  bool match_low_quality = true;
  double ignore_iof_thr = -1.0;  // a box is ignored when its max iof exceeds this
  bool ignore_wrt_candidates = true;
};

struct MaxIouAssignArgs {
  int box_kind = 0;  // BoxKind code: 0 = (x1, y1, x2, y2), 1 = (cx, cy, w, h, theta) clockwise
  int dtype = 0;     // DType code of every box array, of max_overlaps and of the scratch gt_max
  std::int64_t num_images = 0;
  BoxArrayView boxes{};
  BoxArrayView gts{};
  BoxArrayView ignore{};
  std::uintptr_t box_offsets = 0;        // int64 (num_images + 1)
  std::uintptr_t gt_offsets = 0;         // int64 (num_images + 1)
  std::uintptr_t ignore_offsets = 0;     // int64 (num_images + 1); 0 = no box is ignored
  std::int64_t max_boxes_per_image = 0;  // sizes the CUDA grids
  std::int64_t max_gts_per_image = 0;
  std::uintptr_t gt_labels = 0;  // int64 (total gts); 0 = no labels are written

  MaxIouAssignOptions options{};

  std::uintptr_t gt_inds = 0;       // int64 (total boxes), written
  std::uintptr_t max_overlaps = 0;  // dtype (total boxes), written
  std::uintptr_t labels = 0;        // int64 (total boxes), written when gt_labels is given
  std::uintptr_t topk = 0;          // int64 (num_images): k per image, or 0 for no statistic
  std::uintptr_t kth_largest = 0;   // dtype (num_images): the k-th largest max overlap, NaN
                                    // where k is outside [1, boxes of the image]

  // CUDA only: scratch allocated by the caller (the CPU kernel allocates its own).
  std::uintptr_t gt_max = 0;            // dtype (total gts), zero-filled
  std::uintptr_t gt_argmax_box = 0;     // int64 (total gts), filled with INT64_MAX; needed when
                                        // match_low_quality and not gt_max_assign_all
  std::uintptr_t image_first_live = 0;  // int64 (num_images), filled with INT64_MAX
};

void max_iou_assign_cpu(const MaxIouAssignArgs& args, int num_threads);

#if defined(DBF_EXT_WITH_CUDA)
void max_iou_assign_cuda(const MaxIouAssignArgs& args, int device, std::uintptr_t stream);
#endif

}  // namespace dbf_ext
