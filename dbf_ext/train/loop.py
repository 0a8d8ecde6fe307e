"""The training loop: a torchvision detector with DBF, the feature cache and Dynamic R-CNN."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import DataLoader

from dbf_ext.cache import CacheAwareDataset, CachedBackbone, FeatureCache, cache_aware_collate
from dbf_ext.data import DotaDetectionDataset
from dbf_ext.evaluation import eval_map
from dbf_ext.freeze import (
    AlwaysFrozen,
    EvenInterval,
    FreezeSchedule,
    FrozenAfter,
    FrozenUntil,
    NeverFrozen,
    StepInterval,
    apply_dbf,
)
from dbf_ext.train.augment import KeyedFlipDataset
from dbf_ext.train.model import MODELS, build_detector

logger = logging.getLogger(__name__)

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
    dynamic_rcnn: bool = False
    amp: bool = True  # used on GPU only
    device: str = "auto"
    workers: int = 0
    eval_every: int = 0  # 0: evaluate after the last epoch only
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # a new run may replace the run in output_dir
    label_errors: str = "raise"  # malformed label lines: "raise" or "warn" (warned and dropped)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
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
        if self.label_errors not in ("raise", "warn"):
            raise ValueError(f"label_errors must be 'raise' or 'warn', got {self.label_errors!r}")
        resolve_device(self.device)
        parse_cache_spec(self.cache)

    def freeze_schedule(self) -> FreezeSchedule:
        return {
            "step-interval": lambda: StepInterval(self.unfrozen_epochs),
            "even-interval": lambda: EvenInterval(self.step_epoch),
            "always-frozen": AlwaysFrozen,
            "never-frozen": NeverFrozen,
            "frozen-after": lambda: FrozenAfter(self.freeze_epoch),
            "frozen-until": lambda: FrozenUntil(self.freeze_epoch),
        }[self.schedule]()


@dataclasses.dataclass
class EpochRecord:
    epoch: int
    frozen: bool
    seconds: float
    images_per_second: float
    losses: dict[str, float]
    cache_hit_rate: float | None = None
    cache_bytes: int | None = None
    map50: float | None = None
    dynamic_rcnn: dict[str, float] | None = None


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord]
    classes: tuple[str, ...]
    final_map50: float | None
    per_class_ap: dict[str, float]
    cache_summary: dict[str, Any] | None


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a training checkpoint, or of another
    model or class list. The message names the file."""


# What train() writes into a checkpoint; a file without these is not one of its checkpoints.
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "dbf", "dynamic_rcnn",
                    "cache", "history", "config", "classes")


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True``.

    Raises :class:`CheckpointError` (one line, naming the file) when the file cannot be read
    or is not such a checkpoint, ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # torch.load reports damage by RuntimeError (zip), UnpicklingError (not plain data),
    # EOFError (empty) or ValueError, with messages of many lines.
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt, truncated or not a "
                              f"dbf-ext checkpoint): {first_line}") from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a dbf-ext training checkpoint of this version "
                              f"(missing: {', '.join(missing)})")
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Loads a checkpoint's weights; weights of another architecture are a :class:`CheckpointError`."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise CheckpointError(f"the weights in {path} do not fit model {state['config']['model']} "
                              f"with {len(state['classes'])} classes: {first_line}") from None


def _check_resumable(state: dict[str, Any], path: Path, config: TrainConfig, classes: tuple[str, ...]) -> None:
    trained = state["config"]["model"], tuple(state["classes"])
    if trained != (config.model, classes):
        raise CheckpointError(
            f"{path} holds model {trained[0]} for classes {', '.join(trained[1])}; this run builds "
            f"{config.model} for classes {', '.join(classes)} (same --model and data to resume)"
        )


