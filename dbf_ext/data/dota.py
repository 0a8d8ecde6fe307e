"""DOTA-format folders: reading annotations, writing annotations and Task1 result files.

A DOTA folder holds ``images/<image_id>.<ext>`` (png, jpg, jpeg, tif, tiff or bmp) and
``labelTxt/<image_id>.txt``. A label file has optional header lines (``imagesource:GoogleEarth``,
``gsd:0.146``) and one object per line::

    x1 y1 x2 y2 x3 y3 x4 y4 class difficult

(the four corners of the object in pixels, its class name, ``1`` for a difficult object, ``2``
for an object cut by the border of a patch — written by split tools, DOTA devkit's and
mmrotate's as :func:`~dbf_ext.data.split_dota`; it is a normal object, not a difficult one). A
line with nine fields (no ``difficult``) is read as ``difficult = 0``, as the DOTA devkit does.
A polygon whose corners span no area (coincident or collinear) is a problem: it has no box.

Malformed input is never dropped silently. With ``errors="raise"`` (default) the first problem
raises :class:`DotaFormatError` with the file and line number; with ``errors="warn"`` every
problem is issued as a :class:`DotaFormatWarning`, recorded in ``issues`` and the offending
line (or label file) is skipped.

Decisions for incomplete folders: an image without a label file has no objects (the DOTA test
split and tools that skip empty tiles); a label file without an image is a problem (raised or
warned as above); a missing ``images/`` folder, or a missing ``labelTxt/`` folder unless
``labels_dir=None`` (images only, for inference), is a ``FileNotFoundError``.

Task1 result files (one per class, ``Task1_<class>.txt``) hold ``image_id score x1 y1 ... x4 y4``
lines, the format of the DOTA evaluation server.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dbf_ext import boxes as box_ops
from dbf_ext._io import write_durably

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Class names of DOTA v1.0, in mmrotate's order.
DOTA_V1_CLASSES = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
    "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
    "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
)
#: DOTA v1.5 adds one class to v1.0.
DOTA_V15_CLASSES = DOTA_V1_CLASSES + ("container-crane",)

_ERROR_MODES = ("raise", "warn")
_DIFFICULTY_FLAGS = ("0", "1", "2")  # normal, difficult, cut by a patch border
_OBJECT_FIELDS = "x1 y1 x2 y2 x3 y3 x4 y4 class difficult"
# "key:value" header lines start with a name; object lines start with a coordinate.
_HEADER_LINE = re.compile(r"^\s*([A-Za-z][\w-]*)\s*:(.*)$")
# Class names that are safe in a Task1 file name on every system: no separators, no characters
# Windows refuses, no whitespace (DOTA lines split on it), no leading dot.
_SAFE_CLASS_NAME = re.compile(r"\w[\w.+-]*")


class DotaFormatError(ValueError):
    """Malformed DOTA data; the message starts with ``file:line:``."""


class DotaFormatWarning(UserWarning):
    """A malformed DOTA line or file that was skipped (``errors="warn"``)."""


@dataclass(frozen=True)
class DotaIssue:
    """One problem found in a DOTA folder: file, 1-based line number (None: whole file)."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


class _IssueSink:
    """Raises or warns-and-records each issue, as ``errors`` says."""

    def __init__(self, errors: str):
        if errors not in _ERROR_MODES:
            raise ValueError(f"errors must be one of {_ERROR_MODES}, got {errors!r}")
        self.errors = errors
        self.issues: list[DotaIssue] = []

    def report(self, path: Path, line: int | None, message: str) -> None:
        issue = DotaIssue(path, line, message)
        if self.errors == "raise":
            raise DotaFormatError(str(issue))
        warnings.warn(str(issue), DotaFormatWarning, stacklevel=3)
        self.issues.append(issue)


