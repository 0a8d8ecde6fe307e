"""The ``dbf-ext`` command line (also ``python -m dbf_ext``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _cmd_info(args: argparse.Namespace) -> int:
    from dbf_ext import _ext

    info = _ext.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    runtime = info["cuda_runtime"]
    lines = [
        f"dbf_ext {info['version']} (torch {info['torch_version']})",
        f"  C++ compiler:   {info['cxx_compiler']}",
    ]
    if info["cuda"]:
        lines.append(
            f"  CUDA kernels:   compiled with nvcc {info['cuda_compiler_version']} "
            f"for architectures {info['cuda_architectures']}"
        )
        driver = runtime["driver_version"]
        lines.append(
            f"  CUDA driver:    {'supports CUDA ' + _ext.cuda_version_text(driver) if driver else 'none found'}"
            f" (the kernels' runtime is CUDA {_ext.cuda_version_text(runtime['runtime_version'])})"
        )
        if info["cuda_driver_problem"]:
            lines.append(f"  Problem:        {info['cuda_driver_problem']}")
    else:
        lines.append("  CUDA kernels:   not compiled (no nvcc at build time)")
    if info["gpu_usable"]:
        lines.append(f"  GPU:            usable: {', '.join(info['gpus'])}")
    else:
        reasons = []
        if info["cuda"] and runtime["error"]:
            reasons.append(runtime["error"])
        if not info["torch_cuda_available"]:
            reasons.append("torch reports no CUDA device")
        lines.append(f"  GPU:            not usable ({'; '.join(reasons) or 'no device'})")
    print("\n".join(lines))
    return 0


def _print_summary(result, console, extra_rows=()) -> None:
    from rich.table import Table

    from dbf_ext.train import summary_rows

    table = Table(title="dbf_ext training summary", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in [*summary_rows(result), *extra_rows]:
        table.add_row(name, value)
    console.print(table)


def _run_training(config, plot: str | None) -> int:
    from dbf_ext.train import output_console, plot_history, train
    from dbf_ext.train.distributed import is_main_process

    console = output_console()
    result = train(config, console=console)
    if not is_main_process():  # every rank returns the job's result; rank 0 reports it
        return 0
    _print_summary(result, console)
    if plot:
        plot_history(result, plot)
        console.print(f"plot written to {plot}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dbf_ext.train import output_console
    from dbf_ext.train.demo import run_demo
    from dbf_ext.train.distributed import is_main_process

    # Under torchrun every rank runs the demo (and prepares the set: a lost race is harmless);
    # rank 0 reports.
    console = output_console() if is_main_process() else Console(quiet=True)
    result, comparison, plot = run_demo(args.output, console, epochs=args.epochs,
                                        unfrozen_epochs=_epoch_list(args.unfrozen_epochs),
                                        device=args.device, compare=args.compare, plot=args.plot)
    _print_summary(result, console, comparison)
    if not comparison:
        console.print("(no full fine-tuning figures for these settings: --compare measures them)")
    elif not args.compare:
        console.print("(full fine-tuning: stored figures; its time compares on a like machine and load, "
                      "--compare measures both runs alike)")
    console.print(f"plot written to {plot}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dbf_ext.train import TrainConfig

    if args.format != "dota":
        raise ValueError(f"unsupported --format {args.format!r} (supported: dota)")
    config = TrainConfig(
        data=args.data,
        output_dir=args.output,
        model=args.model,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        unfrozen_epochs=_epoch_list(args.unfrozen_epochs),
        step_epoch=args.step_epoch,
        freeze_epoch=args.freeze_epoch,
        cache=args.cache,
        cache_dir=args.cache_dir,
        hflip=args.hflip,
        vflip=args.vflip,
        dynamic_rcnn=args.dynamic_rcnn,
        amp=not args.no_amp,
        device=args.device,
        workers=args.workers,
        eval_every=args.eval_every,
        seed=args.seed,
        resume=args.resume,
        init_from=args.init_from,
        feature_enhancement=args.feature_enhancement,
        fe_l2_weight=args.fe_l2_weight,
        fe_variance_weight=args.fe_variance_weight,
        overwrite=args.overwrite,
        label_errors=args.label_errors,
        backbone_weights=args.backbone_weights,
        pretrained=args.pretrained,
        sync_bn=args.sync_bn,
        reshard=args.reshard,
        lr_base_batch=args.scale_lr_from,
    )
    return _run_training(config, args.plot)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.detections:
        return _eval_detections(args)
    from dbf_ext.inference import model_box_type
    from dbf_ext.train import evaluate, init_distributed, load_dataset, load_detector, resolve_device

    if not _windows_given(args):
        context = init_distributed(args.device)  # started by torchrun: the ranks share the images
        try:
            model, classes, config = load_detector(args.checkpoint, context.device)
            # The classes the model was trained for, in its label order: the training folder may
            # have moved or changed since.
            dataset = load_dataset(args.data or config["data"], args.split, classes, model_box_type(model))
            mean_ap, per_class = evaluate(model, dataset, context.device, iou_thr=args.iou_thr, context=context)
        finally:
            context.close()
        if context.is_main:
            _print_map(args, dataset, mean_ap, per_class)
        return 0
    device = resolve_device(args.device)
    model, classes, config = load_detector(args.checkpoint, device)
    from dbf_ext.evaluation import evaluate_detections
    from dbf_ext.inference import predict_images

    dataset = load_dataset(args.data or config["data"], args.split, classes, model_box_type(model))
    images = {image_id: dataset.image_path(i) for i, image_id in enumerate(dataset.image_ids)}
    with _progress() as progress:
        predictions = {image_id: result for image_id, _, result in predict_images(
            model, images, progress=progress, **_prediction_options(args))}
    mean_ap, per_class = evaluate_detections(predictions, dataset, iou_thr=args.iou_thr)
    _print_map(args, dataset, mean_ap, {name: per_class[c]["ap"] for c, name in enumerate(classes)},
               how=f"on the whole images, windows {_window_text(args)} merged")
    return 0


def _eval_detections(args: argparse.Namespace) -> int:
    """mAP of Task1 result files (merged detections, e.g. from dbf-ext predict --task1) against
    the labels of the original images."""
    from dbf_ext.data import DotaDetectionDataset, DotaFolder, polygons_to_hbb, polygons_to_obb, read_dota_task1
    from dbf_ext.evaluation import evaluate_detections

    if args.checkpoint or _windows_given(args):
        raise ValueError("--detections evaluates result files: no --checkpoint, --preset, --patch-size, --gap "
                         "or --rates with it")
    if not args.data:
        raise ValueError("--detections needs --data (the folder whose --split holds the original labels)")
    found = sorted(path.name[len("Task1_"):-len(".txt")] for path in Path(args.detections).glob("Task1_*.txt"))
    if not found:
        raise FileNotFoundError(f"no Task1_<class>.txt files in {args.detections}")
    labelled = DotaFolder(Path(args.data) / args.split).classes
    classes = tuple(labelled) + tuple(name for name in found if name not in labelled)
    dataset = DotaDetectionDataset(args.data, args.split, classes=classes, box_type=args.box_type)
    task1 = read_dota_task1(args.detections, classes).values()
    to_boxes = polygons_to_obb if args.box_type == "obb" else polygons_to_hbb
    image_ids = np.array([image_id for dets in task1 for image_id in dets.image_ids], dtype=str)
    boxes = to_boxes(np.concatenate([dets.polygons for dets in task1]))
    scores = np.concatenate([dets.scores for dets in task1])
    labels = np.concatenate([np.full(len(dets.scores), label) for label, dets in enumerate(task1, start=1)])
    order = np.argsort(image_ids, kind="stable")  # grouped by image, file order within an image
    names, starts = np.unique(image_ids[order], return_index=True)
    predictions = {
        str(name): {"boxes": boxes[rows], "scores": scores[rows], "labels": labels[rows]}
        for name, rows in zip(names, np.split(order, starts[1:]))
    }
    mean_ap, per_class = evaluate_detections(predictions, dataset, iou_thr=args.iou_thr)
    _print_map(args, dataset, mean_ap, {name: per_class[c]["ap"] for c, name in enumerate(classes)},
               how=f"of the Task1 files in {args.detections}, {'rotated' if args.box_type == 'obb' else 'axis-aligned'}"
                   " boxes")
    return 0


def _print_map(args, dataset, mean_ap: float, per_class: dict[str, float], how: str = "") -> None:
    name = "rotated mAP" if dataset.box_type == "obb" else "mAP"
    print(f"{name}@{args.iou_thr} (VOC07) on {len(dataset)} images of '{args.split}'{' ' + how if how else ''}: "
          f"{mean_ap:.4f}")
    for name, ap in per_class.items():
        print(f"  {name:24s} {ap:.4f}")


def _progress():
    """A progress display on the terminal (nothing when the output is not one)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dbf_ext.train import output_console

    console = output_console()
    return Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)


