"""What a run leaves in its folder: the checkpoint (written first, atomically) and the JSON-lines log that
agrees with it after any crash."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from dbf_ext._io import write_durably
from dbf_ext.train.config import TrainConfig
from dbf_ext.train.model import build_detector
from dbf_ext.train.report import EpochRecord, InitReport


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a training checkpoint, or of another
    model or class list. The message names the file."""


# What train() writes into a checkpoint; a file without these is not one of its checkpoints.
_CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "dbf", "dynamic_rcnn",
                    "cache", "history", "config", "classes")


def _first_line(err: BaseException) -> str:
    """torch's load errors carry messages of many lines; the first says what went wrong."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_weights_file(path: str | Path, map_location: str | torch.device = "cpu",
                      what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)``; a missing file is ``FileNotFoundError``, an
    unreadable one a one-line :class:`CheckpointError` (``what`` names the file's role)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # the disk's fault, not the file's content: reported as such
    # Damage makes torch.load fail in many ways: RuntimeError (zip), UnpicklingError (not plain
    # data), EOFError (empty), and IndexError, KeyError, TypeError, ... when random bytes drive
    # the unpickler's opcodes.
    except Exception as err:
        raise CheckpointError(f"{what} {path} cannot be read (corrupt, truncated or not plain "
                              f"tensors saved by torch): {_first_line(err)}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True``.

    Raises :class:`CheckpointError` (one line, naming the file) when the file cannot be read
    or is not such a checkpoint, ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    state = read_weights_file(path, map_location)
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
        raise CheckpointError(f"the weights in {path} do not fit model {state['config']['model']} "
                              f"with {len(state['classes'])} classes: {_first_line(err)}") from None


def load_detector(path: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[torch.nn.Module, tuple[str, ...], dict[str, Any]]:
    """The detector of a checkpoint written by :func:`train`, ready for inference.

    Returns ``(model, classes, config)``: the model built as it was trained, with the
    checkpoint's weights, on ``device``, in eval mode; the class names in its label order
    (label ``k`` is ``classes[k - 1]``); the run's configuration (a dict of
    :class:`~dbf_ext.train.TrainConfig`'s fields). Unusable files raise as
    :func:`load_checkpoint` and :func:`load_model_weights` do.
    """
    state = load_checkpoint(path)
    config, classes = state["config"], tuple(state["classes"])
    model = build_detector(config["model"], len(classes), config["image_size"])
    load_model_weights(model, state, path)
    return model.to(device).eval(), classes, config


def load_matching_weights(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Loads into ``model`` every tensor of ``path`` whose name and shape match its state dict.

    ``path``: a checkpoint written by :func:`train` (its ``"model"``) or a plain state dict
    (name -> tensor), read with ``weights_only=True``. Tensors of another shape (a box
    predictor for another class count) are skipped, the model's tensors the file lacks keep
    their initialisation; the returned :class:`InitReport` names both. A file matching no
    tensor at all is a :class:`CheckpointError` (a run that loaded nothing would look like a
    fine-tuning run but start from scratch).
    """
    path = Path(path)
    state = read_weights_file(path, "cpu", what="weights file")
    weights = state.get("model") if isinstance(state, dict) and "model" in state else state
    if not isinstance(weights, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"{path} is neither a dbf-ext training checkpoint nor a state dict "
                              "(a mapping of names to tensors)")
    own = model.state_dict()
    matching = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    report = InitReport(
        loaded=list(matching),
        skipped=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in weights.items()
                 if k in own and k not in matching],
        missing=[k for k in own if k not in weights],
        unused=[k for k in weights if k not in own],
    )
    if not matching:
        raise CheckpointError(f"no tensor of {path} matches this model by name and shape "
                              f"({len(weights)} tensors in the file, {len(own)} in the model)")
    model.load_state_dict(matching, strict=False)
    return report


def check_resumable(state: dict[str, Any], path: Path, config: TrainConfig, classes: tuple[str, ...]) -> None:
    trained = state["config"]["model"], tuple(state["classes"])
    if trained != (config.model, classes):
        raise CheckpointError(
            f"{path} holds model {trained[0]} for classes {', '.join(trained[1])}; this run builds "
            f"{config.model} for classes {', '.join(classes)} (same --model and data to resume)"
        )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    write_durably(path, "wb", lambda file: torch.save(state, file))


def _log_line(record: EpochRecord) -> str:
    return json.dumps(dataclasses.asdict(record)) + "\n"


def append_log(path: Path, record: EpochRecord) -> None:
    with path.open("a") as log:
        log.write(_log_line(record))
        log.flush()
        os.fsync(log.fileno())


def rewrite_log(path: Path, history: list[EpochRecord]) -> None:
    """The log of the epochs a checkpoint holds: lines a crash left past the checkpoint (or
    cut in half) go, a line the crash kept from being written comes back."""
    write_durably(path, "w", lambda log: log.writelines(_log_line(record) for record in history))


def check_run_folder(config: TrainConfig, out: Path) -> None:
    checkpoint, log = out / "checkpoint.pt", out / "log.jsonl"
    if config.resume and not checkpoint.exists():
        raise FileNotFoundError(f"nothing to resume: no checkpoint {checkpoint} (run without --resume "
                                "to start a new run)")
    if not config.resume and not config.overwrite and (checkpoint.exists() or log.exists()):
        raise FileExistsError(f"{out} holds a run (checkpoint.pt, log.jsonl): --resume continues it, "
                              "--overwrite replaces it, or choose another --output")
