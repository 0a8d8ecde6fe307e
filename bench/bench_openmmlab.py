"""Benchmark: mmrotate's Oriented R-CNN on the CPU through dbf_ext's mmcv._ext shim.

Model: mmrotate 0.3.4's ``oriented_rcnn_r50_fpn_1x_dota_le90`` config, unchanged except for
random initialisation (no pretrained download); one 1024x1024 image (a DOTA tile, the config's
size) with 12 rotated ground-truth boxes. Steps:

* ``train[unfrozen]``: zero_grad + forward with losses + backward + SGD step (the config's
  optimizer settings: lr 0.005, momentum 0.9, weight decay 1e-4).
* ``train[frozen_backbone]``: the same with the ResNet-50 trunk frozen by DBF
  (:func:`dbf_ext.freeze.apply_dbf` on ``backbone``, what ``DBFHook`` installs): no autograd in
  the trunk, its parameters skipped by the optimizer.
* ``inference``: eval mode, ``torch.no_grad()``, the config's test settings (2000 proposals).

Every mmcv op of the model (nms, RoIAlignRotated, box_iou_rotated, nms_rotated) runs through
the shim; ``shim_ops_s_per_step`` is the wall time spent in the shim's functions per step
(backward passes included). Wall clock from pytest-benchmark (one warm-up round, then rounds); ``cpu_s_per_step``
is the process CPU time per step (all threads), less inflated by other processes than the
wall clock; ``load_avg_1min`` records how busy the machine was.

Needs the mmcv 1.x stack (``.ci/install_openmmlab``); run it with that environment's python:
``~/.cache/dbf_ext/openmmlab/mmcv1/bin/python -m pytest bench/bench_openmmlab.py --benchmark-only``.
``bench/conftest.py`` writes ``bench/results/openmmlab_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import sys
import time

import numpy as np
import pytest
import torch

if importlib.util.find_spec("mmrotate") is None:
    pytest.skip("needs the mmcv 1.x stack (.ci/install_openmmlab)", allow_module_level=True)

from dbf_ext.integrations import mmcv_ops  # noqa: E402

mmcv_ops.install()  # before mmrotate imports mmcv.ops

import mmrotate  # noqa: E402
from mmcv import Config  # noqa: E402
from mmrotate.models import build_detector  # noqa: E402

from dbf_ext.freeze import AlwaysFrozen, apply_dbf  # noqa: E402

CONFIG = (pathlib.Path(mmrotate.__file__).parent / ".mim" / "configs" / "oriented_rcnn"
          / "oriented_rcnn_r50_fpn_1x_dota_le90.py")
SIZE = 1024
ROUNDS = 2


def _detector(frozen: bool):
    config = Config.fromfile(str(CONFIG))
    config.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = build_detector(config.model)
    model.init_weights()
    if frozen:
        apply_dbf(model, AlwaysFrozen(), backbone="backbone").on_epoch_start(0)
    return model


def _batch():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, SIZE, SIZE, generator=generator)
    meta = dict(img_shape=(SIZE, SIZE, 3), pad_shape=(SIZE, SIZE, 3), ori_shape=(SIZE, SIZE, 3),
                scale_factor=np.ones(4, dtype=np.float32), flip=False, flip_direction=None)
    centres = torch.rand(12, 2, generator=generator) * (SIZE - 200) + 100
    sides = torch.rand(12, 2, generator=generator) * 80 + 20
    angles = torch.rand(12, 1, generator=generator) * 3 - 1.5
    boxes = torch.cat([centres, sides, angles], 1)
    labels = torch.randint(0, 15, (12,), generator=generator)
    return image, [meta], [boxes], [labels]


@contextlib.contextmanager
def _timed_shim_calls(seconds: list[float]):
    """Adds the wall time spent in the shim's functions to ``seconds[0]`` (mmcv's op modules
    look them up on the module at every call, so replacing them there times every call)."""
    shim = sys.modules["mmcv._ext"]
    originals = {name: getattr(shim, name) for name in mmcv_ops.PROVIDED}

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start
        return call

    for name, function in originals.items():
        setattr(shim, name, timed(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(shim, name, function)


def _measured(benchmark, step, extra: dict) -> None:
    step()  # warm-up: allocator, optimizer state
    cpu_times, shim_seconds = [], [0.0]

    def timed():
        start = time.process_time()
        step()
        cpu_times.append(time.process_time() - start)

    with _timed_shim_calls(shim_seconds):
        benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(extra, cpu_s_per_step=round(float(np.median(cpu_times)), 2),
                                shim_ops_s_per_step=round(shim_seconds[0] / ROUNDS, 2),
                                load_avg_1min=round(os.getloadavg()[0], 1),
                                threads=torch.get_num_threads())


@pytest.mark.parametrize("variant", ["unfrozen", "frozen_backbone"])
def test_train_step(benchmark, variant):
    benchmark.group = f"oriented_rcnn_r50_fpn_1x_dota_le90, 1x{SIZE}x{SIZE}"
    model = _detector(frozen=variant == "frozen_backbone").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=1e-4)
    image, metas, boxes, labels = _batch()

    def step():
        optimizer.zero_grad()
        losses = model(img=image, img_metas=metas, gt_bboxes=boxes, gt_labels=labels)
        loss, _ = model._parse_losses(losses)
        loss.backward()
        optimizer.step()

    _measured(benchmark, step, {"step": f"train[{variant}]"})


def test_inference(benchmark):
    benchmark.group = f"oriented_rcnn_r50_fpn_1x_dota_le90, 1x{SIZE}x{SIZE}"
    model = _detector(frozen=False).eval()
    image, metas, _, _ = _batch()

    def step():
        with torch.no_grad():
            model(img=[image], img_metas=[metas], return_loss=False, rescale=True)

    _measured(benchmark, step, {"step": "inference"})
