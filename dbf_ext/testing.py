"""Generators of DOTA-like rotated boxes and FPN anchors, and a peak-memory probe, shared by
the tests, the benchmarks and the docs.

The defaults are DOTA-like: a 1024 x 1024 tile, sides 4-100 px, uniform angles.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

R = TypeVar("R")


def random_rotated_boxes(
    n: int,
    *,
    tile: float = 1024.0,
    min_side: float = 4.0,
    max_side: float = 100.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(n, 5)`` boxes scattered uniformly over a ``tile x tile`` image, angles in [-pi, pi)."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    boxes = torch.empty(n, 5, dtype=torch.float64)
    boxes[:, :2] = u[:, :2] * tile
    boxes[:, 2:4] = min_side + u[:, 2:4] * (max_side - min_side)
    boxes[:, 4] = (u[:, 4] * 2 - 1) * math.pi
    return boxes.to(dtype)


def clustered_rotated_boxes(
    objects: int,
    per_object: int,
    *,
    tile: float = 1024.0,
    min_side: float = 4.0,
    max_side: float = 100.0,
    jitter: float = 0.1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(objects * per_object, 5)`` detector-like candidates: jittered copies of each object.

    Centres move by up to ``jitter`` times the object's size, sides scale by up to
    ``1 +- jitter`` and angles turn by up to ``jitter`` radians: heavy overlap within a cluster,
    as in the raw output of a detector before NMS.
    """
    centres = random_rotated_boxes(
        objects, tile=tile, min_side=min_side, max_side=max_side, generator=generator,
        dtype=torch.float64,
    )
    base = centres.repeat_interleave(per_object, dim=0)
    noise = torch.rand(base.shape, generator=generator, dtype=torch.float64) * 2 - 1
    size = base[:, 2:4].mean(dim=1, keepdim=True)
    boxes = base.clone()
    boxes[:, :2] += noise[:, :2] * jitter * size
    boxes[:, 2:4] *= 1 + noise[:, 2:4] * jitter
    boxes[:, 4] += noise[:, 4] * jitter
    return boxes.to(dtype)


def fpn_anchors(image_size: int = 1024, strides: tuple[int, ...] = (4, 8, 16, 32, 64)) -> Tensor:
    """``(N, 4)`` anchors ``(x1, y1, x2, y2)`` of a feature pyramid over a square image, as
    torchvision's ``AnchorGenerator`` makes them: per level one size (8 x stride) and three
    aspect ratios (0.5, 1, 2). A 1024 px image gives 261,888 anchors."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    images = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    features = [torch.zeros(1, 1, image_size // s, image_size // s) for s in strides]
    return generator(images, features)[0]


def peak_resident_mib(fn: Callable[[], R]) -> tuple[R, float]:
    """``(fn(), peak resident memory of the process during the call above its resident memory
    before, in MiB)``. Linux only: the peak (VmHWM) is reset through ``/proc/self/clear_refs``;
    freed heap memory is first returned to the system (glibc) so that reusing it counts."""
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM restarts from the current resident size
    before = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split(field + ":")[1].split()[0])


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Inside, any CUDA operation that makes the host wait for the GPU raises (torch's sync
    debug mode): the check that an operator never synchronises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def random_masks(
    n: int,
    height: int = 64,
    width: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, height, width)`` bool instance masks: rasterised ellipses (even indices) and
    rectangles (odd) of random centre, size and angle. A pixel is set when its centre lies
    inside the shape; a shape that covers no pixel centre gives an empty mask."""
    cx = torch.rand(n, 1, 1, generator=generator) * width
    cy = torch.rand(n, 1, 1, generator=generator) * height
    half_u = 0.5 + torch.rand(n, 1, 1, generator=generator) * min(height, width) / 3
    half_v = 0.3 + torch.rand(n, 1, 1, generator=generator) * min(height, width) / 6
    theta = torch.rand(n, 1, 1, generator=generator) * math.pi
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    dx, dy = xs - cx, ys - cy
    u = (dx * torch.cos(theta) + dy * torch.sin(theta)) / half_u
    v = (-dx * torch.sin(theta) + dy * torch.cos(theta)) / half_v
    ellipse = u * u + v * v <= 1
    rectangle = (u.abs() <= 1) & (v.abs() <= 1)
    is_rectangle = (torch.arange(n) % 2 == 1)[:, None, None]
    return torch.where(is_rectangle, rectangle, ellipse)


def random_detection_batch(
    batch_size: int, image_size: int, generator: torch.Generator, objects: int = 3, classes: int = 2
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Images ``(3, S, S)`` uniform in [0, 1) and torchvision detection targets (``boxes``
    ``(objects, 4)`` x1 y1 x2 y2 with sides 10-30 px in the top-left 90 px, ``labels`` in
    ``[1, classes]``), drawn from ``generator``."""
    images = [torch.rand(3, image_size, image_size, generator=generator) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        xy = torch.rand(objects, 2, generator=generator) * 60
        sides = 10 + torch.rand(objects, 2, generator=generator) * 20
        targets.append({"boxes": torch.cat([xy, xy + sides], 1),
                        "labels": torch.randint(1, classes + 1, (objects,), generator=generator)})
    return images, targets
