"""Cache-aware data path: samples whose features are cached are not decoded or augmented.

A dataset takes part by implementing :class:`CacheableDataset`: it names each sample, declares
the augmentation it applies in an epoch as a hashable key computed deterministically from
``(index, epoch)``, and can produce a sample's target without decoding its image. The
:class:`CacheAwareDataset` adapter then yields, for a sample whose ``(sample_id, aug_key)``
is in the cache, a placeholder image of the right size (no pixel is read: the
:class:`~dbf_ext.cache.CachedBackbone` serves its features) with the real target.

Augmentation that cannot be keyed (random crop, arbitrary rotation, colour jitter) makes the
dataset return ``None`` as the key: such samples are decoded as usual, their features are not
cached, and a warning says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dbf_ext.cache.store import CacheKey


@runtime_checkable
class CacheableDataset(Protocol):
    """What :class:`CacheAwareDataset` needs from a detection dataset."""

    def __len__(self) -> int: ...

    def sample_id(self, index: int) -> Hashable:
        """A stable identifier of the sample (the same in every epoch and worker)."""

    def augmentation_key(self, index: int, epoch: int) -> Hashable | None:
        """The augmentation applied to the sample in ``epoch``, deterministically (e.g. flip
        flags drawn from a generator seeded by ``(seed, epoch, index)``); ``None`` when the
        augmentation cannot be reproduced from a key."""

    def load_sample(self, index: int, aug_key: Hashable | None) -> tuple[Tensor, dict[str, Any]]:
        """The decoded, augmented image ``(C, H, W)`` and its target."""

    def load_target(self, index: int, aug_key: Hashable) -> dict[str, Any]:
        """The target with the augmentation applied, without decoding the image."""

    def image_size(self, index: int, aug_key: Hashable) -> tuple[int, int]:
        """``(H, W)`` of the augmented image, without decoding it."""


@dataclass
class CacheAwareSample:
    image: Tensor  # (C, H, W); a placeholder when `decoded` is False
    target: dict[str, Any]
    key: CacheKey | None  # None: do not cache this sample
    decoded: bool


class CacheAwareDataset(Dataset):
    """Wraps a :class:`CacheableDataset`; call :meth:`set_epoch` before each epoch.

    ``set_epoch(epoch, cached_keys)`` takes the cache's :meth:`~FeatureCache.keys_snapshot`
    from the main process, so it also works with DataLoader worker processes (they receive the
    dataset, snapshot included, when an epoch's iterator starts; do not use
    ``persistent_workers=True``, which would keep an old snapshot). Entries stored during the
    epoch are first needed in the next one, so a snapshot per epoch loses nothing.
    """

    def __init__(self, dataset: CacheableDataset, channels: int = 3):
        if not isinstance(dataset, CacheableDataset):
            raise TypeError(
                f"{type(dataset).__name__} does not implement the CacheableDataset protocol "
                "(sample_id, augmentation_key, load_sample, load_target, image_size)"
            )
        self.dataset = dataset
        self.channels = channels
        self.epoch = 0
        self.cached_keys: frozenset = frozenset()
        self._warned_uncacheable = False

    def set_epoch(self, epoch: int, cached_keys: frozenset = frozenset()) -> None:
        self.epoch = epoch
        self.cached_keys = cached_keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> CacheAwareSample:
        aug_key = self.dataset.augmentation_key(index, self.epoch)
        if aug_key is None:
            if not self._warned_uncacheable:
                warnings.warn(
                    f"{type(self.dataset).__name__} applies augmentation that cannot be keyed "
                    "(e.g. random crop, arbitrary rotation, colour jitter): those samples are "
                    "decoded every epoch and their features are not cached",
                    stacklevel=2,
                )
                self._warned_uncacheable = True
            image, target = self.dataset.load_sample(index, None)
            return CacheAwareSample(image, target, None, True)
        key = (self.dataset.sample_id(index), aug_key)
        if key in self.cached_keys:
            height, width = self.dataset.image_size(index, aug_key)
            # One element expanded: nothing is allocated or read, and it crosses worker
            # processes as a single value.
            placeholder = torch.zeros(1).expand(self.channels, height, width)
            return CacheAwareSample(placeholder, self.dataset.load_target(index, aug_key), key, False)
        image, target = self.dataset.load_sample(index, aug_key)
        return CacheAwareSample(image, target, key, True)


def cache_aware_collate(
    samples: list[CacheAwareSample],
) -> tuple[list[Tensor], list[dict[str, Any]], list[CacheKey | None]]:
    """Batches samples as torchvision detectors take them: (images, targets, cache keys)."""
    return [s.image for s in samples], [s.target for s in samples], [s.key for s in samples]
