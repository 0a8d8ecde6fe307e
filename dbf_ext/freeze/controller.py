"""``apply_dbf``: install a :class:`FrozenBackbone` in a model and drive it with a schedule.

Training-loop contract::

    controller = apply_dbf(model, StepInterval(range(1, 100, 20)))   # model.backbone.body wrapped
    for epoch in range(start_epoch, num_epochs):
        controller.on_epoch_start(epoch)      # decides frozen / trained once for the whole epoch
        for images, targets in loader:
            ...                                # forward, backward, optimizer.step() as usual
        save({"model": model.state_dict(), "optimizer": ..., "dbf": controller.state_dict()})

The optimizer may be built before or after ``apply_dbf``: the parameters are the same objects.
An optimizer built only from parameters that require grad must be built before the first
freeze, or it would never see the backbone.

Distributed data parallel
-------------------------
The decision is a pure function of the epoch number, so every rank decides the same as long as
every rank calls ``on_epoch_start`` with the same epoch; nothing is communicated.

While the backbone is frozen its parameters take no part in the backward pass. A
``DistributedDataParallel`` built with the default ``find_unused_parameters=False`` never gets
their gradients, so its reduction never completes and the next iteration fails with "Expected to
have finished reduction in the prior iteration". Build DDP with ``find_unused_parameters=True`` (and without
``static_graph``), *before* the first freeze, and pass the DDP-wrapped model to ``apply_dbf``,
which checks both::

    ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
    controller = apply_dbf(ddp_model, schedule)

DDP registers only parameters with ``requires_grad=True`` when it is constructed. A DDP built
while the backbone is frozen would therefore never all-reduce backbone gradients after an
unfreeze, and the ranks would silently drift apart; passing the DDP model to ``apply_dbf``
rules that out, since the wrapper it installs starts unfrozen. With
``find_unused_parameters=True`` the frozen parameters are marked unused in every frozen
iteration and their ``.grad`` stays None on all ranks, so optimizers still skip them. The price:
DDP traverses the autograd graph after each forward, still all-reduces the (zero-filled) backbone
gradient buckets in frozen epochs, and in trained epochs warns once that it found no unused
parameters (harmless).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .frozen_backbone import FrozenBackbone
from .schedules import FreezeSchedule, FromCallable, _check_epoch_index

__all__ = ["DBFController", "apply_dbf"]

logger = logging.getLogger(__name__)


def _state_word(frozen: bool) -> str:
    return "frozen" if frozen else "trained"


class DBFController:
    """Applies a freezing schedule to a :class:`FrozenBackbone`, once per epoch.

    Built by :func:`apply_dbf`. ``ddp_checked`` says that apply_dbf saw and checked the
    DistributedDataParallel wrapper; when it did not and the run is distributed, the first
    ``on_epoch_start`` logs a warning about the DDP requirements (module docstring).

    Attributes:
        backbone: the installed wrapper.
        schedule: the schedule deciding each epoch.
        epoch: the last epoch passed to :meth:`on_epoch_start` (None before the first call).
    """

    def __init__(self, backbone: FrozenBackbone, schedule: FreezeSchedule, ddp_checked: bool = False):
        self.backbone = backbone
        self.schedule = schedule
        self.epoch: int | None = None
        # apply_dbf could not see the DDP wrapper (if any): warn once in a distributed run.
        self._warn_unchecked_ddp = not ddp_checked

    @property
    def is_frozen(self) -> bool:
        return self.backbone.frozen

    def on_epoch_start(self, epoch: int) -> bool:
        """Freeze or unfreeze the backbone for ``epoch`` (counted from 0); call before each epoch.

        Returns:
            True when the state changed (a transition, logged at INFO level).
        """
        epoch = _check_epoch_index(epoch, "epoch")
        if self._warn_unchecked_ddp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            logger.warning(
                "DBF in a distributed run, but apply_dbf was not given the DistributedDataParallel model: "
                "build DDP with find_unused_parameters=True before the first freeze and pass it to apply_dbf, "
                "or frozen epochs fail ('Expected to have finished reduction') or ranks silently diverge"
            )
            self._warn_unchecked_ddp = False
        frozen = self.schedule.is_frozen(epoch)
        changed = frozen != self.backbone.frozen
        if changed:
            self.backbone.set_frozen(frozen)
            logger.info("DBF epoch %d: backbone %s (was %s)", epoch, _state_word(frozen), _state_word(not frozen))
        else:
            logger.debug("DBF epoch %d: backbone stays %s", epoch, _state_word(frozen))
        self.epoch = epoch
        return changed

    def state_dict(self) -> dict[str, Any]:
        """Schedule parameters, last epoch and current state; plain values (weights_only safe)."""
        return {"epoch": self.epoch, "frozen": self.is_frozen, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: restore the schedule parameters, the last epoch and the frozen state.

        The checkpoint's schedule parameters replace the configured ones (as PyTorch LR schedulers
        do); a difference is logged as a warning. The schedule type must match.
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"epoch", "frozen", "schedule"}:
            raise ValueError("DBF controller state_dict must be a mapping with keys 'epoch', 'frozen', 'schedule'")
        epoch, frozen = state_dict["epoch"], state_dict["frozen"]
        if epoch is not None:
            epoch = _check_epoch_index(epoch, "state_dict['epoch']")
        if not isinstance(frozen, bool):
            raise TypeError(f"state_dict['frozen'] must be a bool, got {type(frozen).__name__}")
        configured = self.schedule.state_dict()
        self.schedule.load_state_dict(state_dict["schedule"])
        if self.schedule.state_dict() != configured:
            logger.warning("DBF resume: checkpoint schedule %r replaces the configured %r", self.schedule, configured)
        self.backbone.set_frozen(frozen)
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"DBFController(schedule={self.schedule!r}, epoch={self.epoch}, frozen={self.is_frozen})"


def _as_schedule(schedule: FreezeSchedule | Callable[[int], bool]) -> FreezeSchedule:
    if isinstance(schedule, FreezeSchedule):
        return schedule
    if callable(schedule):
        return FromCallable(schedule)
    raise TypeError(f"schedule must be a FreezeSchedule or a callable epoch -> bool, got {type(schedule).__name__}")


def _check_ddp(ddp_model: DistributedDataParallel) -> None:
    if not ddp_model.find_unused_parameters or ddp_model.static_graph:
        raise ValueError(
            "dynamic backbone freezing needs DistributedDataParallel(..., find_unused_parameters=True) "
            "without static_graph: frozen backbone parameters receive no gradient, which DDP otherwise "
            "reports as 'Expected to have finished reduction in the prior iteration'"
        )


def _resolve_submodule(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute name, module)`` at dotted ``path``; no FrozenBackbone on the way or below.

    Walks registered children only (not attributes), so a FrozenBackbone's attribute fall-through
    cannot make a module look like a child of the wrapper.
    """
    atoms = path.split(".")
    if "" in atoms:
        raise ValueError(f"backbone must be a dotted path such as 'backbone.body', got {path!r}")
    parent = model
    for depth, atom in enumerate(atoms):
        walked = ".".join(atoms[:depth]) or "the model"
        if isinstance(parent, FrozenBackbone):
            raise ValueError(f"{walked!r} is already a FrozenBackbone (apply_dbf was called twice?)")
        child = parent._modules.get(atom)
        if child is None:
            raise ValueError(f"model has no submodule {path!r}: {walked} has children {list(parent._modules)}")
        if depth < len(atoms) - 1:
            parent = child
    if any(isinstance(module, FrozenBackbone) for module in child.modules()):
        raise ValueError(f"{path!r} already is or contains a FrozenBackbone (apply_dbf was called twice?)")
    return parent, atoms[-1], child


