"""Independent float64 reference: rotated-box overlaps by shapely polygon clipping."""

from __future__ import annotations

import math

import numpy as np
import shapely


def box_polygon(box, clockwise: bool = True) -> shapely.Polygon | None:
    """A shapely polygon of one (cx, cy, w, h, theta) box; None for an invalid box."""
    cx, cy, w, h, theta = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (cx, cy, w, h, theta)) or w <= 0 or h <= 0:
        return None
    if not clockwise:
        theta = -theta
    c, s = math.cos(theta), math.sin(theta)
    ex, ey, fx, fy = w / 2 * c, w / 2 * s, -h / 2 * s, h / 2 * c
    return shapely.Polygon(
        [(cx + ex + fx, cy + ey + fy), (cx - ex + fx, cy - ey + fy),
         (cx - ex - fx, cy - ey - fy), (cx + ex - fx, cy + ey - fy)]
    )


def overlap(p1, p2, mode: str) -> float:
    if p1 is None or p2 is None:
        return 0.0
    inter = p1.intersection(p2).area
    denom = p1.area if mode == "iof" else p1.area + p2.area - inter
    return inter / denom if denom > 0 else 0.0


def iou_matrix(boxes1, boxes2, mode: str = "iou", aligned: bool = False,
               clockwise: bool = True) -> np.ndarray:
    """(N, M) or aligned (N,) float64 overlaps of array-likes of boxes."""
    b1 = np.asarray(boxes1, dtype=np.float64).reshape(-1, 5)
    b2 = np.asarray(boxes2, dtype=np.float64).reshape(-1, 5)
    p1 = [box_polygon(b, clockwise) for b in b1]
    p2 = [box_polygon(b, clockwise) for b in b2]
    if aligned:
        return np.array([overlap(a, b, mode) for a, b in zip(p1, p2)], dtype=np.float64)
    return np.array([[overlap(a, b, mode) for b in p2] for a in p1], dtype=np.float64).reshape(
        len(p1), len(p2)
    )
