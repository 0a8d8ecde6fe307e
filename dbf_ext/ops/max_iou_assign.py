"""The MaxIoU assignment operator (CPU and CUDA kernels in csrc/assign/) and its options.

The public functions, with the semantics and the argument checks, are
:func:`dbf_ext.assign.max_iou_assign` and :func:`dbf_ext.assign.batched_max_iou_assign`; this
module holds what reaches the kernels: :class:`MaxIoUAssignOptions` and the custom op on
packed images.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import check_finite_number, check_interval

_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class MaxIoUAssignOptions:
    """The options of mmdetection's ``MaxIoUAssigner``, checked once, in one object.

    The fields are the keyword arguments of :func:`dbf_ext.assign.max_iou_assign` and the
    members of the kernels' ``MaxIouAssignOptions`` (csrc/assign/assign.h), under the same
    names: the kernels' options are filled field by field. Every object is checked on
    construction, :func:`dataclasses.replace` included (numbers finite, ``neg_iou_thr``
    normalised to ``(lo, hi)``, flags as bools).

    Attributes:
        pos_iou_thr: boxes whose max overlap is ``>= pos_iou_thr`` become positives.
        neg_iou_thr: ``(lo, hi)``: boxes with ``lo <= max overlap < hi`` become negatives; a
            number ``x`` is taken as ``(0, x)``.
        min_pos_iou: the least overlap of a low-quality match.
        gt_max_assign_all: a low-quality match takes every box reaching the gt's best overlap
            (else the first one).
        match_low_quality: each gt also claims the boxes of its best overlap.
        ignore_iof_thr: boxes whose iof with an ignore box exceeds this are ignored (off when
            ``<= 0``).
        ignore_wrt_candidates: that iof is over the box (else over the ignore box).
    """

    pos_iou_thr: float
    neg_iou_thr: tuple[float, float]
    min_pos_iou: float = 0.0
    gt_max_assign_all: bool = True
    match_low_quality: bool = True
    ignore_iof_thr: float = -1.0
    ignore_wrt_candidates: bool = True

    def __post_init__(self) -> None:
        for name, kind in _FIELD_TYPES.items():
            object.__setattr__(self, name, _FIELD_CHECKS[kind](name, getattr(self, name)))

    def op_values(self) -> list[float]:
        """The fields in order as floats (``neg_iou_thr`` as two values, flags as 0 / 1): how
        the options cross the custom op, whose schema has no record type."""
        values: list[float] = []
        for name in _FIELD_TYPES:
            value = getattr(self, name)
            values.extend(value if isinstance(value, tuple) else (value,))
        return [float(v) for v in values]

    @classmethod
    def from_op_values(cls, values: Sequence[float]) -> MaxIoUAssignOptions:
        """The options back from :meth:`op_values`."""
        remaining = iter(values)
        return cls(*(_take(remaining, kind) for kind in _FIELD_TYPES.values()))


# The fields' types (the annotations are strings under ``from __future__ import annotations``),
# and how each type is checked and normalised.
_FIELD_TYPES: dict[str, typing.Any] = typing.get_type_hints(MaxIoUAssignOptions)
_FIELD_CHECKS = {
    float: check_finite_number,
    tuple[float, float]: check_interval,
    bool: lambda name, value: bool(value),
}


def _take(values: Iterator[float], kind: typing.Any) -> object:
    """The next field's value from op values: a tuple field takes one value per element."""
    width = len(typing.get_args(kind))
    return tuple(next(values) for _ in range(width)) if width else next(values)


def _output_shapes(boxes: Tensor, box_offsets: Tensor, with_labels: bool, with_topk: bool):
    total, num_images = boxes.shape[0], box_offsets.shape[0] - 1
    return total, (total if with_labels else 0), (num_images if with_topk else 0)


