"""Instance masks to DOTA labels: a folder of PNG instance maps -> ``labelTxt`` files.

An instance map ``<image_id>.png`` is a single-channel image (8- or 16-bit grey, or a palette
image read as its indices) of the image's size: 0 is background, each other value ``k`` is
one instance (its pixels need not be connected). Every instance becomes one DOTA object: the
four corners of its minimum-area rotated rectangle (:func:`dbf_ext.boxes.mask2obb`, pixels as
unit squares), in increasing order of ``k``, not difficult.

Classes come either from one fixed name for every object (``class_name``) or from a second
folder of class maps with the same file names (``class_dir``): value ``c > 0`` means class
``classes[c - 1]``, and every pixel of an instance must carry the same class value (an
instance over several classes, or over class 0, is an error naming the file and instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dbf_ext import boxes as box_ops
from dbf_ext.data.dataset import ImageReadError, reading_image
from dbf_ext.data.dota import boxes_to_polygons, write_dota_labels

# Single-channel PIL modes: bilevel, 8-bit grey, palette (indices), 16- and 32-bit integers.
_SINGLE_CHANNEL_MODES = ("1", "L", "P", "I;16", "I;16B", "I;16L", "I")


def read_instance_map(path: str | Path) -> np.ndarray:
    """A PNG instance (or class) map as an ``(H, W)`` non-negative integer array.

    Raises :class:`~dbf_ext.data.ImageReadError` (message starting with the path) for a file
    that cannot be decoded, has several channels or holds negative values.
    """
    path = Path(path)
    with reading_image(path), Image.open(path) as image:
        image.load()
        mode = image.mode
        values = np.array(image)
    if mode not in _SINGLE_CHANNEL_MODES:
        raise ImageReadError(
            f"{path}: an instance map must have one channel (grey or palette), got mode {mode}"
        )
    if values.min(initial=0) < 0:
        raise ImageReadError(f"{path}: negative values in an instance map")
    return values.astype(np.int64)


def instance_boxes(instance_map: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The instances of an ``(H, W)`` map: their values ``(K,)`` (increasing, 0 excluded) and
    ``(K, 5)`` float64 rotated boxes (le90). Masks are built ``chunk`` instances at a time."""
    ids = np.unique(instance_map)
    ids = ids[ids != 0]
    boxes = [
        box_ops.mask2obb(torch.from_numpy(instance_map[None] == part[:, None, None]), dtype=torch.float64)
        for part in np.split(ids, range(chunk, len(ids), chunk))
        if len(part)
    ]
    return ids, torch.cat(boxes).numpy() if boxes else np.zeros((0, 5))


def masks_to_dota(
    mask_dir: str | Path,
    out_dir: str | Path,
    *,
    class_name: str = "object",
    class_dir: str | Path | None = None,
    classes: Sequence[str] | None = None,
) -> list[Path]:
    """Converts every ``mask_dir/<image_id>.png`` instance map into ``out_dir/<image_id>.txt``.

    Args:
        mask_dir: folder of PNG instance maps (other files are ignored).
        out_dir: folder for the label files (created).
        class_name: the class of every object when ``class_dir`` is None.
        class_dir: folder of class maps ``<image_id>.png`` (value ``c > 0`` = ``classes[c-1]``).
        classes: class names, required with ``class_dir``.

    Returns:
        The label files written, one per instance map, sorted (a map without instances gives an
        empty file).

    Raises:
        ImageReadError: an unreadable map (the message names the file).
        ValueError: an instance over several classes or none, an unknown class value, a class map
            of another size, a missing class map (``FileNotFoundError``), a bad class name.
    """
    mask_dir, out_dir = Path(mask_dir), Path(out_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"no mask folder {mask_dir}")
    if (class_dir is None) != (classes is None):
        raise ValueError("class_dir and classes go together: class maps need the class names")
    paths = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        instance_map = read_instance_map(path)
        ids, boxes = instance_boxes(instance_map)
        if class_dir is None:
            names = [class_name] * len(ids)
        else:
            names = _instance_classes(path, instance_map, ids, Path(class_dir) / path.name, classes)
        label_path = out_dir / f"{path.stem}.txt"
        write_dota_labels(label_path, boxes_to_polygons(boxes, "obb"), names)
        written.append(label_path)
    return written


def _instance_classes(
    path: Path, instance_map: np.ndarray, ids: np.ndarray, class_path: Path, classes: Sequence[str]
) -> list[str]:
    """The class name of each instance ``ids[i]`` of ``path``, from its class map."""
    if not class_path.is_file():
        raise FileNotFoundError(f"{path}: no class map {class_path}")
    class_map = read_instance_map(class_path)
    if class_map.shape != instance_map.shape:
        raise ValueError(f"{class_path}: class map of size {class_map.shape}, instance map {instance_map.shape}")
    names = []
    for k in ids:
        values = np.unique(class_map[instance_map == k])
        if len(values) != 1 or values[0] == 0:
            raise ValueError(f"{path}: instance {k} must lie on one class (> 0) in {class_path}, "
                             f"lies on class values {values.tolist()}")
        if values[0] > len(classes):
            raise ValueError(f"{class_path}: class value {values[0]} but only {len(classes)} classes")
        names.append(classes[values[0] - 1])
    return names
