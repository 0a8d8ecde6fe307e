"""MaxIoU assignment of a 1024 x 1024 FPN's anchors (261,888: strides 4-64, 3 ratios) against
100 / 500 / 2000 gt boxes per image, batch of 4 images, axis-aligned (hbb) and rotated (obb).

Peers, in the same benchmark group:

* ``dbf_ext``: :func:`dbf_ext.assign.batched_max_iou_assign`, one call for the batch.
* ``dense``: per image, the ``(G, N)`` overlap matrix (torchvision ``box_iou`` for hbb,
  ``dbf_ext.ops.box_iou_rotated`` for obb) and mmdetection's ``assign_wrt_overlaps`` on it
  (``dbf_ext.assign._reference``): what mmdetection / mmrotate do. Skipped where the matrix
  would exceed ~4 GB.
* ``torchvision_matcher`` (hbb): per image, ``box_iou`` + torchvision's ``Matcher`` with low
  quality matches, the assignment of torchvision's RPN (slightly different tie semantics).

Options are mmdetection's RPN assigner (pos 0.7, neg 0.3, min_pos 0.3, low-quality matches).
``extra_info``: ``peak_mib`` = peak memory of one call above what was allocated before it (CPU:
resident set, from Linux's VmHWM; GPU: torch's allocator peak), ``positives`` = positive
anchors over the batch (the same for ``dbf_ext`` and ``dense``, checked).

Run: ``python -m pytest bench/bench_assign.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher

from dbf_ext.assign import batched_max_iou_assign
from dbf_ext.assign._reference import max_iou_assign_reference
from dbf_ext.boxes import hbb2obb, obb2hbb
from dbf_ext.testing import fpn_anchors, peak_resident_mib, random_rotated_boxes

BATCH = 4
GT_COUNTS = (100, 500, 2000)
OPTIONS = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
DENSE_BUDGET_BYTES = 4 << 30
# Bytes per (gt, anchor) pair of a dense peer: the float32 matrix plus its temporaries.
# torchvision's box_iou builds three (G, N, 2) tensors (corners, extents) besides the result.
DENSE_BYTES_PER_PAIR = {"hbb": 4 * 7, "obb": 4 + 2}


def make_batch(box_type: str, num_gts: int, device: str):
    """Anchors (shared by the images) and, per image, DOTA-like gts (sides 4-100 px) with
    labels."""
    anchors = fpn_anchors()
    gts = [random_rotated_boxes(num_gts, generator=torch.Generator().manual_seed(i))
           for i in range(BATCH)]
    if box_type == "hbb":
        gts = [obb2hbb(g) for g in gts]
    else:
        anchors = hbb2obb(anchors)
    labels = [torch.randint(1, 16, (num_gts,), generator=torch.Generator().manual_seed(i))
              for i in range(BATCH)]
    return anchors.to(device), [g.to(device) for g in gts], [label.to(device) for label in labels]


def run_dbf_ext(box_type, anchors, gts, labels):
    return batched_max_iou_assign([anchors] * BATCH, gts, labels, box_type=box_type, **OPTIONS)


def run_dense(box_type, anchors, gts, labels):
    return [max_iou_assign_reference(anchors, g, label, box_type=box_type, **OPTIONS)
            for g, label in zip(gts, labels)]


def run_torchvision_matcher(box_type, anchors, gts, labels):
    matcher = Matcher(OPTIONS["pos_iou_thr"], OPTIONS["neg_iou_thr"],
                      allow_low_quality_matches=True)
    return [matcher(torchvision.ops.box_iou(g, anchors)) for g in gts]


IMPLEMENTATIONS = {
    "dbf_ext": run_dbf_ext,
    "dense": run_dense,
    "torchvision_matcher": run_torchvision_matcher,
}


def peak_mib(fn, device: str):
    """(result, peak MiB above the memory in use before the call)."""
    if device == "cpu":
        return peak_resident_mib(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - before) / 2**20


def positives(results) -> int:
    return sum(int((r.gt_inds > 0).sum()) for r in results)


def bench_case(benchmark, device, box_type, num_gts, impl):
    if impl == "torchvision_matcher" and box_type == "obb":
        pytest.skip("torchvision's Matcher takes axis-aligned IoU only")
    anchors, gts, labels = make_batch(box_type, num_gts, device)
    num_anchors = anchors.shape[0]
    dense_bytes = num_gts * num_anchors * DENSE_BYTES_PER_PAIR[box_type]
    if impl != "dbf_ext" and dense_bytes > DENSE_BUDGET_BYTES:
        pytest.skip("the dense overlap matrix and its temporaries would exceed ~4 GB")
    benchmark.group = f"{device} {box_type} {num_anchors} anchors x {num_gts} gts x {BATCH} images"
    benchmark.extra_info.update(device=device, threads=torch.get_num_threads())

    def call():
        result = IMPLEMENTATIONS[impl](box_type, anchors, gts, labels)
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    result, peak = peak_mib(call, device)  # also the warm-up
    benchmark.extra_info["peak_mib"] = round(peak, 1)
    rounds = 5 if impl == "dbf_ext" or device == "cuda" else 2
    benchmark.pedantic(call, rounds=rounds, iterations=1)
    if impl != "torchvision_matcher":
        benchmark.extra_info["positives"] = positives(result)
    if impl == "dense":  # the kernel must compute the same thing, or its time means nothing
        ours = run_dbf_ext(box_type, anchors, gts, labels)
        for mine, reference in zip(ours, result):
            assert torch.equal(mine.gt_inds, reference.gt_inds)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("num_gts", GT_COUNTS)
@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_cpu(benchmark, box_type, num_gts, impl):
    bench_case(benchmark, "cpu", box_type, num_gts, impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("num_gts", GT_COUNTS)
@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_gpu(benchmark, box_type, num_gts, impl):
    bench_case(benchmark, "cuda", box_type, num_gts, impl)
