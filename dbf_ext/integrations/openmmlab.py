"""What the two ``DBFHook`` classes share: the freezing and caching decisions of an OpenMMLab run.

:class:`DBFHookCore` knows nothing of runners. The hooks of :mod:`dbf_ext.integrations.mmcv`
(mmcv 1.x runners) and :mod:`dbf_ext.integrations.mmengine` (mmengine's ``Runner``) read the
model, epoch, iteration, dataset and image metas from their runner and call it:

* :meth:`~DBFHookCore.attach` once before training: wraps the detector's ``backbone`` in a
  :class:`~dbf_ext.freeze.FrozenBackbone` (:func:`~dbf_ext.freeze.apply_dbf`, which checks a
  ``DistributedDataParallel`` wrapper) and, with a cache, a
  :class:`~dbf_ext.cache.CachedBackbone`. Every mmdet / mmrotate detector computes its
  features with ``self.backbone(img)``, so nothing else changes.
* :meth:`~DBFHookCore.schedule_epoch` maps the runner's position to the schedule's epoch, and
  :meth:`~DBFHookCore.begin_epoch` decides frozen / trained for it.
* :meth:`~DBFHookCore.begin_iteration` / :meth:`~DBFHookCore.end_iteration` around each
  training iteration: the cache keys of the batch, from its image metas.
* :meth:`~DBFHookCore.state_dict` / :meth:`~DBFHookCore.load_state_dict` for checkpoints.

Cache keys. A sample's features are reusable only if the pipeline produced the same image
tensor: the key is ``(image path, augmentation key)``, the augmentation key being the metas'
``flip``, ``flip_direction``, ``img_shape`` and ``scale_factor`` (``key_fields``). That
identifies the output of the standard pipelines (loading, (multi-scale) resizing, flipping,
normalising, padding). A pipeline with a random step the metas do not record (colour jitter,
random rotation, crops, mosaic, ...) cannot be keyed: the transforms are checked against
:data:`KEYABLE_TRANSFORMS` (plus the hook's ``keyable_transforms``) once, and with any other
transform nothing is cached (one warning); the backbone is still frozen on schedule.

Iteration-based runners have no epochs: the schedule's epoch ``e`` there is iterations
``e * iters_per_epoch`` to ``(e + 1) * iters_per_epoch - 1``, ``iters_per_epoch`` defaulting to
the length of the training data loader (one pass over the data, which is also when cached
features start to be reused).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from dbf_ext import freeze
from dbf_ext.freeze import DBFController, FreezeSchedule, apply_dbf

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_KEY_FIELDS", "KEYABLE_TRANSFORMS", "DBFHookCore", "build_schedule"]

#: Transforms (class names, mmdet 2.x / mmrotate 0.3 / mmcv 2.x / mmdet 3.x) whose output is
#: determined by the image and the default ``key_fields``: deterministic ones, and the random
#: resizes and flips, whose draw the metas record (``img_shape``, ``scale_factor``, ``flip``,
#: ``flip_direction``).
KEYABLE_TRANSFORMS = frozenset({
    # loading and formatting
    "LoadImageFromFile", "LoadMultiChannelImageFromFiles", "LoadAnnotations",
    "LoadPanopticAnnotations", "LoadProposals", "FilterAnnotations", "ImageToTensor",
    "ToTensor", "Transpose", "ToDataContainer", "DefaultFormatBundle", "Collect",
    "WrapFieldsToLists", "PackDetInputs", "Normalize", "Pad",
    # resizing and flipping, recorded in the metas
    "Resize", "RandomResize", "RandomChoiceResize", "FixShapeResize", "RandomFlip",
    "RResize", "RRandomFlip",
})

#: The image-meta fields whose values make the augmentation key.
DEFAULT_KEY_FIELDS = ("flip", "flip_direction", "img_shape", "scale_factor")

# The image path: "filename" in mmdet 2.x / mmrotate metas, "img_path" in mmdet 3.x.
_SAMPLE_ID_FIELDS = ("img_path", "filename")

_SCHEDULE_TYPES = ("StepInterval", "EvenInterval", "AlwaysFrozen", "NeverFrozen", "FrozenAfter",
                   "FrozenUntil")


def build_schedule(schedule: FreezeSchedule | Mapping[str, Any] | Callable[[int], bool]) -> FreezeSchedule:
    """A schedule from a config dict (``dict(type="StepInterval", unfrozen_epochs=[0, 20])``,
    any of :data:`_SCHEDULE_TYPES`), a :class:`FreezeSchedule`, or a callable ``epoch -> bool``."""
    if isinstance(schedule, FreezeSchedule):
        return schedule
    if isinstance(schedule, Mapping):
        options = dict(schedule)
        kind = options.pop("type", None)
        if kind not in _SCHEDULE_TYPES:
            raise ValueError(f"schedule type must be one of {', '.join(_SCHEDULE_TYPES)}, got {kind!r}")
        return getattr(freeze, kind)(**options)
    if callable(schedule):
        return freeze.FromCallable(schedule)
    raise TypeError("schedule must be a dict such as dict(type='StepInterval', unfrozen_epochs=[0, 20]), "
                    f"a FreezeSchedule or a callable epoch -> bool; got {type(schedule).__name__}")


def _build_cache(options: Mapping[str, Any]):
    from dbf_ext.cache import FeatureCache
    from dbf_ext.train.config import parse_size

    options = dict(options)
    for name in ("gpu_bytes", "cpu_bytes", "disk_bytes"):
        if isinstance(options.get(name), str):  # "4GB" in a config
            options[name] = parse_size(options[name])
    return FeatureCache(**options)


def _key_value(value: Any) -> Hashable:
    """A meta value as a plain hashable (arrays and lists become tuples of Python numbers)."""
    if isinstance(value, (np.ndarray, list, tuple)):
        return tuple(_key_value(v) for v in np.asarray(value, dtype=object).reshape(-1).tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _transform_names(dataset: Any) -> list[str] | None:
    """Class names of every transform in the pipelines of ``dataset`` and the datasets it wraps
    (``dataset`` / ``datasets`` attributes: Repeat-, ClassBalanced-, Concat-, MultiImageMix-
    datasets); None when no pipeline is found."""
    names: list[str] = []
    found = False
    stack, seen = [dataset], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        pipeline = getattr(current, "pipeline", None)
        # a Compose, or (mmdet 2.x's MultiImageMixDataset) a plain list of transforms
        transforms = pipeline if isinstance(pipeline, (list, tuple)) else getattr(pipeline, "transforms", None)
        if transforms is not None:
            found = True
            names.extend(type(t).__name__ if not isinstance(t, Mapping) else str(t.get("type"))
                         for t in transforms)
        stack.append(getattr(current, "dataset", None))
        stack.extend(getattr(current, "datasets", None) or ())
    return names if found else None


class DBFHookCore:
    """The runner-independent part of ``DBFHook`` (see the module docstring).

    Args:
        schedule: ``dict(type="StepInterval", unfrozen_epochs=[0, 20, 40])`` (any schedule of
            :mod:`dbf_ext.freeze` by class name and arguments), a schedule, or a callable.
        cache: ``None`` (no feature cache) or :class:`~dbf_ext.cache.FeatureCache` arguments,
            e.g. ``dict(storage_dtype="bfloat16", cpu_bytes=8 << 30)``; sizes may be strings
            (``"8GB"``).
        backbone: dotted path of the module to freeze in the detector.
        iters_per_epoch: iteration-based runners only: iterations per schedule epoch (default:
            the length of the training data loader).
        keyable_transforms: names of further transforms whose output the ``key_fields`` of the
            metas determine.
        key_fields: image-meta fields forming the augmentation key.
        log: where to write one-line messages (default: this module's logger).
    """

    def __init__(self, schedule, cache: Mapping[str, Any] | None = None, backbone: str = "backbone",
                 iters_per_epoch: int | None = None, keyable_transforms: Iterable[str] = (),
                 key_fields: Sequence[str] = DEFAULT_KEY_FIELDS,
                 log: Callable[[str], None] | None = None):
        self.schedule = build_schedule(schedule)
        if cache is not None and not isinstance(cache, Mapping):
            raise TypeError(f"cache must be None or a dict of FeatureCache arguments, got {type(cache).__name__}")
        self.cache_options = dict(cache) if cache is not None else None
        if self.cache_options is not None:
            _build_cache(self.cache_options).close()  # a bad option fails when the hook is built
        self.backbone_path = backbone
        if iters_per_epoch is not None and (isinstance(iters_per_epoch, bool) or not isinstance(iters_per_epoch, int)
                                            or iters_per_epoch < 1):
            raise ValueError(f"iters_per_epoch must be a positive integer or None, got {iters_per_epoch!r}")
        self.iters_per_epoch = iters_per_epoch
        if isinstance(keyable_transforms, str):
            raise TypeError("keyable_transforms must be a list of transform names, got a string")
        self.keyable_transforms = KEYABLE_TRANSFORMS | set(keyable_transforms)
        self.key_fields = tuple(key_fields)
        self.log = log or logger.info
        self.controller: DBFController | None = None
        self.cached = None  # the CachedBackbone, when caching
        self.epoch: int | None = None  # the schedule epoch last decided
        self._unkeyable: list[str] | None = None  # None: the pipeline is not checked yet
        self._warned_metas = False
        self._keys_block = contextlib.ExitStack()
        self._pending_state: Mapping[str, Any] | None = None
        self._decided = False  # begin_epoch ran since attach (a resumed run decides again)

    # ---- setup ----

    @property
    def attached(self) -> bool:
        return self.controller is not None

    def attach(self, model: nn.Module) -> None:
        """Wraps the backbone of ``model`` (the detector, or a ``DataParallel`` /
        ``DistributedDataParallel`` around it, which must use ``find_unused_parameters=True``)."""
        if self.attached:
            raise RuntimeError("DBFHook is already attached to a model")
        self.controller = apply_dbf(model, self.schedule, backbone=self.backbone_path)
        self._decided = False
        if self.cache_options is not None:
            from dbf_ext.cache import CachedBackbone

            self.cached = CachedBackbone(self.controller.backbone, _build_cache(self.cache_options))
            parent, name = next((parent, name) for parent in model.modules()
                                for name, child in parent.named_children()
                                if child is self.controller.backbone)
            setattr(parent, name, self.cached)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        self.log(f"DBF: {self.backbone_path} wrapped, schedule {self.schedule!r}, "
                 f"feature cache {'off' if self.cached is None else self.cached.cache.storage_dtype}")

    def check_pipeline(self, dataset: Any, batch_augments: Iterable[str] = ()) -> None:
        """Decides, once, whether the training samples can be keyed (see the module docstring);
        ``batch_augments`` names random batch transforms applied after the pipeline."""
        if self._unkeyable is not None or self.cached is None:
            return
        names = _transform_names(dataset)
        if names is None:
            self._unkeyable = [f"no pipeline found on {type(dataset).__name__}"]
        else:
            self._unkeyable = sorted({n for n in names if n not in self.keyable_transforms})
        self._unkeyable += list(batch_augments)
        if self._unkeyable:
            message = (
                "DBFHook: the training data has augmentations the feature cache cannot key "
                f"({', '.join(self._unkeyable)}): their output changes between epochs without a "
                "trace in the image metas, so no features are cached (the backbone is still "
                "frozen on schedule). Declare transforms whose randomness the metas record with "
                "keyable_transforms=[...]"
            )
            warnings.warn(message, stacklevel=2)
            self.log(message)

    # ---- decisions ----

    def schedule_epoch(self, epoch: int, iteration: int, iteration_based: bool,
                       loader_length: int | None = None) -> int:
        """The schedule's epoch for the runner at (``epoch``, ``iteration``)."""
        if not iteration_based:
            return epoch
        per_epoch = self.iters_per_epoch or loader_length
        if not per_epoch:
            raise ValueError("DBFHook on an iteration-based runner needs iters_per_epoch "
                             "(the training data loader has no length)")
        return iteration // per_epoch

    def begin_epoch(self, epoch: int) -> bool:
        """Freezes or unfreezes the backbone for schedule epoch ``epoch``, unless it was decided
        already in this run; True when the state changed. The runner's iteration-based loops
        call it before every iteration."""
        if self._decided and epoch == self.epoch:
            return False
        changed = self.controller.on_epoch_start(epoch)
        self.epoch = epoch
        self._decided = True
        if self.cached is not None:
            self.cached.cache.keys_snapshot()  # verifies the weights the entries belong to
        self.log(f"DBF epoch {epoch}: backbone {'frozen' if self.controller.is_frozen else 'trained'}"
                 + (" (changed)" if changed else ""))
        return changed

    def begin_iteration(self, metas: Sequence[Mapping[str, Any]]) -> None:
        """Sets the cache keys of the batch whose image metas are ``metas`` (in batch order)."""
        self.end_iteration()
        if self.cached is None or not self.controller.is_frozen:
            return
        keys = [self.sample_key(meta) for meta in metas]
        sizes = None
        if all("img_shape" in meta for meta in metas):
            sizes = [tuple(meta["img_shape"][:2]) for meta in metas]
        self._keys_block.enter_context(self.cached.batch_keys(keys, sizes))

    def end_iteration(self) -> None:
        """Clears the batch's keys (validation and test batches are never cached)."""
        self._keys_block.close()

    def sample_key(self, meta: Mapping[str, Any]) -> tuple[Hashable, Hashable] | None:
        """``(image path, augmentation key)`` of a sample, or None when it must not be cached."""
        if self._unkeyable is None:
            raise RuntimeError("DBFHookCore.check_pipeline must run before samples are keyed")
        if self._unkeyable:
            return None
        sample_id = next((meta[f] for f in _SAMPLE_ID_FIELDS if meta.get(f) is not None), None)
        missing = [f for f in self.key_fields if f not in meta]
        if sample_id is None or missing:
            if not self._warned_metas:
                absent = missing + ([] if sample_id is not None else [" or ".join(_SAMPLE_ID_FIELDS)])
                message = (f"DBFHook: image metas lack {', '.join(absent)} (add them to the "
                           "pipeline's meta_keys): those samples are not cached")
                warnings.warn(message, stacklevel=2)
                self.log(message)
                self._warned_metas = True
            return None
        return str(sample_id), tuple(_key_value(meta[f]) for f in self.key_fields)

    def summary(self) -> str:
        """A line for the log at the end of an epoch."""
        if self.cached is None:
            return f"DBF epoch {self.epoch}: backbone {'frozen' if self.controller.is_frozen else 'trained'}"
        stats = self.cached.cache.stats
        used = sum(self.cached.cache.bytes_used().values())
        return (f"DBF epoch {self.epoch}: feature cache {len(self.cached.cache)} entries, "
                f"{used / 2**20:.1f} MiB, hits {stats.hits}, misses {stats.misses} (total)")

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        """Plain values: the controller's state and the cache statistics."""
        return {
            "controller": self.controller.state_dict(),
            "cache": self.cached.cache.state_dict() if self.cached is not None else None,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume; before :meth:`attach` the state is kept and applied when attaching."""
        if not isinstance(state, Mapping) or set(state) != {"controller", "cache", "epoch"}:
            raise ValueError("DBFHook state must be a mapping with keys 'controller', 'cache', 'epoch'")
        if not self.attached:
            self._pending_state = state
            return
        self.controller.load_state_dict(state["controller"])
        if self.cached is not None and state["cache"] is not None:
            self.cached.cache.load_state_dict(state["cache"])
        self.epoch = state["epoch"]
        self._pending_state = None
