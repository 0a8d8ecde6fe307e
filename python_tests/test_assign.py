"""Fused MaxIoU assignment against mmdetection's semantics on the dense overlap matrix
(dbf_ext.assign._reference: plain torch, IoU from torchvision's box_iou or box_iou_rotated)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import zlib

import numpy as np
import pytest
import torch

from dbf_ext import _ext
from dbf_ext.assign import AssignResult, MaxIoUAssignOptions, batched_max_iou_assign, max_iou_assign
from dbf_ext.assign._reference import max_iou_assign_reference
from dbf_ext.boxes import hbb2obb
from dbf_ext.testing import fpn_anchors, no_host_sync, peak_resident_mib, random_rotated_boxes

# ---------------------------------------------------------------------------------------------
# Cases: boxes crowded around the gts, with deliberate ties
# ---------------------------------------------------------------------------------------------

def make_case(box_type, num_gts, num_boxes, generator, dtype=torch.float32):
    """(boxes, gts, labels, ignore): shifted copies of the gts and scattered boxes, duplicated
    gts and boxes (ties across gts and across boxes), a gt far from every box, a box equal to a
    gt (IoU 1), and two ignore regions."""
    def randint(low, high, shape):
        return torch.randint(low, high, shape, generator=generator).double()

    num_near = num_boxes // 2 if num_gts else 0
    picks = torch.randint(0, max(num_gts, 1), (num_near,), generator=generator)
    if box_type == "hbb":
        corner, size = randint(0, 80, (num_gts, 2)), randint(4, 30, (num_gts, 2))
        gts = torch.cat((corner, corner + size), dim=1)
        # Integer shifts: boxes shifted by +d and -d have equal IoUs, so maxima tie.
        near = gts[picks] + randint(-4, 5, (num_near, 4))
        near[:, 2:] = torch.max(near[:, 2:], near[:, :2] + 1)
        corner = randint(0, 90, (num_boxes - num_near, 2))
        scattered = torch.cat((corner, corner + randint(2, 40, corner.shape)), dim=1)
        far_gt = [[500.0, 500.0, 510.0, 520.0]]
        ignore = [[0.0, 0.0, 30.0, 30.0], [60.0, 50.0, 95.0, 70.0]]
    else:
        gts = random_rotated_boxes(num_gts, tile=120, min_side=8, max_side=40, generator=generator,
                                   dtype=torch.float64)
        shift = torch.rand(num_near, 5, generator=generator, dtype=torch.float64) * 2 - 1
        near = gts[picks] + shift * torch.tensor([3.0, 3.0, 2.0, 2.0, 0.15], dtype=torch.float64)
        scattered = random_rotated_boxes(num_boxes - num_near, tile=130, min_side=4, max_side=50,
                                         generator=generator, dtype=torch.float64)
        far_gt = [[900.0, 900.0, 10.0, 20.0, 0.3]]
        ignore = [[20.0, 20.0, 40.0, 30.0, 0.2], [90.0, 60.0, 50.0, 20.0, -0.7]]
    boxes = torch.cat((near, scattered))
    if num_gts >= 2:  # duplicates later in gt order
        gts = torch.cat((gts, gts[:1], torch.tensor(far_gt, dtype=torch.float64), gts[1:2]))
    if num_boxes >= 4:
        boxes = torch.cat((boxes, boxes[:3]))[torch.randperm(num_boxes + 3, generator=generator)]
        if num_gts:
            boxes[0] = gts[0]
    labels = torch.randint(1, 6, (gts.shape[0],), generator=generator)
    return boxes.to(dtype), gts.to(dtype), labels, torch.tensor(ignore, dtype=dtype)


NEG_OPTIONS = [0.4, (0.1, 0.4), (-1.0, 0.3)]
IGNORE_MODES = ["none", "wrt_candidates", "wrt_ignore"]


def ignore_kwargs(mode, ignore):
    if mode == "none":
        return {}
    return {"ignore_boxes": ignore, "ignore_iof_thr": 0.5,
            "ignore_wrt_candidates": mode == "wrt_candidates"}


def assert_same(result: AssignResult, want: AssignResult, label=""):
    """Bit-identical fields (the reference measures the same overlaps)."""
    assert result.num_gts == want.num_gts, label
    for field in ("gt_inds", "max_overlaps", "labels"):
        got, expected = getattr(result, field), getattr(want, field)
        if expected is None:
            assert got is None, label
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{field}: {label}")


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
@pytest.mark.parametrize("gt_max_assign_all", [True, False])
@pytest.mark.parametrize("match_low_quality", [True, False])
@pytest.mark.parametrize("ignore_mode", IGNORE_MODES)
def test_matches_dense_reference(device, box_type, gt_max_assign_all, match_low_quality,
                                 ignore_mode):
    seed = [box_type, gt_max_assign_all, match_low_quality, IGNORE_MODES.index(ignore_mode)]
    generator = torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))
    sizes = [(12, 120), (25, 60), (1, 30), (3, 200)]
    for (num_gts, num_boxes), dtype in zip(sizes, [torch.float32, torch.float64] * 2):
        boxes, gts, labels, ignore = (t.to(device) for t in
                                      make_case(box_type, num_gts, num_boxes, generator, dtype))
        for neg, min_pos in itertools.product(NEG_OPTIONS, [0.0, 0.3]):
            options = dict(pos_iou_thr=0.5, neg_iou_thr=neg, min_pos_iou=min_pos,
                           gt_max_assign_all=gt_max_assign_all,
                           match_low_quality=match_low_quality, box_type=box_type,
                           **ignore_kwargs(ignore_mode, ignore))
            got = max_iou_assign(boxes, gts, labels, **options)
            assert got.num_gts == gts.shape[0]
            assert got.max_overlaps.dtype == dtype
            assert_same(got, max_iou_assign_reference(boxes, gts, labels, **options),
                        f"{num_gts} gts, {num_boxes} boxes, {dtype}, {options}")


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_ties_between_gts_and_boxes(device, box_type):
    """Exact duplicates: the first gt wins the argmax, the last gt the low-quality match, the
    first box the one-box match."""
    if box_type == "hbb":
        gt = [10.0, 10.0, 30.0, 20.0]
        near = [12.0, 10.0, 32.0, 20.0]
    else:
        gt = [20.0, 15.0, 20.0, 10.0, 0.4]
        near = [22.0, 15.0, 20.0, 10.0, 0.4]
    gts = torch.tensor([gt, gt, gt], device=device)
    boxes = torch.tensor([near, near, near, gt], device=device)
    labels = torch.tensor([1, 2, 3], device=device)
    for all_boxes in (True, False):
        options = dict(pos_iou_thr=0.99, neg_iou_thr=0.1, min_pos_iou=0.1,
                       gt_max_assign_all=all_boxes, box_type=box_type)
        got = max_iou_assign(boxes, gts, labels, **options)
        # box 3 equals the gts (IoU 1): positive for gt 0 by argmax, then every gt's maximum;
        # the last gt (2) overwrites; the near boxes are below pos_iou_thr and no gt's maximum.
        assert got.gt_inds.tolist() == [-1, -1, -1, 3]
        assert_same(got, max_iou_assign_reference(boxes, gts, labels, **options))
    # Without the exact copy the maximum of every gt is reached by the three near boxes.
    for all_boxes, want in ((True, [3, 3, 3]), (False, [3, -1, -1])):
        got = max_iou_assign(boxes[:3], gts, labels, pos_iou_thr=0.99, neg_iou_thr=0.1,
                             min_pos_iou=0.1, gt_max_assign_all=all_boxes, box_type=box_type)
        assert got.gt_inds.tolist() == want


def test_gt_without_any_overlap_and_min_pos_iou_zero(device):
    """A gt overlapping no box has maximum 0: with min_pos_iou = 0 mmdetection hands it every
    box of overlap 0 (gt_max_assign_all) or the first box; ignored boxes (overlap -1) never."""
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]], device=device)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0],
                          [70.0, 70.0, 80.0, 80.0], [0.0, 0.0, 9.0, 10.0]], device=device)
    ignore = torch.tensor([[49.0, 49.0, 61.0, 61.0]], device=device)
    labels = torch.tensor([4, 5], device=device)
    for all_boxes, ign in itertools.product((True, False), (None, ignore)):
        options = dict(pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=0.0,
                       gt_max_assign_all=all_boxes, ignore_boxes=ign, ignore_iof_thr=0.5)
        got = max_iou_assign(boxes, gts, labels, **options)
        assert_same(got, max_iou_assign_reference(boxes, gts, labels, **options))
    got = max_iou_assign(boxes, gts, pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=0.0,
                         ignore_boxes=ignore, ignore_iof_thr=0.5)
    assert got.gt_inds.tolist() == [2, -1, 2, 2] and got.labels is None
    assert got.max_overlaps[1] == -1


@pytest.mark.parametrize("min_pos_iou", [0.0, -1.0])
@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_every_box_ignored(device, box_type, min_pos_iou):
    generator = torch.Generator().manual_seed(3)
    boxes, gts, labels, _ = make_case(box_type, 4, 20, generator)
    cover = [-1e4, -1e4, 1e4, 1e4] if box_type == "hbb" else [0.0, 0.0, 1e5, 1e5, 0.0]
    ignore = torch.tensor([cover])
    for all_boxes, neg in itertools.product((True, False), (0.4, (-1.0, 0.4))):
        options = dict(pos_iou_thr=0.5, neg_iou_thr=neg, min_pos_iou=min_pos_iou,
                       gt_max_assign_all=all_boxes, ignore_boxes=ignore.to(device),
                       ignore_iof_thr=0.5, box_type=box_type)
        args = (boxes.to(device), gts.to(device), labels.to(device))
        got = max_iou_assign(*args, **options)
        assert torch.all(got.max_overlaps == -1)
        assert_same(got, max_iou_assign_reference(*args, **options))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("wrt_candidates", [True, False])
def test_ignore_boxes_without_finite_extent_ignore_nothing(device, bad_value, wrt_candidates):
    """An ignore box with a NaN or infinite coordinate overlaps nothing, on CPU and CUDA alike
    (a NaN dropped by min/max would otherwise lend the box the candidate's own extent)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 30.0], [5.0, 5.0, 9.0, 8.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, ignore_iof_thr=0.5,
                   ignore_wrt_candidates=wrt_candidates)
    plain = max_iou_assign(boxes.to(device), gts.to(device), **options)
    for column in range(4):
        ignore = torch.tensor([[-100.0, -100.0, 100.0, 100.0]])
        ignore[0, column] = bad_value
        result = max_iou_assign(boxes.to(device), gts.to(device), ignore_boxes=ignore.to(device),
                                **options)
        assert torch.equal(result.gt_inds.cpu(), plain.gt_inds.cpu()), column
        assert torch.equal(result.max_overlaps.cpu(), plain.max_overlaps.cpu()), column


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_empty_inputs(device, box_type):
    cols = 4 if box_type == "hbb" else 5
    generator = torch.Generator().manual_seed(5)
    boxes, gts, labels, ignore = (t.to(device) for t in make_case(box_type, 5, 30, generator))
    options = dict(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.5), box_type=box_type,
                   ignore_boxes=ignore, ignore_iof_thr=0.5, return_topk_iou=4)
    no_gts = max_iou_assign(boxes, gts[:0], labels[:0], **options)
    assert no_gts.num_gts == 0 and no_gts.num_boxes == boxes.shape[0]
    assert torch.all(no_gts.gt_inds == 0) and torch.all(no_gts.max_overlaps == 0)
    assert torch.all(no_gts.labels == -1) and no_gts.kth_largest_overlap == 0
    no_boxes = max_iou_assign(boxes[:0], gts, labels, **options)
    assert no_boxes.gt_inds.shape == (0,) and no_boxes.max_overlaps.shape == (0,)
    assert no_boxes.labels.shape == (0,) and math.isnan(no_boxes.kth_largest_overlap)
    empty = torch.zeros(0, cols, device=device)
    nothing = max_iou_assign(empty, empty, pos_iou_thr=0.5, neg_iou_thr=0.5, box_type=box_type)
    assert nothing.num_gts == 0 and nothing.gt_inds.numel() == 0 and nothing.labels is None
    assert batched_max_iou_assign([], [], pos_iou_thr=0.5, neg_iou_thr=0.5) == []


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
@pytest.mark.parametrize("gt_max_assign_all", [True, False])
def test_batched_equals_per_image(device, box_type, gt_max_assign_all):
    generator = torch.Generator().manual_seed(11)
    sizes = [(7, 80), (0, 25), (12, 0), (1, 40), (20, 150), (0, 0)]
    cases = [[t.to(device) for t in make_case(box_type, g, n, generator)] for g, n in sizes]
    boxes, gts, labels, ignore = (list(column) for column in zip(*cases))
    ignore[1] = None
    options = dict(pos_iou_thr=0.55, neg_iou_thr=0.35, min_pos_iou=0.2,
                   gt_max_assign_all=gt_max_assign_all, ignore_iof_thr=0.6, box_type=box_type,
                   return_topk_iou=9, topk_with_gts=True)
    batched = batched_max_iou_assign(boxes, gts, labels, ignore_boxes=ignore, **options)
    assert len(batched) == len(sizes)
    for i, result in enumerate(batched):
        single = max_iou_assign(boxes[i], gts[i], labels[i], ignore_boxes=ignore[i], **options)
        assert result.num_gts == single.num_gts
        for field in ("gt_inds", "max_overlaps", "labels", "kth_largest_overlap"):
            torch.testing.assert_close(getattr(result, field), getattr(single, field), rtol=0,
                                       atol=0, equal_nan=True, msg=f"image {i} {field}")


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_kth_largest_overlap(device, box_type):
    generator = torch.Generator().manual_seed(13)
    sizes = [(6, 50), (3, 2), (0, 10), (4, 0), (40, 300)]
    cases = [[t.to(device) for t in make_case(box_type, g, n, generator)] for g, n in sizes]
    boxes, gts, labels, _ = (list(column) for column in zip(*cases))
    for k, with_gts in itertools.product([1, 5, 75], [False, True]):
        results = batched_max_iou_assign(boxes, gts, labels, pos_iou_thr=0.5, neg_iou_thr=0.4,
                                         box_type=box_type, return_topk_iou=k,
                                         topk_with_gts=with_gts)
        for result, g in zip(results, gts):
            candidates = result.max_overlaps
            if with_gts:  # as mmdetection's sampler: gts first, with max overlap 1
                candidates = torch.cat((candidates.new_ones(g.shape[0]), candidates))
            if candidates.numel() == 0:
                assert math.isnan(result.kth_largest_overlap)
                continue
            want = candidates.topk(min(k, candidates.numel())).values[-1]
            assert result.kth_largest_overlap == want, (k, with_gts)


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_large_case_and_thread_count(box_type):
    """Thousands of boxes (several chunks, many grid cells) against the dense reference, and the
    same bits with one thread as with several."""
    generator = torch.Generator().manual_seed(17)
    boxes, gts, labels, ignore = make_case(box_type, 300, 6000, generator)
    for all_boxes in (True, False):
        options = dict(pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=0.1, box_type=box_type,
                       gt_max_assign_all=all_boxes, ignore_boxes=ignore, ignore_iof_thr=0.7)
        got = max_iou_assign(boxes, gts, labels, **options)
        assert_same(got, max_iou_assign_reference(boxes, gts, labels, **options))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single_thread = max_iou_assign(boxes, gts, labels, **options)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single_thread.gt_inds, got.gt_inds)
        assert torch.equal(single_thread.max_overlaps, got.max_overlaps)


