// Rotated-box IoU: pairwise (N, M) or aligned (N,). Semantics: docs/design.md and
// dbf_ext/ops/box_iou_rotated.py. Output is written in the compute type (float32 or float64).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace dbf_ext {

struct BoxIouRotatedArgs {
  BoxArrayView boxes1;
  BoxArrayView boxes2;
  DType dtype;         // of both inputs and of the output
  std::uintptr_t out;  // contiguous (N, M), or (N,) when aligned
  bool aligned;
  bool iof;  // divide by the area of boxes1 instead of the union
  bool clockwise;
};

void box_iou_rotated_cpu(const BoxIouRotatedArgs& args, int num_threads);

#if defined(DBF_EXT_WITH_CUDA)
void box_iou_rotated_cuda(const BoxIouRotatedArgs& args, int device, std::uintptr_t stream);
#endif

}  // namespace dbf_ext
