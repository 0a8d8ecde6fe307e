"""The embedded demo (``dbf-ext demo``): an oriented detector trained on the synthetic aerial set
from a pretrained trunk, with Dynamic Backbone Freezing and the feature cache, and compared with
full fine-tuning (the backbone trained in every epoch).

The trunk's starting weights ship with the package (:func:`pretrained_trunk_path`): they were
learnt on a synthetic set disjoint from the demo's (another seed) by
``tools/pretrain_demo_backbone.py``, as a real user starts from weights learnt elsewhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train.config import TrainConfig
from dbf_ext.train.engine import train
from dbf_ext.train.report import TrainResult, plot_history

DEMO_MODEL = "oriented-rcnn-resnet10-fpn-lite"
DEMO_EPOCHS = 16
DEMO_UNFROZEN_EPOCHS = (0, 8)  # the backbone trains in these epochs, frozen in the others
DEMO_CACHE = "bfloat16:cpu=1GB"
# Twice the default set's training tiles and three times its validation tiles: a validation
# split of 48 tiles (590 objects, 25 of them planes) gives an mAP that a single detection does
# not move by several points.
DEMO_SET = SyntheticConfig(train_tiles=96, val_tiles=48)


@dataclasses.dataclass(frozen=True)
class BaselineFigures:
    """A full fine-tuning run of the demo: its training time (the epochs' times summed;
    evaluation not included) and its final rotated mAP50, and where they come from."""

    seconds: float
    map50: float
    source: str


# The default demo with the backbone trained in every epoch and no cache, measured once with
# `dbf-ext demo --compare` (the figures the summary compares with, unless --compare measures
# them in the same session). The mAP is what any run on such a CPU gets (deterministic); the
# time varies with the machine and its load (the DBF run of the same session took 95.7 s).
FULL_FINE_TUNING = BaselineFigures(
    seconds=145.9, map50=0.9707,
    source="measured 2026-11-30 with --compare, 2-core Xeon, load about 2",
)


def pretrained_trunk_path() -> Path:
    """The demo trunk's pretrained weights (package data; float16 state dict of the trunk)."""
    return Path(__file__).resolve().parent.parent / "models" / "weights" / "demo_trunk_synthetic.pt"


def demo_config(data: str | Path, output_dir: str | Path, *, epochs: int = DEMO_EPOCHS,
                unfrozen_epochs: tuple[int, ...] = DEMO_UNFROZEN_EPOCHS, device: str = "auto",
                full_fine_tuning: bool = False) -> TrainConfig:
    """The demo's run: DBF (``unfrozen_epochs``) with the bfloat16 cache in host memory, or,
    with ``full_fine_tuning``, the backbone trained in every epoch without a cache. Both start
    from the pretrained trunk and replace an earlier run in ``output_dir``."""
    return TrainConfig(
        data=str(data),
        output_dir=str(output_dir),
        model=DEMO_MODEL,
        image_size=256,
        epochs=epochs,
        batch_size=4,
        lr=0.02,
        schedule="never-frozen" if full_fine_tuning else "step-interval",
        unfrozen_epochs=unfrozen_epochs,
        cache="off" if full_fine_tuning else DEMO_CACHE,
        hflip=0.5,
        vflip=0.5,
        eval_every=4,
        device=device,
        backbone_weights=str(pretrained_trunk_path()),
        overwrite=True,
    )


def training_seconds(result: TrainResult) -> float:
    return sum(record.seconds for record in result.history)


def comparison_rows(result: TrainResult, baseline: BaselineFigures) -> list[tuple[str, str]]:
    """Summary rows: the full fine-tuning baseline, and this run's time ratio and mAP
    difference to it."""
    seconds = training_seconds(result)
    return [
        ("full fine-tuning: training time, rotated mAP50",
         f"{baseline.seconds:.1f} s, {baseline.map50:.3f} ({baseline.source})"),
        ("DBF + cache: training time / full fine-tuning's",
         f"{seconds:.1f} s / {baseline.seconds:.1f} s = {seconds / baseline.seconds:.2f}"),
        ("DBF + cache: rotated mAP50 - full fine-tuning's",
         f"{result.final_map50:.3f} - {baseline.map50:.3f} = {result.final_map50 - baseline.map50:+.3f}"),
    ]


def run_demo(output: str | Path, console: Console, *, epochs: int = DEMO_EPOCHS,
             unfrozen_epochs: tuple[int, ...] = DEMO_UNFROZEN_EPOCHS, device: str = "auto",
             compare: bool = False, plot: str | Path | None = None,
             synthetic: SyntheticConfig | None = None) -> tuple[TrainResult, list[tuple[str, str]], Path]:
    """Generates the synthetic set (once), trains the demo and, with ``compare``, the full
    fine-tuning baseline (in ``output/full_fine_tuning``); writes the plot (default
    ``output/demo.png``). Returns the DBF run's result, the comparison rows (none when the
    settings differ from the default demo's and ``compare`` is off: the stored baseline would
    not apply) and the plot's path."""
    synthetic = synthetic or DEMO_SET
    root = prepare_synthetic_dota(synthetic, quiet=console.quiet)
    console.print(f"synthetic aerial set: {root} ({synthetic.train_tiles} train / {synthetic.val_tiles} "
                  f"val tiles of {synthetic.tile_size} px, 4 classes)")
    config = demo_config(root, output, epochs=epochs, unfrozen_epochs=unfrozen_epochs, device=device)
    frozen = [epoch for epoch in range(epochs) if epoch not in unfrozen_epochs]
    console.print(f"training Oriented R-CNN ({config.model}) for {epochs} epochs from the pretrained "
                  f"trunk: backbone trained in epochs {_epochs_text(unfrozen_epochs, epochs)}, frozen in "
                  f"{len(frozen)} (DBF), their features cached in bfloat16")
    result = train(config, console=console)
    plot_path = Path(plot) if plot else Path(output) / "demo.png"
    plot_history(result, plot_path)
    baseline = None
    if compare:
        console.print("full fine-tuning baseline: the same run with the backbone trained in every epoch, "
                      "no cache")
        full = train(demo_config(root, Path(output) / "full_fine_tuning", epochs=epochs, device=device,
                                 full_fine_tuning=True), console=console)
        baseline = BaselineFigures(training_seconds(full), full.final_map50, "measured in this session")
    elif (epochs, unfrozen_epochs, synthetic) == (DEMO_EPOCHS, DEMO_UNFROZEN_EPOCHS, DEMO_SET):
        baseline = FULL_FINE_TUNING
    return result, comparison_rows(result, baseline) if baseline is not None else [], plot_path


def _epochs_text(epochs: tuple[int, ...], total: int) -> str:
    shown = [str(e) for e in epochs if e < total]
    return ", ".join(shown) if shown else "none"
