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

# Must match csrc/common/types.h (enum class DType).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
}


@functools.lru_cache(maxsize=None)
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


def build_info() -> dict[str, Any]:
    """Version, build configuration and runtime GPU availability, as a plain dict."""
    from dbf_ext import __version__

    ext = extension()
    info: dict[str, Any] = {"version": __version__, **ext.build_info()}
    status = ext.cuda_status()
    info["cuda_runtime"] = status
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
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream
