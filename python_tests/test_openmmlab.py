"""OpenMMLab integration: the mmcv._ext shim, mmrotate / mmdet detectors on it, and DBFHook in
mmcv 1.x and mmengine runners.

The two OpenMMLab generations cannot share one Python environment (mmcv 1.x and mmcv 2.x are
both the ``mmcv`` package), so each stack lives in its own virtual environment, made with
``--system-site-packages`` on top of this interpreter (torch, torchvision, dbf_ext and pytest
come from here) by ``.ci/install_openmmlab`` (which ``.ci/run`` calls). Each test here runs the
stack's case files under pytest inside that environment and fails with their output when they
fail. A stack whose environment is missing, or whose packages do not import (mmrotate: is not
present; importing it needs the shim the cases install), skips with the reason (so an install
that could not be made is visible, not silent).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import pytest

HERE = pathlib.Path(__file__).parent
CASES = HERE / "openmmlab"
ENVS = pathlib.Path(os.environ.get("DBF_EXT_OPENMMLAB_ENVS",
                                   pathlib.Path.home() / ".cache" / "dbf_ext" / "openmmlab"))

# stack -> (environment folder, code proving the install, case files). Without mmcv._ext
# (which the cases install) mmrotate does not import: its presence is checked instead.
STACKS = {
    "mmcv1": ("mmcv1", "import mmcv, mmdet, e2cnn, importlib.util; "
                       "assert importlib.util.find_spec('mmrotate'), 'No module named mmrotate'",
              ["shim_cases.py", "mmcv1_cases.py"]),
    "mmengine": ("mmengine", "import mmcv, mmengine, mmdet", ["shim_cases.py", "mmengine_cases.py"]),
}


def _interpreter(stack: str) -> pathlib.Path:
    folder, probe_code, _ = STACKS[stack]
    python = ENVS / folder / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{stack} stack not installed ({python} missing): run .ci/install_openmmlab")
    probe = subprocess.run([str(python), "-c", probe_code], capture_output=True, text=True, timeout=600)
    if probe.returncode != 0:
        last_line = (probe.stderr.strip().splitlines() or ["?"])[-1]
        log = ENVS / folder / "install.log"
        pytest.skip(f"{stack} stack does not import ({last_line}); install log: {log}")
    return python


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_openmmlab_stack(stack):
    python = _interpreter(stack)
    files = [str(CASES / name) for name in STACKS[stack][2]]
    environment = dict(os.environ)
    # The case files import their helpers (mm_reference) from their own folder.
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(CASES), environment.get("PYTHONPATH", "")]))
    # -P and a working folder without a dbf_ext/ in it: the installed dbf_ext is imported, not
    # the source tree of a checkout (which has no compiled module when pip built it elsewhere).
    result = subprocess.run(
        [str(python), "-P", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
        capture_output=True, text=True, cwd=CASES, env=environment, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{stack} cases failed:\n{output[-20000:]}"
    summary = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    if summary:  # visible in this run's warnings summary (GPU-only cases, for instance)
        warnings.warn(f"{stack} cases skipped:\n" + "\n".join(summary), stacklevel=1)


def test_cases_import_nothing_into_this_interpreter():
    # The case files are run inside the stacks' environments only; this interpreter must not
    # collect them (their names do not match test_*.py).
    assert not any(path.name.startswith("test_") for path in CASES.glob("*.py"))
    assert "mmcv" not in sys.modules