def _cmd_split(args: argparse.Namespace) -> int:
    from dbf_ext.data import split_dota
    from dbf_ext.train import output_console

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    # A DOTA folder, or a folder of them (train/, val/, test/): each split goes to DST/<split>.
    if (src / "images").is_dir():
        pairs = [(src, dst)]
    else:
        pairs = [(sub, dst / sub.name) for sub in sorted(src.iterdir()) if (sub / "images").is_dir()]
        if not pairs:
            raise FileNotFoundError(f"{src} holds neither images/ nor splits with images/ (e.g. train/images)")
    patch_size, gap, rates = _window_options(args)
    pad_value = args.pad_value[0] if len(args.pad_value) == 1 else tuple(args.pad_value)
    console = output_console()
    for source, target in pairs:
        summary = split_dota(source, target, patch_size=patch_size, gap=gap, rates=rates,
                             iof_thr=args.iof_thr, img_rate_thr=args.img_rate_thr, pad_value=pad_value,
                             save_empty=args.save_empty, workers=args.workers, console=console)
        console.print(f"{source}: {summary.images} images -> {summary.patches} patches of "
                      f"{_window_text(args)} ({summary.written} written now), {summary.objects} objects, in "
                      f"{target}", markup=False, highlight=False)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from dbf_ext.data import IMAGE_EXTENSIONS, find_images, write_dota_labels, write_dota_task1
    from dbf_ext.data.dota import boxes_to_polygons
    from dbf_ext.evaluation import detections_by_class
    from dbf_ext.inference import draw_detections, model_box_type, predict_images
    from dbf_ext.train import load_detector, resolve_device

    folder = Path(args.images)
    images = find_images(folder / "images" if (folder / "images").is_dir() else folder)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    model, classes, _ = load_detector(args.checkpoint, resolve_device(args.device))
    box_type = model_box_type(model)
    out = Path(args.out)
    (out / "labelTxt").mkdir(parents=True, exist_ok=True)
    if args.draw:
        (out / "drawings").mkdir(exist_ok=True)
    image_ids, det_results, count = [], [], 0
    with _progress() as progress:
        for image_id, pixels, result in predict_images(model, images, progress=progress,
                                                       **_prediction_options(args)):
            image_ids.append(image_id)
            det_results.append(detections_by_class(result["boxes"], result["scores"], result["labels"],
                                                   len(classes)))
            confident = (result["scores"] >= args.score_thr).numpy()
            count += int(confident.sum())
            write_dota_labels(out / "labelTxt" / f"{image_id}.txt",
                              boxes_to_polygons(result["boxes"].numpy()[confident], box_type),
                              [classes[int(label) - 1] for label in result["labels"][confident]])
            if args.draw:
                draw_detections(pixels, result, classes, box_type, args.score_thr).save(
                    out / "drawings" / f"{image_id}.jpg", quality=90)
    print(f"{len(image_ids)} images, windows {_window_text(args)}: {count} detections with score >= "
          f"{args.score_thr} as DOTA labels in {out / 'labelTxt'}")
    if args.task1:
        write_dota_task1(out, image_ids, det_results, classes, box_type)
        total = sum(len(dets) for per_class in det_results for dets in per_class)
        print(f"Task1 files (all {total} detections): {out}/Task1_<class>.txt, one per class")
    if args.draw:
        print(f"drawings: {out / 'drawings'}")
    return 0


