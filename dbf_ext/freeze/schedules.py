"""Freezing schedules for Dynamic Backbone Freezing (DBF).

A schedule answers one question, once before each epoch: is the backbone frozen in epoch ``e``?
Epochs count from 0, as in mmcv / mmengine runners (``runner.epoch`` before the first epoch
is 0). Every schedule is a pure function of the epoch number: the same epoch always gives the
same answer, in every process, so all ranks of a distributed run agree without communicating.

``True`` means *frozen*, ``False`` means *trained* throughout this module.

Schedules carry their parameters in ``state_dict()`` (plain ints, lists and strings, so a
checkpoint holding them loads with ``torch.load(..., weights_only=True)``) and ``describe()``
gives the timeline of a run for logs and plots.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dbf_ext._validation import as_integer

__all__ = [
    "AlwaysFrozen",
    "EvenInterval",
    "FreezeRun",
    "FreezeSchedule",
    "FreezeTimeline",
    "FromCallable",
    "FrozenAfter",
    "FrozenUntil",
    "NeverFrozen",
    "StepInterval",
    "schedule_from_dbf_options",
]

logger = logging.getLogger(__name__)


def _check_epoch_index(value: Any, what: str) -> int:
    """``value`` as a non-negative Python int (see :func:`dbf_ext._validation.as_integer`)."""
    return as_integer(what, value, 0, "epochs count from 0")


class FreezeRun(NamedTuple):
    """A maximal run of consecutive epochs ``first..last`` (inclusive) in the same state."""

    first: int
    last: int
    frozen: bool


@dataclass(frozen=True)
class FreezeTimeline:
    """The decisions of a schedule for epochs ``0 .. num_epochs - 1``.

    ``frozen[e]`` is True when the backbone is frozen in epoch ``e``. ``str(timeline)`` is the
    run-length summary, e.g. ``"epochs 0 frozen, 1 trained, 2-20 frozen, 21 trained, ..."``.
    """

    frozen: tuple[bool, ...]

    @property
    def num_epochs(self) -> int:
        return len(self.frozen)

    @property
    def num_frozen(self) -> int:
        return sum(self.frozen)

    @property
    def num_trained(self) -> int:
        return self.num_epochs - self.num_frozen

    @property
    def compact(self) -> str:
        """One letter per epoch, space separated: ``F`` = frozen, ``T`` = trained."""
        return " ".join("F" if frozen else "T" for frozen in self.frozen)

    @property
    def runs(self) -> tuple[FreezeRun, ...]:
        """Maximal runs of equal decisions, in epoch order."""
        runs: list[FreezeRun] = []
        for epoch, frozen in enumerate(self.frozen):
            if runs and runs[-1].frozen == frozen:
                runs[-1] = runs[-1]._replace(last=epoch)
            else:
                runs.append(FreezeRun(epoch, epoch, frozen))
        return tuple(runs)

    @property
    def summary(self) -> str:
        """Run-length text: ``"epochs 0 frozen, 1-2 trained, 3-9 frozen"``."""
        if not self.frozen:
            return "no epochs"
        parts = []
        for run in self.runs:
            span = str(run.first) if run.first == run.last else f"{run.first}-{run.last}"
            parts.append(f"{span} {'frozen' if run.frozen else 'trained'}")
        return "epochs " + ", ".join(parts)

    def __str__(self) -> str:
        return self.summary


class FreezeSchedule(abc.ABC):
    """Base class: decides per epoch whether the backbone is frozen.

    Subclasses implement ``_frozen_at(epoch)`` (epoch already validated) and, when they have
    parameters, list them in ``_CONFIG_KEYS`` and implement ``_configure`` (validate and set,
    used by ``__init__`` and ``load_state_dict``) and ``_config`` (current values).
    """

    _CONFIG_KEYS: tuple[str, ...] = ()

    def is_frozen(self, epoch: int) -> bool:
        """True when the backbone is frozen in ``epoch`` (an int >= 0, counted from 0)."""
        return self._frozen_at(_check_epoch_index(epoch, "epoch"))

    @abc.abstractmethod
    def _frozen_at(self, epoch: int) -> bool: ...

    def _configure(self) -> None:  # noqa: B027 (a hook: schedules without parameters keep it empty)
        """Validate and store parameters; schedules without parameters have nothing to do."""

    def _config(self) -> dict[str, Any]:
        """Current parameters as plain Python values, keyed by ``_CONFIG_KEYS``."""
        return {}

    def describe(self, num_epochs: int) -> FreezeTimeline:
        """Timeline of epochs ``0 .. num_epochs - 1`` (see :class:`FreezeTimeline`)."""
        num_epochs = _check_epoch_index(num_epochs, "num_epochs")
        return FreezeTimeline(tuple(self._frozen_at(epoch) for epoch in range(num_epochs)))

    def state_dict(self) -> dict[str, Any]:
        """``{"type": class name, **parameters}``; plain values only (safe for weights_only)."""
        return {"type": type(self).__name__, **self._config()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore parameters saved by ``state_dict()`` of the same schedule class."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        saved_type = state_dict.get("type")
        if saved_type != type(self).__name__:
            raise ValueError(
                f"state_dict is for schedule type {saved_type!r}, cannot load it into {type(self).__name__}"
            )
        params = {key: value for key, value in state_dict.items() if key != "type"}
        if set(params) != set(self._CONFIG_KEYS):
            raise ValueError(
                f"{type(self).__name__} state_dict needs keys {sorted(self._CONFIG_KEYS)}, got {sorted(params)}"
            )
        self._configure(**params)

    def __repr__(self) -> str:
        params = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({params})"


class StepInterval(FreezeSchedule):
    """The backbone trains in the listed epochs and is frozen in every other epoch.

    This is the reference tool's ``DBF_step_interval`` with ``--dbf-options "{'steps': ...}"``:
    ``StepInterval(range(1, 100, 20))`` trains the backbone in epochs 1, 21, 41, 61 and 81 only
    (5 of 100 epochs) and freezes it in the other 95.

    Args:
        unfrozen_epochs: iterable of epoch numbers (ints >= 0; a ``range`` is fine). Order and
            duplicates do not matter. An empty iterable freezes the backbone in every epoch.
    """

    _CONFIG_KEYS = ("unfrozen_epochs",)

    def __init__(self, unfrozen_epochs: Iterable[int]):
        self._configure(unfrozen_epochs)

    def _configure(self, unfrozen_epochs: Iterable[int]) -> None:
        # A string is iterable too, but "1,21" would silently become the characters '1', ',' ...
        if isinstance(unfrozen_epochs, (str, bytes, Mapping)) or not isinstance(unfrozen_epochs, Iterable):
            raise TypeError(
                "unfrozen_epochs must be an iterable of epoch numbers, e.g. [1, 21] or range(1, 100, 20); "
                f"got {type(unfrozen_epochs).__name__}"
            )
        epochs = {_check_epoch_index(epoch, "each of unfrozen_epochs") for epoch in unfrozen_epochs}
        self.unfrozen_epochs: tuple[int, ...] = tuple(sorted(epochs))
        self._unfrozen_set = frozenset(epochs)

    def _config(self) -> dict[str, Any]:
        return {"unfrozen_epochs": list(self.unfrozen_epochs)}

    def _frozen_at(self, epoch: int) -> bool:
        return epoch not in self._unfrozen_set


class EvenInterval(FreezeSchedule):
    """The backbone trains when ``epoch % step_epoch == 0`` and is frozen otherwise.

    The reference tool's ``step_even_interval`` with ``{'step_epoch': k}``: ``EvenInterval(10)``
    trains in epochs 0, 10, 20, ... ``EvenInterval(1)`` never freezes.
    """

    _CONFIG_KEYS = ("step_epoch",)

    def __init__(self, step_epoch: int):
        self._configure(step_epoch)

    def _configure(self, step_epoch: int) -> None:
        step_epoch = _check_epoch_index(step_epoch, "step_epoch")
        if step_epoch == 0:
            raise ValueError("step_epoch must be >= 1")
        self.step_epoch = step_epoch

    def _config(self) -> dict[str, Any]:
        return {"step_epoch": self.step_epoch}

    def _frozen_at(self, epoch: int) -> bool:
        return epoch % self.step_epoch != 0


class AlwaysFrozen(FreezeSchedule):
    """The backbone is frozen in every epoch (e.g. MutDet-style training of a detector head)."""

    def _frozen_at(self, epoch: int) -> bool:
        return True


class NeverFrozen(FreezeSchedule):
    """The backbone trains in every epoch (ordinary training; a baseline for comparisons)."""

    def _frozen_at(self, epoch: int) -> bool:
        return False


class _Threshold(FreezeSchedule):
    """Shared parameter handling of the two schedules that switch once, at epoch ``n``."""

    _CONFIG_KEYS = ("n",)

    def __init__(self, n: int):
        self._configure(n)

    def _configure(self, n: int) -> None:
        self.n = _check_epoch_index(n, "n")

    def _config(self) -> dict[str, Any]:
        return {"n": self.n}


class FrozenAfter(_Threshold):
    """Trains in epochs ``0 .. n-1``; frozen from epoch ``n`` on (fine-tune, then fix features).

    ``FrozenAfter(0)`` is always frozen.
    """

    def _frozen_at(self, epoch: int) -> bool:
        return epoch >= self.n


class FrozenUntil(_Threshold):
    """Frozen in epochs ``0 .. n-1``; trains from epoch ``n`` on (warm up the head first).

    ``FrozenUntil(0)`` is never frozen.
    """

    def _frozen_at(self, epoch: int) -> bool:
        return epoch < self.n


class FromCallable(FreezeSchedule):
    """Any function ``epoch -> bool`` (True = frozen).

    The function must be a pure function of the epoch (no randomness, no state), or ranks of a
    distributed run may disagree. It must return a ``bool`` (numpy bools are accepted): an int
    such as ``epoch % 10`` is rejected rather than guessed at, since ``0`` would mean "trained".

    The function itself is not serialised: ``state_dict()`` records only its qualified name, and
    ``load_state_dict()`` keeps the function given to the constructor (warning when the name
    differs from the recorded one).
    """

    _CONFIG_KEYS = ("fn_name",)

    def __init__(self, fn: Callable[[int], bool]):
        if not callable(fn):
            raise TypeError(f"fn must be callable (epoch -> bool), got {type(fn).__name__}")
        self.fn = fn
        self.fn_name = getattr(fn, "__qualname__", type(fn).__qualname__)

    def _configure(self, fn_name: str) -> None:
        if fn_name != self.fn_name:
            logger.warning(
                "FromCallable state was saved for function %r; keeping the current function %r",
                fn_name,
                self.fn_name,
            )

    def _config(self) -> dict[str, Any]:
        return {"fn_name": self.fn_name}

    def _frozen_at(self, epoch: int) -> bool:
        frozen = self.fn(epoch)
        if not isinstance(frozen, (bool, np.bool_)):
            raise TypeError(
                f"{self.fn_name}({epoch}) returned {frozen!r} ({type(frozen).__name__}); "
                "a freezing function must return a bool (True = frozen)"
            )
        return bool(frozen)


# name -> (schedule class, {reference option key: constructor argument}, example options)
_DBF_OPTION_SCHEDULES: dict[str, tuple[type[FreezeSchedule], dict[str, str], str]] = {
    "step_interval": (StepInterval, {"steps": "unfrozen_epochs"}, "{'steps': range(1, 100, 20)}"),
    "step_even_interval": (EvenInterval, {"step_epoch": "step_epoch"}, "{'step_epoch': 10}"),
}


def schedule_from_dbf_options(name: str, options: Mapping[str, Any]) -> FreezeSchedule:
    """Build a schedule from the reference DBF tool's ``--dbf`` name and ``--dbf-options`` dict.

    ``("step_interval", {"steps": [...] or range(...)})`` gives :class:`StepInterval` (the
    backbone trains in the listed epochs); ``("step_even_interval", {"step_epoch": k})`` gives
    :class:`EvenInterval`. ``options`` must already be a mapping: parsing the command-line string
    is the caller's business (the reference ``eval``s it, which we do not).

    Raises:
        ValueError: unknown name, or missing / unexpected option keys.
        TypeError: ``options`` is not a mapping, or a value has the wrong type.
    """
    if name not in _DBF_OPTION_SCHEDULES:
        raise ValueError(f"unknown DBF schedule {name!r}; known: {', '.join(map(repr, _DBF_OPTION_SCHEDULES))}")
    schedule_type, argument_of_key, example = _DBF_OPTION_SCHEDULES[name]
    if not isinstance(options, Mapping):
        raise TypeError(f"DBF options for {name!r} must be a mapping such as {example}, got {type(options).__name__}")
    missing = sorted(set(argument_of_key) - set(options))
    unexpected = sorted(set(options) - set(argument_of_key))
    if missing or unexpected:
        raise ValueError(
            f"DBF options for {name!r} must have exactly the key(s) {sorted(argument_of_key)}, e.g. {example}; "
            f"missing {missing}, unexpected {unexpected}"
        )
    return schedule_type(**{argument: options[key] for key, argument in argument_of_key.items()})
