"""Deterministic, keyed augmentation: what makes frozen-backbone features cacheable.

:class:`KeyedFlipDataset` flips each sample horizontally / vertically with flags drawn from a
generator seeded by ``(seed, epoch, index)``: the same in every worker process and after a
resume, and named by a hashable key, so the feature cache can serve the flipped sample's
features and the data loader can skip decoding it (:mod:`dbf_ext.cache.data`).
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from dbf_ext.boxes import regularize_obb
from dbf_ext.data import DotaDetectionDataset

Target = dict[str, Any]


def flip_boxes(boxes: Tensor, box_type: str, width: int, height: int, hflip: bool, vflip: bool,
               angle_version: str = "le90") -> Tensor:
    """Boxes of an image flipped horizontally and/or vertically (``(K, 4)`` hbb or ``(K, 5)`` obb).

    Both flips together are the diagonal flip, a half turn about the image centre (mmrotate's
    ``RRandomFlip`` direction ``"diagonal"``). Coordinates are continuous, pixel ``i`` covering
    ``[i, i + 1)``, so a flip maps ``x`` to ``width - x`` (mmrotate writes ``width - x - 1``,
    half a pixel off for boxes given in these coordinates, as DOTA's are).

    A mirror image of a rotated box has the mirrored centre and the negated angle (its w edge
    direction ``(cos t, sin t)`` becomes ``(-cos t, sin t)`` or ``(cos t, -sin t)``, both of
    which describe the line of angle ``-t``); a half turn keeps the angle. Rotated results are
    rewritten in the canonical form of ``angle_version`` (the dataset's; ``"le90"``: ``w >= h``,
    ``theta`` in ``[-pi/2, pi/2)``).
    """
    boxes = boxes.clone()
    if box_type == "hbb":
        if hflip:
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
        if vflip:
            boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
        return boxes
    if hflip:
        boxes[:, 0] = width - boxes[:, 0]
    if vflip:
        boxes[:, 1] = height - boxes[:, 1]
    if hflip != vflip:
        boxes[:, 4] = -boxes[:, 4]
    return regularize_obb(boxes, angle_version)


class KeyedFlipDataset(Dataset):
    """A :class:`~dbf_ext.data.DotaDetectionDataset` with keyed random flips.

    Implements :class:`dbf_ext.cache.CacheableDataset`. ``dataset[i]`` uses the epoch set by
    :meth:`set_epoch` (for use without the cache adapter).

    Args:
        base: the dataset (axis-aligned or rotated boxes).
        hflip / vflip: probabilities of a horizontal / vertical flip, drawn independently;
            both drawn is the diagonal flip. ``hflip = vflip = 0.5`` gives the four outcomes
            (none, horizontal, vertical, diagonal) a quarter each: the flips of mmrotate's
            DOTA configurations (``RRandomFlip(flip_ratio=[0.25, 0.25, 0.25],
            direction=["horizontal", "vertical", "diagonal"])``).
        seed: makes the flip draws reproducible.

    The augmentation key is ``(hflipped, vflipped)``: a sample has up to four cache keys.
    """

    def __init__(self, base: DotaDetectionDataset, hflip: float = 0.5, vflip: float = 0.0, seed: int = 0):
        for name, p in (("hflip", hflip), ("vflip", vflip)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.base = base
        self.hflip = hflip
        self.vflip = vflip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        return self.load_sample(index, self.augmentation_key(index, self.epoch))

    def sample_id(self, index: int) -> Hashable:
        return self.base.sample_id(index)

    def augmentation_key(self, index: int, epoch: int) -> tuple[bool, bool]:
        draw = random.Random(hash((self.seed, epoch, index)) & 0xFFFFFFFF)
        return (draw.random() < self.hflip, draw.random() < self.vflip)

    def image_size(self, index: int, aug_key: Hashable) -> tuple[int, int]:
        width, height = self.base.image_size(index)  # flips keep the size
        return height, width

    def load_target(self, index: int, aug_key: tuple[bool, bool]) -> Target:
        target = self.base.load_target(index)
        if any(aug_key):
            height, width = self.image_size(index, aug_key)
            target["boxes"] = flip_boxes(target["boxes"], self.base.box_type, width, height, *aug_key,
                                         angle_version=self.base.angle_version)
        return target

    def load_sample(self, index: int, aug_key: tuple[bool, bool]) -> tuple[Tensor, Target]:
        hflip, vflip = aug_key
        image = self.base.load_image(index)
        if hflip:
            image = image.flip(-1)
        if vflip:
            image = image.flip(-2)
        return image, self.load_target(index, aug_key)
