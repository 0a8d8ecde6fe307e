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
class TrainResult:
    config: TrainConfig
    history: list[EpochRecord]
    classes: tuple[str, ...]
    final_map50: float | None
    per_class_ap: dict[str, float]
    cache_summary: dict[str, Any] | None
    init_report: InitReport | None = None  # what --init-from loaded


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
