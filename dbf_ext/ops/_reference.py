"""Plain torch reference implementations of the operators (gsplat style: a readable version
next to each kernel). Used by the tests as a second opinion and by the benchmarks as the
"vectorised torch" peer; not meant for production use.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def rotated_box_corners(boxes: Tensor, clockwise: bool = True) -> Tensor:
    """``(N, 5)`` boxes -> ``(N, 4, 2)`` corners in order around the box."""
    cx, cy, w, h, theta = boxes.unbind(-1)
    if not clockwise:
        theta = -theta
    cos, sin = torch.cos(theta), torch.sin(theta)
    ex, ey = w / 2 * cos, w / 2 * sin
    fx, fy = -h / 2 * sin, h / 2 * cos
    xs = torch.stack((cx + ex + fx, cx - ex + fx, cx - ex - fx, cx + ex - fx), dim=-1)
    ys = torch.stack((cy + ey + fy, cy - ey + fy, cy - ey - fy, cy + ey - fy), dim=-1)
    return torch.stack((xs, ys), dim=-1)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(points: Tensor, corners: Tensor) -> Tensor:
    """points (..., P, 2) inside the convex quadrilaterals corners (..., 4, 2) -> (..., P)."""
    edges = corners.roll(-1, dims=-2) - corners  # (..., 4, 2)
    rel = points[..., :, None, :] - corners[..., None, :, :]  # (..., P, 4, 2)
    side = _cross(edges[..., None, :, :], rel)  # (..., P, 4)
    return (side >= 0).all(-1) | (side <= 0).all(-1)


def _intersection_area(c1: Tensor, c2: Tensor) -> Tensor:
    """Areas of intersection of quadrilaterals c1 (K, 4, 2) and c2 (K, 4, 2) -> (K,).

    The classic construction: the intersection polygon's vertices are the corners of each box
    inside the other plus the crossings of their edges; sort them by angle around their mean
    and apply the shoelace formula.
    """
    p, r = c1, c1.roll(-1, dims=1) - c1  # edges of box 1: p + t r
    q, s = c2, c2.roll(-1, dims=1) - c2  # edges of box 2: q + u s
    p, r = p[:, :, None], r[:, :, None]  # (K, 4, 1, 2)
    q, s = q[:, None], s[:, None]  # (K, 1, 4, 2)
    denom = _cross(r, s)
    qp = q - p
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    t = _cross(qp, s) / safe
    u = _cross(qp, r) / safe
    cross_ok = (denom != 0) & (t >= 0) & (t <= 1) & (u >= 0) & (u <= 1)
    crossings = (p + t[..., None] * r).reshape(-1, 16, 2)
    points = torch.cat((c1, c2, crossings), dim=1)  # (K, 24, 2)
    valid = torch.cat((_inside(c1, c2), _inside(c2, c1), cross_ok.reshape(-1, 16)), dim=1)
    count = valid.sum(1)
    w = valid.to(points.dtype)
    centre = (points * w[..., None]).sum(1) / count.clamp(min=1)[:, None]
    rel = points - centre[:, None]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 10.0))  # invalid points last
    order = angle.argsort(dim=1)
    rel = rel.gather(1, order[..., None].expand(-1, -1, 2))
    valid = valid.gather(1, order)
    # Invalid slots repeat the first point: they add nothing to the shoelace sum.
    rel = torch.where(valid[..., None], rel, rel[:, :1])
    area = _cross(rel, rel.roll(-1, dims=1)).sum(1).abs() / 2
    return torch.where(count >= 3, area, torch.zeros_like(area))


def box_iou_rotated_reference(
    boxes1: Tensor,
    boxes2: Tensor,
    mode: str = "iou",
    aligned: bool = False,
    clockwise: bool = True,
    chunk_pairs: int = 1 << 18,
) -> Tensor:
    """Same contract as :func:`dbf_ext.ops.box_iou_rotated`, in plain torch.

    Invalid boxes (non-finite, non-positive side) give 0. Pairs are processed in chunks of
    ``chunk_pairs`` to bound memory.
    """
    def valid(b: Tensor) -> Tensor:
        return torch.isfinite(b).all(-1) & (b[:, 2] > 0) & (b[:, 3] > 0)

    c1, c2 = rotated_box_corners(boxes1, clockwise), rotated_box_corners(boxes2, clockwise)
    a1, a2 = boxes1[:, 2] * boxes1[:, 3], boxes2[:, 2] * boxes2[:, 3]
    v1, v2 = valid(boxes1), valid(boxes2)
    if aligned:
        i1 = i2 = torch.arange(boxes1.shape[0], device=boxes1.device)
    else:
        i1 = torch.arange(boxes1.shape[0], device=boxes1.device).repeat_interleave(boxes2.shape[0])
        i2 = torch.arange(boxes2.shape[0], device=boxes1.device).repeat(boxes1.shape[0])
    out = torch.zeros(i1.shape[0], dtype=boxes1.dtype, device=boxes1.device)
    for start in range(0, i1.shape[0], chunk_pairs):
        j1, j2 = i1[start : start + chunk_pairs], i2[start : start + chunk_pairs]
        inter = _intersection_area(c1[j1], c2[j2])
        denom = a1[j1] if mode == "iof" else a1[j1] + a2[j2] - inter
        ratio = (inter / denom).nan_to_num(0.0).clamp(0, 1)
        out[start : start + chunk_pairs] = torch.where(v1[j1] & v2[j2], ratio, 0)
    return out if aligned else out.reshape(boxes1.shape[0], boxes2.shape[0])


def nms_rotated_reference(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    labels: Tensor | None = None,
    pairwise_iou: Callable[[Tensor, Tensor], Tensor] = box_iou_rotated_reference,
) -> Tensor:
    """Same contract as :func:`dbf_ext.ops.nms_rotated`: textbook greedy NMS over a dense
    ``(N, N)`` IoU matrix (``O(N^2)`` memory).

    ``pairwise_iou`` computes the matrix: the plain torch reference by default; the benchmarks
    pass ``dbf_ext.ops.box_iou_rotated`` to measure the greedy loop over a fast matrix.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    suppresses = pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    if labels is not None:
        sorted_labels = labels[order]
        suppresses &= sorted_labels[:, None] == sorted_labels[None, :]
    removed = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    kept = []
    for i in range(boxes.shape[0]):
        if not removed[i]:
            kept.append(i)
            removed |= suppresses[i]  # also marks earlier boxes, whose fate is already decided
    return order[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]


