"""Training of torchvision detectors with DBF, the feature cache and Dynamic R-CNN."""

from dbf_ext.train.augment import KeyedFlipDataset, flip_boxes
from dbf_ext.train.loop import (
    SCHEDULES,
    EpochRecord,
    TrainConfig,
    TrainResult,
    evaluate,
    parse_cache_spec,
    parse_size,
    plot_history,
    summary_rows,
    train,
)
from dbf_ext.train.model import MODELS, build_detector

__all__ = [
    "MODELS",
    "SCHEDULES",
    "EpochRecord",
    "KeyedFlipDataset",
    "TrainConfig",
    "TrainResult",
    "build_detector",
    "evaluate",
    "flip_boxes",
    "parse_cache_spec",
    "parse_size",
    "plot_history",
    "summary_rows",
    "train",
]
