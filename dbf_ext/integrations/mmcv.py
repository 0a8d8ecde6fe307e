"""``DBFHook`` for mmcv 1.x runners (mmdet 2.x, mmrotate 0.3): Dynamic Backbone Freezing and the
feature cache from a config. Importing this module registers the hook in mmcv's ``HOOKS``::

    custom_imports = dict(imports=["dbf_ext.integrations.mmcv"], allow_failed_imports=False)
    custom_hooks = [dict(type="DBFHook",
                         schedule=dict(type="StepInterval", unfrozen_epochs=[0, 20, 40]),
                         cache=dict(storage_dtype="bfloat16", cpu_bytes="8GB"))]

Before the run the detector's ``backbone`` is wrapped (:class:`~dbf_ext.freeze.FrozenBackbone`,
and :class:`~dbf_ext.cache.CachedBackbone` with a cache); each epoch of an
``EpochBasedRunner`` is decided before it starts; an ``IterBasedRunner`` decides per
``iters_per_epoch`` iterations (default: the length of its data loader). The hook's state goes
into the checkpoints' ``meta["dbf"]`` and comes back with ``runner.resume``. With
``MMDistributedDataParallel`` set ``find_unused_parameters = True`` in the config. The decisions
and keys are :class:`~dbf_ext.integrations.openmmlab.DBFHookCore`'s (shared with the mmengine
hook).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mmcv.parallel import DataContainer
from mmcv.runner import HOOKS, Hook, IterBasedRunner

from dbf_ext.integrations.openmmlab import DEFAULT_KEY_FIELDS, DBFHookCore

__all__ = ["DBFHook"]

_META_KEY = "dbf"


def _batch_metas(data_batch: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The image metas of a collated mmdet 2.x batch, in batch order (a DataContainer holds one
    list per device chunk)."""
    metas = data_batch["img_metas"]
    if isinstance(metas, DataContainer):
        return [meta for chunk in metas.data for meta in chunk]
    return list(metas)


def _loader_dataset(data_loader) -> Any:
    """The dataset of a runner's data loader (an IterBasedRunner wraps it in an IterLoader)."""
    return getattr(data_loader, "dataset", None) or data_loader._dataloader.dataset


@HOOKS.register_module()
class DBFHook(Hook):
    """Dynamic Backbone Freezing (and the feature cache) in an mmcv 1.x runner.

    Arguments: those of :class:`~dbf_ext.integrations.openmmlab.DBFHookCore` (``schedule``,
    ``cache``, ``backbone``, ``iters_per_epoch``, ``keyable_transforms``, ``key_fields``).
    """

    def __init__(self, schedule, cache: Mapping[str, Any] | None = None, backbone: str = "backbone",
                 iters_per_epoch: int | None = None, keyable_transforms: Iterable[str] = (),
                 key_fields: Sequence[str] = DEFAULT_KEY_FIELDS):
        self.core = DBFHookCore(schedule, cache, backbone, iters_per_epoch, keyable_transforms,
                                key_fields)

    def before_run(self, runner) -> None:
        self.core.log = runner.logger.info
        self.core.attach(runner.model)
        if runner.meta is not None and _META_KEY in runner.meta:  # runner.resume restored it
            self.core.load_state_dict(runner.meta[_META_KEY])

    def _begin_epoch(self, runner) -> None:
        self.core.check_pipeline(_loader_dataset(runner.data_loader))
        iteration_based = isinstance(runner, IterBasedRunner)
        self.core.begin_epoch(self.core.schedule_epoch(
            runner.epoch, runner.iter, iteration_based,
            len(runner.data_loader) if iteration_based else None))

    def before_train_epoch(self, runner) -> None:
        if not isinstance(runner, IterBasedRunner):
            self._begin_epoch(runner)
            self._record(runner)

    def before_train_iter(self, runner) -> None:
        if isinstance(runner, IterBasedRunner):
            self._begin_epoch(runner)
        self.core.begin_iteration(_batch_metas(runner.data_batch))

    def after_train_iter(self, runner) -> None:
        self.core.end_iteration()
        self._record(runner)

    def after_train_epoch(self, runner) -> None:
        runner.logger.info(self.core.summary())

    def _record(self, runner) -> None:
        """The state into ``runner.meta``, which every checkpoint of the runner saves."""
        if runner.meta is None:
            runner.meta = {}
        runner.meta[_META_KEY] = self.core.state_dict()
