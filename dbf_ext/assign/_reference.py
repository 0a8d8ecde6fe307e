"""Plain torch reference of the MaxIoU assignment: mmdetection's ``MaxIoUAssigner.assign`` and
``assign_wrt_overlaps`` written out on the dense ``(G, N)`` overlap matrix. Used by the tests as
an independent second opinion (it shares no code with the kernels: the IoU comes from
torchvision's ``box_iou`` or the separate ``box_iou_rotated`` operator) and by the benchmarks as
the "dense" peer. Memory grows as G x N: not meant for production use.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from dbf_ext.assign import AssignResult, MaxIoUAssignOptions
from dbf_ext.ops import box_iou_rotated


def dense_overlaps(boxes1: Tensor, boxes2: Tensor, box_type: str, mode: str = "iou") -> Tensor:
    """``(len(boxes1), len(boxes2))`` IoU, or iof over ``boxes1``, as mmdetection computes them
    (axis-aligned: areas without +1, denominators at least 1e-6)."""
    if box_type == "obb":
        return box_iou_rotated(boxes1, boxes2, mode=mode)
    if mode == "iou":
        return torchvision.ops.box_iou(boxes1, boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    return wh[..., 0] * wh[..., 1] / area1[:, None].clamp(min=1e-6)


def max_iou_assign_reference(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor | None = None,
    *,
    ignore_boxes: Tensor | None = None,
    box_type: str = "hbb",
    **options,
) -> AssignResult:
    """Same contract as :func:`dbf_ext.assign.max_iou_assign` (without the statistic);
    ``options`` are the fields of :class:`~dbf_ext.assign.MaxIoUAssignOptions`."""
    options = MaxIoUAssignOptions(**options)
    overlaps = dense_overlaps(gt_boxes, boxes, box_type)
    if (options.ignore_iof_thr > 0 and ignore_boxes is not None and ignore_boxes.numel() > 0
            and boxes.numel() > 0):
        if options.ignore_wrt_candidates:
            ignore_max = dense_overlaps(boxes, ignore_boxes, box_type, "iof").max(dim=1).values
        else:
            ignore_max = dense_overlaps(ignore_boxes, boxes, box_type, "iof").max(dim=0).values
        overlaps[:, ignore_max > options.ignore_iof_thr] = -1

    num_gts, num_boxes = overlaps.shape
    gt_inds = overlaps.new_full((num_boxes,), -1, dtype=torch.long)
    if num_gts == 0 or num_boxes == 0:
        if num_gts == 0:
            gt_inds[:] = 0
        labels = None if gt_labels is None else torch.full_like(gt_inds, -1)
        return AssignResult(num_gts, gt_inds, overlaps.new_zeros((num_boxes,)), labels)

    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
    lo, hi = options.neg_iou_thr
    gt_inds[(max_overlaps >= lo) & (max_overlaps < hi)] = 0
    positive = max_overlaps >= options.pos_iou_thr
    gt_inds[positive] = argmax_overlaps[positive] + 1
    if options.match_low_quality:
        for g in range(num_gts):
            if gt_max_overlaps[g] >= options.min_pos_iou:
                if options.gt_max_assign_all:
                    gt_inds[overlaps[g, :] == gt_max_overlaps[g]] = g + 1
                else:
                    gt_inds[gt_argmax_overlaps[g]] = g + 1
    labels = None
    if gt_labels is not None:
        labels = torch.full_like(gt_inds, -1)
        positive = gt_inds > 0
        labels[positive] = gt_labels[gt_inds[positive] - 1].to(torch.long)
    return AssignResult(num_gts, gt_inds, max_overlaps, labels)
