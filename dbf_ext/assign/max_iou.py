"""Fused MaxIoU label assignment (CPU and CUDA kernels in csrc/assign/).

mmdetection's ``MaxIoUAssigner`` (``assign`` with ``assign_wrt_overlaps``) for axis-aligned and
rotated boxes, without the ``(num_gts, num_boxes)`` overlap matrix: 200k anchors against 2000
gts need ~1.6 GB for that matrix in float32, and the dense argmax / equality passes read it
several times. Here each box meets its gts in one fused pass (on CPU only the gts near it,
through a spatial grid) and the extra memory is ``O(boxes + gts)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import (
    as_integer,
    check_choice,
    check_finite_number,
    check_horizontal_boxes,
    check_interval,
    check_labels,
    check_rotated_boxes,
    check_same_device,
)

_BOX_CHECKS = {"hbb": check_horizontal_boxes, "obb": check_rotated_boxes}
_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass(eq=False)
class AssignResult:
    """The assignment of one image's boxes (mmdetection's ``AssignResult`` fields).

    Attributes:
        num_gts: number of gt boxes of the image.
        gt_inds: ``(N,)`` int64: ``-1`` ignored (neither positive nor negative), ``0``
            negative, ``k > 0`` positive for gt ``k - 1``.
        max_overlaps: ``(N,)`` the largest IoU of each box with any gt (float32, float64 for
            float64 boxes); ``-1`` for boxes ignored through ``ignore_boxes``, ``0`` everywhere
            when the image has no gts.
        labels: ``(N,)`` int64 label of the assigned gt, ``-1`` where not positive; None when
            no gt labels were given.
        kth_largest_overlap: 0-dim tensor, the statistic requested with ``return_topk_iou``
            (see :func:`batched_max_iou_assign`); None when not requested.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor | None = None
    kth_largest_overlap: Tensor | None = None

    @property
    def num_boxes(self) -> int:
        return self.gt_inds.shape[0]


def max_iou_assign(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor | None = None,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    gt_max_assign_all: bool = True,
    match_low_quality: bool = True,
    ignore_boxes: Tensor | None = None,
    ignore_iof_thr: float = -1.0,
    ignore_wrt_candidates: bool = True,
    box_type: str = "hbb",
    return_topk_iou: int | None = None,
    topk_with_gts: bool = False,
) -> AssignResult:
    """Assigns each box to a gt, to the background or to neither: mmdetection's MaxIoUAssigner.

    With ``overlaps[g, n]`` the IoU of gt ``g`` and box ``n`` (never stored here):

    1. ``ignore_boxes`` (when ``ignore_iof_thr > 0``): a box whose iof with some ignore box
       exceeds ``ignore_iof_thr`` gets overlap ``-1`` with every gt. The iof is over the box
       (``ignore_wrt_candidates=True``) or over the ignore box.
    2. ``max_overlaps[n]``, ``argmax[n]`` = max / first argmax over gts. Boxes with
       ``lo <= max_overlaps < hi`` become negatives (``neg_iou_thr`` a float means
       ``(0, neg_iou_thr)``), then boxes with ``max_overlaps >= pos_iou_thr`` become positives
       of their argmax gt.
    3. ``match_low_quality``: for each gt ``g`` in order whose best overlap ``gt_max[g]`` is
       ``>= min_pos_iou``, the boxes reaching it (all of them when ``gt_max_assign_all``, else
       the first) are assigned to ``g``; a later gt overwrites an earlier one.

    Without gts every box is negative with max overlap 0; without boxes the results are empty.
    Thresholds are compared in the compute dtype, as torch compares a tensor with a scalar.

    Args:
        boxes: ``(N, 4)`` ``(x1, y1, x2, y2)`` for ``box_type="hbb"``, ``(N, 5)``
            ``(cx, cy, w, h, theta)`` (radians, clockwise, as ``box_iou_rotated``) for
            ``"obb"``. float16 / bfloat16 / float32 are computed in float32, float64 in float64.
        gt_boxes: ``(G, 4)`` or ``(G, 5)`` gt boxes.
        gt_labels: optional ``(G,)`` integer labels; ``labels`` of the result is None without.
        pos_iou_thr, neg_iou_thr, min_pos_iou, gt_max_assign_all, match_low_quality,
        ignore_iof_thr, ignore_wrt_candidates: as in mmdetection's MaxIoUAssigner.
        ignore_boxes: optional ``(K, 4)`` / ``(K, 5)`` regions to ignore.
        box_type: ``"hbb"`` (IoU as mmdetection's ``bbox_overlaps`` and torchvision's
            ``box_iou``: areas without +1) or ``"obb"`` (IoU of ``box_iou_rotated``).
        return_topk_iou: ``K`` to also compute the ``K``-th largest of ``max_overlaps``
            (``K`` clipped to the number of candidates; NaN without any), Dynamic R-CNN's
            statistic, stored in ``kth_largest_overlap``.
        topk_with_gts: count every gt as one more candidate with IoU 1 in that statistic, as
            when the sampler adds the gt boxes to the proposals (Dynamic R-CNN).

    Returns:
        An :class:`AssignResult`. Boxes and gts equal in IoU are told apart by index: the
        argmax over gts and the first box of ``gt_max_assign_all=False`` are the lowest indices
        reaching the maximum (torch.argmax's first occurrence). Results are deterministic and
        the same on CPU and CUDA for the same overlaps.
    """
    return batched_max_iou_assign(
        [boxes],
        [gt_boxes],
        None if gt_labels is None else [gt_labels],
        pos_iou_thr=pos_iou_thr,
        neg_iou_thr=neg_iou_thr,
        min_pos_iou=min_pos_iou,
        gt_max_assign_all=gt_max_assign_all,
        match_low_quality=match_low_quality,
        ignore_boxes=None if ignore_boxes is None else [ignore_boxes],
        ignore_iof_thr=ignore_iof_thr,
        ignore_wrt_candidates=ignore_wrt_candidates,
        box_type=box_type,
        return_topk_iou=return_topk_iou,
        topk_with_gts=topk_with_gts,
    )[0]


