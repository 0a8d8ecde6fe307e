"""Every wrapper of a compiled kernel (``torch.library`` custom ops in the ``dbf_ext`` namespace).

Exported here: the operators whose public home is this package. The MaxIoU assignment
(:mod:`dbf_ext.ops.max_iou_assign`) and the feature cache's pack / unpack kernels
(:mod:`dbf_ext.ops.feature_cache`) are used through :mod:`dbf_ext.assign` and
:mod:`dbf_ext.cache`.
"""

from dbf_ext.ops.box_iou_rotated import box_iou_rotated
from dbf_ext.ops.mask_to_obb import mask_to_obb
from dbf_ext.ops.nms_rotated import batched_nms_rotated, multiclass_nms_rotated, nms_rotated
from dbf_ext.ops.roi_align_rotated import MultiScaleRoIAlignRotated, roi_align_rotated

__all__ = [
    "MultiScaleRoIAlignRotated",
    "batched_nms_rotated",
    "box_iou_rotated",
    "mask_to_obb",
    "multiclass_nms_rotated",
    "nms_rotated",
    "roi_align_rotated",
]
