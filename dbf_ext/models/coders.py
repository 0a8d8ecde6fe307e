"""Box coders of Oriented R-CNN (Xie et al., "Oriented R-CNN for Object Detection", ICCV 2021),
with the semantics of mmrotate 0.3.4's ``MidpointOffsetCoder`` and ``DeltaXYWHAOBBoxCoder``.

* :class:`MidpointOffsetCoder`: horizontal anchors ``(x1, y1, x2, y2)`` -> oriented proposals,
  six deltas ``(dx, dy, dw, dh, da, db)`` (the oriented RPN's "midpoint offset"
  representation).
* :class:`DeltaXYWHAOBBoxCoder`: oriented proposals ``(cx, cy, w, h, theta)`` -> oriented
  boxes, five deltas ``(dx, dy, dw, dh, dtheta)`` (the rotated RoI head).

Rotated boxes are ``(cx, cy, w, h, theta)``, theta in radians, clockwise in image coordinates
(see :mod:`dbf_ext.boxes`). The defaults are the values of mmrotate's
``oriented_rcnn_r50_fpn_1x_dota_le90`` config (not the classes' own defaults there, which are
``stds = 1``, ``angle_range = "oc"``, ``edge_swap = proj_xy = False``). Both coders compute in
the dtype of their inputs (mmrotate casts to float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dbf_ext._validation import check_choice, check_float_dtype, check_tensor
from dbf_ext.boxes import ANGLE_VERSIONS, norm_angle, obb2hbb, obb2poly, regularize_obb

# mmrotate finds the gt's top and right vertices as the polygon's vertices within this many
# pixels of its topmost y / rightmost x (a tolerance in pixels, kept for equal targets).
_VERTEX_TOLERANCE = 0.1
_DEFAULT_WH_RATIO_CLIP = 16 / 1000


def _check_boxes(name: str, boxes: object, width: int, meaning: str) -> Tensor:
    boxes = check_tensor(name, boxes)
    if boxes.dim() != 2 or boxes.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}) = {meaning}, got {tuple(boxes.shape)}")
    check_float_dtype(name, boxes)
    return boxes


def _check_pair(first: Tensor, second: Tensor, names: tuple[str, str]) -> None:
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same N, got {first.shape[0]} and {second.shape[0]}")
    if first.device != second.device:
        raise ValueError(f"{names[0]} and {names[1]} must be on one device, got {first.device} and {second.device}")


def _normalisation(values: Sequence[float], count: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != count:
        raise ValueError(f"{name} must have {count} values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values


class MidpointOffsetCoder:
    """Horizontal anchors -> oriented boxes with the midpoint-offset representation.

    A ground truth is described by its enclosing axis-aligned box ``(gx, gy, gw, gh)`` and two
    offsets: ``ga``, the x of the rotated box's top vertex, and ``gb``, the y of its right
    vertex. Encoding an anchor ``(px, py, pw, ph)`` (centre and size of ``x1, y1, x2, y2``)::

        dx = (gx - px) / pw      dy = (gy - py) / ph
        dw = log(gw / pw)        dh = log(gh / ph)
        da = (ga - gx) / gw      db = (gb - gy) / gh
        deltas = ((dx, dy, dw, dh, da, db) - means) / stds

    The top vertex is the rightmost of the polygon's vertices within 0.1 px of its smallest y
    (mmrotate's rule: an axis-aligned box has ``da = db = 0.5``); the right vertex is the top
    vertex's neighbour with the larger x. mmrotate takes instead the lowest vertex within
    0.1 px of the largest x: the same vertex, except for boxes turned so slightly that one pair
    of edges is within 0.1 px of level and the other is not (e.g. a 15 x 32 px box turned by
    0.2-0.4 degrees), where its top and right vertices are one corner, or opposite corners, and
    the target is a degenerate box. Here those boxes round-trip within 0.1 px.

    Decoding applies the deltas to the anchor (``dw``, ``dh`` clipped to
    ``|log(wh_ratio_clip)|``, ``da``, ``db`` to ``[-0.5, 0.5]``) and builds the quadrilateral
    ``(gx + da gw, y1), (x2, gy + db gh), (gx - da gw, y2), (x1, gy - db gh)``, a
    parallelogram; stretching its shorter diagonal to the length of the longer one about the
    centre makes it a rectangle, returned in ``angle_version`` form: ``w`` is its longer side
    (at a tie, the side from the first vertex to the fourth gives the angle, as in mmrotate).
    Unlike :class:`DeltaXYWHAOBBoxCoder`, centres are not clipped to the image (as mmrotate,
    whose RPN passes ``max_shape`` to a coder that ignores it).

    Args:
        means, stds: normalisation of the six deltas (mmrotate's Oriented R-CNN config:
            zeros and ``(1, 1, 1, 1, 0.5, 0.5)``).
        angle_version: ``"le90"`` (default), ``"le135"`` or ``"oc"`` form of decoded boxes.
        wh_ratio_clip: bound of the size deltas (mmrotate's 16 / 1000).
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0,) * 6,
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5),
        angle_version: str = "le90",
        wh_ratio_clip: float = _DEFAULT_WH_RATIO_CLIP,
    ):
        self.means = _normalisation(means, 6, "means")
        self.stds = _normalisation(stds, 6, "stds")
        check_choice("angle_version", angle_version, ANGLE_VERSIONS)
        self.angle_version = angle_version
        self.max_log_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(N, 6)`` deltas taking ``anchors`` ``(N, 4)`` ``(x1, y1, x2, y2)`` to ``gt_boxes``
        ``(N, 5)`` (any angle form: the representation depends on the box only)."""
        _check_boxes("anchors", anchors, 4, "(x1, y1, x2, y2)")
        _check_boxes("gt_boxes", gt_boxes, 5, "(cx, cy, w, h, theta)")
        _check_pair(anchors, gt_boxes, ("anchors", "gt_boxes"))
        px, py, pw, ph = _centre_size(anchors)
        gx, gy, gw, gh = _centre_size(obb2hbb(gt_boxes))
        corners = obb2poly(gt_boxes).unflatten(-1, (4, 2))  # consecutive corners, (N, 4, 2)
        xs, ys = corners[..., 0], corners[..., 1]
        near_top = (ys - ys.amin(-1, keepdim=True)).abs() <= _VERTEX_TOLERANCE
        top = torch.where(near_top, xs, -math.inf).argmax(-1, keepdim=True)
        ga = xs.gather(-1, top).squeeze(-1)
        # The right vertex is the top vertex's neighbour on the right (module docstring).
        before, after = (top - 1) % 4, (top + 1) % 4
        right = torch.where(xs.gather(-1, after) > xs.gather(-1, before), after, before)
        gb = ys.gather(-1, right).squeeze(-1)
        deltas = torch.stack(
            ((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph), (ga - gx) / gw,
             (gb - gy) / gh), dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, anchors: Tensor, deltas: Tensor) -> Tensor:
        """``(N, 5)`` rotated boxes from ``anchors`` ``(N, 4)`` and ``deltas`` ``(N, 6)``."""
        _check_boxes("anchors", anchors, 4, "(x1, y1, x2, y2)")
        _check_boxes("deltas", deltas, 6, "(dx, dy, dw, dh, da, db)")
        _check_pair(anchors, deltas, ("anchors", "deltas"))
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da, db = deltas.unbind(-1)
        px, py, pw, ph = _centre_size(anchors.to(deltas.dtype))
        gw = pw * dw.clamp(-self.max_log_ratio, self.max_log_ratio).exp()
        gh = ph * dh.clamp(-self.max_log_ratio, self.max_log_ratio).exp()
        gx, gy = px + pw * dx, py + ph * dy
        da, db = da.clamp(-0.5, 0.5), db.clamp(-0.5, 0.5)
        # Offsets from the centre of the quadrilateral's first two vertices (the other two are
        # their reflections through the centre): the top one and the right one.
        first = torch.stack((da * gw, -gh / 2), dim=-1)
        second = torch.stack((gw / 2, db * gh), dim=-1)
        first_length, second_length = first.norm(dim=-1), second.norm(dim=-1)
        diagonal = torch.maximum(first_length, second_length)
        first = first * (diagonal / first_length)[..., None]
        second = second * (diagonal / second_length)[..., None]
        # The rectangle's sides: first -> second and second -> third (= -first).
        side1, side2 = second - first, -first - second
        length1, length2 = side1.norm(dim=-1), side2.norm(dim=-1)
        # At a tie mmrotate takes the direction first -> fourth (= -second), parallel to side2.
        along1 = length1 > length2
        direction = torch.where(along1[..., None], side1, -second - first)
        theta = norm_angle(torch.atan2(direction[..., 1], direction[..., 0]), "le90")
        boxes = torch.stack((gx, gy, torch.maximum(length1, length2), torch.minimum(length1, length2), theta),
                            dim=-1)
        return boxes if self.angle_version == "le90" else regularize_obb(boxes, self.angle_version)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(means={self.means}, stds={self.stds}, angle_version={self.angle_version!r})"


class DeltaXYWHAOBBoxCoder:
    """Oriented proposals -> oriented boxes: deltas of centre, size and angle.

    Encoding a proposal ``(px, py, pw, ph, pa)`` to a gt ``(gx, gy, gw, gh, ga)``::

        proj_xy:   dx = ( cos(pa) (gx - px) + sin(pa) (gy - py)) / pw
                   dy = (-sin(pa) (gx - px) + cos(pa) (gy - py)) / ph   (in the proposal's frame)
        else:      dx = (gx - px) / pw,  dy = (gy - py) / ph
        edge_swap: of the gt's two descriptions (gw, gh, ga) and (gh, gw, ga + pi/2), the one
                   whose angle difference norm_angle(ga' - pa) is smaller in magnitude is used
                   (the first at a tie)
        dw = log(gw' / pw),  dh = log(gh' / ph),  da = norm_angle(ga' - pa)  [/ (norm_factor pi)]
        deltas = ((dx, dy, dw, dh, da) - means) / stds

    ``norm_angle`` wraps into the range of ``angle_version`` (see :mod:`dbf_ext.boxes`).
    Decoding inverts this (``dw``, ``dh`` clipped to ``|log(wh_ratio_clip)|``,
    ``theta = norm_angle(pa + da)``), clips centres to ``[0, W - 1] x [0, H - 1]`` when
    ``max_shape = (H, W)`` is given and, with ``edge_swap``, returns the box with ``w > h``:
    ``(w, h, theta)`` if ``w > h`` else ``(h, w, norm_angle(theta + pi/2))``.

    Args:
        means, stds: normalisation of the five deltas (mmrotate's Oriented R-CNN config: zeros
            and ``(0.1, 0.1, 0.2, 0.2, 0.1)``).
        angle_version: ``"le90"`` (default), ``"le135"`` or ``"oc"`` (mmrotate's
            ``angle_range``).
        norm_factor: None (the config), or the angle delta is divided by ``norm_factor * pi``.
        edge_swap, proj_xy: as above (both True in the config).
        wh_ratio_clip: bound of the size deltas (mmrotate's 16 / 1000).
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0,) * 5,
        stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2, 0.1),
        angle_version: str = "le90",
        norm_factor: float | None = None,
        edge_swap: bool = True,
        proj_xy: bool = True,
        wh_ratio_clip: float = _DEFAULT_WH_RATIO_CLIP,
    ):
        self.means = _normalisation(means, 5, "means")
        self.stds = _normalisation(stds, 5, "stds")
        check_choice("angle_version", angle_version, ANGLE_VERSIONS)
        self.angle_version = angle_version
        self.norm_factor = None if not norm_factor else float(norm_factor)
        self.edge_swap = bool(edge_swap)
        self.proj_xy = bool(proj_xy)
        self.max_log_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, proposals: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(N, 5)`` deltas taking ``proposals`` ``(N, 5)`` to ``gt_boxes`` ``(N, 5)``."""
        _check_boxes("proposals", proposals, 5, "(cx, cy, w, h, theta)")
        _check_boxes("gt_boxes", gt_boxes, 5, "(cx, cy, w, h, theta)")
        _check_pair(proposals, gt_boxes, ("proposals", "gt_boxes"))
        px, py, pw, ph, pa = proposals.unbind(-1)
        gx, gy, gw, gh, ga = gt_boxes.to(proposals.dtype).unbind(-1)
        dx, dy = gx - px, gy - py
        if self.proj_xy:
            cos, sin = torch.cos(pa), torch.sin(pa)
            dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
        da = norm_angle(ga - pa, self.angle_version)
        if self.edge_swap:
            da_swapped = norm_angle(ga - pa + math.pi / 2, self.angle_version)
            keep = da.abs() < da_swapped.abs()
            gw, gh = torch.where(keep, gw, gh), torch.where(keep, gh, gw)
            da = torch.where(keep, da, da_swapped)
        if self.norm_factor:
            da = da / (self.norm_factor * math.pi)
        deltas = torch.stack((dx / pw, dy / ph, torch.log(gw / pw), torch.log(gh / ph), da), dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, proposals: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """``(N, 5)`` boxes from ``proposals`` ``(N, 5)`` and ``deltas`` ``(N, 5)``; centres
        clipped to an image of ``max_shape = (H, W)`` when given."""
        _check_boxes("proposals", proposals, 5, "(cx, cy, w, h, theta)")
        _check_boxes("deltas", deltas, 5, "(dx, dy, dw, dh, dtheta)")
        _check_pair(proposals, deltas, ("proposals", "deltas"))
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh, da = deltas.unbind(-1)
        px, py, pw, ph, pa = proposals.to(deltas.dtype).unbind(-1)
        if self.norm_factor:
            da = da * (self.norm_factor * math.pi)
        gw = pw * dw.clamp(-self.max_log_ratio, self.max_log_ratio).exp()
        gh = ph * dh.clamp(-self.max_log_ratio, self.max_log_ratio).exp()
        shift_x, shift_y = dx * pw, dy * ph
        if self.proj_xy:
            cos, sin = torch.cos(pa), torch.sin(pa)
            shift_x, shift_y = cos * shift_x - sin * shift_y, sin * shift_x + cos * shift_y
        gx, gy = px + shift_x, py + shift_y
        ga = norm_angle(pa + da, self.angle_version)
        if max_shape is not None:
            gx = gx.clamp(0, max_shape[1] - 1)
            gy = gy.clamp(0, max_shape[0] - 1)
        if self.edge_swap:
            wider = gw > gh
            gw, gh = torch.where(wider, gw, gh), torch.where(wider, gh, gw)
            ga = norm_angle(torch.where(wider, ga, ga + math.pi / 2), self.angle_version)
        return torch.stack((gx, gy, gw, gh, ga), dim=-1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(means={self.means}, stds={self.stds}, angle_version={self.angle_version!r}, "
                f"norm_factor={self.norm_factor}, edge_swap={self.edge_swap}, proj_xy={self.proj_xy})")


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(cx, cy, w, h)`` of axis-aligned boxes ``(..., 4)`` = ``x1, y1, x2, y2``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
