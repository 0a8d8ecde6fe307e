"""Writes every benchmark run's results to bench/results/ (JSON + a markdown table).

Each benchmark file ``bench_<suite>.py`` produces ``results/<suite>_<target>.json`` and
``.md``, where target is ``cpu`` or the GPU's name, with the machine described. Peers measured
in the same run (shapely, torchvision, plain torch, mmcv when installed) sit in the same
benchmark group, so the table compares like with like.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"


def machine_description() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            from dbf_ext._ext import cuda_version_text, extension

            status = extension().cuda_status()
            info["cuda_driver"] = cuda_version_text(status["driver_version"])
            info["dbf_ext_cuda_runtime"] = cuda_version_text(status["runtime_version"])
        except (ImportError, KeyError):
            pass
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=True,
            )
            info["nvidia_driver"] = smi.stdout.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:
        import dbf_ext

        info["dbf_ext"] = dbf_ext.__version__
    except ImportError:
        pass
    return info


def _target(benchmarks) -> str:
    on_gpu = any(b.extra_info.get("device") == "cuda" for b in benchmarks)
    if not on_gpu:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower()


def _markdown(suite: str, machine: dict, rows: list[dict]) -> str:
    lines = [f"# Benchmark `{suite}`", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "Times in milliseconds (median over rounds; min and rounds for context).", ""]
    extra_keys = sorted({k for r in rows for k in r["extra_info"] if k not in ("device",)})
    header = ["group", "name", "median ms", "min ms", "rounds"] + extra_keys
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r["group"] or "", r["name"], f"{r['median'] * 1e3:.3f}", f"{r['min'] * 1e3:.3f}",
                 str(r["rounds"])] + [str(r["extra_info"].get(k, "")) for k in extra_keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or session.config.getoption("benchmark_disable", False):
        return
    by_suite = defaultdict(list)
    for bench in bench_session.benchmarks:
        if not bench:  # errored or skipped
            continue
        module = Path(bench.fullname.split("::")[0]).stem
        by_suite[module.removeprefix("bench_")].append(bench)
    if not by_suite:
        return
    machine = machine_description()
    RESULTS_DIR.mkdir(exist_ok=True)
    for suite, benches in by_suite.items():
        rows = [
            {
                "group": b.group,
                "name": b.name,
                "median": b.stats.median,
                "min": b.stats.min,
                "mean": b.stats.mean,
                "stddev": b.stats.stddev,
                "rounds": b.stats.rounds,
                "extra_info": b.extra_info,
            }
            for b in benches
        ]
        rows.sort(key=lambda r: (r["group"] or "", r["median"]))
        stem = RESULTS_DIR / f"{suite}_{_target(benches)}"
        stem.with_suffix(".json").write_text(
            json.dumps({"suite": suite, "machine": machine, "results": rows}, indent=2) + "\n"
        )
        stem.with_suffix(".md").write_text(_markdown(suite, machine, rows))
