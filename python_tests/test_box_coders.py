"""Oriented R-CNN's box coders against values derived by hand from the formulas (the paper's
midpoint-offset representation, mmrotate 0.3.4's ``MidpointOffsetCoder`` /
``DeltaXYWHAOBBoxCoder``), and encode / decode round trips."""

import math

import pytest
import torch

from dbf_ext.boxes import obb2hbb, obb2poly
from dbf_ext.models import DeltaXYWHAOBBoxCoder, MidpointOffsetCoder

PI = math.pi
F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def corner_error(got, want):
    """Per box, the largest distance from a corner of one box to the nearest corner of the
    other, both ways (0 when they are the same rectangle, whatever its description)."""
    distances = (obb2poly(got).reshape(-1, 4, 1, 2) - obb2poly(want).reshape(-1, 1, 4, 2)).norm(dim=-1)
    return torch.maximum(distances.amin(-1).amax(-1), distances.amin(-2).amax(-1))


def same_rectangle(got, want, atol):
    return bool((corner_error(got, want) <= atol).all())


def assert_le90(boxes):
    assert (boxes[:, 2] >= boxes[:, 3]).all()
    assert ((boxes[:, 4] >= -PI / 2) & (boxes[:, 4] < PI / 2)).all()


def random_boxes(n, generator, near_square=False):
    u = torch.rand(n, 5, generator=generator, dtype=F64)
    boxes = torch.empty(n, 5, dtype=F64)
    boxes[:, :2] = 50 + u[:, :2] * 400
    boxes[:, 2] = 8 + u[:, 2] * 90
    boxes[:, 3] = boxes[:, 2] * (1 + 1e-6 * u[:, 3]) if near_square else 8 + u[:, 3] * 90
    boxes[:, 4] = (u[:, 4] * 2 - 1) * PI
    return boxes


# ------------------------------------------------------------------------------------------------
# MidpointOffsetCoder
# ------------------------------------------------------------------------------------------------

def test_midpoint_offset_hand_checked_encoding():
    coder = MidpointOffsetCoder()
    # An axis-aligned gt: top vertices (0, 0), (20, 0) -> ga = 20 (the rightmost), right vertices
    # (20, 0), (20, 10) -> gb = 10 (the lowest): da = (20 - 10) / 20 = 0.5, db = (10 - 5) / 10 = 0.5,
    # divided by the stds 0.5.
    got = coder.encode(t([0, 0, 20, 10]), t([10, 5, 20, 10, 0]))
    torch.testing.assert_close(got, t([0, 0, 0, 0, 1, 1]))
    # A square turned by 45 degrees: corners (10, 0), (20, 10), (10, 20), (0, 10); enclosing box
    # (0, 0, 20, 20); top vertex x = 10 = gx, right vertex y = 10 = gy.
    got = coder.encode(t([0, 0, 20, 20]), t([10, 10, 10 * math.sqrt(2), 10 * math.sqrt(2), PI / 4]))
    torch.testing.assert_close(got, t([0, 0, 0, 0, 0, 0]))
    # w = 4, h = 2, theta = 30 degrees about the origin: half w edge a = (2 cos, 2 sin), half h
    # edge b = (-sin, cos). Enclosing box: gw = w cos + h sin, gh = w sin + h cos. Top vertex
    # -a - b: x = -(2 cos - sin); right vertex a - b: y = 2 sin - cos.
    cos, sin = math.cos(PI / 6), math.sin(PI / 6)
    gw, gh = 4 * cos + 2 * sin, 4 * sin + 2 * cos
    ga, gb = -(2 * cos - sin), 2 * sin - cos
    anchor = t([-2, -1, 2, 1])  # centre 0, size 4 x 2
    want = t([0, 0, math.log(gw / 4), math.log(gh / 2), ga / gw / 0.5, gb / gh / 0.5])
    torch.testing.assert_close(coder.encode(anchor, t([0, 0, 4, 2, PI / 6])), want)
    # Means and stds are applied as (delta - mean) / std; the anchor's offset enters dx, dy.
    shifted = MidpointOffsetCoder(means=(0.1, 0, 0, 0, 0, 0), stds=(2, 1, 1, 1, 1, 1))
    got = shifted.encode(t([-6, -1, -2, 1]), t([0, 0, 4, 2, PI / 6]))
    assert got[0, 0].item() == pytest.approx(((0 - -4) / 4 - 0.1) / 2)


