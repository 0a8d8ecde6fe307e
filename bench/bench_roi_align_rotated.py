"""Rotated RoI Align: dbf_ext against its peers on the same maps and RoIs.

The setting of Oriented R-CNN's RoI head on one 1024 x 1024 image: 512 rotated RoIs (DOTA-like
proposals, centres over the image, sides 16-320 px, any angle), 256 channels, 7 x 7 bins,
sampling_ratio 2, aligned, clockwise (mmrotate's ``RoIAlignRotated`` config), float32.

Layouts:
* ``multiscale``: FPN maps at strides 4, 8, 16, 32 (256^2 to 32^2); each RoI pooled from the
  level mmdetection's rule picks (:class:`dbf_ext.ops.MultiScaleRoIAlignRotated`; the peers
  are given the same levels);
* ``single_level``: every RoI from the stride-4 map.

Passes: ``forward``, and ``forward_backward`` (the gradient w.r.t. the maps of a fixed
upstream gradient).

Implementations:
* ``dbf_ext``: :func:`dbf_ext.ops.roi_align_rotated` / ``MultiScaleRoIAlignRotated``;
* ``dbf_ext_deterministic`` (CUDA, forward_backward only): the same under
  ``torch.use_deterministic_algorithms(True)``, whose backward kernel adds in a fixed order
  instead of with atomics (on the CPU the backward pass is always deterministic);
* ``torch_reference``: the plain torch version (explicit sample points + bilinear gathers,
  autograd for the backward pass), ``dbf_ext.ops._reference.roi_align_rotated_reference``;
* ``torchvision_axis_aligned``: ``torchvision.ops.roi_align`` on the RoIs with theta set to 0
  (same sample count), the reference point of torch's own axis-aligned kernel;
* ``mmcv``: ``mmcv.ops.roi_align_rotated`` when mmcv with compiled ops is installed.

Run: ``python -m pytest bench/bench_roi_align_rotated.py --benchmark-only``.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict

import pytest
import torch
import torchvision

from dbf_ext.ops import MultiScaleRoIAlignRotated, roi_align_rotated
from dbf_ext.ops._reference import roi_align_rotated_reference
from dbf_ext.testing import random_rotated_boxes

IMAGE = 1024
CHANNELS = 256
NUM_ROIS = 512
OUTPUT_SIZE = 7
SAMPLING_RATIO = 2
STRIDES = (4, 8, 16, 32)
NAMES = [f"p{i + 2}" for i in range(len(STRIDES))]
IMPLEMENTATIONS = ("dbf_ext", "dbf_ext_deterministic", "torch_reference", "torchvision_axis_aligned",
                   "mmcv")

_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=_gpu)]


@functools.cache
def inputs(device: str) -> tuple[OrderedDict, torch.Tensor, torch.Tensor]:
    """(maps by name, (K, 6) RoIs, (K, 256, 7, 7) upstream gradient), fixed seeds."""
    g = torch.Generator().manual_seed(2024)
    maps = OrderedDict(
        (name, torch.randn(1, CHANNELS, IMAGE // s, IMAGE // s, generator=g).to(device))
        for name, s in zip(NAMES, STRIDES)
    )
    boxes = random_rotated_boxes(NUM_ROIS, tile=IMAGE, min_side=16.0, max_side=320.0, generator=g)
    rois = torch.cat([torch.zeros(NUM_ROIS, 1), boxes], dim=1).to(device)
    grad = torch.randn(NUM_ROIS, CHANNELS, OUTPUT_SIZE, OUTPUT_SIZE, generator=g).to(device)
    return maps, rois, grad


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def axis_aligned(rois: torch.Tensor) -> torch.Tensor:
    """torchvision's (K, 5) = (batch index, x1, y1, x2, y2) for the RoIs with theta set to 0."""
    centre, half = rois[:, 1:3], rois[:, 3:5] / 2
    return torch.cat([rois[:, :1], centre - half, centre + half], dim=1)


