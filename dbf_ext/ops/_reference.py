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


def roi_align_rotated_reference(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    clockwise: bool = True,
    chunk_elements: int = 1 << 24,
) -> Tensor:
    """Rotated RoI Align (mmcv's ``RoIAlignRotated``) in plain torch, differentiable w.r.t.
    ``features`` through autograd: every sample point is placed explicitly in the RoI's frame,
    rotated into the map and interpolated bilinearly.

    Same arguments and result as :func:`dbf_ext.ops.roi_align_rotated` (RoIs assumed valid);
    float64 is computed in float64, the other dtypes in float32. RoIs are processed in chunks
    whose gathered values stay under ``chunk_elements``.
    """
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    maps = features.to(compute)
    rois = rois.to(compute)
    channels = maps.shape[1]
    centre = rois[:, 1:3] * spatial_scale - (0.5 if aligned else 0.0)
    sides = rois[:, 3:5] * spatial_scale
    if not aligned:
        sides = sides.clamp(min=1.0)
    theta = rois[:, 5] if clockwise else -rois[:, 5]
    pooled = torch.tensor([pooled_w, pooled_h], dtype=compute, device=rois.device)
    if sampling_ratio > 0:
        grids = torch.full_like(sides, sampling_ratio, dtype=torch.int64)
    else:  # ceil of the bin side in map pixels, none for an empty RoI
        grids = torch.ceil(sides / pooled).clamp(min=0).long()
    largest = int(grids.max()) if rois.shape[0] else 0
    per_roi = max(1, pooled_h * pooled_w * largest * largest * channels * 4)
    chunk = max(1, chunk_elements // per_roi)
    parts = [
        _roi_align_rotated_chunk(
            maps, rois[i:i + chunk, 0].long(), centre[i:i + chunk], sides[i:i + chunk],
            theta[i:i + chunk], grids[i:i + chunk], (pooled_h, pooled_w),
        )
        for i in range(0, rois.shape[0], chunk)
    ]
    if not parts:
        return features.new_zeros((0, channels, pooled_h, pooled_w))
    return torch.cat(parts).to(features.dtype)


def _roi_align_rotated_chunk(maps, batch, centre, sides, theta, grids, pooled_size) -> Tensor:
    """``(n, C, oh, ow)`` bins of n RoIs: centre and sides ``(n, 2)`` (x, y) in map pixels,
    grids ``(n, 2)`` samples per bin along (x, y)."""
    pooled_h, pooled_w = pooled_size
    device, dtype = maps.device, maps.dtype
    n = batch.shape[0]
    gx_max, gy_max = (int(v) for v in grids.max(0).values)
    # Sample positions along each RoI axis, from the RoI's top-left corner in bins: bin index
    # plus (i + 0.5) / g; then scaled to pixels and centred. Shapes (n, bins, samples).
    def axis(bins: int, g_max: int, grid: Tensor, side: Tensor) -> tuple[Tensor, Tensor]:
        i = torch.arange(g_max, device=device, dtype=dtype)
        in_bins = torch.arange(bins, device=device, dtype=dtype)[None, :, None] + (
            (i[None, None, :] + 0.5) / grid.to(dtype).clamp(min=1)[:, None, None]
        )
        used = i[None, :] < grid[:, None]  # (n, samples): samples beyond the RoI's own grid
        return in_bins * (side / bins)[:, None, None] - side[:, None, None] / 2, used

    xx, used_x = axis(pooled_w, gx_max, grids[:, 0], sides[:, 0])  # (n, ow, gx)
    yy, used_y = axis(pooled_h, gy_max, grids[:, 1], sides[:, 1])  # (n, oh, gy)
    xx = xx[:, None, :, None, :]  # (n, 1, ow, 1, gx)
    yy = yy[:, :, None, :, None]  # (n, oh, 1, gy, 1)
    cos = torch.cos(theta).view(n, 1, 1, 1, 1)
    sin = torch.sin(theta).view(n, 1, 1, 1, 1)
    x = centre[:, 0].view(n, 1, 1, 1, 1) + xx * cos - yy * sin  # (n, oh, ow, gy, gx)
    y = centre[:, 1].view(n, 1, 1, 1, 1) + xx * sin + yy * cos
    values = _bilinear_samples(maps, batch.view(n, 1, 1, 1, 1), x, y)  # (n, oh, ow, gy, gx, C)
    used = (used_y[:, None, None, :, None] & used_x[:, None, None, None, :])[..., None]
    count = (grids[:, 0] * grids[:, 1]).clamp(min=1).to(dtype).view(n, 1, 1, 1)
    sums = torch.where(used, values, torch.zeros_like(values)).sum(dim=(3, 4))  # (n, oh, ow, C)
    return (sums / count).permute(0, 3, 1, 2)


def _bilinear_samples(maps: Tensor, batch: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Bilinear values of ``maps`` (B, C, H, W) at points (x, y) of image ``batch``, as
    torchvision's roi_align reads them: 0 outside [-1, H] x [-1, W], otherwise the point is
    clamped into [0, H - 1] x [0, W - 1]. Returns the points' shape + (C,)."""
    height, width = maps.shape[2:]
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    y = y.clamp(0, height - 1)
    x = x.clamp(0, width - 1)
    y0, x0 = y.floor(), x.floor()
    ly, lx = (y - y0)[..., None], (x - x0)[..., None]
    y0, x0 = y0.long(), x0.long()
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        return maps[batch, :, yi, xi]  # advanced indices first: points' shape + (C,)

    value = ((1 - ly) * (1 - lx) * at(y0, x0) + (1 - ly) * lx * at(y0, x1)
             + ly * (1 - lx) * at(y1, x0) + ly * lx * at(y1, x1))
    return torch.where(inside[..., None], value, torch.zeros_like(value))
