"""The launch path every operator shares: constants from _C, the CPU/CUDA launcher, and the
check that the installed driver can run this build's CUDA runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbf_ext import _ext
from dbf_ext.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_dtype_codes_come_from_the_compiled_module():
    codes = {dtype: _ext.dtype_code(dtype) for dtype in
             (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn)}
    assert len(set(codes.values())) == len(codes)
    assert codes == {d: _ext.extension().DTYPE_CODES[str(d).split(".")[1]] for d in codes}
    assert set(_ext.extension().BOX_KIND_CODES) == {"hbb", "obb"}


@pytest.mark.parametrize(
    ("driver", "runtime", "problem"),
    [
        (12040, 13000, "CUDA 13.0 and need a driver for CUDA 13.x (R580 or newer)"),
        (11080, 12060, "driver supports CUDA 11.8"),
        (13000, 13000, None),
        (13020, 13000, None),
        (12020, 12060, None),  # minor version compatibility within a major version
        (0, 13000, None),  # no driver: no GPU to run on, reported elsewhere
    ],
)
def test_driver_problem(driver, runtime, problem):
    found = _ext.driver_problem({"driver_version": driver, "runtime_version": runtime})
    if problem is None:
        assert found is None
    else:
        assert problem in found and "DBF_EXT_CUDA_HOME" in found


def test_too_old_driver_is_explained_by_info_and_refused_by_ops(monkeypatch, capsys):
    if not _ext.has_cuda_kernels():
        pytest.skip("this build has no CUDA kernels")
    old_driver = {"device_count": 0, "driver_version": 12020, "runtime_version": 13000,
                  "error": "cudaErrorInsufficientDriver: CUDA driver version is insufficient"}
    monkeypatch.setattr(_ext.extension(), "cuda_status", lambda: dict(old_driver))
    monkeypatch.setattr(_ext, "_cuda_status", lambda: dict(old_driver))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "supports CUDA 12.2" in out and "R580" in out
    assert main(["info", "--json"]) == 0
    assert "R580" in json.loads(capsys.readouterr().out)["cuda_driver_problem"]
    with pytest.raises(RuntimeError, match="R580"):
        _ext.cuda_launch_args(torch.device("cuda", 0))


def test_launch_refuses_other_devices():
    with pytest.raises(ValueError, match="CPU and CUDA"):
        _ext.launch("box_iou_rotated", torch.device("meta"))


def test_build_finds_the_cuda_version_of_the_installed_torch():
    """tools/torch_cuda_version.py (run by CMake) reads torch's CUDA version without importing it."""
    out = subprocess.run([sys.executable, "-I", str(REPO / "tools" / "torch_cuda_version.py")],
                         capture_output=True, text=True, check=True).stdout.strip()
    expected = torch.version.cuda or ""
    assert out == ".".join(expected.split(".")[:2])
