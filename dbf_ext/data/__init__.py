"""Data: DOTA-format folders, a detection ``Dataset`` and the synthetic aerial set.

* :mod:`.dota`: read label files and folders (:class:`DotaFolder`, :func:`read_dota_labels`),
  convert polygons to rotated / axis-aligned boxes, write label files and DOTA Task1 result
  files.
* :class:`DotaDetectionDataset` and :func:`collate_fn`: torchvision-style detection samples.
* :mod:`.synthetic`: :func:`prepare_synthetic_dota` writes (once, into the user cache) a
  deterministic synthetic aerial set in DOTA format.

Pure Python (numpy, torch, Pillow); nothing here needs the compiled extension.
"""

from .dataset import DotaDetectionDataset, ImageReadError, collate_fn
from .dota import (
    DOTA_V1_CLASSES,
    DOTA_V15_CLASSES,
    IMAGE_EXTENSIONS,
    DotaFolder,
    DotaFormatError,
    DotaFormatWarning,
    DotaIssue,
    DotaLabels,
    Task1Detections,
    boxes_to_polygons,
    polygons_to_hbb,
    polygons_to_obb,
    read_dota_labels,
    read_dota_task1,
    write_dota_labels,
    write_dota_task1,
)
from .synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    default_cache_dir,
    generate_synthetic_dota,
    prepare_synthetic_dota,
    render_synthetic_tile,
)

__all__ = [
    "DOTA_V15_CLASSES",
    "DOTA_V1_CLASSES",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_CLASSES",
    "DotaDetectionDataset",
    "DotaFolder",
    "DotaFormatError",
    "DotaFormatWarning",
    "DotaIssue",
    "DotaLabels",
    "ImageReadError",
    "SyntheticConfig",
    "Task1Detections",
    "boxes_to_polygons",
    "collate_fn",
    "default_cache_dir",
    "generate_synthetic_dota",
    "polygons_to_hbb",
    "polygons_to_obb",
    "prepare_synthetic_dota",
    "read_dota_labels",
    "read_dota_task1",
    "render_synthetic_tile",
    "write_dota_labels",
    "write_dota_task1",
]
