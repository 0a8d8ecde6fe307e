"""``DBFHook`` for mmengine's ``Runner`` (mmdet 3.x and the other OpenMMLab 2.0 libraries):
Dynamic Backbone Freezing and the feature cache from a config. Importing this module registers
the hook in mmengine's ``HOOKS`` (which mmdet's registry falls back to)::

    custom_imports = dict(imports=["dbf_ext.integrations.mmengine"], allow_failed_imports=False)
    custom_hooks = [dict(type="DBFHook",
                         schedule=dict(type="StepInterval", unfrozen_epochs=[0, 20, 40]),
                         cache=dict(storage_dtype="bfloat16", cpu_bytes="8GB"))]

The detector's ``backbone`` is wrapped when training starts (after weight initialisation and
checkpoint loading); an ``EpochBasedTrainLoop`` decides each epoch before it starts, an
``IterBasedTrainLoop`` per ``iters_per_epoch`` iterations (default: the length of the training
data loader). The hook's state is saved in checkpoints under ``"dbf"`` and restored on resume.
In a distributed run set ``find_unused_parameters=True`` in the config. A data preprocessor
with ``batch_augments`` (random batch resizing) makes the batches unkeyable: nothing is cached.
The decisions and keys are :class:`~dbf_ext.integrations.openmmlab.DBFHookCore`'s (shared with
the mmcv 1.x hook).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from dbf_ext.integrations.openmmlab import DEFAULT_KEY_FIELDS, DBFHookCore

__all__ = ["DBFHook"]

_CHECKPOINT_KEY = "dbf"


@HOOKS.register_module()
class DBFHook(Hook):
    """Dynamic Backbone Freezing (and the feature cache) in an mmengine runner.

    Arguments: those of :class:`~dbf_ext.integrations.openmmlab.DBFHookCore` (``schedule``,
    ``cache``, ``backbone``, ``iters_per_epoch``, ``keyable_transforms``, ``key_fields``).
    """

    def __init__(self, schedule, cache: Mapping[str, Any] | None = None, backbone: str = "backbone",
                 iters_per_epoch: int | None = None, keyable_transforms: Iterable[str] = (),
                 key_fields: Sequence[str] = DEFAULT_KEY_FIELDS):
        self.core = DBFHookCore(schedule, cache, backbone, iters_per_epoch, keyable_transforms,
                                key_fields)

    def before_train(self, runner) -> None:
        self.core.log = runner.logger.info
        self.core.attach(runner.model)
        detector = runner.model.module if is_model_wrapper(runner.model) else runner.model
        preprocessor = getattr(detector, "data_preprocessor", None)
        batch_augments = [type(a).__name__ for a in getattr(preprocessor, "batch_augments", None) or ()]
        self.core.check_pipeline(runner.train_dataloader.dataset, batch_augments)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if _CHECKPOINT_KEY in checkpoint:  # resuming: applied when the hook attaches
            self.core.load_state_dict(checkpoint[_CHECKPOINT_KEY])

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.core.attached:
            checkpoint[_CHECKPOINT_KEY] = self.core.state_dict()

    def _iteration_based(self, runner) -> bool:
        return isinstance(runner.train_loop, IterBasedTrainLoop)

    def before_train_epoch(self, runner) -> None:
        if not self._iteration_based(runner):
            self.core.begin_epoch(self.core.schedule_epoch(runner.epoch, runner.iter, False))

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        if self._iteration_based(runner):
            self.core.begin_epoch(self.core.schedule_epoch(
                runner.epoch, runner.iter, True, len(runner.train_dataloader)))
        self.core.begin_iteration([sample.metainfo for sample in data_batch["data_samples"]])

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None,
                         outputs: Any = None) -> None:
        self.core.end_iteration()

    def after_train_epoch(self, runner) -> None:
        runner.logger.info(self.core.summary())