def test_midpoint_offset_hand_checked_decoding():
    coder = MidpointOffsetCoder()
    # da = db = 0.5: the quadrilateral is the anchor itself.
    torch.testing.assert_close(coder.decode(t([0, 0, 20, 10]), t([0, 0, 0, 0, 1, 1])), t([10, 5, 20, 10, 0]))
    # da = db = 0 on a square anchor: the diamond (10, 0), (20, 10), (10, 20), (0, 10). Its sides
    # tie; as mmrotate, the side from the first vertex to the fourth, (-10, 10), gives the angle:
    # 3 pi / 4, i.e. -pi / 4 in le90.
    side = 10 * math.sqrt(2)
    torch.testing.assert_close(coder.decode(t([0, 0, 20, 20]), t([0, 0, 0, 0, 0, 0])),
                               t([10, 10, side, side, -PI / 4]))
    # da = 0.25 on a 40 x 20 anchor: vertices at (10, -10) and (20, 0) from the centre, a
    # parallelogram; its half diagonals, stretched to length 20, point at -45 and 0 degrees, so
    # the rectangle's sides are 2 * 20 * cos(22.5) and 2 * 20 * sin(22.5) and its long side is
    # perpendicular to the bisector of the two diagonals: theta = -22.5 degrees.
    got = coder.decode(t([0, 0, 40, 20]), t([0, 0, 0, 0, 0.5, 0]))
    torch.testing.assert_close(got, t([20, 10, 40 * math.cos(PI / 8), 40 * math.sin(PI / 8), -PI / 8]))
    # Centre and size deltas and the clips: dh = 9 is cut to |log(16 / 1000)| (a factor 62.5),
    # da = 1.6 * 0.5 to 0.5. The box (20, 0) of 40 x 625, axis-aligned, is (625, 40, -pi/2) in le90.
    got = coder.decode(t([0, 0, 20, 10]), t([0.5, -0.5, math.log(2), 9.0, 1.6, 1.0]))
    torch.testing.assert_close(got, t([20, 0, 625, 40, -PI / 2]))


def test_midpoint_offset_round_trip_random_boxes(generator):
    coder = MidpointOffsetCoder()
    for near_square in (False, True):
        gts = random_boxes(500, generator, near_square)
        # Anchors of other centres and sizes (within the size clip of the decoder).
        anchors_centre = gts[:, :2] + torch.randn(500, 2, generator=generator, dtype=F64) * 10
        anchor_size = gts[:, 2:4] * (0.5 + torch.rand(500, 2, generator=generator, dtype=F64))
        anchors = torch.cat((anchors_centre - anchor_size / 2, anchors_centre + anchor_size / 2), 1)
        decoded = coder.decode(anchors, coder.encode(anchors, gts))
        assert_le90(decoded)
        # The top vertex is looked for within 0.1 px of the smallest y: a box with an edge that
        # close to level comes back as its enclosing axis-aligned box, whose corners are off by
        # at most the other edge's tilt (0.1 px times the aspect ratio). The others are exact.
        error = corner_error(decoded, gts)
        corners = obb2poly(gts)
        ys = corners[:, 1::2].sort(dim=1).values
        snapped = ys[:, 1] - ys[:, 0] <= 0.1
        aspect = gts[:, 2:4].amax(1) / gts[:, 2:4].amin(1)
        assert (error[snapped] <= 0.1 * aspect[snapped] + 1e-9).all()
        assert (~snapped).sum() > 480
        assert (error[~snapped] <= 1e-6).all()


def test_midpoint_offset_nearly_level_box_where_mmrotate_degenerates():
    """A 32 x 15 box turned 0.005 rad past vertical: its short edges are within 0.1 px of level
    (tilt 0.075 px), its long edges not (0.16 px). The top vertex is then the rightmost of the
    top edge; mmrotate takes as right vertex the lowest vertex within 0.1 px of the largest x,
    which is that same corner, and its target decodes to a sliver. Ours takes the top vertex's
    right-hand neighbour: the target is the enclosing axis-aligned box."""
    coder = MidpointOffsetCoder()
    gt = t([100, 100, 32, 15, PI / 2 + 0.005])
    anchor = t([90, 80, 110, 120])
    deltas = coder.encode(anchor, gt)
    decoded = coder.decode(anchor, deltas)
    assert corner_error(decoded, gt).item() <= 0.1 * 32 / 15
    hbb = obb2hbb(gt)[0]  # the enclosing box, taller than wide: w = its height, theta = -pi/2
    torch.testing.assert_close(decoded, t([100, 100, hbb[3] - hbb[1], hbb[2] - hbb[0], -PI / 2]))
    # mmrotate's right vertex, from its rule, written out.
    corners = obb2poly(gt).reshape(4, 2)
    rightmost = (corners[:, 0] - corners[:, 0].max()).abs() <= 0.1
    mm_gb = corners[rightmost, 1].max()
    mm_db = (mm_gb - (hbb[1] + hbb[3]) / 2) / (hbb[3] - hbb[1])
    mm_deltas = deltas.clone()
    mm_deltas[0, 5] = mm_db / 0.5
    assert coder.decode(anchor, mm_deltas)[0, 3].item() < 1  # a sliver 32 px long
    assert deltas[0, 5].item() == pytest.approx(1.0)  # ours: the lower right corner, db = 0.5


@pytest.mark.parametrize("theta", [PI / 2, -PI / 2, PI / 2 - 1e-9, -PI / 2 + 1e-9, 0.0, 1e-9, PI])
def test_midpoint_offset_axis_aligned_and_edge_angles(theta):
    coder = MidpointOffsetCoder()
    gt = t([50, 60, 30, 12, theta])
    anchor = t([30, 40, 70, 80])
    decoded = coder.decode(anchor, coder.encode(anchor, gt))
    assert same_rectangle(decoded, gt, atol=1e-6)
    assert_le90(decoded)
    # le90 keeps w the longer side; theta is the gt's up to a half turn (the le90 range ends at
    # +-pi/2, so theta = pi/2 - 1e-9 may come back as itself or as -pi/2).
    torch.testing.assert_close(decoded[0, :4], gt[0, :4], atol=1e-6, rtol=0)
    turn = torch.remainder(decoded[0, 4] - gt[0, 4] + PI / 2, PI) - PI / 2
    assert abs(turn.item()) < 1e-6


def test_midpoint_offset_other_angle_versions_and_errors():
    anchor, deltas = t([0, 0, 20, 10]), t([0, 0, 0, 0, 0.3, -0.4])
    le90 = MidpointOffsetCoder().decode(anchor, deltas)
    for version in ("le135", "oc"):
        other = MidpointOffsetCoder(angle_version=version).decode(anchor, deltas)
        assert same_rectangle(other, le90, atol=1e-9)
    with pytest.raises(ValueError, match="angle_version"):
        MidpointOffsetCoder(angle_version="le45")
    with pytest.raises(ValueError, match="stds must have 6 values"):
        MidpointOffsetCoder(stds=(1, 1, 1, 1, 1))
    coder = MidpointOffsetCoder()
    with pytest.raises(ValueError, match=r"anchors must have shape \(N, 4\)"):
        coder.encode(t([0, 0, 1, 1, 0]), t([0, 0, 1, 1, 0]))
    with pytest.raises(ValueError, match="the same N"):
        coder.decode(t([0, 0, 1, 1]), torch.zeros(2, 6, dtype=F64))
    with pytest.raises(TypeError, match="float"):
        coder.decode(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 6))


# ------------------------------------------------------------------------------------------------
# DeltaXYWHAOBBoxCoder
# ------------------------------------------------------------------------------------------------

STDS = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.1], dtype=F64)


def test_delta_xywha_hand_checked_encoding():
    coder = DeltaXYWHAOBBoxCoder()
    # pa = 0: the projection is the identity. dtheta = 0.1 beats 0.1 - pi/2 in magnitude.
    got = coder.encode(t([10, 20, 8, 4, 0]), t([12, 21, 16, 2, 0.1]))
    torch.testing.assert_close(got, t([2 / 8, 1 / 4, math.log(2), math.log(0.5), 0.1]) / STDS)
    # pa = pi/2: the offset (0, 5) lies along the proposal's w axis (cos, sin) = (0, 1).
    got = coder.encode(t([0, 0, 10, 4, PI / 2]), t([0, 5, 10, 4, PI / 2]))
    torch.testing.assert_close(got, t([5 / 10, 0, 0, 0, 0]) / STDS, atol=1e-12, rtol=0)
    # Edge swap: ga - pa = 1.4 vs 1.4 + pi/2 -> le90 1.4 - pi/2 = -0.1708; the second is smaller,
    # so the gt is taken as (w, h) = (12, 6) at angle ga + pi/2.
    got = coder.encode(t([0, 0, 10, 4, 0]), t([0, 0, 6, 12, 1.4]))
    torch.testing.assert_close(got, t([0, 0, math.log(12 / 10), math.log(6 / 4), 1.4 - PI / 2]) / STDS)
    # le90 wrap-around: pa = 1.5, ga = -1.5 differ by 0.1416 through +-pi/2, not by -3.
    got = coder.encode(t([0, 0, 10, 4, 1.5]), t([0, 0, 10, 4, -1.5]))
    assert got[0, 4].item() == pytest.approx((PI - 3) / 0.1)
    # Without edge swap and projection (mmrotate's class defaults), with norm_factor.
    plain = DeltaXYWHAOBBoxCoder(stds=(1,) * 5, edge_swap=False, proj_xy=False, norm_factor=0.5)
    got = plain.encode(t([0, 0, 10, 4, PI / 2]), t([3, 2, 6, 12, 1.4]))
    torch.testing.assert_close(got, t([0.3, 0.5, math.log(0.6), math.log(3), (1.4 - PI / 2) / (0.5 * PI)]))


