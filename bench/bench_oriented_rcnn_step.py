"""Benchmark: an Oriented R-CNN R50-FPN training step with the backbone trained, frozen, or frozen
and served from the feature cache.

Model: ``build_detector("oriented-rcnn-r50-fpn", num_classes=15, image_size=1024)`` (mmrotate's
``oriented_rcnn_r50_fpn_1x_dota_le90`` configuration, random weights), a batch of 2 images of
1024 x 1024 (no resizing) with 20 DOTA-like rotated boxes each, SGD (lr 0.005, momentum 0.9,
weight decay 1e-4). One step = zero_grad + forward with losses + backward + optimizer.step().
Variants (what DBF does with the trunk ``backbone.body``; the FPN and heads always train):

* ``trained``: ordinary training, the trunk with autograd (DBF's unfrozen epochs).
* ``frozen``: the trunk under :class:`~dbf_ext.freeze.FrozenBackbone`, frozen: forward without
  autograd in eval mode (DBF's frozen epochs without a cache).
* ``cached (bfloat16)``: the frozen trunk behind a :class:`~dbf_ext.cache.CachedBackbone` whose
  host-memory (on a GPU: GPU-memory) tier holds the batch's features in bfloat16, filled by the
  warm-up step: every measured step is served from the cache (frozen epochs after the first).

Time: pytest-benchmark wall clock, one warm-up round and a few rounds; ``cpu_s_per_step`` is the
process CPU time of a step (all threads), ``load_avg_1min`` how busy the machine was. Memory, on
the CPU: the peak resident memory during one more step above the resident memory before it
(``dbf_ext.testing.peak_resident_mib``: Linux VmHWM reset through ``/proc/self/clear_refs``;
the step's transient memory: activations kept for backward, gradients, workspace), and the
resident memory between steps; on a GPU: ``torch.cuda.max_memory_allocated`` during a step,
above the memory allocated before it.

Run: ``python -m pytest bench/bench_oriented_rcnn_step.py --benchmark-only`` (on a machine with
CUDA the GPU cases run as well). ``bench/conftest.py`` writes
``bench/results/oriented_rcnn_step_<cpu|gpu>.{json,md}``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from dbf_ext.cache import CachedBackbone, FeatureCache
from dbf_ext.freeze import FrozenBackbone
from dbf_ext.models import build_detector
from dbf_ext.testing import peak_resident_mib, random_rotated_boxes

VARIANTS = ("trained", "frozen", "cached (bfloat16)")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMAGE_SIZE = 1024
BATCH_SIZE = 2
NUM_CLASSES = 15  # DOTA-v1.0
OBJECTS = 20
ROUNDS = {"cpu": 2, "cuda": 10}


@dataclass
class TrainingStep:
    model: torch.nn.Module
    cached: CachedBackbone | None
    run: Callable[[], None]


def build_training_step(variant: str, device: str) -> TrainingStep:
    torch.manual_seed(0)
    model = build_detector("oriented-rcnn-r50-fpn", NUM_CLASSES, IMAGE_SIZE)
    cached = None
    if variant != "trained":
        frozen = FrozenBackbone(model.backbone.body)
        frozen.set_frozen(True)
        model.backbone.body = frozen
        if variant.startswith("cached"):
            on_gpu = device == "cuda"
            cache = FeatureCache("bfloat16", gpu_bytes=(4 << 30) if on_gpu else 0,
                                 cpu_bytes=0 if on_gpu else 4 << 30)
            cached = CachedBackbone(frozen, cache)
            cached.watch_input_sizes(model.transform)
            model.backbone.body = cached
    model.to(device).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005,
                                momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device) for _ in range(BATCH_SIZE)]
    targets = [{"boxes": random_rotated_boxes(OBJECTS, tile=IMAGE_SIZE, min_side=12, generator=generator)
                .clamp(min=torch.tensor([60.0, 60.0, 12.0, 12.0, -3.2]),
                       max=torch.tensor([IMAGE_SIZE - 60.0, IMAGE_SIZE - 60.0, 100.0, 100.0, 3.2])).to(device),
                "labels": torch.randint(1, NUM_CLASSES + 1, (OBJECTS,), generator=generator).to(device)}
               for _ in range(BATCH_SIZE)]
    keys = [(f"tile{i}", (False, False)) for i in range(BATCH_SIZE)]

    def run() -> None:
        optimizer.zero_grad()
        if cached is not None:
            with cached.batch_keys(keys):
                losses = model(images, targets)
        else:
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return TrainingStep(model, cached, run)


def step_memory_mib(step: TrainingStep, device: str) -> dict[str, float]:
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        return {"peak_step_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
                "allocated_between_steps_mib": before / 2**20}
    _, increase = peak_resident_mib(step.run)
    with open("/proc/self/status") as status:
        resident_kib = int(status.read().split("VmRSS:")[1].split()[0])
    return {"peak_step_mib": increase, "rss_between_steps_mib": resident_kib / 1024}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, variant, device):
    step = build_training_step(variant, device)
    cpu_seconds: list[float] = []

    def timed_step() -> None:
        start = time.process_time()
        step.run()
        cpu_seconds.append(time.process_time() - start)

    benchmark.group = f"oriented-rcnn-r50-fpn train step, {BATCH_SIZE}x{IMAGE_SIZE}x{IMAGE_SIZE}, {device}"
    benchmark.pedantic(timed_step, rounds=ROUNDS[device], warmup_rounds=1, iterations=1)
    trunk_grads = [p.grad for p in step.model.backbone.body.parameters()]
    assert all(g is not None for g in trunk_grads) if variant == "trained" else all(g is None for g in trunk_grads)
    if step.cached is not None:  # the warm-up step filled the cache, every later step hit it
        stats = step.cached.cache.stats
        assert stats.misses == BATCH_SIZE and stats.hits == BATCH_SIZE * ROUNDS[device]
    memory = step_memory_mib(step, device)
    benchmark.extra_info.update(
        device=device,
        cpu_s_per_step=round(statistics.median(cpu_seconds[1:]), 2),  # the warm-up round left out
        **{name: round(value) for name, value in memory.items()},
        threads=torch.get_num_threads(),
        load_avg_1min=round(os.getloadavg()[0], 1),
    )
