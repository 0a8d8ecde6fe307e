"""Benchmark: cost of a training step with the backbone trained, detached, or frozen (CPU).

Model: torchvision Faster R-CNN ResNet-50-FPN (weights=None, weights_backbone=None, 16 classes),
batch of 2 images at 512x512 (the transform is told min_size = max_size = 512, so no resizing),
SGD (lr 0.01, momentum 0.9, weight decay 1e-4). One step = zero_grad + forward with losses +
backward + optimizer.step(). Variants:

* ``unfrozen``: ordinary training.
* ``reference_detach``: the DBF reference code's frozen epoch: the backbone trunk
  (``backbone.body``) runs forward with autograd and its outputs are detached before the FPN.
* ``frozen_backbone``: ``apply_dbf(model, AlwaysFrozen())``: the trunk runs under no_grad in eval
  mode with requires_grad=False.

Step time: pytest-benchmark (wall clock), in this process, a few rounds after one warm-up round;
``cpu_s_per_step`` is the process CPU time of a step (all threads), which other processes
competing for the CPU inflate much less than the wall clock; ``load_avg_1min`` records how busy
the machine was.

Peak memory: measured in a fresh subprocess per variant (so variants cannot inherit each other's
heap), from Linux's resident-set high-water mark ``VmHWM``: one warm-up step (creates optimizer
state), then ``/proc/self/clear_refs`` resets the mark to the current RSS (the "baseline": model,
optimizer state, the last step's gradients, batch, libraries), then a few steps run.
``peak_increase_mib`` = peak RSS during those steps minus the baseline: the transient memory of
a step, mostly activations saved for backward. glibc's mmap threshold is pinned to 64 KiB in the subprocess so freed
tensors go back to the OS instead of staying in the heap and inflating the baseline.

Run: ``python -m pytest bench/bench_freeze.py --benchmark-only``. ``bench/conftest.py`` writes
``bench/results/freeze_cpu.json`` and ``.md`` (machine description, times, and the figures above
from ``extra_info``: ``peak_step_mib`` = peak increase, ``rss_between_steps_mib`` = baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dbf_ext.freeze import AlwaysFrozen, apply_dbf

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("unfrozen", "reference_detach", "frozen_backbone")
IMAGE_SIZE = 512
BATCH_SIZE = 2
NUM_CLASSES = 16
TIMING_ROUNDS = 3
MEMORY_STEPS = 2


class DetachedOutputs(nn.Module):
    """The DBF reference code's freezing: run the trunk with autograd, detach what it returns.

    Wraps a torchvision ``IntermediateLayerGetter``: input ``(B, 3, H, W)``, output an ordered dict
    of feature maps, here detached from the graph.
    """

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((name, feature.detach()) for name, feature in self.body(images).items())


@dataclass
class TrainingStep:
    model: nn.Module
    run: Callable[[], None]


def build_training_step(variant: str) -> TrainingStep:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE
    )
    if variant == "reference_detach":
        model.backbone.body = DetachedOutputs(model.backbone.body)
    elif variant == "frozen_backbone":
        apply_dbf(model, AlwaysFrozen()).on_epoch_start(0)
    elif variant != "unfrozen":
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) for _ in range(BATCH_SIZE)]
    targets = []
    for _ in range(BATCH_SIZE):
        corners = torch.rand(8, 2, generator=generator) * (IMAGE_SIZE - 64)
        sizes = 16 + torch.rand(8, 2, generator=generator) * 48
        targets.append(
            {
                "boxes": torch.cat([corners, corners + sizes], dim=1),
                "labels": torch.randint(1, NUM_CLASSES, (8,), generator=generator),
            }
        )

    def run() -> None:
        optimizer.zero_grad()
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    return TrainingStep(model, run)


# --------------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_memory_here(variant: str, num_steps: int) -> dict[str, float]:
    """Run in the subprocess: see the module docstring for what is measured."""
    step = build_training_step(variant)
    step.run()
    baseline_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    for _ in range(num_steps):
        step.run()
    peak_kib = _status_kib("VmHWM")
    return {
        "baseline_rss_mib": baseline_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "peak_increase_mib": (peak_kib - baseline_kib) / 1024,
    }


def measure_peak_memory(variant: str) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    completed = subprocess.run(
        [sys.executable, __file__, "--peak-memory", variant, "--threads", str(torch.get_num_threads())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step(benchmark, variant):
    step = build_training_step(variant)
    cpu_seconds: list[float] = []

    def timed_step() -> None:
        start = time.process_time()
        step.run()
        cpu_seconds.append(time.process_time() - start)

    benchmark.group = f"fasterrcnn_resnet50_fpn train step, {BATCH_SIZE}x{IMAGE_SIZE}x{IMAGE_SIZE}"
    benchmark.pedantic(timed_step, rounds=TIMING_ROUNDS, warmup_rounds=1, iterations=1)
    body_grads = [param.grad for param in step.model.backbone.body.parameters()]
    if variant == "unfrozen":
        assert all(grad is not None for grad in body_grads)
    else:  # neither freezing variant may give the trunk gradients
        assert all(grad is None for grad in body_grads)

    memory = measure_peak_memory(variant)
    benchmark.extra_info.update(
        {
            "cpu_s_per_step": round(statistics.median(cpu_seconds[1:]), 2),  # warm-up round left out
            "peak_step_mib": round(memory["peak_increase_mib"]),
            "rss_between_steps_mib": round(memory["baseline_rss_mib"]),
            "peak_rss_mib": round(memory["peak_rss_mib"]),
            "threads": torch.get_num_threads(),
            # Other processes on a shared machine slow the wall clock: say how busy it was.
            "load_avg_1min": round(os.getloadavg()[0], 1),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="peak-memory probe, run by the benchmark in a subprocess")
    parser.add_argument("--peak-memory", choices=VARIANTS, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure_peak_memory_here(args.peak_memory, MEMORY_STEPS)))


if __name__ == "__main__":
    main()
