"""Label assignment: fused MaxIoU assignment (axis-aligned and rotated boxes) and Dynamic R-CNN.

* :func:`max_iou_assign`, :func:`batched_max_iou_assign` -> :class:`AssignResult`:
  mmdetection's MaxIoUAssigner without the overlap matrix (kernels in csrc/assign/), its
  options checked once in a :class:`MaxIoUAssignOptions`.
* :class:`DynamicRCNNController`: Dynamic R-CNN's IoU-threshold and SmoothL1-beta schedule.
* :class:`DynamicSmoothL1Loss`: SmoothL1 whose beta follows the controller.
"""

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.assign.losses import DynamicSmoothL1Loss
from dbf_ext.assign.max_iou import AssignResult, batched_max_iou_assign, max_iou_assign
from dbf_ext.ops.max_iou_assign import MaxIoUAssignOptions

__all__ = [
    "AssignResult",
    "DynamicRCNNController",
    "DynamicSmoothL1Loss",
    "MaxIoUAssignOptions",
    "batched_max_iou_assign",
    "max_iou_assign",
]
