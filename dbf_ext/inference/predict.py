"""Sliding-window inference on large images, and its loop over a folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape
from rich.progress import Progress
from torch import Tensor

from dbf_ext.data.dataset import read_rgb8
from dbf_ext.data.split import SplitOptions, cut_window
from dbf_ext.inference.merge import (
    MERGE_IOU_THR,
    checked_detections,
    concat_detections,
    merge_detections,
    model_box_type,
    to_image_coordinates,
)


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _pixels_and_scale(image: Any) -> tuple[np.ndarray, float]:
    """An ``(H, W, 3)`` array view of ``image`` and the value of full intensity in it."""
    if isinstance(image, (str, os.PathLike)):
        return read_rgb8(Path(image)), 255.0
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        return image, 255.0
    if isinstance(image, Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be float (3, H, W) in [0, 1], got {image.dtype} "
                             f"{tuple(image.shape)}")
        return image.detach().cpu().permute(1, 2, 0).numpy(), 1.0
    raise TypeError(f"image must be a path, a uint8 (H, W, 3) array or a float (3, H, W) tensor, "
                    f"got {type(image).__name__}")


def _patch_tensor(pixels: np.ndarray, window: np.ndarray, pad: np.ndarray, full: float,
                  patch_size: int) -> Tensor:
    """The window as a float ``(3, P, P)`` tensor in [0, 1], resized to the patch size."""
    patch = torch.from_numpy(np.ascontiguousarray(cut_window(pixels, window, pad))).permute(2, 0, 1)
    patch = patch.float() / full if full != 1.0 else patch.float()
    if patch.shape[-1] != patch_size:  # a rate other than 1: the window scaled to the patch
        patch = F.interpolate(patch[None], size=(patch_size, patch_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]
    return patch


@torch.no_grad()
def predict_large(
    model: torch.nn.Module,
    image: str | os.PathLike | np.ndarray | Tensor,
    patch_size: int = 1024,
    gap: int = 200,
    rates: Sequence[float] = (1.0,),
    batch_size: int = 4,
    *,
    iou_thr: float = MERGE_IOU_THR,
    img_rate_thr: float = 0.6,
    pad_value: int | Sequence[int] = (104, 116, 124),
    progress: Progress | None = None,
    description: str = "windows",
) -> dict[str, Tensor]:
    """Detects objects in a large image by sliding windows, merged into one set of detections.

    The windows are :func:`~dbf_ext.data.split_dota`'s (``int(patch_size / rate)`` px,
    overlapping by ``int(gap / rate)``, the same ``img_rate_thr`` rule), cut from the image in
    memory, padded with ``pad_value`` (B, G, R, as the split) where they pass its border, and
    resized to ``patch_size`` px (bilinear, antialiased) for a rate other than 1, i.e. the
    image is seen at ``rate`` times its size. The model sees ``batch_size`` patches per call;
    its detections are mapped back to the image and merged by per-class NMS at ``iou_thr``
    (exact rotated NMS for an oriented model, axis-aligned NMS otherwise), so an object seen
    in two overlapping windows is reported once.

    Args:
        model: a torchvision-style detector: ``model(list of (3, H, W) float images in [0, 1])``
            -> one dict per image with ``boxes`` ``(K, 4)`` x1, y1, x2, y2, or ``(K, 5)`` cx, cy,
            w, h, theta (le90 radians) when ``model.box_type == "obb"``; ``scores``; ``labels``.
            It is put in eval mode; patches go to the device of its parameters.
        image: a file (any size; read once), a uint8 ``(H, W, 3)`` RGB array or a float
            ``(3, H, W)`` tensor in [0, 1].
        progress: a rich progress display to show a bar for this image's windows on.

    Returns:
        ``{"boxes", "scores", "labels"}`` in the image's pixels (float64 ``(K, 5 | 4)`` and
        ``(K,)``, int64 ``(K,)``, on the CPU), by decreasing score.
    """
    options = SplitOptions(patch_size, gap, tuple(rates), img_rate_thr=img_rate_thr,
                           pad_value=pad_value if isinstance(pad_value, int) else tuple(pad_value))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    box_type = model_box_type(model)
    pixels, full = _pixels_and_scale(image)
    height, width = pixels.shape[:2]
    windows = options.windows(width, height)
    pad = options.pad_rgb().astype(pixels.dtype) if full == 255.0 else options.pad_rgb() / np.float32(255)
    model.eval()
    device = _model_device(model)
    task = progress.add_task(escape(description), total=len(windows)) if progress is not None else None
    parts = []
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        patches = [_patch_tensor(pixels, window, pad, full, patch_size).to(device) for window in batch]
        outputs = model(patches)
        if len(outputs) != len(patches):
            raise ValueError(f"the model returned {len(outputs)} results for {len(patches)} images")
        for window, output in zip(batch, outputs):
            dets = checked_detections(output, box_type, f"the model's output for window {window.tolist()}")
            scale = patch_size / float(window[2] - window[0])
            dets["boxes"] = to_image_coordinates(dets["boxes"], (float(window[0]), float(window[1])), scale, box_type)
            parts.append(dets)
        if task is not None:
            progress.advance(task, len(batch))
    if task is not None:
        progress.remove_task(task)
    return merge_detections(concat_detections(parts, box_type), box_type, iou_thr)


def predict_images(
    model: torch.nn.Module,
    images: Mapping[str, Path],
    *,
    progress: Progress | None = None,
    **options: Any,
) -> Iterator[tuple[str, np.ndarray, dict[str, Tensor]]]:
    """:func:`predict_large` on each image of ``{image_id: path}`` in turn: yields
    ``(image_id, pixels, detections)`` with the image's uint8 ``(H, W, 3)`` pixels (read once).
    ``options`` go to :func:`predict_large`; with ``progress``, one bar counts the images and
    another the windows of the current image."""
    task = progress.add_task("images", total=len(images)) if progress is not None else None
    for image_id, path in images.items():
        pixels = read_rgb8(path)
        yield image_id, pixels, predict_large(model, pixels, progress=progress, description=image_id, **options)
        if task is not None:
            progress.advance(task)
