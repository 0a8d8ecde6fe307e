"""Masks to rotated boxes: dbf_ext's kernel vs a per-mask shapely loop (pixel-corner convex hull,
then ``minimum_rotated_rectangle``), on rasterised ellipses and rectangles
(``dbf_ext.testing.random_masks``).

Run: ``python -m pytest bench/bench_mask_to_obb.py --benchmark-only``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dbf_ext.boxes import mask2obb
from dbf_ext.testing import random_masks

shapely = pytest.importorskip("shapely")


def shapely_areas(masks: torch.Tensor) -> np.ndarray:
    """Minimum rectangle areas, one mask at a time: the corners of each row's end pixels (their
    hull is the pixel squares' hull), shapely's hull and minimum rotated rectangle."""
    areas = np.full(len(masks), np.nan)
    for i, mask in enumerate(masks.numpy()):
        rows = np.flatnonzero(mask.any(axis=1))
        if not len(rows):
            continue
        first = mask[rows].argmax(axis=1)
        last = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
        xs = np.concatenate([first, first, last, last])
        ys = np.concatenate([rows, rows + 1, rows, rows + 1])
        points = shapely.multipoints(np.stack([xs, ys], axis=1).astype(np.float64))
        areas[i] = shapely.minimum_rotated_rectangle(points).area
    return areas


CASES = {
    "256 masks 256x256": (256, 256, 256),
    "32 masks 1024x1024": (32, 1024, 1024),
}


def masks_for(case: str) -> torch.Tensor:
    n, height, width = CASES[case]
    return random_masks(n, height, width, generator=torch.Generator().manual_seed(n))


def box_areas(boxes: torch.Tensor) -> np.ndarray:
    return (boxes[:, 2] * boxes[:, 3]).cpu().numpy()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["dbf_ext", "shapely_loop"])
def test_cpu(benchmark, case, impl):
    masks = masks_for(case)
    benchmark.group = f"cpu {case}"
    benchmark.extra_info.update(device="cpu", threads=torch.get_num_threads())
    want = box_areas(mask2obb(masks, dtype=torch.float64))
    if impl == "dbf_ext":
        areas = box_areas(benchmark(mask2obb, masks, dtype=torch.float64))
    else:
        areas = benchmark.pedantic(shapely_areas, (masks,), rounds=3, iterations=1)
    # Every peer must compute the same thing, or its time means nothing.
    np.testing.assert_allclose(areas, want, rtol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_gpu(benchmark, case):
    masks = masks_for(case).cuda()
    benchmark.group = f"cuda {case}"
    benchmark.extra_info.update(device="cuda")

    def synchronized():
        out = mask2obb(masks)
        torch.cuda.synchronize()
        return out

    synchronized()  # warm-up: module load, allocator
    benchmark.pedantic(synchronized, rounds=20, iterations=1)
