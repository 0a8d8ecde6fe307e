"""Data: DOTA-format folders, a detection ``Dataset`` and the synthetic aerial set.

* :mod:`.dota`: read label files and folders (:class:`DotaFolder`, :func:`read_dota_labels`),
  convert polygons to rotated / axis-aligned boxes, write label files and DOTA Task1 result
  files.
* :class:`DotaDetectionDataset` and :func:`collate_fn`: torchvision-style detection samples.
* :mod:`.masks`: :func:`masks_to_dota` turns a folder of PNG instance maps into label files
  (minimum-area rotated rectangles by the compiled ``mask_to_obb`` kernel).
* :mod:`.synthetic`: :func:`prepare_synthetic_dota` writes (once, into the user cache) a
  deterministic synthetic aerial set in DOTA format.

Pure Python (numpy, torch, Pillow); only :func:`masks_to_dota` needs the compiled extension.
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
from .masks import masks_to_dota, read_instance_map
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
    "masks_to_dota",
    "polygons_to_hbb",
    "polygons_to_obb",
    "prepare_synthetic_dota",
    "read_dota_labels",
    "read_dota_task1",
    "read_instance_map",
    "render_synthetic_tile",
    "write_dota_labels",
    "write_dota_task1",
]
