"""Instance masks to minimum-area rotated boxes (CPU and CUDA kernels in csrc/mask_to_obb/)."""

from __future__ import annotations

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import check_choice, check_mask_side, check_masks, check_same_device

#: The result dtypes (the kernel computes in float64).
OUTPUT_DTYPES = (torch.float32, torch.float64)


def mask_to_obb(masks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The minimum-area rectangle enclosing each mask's pixels, as a rotated box.

    Pixel ``(x, y)`` (column, row) is the unit square ``[x, x+1] x [y, y+1]``: a one-pixel mask
    gives a 1 x 1 box centred at ``(x + 0.5, y + 0.5)``. The rectangle is exact: the convex hull
    of the squares is built with integer arithmetic and every hull edge direction is tried (the
    minimum-area rectangle has a side on one), in float64. When several rectangles have the
    least area, the first hull edge wins (the hull starts at the top row's leftmost corner and
    runs down the left side), identically on CPU and CUDA.

    Args:
        masks: ``(N, H, W)`` bool or uint8 (nonzero = set) on CPU or CUDA, ``H, W < 2**30``.
            Non-contiguous masks are copied.
        dtype: of the result, ``torch.float32`` or ``torch.float64`` (computed in float64).

    Returns:
        ``(N, 5)`` boxes ``(cx, cy, w, h, theta)`` in pixels and radians, clockwise (image
        coordinates, y down; see docs/design.md), ``w`` along a hull edge, ``theta`` in
        ``(-pi, pi]``, not regularised (:func:`dbf_ext.boxes.mask2obb` applies an angle
        version). An empty mask gives a row of NaN: ``valid = ~boxes[:, 0].isnan()``.
    """
    check_masks("masks", masks)
    check_same_device(masks=masks)
    check_choice("dtype", dtype, OUTPUT_DTYPES)
    return _mask_to_obb_op(masks.contiguous(), dtype)


@torch.library.custom_op("dbf_ext::mask_to_obb", mutates_args=())
def _mask_to_obb_op(masks: Tensor, dtype: torch.dtype) -> Tensor:
    # Checked here, not in mask_to_obb: the limit comes from the compiled module, which
    # torch.compile cannot trace into.
    check_mask_side("masks", masks, _ext.extension().MASK_TO_OBB_MAX_SIDE)
    count, height, width = masks.shape
    out = torch.empty((count, 5), dtype=dtype, device=masks.device)
    if count == 0:
        return out
    cuda_args = ()
    if masks.device.type == "cuda":
        capacity = _ext.extension().mask_to_obb_hull_capacity(height)
        row_extents = torch.empty((count, height, 2), dtype=torch.int32, device=masks.device)
        hull = torch.empty((count, capacity, 2), dtype=torch.int32, device=masks.device)
        cuda_args = (row_extents.data_ptr(), hull.data_ptr())
    _ext.launch(
        "mask_to_obb",
        masks.device,
        masks.data_ptr(),
        count,
        height,
        width,
        _ext.dtype_code(dtype),
        out.data_ptr(),
        cuda_args=cuda_args,
    )
    return out


@_mask_to_obb_op.register_fake
def _(masks: Tensor, dtype: torch.dtype) -> Tensor:
    return masks.new_empty((masks.shape[0], 5), dtype=dtype)