def _windows_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in ("preset", "patch_size", "gap", "rates"))


def _window_options(args: argparse.Namespace) -> tuple[int, int, tuple[float, ...]]:
    """``(patch_size, gap, rates)``: the preset's (``ss`` by default), each replaced by the
    option given."""
    from dbf_ext.data import SPLIT_PRESETS

    preset = SPLIT_PRESETS[args.preset or "ss"]
    return (preset.patch_size if args.patch_size is None else args.patch_size,
            preset.gap if args.gap is None else args.gap,
            preset.rates if args.rates is None else tuple(args.rates))


def _window_text(args: argparse.Namespace) -> str:
    patch_size, gap, rates = _window_options(args)
    return f"{patch_size} px, gap {gap}, rates {', '.join(f'{r:g}' for r in rates)}"


def _prediction_options(args: argparse.Namespace) -> dict:
    patch_size, gap, rates = _window_options(args)
    return dict(patch_size=patch_size, gap=gap, rates=rates, batch_size=args.batch_size, iou_thr=args.merge_iou_thr)


def _cmd_masks2dota(args: argparse.Namespace) -> int:
    from dbf_ext.data import masks_to_dota

    classes = args.classes.split(",") if args.classes else None
    written = masks_to_dota(args.mask_dir, args.out_dir, class_name=args.class_name,
                            class_dir=args.class_dir, classes=classes)
    print(f"{len(written)} label files written to {args.out_dir}")
    return 0


