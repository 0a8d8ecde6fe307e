"""Data: DOTA-format folders, a detection ``Dataset`` and the synthetic aerial set.

* :mod:`.dota`: read label files and folders (:class:`DotaFolder`, :func:`read_dota_labels`),
  convert polygons to rotated / axis-aligned boxes, write label files and DOTA Task1 result
  files.
* :class:`DotaDetectionDataset` and :func:`collate_fn`: torchvision-style detection samples.
* :mod:`.masks`: :func:`masks_to_dota` turns a folder of PNG instance maps into label files
  (minimum-area rotated rectangles by the compiled ``mask_to_obb`` kernel).
* :mod:`.split`: :func:`split_dota` cuts large images into overlapping patches (mmrotate's
  DOTA split tool's semantics), :func:`parse_patch_name` reads the patch names back.
* :mod:`.synthetic`: :func:`prepare_synthetic_dota` writes (once, into the user cache) a
  deterministic synthetic aerial set in DOTA format (256 px tiles, or large scenes).

Pure Python (numpy, torch, Pillow); only :func:`masks_to_dota` needs the compiled extension.
"""

from .dataset import DotaDetectionDataset, ImageReadError, collate_fn, large_image_size, read_rgb8
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
    find_images,
    format_dota_labels,
    polygons_to_hbb,
    polygons_to_obb,
    read_dota_labels,
    read_dota_task1,
    write_dota_labels,
    write_dota_task1,
)
from .masks import masks_to_dota, read_instance_map
from .split import (
    SPLIT_PRESETS,
    PatchName,
    SplitPreset,
    SplitSummary,
    parse_patch_name,
    patch_name,
    sliding_windows,
    split_dota,
    window_iof,
    window_objects,
)
from .synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    SyntheticSceneConfig,
    default_cache_dir,
    generate_synthetic_dota,
    prepare_synthetic_dota,
    render_synthetic_scene,
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
    "PatchName",
    "SPLIT_PRESETS",
    "SplitPreset",
    "SplitSummary",
    "ImageReadError",
    "SyntheticConfig",
    "SyntheticSceneConfig",
    "Task1Detections",
    "boxes_to_polygons",
    "collate_fn",
    "default_cache_dir",
    "find_images",
    "format_dota_labels",
    "generate_synthetic_dota",
    "large_image_size",
    "masks_to_dota",
    "parse_patch_name",
    "patch_name",
    "polygons_to_hbb",
    "polygons_to_obb",
    "prepare_synthetic_dota",
    "read_dota_labels",
    "read_dota_task1",
    "read_instance_map",
    "read_rgb8",
    "render_synthetic_scene",
    "render_synthetic_tile",
    "sliding_windows",
    "split_dota",
    "window_iof",
    "window_objects",
    "write_dota_labels",
    "write_dota_task1",
]
