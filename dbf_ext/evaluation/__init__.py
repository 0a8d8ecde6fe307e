"""Mean average precision for rotated and axis-aligned boxes (DOTA devkit / mmrotate rules).

:func:`eval_map` takes mmrotate's ``eval_rbbox_map`` formats; :func:`evaluate_detections`
scores torchvision-style outputs on a :class:`~dbf_ext.data.DotaDetectionDataset`. Rotated
IoU uses the compiled :func:`dbf_ext.ops.box_iou_rotated`; axis-aligned evaluation does not
need the extension.
"""

from .mean_ap import average_precision, box_iou_hbb, detections_by_class, eval_map, evaluate_detections

__all__ = ["average_precision", "box_iou_hbb", "detections_by_class", "eval_map", "evaluate_detections"]
