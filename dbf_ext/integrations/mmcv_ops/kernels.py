"""The functions of the ``mmcv._ext`` shim, with the call conventions of mmcv's C++ functions.

Each function takes the arguments mmcv's Python wrappers (``mmcv/ops/*.py``, identical in
mmcv 1.7 and 2.x) pass to the compiled function of the same name, positionally or by the
keyword names of mmcv's pybind11 bindings, and like the compiled function either returns its
result or writes it into an output tensor the wrapper allocated (``output``, ``ious``,
``grad_input``, ``dets``). The computation is dbf_ext's or torchvision's; where its result
differs from mmcv's kernel the function's docstring says how (the README lists them all).
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

from dbf_ext._validation import (
    check_float_dtype,
    check_horizontal_boxes,
    check_same_device,
    check_tensor,
)

__all__ = [
    "box_iou_rotated",
    "get_compiler_version",
    "get_compiling_cuda_version",
    "nms",
    "nms_rotated",
    "roi_align_backward",
    "roi_align_forward",
    "roi_align_rotated_backward",
    "roi_align_rotated_forward",
    "sigmoid_focal_loss_backward",
    "sigmoid_focal_loss_forward",
    "softnms",
]


def _check_output(name: str, output: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    """An output tensor the caller allocated: floating, on ``like``'s device, with ``shape``
    or as many elements (mmcv passes some outputs flat)."""
    check_tensor(name, output)
    if tuple(output.shape) != tuple(shape) and output.numel() != math.prod(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(output.shape)}")
    check_float_dtype(name, output)
    if output.device != like.device:
        raise ValueError(f"{name} is on {output.device}, the inputs on {like.device}")


def _check_no_nan(op: str, *tensors: Tensor) -> None:
    if any(bool(torch.isnan(t).any()) for t in tensors if t.is_floating_point()):
        raise ValueError(f"{op}: boxes and scores must not contain NaN")


def _check_scores(boxes: Tensor, scores: Tensor) -> None:
    check_tensor("scores", scores)
    check_float_dtype("scores", scores)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(
            f"scores must have shape ({boxes.shape[0]},) (one per box), got {tuple(scores.shape)}"
        )
    check_same_device(boxes=boxes, scores=scores)


def _offset_corners(boxes: Tensor, offset: int) -> Tensor:
    """mmcv's ``offset`` (0 or 1) is the legacy ``+1`` in ``w = x2 - x1 + offset``: the IoU of
    the boxes with ``x2, y2`` moved by ``offset`` without it."""
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1, got {offset!r}")
    if offset == 0:
        return boxes
    return boxes + boxes.new_tensor([0.0, 0.0, offset, offset])


# ---- axis-aligned NMS ----

def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, offset: int) -> Tensor:
    """mmcv's ``nms``: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``, ``(N,)`` scores -> int64 indices
    of the kept boxes by decreasing score (torchvision's ``nms``; the rule is mmcv's: a box is
    suppressed when its IoU with a kept box is > ``iou_threshold``). NaN raises ValueError."""
    check_horizontal_boxes("boxes", boxes)
    _check_scores(boxes, scores)
    _check_no_nan("nms", boxes, scores)
    return torchvision.ops.nms(
        _offset_corners(boxes, offset), scores.to(boxes.dtype), float(iou_threshold)
    )


_SOFT_NMS_METHODS = {0: "naive", 1: "linear", 2: "gaussian"}


def softnms(boxes: Tensor, scores: Tensor, dets: Tensor, iou_threshold: float, sigma: float,
            min_score: float, method: int, offset: int) -> Tensor:
    """mmcv's ``softnms`` (Bodla et al. 2017), on CPU tensors as mmcv's wrapper passes them.

    Repeatedly takes the highest-scored remaining box, writes it and its current score into the
    next row of ``dets`` ``(N, 5)``, and decays the scores of the others by their IoU ``o`` with
    it: ``method`` 0 (naive) zeroes them when ``o >= iou_threshold``, 1 (linear) multiplies by
    ``1 - o`` when ``o >= iou_threshold``, 2 (gaussian) by ``exp(-o^2 / sigma)``. Boxes whose
    score falls below ``min_score`` are dropped (the first box is always kept, as in mmcv).

    Returns the int64 original indices of the kept boxes, in the order of ``dets``' rows.
    Difference from mmcv: equal scores are taken by increasing index (mmcv's order depends on
    its in-place swaps).
    """
    check_horizontal_boxes("boxes", boxes)
    _check_scores(boxes, scores)
    _check_no_nan("softnms", boxes, scores)
    if method not in _SOFT_NMS_METHODS:
        raise ValueError(f"method must be 0 (naive), 1 (linear) or 2 (gaussian), got {method!r}")
    num_boxes = boxes.shape[0]
    _check_output("dets", dets, (num_boxes, 5), boxes)
    corners = _offset_corners(boxes, offset)
    remaining = scores.clone()
    alive = torch.ones(num_boxes, dtype=torch.bool, device=boxes.device)
    kept: list[int] = []
    while bool(alive.any()):
        candidates = torch.nonzero(alive).squeeze(1)
        # argmax returns the first maximum: ties go to the lowest index
        best = int(candidates[torch.argmax(remaining[candidates])])
        dets[len(kept), :4] = boxes[best]
        dets[len(kept), 4] = remaining[best]
        kept.append(best)
        alive[best] = False
        others = torch.nonzero(alive).squeeze(1)
        if others.numel() == 0:
            break
        overlaps = torchvision.ops.box_iou(corners[best : best + 1], corners[others])[0]
        if method == 0:
            weight = torch.where(overlaps >= iou_threshold, 0.0, 1.0)
        elif method == 1:
            weight = torch.where(overlaps >= iou_threshold, 1.0 - overlaps, 1.0)
        else:
            weight = torch.exp(-(overlaps * overlaps) / sigma)
        remaining[others] *= weight.to(remaining.dtype)
        alive[others] = remaining[others] >= min_score
    return torch.tensor(kept, dtype=torch.int64, device=boxes.device)


# ---- rotated boxes ----

def box_iou_rotated(boxes1: Tensor, boxes2: Tensor, ious: Tensor, mode_flag: int,
                    aligned: bool) -> None:
    """mmcv's ``box_iou_rotated``: writes the IoU (``mode_flag`` 0) or IoF (1) of ``(N, 5)`` and
    ``(M, 5)`` clockwise boxes into ``ious`` (``N * M`` values, or ``N`` when ``aligned``).

    :func:`dbf_ext.ops.box_iou_rotated`: correct where mmcv's kernel is not (near-identical,
    very thin or far-away boxes); a box with ``w <= 0``, ``h <= 0`` or a non-finite value
    overlaps nothing (0), and every value is in ``[0, 1]``.
    """
    from dbf_ext.ops import box_iou_rotated as dbf_box_iou_rotated

    if mode_flag not in (0, 1):
        raise ValueError(f"mode_flag must be 0 (iou) or 1 (iof), got {mode_flag!r}")
    overlaps = dbf_box_iou_rotated(boxes1, boxes2, mode="iof" if mode_flag else "iou",
                                   aligned=bool(aligned))
    _check_output("ious", ious, tuple(overlaps.shape), boxes1)
    ious.copy_(overlaps.reshape(ious.shape))


def nms_rotated(dets: Tensor, scores: Tensor, order: Tensor, dets_sorted: Tensor, labels: Tensor,
                iou_threshold: float, multi_label: bool) -> Tensor:
    """mmcv's ``nms_rotated``: int64 indices of the kept boxes of ``dets`` by decreasing score.

    ``dets`` is ``(N, 5)`` clockwise boxes, or ``(N, 6)`` with the label appended when
    ``multi_label``; ``labels`` is then the ``(N,)`` labels. ``order`` and ``dets_sorted`` (the
    score order mmcv's wrapper precomputes) are not needed. :func:`dbf_ext.ops.nms_rotated`.

    Differences from mmcv: with ``multi_label`` boxes of different labels never suppress each
    other (mmcv's kernels ignore the labels); equal scores are ordered by index; NaN raises.
    """
    from dbf_ext.ops import nms_rotated as dbf_nms_rotated

    check_tensor("dets", dets)
    if dets.dim() != 2 or dets.shape[1] != (6 if multi_label else 5):
        raise ValueError(
            "dets must have shape (N, 5) = (cx, cy, w, h, theta), or (N, 6) with the label "
            f"appended when multi_label, got {tuple(dets.shape)} (multi_label={bool(multi_label)})"
        )
    box_labels = None
    if multi_label:
        check_tensor("labels", labels)
        box_labels = labels
        if labels.is_floating_point():
            if not bool(torch.equal(labels, labels.round())):
                raise ValueError("labels must be whole numbers (class indices)")
            box_labels = labels.to(torch.int64)
    return dbf_nms_rotated(dets[:, :5], scores, float(iou_threshold), box_labels)


# ---- RoIAlign (axis-aligned) ----

_POOL_MAX, _POOL_AVG = 0, 1


def _check_roi_align_mode(pool_mode: int) -> None:
    if pool_mode == _POOL_MAX:
        raise NotImplementedError(
            "mmcv.ops.RoIAlign(pool_mode='max') is not provided by dbf_ext's mmcv._ext shim "
            "(torchvision's roi_align averages); use pool_mode='avg', mmdet's default"
        )
    if pool_mode != _POOL_AVG:
        raise ValueError(f"pool_mode must be 0 (max) or 1 (avg), got {pool_mode!r}")


def roi_align_forward(input: Tensor, rois: Tensor, output: Tensor, argmax_y: Tensor,
                      argmax_x: Tensor, aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int, pool_mode: int,
                      aligned: bool) -> None:
    """mmcv's ``roi_align_forward`` (average mode): writes the ``(K, C, aligned_height,
    aligned_width)`` RoIAlign of ``input`` ``(B, C, H, W)`` over ``rois`` ``(K, 5)`` =
    ``(batch_index, x1, y1, x2, y2)`` into ``output``. torchvision's ``roi_align``, which has
    mmcv's semantics (same sampling grid, bounds and ``aligned`` half-pixel shift)."""
    _check_roi_align_mode(pool_mode)
    result = torchvision.ops.roi_align(input, rois.to(input.dtype), (aligned_height, aligned_width),
                                       spatial_scale, sampling_ratio, bool(aligned))
    _check_output("output", output, tuple(result.shape), input)
    output.copy_(result)


def roi_align_backward(grad_output: Tensor, rois: Tensor, argmax_y: Tensor, argmax_x: Tensor,
                       grad_input: Tensor, aligned_height: int, aligned_width: int,
                       spatial_scale: float, sampling_ratio: int, pool_mode: int,
                       aligned: bool) -> None:
    """mmcv's ``roi_align_backward`` (average mode): writes the gradient with respect to the
    ``(B, C, H, W)`` input into ``grad_input`` (torchvision's RoIAlign backward kernel)."""
    _check_roi_align_mode(pool_mode)
    check_tensor("grad_input", grad_input)
    batch, channels, height, width = grad_input.shape
    result = torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois.to(grad_output.dtype), float(spatial_scale),
        aligned_height, aligned_width, batch, channels, height, width, int(sampling_ratio),
        bool(aligned),
    )
    grad_input.copy_(result)


