"""Generators of DOTA-like rotated boxes, shared by the tests, the benchmarks and the docs.

The defaults follow DESIGN.md section 4: a 1024 x 1024 tile, sides 4-100 px, uniform angles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
