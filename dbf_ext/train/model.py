"""The detectors moved to :mod:`dbf_ext.models`; their names stay importable from here for the
training modules and for code written against ``dbf_ext.train.model``."""

from dbf_ext.models import (
    MODELS,
    SWIN_STAGES,
    SwinBackboneWithFPN,
    SwinTrunk,
    build_detector,
    load_backbone_weights,
    pretrained_weights_path,
    tiny_trunk,
)

__all__ = [
    "MODELS",
    "SWIN_STAGES",
    "SwinBackboneWithFPN",
    "SwinTrunk",
    "build_detector",
    "load_backbone_weights",
    "pretrained_weights_path",
    "tiny_trunk",
]
