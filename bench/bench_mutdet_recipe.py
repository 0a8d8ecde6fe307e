"""The MutDet recipe's pre-training: the backbone frozen for the whole run (``always-frozen``),
features from the cache after the first epoch. Epoch 1 (fills the cache) against epochs 2+
(served from it), without a cache, with the host-memory tier, and with a host budget too small
for the data set, so most entries go to the disk tier.

The demo's setting: tiny-fpn on the synthetic aerial set (48 training tiles, 192 px, batch 4),
on the CPU. Each benchmark is one whole run (4 epochs and the final evaluation); the epoch times
are in the extra columns: wall time, and the process's CPU time, which other processes on a
shared machine disturb much less (the last epoch's CPU time includes the final evaluation,
so the CPU mean of epochs 2+ covers epochs 2 and 3; epoch 1's includes building the model).
Run: ``python -m pytest bench/bench_mutdet_recipe.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
import time

import pytest
from rich.console import Console

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import TrainConfig, train

EPOCHS = 4
# Host budget of the disk-tier case: about a fifth of the data set's features (bfloat16,
# 48 tiles of about 100 KiB each), the rest spills to the disk tier.
CACHES = {
    "no cache": "off",
    "host tier": "bfloat16:cpu=64MB",
    "host 1 MB + disk": "bfloat16:cpu=1MB,disk=256MB",
}


@pytest.mark.parametrize("cache", list(CACHES))
def test_always_frozen_pretraining_epochs(benchmark, tmp_path, cache):
    data = prepare_synthetic_dota(SyntheticConfig(), quiet=True)
    results = []
    cpu_seconds = []  # per epoch

    def note_cpu_time(record):
        cpu_seconds.append(time.process_time() - sum(cpu_seconds) - cpu_start)

    def run():
        out = tmp_path / f"run{len(results)}"
        config = TrainConfig(data=str(data), output_dir=str(out), schedule="always-frozen",
                             epochs=EPOCHS, hflip=0.0, cache=CACHES[cache], device="cpu",
                             cache_dir=str(tmp_path / "feature_cache"))
        results.append(train(config, console=Console(quiet=True), on_epoch_end=note_cpu_time))

    cpu_start = time.process_time()

    benchmark.group = "always-frozen pre-training, tiny-fpn, 48 tiles 192 px, CPU"
    benchmark.pedantic(run, rounds=1, iterations=1)
    history = results[-1].history
    first, later = history[0].seconds, statistics.mean(r.seconds for r in history[1:])
    benchmark.extra_info.update({
        "device": "cpu",
        "epoch 1 s": round(first, 2),
        "epochs 2+ s (mean)": round(later, 2),
        "epoch 1 / epochs 2+": round(first / later, 2),
        "epoch 1 CPU s": round(cpu_seconds[0], 2),
        "epochs 2+ CPU s (mean)": round(statistics.mean(cpu_seconds[1:-1]), 2),
        "CPU epoch 1 / epochs 2+": round(cpu_seconds[0] / statistics.mean(cpu_seconds[1:-1]), 2),
        "hit rate epochs 2+": (round(statistics.mean(r.cache_hit_rate for r in history[1:]), 3)
                               if history[1].cache_hit_rate is not None else "-"),
    })
    summary = results[-1].cache_summary
    if summary is not None:
        benchmark.extra_info["entries host / disk"] = f"{summary['entries']['cpu']} / {summary['entries']['disk']}"
        benchmark.extra_info["KiB per image"] = round(summary["bytes_per_sample"] / 1024)
