"""Inference on large aerial images: sliding windows, merging of patch detections.

* :func:`predict_large`: a torchvision-style detector run over overlapping windows of a large
  image (one or more scales), detections mapped back and merged by per-class NMS.
* :func:`merge_patch_results`: the same merge for detections made on split patches elsewhere,
  located by their patch names (:func:`dbf_ext.data.parse_patch_name`).
* :func:`predict_images`: :func:`predict_large` over a folder's images, each read once.
* :func:`draw_detections`: detections drawn on an image.
"""

from dbf_ext.inference.draw import draw_detections
from dbf_ext.inference.merge import MERGE_IOU_THR, merge_detections, merge_patch_results, model_box_type
from dbf_ext.inference.predict import predict_images, predict_large

__all__ = [
    "MERGE_IOU_THR",
    "draw_detections",
    "merge_detections",
    "merge_patch_results",
    "model_box_type",
    "predict_images",
    "predict_large",
]
