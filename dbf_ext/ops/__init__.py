"""Torch-facing operators (``torch.library`` custom ops in the ``dbf_ext`` namespace)."""

from dbf_ext.ops.box_iou_rotated import box_iou_rotated

__all__ = ["box_iou_rotated"]
