"""Rotated NMS: dbf_ext against its peers on the same boxes.

Groups ``<device>-<layout>-<N>`` hold, for one box set at IoU threshold 0.1:
* ``dbf_ext``: :func:`dbf_ext.ops.nms_rotated`;
* ``torchvision_axis_aligned``: ``torchvision.ops.nms`` on the theta = 0 variant (axis-aligned
  boxes with the same centres and sizes), the reference point for a much simpler IoU;
* ``torch_greedy_dense``: a plain greedy loop over our dense IoU matrix (N <= 5000);
* ``mmcv``: ``mmcv.ops.nms_rotated`` when mmcv with compiled ops is installed.

Layouts: ``scattered`` (DOTA-like boxes uniform over a 1024 x 1024 tile) and ``clustered``
(N / 50 objects x 50 jittered candidates, the raw output of a detector).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from dbf_ext.ops import box_iou_rotated, nms_rotated
from dbf_ext.ops._reference import nms_rotated_reference
from dbf_ext.testing import clustered_rotated_boxes, random_rotated_boxes

THRESHOLD = 0.1
CPU_SIZES = (1000, 5000, 20000)
GPU_SIZES = (1000, 5000, 20000, 100000)
DENSE_MAX = 5000
IMPLEMENTATIONS = ("dbf_ext", "torchvision_axis_aligned", "torch_greedy_dense", "mmcv")

_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [("cpu", n) for n in CPU_SIZES] + [
    pytest.param("cuda", n, marks=_gpu) for n in GPU_SIZES
]


def box_set(layout: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    if layout == "scattered":
        boxes = random_rotated_boxes(n, generator=g)
    else:
        boxes = clustered_rotated_boxes(n // 50, 50, generator=g)
    return boxes, torch.rand(n, generator=g)


def axis_aligned(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) of the boxes with theta set to 0."""
    centre, size = boxes[:, :2], boxes[:, 2:4]
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def implementation(name: str, boxes: torch.Tensor, scores: torch.Tensor):
    if name == "dbf_ext":
        return lambda: nms_rotated(boxes, scores, THRESHOLD)
    if name == "torchvision_axis_aligned":
        xyxy = axis_aligned(boxes)
        return lambda: torchvision.ops.nms(xyxy, scores, THRESHOLD)
    if name == "torch_greedy_dense":
        if boxes.shape[0] > DENSE_MAX:
            pytest.skip(f"dense O(N^2) peer only up to N = {DENSE_MAX}")
        return lambda: nms_rotated_reference(boxes, scores, THRESHOLD,
                                             pairwise_iou=box_iou_rotated)
    try:
        import mmcv.ops
    except ImportError as err:
        pytest.skip(f"mmcv ops are not installed: {err}")
    return lambda: mmcv.ops.nms_rotated(boxes, scores, THRESHOLD, clockwise=True)


def synchronized(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("layout", ["scattered", "clustered"])
@pytest.mark.parametrize("device,n", CASES)
def test_nms_rotated(benchmark, device, n, layout, name):
    boxes, scores = box_set(layout, n)
    boxes, scores = boxes.to(device), scores.to(device)
    run = implementation(name, boxes, scores)
    if device == "cuda":
        benchmark.extra_info["device"] = "cuda"
        run = synchronized(run)
    benchmark.group = f"{device}-{layout}-{n}"
    benchmark.extra_info.update(n=n, layout=layout, threshold=THRESHOLD)
    result = benchmark(run)
    keep = result[1] if name == "mmcv" else result
    benchmark.extra_info["kept"] = int(keep.shape[0])
