"""Rotated IoU: dbf_ext vs shapely 2 (STRtree and dense), a vectorised plain torch version and
mmcv (when installed), on DOTA-like boxes (1024 px tile, sides 4-100 px, uniform angles).

Run: ``python -m pytest bench/bench_box_iou_rotated.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dbf_ext.ops import box_iou_rotated
from dbf_ext.ops._reference import box_iou_rotated_reference
from dbf_ext.testing import random_rotated_boxes

shapely = pytest.importorskip("shapely")


def scattered(n: int, seed: int) -> torch.Tensor:
    return random_rotated_boxes(n, generator=torch.Generator().manual_seed(seed))


def all_overlapping(n: int, seed: int) -> torch.Tensor:
    """Centres within 20 px of the tile centre, sides 40-100 px: every pair overlaps."""
    boxes = random_rotated_boxes(n, tile=20.0, min_side=40.0, max_side=100.0,
                                 generator=torch.Generator().manual_seed(seed))
    boxes[:, :2] += 502.0
    return boxes


CPU_CASES = {
    "pairwise 2000x500 scattered": (scattered(2000, 1), scattered(500, 2)),
    "pairwise 500x500 all overlapping": (all_overlapping(500, 3), all_overlapping(500, 4)),
}


def shapely_polygons(boxes: torch.Tensor) -> np.ndarray:
    from dbf_ext.ops._reference import rotated_box_corners

    return shapely.polygons(rotated_box_corners(boxes.double()).numpy())


def shapely_dense(b1: torch.Tensor, b2: torch.Tensor) -> np.ndarray:
    p1, p2 = shapely_polygons(b1), shapely_polygons(b2)
    inter = shapely.area(shapely.intersection(p1[:, None], p2[None, :]))
    union = shapely.area(p1)[:, None] + shapely.area(p2)[None, :] - inter
    return inter / union


def shapely_strtree(b1: torch.Tensor, b2: torch.Tensor) -> np.ndarray:
    p1, p2 = shapely_polygons(b1), shapely_polygons(b2)
    i, j = shapely.STRtree(p2).query(p1, predicate="intersects")
    inter = shapely.area(shapely.intersection(p1[i], p2[j]))
    out = np.zeros((len(p1), len(p2)))
    out[i, j] = inter / (shapely.area(p1[i]) + shapely.area(p2[j]) - inter)
    return out


def mmcv_box_iou_rotated():
    try:
        from mmcv.ops import box_iou_rotated as mmcv_op
    except ImportError:
        pytest.skip("mmcv is not installed")
    return mmcv_op


@pytest.mark.parametrize("case", list(CPU_CASES))
@pytest.mark.parametrize("impl", ["dbf_ext", "torch_reference", "shapely_strtree", "shapely_dense", "mmcv"])
def test_cpu(benchmark, case, impl):
    b1, b2 = CPU_CASES[case]
    benchmark.group = f"cpu {case}"
    benchmark.extra_info.update(device="cpu", threads=torch.get_num_threads())
    want = box_iou_rotated(b1.double(), b2.double()).numpy()
    if impl == "dbf_ext":
        result = benchmark(box_iou_rotated, b1, b2)
    elif impl == "torch_reference":
        result = benchmark.pedantic(box_iou_rotated_reference, (b1, b2), rounds=3, iterations=1)
    elif impl == "shapely_strtree":
        result = benchmark.pedantic(shapely_strtree, (b1, b2), rounds=3, iterations=1)
    elif impl == "shapely_dense":
        result = benchmark.pedantic(shapely_dense, (b1, b2), rounds=3, iterations=1)
    else:
        op = mmcv_box_iou_rotated()
        result = benchmark.pedantic(op, (b1, b2), rounds=3, iterations=1)
    result = result.numpy() if isinstance(result, torch.Tensor) else result
    # Every peer must compute the same thing, or its time means nothing.
    np.testing.assert_allclose(result, want, atol=1e-4)
    benchmark.extra_info["nonzero_pairs"] = int((want > 0).sum())


GPU_CASES = {
    "pairwise 2000x2000 scattered": lambda: (scattered(2000, 5), scattered(2000, 6), False),
    "pairwise 10000x10000 scattered": lambda: (scattered(10000, 7), scattered(10000, 8), False),
    "aligned 1M": lambda: (scattered(1_000_000, 9), scattered(1_000_000, 10), True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("impl", ["dbf_ext", "torch_reference", "mmcv"])
def test_gpu(benchmark, case, impl):
    b1, b2, aligned = (t.cuda() if isinstance(t, torch.Tensor) else t for t in GPU_CASES[case]())
    benchmark.group = f"cuda {case}"
    benchmark.extra_info.update(device="cuda")
    if impl == "dbf_ext":
        fn = lambda: box_iou_rotated(b1, b2, aligned=aligned)  # noqa: E731
    elif impl == "torch_reference":
        if b1.shape[0] * (1 if aligned else b2.shape[0]) > 5e6:
            pytest.skip("the plain torch version needs too much memory at this size")
        fn = lambda: box_iou_rotated_reference(b1, b2, aligned=aligned)  # noqa: E731
    else:
        op = mmcv_box_iou_rotated()
        fn = lambda: op(b1, b2, aligned=aligned)  # noqa: E731

    def synchronized():
        out = fn()
        torch.cuda.synchronize()
        return out

    synchronized()  # warm-up: module load, allocator
    benchmark.pedantic(synchronized, rounds=20, iterations=1)
