"""Loading of the compiled module ``dbf_ext._C`` and the glue every operator shares.

The compiled kernels take raw pointers, sizes, strides, a dtype code and (on CUDA) a device
index and stream handle. This module turns tensors into those plain values, so the operator
wrappers in :mod:`dbf_ext.ops` stay short.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch


@functools.cache
def extension():
    """Returns the compiled module, with an actionable message when it is missing."""
    try:
        return importlib.import_module("dbf_ext._C")
    except ImportError as err:
        raise ImportError(
            "dbf_ext's compiled kernels (dbf_ext._C) could not be loaded: "
            f"{err}. Install the package with `pip install .` from the source tree "
            "(an editable or source-tree import without a build has no kernels)."
        ) from err


def has_cuda_kernels() -> bool:
    """True when the CUDA kernels were compiled into this build."""
    return bool(extension().build_info()["cuda"])


# The oldest driver branch for each CUDA major version (NVIDIA's CUDA compatibility table).
_MIN_DRIVER_BRANCH = {11: 450, 12: 525, 13: 580}


def cuda_version_text(version: int) -> str:
    """CUDA's integer versions (12040) as text (12.4)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(status: dict[str, Any]) -> str | None:
    """Why CUDA kernels linked with runtime ``status["runtime_version"]`` cannot run on a driver
    of ``status["driver_version"]`` (both CUDA's integer versions; a status of
    ``_C.cuda_status()``), with the remedy; None when they can (or when there is no driver).

    The runtime is linked statically, so the toolkit used at build time fixes the oldest usable
    driver: within one major version any driver works (CUDA's minor version compatibility),
    across major versions the driver must be at least as new.
    """
    driver, runtime = status["driver_version"], status["runtime_version"]
    if not driver or not runtime or driver // 1000 >= runtime // 1000:
        return None
    major = runtime // 1000
    branch = _MIN_DRIVER_BRANCH.get(major)
    needs = f"a driver for CUDA {major}.x" + (f" (R{branch} or newer)" if branch else "")
    return (
        f"dbf_ext's CUDA kernels were built with CUDA {cuda_version_text(runtime)} and need {needs}, "
        f"but this machine's driver supports CUDA {cuda_version_text(driver)}. Rebuild them with a "
        f"CUDA {driver // 1000}.x toolkit: DBF_EXT_CUDA_HOME=/path/to/cuda-{driver // 1000}.x "
        "pip install --force-reinstall --no-deps dbf_ext (or update the driver)"
    )


@functools.cache
def _cuda_status() -> dict[str, Any]:
    return dict(extension().cuda_status())


def build_info() -> dict[str, Any]:
    """Version, build configuration and runtime GPU availability, as a plain dict."""
    from dbf_ext import __version__

    ext = extension()
    info: dict[str, Any] = {"version": __version__, **ext.build_info()}
    status = dict(ext.cuda_status())
    info["cuda_runtime"] = status
    info["cuda_driver_problem"] = driver_problem(status) if info["cuda"] else None
    info["torch_version"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    info["gpu_usable"] = bool(
        info["cuda"] and status["device_count"] > 0 and torch.cuda.is_available()
    )
    if info["gpu_usable"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def box_view(boxes: torch.Tensor):
    """A ``(N, 5)`` tensor as the kernel's strided view (pointer, count, strides in elements)."""
    return extension().BoxArrayView(
        boxes.data_ptr(), boxes.shape[0], boxes.stride(0), boxes.stride(1)
    )


def dtype_code(dtype: torch.dtype) -> int:
    """The kernels' code for a torch dtype (``_C.DTYPE_CODES``, defined in csrc/common/types.h)."""
    return extension().DTYPE_CODES[str(dtype).removeprefix("torch.")]


def host_values_to(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of Python ``values`` on ``device`` without a host synchronisation: on CUDA the
    values are staged in pinned memory and copied asynchronously on the current stream (a
    plain ``torch.tensor(values, device=cuda)`` copies from pageable memory and waits)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype).pin_memory()
    return staged.to(device, non_blocking=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 is computed in float64; float16, bfloat16 and float32 in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_launch_args(device: torch.device) -> tuple[int, int]:
    """(device index, stream handle) of the current torch stream on ``device``."""
    if not has_cuda_kernels():
        raise RuntimeError(
            "this dbf_ext build has no CUDA kernels (nvcc was not found at build time); "
            "reinstall with nvcc on the PATH to run on CUDA tensors"
        )
    problem = driver_problem(_cuda_status())
    if problem:
        raise RuntimeError(problem)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def launch(kernel: str, device: torch.device, *args: Any, cuda_args: tuple = ()) -> Any:
    """Runs compiled kernel ``kernel`` on ``device``; every operator goes through here.

    CPU: ``_C.<kernel>_cpu(*args, num_threads)`` with torch's intra-op thread count. CUDA:
    ``_C.<kernel>_cuda(*args, *cuda_args, device_index, stream)`` on torch's current stream of
    that device (the kernel makes the device current for the call and restores the caller's).
    ``cuda_args`` are the CUDA kernel's extra arguments (device scratch).
    """
    ext = extension()
    if device.type == "cuda":
        return getattr(ext, f"{kernel}_cuda")(*args, *cuda_args, *cuda_launch_args(device))
    if device.type == "cpu":
        return getattr(ext, f"{kernel}_cpu")(*args, torch.get_num_threads())
    raise ValueError(f"dbf_ext kernels run on CPU and CUDA tensors, got device {device}")