def batched_max_iou_assign(
    boxes_list: Sequence[Tensor],
    gt_boxes_list: Sequence[Tensor],
    gt_labels_list: Sequence[Tensor] | None = None,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    gt_max_assign_all: bool = True,
    match_low_quality: bool = True,
    ignore_boxes: Sequence[Tensor | None] | None = None,
    ignore_iof_thr: float = -1.0,
    ignore_wrt_candidates: bool = True,
    box_type: str = "hbb",
    return_topk_iou: int | None = None,
    topk_with_gts: bool = False,
) -> list[AssignResult]:
    """:func:`max_iou_assign` for a batch of images, in one set of kernel launches.

    Each argument that is per image in :func:`max_iou_assign` is a sequence with one entry per
    image here (``ignore_boxes`` entries may be None); images may have any numbers of boxes and
    gts. The images are packed (one concatenation per input, none for a single image) and the
    results are views into packed outputs. All tensors must be on one device.

    Returns:
        One :class:`AssignResult` per image, equal to what :func:`max_iou_assign` gives.
    """
    check_choice("box_type", box_type, tuple(_BOX_CHECKS))
    check_boxes = _BOX_CHECKS[box_type]
    boxes_list, gt_boxes_list = list(boxes_list), list(gt_boxes_list)
    num_images = len(boxes_list)
    per_image = {"gt_boxes_list": gt_boxes_list}
    if gt_labels_list is not None:
        per_image["gt_labels_list"] = gt_labels_list = list(gt_labels_list)
    if ignore_boxes is not None:
        per_image["ignore_boxes"] = ignore_boxes = list(ignore_boxes)
    for name, values in per_image.items():
        if len(values) != num_images:
            raise ValueError(
                f"{name} must have one entry per image ({num_images}), got {len(values)}"
            )

    box_tensors: dict[str, Tensor] = {}  # by name, for the error messages
    label_tensors: dict[str, Tensor] = {}
    for i in range(num_images):
        box_tensors[f"boxes_list[{i}]"] = check_boxes(f"boxes_list[{i}]", boxes_list[i])
        box_tensors[f"gt_boxes_list[{i}]"] = check_boxes(f"gt_boxes_list[{i}]", gt_boxes_list[i])
        if gt_labels_list is not None:
            label_tensors[f"gt_labels_list[{i}]"] = check_labels(
                f"gt_labels_list[{i}]", gt_labels_list[i], gt_boxes_list[i].shape[0]
            )
    pos_iou_thr = check_finite_number("pos_iou_thr", pos_iou_thr)
    neg_lo, neg_hi = check_interval("neg_iou_thr", neg_iou_thr)
    min_pos_iou = check_finite_number("min_pos_iou", min_pos_iou)
    ignore_iof_thr = check_finite_number("ignore_iof_thr", ignore_iof_thr)
    topk = None if return_topk_iou is None else as_integer("return_topk_iou", return_topk_iou, 1)
    use_ignore = ignore_iof_thr > 0 and ignore_boxes is not None
    if use_ignore:
        for i, region in enumerate(ignore_boxes):
            if region is not None:
                box_tensors[f"ignore_boxes[{i}]"] = check_boxes(f"ignore_boxes[{i}]", region)
        ignore_list = [_or_empty(region, boxes_list[i]) for i, region in enumerate(ignore_boxes)]
        use_ignore = any(region.shape[0] > 0 for region in ignore_list)
    if num_images == 0:
        return []
    device = check_same_device(**box_tensors, **label_tensors)

    compute = _ext.compute_dtype(_promote([t.dtype for t in box_tensors.values()]))
    box_counts = [b.shape[0] for b in boxes_list]
    gt_counts = [g.shape[0] for g in gt_boxes_list]
    topk_counts = None
    if topk is not None:
        # Per image: K clipped to the candidates; the first gts (IoU 1) come before the boxes.
        extra = gt_counts if topk_with_gts else [0] * num_images
        topk_counts = [min(topk, n + e) for n, e in zip(box_counts, extra)]
        in_boxes = [k - e for k, e in zip(topk_counts, extra)]
    gt_inds, max_overlaps, labels, kth = _max_iou_assign_op(
        _pack(boxes_list, compute),
        _pack(gt_boxes_list, compute),
        None if gt_labels_list is None else _pack(gt_labels_list, torch.int64).contiguous(),
        _pack(ignore_list, compute) if use_ignore else None,
        _offsets(box_counts, device),
        _offsets(gt_counts, device),
        _offsets([r.shape[0] for r in ignore_list], device) if use_ignore else None,
        None if topk is None else _ext.host_values_to(device, in_boxes, torch.int64),
        box_type,
        pos_iou_thr,
        neg_lo,
        neg_hi,
        min_pos_iou,
        bool(gt_max_assign_all),
        bool(match_low_quality),
        ignore_iof_thr,
        bool(ignore_wrt_candidates),
        max(box_counts),
        max(gt_counts),
    )
    if topk is not None:
        # Where K does not reach past the gts, the K-th largest is a gt's IoU 1.
        within_gts = _ext.host_values_to(
            device, [k > 0 and b <= 0 for k, b in zip(topk_counts, in_boxes)], torch.bool
        )
        kth = kth.masked_fill(within_gts, 1.0)
    label_parts = labels.split(box_counts) if gt_labels_list is not None else [None] * num_images
    results = []
    for i, (gi, mo) in enumerate(zip(gt_inds.split(box_counts), max_overlaps.split(box_counts))):
        stat = None if topk is None else kth[i]
        results.append(AssignResult(gt_counts[i], gi, mo, label_parts[i], stat))
    return results