@torch.library.custom_op("dbf_ext::max_iou_assign", mutates_args=())
def max_iou_assign_op(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor | None,
    ignore_boxes: Tensor | None,
    box_offsets: Tensor,
    gt_offsets: Tensor,
    ignore_offsets: Tensor | None,
    topk: Tensor | None,
    box_type: str,
    options: list[float],
    max_boxes_per_image: int,
    max_gts_per_image: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The assignment of packed images (inputs checked by the caller), with the options as
    :meth:`MaxIoUAssignOptions.op_values` (the schema has no record type).

    Image ``i`` owns rows ``[offsets[i], offsets[i + 1])`` of ``boxes``, ``gt_boxes`` and
    ``ignore_boxes`` (int64 offsets on the boxes' device; ``ignore_offsets`` None: no box is
    ignored). Boxes are in their compute dtype, ``gt_labels`` int64 and contiguous.

    Returns:
        ``gt_inds``, ``max_overlaps``, ``labels`` (empty without ``gt_labels``) and the k-th
        largest max overlap per image for ``k = topk[i]`` (NaN outside ``[1, boxes]``; empty
        without ``topk``).
    """
    device, dtype = boxes.device, boxes.dtype
    total, label_count, topk_count = _output_shapes(
        boxes, box_offsets, gt_labels is not None, topk is not None
    )
    gt_inds = torch.empty(total, dtype=torch.int64, device=device)
    max_overlaps = torch.empty(total, dtype=dtype, device=device)
    labels = torch.empty(label_count, dtype=torch.int64, device=device)
    kth = torch.empty(topk_count, dtype=dtype, device=device)
    if total == 0:
        return gt_inds, max_overlaps, labels, kth.fill_(math.nan)

    assign_options = MaxIoUAssignOptions.from_op_values(options)
    ext = _ext.extension()
    args = ext.MaxIouAssignArgs()
    args.box_kind = ext.BOX_KIND_CODES[box_type]
    args.dtype = _ext.dtype_code(dtype)
    args.num_images = box_offsets.shape[0] - 1
    args.boxes = _ext.box_view(boxes)
    args.gts = _ext.box_view(gt_boxes)
    args.box_offsets = box_offsets.data_ptr()
    args.gt_offsets = gt_offsets.data_ptr()
    if ignore_offsets is not None:
        args.ignore = _ext.box_view(ignore_boxes)
        args.ignore_offsets = ignore_offsets.data_ptr()
    args.max_boxes_per_image = max_boxes_per_image
    args.max_gts_per_image = max_gts_per_image
    native_options = ext.MaxIouAssignOptions()
    for name in _FIELD_TYPES:
        setattr(native_options, name, getattr(assign_options, name))
    args.options = native_options
    args.gt_inds = gt_inds.data_ptr()
    args.max_overlaps = max_overlaps.data_ptr()
    if gt_labels is not None:
        args.gt_labels = gt_labels.data_ptr()
        args.labels = labels.data_ptr()
    if topk is not None:
        args.topk = topk.data_ptr()
        args.kth_largest = kth.data_ptr()
    if device.type == "cuda":
        # Scratch through torch's caching allocator (csrc/assign/assign.h says what each holds).
        total_gts = gt_boxes.shape[0]
        gt_max = torch.zeros(total_gts, dtype=dtype, device=device)
        first_live = torch.full((args.num_images,), _INT64_MAX, dtype=torch.int64, device=device)
        args.gt_max = gt_max.data_ptr()
        args.image_first_live = first_live.data_ptr()
        if assign_options.match_low_quality and not assign_options.gt_max_assign_all:
            gt_argmax_box = torch.full((total_gts,), _INT64_MAX, dtype=torch.int64, device=device)
            args.gt_argmax_box = gt_argmax_box.data_ptr()
    _ext.launch("max_iou_assign", device, args)
    return gt_inds, max_overlaps, labels, kth


@max_iou_assign_op.register_fake
def _(boxes, gt_boxes, gt_labels, ignore_boxes, box_offsets, gt_offsets, ignore_offsets, topk,
      *scalars):
    total, label_count, topk_count = _output_shapes(
        boxes, box_offsets, gt_labels is not None, topk is not None
    )
    return (
        boxes.new_empty(total, dtype=torch.int64),
        boxes.new_empty(total),
        boxes.new_empty(label_count, dtype=torch.int64),
        boxes.new_empty(topk_count),
    )
