"""Box conversions: angle versions, rotated box <-> polygon, horizontal <-> rotated.

Rotated boxes are ``(cx, cy, w, h, theta)`` in radians, clockwise in image coordinates (the
``w`` edge points along ``(cos theta, sin theta)``, y down), as in mmrotate. One box has many
equal descriptions (``theta + pi``; ``w``/``h`` swapped with ``theta + pi/2``); an *angle version*
picks one (mmrotate's definitions):

* ``"le90"``: ``w >= h`` and ``theta`` in ``[-pi/2, pi/2)``;
* ``"le135"``: ``w >= h`` and ``theta`` in ``[-pi/4, 3pi/4)``;
* ``"oc"`` (OpenCV before 4.5.1): ``theta`` in ``(0, pi/2]``, ``w``/``h`` follow the angle
  (an axis-aligned box has ``theta = pi/2`` with ``w`` the vertical side).

All functions accept any leading batch shape ``(..., k)`` and keep dtype and device.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from dbf_ext._validation import check_choice

ANGLE_VERSIONS = ("oc", "le90", "le135")


def _check_version(version: str) -> None:
    if version not in ANGLE_VERSIONS:
        raise ValueError(f"angle version must be one of {ANGLE_VERSIONS}, got {version!r}")


def _check_last_dim(name: str, tensor: Tensor, size: int, meaning: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0 or tensor.shape[-1] != size:
        raise ValueError(f"{name} must have shape (..., {size}) = {meaning}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")


def norm_angle(theta: Tensor, version: str) -> Tensor:
    """Wraps angles into the range of ``version`` (period pi; ``"oc"`` is left as is)."""
    _check_version(version)
    if version == "le90":
        return torch.remainder(theta + math.pi / 2, math.pi) - math.pi / 2
    if version == "le135":
        return torch.remainder(theta + math.pi / 4, math.pi) - math.pi / 4
    return theta


def regularize_obb(obb: Tensor, version: str = "le90") -> Tensor:
    """Rewrites rotated boxes ``(..., 5)`` in the canonical form of an angle version.

    The box (the set of points) is unchanged; only ``w``, ``h`` and ``theta`` are rewritten.
    """
    _check_last_dim("obb", obb, 5, "(cx, cy, w, h, theta)")
    _check_version(version)
    cx, cy, w, h, theta = obb.unbind(-1)
    if version == "oc":
        # theta' = theta - k pi/2 in (0, pi/2]; each quarter turn swaps w and h.
        quarter = math.pi / 2
        k = torch.ceil(theta / quarter) - 1
        theta = theta - k * quarter
        swap = torch.remainder(k, 2) == 1
    else:
        swap = w < h
        theta = norm_angle(torch.where(swap, theta + math.pi / 2, theta), version)
    new_w = torch.where(swap, h, w)
    new_h = torch.where(swap, w, h)
    return torch.stack((cx, cy, new_w, new_h, theta), dim=-1)


def obb2poly(obb: Tensor) -> Tensor:
    """Rotated boxes ``(..., 5)`` -> corner polygons ``(..., 8)`` = ``x1, y1, ..., x4, y4``.

    Corners in the order centre + (w/2, h/2), + (w/2, -h/2), - (w/2, h/2), + (-w/2, h/2) along
    the box's own axes (one orientation, consistent for every box).
    """
    _check_last_dim("obb", obb, 5, "(cx, cy, w, h, theta)")
    cx, cy, w, h, theta = obb.unbind(-1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    wx, wy = w / 2 * cos, w / 2 * sin  # half w edge
    hx, hy = -h / 2 * sin, h / 2 * cos  # half h edge
    corners = (
        (cx + wx + hx, cy + wy + hy),
        (cx + wx - hx, cy + wy - hy),
        (cx - wx - hx, cy - wy - hy),
        (cx - wx + hx, cy - wy + hy),
    )
    return torch.stack([c for corner in corners for c in corner], dim=-1)


def poly2obb(polys: Tensor, version: str = "le90") -> Tensor:
    """Polygons ``(..., 2k)`` (k >= 3 points, any order) -> minimum-area rotated boxes ``(..., 5)``.

    The minimum-area enclosing rectangle has a side on an edge of the convex hull; every hull
    edge joins two of the points, so trying the direction of every point pair finds it exactly
    (k(k-1)/2 candidates: 6 for DOTA quadrilaterals). The result is in ``version``'s form.
    """
    if not isinstance(polys, Tensor) or not polys.is_floating_point():
        raise TypeError("polys must be a floating torch.Tensor")
    if polys.dim() == 0 or polys.shape[-1] < 6 or polys.shape[-1] % 2:
        raise ValueError(
            f"polys must have shape (..., 2k) = (x1, y1, ..., xk, yk) with k >= 3, "
            f"got {tuple(polys.shape)}"
        )
    _check_version(version)
    points = polys.reshape(*polys.shape[:-1], polys.shape[-1] // 2, 2)  # (..., k, 2)
    k = points.shape[-2]
    pairs = torch.tensor(list(itertools.combinations(range(k), 2)), device=polys.device)
    edges = points[..., pairs[:, 1], :] - points[..., pairs[:, 0], :]  # (..., P, 2)
    angles = torch.atan2(edges[..., 1], edges[..., 0])  # (..., P)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # Point coordinates along each candidate direction (u) and its normal (v): (..., P, k).
    px, py = points[..., None, :, 0], points[..., None, :, 1]
    u = px * cos[..., None] + py * sin[..., None]
    v = -px * sin[..., None] + py * cos[..., None]
    u_min, u_max = u.amin(-1), u.amax(-1)
    v_min, v_max = v.amin(-1), v.amax(-1)
    area = (u_max - u_min) * (v_max - v_min)
    best = area.argmin(-1, keepdim=True)

    def pick(t: Tensor) -> Tensor:
        return t.gather(-1, best).squeeze(-1)

    theta = pick(angles)
    uc = (pick(u_min) + pick(u_max)) / 2
    vc = (pick(v_min) + pick(v_max)) / 2
    c, s = torch.cos(theta), torch.sin(theta)
    obb = torch.stack(
        (uc * c - vc * s, uc * s + vc * c, pick(u_max) - pick(u_min), pick(v_max) - pick(v_min), theta),
        dim=-1,
    )
    return regularize_obb(obb, version)


def mask2obb(masks: Tensor, version: str = "le90", dtype: torch.dtype = torch.float32) -> Tensor:
    """Instance masks ``(N, H, W)`` (bool or uint8) -> minimum-area rotated boxes ``(N, 5)``.

    The exact minimum-area rectangle enclosing each mask's pixels taken as unit squares (pixel
    ``(x, y)`` covers ``[x, x+1] x [y, y+1]``, so a one-pixel mask is a 1 x 1 box centred at
    ``(x + 0.5, y + 0.5)``), in ``version``'s form; batched on CPU or CUDA by the compiled
    kernel (:func:`dbf_ext.ops.mask_to_obb`, which states ties and limits). ``dtype``:
    ``torch.float32`` or ``torch.float64``.

    An empty mask gives a row of NaN; ``valid = ~boxes[:, 0].isnan()`` selects the others.
    """
    # The compiled kernels: loaded on first use only.
    from dbf_ext.ops.mask_to_obb import OUTPUT_DTYPES, mask_to_obb

    _check_version(version)
    check_choice("dtype", dtype, OUTPUT_DTYPES)
    # Regularised in float64, then rounded once: a quarter turn of float32 pi would leave
    # -1.2e-7 where an axis-aligned box has theta 0.
    return regularize_obb(mask_to_obb(masks, torch.float64), version).to(dtype)


def hbb2obb(hbb: Tensor, version: str = "le90") -> Tensor:
    """Axis-aligned boxes ``(..., 4)`` = ``x1, y1, x2, y2`` -> rotated boxes ``(..., 5)``."""
    _check_last_dim("hbb", hbb, 4, "(x1, y1, x2, y2)")
    x1, y1, x2, y2 = hbb.unbind(-1)
    obb = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)), dim=-1)
    return regularize_obb(obb, version)


def obb2hbb(obb: Tensor) -> Tensor:
    """Rotated boxes ``(..., 5)`` -> their axis-aligned bounding boxes ``(..., 4)``."""
    _check_last_dim("obb", obb, 5, "(cx, cy, w, h, theta)")
    cx, cy, w, h, theta = obb.unbind(-1)
    cos, sin = torch.cos(theta).abs(), torch.sin(theta).abs()
    half_x = (w * cos + h * sin) / 2
    half_y = (w * sin + h * cos) / 2
    return torch.stack((cx - half_x, cy - half_y, cx + half_x, cy + half_y), dim=-1)