def mask_row_end_corners(mask: Tensor) -> Tensor:
    """``(H, W)`` mask -> ``(4R, 2)`` float64 corners of the first and last set pixel of each of
    its R rows with a set pixel. Their convex hull is that of all the set pixels' unit squares
    (a row's other squares lie between its two end squares)."""
    rows = mask.any(dim=1).nonzero().squeeze(1)
    set_rows = mask[rows].to(torch.uint8)
    first = set_rows.argmax(dim=1)
    last = mask.shape[1] - 1 - set_rows.flip(1).argmax(dim=1)
    x = torch.stack((first, first, last + 1, last + 1), dim=1)
    y = torch.stack((rows, rows + 1, rows, rows + 1), dim=1)
    return torch.stack((x, y), dim=-1).reshape(-1, 2).double()


def mask_to_obb_reference(masks: Tensor, version: str = "le90") -> Tensor:
    """``(N, H, W)`` masks -> ``(N, 5)`` float64 minimum-area boxes: ``poly2obb`` of each mask's
    row end corners (every point pair's direction is tried); NaN rows for empty masks."""
    from dbf_ext.boxes import poly2obb

    boxes = torch.full((masks.shape[0], 5), float("nan"), dtype=torch.float64)
    for i, mask in enumerate(masks.cpu().bool()):
        corners = mask_row_end_corners(mask)
        if len(corners):
            boxes[i] = poly2obb(corners.reshape(1, -1), version)[0]
    return boxes
