"""Training of torchvision detectors with DBF, the feature cache and Dynamic R-CNN."""

from dbf_ext.train.augment import KeyedFlipDataset, flip_boxes
from dbf_ext.train.loop import (
    SCHEDULES,
    CheckpointError,
    EpochRecord,
    TrainConfig,
    TrainResult,
    evaluate,
    load_checkpoint,
    load_model_weights,
    output_console,
    parse_cache_spec,
    parse_size,
    plot_history,
    resolve_device,
    summary_rows,
    train,
)
from dbf_ext.train.model import MODELS, build_detector

__all__ = [
    "MODELS",
    "SCHEDULES",
    "CheckpointError",
    "EpochRecord",
    "KeyedFlipDataset",
    "TrainConfig",
    "TrainResult",
    "build_detector",
    "evaluate",
    "flip_boxes",
    "load_checkpoint",
    "load_model_weights",
    "output_console",
    "parse_cache_spec",
    "parse_size",
    "plot_history",
    "resolve_device",
    "summary_rows",
    "train",
]
