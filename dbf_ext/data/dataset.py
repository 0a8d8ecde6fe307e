"""A torch ``Dataset`` of a DOTA-format folder, in torchvision's detection conventions."""

from __future__ import annotations

import contextlib
import copy
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dbf_ext.data.dota import DotaFolder, box_dim, polygons_to_hbb, polygons_to_obb

Target = dict[str, Any]


class ImageReadError(ValueError):
    """An image that cannot be read: corrupt, truncated, or with pixels of no known range.
    The message starts with the file's path."""


class DotaDetectionDataset(Dataset):
    """Images and objects of a DOTA folder (``root/split/images``, ``root/split/labelTxt``).

    ``dataset[i]`` is ``(image, target)``:

    * ``image``: float32 ``(3, H, W)`` in ``[0, 1]`` (RGB);
    * ``target["boxes"]``: float32 ``(K, 4)`` ``x1, y1, x2, y2`` (``box_type="hbb"``: the
      enclosing box of each polygon) or ``(K, 5)`` ``cx, cy, w, h, theta`` (``"obb"``: the
      minimum-area rotated box, radians, clockwise, in ``angle_version`` form);
    * ``target["labels"]``: int64 ``(K,)`` = class index + 1 — label 0 is torchvision's
      background, so ``classes[label - 1]`` is the name;
    * ``target["difficult"]``: bool ``(K,)`` (difficult objects are included; training may
      keep or drop them, evaluation ignores them);
    * ``target["image_id"]``: the DOTA image id (file stem), as written in result files.

    Args:
        root: dataset folder; ``split`` (e.g. ``"train"``) selects ``root/split``.
        classes: class names in label order; None discovers them (sorted) from this split —
            give a validation split the training split's ``classes``.
        box_type: ``"hbb"`` or ``"obb"``.
        transforms: optional ``transforms(image, target) -> (image, target)`` applied by
            ``__getitem__`` (not by ``load_target``); it must keep boxes consistent.
        angle_version: angle form of rotated boxes (see :mod:`dbf_ext.boxes`).
        errors: ``"raise"`` or ``"warn"`` for malformed label files (see :mod:`.dota`).

    All label files are read and converted on construction; images are decoded per item.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        classes: Sequence[str] | None = None,
        box_type: str = "hbb",
        transforms: Callable[[Tensor, Target], tuple[Tensor, Target]] | None = None,
        *,
        angle_version: str = "le90",
        errors: str = "raise",
    ):
        box_dim(box_type)  # validates box_type before reading anything
        self.split = split
        self.transforms = transforms
        self.angle_version = angle_version
        self.folder = DotaFolder(Path(root) / split if split else Path(root), classes, errors=errors)
        self.classes: tuple[str, ...] = self.folder.classes
        self.image_ids: tuple[str, ...] = self.folder.image_ids
        class_index = {name: i for i, name in enumerate(self.classes)}
        labels = [self.folder.labels(image_id) for image_id in self.image_ids]
        self._class_indices = [np.array([class_index[n] for n in lab.class_names], dtype=np.int64) for lab in labels]
        self._difficult = [lab.difficult for lab in labels]
        self._convert_boxes(box_type)

    def _convert_boxes(self, box_type: str) -> None:
        labels = [self.folder.labels(image_id) for image_id in self.image_ids]
        polygons = np.concatenate([lab.polygons for lab in labels]) if labels else np.zeros((0, 8))
        # One batched conversion for the whole split, then split per image.
        all_boxes = (polygons_to_obb(polygons, self.angle_version) if box_type == "obb"
                     else polygons_to_hbb(polygons))
        bounds = np.cumsum([0] + [len(lab) for lab in labels])
        self.box_type = box_type
        self._boxes = [all_boxes[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def with_box_type(self, box_type: str) -> DotaDetectionDataset:
        """This dataset with its polygons converted to ``box_type`` boxes (``"hbb"`` or
        ``"obb"``, in this dataset's ``angle_version``); the label files are not read again."""
        box_dim(box_type)
        if box_type == self.box_type:
            return self
        converted = copy.copy(self)
        converted._convert_boxes(box_type)
        return converted

    @property
    def num_classes(self) -> int:
        """Number of object classes (torchvision's ``num_classes`` is this + 1, background)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> tuple[Tensor, Target]:
        image, target = self.load_image(idx), self.load_target(idx)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def sample_id(self, idx: int) -> str:
        """A stable id of sample ``idx``, unique across the splits of one root:
        ``"<split>/<image_id>"`` (``"<image_id>"`` without a split)."""
        image_id = self.image_ids[idx]
        return f"{self.split}/{image_id}" if self.split else image_id

    def image_path(self, idx: int) -> Path:
        return self.folder.image_path(self.image_ids[idx])

    def image_size(self, idx: int) -> tuple[int, int]:
        """``(width, height)`` of image ``idx``, read from the file header (no decoding)."""
        path = self.image_path(idx)
        with reading_image(path), Image.open(path) as image:
            return image.size

    def load_image(self, idx: int) -> Tensor:
        """float32 ``(3, H, W)`` RGB in ``[0, 1]``.

        8-bit images are divided by 255, 16-bit grey ones by 65535 (16-bit colour PNGs are
        read by Pillow at 8 bits per channel); grey images are repeated into three channels.
        Float images are taken as they are when their values lie in ``[0, 1]``. Float images
        outside ``[0, 1]`` and 32-bit integer images have no known range and raise
        :class:`ImageReadError`, as do corrupt and truncated files.
        """
        path = self.image_path(idx)
        with reading_image(path), Image.open(path) as image:
            return _to_rgb_tensor(image, path)

    def load_target(self, idx: int) -> Target:
        """The target of sample ``idx`` without reading the image (no transforms applied)."""
        return {
            "boxes": torch.from_numpy(self._boxes[idx]).float(),
            "labels": torch.from_numpy(self._class_indices[idx] + 1),
            "difficult": torch.from_numpy(self._difficult[idx].copy()),
            "image_id": self.image_ids[idx],
        }

    def eval_annotations(self) -> list[dict[str, np.ndarray]]:
        """Ground truth of every image in :func:`dbf_ext.evaluation.eval_map`'s format.

        float64 boxes of ``box_type`` and 0-based labels; difficult objects go to
        ``bboxes_ignore`` / ``labels_ignore``.
        """
        return [
            {
                "bboxes": boxes[~difficult],
                "labels": labels[~difficult],
                "bboxes_ignore": boxes[difficult],
                "labels_ignore": labels[difficult],
            }
            for boxes, labels, difficult in zip(self._boxes, self._class_indices, self._difficult)
        ]


@contextlib.contextmanager
def reading_image(path: Path) -> Iterator[None]:
    """Turns Pillow's errors on a bad file (which rarely name it) into :class:`ImageReadError`."""
    try:
        yield
    except ImageReadError:
        raise
    # Pillow reports a corrupt file by OSError (truncated, unidentified), SyntaxError (broken
    # PNG chunks), ValueError, EOFError, struct.error or zlib.error, depending on the codec.
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as err:
        raise ImageReadError(f"{path}: cannot read the image: {err}") from err


def _checked_pixels(image: Image.Image, path: Path) -> np.ndarray:
    """The pixels of an open image: uint8 ``(H, W, 3)`` RGB for 8-bit images, float32 ``(H, W)``
    grey in ``[0, 1]`` for 16-bit and float images; images of no known range are refused."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / np.float32(65535)
    if image.mode == "F":
        grey = np.array(image, dtype=np.float32)
        if not np.isfinite(grey).all():
            raise ImageReadError(f"{path}: float image with values that are not finite")
        low, high = float(grey.min()), float(grey.max())
        if low < 0 or high > 1:
            raise ImageReadError(
                f"{path}: float image with values in [{low:.7g}, {high:.7g}]; float images must "
                "hold values in [0, 1] (rescale it, or store it as an 8- or 16-bit image)"
            )
        return grey
    if image.mode.startswith("I"):
        raise ImageReadError(
            f"{path}: 32-bit integer image (mode {image.mode}) has no known range; "
            "store it as an 8- or 16-bit image"
        )
    return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def _to_rgb_tensor(image: Image.Image, path: Path) -> Tensor:
    pixels = torch.from_numpy(_checked_pixels(image, path))
    if pixels.dtype == torch.uint8:
        return pixels.permute(2, 0, 1).float().div_(255)
    return pixels.expand(3, *pixels.shape).contiguous()


@contextlib.contextmanager
def _without_pixel_limit() -> Iterator[None]:
    """Pillow refuses images above ~179 M pixels as possible decompression bombs; aerial images
    are that large (DOTA has 20,000 x 20,000 px) and are the user's own files."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def large_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image of any size, from its header (no decoding)."""
    path = Path(path)
    with reading_image(path), _without_pixel_limit(), Image.open(path) as image:
        return image.size


def read_rgb8(path: str | Path) -> np.ndarray:
    """An image of any size as uint8 ``(H, W, 3)`` RGB, for cutting into patches.

    The pixels :meth:`DotaDetectionDataset.load_image` reads, at 8 bits: 8-bit images as they
    are (grey and palette images in three channels, alpha dropped), 16-bit grey and float images
    rounded from their range (``round(v / 257)``, ``round(255 * x)``). The same images are
    refused, with :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    with reading_image(path), _without_pixel_limit(), Image.open(path) as image:
        pixels = _checked_pixels(image, path)
    if pixels.dtype == np.uint8:
        return pixels
    grey = np.rint(pixels * np.float32(255)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def collate_fn(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Batches ``(image, target)`` pairs as torchvision detectors take them: two lists."""
    return [image for image, _ in batch], [target for _, target in batch]
