"""Rotated-box IoU (CPU and CUDA kernels in csrc/box_iou_rotated/)."""

from __future__ import annotations

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import check_choice, check_rotated_boxes, check_same_device

_MODES = ("iou", "iof")


def box_iou_rotated(
    boxes1: Tensor,
    boxes2: Tensor,
    mode: str = "iou",
    aligned: bool = False,
    clockwise: bool = True,
) -> Tensor:
    """Overlap of rotated boxes: intersection over union, or over the area of ``boxes1``.

    Args:
        boxes1: ``(N, 5)`` boxes ``(cx, cy, w, h, theta)``, theta in radians.
        boxes2: ``(M, 5)`` boxes (``M == N`` when ``aligned``).
        mode: ``"iou"`` (intersection / union) or ``"iof"`` (intersection / area of boxes1).
        aligned: compare ``boxes1[i]`` with ``boxes2[i]`` only.
        clockwise: ``True`` (mmcv / mmrotate convention, image coordinates with y down): the
            ``w`` edge points along ``(cos theta, sin theta)``. ``False`` negates theta
            (counter-clockwise). detectron2 / torchvision degrees convert as
            ``theta = -deg * pi / 180``.

    Returns:
        ``(N, M)`` overlaps, or ``(N,)`` when ``aligned``, in the dtype of the inputs
        (float16, bfloat16 and float32 are computed in float32, float64 in float64).
        Every value is in ``[0, 1]``, never NaN. A box with a non-finite value, ``w <= 0``,
        ``h <= 0`` or an area ``w * h`` below the smallest normal number of the compute type
        overlaps nothing, itself included (0).

    Inputs of different floating dtypes are promoted to a common one; both must be on the same
    device. Non-contiguous inputs are read through their strides (no copy).
    """
    check_rotated_boxes("boxes1", boxes1)
    check_rotated_boxes("boxes2", boxes2)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    check_choice("mode", mode, _MODES)
    if aligned and boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(
            f"aligned=True needs as many boxes1 as boxes2, got {boxes1.shape[0]} and "
            f"{boxes2.shape[0]}"
        )
    dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    return _box_iou_rotated_op(
        boxes1.to(dtype), boxes2.to(dtype), mode, bool(aligned), bool(clockwise)
    )


def _output_shape(boxes1: Tensor, boxes2: Tensor, aligned: bool) -> tuple[int, ...]:
    return (boxes1.shape[0],) if aligned else (boxes1.shape[0], boxes2.shape[0])


@torch.library.custom_op("dbf_ext::box_iou_rotated", mutates_args=())
def _box_iou_rotated_op(
    boxes1: Tensor, boxes2: Tensor, mode: str, aligned: bool, clockwise: bool
) -> Tensor:
    compute = _ext.compute_dtype(boxes1.dtype)
    b1 = boxes1.to(compute)
    b2 = boxes2.to(compute)
    out = torch.empty(_output_shape(b1, b2, aligned), dtype=compute, device=b1.device)
    if out.numel() == 0:
        return out.to(boxes1.dtype)
    _ext.launch(
        "box_iou_rotated",
        b1.device,
        _ext.box_view(b1),
        _ext.box_view(b2),
        _ext.dtype_code(compute),
        out.data_ptr(),
        aligned,
        mode == "iof",
        clockwise,
    )
    return out.to(boxes1.dtype)


@_box_iou_rotated_op.register_fake
def _(boxes1: Tensor, boxes2: Tensor, mode: str, aligned: bool, clockwise: bool) -> Tensor:
    return boxes1.new_empty(_output_shape(boxes1, boxes2, aligned))