def _load_dataset(config: TrainConfig, split: str, classes=None) -> DotaDetectionDataset:
    root = Path(config.data)
    if not (root / split).is_dir():
        raise FileNotFoundError(f"{root} has no '{split}' split (expected {root / split}/images and labelTxt)")
    dataset = DotaDetectionDataset(root, split, classes=classes, box_type="hbb", errors=config.label_errors)
    if len(dataset) == 0:
        raise ValueError(f"no images in {root / split / 'images'}")
    return dataset


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: DotaDetectionDataset, device: torch.device,
             batch_size: int = 8, iou_thr: float = 0.5) -> tuple[float, dict[str, float]]:
    """VOC07 mAP at ``iou_thr`` of ``model`` on ``dataset`` (axis-aligned boxes)."""
    model.eval()
    detections = []
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images = [dataset.load_image(i).to(device) for i in indices]
        for output in model(images):
            boxes, scores = output["boxes"].cpu().double(), output["scores"].cpu().double()
            labels = output["labels"].cpu() - 1
            detections.append([
                torch.cat([boxes[labels == c], scores[labels == c, None]], 1).numpy()
                for c in range(dataset.num_classes)
            ])
    mean_ap, per_class = eval_map(detections, dataset.eval_annotations(), iou_thr=iou_thr,
                                  box_type="hbb", use_07_metric=True)
    return float(mean_ap), {name: float(per_class[c]["ap"]) for c, name in enumerate(dataset.classes)}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    with partial.open("wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)  # a crash never leaves a half-written checkpoint behind
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX; elsewhere folders cannot be opened)."""
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _log_line(record: EpochRecord) -> str:
    return json.dumps(dataclasses.asdict(record)) + "\n"


def _append_log(path: Path, record: EpochRecord) -> None:
    with path.open("a") as log:
        log.write(_log_line(record))
        log.flush()
        os.fsync(log.fileno())


def _rewrite_log(path: Path, history: list[EpochRecord]) -> None:
    """The log of the epochs a checkpoint holds: lines a crash left past the checkpoint (or
    cut in half) go, a line the crash kept from being written comes back."""
    partial = path.with_suffix(".partial")
    with partial.open("w") as log:
        log.writelines(_log_line(record) for record in history)
        log.flush()
        os.fsync(log.fileno())
    os.replace(partial, path)
    _sync_folder(path.parent)


def _check_run_folder(config: TrainConfig, out: Path) -> None:
    checkpoint, log = out / "checkpoint.pt", out / "log.jsonl"
    if config.resume and not checkpoint.exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint {checkpoint} (run without --resume "
                                "to start a new run)")
    if not config.resume and not config.overwrite and (checkpoint.exists() or log.exists()):
        raise FileExistsError(f"{out} holds a run (checkpoint.pt, log.jsonl): --resume continues it, "
                              "--overwrite replaces it, or choose another --output")


def train(config: TrainConfig, console: Console | None = None,
          on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Trains a torchvision Faster R-CNN on a DOTA-format folder with ``train``/``val`` splits.

    Per epoch: the freezing schedule decides (once, before the epoch) whether the backbone
    trains; frozen epochs run it without autograd and, with a cache, serve its features from
    the :class:`~dbf_ext.cache.FeatureCache` (hits skip image decoding too). Writes
    ``log.jsonl`` (one line per epoch) and ``checkpoint.pt`` (resumable with ``resume=True``)
    to ``config.output_dir``. Axis-aligned boxes (from the DOTA polygons) until a rotated
    detector exists.
    """
    config.validate()
    console = console or output_console()
    device = resolve_device(config.device)
    out = Path(config.output_dir)
    _check_run_folder(config, out)
    checkpoint_path = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path, map_location=device) if config.resume else None
    torch.manual_seed(config.seed)

    train_set = _load_dataset(config, "train")
    val_set = _load_dataset(config, "val", classes=train_set.classes)
    if state is not None:
        _check_resumable(state, checkpoint_path, config, train_set.classes)
    out.mkdir(parents=True, exist_ok=True)
    keyed = KeyedFlipDataset(train_set, hflip=config.hflip, seed=config.seed)
    model = build_detector(config.model, train_set.num_classes, config.image_size)
    dbf = apply_dbf(model, config.freeze_schedule())
    dynamic = None
    if config.dynamic_rcnn:
        from dbf_ext.integrations.torchvision import use_dynamic_roi_heads

        dynamic = use_dynamic_roi_heads(model)
    cache_options = parse_cache_spec(config.cache)
    cached = None
    if cache_options:
        disk_dir = config.cache_dir or (out / "feature_cache" if cache_options["disk_bytes"] else None)
        cached = CachedBackbone(dbf.backbone, FeatureCache(**cache_options, disk_dir=disk_dir))
        cached.watch_input_sizes(model.transform)
        model.backbone.body = cached
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    # Backbone parameters frozen later are skipped by the optimizer (their grad is None), so
    # one optimizer over all parameters serves frozen and unfrozen epochs alike.
    steps_per_epoch = math.ceil(len(keyed) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / max(1, config.warmup_iters))
        * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history: list[EpochRecord] = []
    start_epoch = 0
    log_path = out / "log.jsonl"
    if state is not None:
        load_model_weights(model, state, checkpoint_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        dbf.load_state_dict(state["dbf"])
        if dynamic is not None and state.get("dynamic_rcnn") is not None:
            dynamic.load_state_dict(state["dynamic_rcnn"])
        if cached is not None and state.get("cache") is not None:
            cached.cache.load_state_dict(state["cache"])
        history = [EpochRecord(**record) for record in state["history"]]
        start_epoch = state["epoch"] + 1
        console.print(f"resumed from {checkpoint_path} after epoch {state['epoch']}")
    else:
        checkpoint_path.unlink(missing_ok=True)  # --overwrite: no old checkpoint beside a new log
    _rewrite_log(log_path, history)

    dataset = CacheAwareDataset(keyed) if cached is not None else keyed
    last_evaluation = None
    for epoch in range(start_epoch, config.epochs):
        dbf.on_epoch_start(epoch)
        frozen = dbf.is_frozen
        keyed.set_epoch(epoch)
        if cached is not None:
            dataset.set_epoch(epoch, cached.cache.keys_snapshot())
        # Seeded per epoch: shuffling and the detector's sampling are the same after a resume.
        torch.manual_seed(config.seed * 1000 + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                            num_workers=config.workers,
                            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
                            collate_fn=cache_aware_collate if cached is not None else _collate)
        hits_before = cached.cache.stats.hits if cached is not None else 0
        lookups_before = (cached.cache.stats.hits + cached.cache.stats.misses) if cached is not None else 0
        model.train()
        sums: dict[str, float] = {}
        images_seen = 0
        started = time.perf_counter()
        with _progress(console) as progress:
            task = progress.add_task(f"epoch {epoch}", total=steps_per_epoch,
                                     state="frozen" if frozen else "trains", info="")
            for step, batch in enumerate(loader, start=1):
                images, targets, keys = batch if cached is not None else (*batch, None)
                images = [image.to(device, non_blocking=True) for image in images]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                           for t in targets]
                with torch.autocast(device.type, enabled=use_amp):
                    if cached is not None:
                        losses = dataset.call_with_decoding(
                            functools.partial(_cached_forward, model, cached), images, keys, targets)
                    else:
                        losses = model(images, targets)
                    loss = sum(losses.values())
                if not torch.isfinite(loss):
                    parts = ", ".join(f"{name} {value.item():.4g}" for name, value in losses.items())
                    raise FloatingPointError(
                        f"loss became {loss.item()} in epoch {epoch}, step {step} of "
                        f"{steps_per_epoch} ({parts}); lower the learning rate (--lr)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(images)
                images_seen += len(images)
                rate = images_seen / (time.perf_counter() - started)
                info = f"loss {float(loss.detach()):.3f}  {rate:.1f} img/s"
                if cached is not None:
                    info += f"  cache hits {_hit_rate(cached.cache, hits_before, lookups_before):.0%}"
                progress.update(task, advance=1, info=info)
        seconds = time.perf_counter() - started
        record = EpochRecord(
            epoch=epoch, frozen=frozen, seconds=seconds, images_per_second=images_seen / seconds,
            losses={k: v / images_seen for k, v in sums.items()},
        )
        if cached is not None:
            record.cache_hit_rate = _hit_rate(cached.cache, hits_before, lookups_before)
            record.cache_bytes = sum(cached.cache.bytes_used().values())
        if dynamic is not None:
            record.dynamic_rcnn = {"iou_threshold": dynamic.iou_threshold, "beta": dynamic.beta}
        last = epoch == config.epochs - 1
        if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            last_evaluation = evaluate(model, val_set, device)
            record.map50 = last_evaluation[0]
        history.append(record)
        # Checkpoint first, then the log line: after a crash the log never names an epoch the
        # checkpoint lacks, and a resume rewrites the log from the checkpoint's history.
        _save_checkpoint(checkpoint_path, {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "dbf": dbf.state_dict(),
            "dynamic_rcnn": dynamic.state_dict() if dynamic is not None else None,
            "cache": cached.cache.state_dict() if cached is not None else None,
            "history": [dataclasses.asdict(r) for r in history],
            "config": dataclasses.asdict(config),
            "classes": list(train_set.classes),
        })
        _append_log(log_path, record)
        console.print(_epoch_line(record))
        if on_epoch_end is not None:
            on_epoch_end(record)

    if last_evaluation is None:  # resumed after the last epoch
        last_evaluation = evaluate(model, val_set, device)
    final_map, per_class = last_evaluation
    return TrainResult(config, history, train_set.classes, final_map, per_class,
                       cached.cache.summary() if cached is not None else None)


def _cached_forward(model, cached: CachedBackbone, images, keys, targets):
    with cached.batch_keys(keys):
        return model(images, targets)


def _collate(batch):
    return [image for image, _ in batch], [target for _, target in batch]


def _hit_rate(cache: FeatureCache, hits_before: int, lookups_before: int) -> float:
    lookups = cache.stats.hits + cache.stats.misses - lookups_before
    return (cache.stats.hits - hits_before) / lookups if lookups else 0.0


# Width of a console that is not a terminal: wide enough that rich never wraps a line.
_UNWRAPPED_WIDTH = 10_000


def output_console() -> Console:
    """A rich console on stdout. On a terminal it fits the window; otherwise (a file, a pipe,
    a log) rich would wrap at 80 columns and put a figure on the line after its name, so lines
    are never wrapped there."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=_UNWRAPPED_WIDTH, soft_wrap=True)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}[/] ({task.fields[state]})"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _epoch_line(record: EpochRecord) -> str:
    parts = [f"epoch {record.epoch:3d}", "frozen " if record.frozen else "trained",
             f"{record.seconds:6.1f} s", f"{record.images_per_second:5.1f} img/s",
             f"loss {sum(record.losses.values()):.3f}"]
    if record.cache_hit_rate is not None:
        parts.append(f"cache hits {record.cache_hit_rate:4.0%}")
    if record.map50 is not None:
        parts.append(f"mAP50 {record.map50:.3f}")
    return "  ".join(parts)


def summary_rows(result: TrainResult) -> list[tuple[str, str]]:
    """The final summary as (quantity, value) rows (printed as a table by the CLI)."""
    frozen = [r.seconds for r in result.history if r.frozen]
    trained = [r.seconds for r in result.history if not r.frozen]
    rows = [
        ("epochs (trained / frozen backbone)", f"{len(trained)} / {len(frozen)}"),
        ("mean epoch time, backbone trained", f"{np.mean(trained):.1f} s" if trained else "-"),
        ("mean epoch time, backbone frozen", f"{np.mean(frozen):.1f} s" if frozen else "-"),
    ]
    if result.cache_summary is not None:
        cache = result.cache_summary
        rows += [
            ("cache storage", cache["storage_dtype"]),
            ("cache hit rate (all frozen epochs)", f"{cache['hit_rate']:.0%}"),
            ("cache bytes per image", f"{cache['bytes_per_sample'] / 1024:.0f} KiB"),
            ("cache entries (gpu / cpu / disk)",
             " / ".join(str(cache["entries"][t]) for t in ("gpu", "cpu", "disk"))),
        ]
    if result.final_map50 is not None:
        rows.append(("mAP50 (VOC07, val)", f"{result.final_map50:.3f}"))
        rows += [(f"  AP50 {name}", f"{ap:.3f}") for name, ap in result.per_class_ap.items()]
    return rows


def plot_history(result: TrainResult, path: str | Path) -> None:
    """Losses, mAP and the freeze timeline per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.history]
    fig, (ax_loss, ax_time) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                           gridspec_kw={"height_ratios": [3, 2]})
    for record in result.history:  # the freeze timeline, as shading
        if record.frozen:
            for ax in (ax_loss, ax_time):
                ax.axvspan(record.epoch - 0.5, record.epoch + 0.5, color="tab:blue", alpha=0.08, lw=0)
    names = sorted({k for r in result.history for k in r.losses})
    for name in names:
        ax_loss.plot(epochs, [r.losses.get(name, np.nan) for r in result.history], label=name)
    ax_loss.plot(epochs, [sum(r.losses.values()) for r in result.history], "k-", lw=2, label="total")
    ax_loss.set_ylabel("training loss")
    evaluated = [(r.epoch, r.map50) for r in result.history if r.map50 is not None]
    if evaluated:
        ax_map = ax_loss.twinx()
        ax_map.plot(*zip(*evaluated), "o-", color="tab:red", label="mAP50 (val)")
        ax_map.set_ylabel("mAP50", color="tab:red")
        ax_map.set_ylim(0, 1)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("dbf_ext training (shaded: backbone frozen)")
    ax_time.bar(epochs, [r.seconds for r in result.history],
                color=["tab:blue" if r.frozen else "tab:orange" for r in result.history])
    ax_time.set_ylabel("epoch time (s)")
    ax_time.set_xlabel("epoch (blue: frozen backbone, orange: backbone trains)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
