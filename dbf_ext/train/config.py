"""Training configuration: the options of a run, their parsing (sizes, cache specs) and the device."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from dbf_ext.freeze import (
    AlwaysFrozen,
    EvenInterval,
    FreezeSchedule,
    FrozenAfter,
    FrozenUntil,
    NeverFrozen,
    StepInterval,
)
from dbf_ext.regularizers import DEFAULT_L2_WEIGHT, DEFAULT_VARIANCE_WEIGHT
from dbf_ext.train.model import MODELS, pretrained_weights_path
from dbf_ext.train.sampler import RESHARD_POLICIES

SCHEDULES = ("step-interval", "even-interval", "always-frozen", "never-frozen", "frozen-after",
             "frozen-until")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size(text: str) -> int:
    """``"8GB"``, ``"512MB"``, ``"1.5GB"``, ``"0"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 8GB, 512MB, 0)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_cache_spec(spec: str) -> dict[str, Any]:
    """``"bfloat16:cpu=8GB,gpu=2GB,disk=20GB"`` -> FeatureCache keyword arguments.

    The storage dtype comes first; tiers not named get no budget, except the host tier, which
    gets 4 GB when no tier is named. ``"off"`` or ``"none"`` disables the cache (returns {}).
    """
    if spec.lower() in ("off", "none", ""):
        return {}
    dtype, _, tiers = spec.partition(":")
    options: dict[str, Any] = {"storage_dtype": dtype, "gpu_bytes": 0, "cpu_bytes": 0, "disk_bytes": 0}
    if not tiers:
        options["cpu_bytes"] = 4 << 30
    for part in filter(None, tiers.split(",")):
        tier, _, size = part.partition("=")
        if tier not in ("gpu", "cpu", "disk") or not size:
            raise ValueError(f"cache tier must be gpu=SIZE, cpu=SIZE or disk=SIZE, got {part!r}")
        options[f"{tier}_bytes"] = parse_size(size)
    return options


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (saved in checkpoints and the log)."""

    data: str
    output_dir: str = "dbf_ext_run"
    model: str = "tiny-fpn"
    image_size: int = 192
    epochs: int = 12
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    schedule: str = "step-interval"
    unfrozen_epochs: tuple[int, ...] = (0,)
    step_epoch: int = 5
    freeze_epoch: int = 1  # frozen-after / frozen-until
    cache: str = "bfloat16:cpu=4GB"
    cache_dir: str | None = None
    hflip: float = 0.5
    vflip: float = 0.0  # with hflip: both drawn is the diagonal flip
    dynamic_rcnn: bool = False
    amp: bool = True  # used on GPU only
    device: str = "auto"
    workers: int = 0
    eval_every: int = 0  # 0: evaluate after the last epoch only
    seed: int = 0
    resume: bool = False
    # Weights to start from (a training checkpoint or a state dict): every tensor whose name
    # and shape match is loaded; a new run, not a resume.
    init_from: str | None = None
    # The feature-enhancement regulariser (dbf_ext.regularizers), added in trained epochs.
    feature_enhancement: bool = False
    fe_l2_weight: float = DEFAULT_L2_WEIGHT
    fe_variance_weight: float = DEFAULT_VARIANCE_WEIGHT
    overwrite: bool = False  # a new run may replace the run in output_dir
    label_errors: str = "raise"  # malformed label lines: "raise" or "warn" (warned and dropped)
    backbone_weights: str | None = None  # classification state dict file loaded into the trunk
    pretrained: bool = False  # the trunk's ImageNet weights from the local torch hub cache
    # Data-parallel runs (torchrun); batch_size is per process, lr for the total batch.
    sync_bn: bool = False  # SyncBatchNorm while the trunk trains (GPUs only)
    reshard: str = "when-trained"  # CacheAffineSampler: deal new shards when the trunk trains, or never
    lr_base_batch: int | None = None  # lr is for this total batch: scaled linearly to the real one

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("hflip", "vflip"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "image_size", "step_epoch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not Path(self.data).is_dir():
            raise FileNotFoundError(f"data folder {self.data} does not exist")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise NotADirectoryError(f"output folder {self.output_dir} is a file")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: --resume continues the run "
                             "in the output folder, --overwrite replaces it")
        if self.resume and self.init_from:
            raise ValueError("resume and init_from exclude each other: --resume continues the run "
                             "in the output folder, --init-from starts a new run from given weights")
        if self.fe_l2_weight < 0 or self.fe_variance_weight < 0:
            raise ValueError(f"the feature-enhancement weights must be >= 0, got "
                             f"{self.fe_l2_weight}, {self.fe_variance_weight}")
        if self.reshard not in RESHARD_POLICIES:
            raise ValueError(f"reshard must be one of {RESHARD_POLICIES}, got {self.reshard!r}")
        if self.lr_base_batch is not None and self.lr_base_batch <= 0:
            raise ValueError(f"lr_base_batch must be positive, got {self.lr_base_batch}")
        if self.label_errors not in ("raise", "warn"):
            raise ValueError(f"label_errors must be 'raise' or 'warn', got {self.label_errors!r}")
        resolve_device(self.device)
        parse_cache_spec(self.cache)
        if self.pretrained and self.backbone_weights:
            raise ValueError("--pretrained and --backbone-weights exclude each other: both set the "
                             "trunk's initial weights")
        weights = self.initial_backbone_weights()  # with --pretrained: raises when not cached
        if weights is not None and not weights.is_file():
            raise FileNotFoundError(f"backbone weights file {weights} does not exist")

    def initial_backbone_weights(self) -> Path | None:
        """The file whose weights initialise the trunk (``None``: random initialisation)."""
        if self.pretrained:
            return pretrained_weights_path(self.model)
        return Path(self.backbone_weights) if self.backbone_weights else None

    def freeze_schedule(self) -> FreezeSchedule:
        return {
            "step-interval": lambda: StepInterval(self.unfrozen_epochs),
            "even-interval": lambda: EvenInterval(self.step_epoch),
            "always-frozen": AlwaysFrozen,
            "never-frozen": NeverFrozen,
            "frozen-after": lambda: FrozenAfter(self.freeze_epoch),
            "frozen-until": lambda: FrozenUntil(self.freeze_epoch),
        }[self.schedule]()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when usable, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    anything else, or a CUDA device that is not there, is a ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: no usable CUDA device (torch reports none); "
                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: no such CUDA device (devices 0-{count - 1})")
    return device
