# TEMPORARY stand-in, replaced by the kernel from branch roi
"""Rotated RoIAlign (mmcv's ``RoIAlignRotated``) in plain torch, and its FPN version.

A stand-in with the public API of the compiled operator being written on branch ``roi``
(the semantic contract is /work/shared/DESIGN.md §3), so that Oriented R-CNN can be built and
tested before it lands. Gradients flow to ``features`` through torch's indexing (not to
``rois``). It loops over the sampling grid and so is slow for large RoI counts; the compiled
kernel replaces this whole file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dbf_ext._validation import as_integer, check_float_dtype, check_same_device, check_tensor


def roi_align_rotated(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
    clockwise: bool = True,
) -> Tensor:
    """Bilinear pooling of rotated RoIs: mmcv's ``RoIAlignRotated``.

    Args:
        features: ``(B, C, H, W)`` feature maps (float16 / bfloat16 computed in float32).
        rois: ``(K, 6)`` = ``(batch_index, cx, cy, w, h, theta)`` in input-image pixels
            (theta in radians), scaled by ``spatial_scale``.
        output_size: ``oh`` (square) or ``(oh, ow)`` bins.
        spatial_scale: feature-map pixels per input pixel (``1 / stride``).
        sampling_ratio: bilinear samples per bin side; ``0``: ``ceil(roi side / output side)``
            per RoI.
        aligned: shift the RoI by half a pixel (``cx * scale - 0.5``); False clamps ``w``,
            ``h`` to at least 1 instead.
        clockwise: with True a point ``(xx, yy)`` of the RoI frame maps to
            ``(cx + xx cos(theta) - yy sin(theta), cy + xx sin(theta) + yy cos(theta))`` (the
            convention of ``box_iou_rotated``); False negates theta.

    Returns:
        ``(K, C, oh, ow)``: each bin the mean of its samples; a sample with ``y < -1``,
        ``y > H``, ``x < -1`` or ``x > W`` contributes 0, the others are clamped to the map.
    """
    check_tensor("features", features)
    check_tensor("rois", rois)
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, H, W), got {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 6:
        raise ValueError(f"rois must have shape (K, 6) = (batch_index, cx, cy, w, h, theta), got {tuple(rois.shape)}")
    check_float_dtype("features", features)
    check_float_dtype("rois", rois)
    check_same_device(features=features, rois=rois)
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    out_h, out_w = as_integer("output_size", out_h, 1), as_integer("output_size", out_w, 1)
    sampling_ratio = as_integer("sampling_ratio", sampling_ratio, 0)
    num_images, channels, height, width = features.shape
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    if rois.shape[0] == 0:
        return features.new_zeros((0, channels, out_h, out_w))
    rois = rois.to(compute)
    if not torch.isfinite(rois).all():
        raise ValueError("rois must be finite")
    batch = rois[:, 0]
    if (batch != batch.round()).any() or (batch < 0).any() or (batch >= num_images).any():
        raise ValueError(f"rois[:, 0] must be integral batch indices in [0, {num_images})")

    offset = 0.5 if aligned else 0.0
    cx = rois[:, 1] * spatial_scale - offset
    cy = rois[:, 2] * spatial_scale - offset
    roi_w, roi_h = rois[:, 3] * spatial_scale, rois[:, 4] * spatial_scale
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    theta = rois[:, 5] if clockwise else -rois[:, 5]
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    if sampling_ratio > 0:
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
        grid_h = grid_w
    else:
        grid_w, grid_h = torch.ceil(roi_w / out_w).long(), torch.ceil(roi_h / out_h).long()

    maps = features.to(compute)
    output = maps.new_zeros((rois.shape[0], channels, out_h, out_w))
    bins_y = torch.arange(out_h, dtype=compute, device=rois.device)
    bins_x = torch.arange(out_w, dtype=compute, device=rois.device)
    # RoIs are pooled in groups of one image and one sampling grid, all samples at once.
    groups = torch.stack((batch.long(), grid_h, grid_w), 1)
    for image, samples_h, samples_w in torch.unique(groups, dim=0).tolist():
        if samples_h == 0 or samples_w == 0:
            continue  # an empty RoI side: no samples, the bins stay 0
        rows = torch.nonzero((groups == groups.new_tensor((image, samples_h, samples_w))).all(1)).squeeze(1)
        # RoI-frame sample coordinates: yy (k, oh, 1, gh, 1), xx (k, 1, ow, 1, gw).
        steps_y = (torch.arange(samples_h, dtype=compute, device=rois.device) + 0.5) / samples_h
        steps_x = (torch.arange(samples_w, dtype=compute, device=rois.device) + 0.5) / samples_w
        yy = (-roi_h[rows, None, None] / 2 + (bins_y[:, None] + steps_y) * bin_h[rows, None, None])[:, :, None, :, None]
        xx = (-roi_w[rows, None, None] / 2 + (bins_x[:, None] + steps_x) * bin_w[rows, None, None])[:, None, :, None, :]
        cos = torch.cos(theta[rows])[:, None, None, None, None]
        sin = torch.sin(theta[rows])[:, None, None, None, None]
        x = xx * cos - yy * sin + cx[rows, None, None, None, None]
        y = xx * sin + yy * cos + cy[rows, None, None, None, None]
        samples = _bilinear(maps[image], x, y)  # (C, k, oh, ow, gh, gw)
        output[rows] = samples.flatten(4).mean(-1).transpose(0, 1)
    return output.to(features.dtype)


def _bilinear(features: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Samples ``(C, *x.shape)`` of one image's maps ``(C, H, W)`` at pixel coordinates ``x``,
    ``y`` with mmcv's border rules: 0 beyond one pixel outside the map, the border pixel
    between (``grid_sample``'s border padding clamps the coordinates to the map)."""
    channels, height, width = features.shape
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    # grid_sample's coordinates with align_corners=False: -1 and 1 are the map's outer edges.
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1).reshape(1, -1, 1, 2)
    samples = nn.functional.grid_sample(features[None], grid, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    return samples.reshape(channels, *x.shape) * inside


class MultiScaleRoIAlignRotated(nn.Module):
    """:func:`roi_align_rotated` on a feature pyramid, called like torchvision's
    ``MultiScaleRoIAlign``.

    Each RoI is pooled from one level, chosen as mmdetection's ``SingleRoIExtractor`` does:
    ``level = floor(log2(sqrt(w h) / finest_scale + 1e-6))`` clamped to the levels, level 0
    being the first of ``featmap_names``. Each level's scale is inferred from its size and the
    largest image size (``2 ** round(log2(feature size / image size))``, as torchvision).

    Args:
        featmap_names: the levels used, finest first.
        output_size: bins per side (or ``(oh, ow)``).
        sampling_ratio: as in :func:`roi_align_rotated` (mmrotate's Oriented R-CNN uses 2).
        finest_scale: RoI scale that maps to level 1 and above (mmdetection's 56).

    ``forward(features: dict[str, (B, C, H_l, W_l)], rois: list[(K_i, 5)], image_shapes:
    list[(h, w)])`` -> ``(sum K_i, C, oh, ow)``, RoIs of image 0 first; ``aligned=True``,
    ``clockwise=True``.
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int | tuple[int, int], sampling_ratio: int = 0,
                 finest_scale: float = 56.0):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.finest_scale = float(finest_scale)

    def forward(self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        levels = [features[name] for name in self.featmap_names]
        max_h = max(int(shape[0]) for shape in image_shapes)
        max_w = max(int(shape[1]) for shape in image_shapes)
        scales = [_infer_scale(level.shape[-2:], (max_h, max_w)) for level in levels]
        packed = torch.cat([torch.cat((r.new_full((r.shape[0], 1), i), r), 1) for i, r in enumerate(rois)])
        out_h, out_w = ((self.output_size, self.output_size) if isinstance(self.output_size, int)
                        else tuple(self.output_size))
        output = levels[0].new_zeros((packed.shape[0], levels[0].shape[1], out_h, out_w))
        if packed.shape[0] == 0:
            return output
        size = torch.sqrt(packed[:, 3] * packed[:, 4])
        target = torch.floor(torch.log2(size / self.finest_scale + 1e-6)).clamp(0, len(levels) - 1).long()
        for index, (level, scale) in enumerate(zip(levels, scales)):
            rows = torch.nonzero(target == index).squeeze(1)
            if rows.numel():
                output[rows] = roi_align_rotated(level, packed[rows], (out_h, out_w), scale,
                                                 self.sampling_ratio).to(output.dtype)
        return output

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, finest_scale={self.finest_scale}")


def _infer_scale(feature_size: Sequence[int], image_size: tuple[int, int]) -> float:
    scales = {2.0 ** round(math.log2(f / i)) for f, i in zip(feature_size, image_size)}
    if len(scales) != 1:
        raise ValueError(f"feature map {tuple(feature_size)} has different scales along its sides for images "
                         f"up to {image_size}")
    return scales.pop()