# ---- RoIAlignRotated ----

def roi_align_rotated_forward(input: Tensor, rois: Tensor, output: Tensor, pooled_height: int,
                              pooled_width: int, spatial_scale: float, sampling_ratio: int,
                              aligned: bool, clockwise: bool) -> None:
    """mmcv's ``roi_align_rotated_forward``: writes the ``(K, C, pooled_height, pooled_width)``
    RoIAlignRotated of ``input`` ``(B, C, H, W)`` over ``rois`` ``(K, 6)`` =
    ``(batch_index, cx, cy, w, h, theta)`` into ``output``. mmcv's ``clockwise`` has
    :func:`dbf_ext.ops.roi_align_rotated`'s meaning (``True``: the ``w`` axis points along
    ``(cos theta, sin theta)`` in image coordinates), so it is passed through."""
    from dbf_ext.ops import roi_align_rotated as dbf_roi_align_rotated

    result = dbf_roi_align_rotated(input, rois, (pooled_height, pooled_width), spatial_scale,
                                   sampling_ratio, bool(aligned), bool(clockwise))
    _check_output("output", output, tuple(result.shape), input)
    output.copy_(result)


def roi_align_rotated_backward(grad_output: Tensor, rois: Tensor, grad_input: Tensor,
                               pooled_height: int, pooled_width: int, spatial_scale: float,
                               sampling_ratio: int, aligned: bool, clockwise: bool) -> None:
    """mmcv's ``roi_align_rotated_backward``: writes the gradient with respect to the
    ``(B, C, H, W)`` input into ``grad_input``. (mmcv's binding names its first three arguments
    ``rois, grad_input, grad_output``, but its C++ function and every caller pass them in this
    order, positionally.)

    The gradient of a RoIAlign does not depend on the feature values (it is linear in them), so
    it is the backward pass of :func:`dbf_ext.ops.roi_align_rotated` taken at zero features.
    """
    from dbf_ext.ops import roi_align_rotated as dbf_roi_align_rotated

    check_tensor("grad_input", grad_input)
    features = torch.zeros_like(grad_input, requires_grad=True)
    with torch.enable_grad():
        pooled = dbf_roi_align_rotated(features, rois, (pooled_height, pooled_width),
                                       spatial_scale, sampling_ratio, bool(aligned),
                                       bool(clockwise))
        (gradient,) = torch.autograd.grad(pooled, features, grad_output)
    grad_input.copy_(gradient)