def test_half_precision_inputs_compute_in_float32():
    generator = torch.Generator().manual_seed(19)
    boxes, gts, labels, _ = make_case("obb", 10, 100, generator)
    options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, box_type="obb")
    for dtype in (torch.float16, torch.bfloat16):
        got = max_iou_assign(boxes.to(dtype), gts.to(dtype), labels, **options)
        want = max_iou_assign(boxes.to(dtype).float(), gts.to(dtype).float(), labels, **options)
        assert got.max_overlaps.dtype == torch.float32
        assert torch.equal(got.gt_inds, want.gt_inds)
        assert torch.equal(got.max_overlaps, want.max_overlaps)


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(23)
    boxes, gts, labels, _ = make_case("obb", 8, 60, generator)
    strided = torch.cat((boxes, boxes), dim=1)[:, :5]
    column_major = gts.t().contiguous().t()
    options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, box_type="obb", gt_max_assign_all=False)
    strided_labels = torch.stack((labels, -labels), dim=1)[:, 0]
    got = max_iou_assign(strided, column_major, strided_labels, **options)
    want = max_iou_assign(boxes, gts, labels, **options)
    for field in ("gt_inds", "max_overlaps", "labels"):
        assert torch.equal(getattr(got, field), getattr(want, field))


class TestBadInput:
    def test_shapes_and_types(self):
        boxes, gts = torch.rand(5, 4), torch.rand(3, 4)
        options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4)
        with pytest.raises(ValueError, match=r"boxes_list\[0\] must have shape \(N, 4\)"):
            max_iou_assign(torch.rand(5, 5), gts, **options)
        with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
            max_iou_assign(boxes, gts, box_type="obb", **options)
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            max_iou_assign(boxes.long(), gts, **options)
        with pytest.raises(ValueError, match=r"gt_labels_list\[0\] must have shape \(3,\)"):
            max_iou_assign(boxes, gts, torch.ones(4, dtype=torch.long), **options)
        with pytest.raises(TypeError, match="integer tensor"):
            max_iou_assign(boxes, gts, torch.ones(3), **options)
        with pytest.raises(ValueError, match="box_type"):
            max_iou_assign(boxes, gts, box_type="rbox", **options)
        with pytest.raises(ValueError, match="same device"):
            max_iou_assign(boxes, gts.to("meta"), **options)

    def test_options(self):
        boxes, gts = torch.rand(5, 4), torch.rand(3, 4)
        with pytest.raises(TypeError, match="neg_iou_thr"):
            max_iou_assign(boxes, gts, pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.2, 0.3))
        with pytest.raises(ValueError, match="pos_iou_thr must be finite"):
            max_iou_assign(boxes, gts, pos_iou_thr=math.nan, neg_iou_thr=0.4)
        with pytest.raises(ValueError, match="return_topk_iou must be >= 1"):
            max_iou_assign(boxes, gts, pos_iou_thr=0.5, neg_iou_thr=0.4, return_topk_iou=0)
        with pytest.raises(TypeError):
            max_iou_assign(boxes, gts, 0.5, 0.4)  # thresholds are keyword-only

    def test_batch_lengths(self):
        with pytest.raises(ValueError, match="gt_boxes_list must have one entry per image"):
            batched_max_iou_assign([torch.rand(2, 4)] * 2, [torch.rand(1, 4)], pos_iou_thr=0.5,
                                   neg_iou_thr=0.4)
        with pytest.raises(ValueError, match="ignore_boxes must have one entry per image"):
            batched_max_iou_assign([torch.rand(2, 4)], [torch.rand(1, 4)], pos_iou_thr=0.5,
                                   neg_iou_thr=0.4, ignore_boxes=[None, None], ignore_iof_thr=0.5)


