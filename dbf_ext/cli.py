"""The ``dbf-ext`` command line (also ``python -m dbf_ext``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def _print_summary(result, console) -> None:
    from rich.table import Table

    from dbf_ext.train import summary_rows

    table = Table(title="dbf_ext training summary", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
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
    from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
    from dbf_ext.train import TrainConfig
    from dbf_ext.train.distributed import is_main_process

    # Under torchrun every rank prepares the set (a lost race is harmless); rank 0 reports.
    say = print if is_main_process() else (lambda *_: None)
    root = prepare_synthetic_dota(SyntheticConfig(), quiet=not is_main_process())
    say(f"synthetic aerial set: {root} (48 train / 16 val tiles, 4 classes)")
    config = TrainConfig(
        data=str(root),
        output_dir=args.output,
        epochs=args.epochs,
        schedule="step-interval",
        unfrozen_epochs=tuple(range(args.unfrozen)),
        cache="bfloat16:cpu=1GB",
        eval_every=4,
        device=args.device,
    )
    say(f"training Faster R-CNN ({config.model}) for {config.epochs} epochs: backbone trained in "
        f"epochs 0-{args.unfrozen - 1}, frozen after (DBF), features cached in bfloat16")
    return _run_training(config, args.plot or str(Path(args.output) / "demo.png"))


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
    from dbf_ext.data import DotaDetectionDataset
    from dbf_ext.train import build_detector, evaluate, init_distributed, load_checkpoint, load_model_weights

    context = init_distributed(args.device)  # started by torchrun: the ranks share the images
    try:
        state = load_checkpoint(args.checkpoint)
        config, classes = state["config"], tuple(state["classes"])
        # The classes the model was trained for, in its label order: the training folder may
        # have moved or changed since.
        dataset = DotaDetectionDataset(args.data or config["data"], args.split, classes=classes)
        model = build_detector(config["model"], len(classes), config["image_size"])
        load_model_weights(model, state, args.checkpoint)
        mean_ap, per_class = evaluate(model.to(context.device), dataset, context.device,
                                      iou_thr=args.iou_thr, context=context)
    finally:
        context.close()
    if not context.is_main:
        return 0
    print(f"mAP@{args.iou_thr} (VOC07) on {len(dataset)} images of '{args.split}': {mean_ap:.4f}")
    for name, ap in per_class.items():
        print(f"  {name:24s} {ap:.4f}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbf-ext",
        description="Dynamic training for (rotated) object detectors.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="version, compiled kernels and GPU availability")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_cmd_info)

    demo = commands.add_parser(
        "demo", help="train on the embedded synthetic aerial set with DBF + feature cache")
    demo.add_argument("--epochs", type=int, default=16, help="epochs to train (default 16)")
    demo.add_argument("--unfrozen", type=int, default=6,
                      help="the backbone trains in the first N epochs, frozen after (default 6)")
    demo.add_argument("--output", default="dbf_ext_demo", help="run folder (log, checkpoint, plot)")
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

    ev = commands.add_parser("eval", help="mAP of a checkpoint on a DOTA-format split")
    ev.add_argument("--checkpoint", required=True,
                    help="checkpoint.pt of a training run (it holds the model and its classes)")
    ev.add_argument("--data", help="dataset folder (default: the one the checkpoint trained on)")
    ev.add_argument("--split", default="val", help="split folder of the dataset (default %(default)s)")
    ev.add_argument("--iou-thr", type=float, default=0.5,
                    help="IoU for a detection to match (default %(default)s)")
    ev.add_argument("--device", default="auto", help=_DEVICE_HELP)
    ev.set_defaults(handler=_cmd_eval)

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
    # missing files, permissions, a file where a folder should be, a full disk.
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
