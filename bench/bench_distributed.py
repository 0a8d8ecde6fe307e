"""Data-parallel training: one process against two (torchrun), with DBF and the feature cache.

Each benchmark is one whole ``dbf-ext train`` run in a subprocess (startup, 4 epochs: the
backbone trains in epoch 0 and is frozen after; final evaluation): tiny-fpn on 16 synthetic
128 px tiles, batch 2 per process, bfloat16 cache in host memory. The extra columns come from
the run's log: the job's images per second in the trained epoch and in the frozen epochs
served from the cache (epochs 2 and 3), and the cache hit rate there (all ranks; each rank's).

CPU: one process with 2 threads, one with 1 thread, and two processes with 1 thread each (what
torchrun sets); on a 2-core machine the two-process run shows the overhead of DDP and the
sharded data path rather than a speed-up. GPU (when present): one process, and two processes
-- on two GPUs with NCCL, or both on GPU 0 with gloo when there is one GPU, which is a smoke
check of the multi-process path on a GPU, not a scaling figure.

``python bench/bench_distributed.py memory`` prints the cache memory table of the README
(bytes per image of ResNet-50's trunk outputs and FPN levels at 1024 x 1024, per storage dtype).
Run: ``python -m pytest bench/bench_distributed.py --benchmark-only``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota

EPOCHS = 4
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# name -> (device, processes, threads per process)
CASES = {
    "1 process, 2 threads, CPU": ("cpu", 1, 2),
    "1 process, 1 thread, CPU": ("cpu", 1, 1),
    "2 processes, 1 thread each, CPU": ("cpu", 2, 1),
    "1 process, GPU": ("cuda", 1, 1),
    "2 processes, GPU": ("cuda" if GPUS >= 2 else "cuda:0", 2, 1),
}


def launch(data: Path, out: Path, device: str, processes: int, threads: int) -> subprocess.CompletedProcess:
    command = ["train", "--data", str(data), "--output", str(out), "--image-size", "128",
               "--batch-size", "2", "--epochs", str(EPOCHS), "--unfrozen-epochs", "0", "--hflip", "0",
               "--cache", "bfloat16:cpu=256MB,gpu=256MB", "--device", device]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                 "--standalone", "-m", "dbf_ext"] if processes > 1 else [sys.executable, "-m", "dbf_ext"])
    return subprocess.run([*launcher, *command], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})


@pytest.mark.parametrize("case", list(CASES))
def test_one_process_against_two(benchmark, tmp_path, case):
    device, processes, threads = CASES[case]
    if device.startswith("cuda") and not GPUS:
        pytest.skip("needs a CUDA GPU")
    data = prepare_synthetic_dota(SyntheticConfig(tile_size=128, train_tiles=16, val_tiles=4), quiet=True)
    out = tmp_path / "run"
    load_before = os.getloadavg()[0]

    def run():
        finished = launch(data, out, device, processes, threads)
        assert finished.returncode == 0, finished.stderr[-3000:]

    benchmark.group = f"DBF + cache, tiny-fpn, 16 tiles 128 px, batch 2 per process, {EPOCHS} epochs"
    benchmark.pedantic(run, rounds=1, iterations=1)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    served = records[2:]  # frozen epochs after the one that fills the cache
    benchmark.extra_info.update({
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "processes": processes,
        "threads each": threads,
        "img/s trained epoch": round(records[0]["images_per_second"], 1),
        "img/s frozen epochs 2+": round(statistics.mean(r["images_per_second"] for r in served), 1),
        "hit rate epochs 2+": round(sum(r["cache_hit_rate"] for r in served) / len(served), 3),
        "hit rate per rank epochs 2+": str([round(statistics.mean(rates), 3) for rates in zip(
            *(r["cache_hit_rate_per_rank"] for r in served))] if processes > 1 else "-"),
        "load average before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    })


def cache_memory_table() -> str:
    """Bytes per 1024 x 1024 image of ResNet-50's trunk outputs (C2-C5, what the cache stores
    for resnet50-fpn) and of its FPN levels (P2-P6, for comparison), per storage dtype, from
    the shapes of torchvision's modules (run on the meta device: nothing is computed)."""
    from dbf_ext.cache import STORAGE_DTYPES, SlabLayout
    from dbf_ext.train import build_detector

    model = build_detector("resnet50-fpn", 15, 1024).to("meta").eval()
    with torch.no_grad():
        trunk = model.backbone.body(torch.zeros(1, 3, 1024, 1024, device="meta"))
        pyramid = model.backbone.fpn(trunk)
    lines = ["| maps | shapes (C, H, W) | " + " | ".join(STORAGE_DTYPES) + " |",
             "|---|---|" + "---|" * len(STORAGE_DTYPES)]
    for name, maps in (("C2-C5 (cached)", list(trunk.values())), ("P2-P6", list(pyramid.values()))):
        sizes = [f"{SlabLayout.for_maps(maps, dtype).slab_bytes / 2**20:.1f} MiB" for dtype in STORAGE_DTYPES]
        shapes = ", ".join(str(tuple(m.shape[1:])) for m in maps)
        lines.append(f"| {name} | {shapes} | " + " | ".join(sizes) + " |")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:] == ["memory"]:
    print(cache_memory_table())