def apply_dbf(
    model: nn.Module,
    schedule: FreezeSchedule | Callable[[int], bool],
    backbone: str = "backbone.body",
) -> DBFController:
    """Wrap ``model``'s submodule at dotted path ``backbone`` in a :class:`FrozenBackbone`, in place.

    Args:
        model: the detector, or a ``DistributedDataParallel`` / ``DataParallel`` around it (the
            wrapper is installed in ``model.module``; DDP must use ``find_unused_parameters=True``).
        schedule: a :class:`FreezeSchedule`, or a callable ``epoch -> bool`` (True = frozen).
        backbone: dotted path of the module to freeze. The default ``"backbone.body"`` is the
            ResNet / MobileNet trunk of torchvision's Faster R-CNN, RetinaNet, FCOS, ... (the FPN
            neck, ``backbone.fpn``, keeps training).

    Returns:
        The controller; call ``on_epoch_start(epoch)`` before every epoch. The backbone is
        unfrozen until then.
    """
    schedule = _as_schedule(schedule)
    ddp_checked = isinstance(model, DistributedDataParallel)
    if ddp_checked:
        _check_ddp(model)
        model = model.module
    elif isinstance(model, nn.DataParallel):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    parent, name, target = _resolve_submodule(model, backbone)
    wrapper = FrozenBackbone(target)
    setattr(parent, name, wrapper)
    return DBFController(wrapper, schedule, ddp_checked=ddp_checked)