class TestOptions:
    def test_checked_and_normalised_once(self):
        options = MaxIoUAssignOptions(pos_iou_thr=np.float32(0.5), neg_iou_thr=0.4,
                                      gt_max_assign_all=0)
        assert options.neg_iou_thr == (0.0, 0.4) and options.gt_max_assign_all is False
        assert type(options.pos_iou_thr) is float
        assert MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=[0.1, 0.3]).neg_iou_thr == (0.1, 0.3)
        with pytest.raises(ValueError, match="min_pos_iou must be finite"):
            MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=math.inf)
        with pytest.raises(ValueError, match=r"neg_iou_thr\[1\] must be finite"):
            dataclasses.replace(options, neg_iou_thr=(0.0, math.nan))  # replace checks too
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.pos_iou_thr = 0.7

    def test_op_values_round_trip(self):
        options = MaxIoUAssignOptions(pos_iou_thr=0.7, neg_iou_thr=(0.1, 0.3), min_pos_iou=0.2,
                                      gt_max_assign_all=False, match_low_quality=True,
                                      ignore_iof_thr=0.5, ignore_wrt_candidates=False)
        values = options.op_values()
        assert values == [0.7, 0.1, 0.3, 0.2, 0.0, 1.0, 0.5, 0.0]
        assert MaxIoUAssignOptions.from_op_values(values) == options

    def test_kernel_struct_has_the_same_fields(self):
        """The kernels' options are filled by field name: a field missing on either side fails."""
        native = _ext.extension().MaxIouAssignOptions()
        members = {name for name in dir(native) if not name.startswith("_")}
        assert members == {field.name for field in dataclasses.fields(MaxIoUAssignOptions)}

    def test_asdict_passes_the_options(self):
        generator = torch.Generator().manual_seed(3)
        boxes, gts, labels, _ = make_case("hbb", 6, 50, generator)
        options = MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=(0.1, 0.4), min_pos_iou=0.2,
                                      gt_max_assign_all=False)
        got = max_iou_assign(boxes, gts, labels, **dataclasses.asdict(options))
        assert_same(got, max_iou_assign_reference(boxes, gts, labels, **dataclasses.asdict(options)))


