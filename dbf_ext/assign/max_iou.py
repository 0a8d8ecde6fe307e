"""Fused MaxIoU label assignment (the operator in dbf_ext/ops/max_iou_assign.py).

mmdetection's ``MaxIoUAssigner`` (``assign`` with ``assign_wrt_overlaps``) for axis-aligned and
rotated boxes, without the ``(num_gts, num_boxes)`` overlap matrix: 200k anchors against 2000
gts need ~1.6 GB for that matrix in float32, and the dense argmax / equality passes read it
several times. Here each box meets its gts in one fused pass (on CPU only the gts near it,
through a spatial grid) and the extra memory is ``O(boxes + gts)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import (
    as_integer,
    check_choice,
    check_horizontal_boxes,
    check_labels,
    check_rotated_boxes,
    check_same_device,
)
from dbf_ext.ops.max_iou_assign import MaxIoUAssignOptions, max_iou_assign_op

if TYPE_CHECKING:
    from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController

_BOX_CHECKS = {"hbb": check_horizontal_boxes, "obb": check_rotated_boxes}


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
        ignore_iof_thr, ignore_wrt_candidates: as in mmdetection's MaxIoUAssigner; the fields
            of :class:`~dbf_ext.assign.MaxIoUAssignOptions` (``**dataclasses.asdict(options)``
            passes one).
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
    options = MaxIoUAssignOptions(
        pos_iou_thr=pos_iou_thr,
        neg_iou_thr=neg_iou_thr,
        min_pos_iou=min_pos_iou,
        gt_max_assign_all=gt_max_assign_all,
        match_low_quality=match_low_quality,
        ignore_iof_thr=ignore_iof_thr,
        ignore_wrt_candidates=ignore_wrt_candidates,
    )
    topk = None if return_topk_iou is None else as_integer("return_topk_iou", return_topk_iou, 1)
    use_ignore = options.ignore_iof_thr > 0 and ignore_boxes is not None
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
    gt_inds, max_overlaps, labels, kth = max_iou_assign_op(
        _pack(boxes_list, compute),
        _pack(gt_boxes_list, compute),
        None if gt_labels_list is None else _pack(gt_labels_list, torch.int64).contiguous(),
        _pack(ignore_list, compute) if use_ignore else None,
        _offsets(box_counts, device),
        _offsets(gt_counts, device),
        _offsets([r.shape[0] for r in ignore_list], device) if use_ignore else None,
        None if topk is None else _ext.host_values_to(device, in_boxes, torch.int64),
        box_type,
        options.op_values(),
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


def assign_proposals_with_gts(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    options: MaxIoUAssignOptions,
    box_type: str,
    controller: DynamicRCNNController | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The assignment of a two-stage detector's second stage, whose proposals end with the
    image's gt boxes (added as proposals, as mmdetection's samplers do).

    The proposals before the gts are assigned by :func:`batched_max_iou_assign` with
    ``options`` (one kernel call for the batch); each gt box is assigned to its own gt after
    them, so it never takes a low-quality match away from a real proposal. With a
    ``controller`` (Dynamic R-CNN) its IoU statistic is recorded
    (``return_topk_iou=controller.iou_topk``, the gts counted with IoU 1).

    Args:
        proposals: per image ``(N_i + G_i, 4)`` (``box_type="hbb"``) or ``(N_i + G_i, 5)``
            (``"obb"``) proposals, the last ``G_i`` rows the gt boxes.
        gt_boxes, gt_labels: per image ``(G_i, 4 | 5)`` boxes and ``(G_i,)`` integer labels.

    Returns:
        torchvision's ``(matched_idxs, labels)`` per image: ``matched_idxs`` ``(N_i + G_i,)``
        int64 the assigned gt (0 where not positive), ``labels`` ``(N_i + G_i,)`` int64 the
        gt's label for positives, ``0`` background, ``-1`` ignored.
    """
    real = [p[: p.shape[0] - g.shape[0]] for p, g in zip(proposals, gt_boxes)]
    results = batched_max_iou_assign(
        real,
        gt_boxes,
        gt_labels,
        **dataclasses.asdict(options),
        box_type=box_type,
        return_topk_iou=None if controller is None else controller.iou_topk,
        topk_with_gts=True,
    )
    if controller is not None:
        controller.record_iou([r.kth_largest_overlap for r in results])
    matched_idxs, labels = [], []
    for result, image_labels in zip(results, gt_labels):
        own = torch.arange(result.num_gts, device=result.gt_inds.device)
        matched_idxs.append(torch.cat(((result.gt_inds - 1).clamp(min=0), own)))
        box_labels = torch.where(result.gt_inds == 0, 0, result.labels)
        labels.append(torch.cat((box_labels, image_labels.to(torch.int64))))
    return matched_idxs, labels
