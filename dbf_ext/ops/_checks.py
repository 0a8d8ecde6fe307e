"""Input validation shared by the operators: clear errors before any pointer reaches C++."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_rotated_boxes(name: str, boxes: object) -> torch.Tensor:
    """Checks a ``(N, 5)`` floating tensor of rotated boxes ``(cx, cy, w, h, theta)``."""
    boxes = check_tensor(name, boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(
            f"{name} must have shape (N, 5) = (cx, cy, w, h, theta), got {tuple(boxes.shape)}"
            + (" (extra columns such as scores must be sliced off)" if boxes.dim() == 2 else "")
        )
    check_float_dtype(name, boxes)
    return boxes


def check_horizontal_boxes(name: str, boxes: object) -> torch.Tensor:
    """Checks a ``(N, 4)`` floating tensor of axis-aligned boxes ``(x1, y1, x2, y2)``."""
    boxes = check_tensor(name, boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) = (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    check_float_dtype(name, boxes)
    return boxes


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}"
        )


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one supported device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")
    if first.type not in SUPPORTED_DEVICE_TYPES and first.type != "meta":
        raise ValueError(f"dbf_ext kernels run on CPU and CUDA tensors, got device {first}")
    return first


def check_finite_number(name: str, value: object) -> float:
    """A finite real number (Python or NumPy scalar; not a tensor, not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_labels(name: str, labels: object, count: int) -> torch.Tensor:
    """Checks a ``(count,)`` integer tensor of class labels (any integer dtype, not bool)."""
    labels = check_tensor(name, labels)
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.shape != (count,):
        raise ValueError(
            f"{name} must have shape ({count},) (one label per box), got {tuple(labels.shape)}"
        )
    return labels
