"""Property tests of box_iou_rotated (hypothesis): identities that hold for any boxes."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbf_ext.ops import box_iou_rotated

coordinate = st.floats(-500, 500, allow_nan=False)
side = st.floats(0.5, 200, allow_nan=False)
angle = st.floats(-2 * math.pi, 2 * math.pi, allow_nan=False)
box = st.tuples(coordinate, coordinate, side, side, angle)
# Pairs that overlap often: the second box is near the first.
near_pair = st.tuples(box, st.floats(-1, 1), st.floats(-1, 1), side, side, angle).map(
    lambda t: (t[0], (t[0][0] + t[1] * t[0][2], t[0][1] + t[2] * t[0][3], t[3], t[4], t[5]))
)
pairs = st.lists(near_pair, min_size=1, max_size=12)

TOL = 1e-9  # float64 throughout


def as_tensors(pair_list):
    b1 = torch.tensor([p[0] for p in pair_list], dtype=torch.float64)
    b2 = torch.tensor([p[1] for p in pair_list], dtype=torch.float64)
    return b1, b2


def aligned_iou(b1, b2, **kwargs):
    return box_iou_rotated(b1, b2, aligned=True, **kwargs)


@settings(max_examples=150, deadline=None)
@given(pairs)
def test_range_and_symmetry(pair_list):
    b1, b2 = as_tensors(pair_list)
    forward, backward = aligned_iou(b1, b2), aligned_iou(b2, b1)
    assert torch.all((forward >= 0) & (forward <= 1))
    torch.testing.assert_close(forward, backward, atol=TOL, rtol=0)
    iof = aligned_iou(b1, b2, mode="iof")
    assert torch.all((iof >= 0) & (iof <= 1))
    assert torch.all(iof >= forward - TOL)  # the union is at least the area of boxes1


@settings(max_examples=100, deadline=None)
@given(st.lists(box, min_size=1, max_size=12))
def test_self_iou_is_one(box_list):
    boxes = torch.tensor(box_list, dtype=torch.float64)
    torch.testing.assert_close(aligned_iou(boxes, boxes), torch.ones(len(box_list), dtype=torch.float64),
                               atol=1e-12, rtol=0)


@settings(max_examples=100, deadline=None)
@given(pairs, coordinate, coordinate, angle)
def test_invariant_under_common_translation_and_rotation(pair_list, dx, dy, turn):
    b1, b2 = as_tensors(pair_list)
    want = aligned_iou(b1, b2)

    def moved(b):
        c, s = math.cos(turn), math.sin(turn)
        out = b.clone()
        out[:, 0] = c * b[:, 0] - s * b[:, 1] + dx
        out[:, 1] = s * b[:, 0] + c * b[:, 1] + dy
        out[:, 4] = b[:, 4] + turn  # clockwise convention: rotating the plane adds to theta
        return out

    torch.testing.assert_close(aligned_iou(moved(b1), moved(b2)), want, atol=1e-8, rtol=0)


@settings(max_examples=100, deadline=None)
@given(pairs, st.integers(-3, 3))
def test_period_pi_and_width_height_swap(pair_list, turns):
    b1, b2 = as_tensors(pair_list)
    want = aligned_iou(b1, b2)
    rotated = b2.clone()
    rotated[:, 4] += turns * math.pi
    torch.testing.assert_close(aligned_iou(b1, rotated), want, atol=1e-8, rtol=0)
    swapped = b2[:, [0, 1, 3, 2, 4]].clone()
    swapped[:, 4] += math.pi / 2
    torch.testing.assert_close(aligned_iou(b1, swapped), want, atol=1e-8, rtol=0)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_counter_clockwise_is_negated_angle(pair_list):
    b1, b2 = as_tensors(pair_list)
    negated1, negated2 = b1.clone(), b2.clone()
    negated1[:, 4] *= -1
    negated2[:, 4] *= -1
    torch.testing.assert_close(aligned_iou(b1, b2, clockwise=False), aligned_iou(negated1, negated2),
                               atol=0, rtol=0)


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_pairwise_diagonal_equals_aligned(pair_list):
    b1, b2 = as_tensors(pair_list)
    torch.testing.assert_close(torch.diagonal(box_iou_rotated(b1, b2)), aligned_iou(b1, b2), atol=0, rtol=0)