def _epoch_list(text: str) -> tuple[int, ...]:
    """``"1,21,41"`` or ``"0-5,10"`` -> epochs."""
    epochs: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--unfrozen-epochs takes epochs like 1,21,41 or 0-5,10; got {text!r}")
        if last and int(last) < int(first):
            raise ValueError(f"--unfrozen-epochs: the range {part} runs backwards (write {last}-{first})")
        epochs.extend(range(int(first), int(last or first) + 1))
    return tuple(epochs)


_DEVICE_HELP = "auto (a GPU when usable, else the CPU), cpu, cuda or cuda:N"


def _add_window_options(parser: argparse.ArgumentParser, title: str) -> None:
    from dbf_ext.data import SPLIT_PRESETS

    group = parser.add_argument_group(title)
    presets = "; ".join(f"{name}: {p.patch_size} px, gap {p.gap}, rates {', '.join(f'{r:g}' for r in p.rates)}"
                        for name, p in SPLIT_PRESETS.items())
    group.add_argument("--preset", choices=tuple(SPLIT_PRESETS), help=f"mmrotate's split settings ({presets})")
    group.add_argument("--patch-size", type=int, help="window size at rate 1 (overrides the preset's)")
    group.add_argument("--gap", type=int, help="overlap of windows at rate 1 (overrides the preset's)")
    group.add_argument("--rates", type=float, nargs="+",
                       help="scales: windows of patch-size / rate px (overrides the preset's)")