def single_level_pool(name: str):
    """pool(features (1, C, H, W), rois (K, 6), spatial_scale) -> (K, C, 7, 7)."""
    if name.startswith("dbf_ext"):
        return lambda f, r, s: roi_align_rotated(f, r, OUTPUT_SIZE, s, SAMPLING_RATIO)
    if name == "torch_reference":
        return lambda f, r, s: roi_align_rotated_reference(f, r, OUTPUT_SIZE, s, SAMPLING_RATIO)
    if name == "torchvision_axis_aligned":
        return lambda f, r, s: torchvision.ops.roi_align(f, axis_aligned(r), OUTPUT_SIZE, s,
                                                         SAMPLING_RATIO, aligned=True)
    try:
        from mmcv.ops import roi_align_rotated as mmcv_roi_align_rotated
    except ImportError as err:
        pytest.skip(f"mmcv ops are not installed: {err}")
    return lambda f, r, s: mmcv_roi_align_rotated(f, r, OUTPUT_SIZE, s, SAMPLING_RATIO,
                                                  aligned=True, clockwise=True)


def pooler(name: str, layout: str, rois: torch.Tensor):
    """features -> (K, C, 7, 7) pooled by implementation ``name`` in ``layout``."""
    if layout == "single_level":
        pool = single_level_pool(name)
        return lambda maps: pool(maps[NAMES[0]], rois, 1.0 / STRIDES[0])
    if name.startswith("dbf_ext"):
        module = MultiScaleRoIAlignRotated(NAMES, OUTPUT_SIZE, SAMPLING_RATIO)
        return lambda maps: module(maps, rois, [(IMAGE, IMAGE)])
    # The peers pool each level's RoIs (the levels the module picks) and restore the order.
    pool = single_level_pool(name)
    levels = MultiScaleRoIAlignRotated(NAMES, OUTPUT_SIZE).map_levels(rois)
    order = torch.argsort(levels, stable=True)
    counts = torch.bincount(levels, minlength=len(NAMES)).tolist()
    per_level = rois[order].split(counts)
    inverse = torch.argsort(order)

    def pool_levels(maps):
        pooled = [pool(maps[n], r, 1.0 / s) for n, r, s in zip(NAMES, per_level, STRIDES)]
        return torch.cat(pooled)[inverse]

    return pool_levels


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("passes", ["forward", "forward_backward"])
@pytest.mark.parametrize("layout", ["multiscale", "single_level"])
@pytest.mark.parametrize("device", DEVICES)
def test_roi_align_rotated(benchmark, device, layout, passes, name):
    if name == "dbf_ext_deterministic" and (device == "cpu" or passes == "forward"):
        pytest.skip("deterministic mode changes only the CUDA backward pass")
    maps, rois, grad = inputs(device)
    pool = pooler(name, layout, rois)
    leaves = OrderedDict((n, m.detach().requires_grad_(passes == "forward_backward"))
                         for n, m in maps.items())

    def run():
        for leaf in leaves.values():
            leaf.grad = None
        with deterministic_algorithms(name == "dbf_ext_deterministic"):
            out = pool(leaves)
            if passes == "forward_backward":
                out.backward(grad)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()  # warm-up, and the check that the peers compute the same thing
    want = pooler("dbf_ext", layout, rois)(maps) if name != "torchvision_axis_aligned" else (
        pooler("dbf_ext", layout, torch.cat([rois[:, :5], torch.zeros_like(rois[:, 5:])], 1))(maps))
    torch.testing.assert_close(out.detach(), want, atol=1e-4, rtol=1e-4)

    benchmark.group = f"{device}-{layout}-{passes}"
    benchmark.extra_info.update(device=device, rois=NUM_ROIS, channels=CHANNELS,
                                threads=torch.get_num_threads())
    slow_peer = not name.startswith("dbf_ext") and device == "cpu"
    benchmark.pedantic(run, rounds=3 if slow_peer else (20 if device == "cuda" else 5),
                       iterations=1)
