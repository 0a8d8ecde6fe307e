"""nms_rotated, batched_nms_rotated and multiclass_nms_rotated against a plain greedy NMS over
float64 IoU from shapely, against torchvision on axis-aligned boxes, and on constructed cases."""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np
import pytest
import torch
import torchvision
from shapely_reference import iou_matrix

from dbf_ext.ops import (
    batched_nms_rotated,
    box_iou_rotated,
    multiclass_nms_rotated,
    nms_rotated,
)
from dbf_ext.ops._reference import nms_rotated_reference
from dbf_ext.testing import clustered_rotated_boxes, random_rotated_boxes

# The module (the package attribute of the same name is the function).
nms_module = importlib.import_module("dbf_ext.ops.nms_rotated")

# How far every IoU of a random set must stay from a threshold for the decision to be beyond
# rounding: float32 kernels on float32 boxes are within 2e-5 of float64 (test_box_iou_rotated).
MARGIN = {torch.float64: 1e-6, torch.float32: 2e-5}
CANDIDATE_THRESHOLDS = np.round(np.linspace(0.0, 0.95, 39), 4)


def greedy_nms(iou, scores, threshold, labels=None) -> list[int]:
    """Textbook greedy NMS over a precomputed (N, N) IoU matrix: the tests' reference."""
    iou = np.asarray(iou, dtype=np.float64)
    scores = [float(s) for s in scores]
    n = len(scores)
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels)
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in sorted(range(n), key=lambda i: (-scores[i], i)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= (iou[i] > threshold) & (labels == labels[i])
    return keep


def clear_thresholds(iou: np.ndarray, margin: float) -> list[float]:
    """Candidate thresholds that no IoU of the set comes within `margin` of."""
    clear = [float(t) for t in CANDIDATE_THRESHOLDS if not np.any(np.abs(iou - t) < margin)]
    assert len(clear) >= 10, "too few thresholds clear of the set's IoUs"
    return clear


@functools.cache
def box_set(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """(boxes, float64 shapely IoU of the boxes as rounded to dtype); computed once per run."""
    g = torch.Generator().manual_seed(2024)
    if name == "scattered":
        boxes = random_rotated_boxes(150, tile=300, generator=g, dtype=dtype)
    elif name == "clustered":
        boxes = clustered_rotated_boxes(8, 15, tile=300, generator=g, dtype=dtype)
    else:  # clusters among scattered boxes, sizes from 2 to 150
        boxes = torch.cat([
            clustered_rotated_boxes(4, 12, tile=250, min_side=20, max_side=150, generator=g),
            random_rotated_boxes(60, tile=250, min_side=2, max_side=40, generator=g),
        ]).to(dtype)
    return boxes, iou_matrix(boxes.double(), boxes.double())


def tensor(values, dtype=torch.float64, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize("name", ["scattered", "clustered", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("tied_scores", [False, True])
def test_matches_greedy_over_shapely_iou(device, name, dtype, with_labels, tied_scores):
    boxes, iou = box_set(name, dtype)
    n = boxes.shape[0]
    g = torch.Generator().manual_seed(n + 7 * with_labels + 13 * tied_scores)
    # Tied scores: 8 levels, so most boxes share their score with others (ties by index).
    scores = (torch.randint(0, 8, (n,), generator=g) / 8.0 if tied_scores
              else torch.rand(n, generator=g))
    labels = torch.randint(0, 3, (n,), generator=g) if with_labels else None
    thresholds = clear_thresholds(iou, MARGIN[dtype])
    for threshold in thresholds:
        keep = nms_rotated(boxes.to(device), scores.to(device), threshold,
                           None if labels is None else labels.to(device))
        assert keep.dtype == torch.int64 and keep.device.type == device
        want = greedy_nms(iou, scores, threshold, labels)
        assert keep.tolist() == want, threshold
    # The sets exercise suppression across the threshold range.
    low, high = (len(greedy_nms(iou, scores, t, labels)) for t in (thresholds[1], thresholds[-1]))
    assert low < high <= n


def test_plain_torch_reference_agrees(generator):
    boxes, iou = box_set("clustered", torch.float64)
    boxes, iou = boxes[:60], iou[:60, :60]  # the plain reference IoU is slow
    scores = torch.rand(boxes.shape[0], generator=generator)
    labels = torch.randint(0, 2, (boxes.shape[0],), generator=generator)
    threshold = clear_thresholds(iou, 1e-6)[8]
    for lab in (None, labels):
        got = nms_rotated_reference(boxes, scores, threshold, lab)
        assert got.tolist() == greedy_nms(iou, scores, threshold, lab)


def test_mixed_dtypes_of_boxes_and_scores():
    boxes, iou = box_set("clustered", torch.float64)
    scores = torch.linspace(1, 0, boxes.shape[0], dtype=torch.float16)
    keep = nms_rotated(boxes, scores, 0.3)
    assert keep.tolist() == greedy_nms(iou, scores.double(), 0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(device, dtype):
    boxes, _ = box_set("clustered", torch.float32)
    boxes = (boxes / 4).to(dtype)  # small coordinates: representable in float16
    scores = torch.rand(boxes.shape[0], generator=torch.Generator().manual_seed(3)).to(dtype)
    for threshold in (0.1, 0.5):
        got = nms_rotated(boxes.to(device), scores.to(device), threshold)
        want = nms_rotated(boxes.float(), scores.float(), threshold)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("with_labels", [False, True])
def test_axis_aligned_boxes_match_torchvision(device, with_labels):
    # Integer corners: the axis-aligned boxes are exact in float32 for both libraries.
    g = torch.Generator().manual_seed(11)
    n = 300
    corners = torch.randint(0, 200, (n, 2), generator=g).double()
    sides = torch.randint(2, 60, (n, 2), generator=g).double()
    xyxy = torch.cat([corners, corners + sides], dim=1)
    rotated = torch.cat([corners + sides / 2, sides, torch.zeros(n, 1, dtype=torch.float64)], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    iou = torchvision.ops.box_iou(xyxy, xyxy).numpy()
    for threshold in clear_thresholds(iou, 1e-5):
        if with_labels:
            want = torchvision.ops.batched_nms(xyxy.float(), scores, labels, threshold)
            got = batched_nms_rotated(rotated.float().to(device), scores.to(device),
                                      labels.to(device), threshold)
        else:
            want = torchvision.ops.nms(xyxy.float(), scores, threshold)
            got = nms_rotated(rotated.float().to(device), scores.to(device), threshold)
        assert got.tolist() == want.tolist(), threshold


class TestConstructedCases:
    def test_score_ties_are_broken_by_lower_index(self, device):
        box = [50.0, 50.0, 20.0, 10.0, 0.3]
        far = [[x, 200.0, 10.0, 10.0, 0.0] for x in (0.0, 30.0, 60.0, 90.0)]
        # Identical boxes, equal scores: the lowest index is kept.
        assert nms_rotated(tensor([box] * 4, device=device),
                           tensor([0.5] * 4, device=device), 0.5).tolist() == [0]
        assert nms_rotated(tensor([box] * 3, device=device),
                           tensor([0.5, 0.9, 0.9], device=device), 0.5).tolist() == [1]
        # Disjoint boxes: ties ordered by index in the output.
        keep = nms_rotated(tensor(far, device=device),
                           tensor([0.3, 0.7, 0.7, 0.3], device=device), 0.5)
        assert keep.tolist() == [1, 2, 0, 3]

    def test_iou_equal_to_threshold_is_not_suppressed(self, device):
        # The second box is the left half of the first: IoU exactly 0.5 (exact in floating
        # point for both libraries).
        boxes = tensor([[1.0, 1.0, 2.0, 2.0, 0.0], [0.5, 1.0, 1.0, 2.0, 0.0]], device=device)
        xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 2.0]])
        scores = tensor([0.9, 0.8], device=device)
        assert box_iou_rotated(boxes, boxes)[0, 1].item() == 0.5
        for dtype in (torch.float32, torch.float64):
            for threshold, want in ((0.5, [0, 1]), (0.4999, [0])):
                got = nms_rotated(boxes.to(dtype), scores.to(dtype), threshold).tolist()
                assert got == want
                assert torchvision.ops.nms(xyxy, scores.cpu().float(), threshold).tolist() == want

    def test_single_box_and_empty_input(self, device):
        one = nms_rotated(tensor([[1.0, 2.0, 3.0, 4.0, 0.5]], device=device),
                          tensor([0.1], device=device), 0.5)
        assert one.tolist() == [0]
        empty = nms_rotated(torch.zeros(0, 5, device=device), torch.zeros(0, device=device), 0.5)
        assert empty.shape == (0,) and empty.dtype == torch.int64 and empty.device.type == device
        labelled = batched_nms_rotated(torch.zeros(0, 5, device=device),
                                       torch.zeros(0, device=device),
                                       torch.zeros(0, dtype=torch.int64, device=device), 0.5)
        assert labelled.shape == (0,)

    def test_all_suppressed_by_the_best(self, device):
        g = torch.Generator().manual_seed(5)
        base = torch.tensor([300.0, 200.0, 80.0, 40.0, 0.7])
        boxes = base + torch.randn(50, 5, generator=g) * torch.tensor([0.5, 0.5, 0.5, 0.5, 0.01])
        scores = torch.rand(50, generator=g)
        keep = nms_rotated(boxes.to(device), scores.to(device), 0.5)
        assert keep.tolist() == [int(scores.argmax())]

    def test_threshold_zero_and_one(self, device):
        boxes = tensor([
            [10.0, 10.0, 4.0, 2.0, 0.0],
            [14.0, 10.0, 4.0, 2.0, 0.0],   # shares an edge with box 0: IoU exactly 0
            [10.0, 10.0, 4.0, 2.0, 0.0],   # identical to box 0: IoU 1
            [11.0, 11.9, 4.0, 2.0, 0.4],   # a sliver of overlap with box 0
        ], device=device)
        scores = tensor([0.9, 0.8, 0.7, 0.6], device=device)
        assert nms_rotated(boxes, scores, 0.0).tolist() == [0, 1]
        # An IoU never exceeds 1, so threshold 1 suppresses nothing, not even duplicates.
        assert nms_rotated(boxes, scores, 1.0).tolist() == [0, 1, 2, 3]
        assert nms_rotated(boxes, scores, 7.5).tolist() == [0, 1, 2, 3]

    @pytest.mark.parametrize("threshold", [1.0, 1.5, 1e30])
    def test_threshold_of_one_or_more_keeps_every_box_without_the_kernel(
            self, device, threshold, monkeypatch):
        # Suppression needs IoU > threshold and an IoU is at most 1: every box is kept, by
        # decreasing score (ties by index), and the kernel is never started.
        g = torch.Generator().manual_seed(11)
        boxes = clustered_rotated_boxes(4, 10, tile=100, generator=g).to(device)
        boxes[3] = boxes[0]  # exact duplicates, too
        scores = (torch.randint(0, 6, (40,), generator=g) / 6.0).to(device)  # many ties
        labels = torch.randint(0, 3, (40,), generator=g).to(device)

        def no_kernel(*args):
            raise AssertionError("the NMS kernel was started")

        monkeypatch.setattr(nms_module, "_nms_rotated_op", no_kernel)
        want = sorted(range(40), key=lambda i: (-float(scores[i]), i))
        for keep in (nms_rotated(boxes, scores, threshold),
                     nms_rotated(boxes.double(), scores.half(), threshold, labels),
                     batched_nms_rotated(boxes, scores, labels, threshold)):
            assert keep.tolist() == want
            assert keep.dtype == torch.int64 and keep.device == boxes.device
        dets, cls = multiclass_nms_rotated(boxes, torch.stack([scores, 1 - scores], 1), -1.0,
                                           threshold)
        assert len(dets) == 80 and sorted(cls.tolist()) == [0] * 40 + [1] * 40
        empty = nms_rotated(boxes[:0], scores[:0], threshold)
        assert empty.shape == (0,) and empty.dtype == torch.int64
        with pytest.raises(ValueError, match="NaN"):  # checks still apply
            nms_rotated(boxes, torch.where(scores > 0.5, float("nan"), scores), threshold)
        with pytest.raises(ValueError, match="NaN"):
            nms_rotated(torch.where(boxes > 50, float("nan"), boxes), scores, threshold)

    def test_labels(self, device):
        boxes, _ = box_set("clustered", torch.float32)
        boxes = boxes.to(device)
        scores = torch.rand(boxes.shape[0], generator=torch.Generator().manual_seed(9)).to(device)
        plain = nms_rotated(boxes, scores, 0.3)
        one_class = torch.full((boxes.shape[0],), 7, device=device)
        assert nms_rotated(boxes, scores, 0.3, one_class).tolist() == plain.tolist()
        # Each box its own class: nothing is suppressed.
        own = torch.arange(boxes.shape[0], device=device)
        assert nms_rotated(boxes, scores, 0.3, own).tolist() == torch.sort(
            scores, descending=True, stable=True).indices.tolist()
        labels = torch.randint(0, 3, (boxes.shape[0],), generator=torch.Generator().manual_seed(1))
        want = nms_rotated(boxes, scores, 0.3, labels.to(device)).tolist()
        for dtype in (torch.int32, torch.int16, torch.uint8):
            keep = batched_nms_rotated(boxes, scores, labels.to(dtype).to(device), 0.3)
            assert keep.tolist() == want
        # Different classes never suppress each other, even when identical.
        dup = torch.cat([boxes[:1], boxes[:1]])
        keep = batched_nms_rotated(dup, scores[:2], torch.tensor([0, 1], device=device), 0.1)
        assert keep.tolist() == torch.sort(scores[:2], descending=True).indices.tolist()

    def test_invalid_boxes_are_kept_and_suppress_nothing(self, device):
        inf = float("inf")
        boxes = tensor([
            [10.0, 10.0, 5.0, 5.0, 0.1],
            [10.0, 10.0, 0.0, 5.0, 0.1],    # zero width
            [10.0, 10.0, 5.0, -5.0, 0.1],   # negative height
            [inf, 10.0, 5.0, 5.0, 0.1],     # infinite centre
            [10.0, 10.0, inf, 5.0, 0.1],    # infinite width
            [10.0, 10.0, 5.0, 5.0, 0.1],    # duplicate of box 0: suppressed by it
        ], device=device)
        scores = tensor([0.5, 0.9, 0.8, 0.7, 0.6, 0.4], device=device)
        assert nms_rotated(boxes, scores, 0.0).tolist() == [1, 2, 3, 4, 0]


@functools.cache
def detector_output(class_specific: bool):
    """Scores (N, C) and boxes of a small 3-class detector output, with shapely IoUs at hand."""
    g = torch.Generator().manual_seed(21)
    n, classes = 60, 3
    base = clustered_rotated_boxes(6, 10, tile=200, generator=g, dtype=torch.float64)
    if class_specific:
        jitter = torch.randn(n, classes, 5, generator=g, dtype=torch.float64) * 0.5
        jitter[..., 4] *= 0.01
        boxes = base[:, None] + jitter
    else:
        boxes = base
    scores = (torch.randint(0, 40, (n, classes), generator=g) / 40.0).double()  # many ties
    return boxes, scores


def multiclass_reference(boxes, scores, score_thr, iou_thr, max_num, nms_pre):
    """Per class: threshold, top nms_pre, greedy NMS over shapely IoU; then a stable sort."""
    n, classes = scores.shape
    dets = []
    for c in range(classes):
        cand = [i for i in range(n) if scores[i, c] > score_thr]
        cand.sort(key=lambda i: (-float(scores[i, c]), i))
        if nms_pre >= 0:
            cand = cand[:nms_pre]
        class_boxes = boxes[cand] if boxes.dim() == 2 else boxes[cand, c]
        iou = iou_matrix(class_boxes, class_boxes)
        for k in greedy_nms(iou, scores[cand, c], iou_thr):
            dets.append((float(scores[cand[k], c]), cand[k], c, class_boxes[k]))
    dets.sort(key=lambda d: (-d[0], d[1], d[2]))
    if max_num >= 0:
        dets = dets[:max_num]
    rows = [torch.cat([d[3], torch.tensor([d[0]], dtype=torch.float64)]) for d in dets]
    return (torch.stack(rows) if rows else torch.zeros(0, 6, dtype=torch.float64),
            torch.tensor([d[2] for d in dets], dtype=torch.int64))


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("score_thr,iou_thr,max_num,nms_pre", [
    (0.3, 0.35, -1, -1), (0.05, 0.2, 25, -1), (0.3, 0.45, -1, 4), (0.0, 0.15, 10, 6),
    (0.99, 0.5, -1, -1),  # no candidate
])
def test_multiclass_matches_reference(device, class_specific, score_thr, iou_thr, max_num,
                                      nms_pre):
    boxes, scores = detector_output(class_specific)
    dets, labels = multiclass_nms_rotated(boxes.to(device), scores.to(device), score_thr,
                                          iou_thr, max_num=max_num, nms_pre=nms_pre)
    want_dets, want_labels = multiclass_reference(boxes, scores, score_thr, iou_thr, max_num,
                                                  nms_pre)
    assert dets.shape == (want_dets.shape[0], 6) and dets.dtype == torch.float64
    assert labels.dtype == torch.int64
    assert labels.tolist() == want_labels.tolist()
    torch.testing.assert_close(dets.cpu(), want_dets, rtol=0, atol=0)


def test_multiclass_dtypes_and_limits():
    boxes, scores = detector_output(False)
    dets, labels = multiclass_nms_rotated(boxes.float(), scores.half(), 0.3, 0.35, max_num=0)
    assert dets.shape == (0, 6) and dets.dtype == torch.float32 and labels.shape == (0,)
    dets, _ = multiclass_nms_rotated(boxes.float(), scores.float(), 0.3, 0.35, nms_pre=0)
    assert dets.shape == (0, 6)
    none = multiclass_nms_rotated(torch.zeros(0, 5), torch.zeros(0, 4), 0.1, 0.5)
    assert none[0].shape == (0, 6) and none[1].shape == (0,)


class TestAgainstDenseIou:
    """The spatial index of the CPU sweep must never miss a neighbour: the result equals a
    greedy NMS over our own dense IoU matrix (same arithmetic, float64) on adversarial sets."""

    @staticmethod
    def check(boxes, scores, thresholds, labels=None):
        iou = box_iou_rotated(boxes, boxes).numpy()
        for threshold in thresholds:
            got = nms_rotated(boxes, scores, threshold, labels).tolist()
            assert got == greedy_nms(iou, scores, threshold, labels), threshold

    def test_sizes_over_four_orders_of_magnitude(self):
        g = torch.Generator().manual_seed(31)
        n = 1500
        boxes = random_rotated_boxes(n, tile=3000, generator=g, dtype=torch.float64)
        boxes[:, 2:4] = torch.exp(torch.rand(n, 2, generator=g, dtype=torch.float64) * 9)
        boxes[:5, 2] = 5000.0  # a few boxes larger than the whole scene
        boxes[5:10, 3] = 0.01  # very thin boxes
        scores = torch.rand(n, generator=g)
        labels = torch.randint(0, 2, (n,), generator=g)
        self.check(boxes, scores, (0.0, 0.05, 0.3, 0.7))
        self.check(boxes, scores, (0.0, 0.3), labels)

    def test_far_from_origin_and_degenerate_layouts(self):
        g = torch.Generator().manual_seed(32)
        cluster = clustered_rotated_boxes(20, 20, tile=500, generator=g, dtype=torch.float64)
        scores = torch.rand(cluster.shape[0], generator=g)
        far = cluster.clone()
        far[:, :2] += 1e9
        self.check(far, scores, (0.0, 0.1, 0.5))
        line = cluster.clone()
        line[:, 1] = 7.0  # all centres on one horizontal line
        self.check(line, scores, (0.0, 0.1, 0.5))
        same_centre = cluster.clone()
        same_centre[:, :2] = 3.0
        self.check(same_centre, scores, (0.2, 0.6))
        spread = cluster.clone()
        spread[::7, :2] *= 1e12  # a few boxes very far away from the rest
        self.check(spread, scores, (0.0, 0.1))


class TestBadInput:
    def test_nan(self):
        boxes, scores = torch.rand(4, 5) + 1, torch.rand(4)
        with pytest.raises(ValueError, match="NaN"):
            nms_rotated(boxes, torch.tensor([0.1, float("nan"), 0.3, 0.2]), 0.5)
        bad_boxes = boxes.clone()
        bad_boxes[2, 4] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            nms_rotated(bad_boxes, scores, 0.5)
        with pytest.raises(ValueError, match="NaN"):
            multiclass_nms_rotated(boxes, torch.full((4, 2), float("nan")), 0.5, 0.5)

    @pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.1])
    def test_bad_threshold_values(self, threshold):
        with pytest.raises(ValueError, match="iou_threshold"):
            nms_rotated(torch.rand(3, 5), torch.rand(3), threshold)

    def test_bad_types(self):
        boxes, scores = torch.rand(3, 5), torch.rand(3)
        with pytest.raises(TypeError, match="iou_threshold"):
            nms_rotated(boxes, scores, "0.5")
        with pytest.raises(TypeError, match="torch.Tensor"):
            nms_rotated(boxes.tolist(), scores, 0.5)
        with pytest.raises(TypeError, match="scores"):
            nms_rotated(boxes, torch.ones(3, dtype=torch.int64), 0.5)
        with pytest.raises(TypeError, match="labels"):
            nms_rotated(boxes, scores, 0.5, torch.zeros(3))
        with pytest.raises(TypeError, match="labels"):
            batched_nms_rotated(boxes, scores, None, 0.5)
        with pytest.raises(TypeError, match="max_num"):
            multiclass_nms_rotated(boxes, torch.rand(3, 2), 0.1, 0.5, max_num=2.5)

    def test_bad_shapes_and_devices(self):
        boxes, scores = torch.rand(3, 5), torch.rand(3)
        with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
            nms_rotated(torch.rand(3, 6), scores, 0.5)
        with pytest.raises(ValueError, match="scores"):
            nms_rotated(boxes, torch.rand(4), 0.5)
        with pytest.raises(ValueError, match="labels"):
            nms_rotated(boxes, scores, 0.5, torch.zeros(2, dtype=torch.int64))
        with pytest.raises(ValueError, match="same device"):
            nms_rotated(boxes, scores.to("meta"), 0.5)
        with pytest.raises(ValueError, match=r"\(N, C\)"):
            multiclass_nms_rotated(boxes, scores, 0.1, 0.5)
        with pytest.raises(ValueError, match=r"\(N, C, 5\)"):
            multiclass_nms_rotated(torch.rand(3, 4, 5), torch.rand(3, 2), 0.1, 0.5)
        with pytest.raises(ValueError, match="same N"):
            multiclass_nms_rotated(torch.rand(4, 5), torch.rand(3, 2), 0.1, 0.5)
        with pytest.raises(ValueError, match="nms_pre"):
            multiclass_nms_rotated(boxes, torch.rand(3, 2), 0.1, 0.5, nms_pre=-2)


def test_opcheck(device):
    g = torch.Generator().manual_seed(41)
    boxes = clustered_rotated_boxes(4, 6, tile=100, generator=g).to(device)
    scores = torch.rand(24, generator=g).to(device)
    labels = torch.randint(0, 2, (24,), generator=g).to(device)
    for args in ((boxes, scores, 0.3, None), (boxes.double(), scores, 0.5, labels)):
        torch.library.opcheck(torch.ops.dbf_ext.nms_rotated.default, args)


def test_torch_compile():
    g = torch.Generator().manual_seed(42)
    boxes = clustered_rotated_boxes(5, 8, tile=150, generator=g)
    scores = torch.rand(40, generator=g)

    @torch.compile(fullgraph=True, backend="eager")
    def best_boxes(b, s):
        return b[nms_rotated(b, s, 0.3)]

    torch.testing.assert_close(best_boxes(boxes, scores), boxes[nms_rotated(boxes, scores, 0.3)])

    @torch.compile(fullgraph=True, backend="eager")
    def every_box(b, s):
        return nms_rotated(b, s, 1.0)

    assert every_box(boxes, scores).tolist() == torch.sort(scores, descending=True, stable=True).indices.tolist()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_cuda_matches_cpu():
    # float64: with this many overlapping pairs, few thresholds are clear of every float32 IoU
    # by float32 rounding (CPU and GPU trigonometry differ in the last bits). float32 on CUDA
    # is compared with shapely in test_matches_greedy_over_shapely_iou.
    g = torch.Generator().manual_seed(51)
    boxes = torch.cat([clustered_rotated_boxes(40, 30, generator=g),
                       random_rotated_boxes(1500, generator=g)]).double()
    scores = torch.rand(boxes.shape[0], generator=g)
    labels = torch.randint(0, 5, (boxes.shape[0],), generator=g)
    iou = box_iou_rotated(boxes, boxes).numpy()
    for threshold in clear_thresholds(iou, 1e-9)[::3]:
        for lab in (None, labels):
            cpu = nms_rotated(boxes, scores, threshold, lab)
            cuda = nms_rotated(boxes.cuda(), scores.cuda(), threshold,
                               None if lab is None else lab.cuda())
            assert cuda.tolist() == cpu.tolist(), threshold


@needs_gpu
def test_cuda_chunked_mask_equals_single_pass(monkeypatch):
    g = torch.Generator().manual_seed(52)
    boxes = torch.cat([clustered_rotated_boxes(60, 40, generator=g),
                       random_rotated_boxes(3000, generator=g)]).cuda()
    scores = torch.rand(boxes.shape[0], generator=g).cuda()
    labels = torch.randint(0, 3, (boxes.shape[0],), generator=g).cuda()
    single = [nms_rotated(boxes, scores, t, labels) for t in (0.1, 0.6)]
    monkeypatch.setattr(nms_module, "_MASK_BUDGET_BYTES", 8 * 64 * 200)  # ~2 row blocks a chunk
    chunked = [nms_rotated(boxes, scores, t, labels) for t in (0.1, 0.6)]
    for a, b in zip(single, chunked):
        assert a.tolist() == b.tolist()


@pytest.mark.large
@needs_gpu
def test_cuda_100k_boxes_match_cpu():
    # float64, so that CPU and GPU trigonometry cannot disagree on a decision.
    g = torch.Generator().manual_seed(53)
    boxes = torch.cat([clustered_rotated_boxes(1000, 50, tile=8192, generator=g),
                       random_rotated_boxes(50_000, tile=8192, generator=g)]).double()
    scores = torch.rand(boxes.shape[0], generator=g)
    labels = torch.randint(0, 15, (boxes.shape[0],), generator=g)
    for lab in (None, labels):
        cpu = nms_rotated(boxes, scores, 0.1, lab)
        cuda = nms_rotated(boxes.cuda(), scores.cuda(), 0.1, None if lab is None else lab.cuda())
        assert cuda.tolist() == cpu.tolist()
    with pytest.raises(ValueError, match="NaN"):
        nms_rotated(boxes.cuda(), torch.full_like(scores, math.nan).cuda(), 0.1)
