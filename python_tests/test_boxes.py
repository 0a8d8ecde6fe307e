"""Box conversions: angle versions, obb <-> poly, hbb <-> obb (round trips, shapely checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch

from dbf_ext import boxes as B
from dbf_ext.ops import box_iou_rotated
from dbf_ext.testing import random_rotated_boxes

RANGES = {"le90": (-math.pi / 2, math.pi / 2), "le135": (-math.pi / 4, 3 * math.pi / 4)}


def same_boxes(a, b):
    torch.testing.assert_close(box_iou_rotated(a, b, aligned=True), torch.ones(a.shape[0], dtype=a.dtype),
                               atol=1e-9, rtol=0)


@pytest.mark.parametrize("version", B.ANGLE_VERSIONS)
def test_regularize_keeps_the_box_and_meets_the_range(generator, version):
    boxes = random_rotated_boxes(300, generator=generator, dtype=torch.float64)
    boxes[:, 4] *= 3  # angles well outside one period
    reg = B.regularize_obb(boxes, version)
    same_boxes(boxes, reg)
    theta = reg[:, 4]
    if version == "oc":
        assert torch.all((theta > 0) & (theta <= math.pi / 2 + 1e-12))
    else:
        lo, hi = RANGES[version]
        assert torch.all((theta >= lo - 1e-12) & (theta < hi))
        assert torch.all(reg[:, 2] >= reg[:, 3])
    torch.testing.assert_close(B.regularize_obb(reg, version), reg, atol=1e-12, rtol=0)


def test_obb2poly_matches_shapely_corners(generator):
    boxes = random_rotated_boxes(50, generator=generator, dtype=torch.float64)
    polys = B.obb2poly(boxes).reshape(-1, 4, 2).numpy()
    for box, corners in zip(boxes.tolist(), polys):
        poly = shapely.Polygon(corners)
        assert poly.is_valid
        assert poly.area == pytest.approx(box[2] * box[3], rel=1e-12)
        assert poly.centroid.x == pytest.approx(box[0]) and poly.centroid.y == pytest.approx(box[1])
        # the w edge runs along (cos theta, sin theta)
        edge = corners[0] - corners[3]
        assert np.linalg.norm(edge) == pytest.approx(box[2], rel=1e-12)
        assert math.atan2(edge[1], edge[0]) == pytest.approx(
            math.atan2(math.sin(box[4]), math.cos(box[4])), abs=1e-9)


@pytest.mark.parametrize("version", B.ANGLE_VERSIONS)
def test_obb_poly_round_trip(generator, version):
    boxes = B.regularize_obb(random_rotated_boxes(200, generator=generator, dtype=torch.float64), version)
    back = B.poly2obb(B.obb2poly(boxes), version)
    torch.testing.assert_close(back, boxes, atol=1e-9, rtol=0)


def test_poly2obb_is_the_minimum_area_rectangle(generator):
    # Arbitrary quadrilaterals (not rectangles): compare with shapely's minimum rotated rectangle.
    points = torch.rand(100, 8, generator=generator, dtype=torch.float64) * 100
    obb = B.poly2obb(points)
    for poly, box in zip(points.reshape(-1, 4, 2).numpy(), obb.tolist()):
        want = shapely.MultiPoint(poly).minimum_rotated_rectangle
        assert box[2] * box[3] == pytest.approx(want.area, rel=1e-9)
        rect = shapely.Polygon(B.obb2poly(torch.tensor(box, dtype=torch.float64)).reshape(4, 2).numpy())
        assert rect.buffer(1e-7).contains(shapely.MultiPoint(poly))


@pytest.mark.parametrize("version", B.ANGLE_VERSIONS)
def test_hbb_obb_round_trip(generator, version):
    xy = torch.rand(100, 2, generator=generator, dtype=torch.float64) * 500
    wh = torch.rand(100, 2, generator=generator, dtype=torch.float64) * 90 + 1
    hbb = torch.cat([xy, xy + wh], dim=1)
    obb = B.hbb2obb(hbb, version)
    torch.testing.assert_close(B.obb2hbb(obb), hbb, atol=1e-9, rtol=0)
    torch.testing.assert_close(B.regularize_obb(obb, version), obb)


def test_obb2hbb_encloses_the_corners(generator):
    boxes = random_rotated_boxes(100, generator=generator, dtype=torch.float64)
    hbb = B.obb2hbb(boxes)
    corners = B.obb2poly(boxes).reshape(-1, 4, 2)
    torch.testing.assert_close(hbb[:, :2], corners.amin(1), atol=1e-9, rtol=0)
    torch.testing.assert_close(hbb[:, 2:], corners.amax(1), atol=1e-9, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="angle version"):
        B.regularize_obb(torch.zeros(1, 5), "le45")
    with pytest.raises(ValueError, match=r"\(\.\.\., 5\)"):
        B.obb2poly(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k >= 3"):
        B.poly2obb(torch.zeros(3, 4))
    with pytest.raises(TypeError):
        B.hbb2obb(torch.zeros(3, 4, dtype=torch.int64))
