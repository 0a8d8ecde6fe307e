"""Label assignment: fused MaxIoU assignment (axis-aligned and rotated boxes) and Dynamic R-CNN.

* :func:`max_iou_assign`, :func:`batched_max_iou_assign` -> :class:`AssignResult`:
  mmdetection's MaxIoUAssigner without the overlap matrix (kernels in csrc/assign/), its
  options checked once in a :class:`MaxIoUAssignOptions`.
* :class:`DynamicRCNNController`: Dynamic R-CNN's IoU-threshold and SmoothL1-beta schedule.
* :class:`DynamicSmoothL1Loss`: SmoothL1 whose beta follows the controller.
* :func:`assign_proposals_with_gts`, :func:`fast_rcnn_losses`: the assignment and the losses
  of a two-stage detector's box head, shared by the axis-aligned
  (:class:`~dbf_ext.integrations.torchvision.DynamicRoIHeads`) and rotated
  (:class:`~dbf_ext.models.RotatedRoIHeads`) heads.
"""

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.assign.losses import DynamicSmoothL1Loss, fast_rcnn_losses
from dbf_ext.assign.max_iou import AssignResult, assign_proposals_with_gts, batched_max_iou_assign, max_iou_assign
from dbf_ext.ops.max_iou_assign import MaxIoUAssignOptions

__all__ = [
    "AssignResult",
    "DynamicRCNNController",
    "DynamicSmoothL1Loss",
    "MaxIoUAssignOptions",
    "assign_proposals_with_gts",
    "batched_max_iou_assign",
    "fast_rcnn_losses",
    "max_iou_assign",
]
