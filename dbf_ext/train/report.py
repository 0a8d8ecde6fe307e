"""What a run reports: per-epoch records, the console (progress, one line per epoch), the summary table
and the plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dbf_ext.train.config import TrainConfig


@dataclasses.dataclass
class EpochRecord:
    epoch: int
    frozen: bool
    seconds: float
    images_per_second: float
    losses: dict[str, float]
    cache_hit_rate: float | None = None  # all ranks' hits over all their lookups
    cache_bytes: int | None = None  # all ranks'
    map50: float | None = None
    dynamic_rcnn: dict[str, float] | None = None
    # Mean unweighted parts of the feature-enhancement term ("l2", "variance") over the
    # epoch's steps; None in frozen epochs and runs without it.
    feature_enhancement: dict[str, float] | None = None
    # Each rank's own hit rate, in rank order (data-parallel runs only).
    cache_hit_rate_per_rank: list[float] | None = None


@dataclasses.dataclass
class InitReport:
    """What :func:`~dbf_ext.train.checkpoint.load_matching_weights` did, by state-dict name."""

    loaded: list[str]
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # name, shape in file, in model
    missing: list[str]  # in the model, not in the file: keep their initialisation
    unused: list[str]  # in the file, not in the model

    def lines(self) -> list[str]:
        """One line each: loaded, skipped by shape, missing, unused."""
        total = len(self.loaded) + len(self.skipped) + len(self.missing)
        skipped = ", ".join(f"{name} {list(file)} -> {list(model)}" for name, file, model in self.skipped)
        return [
            f"loaded {len(self.loaded)} of the model's {total} tensors",
            f"skipped (shape differs, file -> model) {len(self.skipped)}: {skipped or '-'}",
            f"missing from the file (initialised afresh) {len(self.missing)}: "
            f"{', '.join(self.missing) or '-'}",
            f"unused (not in this model) {len(self.unused)}: {', '.join(self.unused) or '-'}",
        ]


@dataclasses.dataclass
class ValidationExample:
    """One validation tile with its ground truth and the final model's detections (the plot
    draws them). Boxes are ``(K, 4)`` axis-aligned or ``(K, 5)`` rotated (``box_type``) in the
    tile's pixels; labels are 0-based class indices; difficult objects are left out."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    box_type: str
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def most_crowded(cls, dataset: Any, predictions: list[dict[str, Any]]) -> ValidationExample:
        """The tile of ``dataset`` (a :class:`~dbf_ext.data.DotaDetectionDataset`) with the most
        objects (the first of those), with its entry of ``predictions`` (torchvision-style
        outputs in dataset order, labels 1-based)."""
        annotations = dataset.eval_annotations()
        index = int(np.argmax([len(ann["labels"]) for ann in annotations]))
        image = dataset.load_image(index).mul(255).round().byte().permute(1, 2, 0).numpy()
        output = predictions[index]
        return cls(dataset.image_ids[index], image, dataset.box_type,
                   annotations[index]["bboxes"], annotations[index]["labels"],
                   output["boxes"].double().numpy(), output["scores"].double().numpy(),
                   output["labels"].numpy() - 1)


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord]
    classes: tuple[str, ...]
    final_map50: float | None
    per_class_ap: dict[str, float]
    cache_summary: dict[str, Any] | None
    init_report: InitReport | None = None  # what --init-from loaded
    box_type: str = "hbb"  # of the model: "obb" means rotated boxes and rotated mAP
    example: ValidationExample | None = None  # a validation tile with the final detections

    @property
    def map_name(self) -> str:
        """What ``final_map50`` is: ``"rotated mAP50"`` (rotated IoU) or ``"mAP50"``."""
        return "rotated mAP50" if self.box_type == "obb" else "mAP50"


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


def progress_bar(console: Console) -> Progress:
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


def epoch_line(record: EpochRecord) -> str:
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
            *([("  per rank", " / ".join(f"{rate:.0%}" for rate in cache["hit_rate_per_rank"]))]
              if "hit_rate_per_rank" in cache else []),
            ("cache bytes per image", f"{cache['bytes_per_sample'] / 1024:.0f} KiB"),
            ("cache entries (gpu / cpu / disk)",
             " / ".join(str(cache["entries"][t]) for t in ("gpu", "cpu", "disk"))),
        ]
    if result.final_map50 is not None:
        rows.append((f"{result.map_name} (VOC07, val)", f"{result.final_map50:.3f}"))
        rows += [(f"  AP50 {name}", f"{ap:.3f}") for name, ap in result.per_class_ap.items()]
    return rows


def plot_history(result: TrainResult, path: str | Path, score_threshold: float = 0.5) -> None:
    """Losses, mAP and the freeze timeline per epoch, as a PNG; beside them, when the result has
    a :class:`ValidationExample`, its tile with the ground truth (white, dashed) and the final
    model's detections scoring at least ``score_threshold`` (coloured by class) drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.history]
    example = result.example
    fig = plt.figure(figsize=(13 if example is not None else 8, 6))
    grid = fig.add_gridspec(2, 2 if example is not None else 1, height_ratios=[3, 2],
                            width_ratios=[8, 5] if example is not None else None)
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_time = fig.add_subplot(grid[1, 0], sharex=ax_loss)
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
        ax_map.plot(*zip(*evaluated), "o-", color="tab:red", label=f"{result.map_name} (val)")
        ax_map.set_ylabel(result.map_name, color="tab:red")
        ax_map.set_ylim(0, 1)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title("dbf_ext training (shaded: backbone frozen)")
    ax_time.bar(epochs, [r.seconds for r in result.history],
                color=["tab:blue" if r.frozen else "tab:orange" for r in result.history])
    ax_time.set_ylabel("epoch time (s)")
    ax_time.set_xlabel("epoch (blue: frozen backbone, orange: backbone trains)")
    if example is not None:
        _draw_example(fig.add_subplot(grid[:, 1]), example, result.classes, score_threshold)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_example(ax: Any, example: ValidationExample, classes: tuple[str, ...], score_threshold: float) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Polygon

    from dbf_ext.data.dota import boxes_to_polygons

    colours = [f"C{c}" for c in range(len(classes))]
    ax.imshow(example.image)
    for corners in boxes_to_polygons(example.gt_boxes, example.box_type):
        ax.add_patch(Polygon(corners.reshape(4, 2), closed=True, fill=False, ec="white", lw=1.6, ls="--"))
    shown = example.scores >= score_threshold
    for corners, label in zip(boxes_to_polygons(example.boxes[shown], example.box_type), example.labels[shown]):
        ax.add_patch(Polygon(corners.reshape(4, 2), closed=True, fill=False, ec=colours[label], lw=1.2))
    handles = [Line2D([], [], color="white", ls="--", label="ground truth")]
    handles += [Line2D([], [], color=colour, label=name) for name, colour in zip(classes, colours)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=8,
              facecolor="0.85")
    kind = "rotated boxes" if example.box_type == "obb" else "boxes"
    ax.set_title(f"val tile {example.image_id}: detections (score >= {score_threshold:g}, {kind})",
                 fontsize=9)
    ax.set_axis_off()
