"""Plain torch re-implementations of mmcv ops, written from their definitions (not from the
shim), for the shim tests: RoIAlignRotated (DESIGN.md §3) and greedy / soft NMS."""

from __future__ import annotations

import math

import numpy as np
import torch


def _bilinear(feature: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``feature`` (C, H, W) sampled at (y, x) of any shape, with RoIAlign's border rules: a
    point beyond one pixel outside the map gives 0, points in that margin are clamped."""
    height, width = feature.shape[1:]
    outside = (y < -1) | (y > height) | (x < -1) | (x > width)
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y_low = y.floor().clamp(max=height - 1)
    x_low = x.floor().clamp(max=width - 1)
    y = torch.where(y_low >= height - 1, y_low, y)
    x = torch.where(x_low >= width - 1, x_low, x)
    y_high = (y_low + 1).clamp(max=height - 1)
    x_high = (x_low + 1).clamp(max=width - 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    yl, yh, xl, xh = (t.long() for t in (y_low, y_high, x_low, x_high))
    value = (hy * hx * feature[:, yl, xl] + hy * lx * feature[:, yl, xh]
             + ly * hx * feature[:, yh, xl] + ly * lx * feature[:, yh, xh])
    return torch.where(outside, torch.zeros((), dtype=feature.dtype), value)


def roi_align_rotated(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                      spatial_scale: float, sampling_ratio: int, aligned: bool,
                      clockwise: bool) -> torch.Tensor:
    """mmcv's RoIAlignRotated: ``(K, C, ph, pw)``; differentiable in ``features``."""
    pooled_h, pooled_w = output_size
    outputs = []
    for roi in rois.double().tolist():
        batch = int(roi[0])
        shift = 0.5 if aligned else 0.0
        cx, cy = roi[1] * spatial_scale - shift, roi[2] * spatial_scale - shift
        w, h, theta = roi[3] * spatial_scale, roi[4] * spatial_scale, roi[5]
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        if not clockwise:
            theta = -theta
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(h / pooled_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(w / pooled_w)
        bin_h, bin_w = h / pooled_h, w / pooled_w
        rows = torch.arange(pooled_h, dtype=torch.float64)[:, None]
        cols = torch.arange(pooled_w, dtype=torch.float64)[:, None]
        yy = -h / 2 + rows * bin_h + (torch.arange(grid_h, dtype=torch.float64) + 0.5) * bin_h / grid_h
        xx = -w / 2 + cols * bin_w + (torch.arange(grid_w, dtype=torch.float64) + 0.5) * bin_w / grid_w
        yy = yy[:, :, None, None]  # (ph, gh, 1, 1)
        xx = xx[None, None, :, :]  # (1, 1, pw, gw)
        x = cx + xx * math.cos(theta) - yy * math.sin(theta)
        y = cy + xx * math.sin(theta) + yy * math.cos(theta)
        samples = _bilinear(features[batch].double(), y, x)  # (C, ph, gh, pw, gw)
        outputs.append(samples.sum(dim=(2, 4)) / max(grid_h * grid_w, 1))
    if not outputs:
        return features.new_zeros((0, features.shape[1], pooled_h, pooled_w), dtype=torch.float64)
    return torch.stack(outputs)


def _iou_matrix(boxes: np.ndarray, offset: int = 0) -> np.ndarray:
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    area = (x2 - x1 + offset) * (y2 - y1 + offset)
    w = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]) + offset, 0, None)
    h = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]) + offset, 0, None)
    inter = w * h
    return inter / (area[:, None] + area[None] - inter)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, offset: int = 0) -> list[int]:
    """Kept indices by decreasing score (ties: lower index); suppression when IoU > threshold."""
    iou = _iou_matrix(boxes, offset)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(iou[i, k] <= threshold for k in kept):
            kept.append(i)
    return kept


def soft_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, sigma: float,
             min_score: float, method: str, offset: int = 0) -> tuple[list[int], list[float]]:
    """Soft-NMS (Bodla et al. 2017), one box at a time: (kept indices, their final scores)."""
    iou = _iou_matrix(boxes, offset)
    current = scores.astype(np.float64).copy()
    remaining = list(range(len(scores)))
    kept, kept_scores = [], []
    while remaining:
        best = max(remaining, key=lambda i: (current[i], -i))
        kept.append(best)
        kept_scores.append(current[best])
        remaining.remove(best)
        for i in list(remaining):
            o = iou[best, i]
            if method == "linear":
                current[i] *= (1 - o) if o >= threshold else 1
            elif method == "gaussian":
                current[i] *= math.exp(-o * o / sigma)
            elif o >= threshold:
                current[i] = 0
            if current[i] < min_score:
                remaining.remove(i)
    return kept, kept_scores
