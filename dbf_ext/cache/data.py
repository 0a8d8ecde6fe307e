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

A placeholder never reaches a backbone that computes on it: the batch's keys
(:class:`BatchKeys`) say which rows are placeholders, and the cached backbone raises
:class:`PlaceholderMiss` instead of computing on one (the entry was lost after the loader
decided, e.g. a damaged disk file, or the backbone trains). :meth:`CacheAwareDataset.call_with_decoding`
then decodes those samples and runs the step again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

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


Result = TypeVar("Result")


class PlaceholderMiss(RuntimeError):
    """Raised by the cached backbone instead of computing on placeholder images.

    Attributes:
        rows: the batch rows (placeholders) whose features must be computed.
    """

    def __init__(self, rows: Iterable[int]):
        self.rows = tuple(sorted(rows))
        super().__init__(f"batch rows {list(self.rows)} are undecoded placeholders whose "
                         "features cannot be served; decode them (CacheAwareDataset.call_with_decoding)")


class BatchKeys(list):
    """The cache keys of a batch (a list, one key or ``None`` per image), knowing which rows are
    placeholders and which dataset index each row came from.

    Attributes:
        undecoded: rows whose image is a placeholder.
        indices: the dataset index of each row.
    """

    def __init__(self, keys: Iterable[CacheKey | None], undecoded: Iterable[int] = (),
                 indices: Iterable[int | None] = ()):
        super().__init__(keys)
        self.undecoded = tuple(undecoded)
        self.indices = tuple(indices)


@dataclass
class CacheAwareSample:
    image: Tensor  # (C, H, W); a placeholder when `decoded` is False
    target: dict[str, Any]
    key: CacheKey | None  # None: do not cache this sample
    decoded: bool
    index: int | None = None  # in the wrapped dataset (to decode a placeholder later)


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
            return CacheAwareSample(image, target, None, True, index)
        key = (self.dataset.sample_id(index), aug_key)
        if key in self.cached_keys:
            height, width = self.dataset.image_size(index, aug_key)
            # One element expanded: nothing is allocated or read, and it crosses worker
            # processes as a single value.
            placeholder = torch.zeros(1).expand(self.channels, height, width)
            target = self.dataset.load_target(index, aug_key)
            return CacheAwareSample(placeholder, target, key, False, index)
        image, target = self.dataset.load_sample(index, aug_key)
        return CacheAwareSample(image, target, key, True, index)

    def call_with_decoding(self, step: Callable[..., Result], images: list[Tensor],
                           keys: BatchKeys, *args: Any) -> Result:
        """``step(images, keys, *args)``, decoding placeholders the backbone cannot serve.

        When ``step`` raises :class:`PlaceholderMiss`, the named rows are decoded (in this
        process), the random number generators are put back where they were, and ``step`` runs
        again: it makes the same random draws (multi-scale resizing, samplers) as if those
        samples had been decoded from the start. Each retry decodes at least one row, so this
        ends.

        Args:
            step: the forward of one batch, e.g. the model call inside
                ``CachedBackbone.batch_keys(keys)``.
            images: the batch's images ``(C, H, W)``, as the collate function returned them
                (possibly moved to a device).
            keys: the batch's :class:`BatchKeys`.
        """
        random_state = _random_state()
        while True:
            try:
                return step(images, keys, *args)
            except PlaceholderMiss as miss:
                warnings.warn(
                    f"{len(miss.rows)} sample(s) announced as cached could not be served "
                    "(entry lost or damaged): decoded and recomputed",
                    stacklevel=2,
                )
                _set_random_state(random_state)
                images, keys = self.decode(images, keys, miss.rows)

    def decode(self, images: list[Tensor], keys: BatchKeys,
               rows: Iterable[int]) -> tuple[list[Tensor], BatchKeys]:
        """``(images, keys)`` with the placeholders at ``rows`` replaced by decoded images (on
        the placeholder's device)."""
        rows = set(rows)
        if not rows <= set(keys.undecoded):
            raise ValueError(f"rows {sorted(rows - set(keys.undecoded))} are not placeholders")
        images = list(images)
        for row in rows:
            image, _ = self.dataset.load_sample(keys.indices[row], keys[row][1])
            images[row] = image.to(images[row].device)
        undecoded = [row for row in keys.undecoded if row not in rows]
        return images, BatchKeys(keys, undecoded, keys.indices)


def _random_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def cache_aware_collate(
    samples: list[CacheAwareSample],
) -> tuple[list[Tensor], list[dict[str, Any]], list[CacheKey | None]]:
    """Batches samples as torchvision detectors take them: (images, targets, cache keys); the
    keys are a :class:`BatchKeys`, which knows the placeholder rows."""
    keys = BatchKeys([s.key for s in samples],
                     undecoded=[row for row, s in enumerate(samples) if not s.decoded],
                     indices=[s.index for s in samples])
    return [s.image for s in samples], [s.target for s in samples], keys