@dataclass(frozen=True)
class DotaLabels:
    """The objects of one image.

    Attributes:
        polygons: ``(K, 8)`` float64 corners ``x1, y1, ..., x4, y4`` in pixels.
        class_names: ``K`` class names.
        difficult: ``(K,)`` bool (flag ``1``).
        header: header lines as ``{key: value}`` strings, e.g. ``{"gsd": "0.146"}``.
        truncated: ``(K,)`` bool (flag ``2``: cut by a patch border); all False when None.
    """

    polygons: np.ndarray
    class_names: tuple[str, ...]
    difficult: np.ndarray
    header: dict[str, str] = field(default_factory=dict)
    truncated: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if self.truncated is None:  # frozen: the default is filled in once, here
            object.__setattr__(self, "truncated", np.zeros(k, dtype=bool))
        if self.polygons.shape != (k, 8) or self.difficult.shape != (k,) or self.truncated.shape != (k,):
            raise ValueError(
                f"polygons {self.polygons.shape}, difficult {self.difficult.shape} and truncated "
                f"{self.truncated.shape} must be ({k}, 8), ({k},) and ({k},) for {k} class names"
            )

    @classmethod
    def empty(cls) -> DotaLabels:
        return cls(np.zeros((0, 8)), (), np.zeros(0, dtype=bool))

    def __len__(self) -> int:
        return len(self.class_names)

    def obb(self, version: str = "le90") -> np.ndarray:
        """``(K, 5)`` float64 minimum-area rotated boxes in the form of an angle version."""
        return polygons_to_obb(self.polygons, version)

    def hbb(self) -> np.ndarray:
        """``(K, 4)`` float64 enclosing axis-aligned boxes ``x1, y1, x2, y2``."""
        return polygons_to_hbb(self.polygons)


def polygons_to_obb(polygons: np.ndarray, version: str = "le90") -> np.ndarray:
    """``(K, 8)`` corners -> ``(K, 5)`` float64 minimum-area rotated boxes (see ``poly2obb``)."""
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    if len(polygons) == 0:  # poly2obb cannot infer the point count of an empty tensor
        return np.zeros((0, 5))
    return box_ops.poly2obb(torch.from_numpy(polygons), version).numpy()


def polygons_to_hbb(polygons: np.ndarray) -> np.ndarray:
    """``(K, 8)`` corners -> ``(K, 4)`` float64 enclosing boxes ``x1, y1, x2, y2``."""
    points = np.asarray(polygons, dtype=np.float64).reshape(-1, 4, 2)
    return np.concatenate((points.min(axis=1), points.max(axis=1)), axis=1)


