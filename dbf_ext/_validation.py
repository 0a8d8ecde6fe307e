"""Every reusable check of arguments and tensors: clear errors before any pointer reaches C++.

The operators (:mod:`dbf_ext.ops`) and the pure-Python parts (freezing schedules, Dynamic
R-CNN, the feature cache) all check their inputs with these functions, so one kind of mistake
gets one message everywhere. This module does not import the compiled module: it works where
the kernels could not load.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# Plain Python arguments
# ---------------------------------------------------------------------------------------------

def as_integer(name: str, value: object, minimum: int, hint: str = "") -> int:
    """``value`` as a Python int ``>= minimum``.

    Accepts anything with ``__index__`` (Python and numpy integers, 0-d integer tensors);
    rejects bools (``True`` as a count is almost always a mistake) and floats with
    ``TypeError``, values below ``minimum`` with ``ValueError`` (``hint`` explains the range).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}{f' ({hint})' if hint else ''}, got {number}")
    return number


def check_limit(name: str, value: object) -> int:
    """A count limit: an int ``>= 0``, or ``-1`` for no limit."""
    return as_integer(name, value, -1, "-1: no limit")


def check_finite_number(name: str, value: object) -> float:
    """A finite real number (Python or NumPy scalar; not a tensor, not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_interval(name: str, value: object) -> tuple[float, float]:
    """``(lo, hi)`` from a pair of finite numbers, or from one number ``x`` meaning ``(0, x)``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return 0.0, check_finite_number(name, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return check_finite_number(f"{name}[0]", value[0]), check_finite_number(f"{name}[1]", value[1])
    raise TypeError(f"{name} must be a number or a (lo, hi) pair, got {value!r}")


def check_iou_threshold(name: str, value: object) -> float:
    """A suppression threshold: finite and ``>= 0``."""
    value = check_finite_number(name, value)
    if value < 0:
        raise ValueError(
            f"{name} must be >= 0, got {value} (a negative threshold would let every box, "
            "disjoint or invalid, suppress every other)"
        )
    return value


def check_positive_number(name: str, value: object) -> float:
    """A finite real number ``> 0`` as a float."""
    value = check_finite_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_size_pair(name: str, value: object) -> tuple[int, int]:
    """``(height, width)`` from an int ``n >= 1`` (meaning ``(n, n)``) or a pair of them."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
        return as_integer(f"{name}[0]", value[0], 1), as_integer(f"{name}[1]", value[1], 1)
    side = as_integer(name, value, 1)
    return side, side


def check_choice(name: str, value: object, choices) -> None:
    """``value`` is one of ``choices`` (named as given in the message)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

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


def check_rotated_rois(name: str, rois: object) -> torch.Tensor:
    """Checks a ``(K, 6)`` floating tensor of rotated RoIs ``(batch_index, cx, cy, w, h, theta)``
    (shape and dtype only; the values are the operator's to check)."""
    rois = check_tensor(name, rois)
    if rois.dim() != 2 or rois.shape[1] != 6:
        raise ValueError(
            f"{name} must have shape (K, 6) = (batch_index, cx, cy, w, h, theta), got "
            f"{tuple(rois.shape)}"
            + (" (per-image (K_i, 5) boxes go to MultiScaleRoIAlignRotated, or prepend the "
               "batch index)" if rois.dim() == 2 and rois.shape[1] == 5 else "")
        )
    check_float_dtype(name, rois)
    return rois


def check_feature_map(name: str, features: object) -> torch.Tensor:
    """Checks a ``(B, C, H, W)`` floating tensor."""
    features = check_tensor(name, features)
    if features.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(features.shape)}")
    check_float_dtype(name, features)
    return features


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


MASK_DTYPES = (torch.bool, torch.uint8)


def check_masks(name: str, masks: object) -> torch.Tensor:
    """Checks a dense ``(N, H, W)`` bool or uint8 tensor of instance masks (nonzero = set)."""
    masks = check_tensor(name, masks)
    if masks.dim() != 3:
        raise ValueError(
            f"{name} must have shape (N, H, W) (one mask per instance; add a leading dimension "
            f"for a single mask), got {tuple(masks.shape)}"
        )
    if masks.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor, got layout {masks.layout}")
    if masks.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be bool or uint8 (nonzero = set), got {masks.dtype}")
    return masks


def check_mask_side(name: str, masks: torch.Tensor, max_side: int) -> None:
    """The height and width of ``(N, H, W)`` masks are below ``max_side``."""
    if max(masks.shape[1:]) >= max_side:
        raise ValueError(f"{name}: height and width must be below {max_side}, got {tuple(masks.shape[1:])}")