def test_opcheck(device):
    generator = torch.Generator().manual_seed(29)
    boxes, gts, labels, ignore = (t.to(device) for t in make_case("obb", 6, 40, generator))
    num_boxes = boxes.shape[0]
    offsets = torch.tensor([0, num_boxes], device=device)
    gt_offsets = torch.tensor([0, gts.shape[0]], device=device)
    ignore_offsets = torch.tensor([0, ignore.shape[0]], device=device)
    topk = torch.tensor([5], device=device)
    for all_boxes in (True, False):
        options = MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.2,
                                      gt_max_assign_all=all_boxes, ignore_iof_thr=0.5)
        args = (boxes, gts, labels, ignore, offsets, gt_offsets, ignore_offsets, topk, "obb",
                options.op_values(), num_boxes, gts.shape[0])
        torch.library.opcheck(torch.ops.dbf_ext.max_iou_assign.default, args)


@pytest.mark.large
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_cuda_large_batch_matches_reference(box_type):
    """Several tiles of boxes and of gts per image (more than one shared-memory tile)."""
    generator = torch.Generator().manual_seed(31)
    cases = [make_case(box_type, g, n, generator) for g, n in [(600, 3000), (5, 700), (300, 1)]]
    boxes, gts, labels, ignore = ([t.cuda() for t in column] for column in zip(*cases))
    for all_boxes, min_pos in itertools.product((True, False), (0.0, 0.3)):
        options = dict(pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=min_pos, box_type=box_type,
                       gt_max_assign_all=all_boxes, ignore_iof_thr=0.7)
        results = batched_max_iou_assign(boxes, gts, labels, ignore_boxes=ignore, **options)
        for i, result in enumerate(results):
            assert_same(result, max_iou_assign_reference(boxes[i], gts[i], labels[i],
                                                 ignore_boxes=ignore[i], **options), f"image {i}")


# ---------------------------------------------------------------------------------------------
# Memory: 200k anchors x 2000 rotated gts without the 2 GB overlap matrix
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's resettable peak resident memory")
def test_200k_anchors_by_2000_rotated_gts_under_100_mb():
    anchors = hbb2obb(fpn_anchors())
    gts = random_rotated_boxes(2000, generator=torch.Generator().manual_seed(0))
    options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3, box_type="obb")
    max_iou_assign(anchors[:1000], gts, **options)  # warm-up
    result, extra_mib = peak_resident_mib(lambda: max_iou_assign(anchors, gts, **options))
    assert anchors.shape[0] > 200_000
    assert extra_mib < 100  # the overlap matrix alone would take 2 GB
    assert int((result.gt_inds > 0).sum()) > 2000  # the case really assigns
    print(f"extra resident memory: {extra_mib:.1f} MiB")


def test_torch_compile_matches_eager():
    generator = torch.Generator().manual_seed(11)
    anchors = torch.rand(300, 2, generator=generator) * 200
    anchors = torch.cat([anchors, anchors + 8 + torch.rand(300, 2, generator=generator) * 40], 1)
    gts = torch.rand(12, 2, generator=generator) * 200
    gts = torch.cat([gts, gts + 10 + torch.rand(12, 2, generator=generator) * 40], 1)
    labels = torch.randint(0, 5, (12,), generator=generator)

    def positives(boxes, gt_boxes, gt_labels):
        result = max_iou_assign(boxes, gt_boxes, gt_labels, pos_iou_thr=0.5, neg_iou_thr=0.4)
        return result.gt_inds, result.max_overlaps, result.labels

    compiled = torch.compile(positives, backend="eager")
    for got, want in zip(compiled(anchors, gts, labels), positives(anchors, gts, labels)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_cuda_assign_never_waits_for_the_gpu(box_type):
    """No host synchronisation (pageable copies, .item(), .tolist()) anywhere in a batched
    assignment with every option that adds inputs: torch raises on any in this mode."""
    generator = torch.Generator().manual_seed(11)
    cases = [make_case(box_type, 8, 120, generator) for _ in range(3)]
    boxes, gts, labels, ignore = ([t.cuda() for t in column] for column in zip(*cases))
    options = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, ignore_iof_thr=0.5, box_type=box_type,
                   return_topk_iou=20, topk_with_gts=True)
    expected = batched_max_iou_assign(boxes, gts, labels, ignore_boxes=ignore, **options)
    with no_host_sync():
        results = batched_max_iou_assign(boxes, gts, labels, ignore_boxes=ignore, **options)
    for got, want in zip(results, expected):
        assert torch.equal(got.gt_inds, want.gt_inds)
        assert torch.equal(got.kth_largest_overlap, want.kth_largest_overlap)
