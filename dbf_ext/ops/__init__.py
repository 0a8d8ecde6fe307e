"""Torch-facing operators (``torch.library`` custom ops in the ``dbf_ext`` namespace)."""

from dbf_ext.ops.box_iou_rotated import box_iou_rotated
from dbf_ext.ops.nms_rotated import batched_nms_rotated, multiclass_nms_rotated, nms_rotated

__all__ = ["batched_nms_rotated", "box_iou_rotated", "multiclass_nms_rotated", "nms_rotated"]
