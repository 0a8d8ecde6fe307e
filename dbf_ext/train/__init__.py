"""Training of torchvision detectors with DBF, the feature cache and Dynamic R-CNN."""

from dbf_ext.train.augment import KeyedFlipDataset, flip_boxes
from dbf_ext.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_detector,
    load_matching_weights,
    load_model_weights,
)
from dbf_ext.train.config import SCHEDULES, TrainConfig, parse_cache_spec, parse_size, resolve_device
from dbf_ext.train.distributed import DistributedContext, RankMismatchError, init_distributed
from dbf_ext.train.engine import (
    EpochTotals,
    evaluate,
    load_dataset,
    model_box_type,
    predict,
    train,
    train_one_epoch,
)
from dbf_ext.train.model import MODELS, build_detector
from dbf_ext.train.report import (
    EpochRecord,
    InitReport,
    TrainResult,
    ValidationExample,
    output_console,
    plot_history,
    summary_rows,
)
from dbf_ext.train.sampler import CacheAffineSampler

__all__ = [
    "MODELS",
    "SCHEDULES",
    "CacheAffineSampler",
    "CheckpointError",
    "DistributedContext",
    "EpochRecord",
    "EpochTotals",
    "InitReport",
    "KeyedFlipDataset",
    "RankMismatchError",
    "TrainConfig",
    "TrainResult",
    "ValidationExample",
    "build_detector",
    "evaluate",
    "flip_boxes",
    "init_distributed",
    "load_checkpoint",
    "load_dataset",
    "load_detector",
    "load_matching_weights",
    "load_model_weights",
    "model_box_type",
    "output_console",
    "parse_cache_spec",
    "parse_size",
    "plot_history",
    "predict",
    "resolve_device",
    "summary_rows",
    "train",
    "train_one_epoch",
]