# ---- sigmoid focal loss (what mmdet's FocalLoss calls on CUDA tensors) ----

def _focal_terms(input: Tensor, target: Tensor, weight: Tensor) -> tuple:
    check_tensor("input", input)
    check_float_dtype("input", input)
    if input.dim() != 2:
        raise ValueError(f"input must have shape (N, C) (logits per class), got {tuple(input.shape)}")
    check_tensor("target", target)
    if target.shape != (input.shape[0],) or target.is_floating_point():
        raise ValueError(f"target must be (N,) = ({input.shape[0]},) class indices (C means "
                         f"background), got {tuple(target.shape)} {target.dtype}")
    num_classes = input.shape[1]
    classes = torch.arange(num_classes, device=input.device)
    positive = target[:, None] == classes[None, :]
    probability = torch.sigmoid(input)
    tiny = torch.finfo(input.dtype).tiny  # mmcv's FLT_MIN guard of the logarithms
    log_p = torch.log(probability.clamp(min=tiny))
    log_not_p = torch.log((1 - probability).clamp(min=tiny))
    if weight.numel() == 0:
        row_weight = None
    else:
        if weight.shape != (num_classes,):
            raise ValueError(f"weight must be empty or ({num_classes},), got {tuple(weight.shape)}")
        # mmcv reads weight[target] also for background rows (target == C), past the end of
        # the tensor; here they get weight 1.
        is_class = (target >= 0) & (target < num_classes)
        row_weight = torch.where(is_class, weight[target.clamp(0, num_classes - 1)],
                                 torch.ones((), dtype=weight.dtype, device=weight.device))
    return positive, probability, log_p, log_not_p, row_weight