def test_delta_xywha_hand_checked_decoding():
    coder = DeltaXYWHAOBBoxCoder()
    # gw = 10 * exp(log 0.2) = 2 < gh = 4: edge swap returns (4, 2) at theta + pi/2 -> -pi/2.
    got = coder.decode(t([0, 0, 10, 4, 0]), t([0, 0, math.log(0.2), 0, 0]) / STDS)
    torch.testing.assert_close(got, t([0, 0, 4, 2, -PI / 2]))
    # Projection: dx = 0.5 along the w axis of a proposal at pi/2 moves the centre by (0, 5).
    got = coder.decode(t([0, 0, 10, 4, PI / 2]), t([0.5, 0, 0, 0, 0]) / STDS)
    torch.testing.assert_close(got, t([0, 5, 10, 4, -PI / 2]), atol=1e-12, rtol=0)
    # Centres clipped to [0, W - 1] x [0, H - 1] with max_shape = (H, W).
    got = coder.decode(t([95, 5, 10, 4, 0]), t([1, -1, 0, 0, 0]) / STDS, max_shape=(50, 100))
    torch.testing.assert_close(got, t([99, 1, 10, 4, 0]))
    got = coder.decode(t([95, 5, 10, 4, 0]), t([1, -2, 0, 0, 0]) / STDS, max_shape=(50, 100))
    assert got[0, :2].tolist() == [99, 0]
    # Size deltas clipped to |log(16 / 1000)|.
    got = coder.decode(t([0, 0, 10, 4, 0]), t([0, 0, 5.0, 0, 0]) / STDS)
    assert got[0, 2].item() == pytest.approx(10 * 1000 / 16)


def test_delta_xywha_round_trip_random_boxes(generator):
    coder = DeltaXYWHAOBBoxCoder()
    for near_square in (False, True):
        gts = random_boxes(500, generator, near_square)
        proposals = random_boxes(500, generator)
        proposals[:, :2] = gts[:, :2] + torch.randn(500, 2, generator=generator, dtype=F64) * 5
        decoded = coder.decode(proposals, coder.encode(proposals, gts))
        assert_le90(decoded)
        assert same_rectangle(decoded, gts, atol=1e-6)


@pytest.mark.parametrize("gt_theta", [PI / 2, -PI / 2, PI / 2 - 1e-9, -PI / 2 + 1e-9, PI / 4, -PI / 4])
@pytest.mark.parametrize("proposal_theta", [-PI / 2, PI / 2 - 1e-7, 0.0])
def test_delta_xywha_edge_angles(gt_theta, proposal_theta):
    coder = DeltaXYWHAOBBoxCoder()
    gt, proposal = t([40, 30, 20, 8, gt_theta]), t([42, 31, 18, 9, proposal_theta])
    deltas = coder.encode(proposal, gt)
    # Edge swap keeps the angle delta within a quarter turn (0.1 is its std).
    assert abs(deltas[0, 4].item()) * 0.1 <= PI / 4 + 1e-9
    decoded = coder.decode(proposal, deltas)
    assert same_rectangle(decoded, gt, atol=1e-6)
    assert_le90(decoded)


def test_delta_xywha_near_square_gt_takes_the_closer_description():
    """A square gt has two descriptions a quarter turn apart: edge swap picks the one whose
    angle is nearer the proposal's, so the regression never asks for a near quarter turn."""
    coder = DeltaXYWHAOBBoxCoder(stds=(1,) * 5)
    proposal = t([0, 0, 10, 9, 0.2])
    for gt_theta in (-1.2, 0.35, 1.45):
        deltas = coder.encode(proposal, t([0, 0, 10, 10 * (1 - 1e-7), gt_theta]))
        assert abs(deltas[0, 4].item()) <= PI / 4 + 1e-9


def test_delta_xywha_errors_and_dtypes():
    coder = DeltaXYWHAOBBoxCoder()
    with pytest.raises(ValueError, match=r"proposals must have shape \(N, 5\)"):
        coder.encode(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="the same N"):
        coder.decode(torch.zeros(3, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="means must be finite"):
        DeltaXYWHAOBBoxCoder(means=(0, 0, 0, 0, math.nan))
    # float32 in, float32 out; empty inputs give empty outputs.
    out = coder.decode(torch.tensor([[1.0, 2, 3, 4, 0]]), torch.zeros(1, 5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 2, 4, 3, -PI / 2]]))
    assert coder.encode(torch.zeros(0, 5), torch.zeros(0, 5)).shape == (0, 5)
    assert MidpointOffsetCoder().decode(torch.zeros(0, 4), torch.zeros(0, 6)).shape == (0, 5)