def boxes_to_polygons(boxes: np.ndarray, box_type: str) -> np.ndarray:
    """``(K, 5)`` rotated or ``(K, 4)`` axis-aligned boxes -> ``(K, 8)`` float64 corners.

    Axis-aligned corners run ``(x1, y1), (x2, y1), (x2, y2), (x1, y2)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, box_dim(box_type))
    if box_type == "obb":
        return box_ops.obb2poly(torch.from_numpy(boxes)).numpy()
    x1, y1, x2, y2 = boxes.T
    return np.stack((x1, y1, x2, y1, x2, y2, x1, y2), axis=1)


def box_dim(box_type: str) -> int:
    """Numbers per box: 5 for ``"obb"`` (cx, cy, w, h, theta), 4 for ``"hbb"`` (x1, y1, x2, y2)."""
    dims = {"obb": 5, "hbb": 4}
    if box_type not in dims:
        raise ValueError(f"box_type must be 'obb' or 'hbb', got {box_type!r}")
    return dims[box_type]


def read_dota_labels(
    path: str | Path,
    classes: Collection[str] | None = None,
    *,
    errors: str = "raise",
) -> tuple[DotaLabels, list[DotaIssue]]:
    """Reads one ``labelTxt`` file.

    Args:
        path: the label file.
        classes: known class names; an object of another class is a problem (reported with
            file and line). None accepts every name.
        errors: ``"raise"`` (first problem raises :class:`DotaFormatError`) or ``"warn"``
            (each problem is warned about and the line skipped).

    Returns:
        The labels and the list of problems found (always empty with ``errors="raise"``).
    """
    sink = _IssueSink(errors)
    labels = _parse_label_file(Path(path), classes, sink)
    return labels, sink.issues


def _parse_label_file(path: Path, classes: Collection[str] | None, sink: _IssueSink) -> DotaLabels:
    polygons: list[list[float]] = []
    names: list[str] = []
    flags: list[str] = []
    header: dict[str, str] = {}
    try:
        # utf-8-sig: files written on Windows may start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        sink.report(path, None, f"not UTF-8 text ({err.reason} at byte {err.start})")
        return DotaLabels.empty()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        header_match = _HEADER_LINE.match(line)
        if header_match:
            header[header_match[1]] = header_match[2].strip()
            continue
        if len(fields) not in (9, 10):
            sink.report(path, number, f"expected 10 fields ({_OBJECT_FIELDS}), got {len(fields)}: {line.strip()!r}")
            continue
        try:
            coords = [float(v) for v in fields[:8]]
        except ValueError:
            sink.report(path, number, f"coordinates must be numbers, got {' '.join(fields[:8])!r}")
            continue
        if not all(math.isfinite(v) for v in coords):
            sink.report(path, number, f"coordinates must be finite, got {' '.join(fields[:8])!r}")
            continue
        name = fields[8]
        if classes is not None and name not in classes:
            sink.report(path, number, f"unknown class {name!r} (known classes: {', '.join(sorted(classes))})")
            continue
        flag = fields[9] if len(fields) == 10 else "0"
        if flag not in _DIFFICULTY_FLAGS:
            sink.report(path, number, f"difficult must be 0, 1 or 2 (2: cut by a patch border), got {flag!r}")
            continue
        if _spans_no_area(coords):
            sink.report(path, number, f"degenerate polygon (coincident or collinear corners, no area): "
                                      f"{' '.join(fields[:8])!r}")
            continue
        polygons.append(coords)
        names.append(name)
        flags.append(flag)
    flag_array = np.array(flags, dtype=str)
    return DotaLabels(
        np.array(polygons, dtype=np.float64).reshape(-1, 8),
        tuple(names),
        flag_array == "1",
        header,
        truncated=flag_array == "2",
    )


# Rounding error of a cross product of coordinate differences, in units of
# extent * (extent + largest |coordinate|): 4 operations, each within one epsilon, doubled.
_FLAT_TOLERANCE = 8 * np.finfo(np.float64).eps


def _spans_no_area(coords: Sequence[float]) -> bool:
    """True when four corners span no area (coincident or collinear, up to rounding).

    The convex hull of the corners, not the polygon in file order: DOTA tools accept any
    corner order, and a "bow tie" order has zero signed area although it spans a rectangle.
    The hull has zero area exactly when every triangle of three corners has.
    """
    points = np.asarray(coords, dtype=np.float64).reshape(4, 2)
    extent = float(np.ptp(points, axis=0).max())
    magnitude = float(np.abs(points).max())
    largest = 0.0
    for a, b, c in itertools.combinations(points, 3):
        (ux, uy), (vx, vy) = b - a, c - a
        largest = max(largest, abs(float(ux * vy - uy * vx)))
    return largest <= _FLAT_TOLERANCE * extent * (extent + magnitude)


class DotaFolder:
    """An indexed DOTA folder: every label file is read (and checked) once, on construction.

    Args:
        root: folder holding ``images_dir`` and ``labels_dir``.
        classes: known class names, in label order; None discovers them (sorted names of all
            objects in this folder — pass the training folder's classes to its validation
            folder, which may lack some).
        errors: ``"raise"`` or ``"warn"`` (see the module docstring).
        images_dir, labels_dir: sub-folder names; ``labels_dir=None`` reads images only (every
            image has no objects).

    Attributes:
        root, classes, image_ids (sorted), issues (problems found with ``errors="warn"``).
    """

    def __init__(
        self,
        root: str | Path,
        classes: Sequence[str] | None = None,
        *,
        errors: str = "raise",
        images_dir: str = "images",
        labels_dir: str | None = "labelTxt",
    ):
        sink = _IssueSink(errors)
        self.root = Path(root)
        self._image_paths = _index_images(self.root / images_dir, sink)
        self._labels: dict[str, DotaLabels] = {}
        if labels_dir is not None:
            label_root = self.root / labels_dir
            if not label_root.is_dir():
                raise FileNotFoundError(
                    f"no label folder {label_root} (DOTA layout: {self.root}/{images_dir}, "
                    f"{self.root}/{labels_dir}; labels_dir=None reads images only)"
                )
            known = None if classes is None else frozenset(classes)
            label_paths: dict[str, Path] = {}
            for label_path in sorted(label_root.iterdir()):
                # ".TXT" too: some tools (and Windows copies) write upper-case extensions.
                if label_path.suffix.lower() != ".txt" or not label_path.is_file():
                    continue
                image_id = label_path.stem
                if image_id not in self._image_paths:
                    sink.report(label_path, None, f"label file has no image in {self.root / images_dir}")
                    continue
                if image_id in label_paths:
                    sink.report(label_path, None, f"two label files for image {image_id!r}: "
                                                  f"{label_paths[image_id].name} and {label_path.name}")
                    continue
                label_paths[image_id] = label_path
                self._labels[image_id] = _parse_label_file(label_path, known, sink)
        if classes is None:
            classes = sorted({name for labels in self._labels.values() for name in labels.class_names})
        elif len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct, got {list(classes)}")
        self.classes: tuple[str, ...] = tuple(classes)
        self.image_ids: tuple[str, ...] = tuple(sorted(self._image_paths))
        self.issues: tuple[DotaIssue, ...] = tuple(sink.issues)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: str) -> Path:
        return self._image_paths[image_id]

    def labels(self, image_id: str) -> DotaLabels:
        """The objects of an image (none when it has no label file)."""
        if image_id not in self._image_paths:
            raise KeyError(f"no image {image_id!r} in {self.root}")
        return self._labels[image_id] if image_id in self._labels else DotaLabels.empty()


def find_images(folder: str | Path) -> dict[str, Path]:
    """``{image_id: path}`` of the images in ``folder`` (extensions of :data:`IMAGE_EXTENSIONS`
    in any case); two images with one id raise :class:`DotaFormatError`, a missing folder
    ``FileNotFoundError``."""
    return _index_images(Path(folder), _IssueSink("raise"))


def _index_images(image_root: Path, sink: _IssueSink) -> dict[str, Path]:
    if not image_root.is_dir():
        raise FileNotFoundError(f"no image folder {image_root}")
    paths: dict[str, Path] = {}
    for path in sorted(image_root.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in paths:
            sink.report(path, None, f"two images with id {path.stem!r}: {paths[path.stem].name} and {path.name}")
            continue
        paths[path.stem] = path
    return paths


def write_text_durably(path: Path, text: str) -> None:
    """UTF-8 ``text`` into ``path``, atomically and durably (see :func:`dbf_ext._io.write_durably`)."""
    write_durably(path, "wb", lambda file: file.write(text.encode("utf-8")))


def _format_number(value: float) -> str:
    # repr is the shortest text that reads back to the same float: lossless round trips.
    return repr(float(value))


def write_dota_labels(
    path: str | Path,
    polygons: np.ndarray,
    class_names: Sequence[str],
    difficult: Sequence[bool] | np.ndarray | None = None,
    header: Mapping[str, str] | None = None,
    truncated: Sequence[bool] | np.ndarray | None = None,
) -> None:
    """Writes one ``labelTxt`` file (header lines first, then one object per line), atomically.

    Args:
        polygons: ``(K, 8)`` corners. class_names: ``K`` names (no whitespace).
        difficult: ``(K,)`` flags, all False when None. header: e.g. ``{"gsd": "0.5"}``.
        truncated: ``(K,)`` flags of objects cut by a patch border, written as difficulty
            ``2`` (taking precedence over ``difficult``, as split tools write it); all False
            when None.
    """
    write_text_durably(Path(path), format_dota_labels(polygons, class_names, difficult, header, truncated))


def format_dota_labels(
    polygons: np.ndarray,
    class_names: Sequence[str],
    difficult: Sequence[bool] | np.ndarray | None = None,
    header: Mapping[str, str] | None = None,
    truncated: Sequence[bool] | np.ndarray | None = None,
) -> str:
    """The text of a ``labelTxt`` file (see :func:`write_dota_labels`); coordinates are
    written as the shortest text that reads back to the same float64."""
    polygons = np.asarray(polygons, dtype=np.float64).reshape(-1, 8)
    none = np.zeros(len(polygons), dtype=bool)
    difficult = none if difficult is None else np.asarray(difficult, dtype=bool)
    truncated = none if truncated is None else np.asarray(truncated, dtype=bool)
    if not (len(class_names) == len(difficult) == len(truncated) == len(polygons)):
        raise ValueError(
            f"got {len(polygons)} polygons, {len(class_names)} class names, {len(difficult)} difficult "
            f"and {len(truncated)} truncated flags"
        )
    flags = np.where(truncated, 2, difficult.astype(int))
    for name in class_names:
        if not name or len(name.split()) != 1 or ":" in name:
            raise ValueError(f"class names must be non-empty, without whitespace or ':', got {name!r}")
    lines = [f"{key}:{value}" for key, value in (header or {}).items()]
    for polygon, name, flag in zip(polygons, class_names, flags):
        lines.append(" ".join([*map(_format_number, polygon), name, str(flag)]))
    return "".join(line + "\n" for line in lines)


def write_dota_task1(
    out_dir: str | Path,
    image_ids: Sequence[str],
    det_results: Sequence[Sequence[np.ndarray]],
    classes: Sequence[str],
    box_type: str = "obb",
) -> list[Path]:
    """Writes detections as DOTA Task1 result files, ``out_dir/Task1_<class>.txt``.

    Args:
        image_ids: DOTA image ids, one per entry of ``det_results``.
        det_results: ``det_results[image][class]`` arrays ``(k, 6)`` = rotated box + score
            (``"obb"``) or ``(k, 5)`` = ``x1, y1, x2, y2, score`` (``"hbb"``, written as
            four corners) — the format of :func:`dbf_ext.evaluation.eval_map`. Tensors work.
        classes: class names, one per class index; each must be a safe file name (letters,
            digits, ``_``, and after the first character ``.``, ``+``, ``-``), or
            ``ValueError`` is raised before anything is written.

    Returns:
        The files written, one per class (empty files for classes without detections).
    """
    if len(image_ids) != len(det_results):
        raise ValueError(f"got {len(image_ids)} image ids for {len(det_results)} detection results")
    paths = [_task1_path(out_dir, name) for name in classes]
    dim = box_dim(box_type) + 1
    lines: list[list[str]] = [[] for _ in classes]
    for image_id, per_class in zip(image_ids, det_results):
        if not image_id or len(image_id.split()) != 1:
            raise ValueError(f"image ids must be non-empty, without whitespace, got {image_id!r}")
        if len(per_class) != len(classes):
            raise ValueError(f"image {image_id!r} has results for {len(per_class)} classes, expected {len(classes)}")
        for class_lines, dets in zip(lines, per_class):
            dets = np.asarray(dets.cpu() if isinstance(dets, torch.Tensor) else dets, dtype=np.float64)
            dets = dets.reshape(-1, dim)
            polygons = boxes_to_polygons(dets[:, :-1], box_type)
            for score, polygon in zip(dets[:, -1], polygons):
                class_lines.append(" ".join([image_id, _format_number(score), *map(_format_number, polygon)]))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path, class_lines in zip(paths, lines):
        write_text_durably(path, "".join(line + "\n" for line in class_lines))
    return paths


def _task1_path(out_dir: str | Path, class_name: str) -> Path:
    """``out_dir/Task1_<class_name>.txt``; a class name that is not a safe file name is refused."""
    if not _SAFE_CLASS_NAME.fullmatch(class_name):
        raise ValueError(
            f"class name {class_name!r} is not a safe file name for a Task1 file (letters, digits, "
            "'_', and after the first character '.', '+', '-')"
        )
    return Path(out_dir) / f"Task1_{class_name}.txt"


@dataclass(frozen=True)
class Task1Detections:
    """The detections of one class in a Task1 file: ``image_ids`` (n), ``scores`` (n,),
    ``polygons`` (n, 8), in file order."""

    image_ids: tuple[str, ...]
    scores: np.ndarray
    polygons: np.ndarray


def read_dota_task1(out_dir: str | Path, classes: Iterable[str]) -> dict[str, Task1Detections]:
    """Reads ``out_dir/Task1_<class>.txt`` for each class (a missing file: no detections).

    Malformed lines raise :class:`DotaFormatError` with file and line number.
    """
    results = {}
    for name in classes:
        path = _task1_path(out_dir, name)
        rows: list[tuple[str, list[float]]] = []
        if path.exists():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != 10:
                        raise ValueError(f"expected 10 fields (image_id score x1 y1 ... x4 y4), got {len(fields)}")
                    rows.append((fields[0], [float(v) for v in fields[1:]]))
                except ValueError as err:
                    raise DotaFormatError(f"{path}:{number}: {err}") from None
        values = np.array([row for _, row in rows], dtype=np.float64).reshape(-1, 9)
        results[name] = Task1Detections(tuple(i for i, _ in rows), values[:, 0], values[:, 1:])
    return results