def sigmoid_focal_loss_forward(input: Tensor, target: Tensor, weight: Tensor, output: Tensor,
                               gamma: float, alpha: float) -> None:
    """mmcv's ``sigmoid_focal_loss_forward``: writes the elementwise ``(N, C)`` focal loss
    ``-alpha (1-p)^gamma log p`` (class ``c == target[n]``) or ``-(1-alpha) p^gamma log(1-p)``
    (other classes) of ``p = sigmoid(input)`` into ``output``, times ``weight[target[n]]``
    when ``weight`` is not empty. Plain torch, on any device."""
    positive, p, log_p, log_not_p, row_weight = _focal_terms(input, target, weight)
    loss = torch.where(positive, -alpha * (1 - p).pow(gamma) * log_p,
                       -(1 - alpha) * p.pow(gamma) * log_not_p)
    if row_weight is not None:
        loss = loss * row_weight[:, None]
    _check_output("output", output, tuple(loss.shape), input)
    output.copy_(loss)


def sigmoid_focal_loss_backward(input: Tensor, target: Tensor, weight: Tensor, grad_input: Tensor,
                                gamma: float, alpha: float) -> None:
    """mmcv's ``sigmoid_focal_loss_backward``: writes the derivative of each element of the
    forward's loss with respect to ``input`` into ``grad_input`` (mmcv's wrapper multiplies it
    by the incoming gradient)."""
    positive, p, log_p, log_not_p, row_weight = _focal_terms(input, target, weight)
    gradient = torch.where(
        positive,
        -alpha * (1 - p).pow(gamma) * (1 - p - gamma * p * log_p),
        -(1 - alpha) * p.pow(gamma) * (gamma * (1 - p) * log_not_p - p),
    )
    if row_weight is not None:
        gradient = gradient * row_weight[:, None]
    _check_output("grad_input", grad_input, tuple(gradient.shape), input)
    grad_input.copy_(gradient)


# ---- build information (mmcv's collect_env prints these) ----

def get_compiler_version() -> str:
    import dbf_ext

    return f"none: mmcv._ext is dbf_ext {dbf_ext.__version__}'s shim (no compiled mmcv ops)"


def get_compiling_cuda_version() -> str:
    return "none: mmcv._ext is dbf_ext's shim (no compiled mmcv ops)"
