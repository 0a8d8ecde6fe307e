"""Detectors: torchvision Faster R-CNN variants and Oriented R-CNN, their backbones and parts.

* :func:`build_detector` (names in :data:`MODELS`; :func:`detector_box_type` says ``"hbb"``
  or ``"obb"``), :func:`load_backbone_weights`, :func:`pretrained_weights_path`;
* Oriented R-CNN: :class:`OrientedRCNN` (:class:`RotatedRCNNTransform`, :class:`OrientedRPN`
  with :class:`OrientedRPNHead`, :class:`RotatedRoIHeads` with :class:`RotatedBoxPredictor`)
  and its box coders :class:`MidpointOffsetCoder`, :class:`DeltaXYWHAOBBoxCoder`;
* backbones: :func:`tiny_trunk`, :class:`SwinTrunk`, :class:`SwinBackboneWithFPN` and the
  backbone factories of :mod:`dbf_ext.models.backbones`.
"""

from dbf_ext.models.backbones import SWIN_STAGES, SwinBackboneWithFPN, SwinTrunk, tiny_trunk
from dbf_ext.models.builders import (
    FASTER_RCNN_MODELS,
    MODELS,
    ORIENTED_RCNN_MODELS,
    build_detector,
    detector_box_type,
    load_backbone_weights,
    pretrained_weights_path,
)
from dbf_ext.models.coders import DeltaXYWHAOBBoxCoder, MidpointOffsetCoder
from dbf_ext.models.oriented_rcnn import OrientedRCNN, RotatedRCNNTransform
from dbf_ext.models.oriented_rpn import OrientedRPN, OrientedRPNHead
from dbf_ext.models.rotated_roi_heads import RotatedBoxPredictor, RotatedRoIHeads

__all__ = [
    "FASTER_RCNN_MODELS",
    "MODELS",
    "ORIENTED_RCNN_MODELS",
    "SWIN_STAGES",
    "DeltaXYWHAOBBoxCoder",
    "MidpointOffsetCoder",
    "OrientedRCNN",
    "OrientedRPN",
    "OrientedRPNHead",
    "RotatedBoxPredictor",
    "RotatedRCNNTransform",
    "RotatedRoIHeads",
    "SwinBackboneWithFPN",
    "SwinTrunk",
    "build_detector",
    "detector_box_type",
    "load_backbone_weights",
    "pretrained_weights_path",
    "tiny_trunk",
]