def _add_merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=4, help="windows per model call (default %(default)s)")
    parser.add_argument("--merge-iou-thr", type=float, default=0.1,
                        help="NMS threshold merging the windows' detections, per class (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbf-ext",
        description="Dynamic training for (rotated) object detectors.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="version, compiled kernels and GPU availability")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_cmd_info)

    from dbf_ext.train.demo import DEMO_EPOCHS, DEMO_UNFROZEN_EPOCHS

    demo = commands.add_parser(
        "demo", help="train an oriented detector on the embedded synthetic aerial set from a pretrained "
                     "trunk, with DBF + feature cache, and compare with full fine-tuning")
    demo.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs to train (default %(default)s)")
    demo.add_argument("--unfrozen-epochs", default=",".join(map(str, DEMO_UNFROZEN_EPOCHS)),
                      help="epochs in which the backbone trains, frozen in the others (default %(default)s)")
    demo.add_argument("--compare", action="store_true",
                      help="also train the full fine-tuning baseline (backbone trained in every epoch, no "
                           "cache) and compare with it, instead of with the figures measured once")
    demo.add_argument("--output", default="dbf_ext_demo",
                      help="run folder (log, checkpoint, plot; a previous demo run there is replaced)")
    demo.add_argument("--plot", help="plot path (default: OUTPUT/demo.png)")
    demo.add_argument("--device", default="auto", help=_DEVICE_HELP)
    demo.set_defaults(handler=_cmd_demo)

    from dbf_ext.train import SCHEDULES, TrainConfig
    from dbf_ext.train.model import MODELS
    from dbf_ext.train.sampler import RESHARD_POLICIES

    defaults = TrainConfig(data="")
    tr = commands.add_parser("train", help="train a detector on a DOTA-format folder")
    tr.add_argument("--data", required=True, help="folder with train/ and val/ DOTA splits")
    tr.add_argument("--format", default="dota", help="dataset format (dota)")
    tr.add_argument("--output", default=defaults.output_dir,
                    help="run folder: log.jsonl, checkpoint.pt (default %(default)s)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace the run in OUTPUT (without it, a folder holding a run is refused)")
    tr.add_argument("--model", choices=MODELS, default=defaults.model,
                    help="detector (default %(default)s): " + ", ".join(MODELS))
    tr.add_argument("--backbone-weights", metavar="PATH",
                    help="initialise the trunk from a torchvision classification model's state dict "
                         "file (torch.save(torchvision.models.resnet50(...).state_dict(), PATH); "
                         "its classifier head is skipped)")
    tr.add_argument("--pretrained", action="store_true",
                    help="initialise the trunk with torchvision's ImageNet weights from the local "
                         "torch hub cache (never downloads; an error says how to get them)")
    tr.add_argument("--image-size", type=int, default=defaults.image_size,
                    help="images are resized so their sides are at most this (default %(default)s)")
    tr.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs to train (default %(default)s)")
    tr.add_argument("--batch-size", type=int, default=defaults.batch_size,
                    help="images per step and process (default %(default)s)")
    tr.add_argument("--lr", type=float, default=defaults.lr,
                    help="peak learning rate of SGD for the total batch (all processes), after "
                         "warm-up, cosine decay (default %(default)s)")
    tr.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                    help="freezing schedule of the backbone (default %(default)s)")
    tr.add_argument("--unfrozen-epochs", default="0",
                    help="step-interval: epochs in which the backbone trains, e.g. 1,21,41 or 0-5")
    tr.add_argument("--step-epoch", type=int, default=defaults.step_epoch,
                    help="even-interval: the backbone trains when epoch %% k == 0")
    tr.add_argument("--freeze-epoch", type=int, default=defaults.freeze_epoch,
                    help="frozen-after / frozen-until: the epoch of the switch")
    tr.add_argument("--cache", default=defaults.cache,
                    help="feature cache: DTYPE[:TIER=SIZE,...] (dtype float32|bfloat16|float16|"
                         "float8_e4m3; tiers gpu, cpu, disk), or off")
    tr.add_argument("--cache-dir", help="folder of the disk tier (default OUTPUT/feature_cache)")
    tr.add_argument("--hflip", type=float, default=defaults.hflip,
                    help="probability of a horizontal flip per sample and epoch (default %(default)s)")
    tr.add_argument("--vflip", type=float, default=defaults.vflip,
                    help="probability of a vertical flip per sample and epoch, drawn independently of "
                         "--hflip: both is the diagonal flip (--hflip 0.5 --vflip 0.5: none, horizontal, "
                         "vertical and diagonal a quarter each, as mmrotate's DOTA configs; default "
                         "%(default)s)")
    tr.add_argument("--dynamic-rcnn", action="store_true", help="Dynamic R-CNN label assignment")
    tr.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    tr.add_argument("--device", default="auto", help=_DEVICE_HELP)
    tr.add_argument("--workers", type=int, default=defaults.workers,
                    help="data loader worker processes (default %(default)s: load in the main process)")
    tr.add_argument("--eval-every", type=int, default=defaults.eval_every,
                    help="evaluate mAP every N epochs (default %(default)s: after the last epoch only)")
    tr.add_argument("--seed", type=int, default=defaults.seed,
                    help="seed of initialisation, shuffling and flips (default %(default)s)")
    tr.add_argument("--label-errors", choices=("raise", "warn"), default=defaults.label_errors,
                    help="a malformed label line (e.g. a polygon without area) stops the run "
                         "(raise, default) or is dropped with a warning naming file and line (warn)")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    tr.add_argument("--init-from", metavar="CKPT",
                    help="start a new run from the weights in CKPT (a checkpoint.pt of a run, or a "
                         "state dict): tensors whose names and shapes match are loaded, the rest "
                         "is reported and keeps its initialisation (e.g. fine-tuning after an "
                         "always-frozen pre-training); not with --resume")
    tr.add_argument("--feature-enhancement", action="store_true",
                    help="add the feature-enhancement regulariser in epochs where the backbone "
                         "trains: FE_L2_WEIGHT * L2(late stages) - FE_VARIANCE_WEIGHT * "
                         "Var(early stages) (see dbf_ext.regularizers)")
    tr.add_argument("--fe-l2-weight", type=float, default=defaults.fe_l2_weight,
                    help="feature enhancement: weight of the late stages' sum of squared conv / "
                         "linear weights (default %(default)s; the paper's value is not public)")
    tr.add_argument("--fe-variance-weight", type=float, default=defaults.fe_variance_weight,
                    help="feature enhancement: weight of the early stages' mean per-filter weight "
                         "variance, subtracted (default %(default)s; the paper's value is not public)")
    tr.add_argument("--sync-bn", action="store_true",
                    help="data-parallel runs on GPUs: SyncBatchNorm in the trunk while it trains "
                         "(batch statistics over all ranks' images)")
    tr.add_argument("--reshard", choices=RESHARD_POLICIES, default=defaults.reshard,
                    help="data-parallel runs: when each rank gets a new shard of the training set "
                         "(default %(default)s: in epochs where the backbone trains; never: the "
                         "first shards for the whole run); between re-deals a rank's feature "
                         "cache serves its own shard")
    tr.add_argument("--scale-lr-from", type=int, metavar="BATCH",
                    help="--lr is for a total batch of BATCH images: scaled linearly to the real "
                         "total batch (--batch-size x processes); without it --lr is the total "
                         "batch's")
    tr.add_argument("--plot", help="write losses, mAP and the freeze timeline to this PNG")
    tr.set_defaults(handler=_cmd_train)

    ev = commands.add_parser("eval", help="mAP of a checkpoint, or of Task1 result files, on a DOTA-format split")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint",
                      help="checkpoint.pt of a training run (it holds the model and its classes)")
    what.add_argument("--detections", metavar="DIR",
                      help="a folder of Task1_<class>.txt files (merged detections on the original images, "
                           "e.g. from dbf-ext predict --task1) to evaluate against the labels of --data/--split")
    ev.add_argument("--data", help="dataset folder (default: the one the checkpoint trained on)")
    ev.add_argument("--split", default="val", help="split folder of the dataset (default %(default)s)")
    ev.add_argument("--iou-thr", type=float, default=0.5,
                    help="IoU for a detection to match (default %(default)s)")
    ev.add_argument("--box-type", choices=("obb", "hbb"), default="obb",
                    help="--detections: compare rotated boxes (obb, DOTA Task1, default) or the enclosing "
                         "axis-aligned boxes (hbb)")
    _add_window_options(ev, "--checkpoint: predict the original (large) images by sliding windows, merged "
                            "(as dbf-ext predict), instead of each image at once")
    _add_merge_options(ev)
    ev.add_argument("--device", default="auto", help=_DEVICE_HELP)
    ev.set_defaults(handler=_cmd_eval)

    sp = commands.add_parser(
        "split", help="cut large images into overlapping patches (mmrotate's DOTA split: windows, IoF, names)")
    sp.add_argument("src", help="a DOTA folder (images/, labelTxt/), or a folder of them (train/, val/, test/)")
    sp.add_argument("dst", help="output folder (a DOTA folder, or one per split); an interrupted split into it "
                                "is finished")
    _add_window_options(sp, "windows (default: preset ss)")
    sp.add_argument("--iof-thr", type=float, default=0.7,
                    help="an object goes into a patch when this fraction of its area lies in the window "
                         "(default %(default)s)")
    sp.add_argument("--img-rate-thr", type=float, default=0.6,
                    help="windows whose image part is at most this fraction are dropped (default %(default)s)")
    sp.add_argument("--pad-value", type=int, nargs="+", default=[104, 116, 124], metavar="V",
                    help="padding colour as B G R (mmrotate's order), or one grey value (default: 104 116 124, "
                         "ImageNet's mean colour)")
    sp.add_argument("--save-empty", action="store_true",
                    help="also write patches without objects (always done for a folder without labels)")
    sp.add_argument("--workers", type=int, default=None,
                    help="processes (default: one per CPU core; 0: none)")
    sp.set_defaults(handler=_cmd_split)

    pr = commands.add_parser(
        "predict", help="detect objects in large images (sliding windows, merged): DOTA labels, Task1 files")
    pr.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    pr.add_argument("--images", required=True, help="folder of images (or a DOTA folder with images/)")
    pr.add_argument("--out", required=True,
                    help="output folder: labelTxt/<image>.txt (detections with score >= --score-thr as DOTA "
                         "labels), Task1_<class>.txt with --task1, drawings/ with --draw")
    pr.add_argument("--task1", action="store_true",
                    help="write DOTA Task1 result files (every detection with its score), ready for the "
                         "evaluation server")
    pr.add_argument("--draw", action="store_true", help="write drawings of the detections (JPEG)")
    pr.add_argument("--score-thr", type=float, default=0.3,
                    help="least score of a detection in labelTxt/ and the drawings (default %(default)s)")
    _add_window_options(pr, "windows (default: preset ss)")
    _add_merge_options(pr)
    pr.add_argument("--device", default="auto", help=_DEVICE_HELP)
    pr.set_defaults(handler=_cmd_predict)

    m2d = commands.add_parser(
        "masks2dota", help="PNG instance maps -> DOTA label files (minimum-area rotated boxes)")
    m2d.add_argument("mask_dir", help="folder of <image_id>.png instance maps (0 = background, "
                                      "k > 0 = instance k)")
    m2d.add_argument("out_dir", help="folder for the <image_id>.txt label files (created)")
    m2d.add_argument("--class-name", default="object",
                     help="the class of every object without --class-dir (default %(default)s)")
    m2d.add_argument("--class-dir",
                     help="folder of class maps with the same file names: value c > 0 is the "
                          "c-th name of --classes")
    m2d.add_argument("--classes", help="class names for --class-dir, comma-separated")
    m2d.set_defaults(handler=_cmd_masks2dota)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dbf_ext.train.distributed import RankMismatchError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    # Mistakes and faults of input, files and numbers: one line, no traceback. OSError covers
    # missing files, permissions, a file where a folder should be, a full disk, a worker process
    # that died.
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError, RankMismatchError) as err:
        print(f"dbf-ext {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """An error's message on one line. An error raised in a data loader worker process comes
    back with the worker's traceback in its message; its last line is the original error."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        return lines[-1]
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
