"""The training engine: a detector with DBF, the feature cache and Dynamic R-CNN, trained and evaluated
epoch by epoch.

Detector-agnostic: a model of axis-aligned boxes (torchvision's Faster R-CNN) or of rotated boxes
(a model with ``box_type = "obb"``, e.g. Oriented R-CNN) is trained and evaluated by the same code.
The model decides the box type: the DOTA polygons are loaded as enclosing axis-aligned boxes or as
minimum-area rotated boxes (le90), flips transform them accordingly, and the evaluation is VOC07
mAP of that box type (rotated IoU for rotated boxes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from dbf_ext.cache import CacheAwareDataset, CachedBackbone, FeatureCache, cache_aware_collate
from dbf_ext.data import DotaDetectionDataset, collate_fn
from dbf_ext.evaluation import evaluate_detections
from dbf_ext.freeze import apply_dbf
from dbf_ext.inference import model_box_type
from dbf_ext.regularizers import FeatureEnhancement
from dbf_ext.train.augment import KeyedFlipDataset
from dbf_ext.train.checkpoint import (
    append_log,
    check_resumable,
    check_run_folder,
    load_checkpoint,
    load_matching_weights,
    load_model_weights,
    rewrite_log,
    save_checkpoint,
)
from dbf_ext.train.config import TrainConfig, parse_cache_spec
from dbf_ext.train.distributed import (
    DistributedContext,
    dynamic_rcnn_state,
    init_distributed,
    load_dynamic_rcnn_state,
    reduce_cache_stats,
    reduce_cache_summary,
    reduce_epoch,
    scaled_learning_rate,
    wrap_model,
)
from dbf_ext.train.model import build_detector, load_backbone_weights
from dbf_ext.train.report import (
    EpochRecord,
    TrainResult,
    ValidationExample,
    epoch_line,
    output_console,
    progress_bar,
)
from dbf_ext.train.sampler import CacheAffineSampler

logger = logging.getLogger(__name__)


def load_dataset(root: str | Path, split: str, classes=None, box_type: str = "hbb",
                 label_errors: str = "raise") -> DotaDetectionDataset:
    """The ``split`` folder of the DOTA-format folder ``root`` with ``box_type`` boxes (rotated:
    minimum-area rectangles of the polygons, le90); a missing or empty split is a one-line error."""
    root = Path(root)
    if not (root / split).is_dir():
        raise FileNotFoundError(f"{root} has no '{split}' split (expected {root / split}/images and labelTxt)")
    dataset = DotaDetectionDataset(root, split, classes=classes, box_type=box_type, errors=label_errors)
    if len(dataset) == 0:
        raise ValueError(f"no images in {root / split / 'images'}")
    return dataset


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: DotaDetectionDataset, device: torch.device,
            batch_size: int = 8, context: DistributedContext | None = None) -> list[dict[str, torch.Tensor]]:
    """``model``'s detections of every image of ``dataset``, in order, on the CPU: dicts with
    ``boxes`` ``(K, 4)`` or ``(K, 5)`` (the model's box type), ``scores`` ``(K,)`` and ``labels``
    ``(K,)`` (1-based, torchvision's convention). Leaves the model in eval mode.

    With a distributed ``context`` every rank detects on its share of the batches and the
    detections are gathered: every rank returns what a single process computes.
    """
    box_type = model_box_type(model)
    if box_type != dataset.box_type:
        raise ValueError(f"the model predicts {box_type} boxes, the dataset holds {dataset.box_type} boxes")
    context = context or DistributedContext(device=device)
    model.eval()
    predictions = []
    for indices in context.shard_batches(len(dataset), batch_size):
        images = [dataset.load_image(i).to(device) for i in indices]
        predictions += [{key: output[key].cpu() for key in ("boxes", "scores", "labels")}
                        for output in model(images)]
    return context.gather_sharded(predictions, len(dataset), batch_size)


def evaluate(model: torch.nn.Module, dataset: DotaDetectionDataset, device: torch.device,
             batch_size: int = 8, iou_thr: float = 0.5,
             context: DistributedContext | None = None) -> tuple[float, dict[str, float]]:
    """VOC07 mAP at ``iou_thr`` of ``model`` on ``dataset``, and AP per class name: rotated IoU
    for a model of rotated boxes (``dataset`` must hold the model's box type, see
    :func:`load_dataset`); difficult objects are ignored. With a distributed ``context`` the
    ranks share the images (:func:`predict`) and every rank returns the same figures."""
    return _mean_ap(predict(model, dataset, device, batch_size, context), dataset, iou_thr)


def _mean_ap(predictions: list[dict[str, torch.Tensor]], dataset: DotaDetectionDataset,
             iou_thr: float = 0.5) -> tuple[float, dict[str, float]]:
    mean_ap, per_class = evaluate_detections(predictions, dataset, iou_thr=iou_thr, use_07_metric=True)
    return float(mean_ap), {name: float(per_class[c]["ap"]) for c, name in enumerate(dataset.classes)}


def train(config: TrainConfig, console: Console | None = None,
          on_epoch_end: Callable[[EpochRecord], None] | None = None) -> TrainResult:
    """Trains a detector (:func:`~dbf_ext.models.build_detector`: an Oriented R-CNN or a
    torchvision Faster R-CNN) on a DOTA-format folder with ``train``/``val`` splits, epoch by
    epoch with :func:`train_one_epoch`, evaluating with :func:`predict` / :func:`evaluate`.

    Per epoch: the freezing schedule decides (once, before the epoch) whether the backbone
    trains; frozen epochs run it without autograd and, with a cache, serve its features from
    the :class:`~dbf_ext.cache.FeatureCache` (hits skip image decoding too). Writes
    ``log.jsonl`` (one line per epoch) and ``checkpoint.pt`` (resumable with ``resume=True``)
    to ``config.output_dir``. ``init_from`` starts a new run from the weights of another
    (matching names and shapes; what was skipped is printed). With ``feature_enhancement`` the
    :class:`~dbf_ext.regularizers.FeatureEnhancement` term of the trunk is added to the loss in
    epochs where the backbone trains. The model's box type (:func:`model_box_type`) decides how
    the DOTA polygons are read and how mAP is computed (rotated for rotated boxes).

    Started by torchrun (``WORLD_SIZE`` > 1 in the environment) or inside an initialised
    process group, it trains data-parallel (:mod:`dbf_ext.train.distributed`): ``batch_size``
    images per process, ``lr`` for the total batch, a :class:`CacheAffineSampler` shard and a
    feature cache per rank, rank 0 alone writing the folder and the console. Every rank
    returns the same result, whose figures are the whole job's.
    """
    config.validate()
    context = init_distributed(config.device)
    try:
        return _train(config, context, console or output_console(), on_epoch_end)
    finally:
        context.close()


def _train(config: TrainConfig, context: DistributedContext, console: Console,
           on_epoch_end: Callable[[EpochRecord], None] | None) -> TrainResult:
    if not context.is_main:
        console = Console(quiet=True)
    device = context.device
    out = Path(config.output_dir)
    check_run_folder(config, out)
    checkpoint_path = out / "checkpoint.pt"
    state = load_checkpoint(checkpoint_path, map_location=device) if config.resume else None
    torch.manual_seed(config.seed)

    train_set = load_dataset(config.data, "train", label_errors=config.label_errors)
    if state is not None:
        check_resumable(state, checkpoint_path, config, train_set.classes)
    # Also a barrier: no rank writes into the folder before every rank has checked it.
    context.check_same(state["epoch"] if state is not None else None, "the checkpoint's epoch")
    model = build_detector(config.model, train_set.num_classes, config.image_size)
    box_type = model_box_type(model)
    train_set = train_set.with_box_type(box_type)
    val_set = load_dataset(config.data, "val", train_set.classes, box_type, config.label_errors)
    out.mkdir(parents=True, exist_ok=True)
    keyed = KeyedFlipDataset(train_set, hflip=config.hflip, vflip=config.vflip, seed=config.seed)
    initial_weights = config.initial_backbone_weights()
    if initial_weights is not None and state is None:  # a resumed run has its weights already
        console.print(load_backbone_weights(model, initial_weights))
    init_report = None
    if config.init_from:  # after the trunk's weights: the checkpoint's tensors take precedence
        init_report = load_matching_weights(model, config.init_from)
        console.print(f"initialised from {config.init_from}:")
        for line in init_report.lines():
            console.print(f"  {line}")
    model.to(device)
    parallel_model = wrap_model(model, context, config.sync_bn)  # before the first freeze
    dbf = apply_dbf(parallel_model, config.freeze_schedule())
    dynamic = None
    if config.dynamic_rcnn:
        from dbf_ext.integrations.torchvision import use_dynamic_roi_heads

        dynamic = use_dynamic_roi_heads(model)
        dynamic.distributed = context.is_distributed  # statistics of all ranks' images
    cache_options = parse_cache_spec(config.cache)
    cached = None
    if cache_options:
        disk_dir = config.cache_dir or (out / "feature_cache" if cache_options["disk_bytes"] else None)
        cached = CachedBackbone(dbf.backbone, FeatureCache(**cache_options,
                                                           disk_dir=context.rank_folder(disk_dir)))
        cached.watch_input_sizes(model.transform)
        model.backbone.body = cached
    enhancement = None
    if config.feature_enhancement:
        enhancement = FeatureEnhancement(dbf.backbone, l2_weight=config.fe_l2_weight,
                                         variance_weight=config.fe_variance_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    total_batch = config.batch_size * context.world_size
    lr = scaled_learning_rate(config.lr, config.lr_base_batch, total_batch)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    # Backbone parameters frozen later are skipped by the optimizer (their grad is None), so
    # one optimizer over all parameters serves frozen and unfrozen epochs alike.
    sampler = None
    if context.is_distributed:
        sampler = CacheAffineSampler(len(keyed), context.world_size, context.rank, config.seed,
                                     config.reshard, is_frozen=lambda e: dbf.schedule.is_frozen(e))
        console.print(f"data-parallel: {context.world_size} processes on {device.type}, "
                      f"{config.batch_size} images each per step (total batch {total_batch}), "
                      f"{len(sampler)} of {len(keyed)} training images per process")
    if config.lr_base_batch is not None and state is None:  # a resumed run goes on with its own
        console.print(f"learning rate {config.lr:g} for a total batch of {config.lr_base_batch}, scaled "
                      f"linearly to {lr:g} for this run's {total_batch}")
    steps_per_epoch = math.ceil((len(sampler) if sampler is not None else len(keyed)) / config.batch_size)
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
            load_dynamic_rcnn_state(context, dynamic, state["dynamic_rcnn"])
        # The job's summed statistics continue on rank 0 alone (the sum over ranks stays exact).
        if cached is not None and state.get("cache") is not None and context.is_main:
            cached.cache.load_state_dict(state["cache"])
        context.check_same_weights(model, "the weights read from the checkpoint")
        history = [EpochRecord(**record) for record in state["history"]]
        start_epoch = state["epoch"] + 1
        console.print(f"resumed from {checkpoint_path} after epoch {state['epoch']}")
        written_by = state.get("world_size", 1)
        if written_by != context.world_size:
            console.print(f"warning: {checkpoint_path} was written by {written_by} process(es), this "
                          f"run has {context.world_size}: the shards and the steps per epoch change, "
                          "and with them the cosine schedule's length in steps; the learning rate "
                          "stays the checkpoint's (the run goes on, not as it would have)")
    elif context.is_main:
        checkpoint_path.unlink(missing_ok=True)  # --overwrite: no old checkpoint beside a new log
    if context.is_main:
        rewrite_log(log_path, history)

    dataset = CacheAwareDataset(keyed) if cached is not None else keyed
    last_evaluation = None
    for epoch in range(start_epoch, config.epochs):
        dbf.on_epoch_start(epoch)
        frozen = dbf.is_frozen
        context.check_same("frozen" if frozen else "trained", f"the freeze decision of epoch {epoch}")
        keyed.set_epoch(epoch)
        if cached is not None:
            dataset.set_epoch(epoch, cached.cache.keys_snapshot())
        # Seeded per epoch: shuffling and the detector's sampling are the same after a resume.
        torch.manual_seed(context.epoch_seed(config.seed, epoch))
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=config.workers,
                            generator=torch.Generator().manual_seed(config.seed * 1000 + epoch),
                            collate_fn=cache_aware_collate if cached is not None else collate_fn)
        totals = train_one_epoch(
            parallel_model, optimizer, scheduler, scaler, loader, device, epoch, console,
            frozen=frozen, steps_per_epoch=steps_per_epoch, use_amp=use_amp,
            cached=cached, cache_aware=dataset if cached is not None else None, enhancement=enhancement)
        cache_counts = None
        if cached is not None:
            cache_counts = (totals.cache_hits, totals.cache_lookups, sum(cached.cache.bytes_used().values()))
        job = reduce_epoch(context, totals.losses, totals.images, totals.seconds, cache_counts)
        record = EpochRecord(
            epoch=epoch, frozen=frozen, seconds=job["seconds"],
            images_per_second=job["images"] / job["seconds"], losses=job["losses"],
        )
        if cached is not None:
            record.cache_hit_rate = job["cache_hit_rate"]
            record.cache_bytes = job["cache_bytes"]
            if context.is_distributed:
                record.cache_hit_rate_per_rank = job["cache_hit_rate_per_rank"]
        if totals.feature_enhancement:
            record.feature_enhancement = {k: v / totals.steps for k, v in totals.feature_enhancement.items()}
        if dynamic is not None:
            record.dynamic_rcnn = {"iou_threshold": dynamic.iou_threshold, "beta": dynamic.beta}
        # Rank 0's running statistics (as DDP's buffer broadcast would give), then proof that
        # every rank holds the same weights.
        context.broadcast_buffers(model, skip=dbf.backbone if frozen else None)
        context.check_same_weights(model, f"the model weights after epoch {epoch}")
        last = epoch == config.epochs - 1
        if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
            predictions = predict(model, val_set, device, context=context)
            last_evaluation = _mean_ap(predictions, val_set)
            record.map50 = last_evaluation[0]
        history.append(record)
        # The parts of the checkpoint every rank contributes to (collectives: on every rank).
        dynamic_state = dynamic_rcnn_state(context, dynamic) if dynamic is not None else None
        cache_state = None
        if cached is not None:
            cache_state = {"stats": reduce_cache_stats(context, cached.cache.state_dict()["stats"])}
        if context.is_main:
            # Checkpoint first, then the log line: after a crash the log never names an epoch
            # the checkpoint lacks, and a resume rewrites the log from the checkpoint's history.
            save_checkpoint(checkpoint_path, {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "dbf": dbf.state_dict(),
                "dynamic_rcnn": dynamic_state,
                "cache": cache_state,
                "history": [dataclasses.asdict(r) for r in history],
                "config": dataclasses.asdict(config),
                "classes": list(train_set.classes),
                "world_size": context.world_size,
            })
            append_log(log_path, record)
        console.print(epoch_line(record))
        if on_epoch_end is not None:
            on_epoch_end(record)

    if last_evaluation is None:  # resumed after the last epoch
        predictions = predict(model, val_set, device, context=context)
        last_evaluation = _mean_ap(predictions, val_set)
    final_map, per_class = last_evaluation
    cache_summary = reduce_cache_summary(context, cached.cache.summary()) if cached is not None else None
    return TrainResult(config, history, train_set.classes, final_map, per_class, cache_summary, init_report,
                       box_type=box_type, example=ValidationExample.most_crowded(val_set, predictions))


@dataclasses.dataclass
class EpochTotals:
    """What :func:`train_one_epoch` sums over its steps (this process's share of the epoch)."""

    losses: dict[str, float]  # loss term -> sum over the images of the step means
    feature_enhancement: dict[str, float]  # part of the regulariser -> sum over the steps
    images: int
    steps: int
    seconds: float
    cache_hits: int = 0  # feature-cache lookups served, and all lookups
    cache_lookups: int = 0


def train_one_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                    loader: DataLoader, device: torch.device, epoch: int, console: Console, *,
                    frozen: bool, steps_per_epoch: int, use_amp: bool = False,
                    cached: CachedBackbone | None = None, cache_aware: CacheAwareDataset | None = None,
                    enhancement: FeatureEnhancement | None = None) -> EpochTotals:
    """One epoch of training steps of a detector of either box type, with a progress bar.

    A step: the batch ``(images, targets)`` (with the cache: ``(images, targets, keys)`` from
    :func:`~dbf_ext.cache.cache_aware_collate`, run through ``cache_aware``'s
    :meth:`~dbf_ext.cache.CacheAwareDataset.call_with_decoding` with ``cached`` serving the
    trunk) goes to the device, ``model(images, targets)`` gives the losses (plus the
    feature-enhancement term while the backbone trains), their sum is checked finite
    (``FloatingPointError`` naming epoch, step and terms), back-propagated (scaled for AMP) and
    the optimizer and learning-rate scheduler step.
    """
    sums: dict[str, float] = {}
    enhancement_sums: dict[str, float] = {}
    images_seen = steps = 0
    started = time.perf_counter()
    hits_before, lookups_before = _cache_counts(cached)
    model.train()
    with progress_bar(console) as progress:
        task = progress.add_task(f"epoch {epoch}", total=steps_per_epoch,
                                 state="frozen" if frozen else "trains", info="")
        for steps, batch in enumerate(loader, start=1):
            images, targets, keys = batch if cached is not None else (*batch, None)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            with torch.autocast(device.type, enabled=use_amp):
                if cached is not None:
                    losses = cache_aware.call_with_decoding(
                        functools.partial(_cached_forward, model, cached), images, keys, targets)
                else:
                    losses = model(images, targets)
                if enhancement is not None and not frozen:
                    losses["feature_enhancement"] = enhancement()
                loss = sum(losses.values())
            # Each term read back once per step: for the finiteness check, the epoch means and
            # the progress line.
            values = {name: float(value.detach()) for name, value in losses.items()}
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                parts = ", ".join(f"{name} {value:.4g}" for name, value in values.items())
                raise FloatingPointError(
                    f"loss became {loss_value} in epoch {epoch}, step {steps} of "
                    f"{steps_per_epoch} ({parts}); lower the learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value * len(images)
            if "feature_enhancement" in values:
                for name, value in enhancement.parts.items():
                    enhancement_sums[name] = enhancement_sums.get(name, 0.0) + float(value)
            images_seen += len(images)
            rate = images_seen / (time.perf_counter() - started)
            info = f"loss {loss_value:.3f}  {rate:.1f} img/s"
            if "feature_enhancement" in values:
                info += f"  feature enhancement {values['feature_enhancement']:.3g}"
            if cached is not None:
                hits, lookups = _cache_counts(cached)
                info += f"  cache hits {(hits - hits_before) / max(1, lookups - lookups_before):.0%}"
            progress.update(task, advance=1, info=info)
    seconds = time.perf_counter() - started
    hits, lookups = _cache_counts(cached)
    return EpochTotals(sums, enhancement_sums, images_seen, steps, seconds, hits - hits_before,
                       lookups - lookups_before)


def _cached_forward(model, cached: CachedBackbone, images, keys, targets):
    with cached.batch_keys(keys):
        return model(images, targets)


def _cache_counts(cached: CachedBackbone | None) -> tuple[int, int]:
    """The cache's hits and lookups so far (0, 0 without a cache)."""
    if cached is None:
        return 0, 0
    return cached.cache.stats.hits, cached.cache.stats.hits + cached.cache.stats.misses
