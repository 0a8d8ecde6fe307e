"""Rotated non-maximum suppression (CPU and CUDA kernels in csrc/nms_rotated/)."""

from __future__ import annotations

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import (
    check_finite_number,
    check_float_dtype,
    check_iou_threshold,
    check_labels,
    check_limit,
    check_rotated_boxes,
    check_same_device,
    check_tensor,
)

# Bound of the CUDA mask scratch. The upper triangle of the mask takes N^2 / 16 bytes (625 MB
# for N = 100k); beyond this bound it is computed and reduced in chunks of rows, on the device.
_MASK_BUDGET_BYTES = 256 << 20

_NAN_MESSAGE = "{}: boxes and scores must not contain NaN"


def nms_rotated(
    boxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None = None
) -> Tensor:
    """Greedy non-maximum suppression of rotated boxes, optionally per class.

    Boxes are visited by decreasing score; a box is suppressed when its IoU with a box already
    kept is **strictly greater** than ``iou_threshold`` (the rule of torchvision's ``nms``; the
    same on CPU and CUDA). The IoU is :func:`dbf_ext.ops.box_iou_rotated`'s.

    Args:
        boxes: ``(N, 5)`` boxes ``(cx, cy, w, h, theta)``, theta in radians, clockwise
            convention (mmcv / mmrotate; for counter-clockwise angles pass ``-theta``).
            float16, bfloat16 and float32 are computed in float32, float64 in float64.
        scores: ``(N,)`` floating scores, any floating dtype.
        iou_threshold: finite, ``>= 0``. ``0`` suppresses every overlapping box; ``>= 1``
            suppresses nothing (an IoU never exceeds 1): the boxes are returned by decreasing
            score at once, without running the kernel.
        labels: optional ``(N,)`` integer class of each box: boxes of different labels never
            suppress each other (exact per-class NMS, not the coordinate-offset trick).

    Returns:
        ``keep``: ``(K,)`` int64 indices into ``boxes`` of the kept boxes, by decreasing
        score; equal scores are ordered (and suppress each other) by increasing index.

    Invalid boxes (a non-finite value, ``w <= 0``, ``h <= 0`` or an area below the smallest
    normal number; see ``box_iou_rotated``) have IoU 0 with every box, so they are always kept
    and suppress nothing. NaN in ``boxes`` or ``scores`` raises ``ValueError``; on CUDA that
    check is read back together with the number of kept boxes, the operator's one host
    synchronisation.
    """
    _check_nms_inputs(boxes, scores, labels)
    threshold = check_iou_threshold("iou_threshold", iou_threshold)
    # Under torch.compile the operator runs instead (it keeps every box too): the host branch
    # on the NaN check would break the graph.
    if threshold >= 1 and not torch.compiler.is_compiling():
        return _keep_all(boxes, scores)
    return _nms_rotated_op(boxes, scores, threshold, labels)


def _keep_all(boxes: Tensor, scores: Tensor) -> Tensor:
    """NMS when nothing can be suppressed (suppression needs IoU > threshold >= 1, and an IoU
    never exceeds 1): every box, by decreasing score, ties by index, without the kernel."""
    if _has_nan(boxes, scores):
        raise ValueError(_NAN_MESSAGE.format("nms_rotated"))
    return torch.sort(scores, descending=True, stable=True).indices


def batched_nms_rotated(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float
) -> Tensor:
    """Per-class :func:`nms_rotated`: boxes of different ``labels`` never suppress each other.

    Same arguments and result as ``nms_rotated(boxes, scores, iou_threshold, labels)``, with
    ``labels`` (an ``(N,)`` integer tensor) required.
    """
    check_tensor("labels", labels)
    return nms_rotated(boxes, scores, iou_threshold, labels)