def _or_empty(region: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0, like.shape[1])) if region is None else region


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _pack(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """The tensors of all images one after the other (no copy for one image of that dtype;
    strides are kept, which the kernels read for boxes)."""
    if len(tensors) == 1:
        return tensors[0].to(dtype)
    return torch.cat([t.to(dtype) for t in tensors])


def _offsets(counts: list[int], device: torch.device) -> Tensor:
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return _ext.host_values_to(device, starts, torch.int64)


def _output_shapes(boxes: Tensor, box_offsets: Tensor, with_labels: bool, with_topk: bool):
    total, num_images = boxes.shape[0], box_offsets.shape[0] - 1
    return total, (total if with_labels else 0), (num_images if with_topk else 0)


@torch.library.custom_op("dbf_ext::max_iou_assign", mutates_args=())
def _max_iou_assign_op(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor | None,
    ignore_boxes: Tensor | None,
    box_offsets: Tensor,
    gt_offsets: Tensor,
    ignore_offsets: Tensor | None,
    topk: Tensor | None,
    box_type: str,
    pos_iou_thr: float,
    neg_iou_lo: float,
    neg_iou_hi: float,
    min_pos_iou: float,
    gt_max_assign_all: bool,
    match_low_quality: bool,
    ignore_iof_thr: float,
    ignore_wrt_candidates: bool,
    max_boxes_per_image: int,
    max_gts_per_image: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed images; returns gt_inds, max_overlaps, labels (empty without gt_labels) and the
    k-th largest max overlap per image for k = topk[i] (NaN outside [1, boxes]; empty without
    topk)."""
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
    args.pos_iou_thr = pos_iou_thr
    args.neg_iou_lo = neg_iou_lo
    args.neg_iou_hi = neg_iou_hi
    args.min_pos_iou = min_pos_iou
    args.gt_max_assign_all = gt_max_assign_all
    args.match_low_quality = match_low_quality
    args.ignore_iof_thr = ignore_iof_thr
    args.ignore_wrt_candidates = ignore_wrt_candidates
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
        if match_low_quality and not gt_max_assign_all:
            gt_argmax_box = torch.full((total_gts,), _INT64_MAX, dtype=torch.int64, device=device)
            args.gt_argmax_box = gt_argmax_box.data_ptr()
    _ext.launch("max_iou_assign", device, args)
    return gt_inds, max_overlaps, labels, kth


@_max_iou_assign_op.register_fake
def _(boxes, gt_boxes, gt_labels, ignore_boxes, box_offsets, gt_offsets, ignore_offsets, topk,
      *options):
    total, label_count, topk_count = _output_shapes(
        boxes, box_offsets, gt_labels is not None, topk is not None
    )
    return (
        boxes.new_empty(total, dtype=torch.int64),
        boxes.new_empty(total),
        boxes.new_empty(label_count, dtype=torch.int64),
        boxes.new_empty(topk_count),
    )
