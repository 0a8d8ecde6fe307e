"""Dynamic Backbone Freezing: schedules, the frozen-backbone wrapper and its epoch controller.

* Schedules (:mod:`.schedules`) decide per epoch (counted from 0) whether the backbone is
  frozen: :class:`StepInterval`, :class:`EvenInterval`, :class:`AlwaysFrozen`,
  :class:`NeverFrozen`, :class:`FrozenAfter`, :class:`FrozenUntil`, :class:`FromCallable`, and
  :func:`schedule_from_dbf_options` for the reference tool's options.
* :class:`FrozenBackbone` (:mod:`.frozen_backbone`) freezes a backbone for real: no autograd,
  eval mode, ``requires_grad=False`` and ``.grad=None``; unfreezing restores it exactly.
* :func:`apply_dbf` (:mod:`.controller`) installs the wrapper in a model and returns a
  :class:`DBFController` whose ``on_epoch_start(epoch)`` a training loop calls.

Pure Python and PyTorch; nothing here needs the compiled extension.
"""

from .controller import DBFController, apply_dbf
from .frozen_backbone import FrozenBackbone
from .schedules import (
    AlwaysFrozen,
    EvenInterval,
    FreezeRun,
    FreezeSchedule,
    FreezeTimeline,
    FromCallable,
    FrozenAfter,
    FrozenUntil,
    NeverFrozen,
    StepInterval,
    schedule_from_dbf_options,
)

__all__ = [
    "AlwaysFrozen",
    "DBFController",
    "EvenInterval",
    "FreezeRun",
    "FreezeSchedule",
    "FreezeTimeline",
    "FromCallable",
    "FrozenAfter",
    "FrozenBackbone",
    "FrozenUntil",
    "NeverFrozen",
    "StepInterval",
    "apply_dbf",
    "schedule_from_dbf_options",
]