def multiclass_nms_rotated(
    boxes: Tensor,
    scores: Tensor,
    score_thr: float,
    iou_thr: float,
    max_num: int = -1,
    nms_pre: int = -1,
) -> tuple[Tensor, Tensor]:
    """Post-processing of a rotated detector: score threshold, per-class NMS, top detections.

    The operation of mmrotate's ``multiclass_nms_rotated``, with these differences:

    * ``scores`` holds the foreground classes only. mmrotate drops the last column as
      background (``scores[:, :-1]``); here every column is a class, so pass
      ``scores[:, :-1]`` for a softmax head whose last column is background.
    * Classes are separated exactly (labels compared in the kernel), not by shifting box
      centres by ``label * (max coordinate + 1)``, which loses float precision for large
      coordinates and fails for negative ones.
    * NaN scores or boxes raise ``ValueError`` instead of being dropped by the threshold.
    * Equal scores are ordered deterministically (by box index, then class).

    Args:
        boxes: ``(N, 5)`` boxes shared by all classes, or ``(N, C, 5)`` class-specific boxes;
            ``(cx, cy, w, h, theta)`` as in :func:`nms_rotated`.
        scores: ``(N, C)`` scores of the ``C`` foreground classes (no background column).
        score_thr: candidates are the (box, class) pairs with ``score > score_thr``.
        iou_thr: NMS threshold within each class (suppression when IoU > ``iou_thr``).
        max_num: at most this many detections (the highest-scored) are returned; ``-1``: all.
        nms_pre: before NMS, at most this many candidates per class (the highest-scored) are
            kept; ``-1``: all.

    Returns:
        ``(dets, labels)``: ``dets`` ``(K, 6)`` = ``(cx, cy, w, h, theta, score)`` in the
        promoted dtype of ``boxes`` and ``scores``, sorted by decreasing score (ties by box
        index, then class); ``labels`` ``(K,)`` int64 class indices in ``[0, C)``.
    """
    check_tensor("scores", scores)
    check_float_dtype("scores", scores)
    if scores.dim() != 2:
        raise ValueError(
            f"scores must have shape (N, C) (foreground classes only), got {tuple(scores.shape)}"
        )
    num_boxes, num_classes = scores.shape
    check_tensor("boxes", boxes)
    class_specific = boxes.dim() == 3
    if class_specific:
        check_float_dtype("boxes", boxes)
        if boxes.shape != (num_boxes, num_classes, 5):
            raise ValueError(
                f"class-specific boxes must have shape (N, C, 5) = {(num_boxes, num_classes, 5)}"
                f" to match scores, got {tuple(boxes.shape)}"
            )
    else:
        check_rotated_boxes("boxes", boxes)
        if boxes.shape[0] != num_boxes:
            raise ValueError(
                f"boxes {tuple(boxes.shape)} and scores {tuple(scores.shape)} must have the same N"
            )
    check_same_device(boxes=boxes, scores=scores)
    score_thr = check_finite_number("score_thr", score_thr)
    iou_thr = check_iou_threshold("iou_thr", iou_thr)
    max_num = check_limit("max_num", max_num)
    nms_pre = check_limit("nms_pre", nms_pre)
    if _has_nan(boxes, scores):
        raise ValueError(_NAN_MESSAGE.format("multiclass_nms_rotated"))

    flat_scores = scores.reshape(-1)
    # Flat indices box * C + class, increasing: the order that breaks score ties.
    candidates = torch.nonzero(flat_scores > score_thr).squeeze(1)
    if nms_pre >= 0:
        candidates = candidates[
            _top_per_class(flat_scores[candidates], candidates % num_classes, num_classes, nms_pre)
        ]
    cand_scores = flat_scores[candidates]
    cand_labels = candidates % num_classes
    if class_specific:
        cand_boxes = boxes.reshape(-1, 5)[candidates]
    else:
        cand_boxes = boxes[candidates // num_classes]
    keep = nms_rotated(cand_boxes, cand_scores, iou_thr, cand_labels)
    if max_num >= 0:
        keep = keep[:max_num]
    dtype = torch.promote_types(boxes.dtype, scores.dtype)
    dets = torch.cat((cand_boxes[keep].to(dtype), cand_scores[keep, None].to(dtype)), dim=1)
    return dets, cand_labels[keep]


def _check_nms_inputs(boxes: Tensor, scores: Tensor, labels: Tensor | None) -> None:
    check_rotated_boxes("boxes", boxes)
    check_tensor("scores", scores)
    check_float_dtype("scores", scores)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(
            f"scores must have shape ({boxes.shape[0]},) (one per box), got {tuple(scores.shape)}"
        )
    if labels is None:
        check_same_device(boxes=boxes, scores=scores)
    else:
        check_labels("labels", labels, boxes.shape[0])
        check_same_device(boxes=boxes, scores=scores, labels=labels)


def _has_nan(*tensors: Tensor) -> Tensor:
    """A 0-dim bool tensor on the tensors' device (no host synchronisation by itself)."""
    flags = [torch.isnan(t).any() for t in tensors]
    return torch.stack(flags).any()


def _top_per_class(scores: Tensor, labels: Tensor, num_classes: int, k: int) -> Tensor:
    """Increasing positions of the ``k`` highest ``scores`` of each label (ties: lower position)."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    by_class = by_score[torch.sort(labels[by_score], stable=True).indices]
    sorted_labels = labels[by_class]
    counts = torch.bincount(sorted_labels, minlength=num_classes)
    class_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(by_class.shape[0], device=scores.device) - class_start[sorted_labels]
    return torch.sort(by_class[rank < k]).values


@torch.library.custom_op("dbf_ext::nms_rotated", mutates_args=())
def _nms_rotated_op(
    boxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None
) -> Tensor:
    num_boxes = boxes.shape[0]
    keep = torch.empty(num_boxes, dtype=torch.int64, device=boxes.device)
    if num_boxes == 0:
        return keep
    has_nan = _has_nan(boxes, scores)
    compute = _ext.compute_dtype(boxes.dtype)
    boxes = boxes.to(compute)
    order = torch.sort(scores, descending=True, stable=True).indices
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    args = (
        _ext.box_view(boxes),
        _ext.dtype_code(compute),
        order.data_ptr(),
        0 if labels is None else labels.data_ptr(),
        iou_threshold,
        keep.data_ptr(),
    )
    if boxes.device.type == "cuda":
        count = _nms_rotated_cuda(args, num_boxes, has_nan, boxes.device)
    else:
        if has_nan:
            raise ValueError(_NAN_MESSAGE.format("nms_rotated"))
        count = _ext.launch("nms_rotated", boxes.device, *args)
    return keep[:count]


def _nms_rotated_cuda(args: tuple, num_boxes: int, has_nan: Tensor, device) -> int:
    """Runs the CUDA kernels; returns the number of kept boxes (the one host sync)."""
    block = _ext.extension().NMS_BLOCK_BOXES
    row_blocks = -(-num_boxes // block)
    triangle_words = block * row_blocks * (row_blocks + 1) // 2
    mask_words = min(triangle_words, max(_MASK_BUDGET_BYTES // 8, block * row_blocks))
    mask = torch.empty(mask_words, dtype=torch.int64, device=device)
    removed = torch.zeros(row_blocks, dtype=torch.int64, device=device)
    status = torch.zeros(2, dtype=torch.int64, device=device)  # kept count, NaN found
    status[1:].copy_(has_nan.view(1))
    _ext.launch("nms_rotated", device, *args, cuda_args=(
        mask.data_ptr(), mask_words, removed.data_ptr(), status.data_ptr()))
    count, nan_found = status.tolist()
    if nan_found:
        raise ValueError(_NAN_MESSAGE.format("nms_rotated"))
    return count


@_nms_rotated_op.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None) -> Tensor:
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64)
