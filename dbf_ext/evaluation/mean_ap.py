"""Mean average precision for rotated (``"obb"``) and axis-aligned (``"hbb"``) boxes.

The semantics are those of the DOTA devkit and mmrotate's ``eval_rbbox_map``:

* per class and image, detections are taken in order of decreasing score (a stable sort: equal
  scores keep their input order, where mmrotate's quicksort leaves it unspecified) and each is
  compared with its best-overlapping ground truth among the normal *and* ignored (difficult)
  ones of that class (ties: the first, normal ones before ignored ones);
* IoU < ``iou_thr`` → false positive; the best is an ignored object → neither (the detection
  does not count); the best is already matched → false positive; otherwise true positive;
* detections of all images are ranked by score (stable, images in order) for the
  precision / recall curve; recall divides by the number of normal ground truths;
* AP is the VOC07 11-point mean (thresholds ``i * 0.1`` in float64, so a recall of exactly 0.3
  does not reach the threshold 0.30000000000000004 — as the DOTA devkit and mmdetection) or the
  area under the interpolated (monotone) precision curve;
* the mean is over classes with at least one normal ground truth; a class without any has
  ``ap = 0`` in ``per_class`` and is left out of the mean (mmdetection / mmrotate).

Rotated IoU is :func:`dbf_ext.ops.box_iou_rotated` in float64 (mmrotate uses float32);
axis-aligned IoU follows mmdetection (no ``+ 1`` on widths).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dbf_ext.data.dota import box_dim

_ELEVEN_RECALL_THRESHOLDS = np.arange(11) * 0.1


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array or tensor, got {type(value).__name__}") from None


def _as_rows(value: Any, columns: int, name: str) -> np.ndarray:
    """An ``(n, columns)`` float64 array; an empty input of any shape is ``(0, columns)``."""
    array = _as_array(value, name)
    if array.size == 0:
        return array.reshape(0, columns)
    if array.ndim != 2 or array.shape[1] != columns:
        raise ValueError(f"{name} must have shape (n, {columns}), got {array.shape}")
    return array


def _as_labels(value: Any, count: int, num_classes: int, name: str) -> np.ndarray:
    array = _as_array(value, name).reshape(-1)
    if array.shape != (count,):
        raise ValueError(f"{name} must have {count} entries (one per box), got {array.shape[0]}")
    if not np.all((array == np.round(array)) & (array >= 0) & (array < num_classes)):
        raise ValueError(f"{name} must be class indices in [0, {num_classes}), got {array.tolist()}")
    return array.astype(np.int64)


def box_iou_hbb(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """``(N, M)`` IoU of axis-aligned boxes ``x1, y1, x2, y2`` (mmdetection: no ``+ 1``).

    Boxes with zero area overlap nothing (IoU 0, never NaN).
    """
    b1, b2 = boxes1[:, None, :], boxes2[None, :, :]
    inter_w = np.clip(np.minimum(b1[..., 2], b2[..., 2]) - np.maximum(b1[..., 0], b2[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(b1[..., 3], b2[..., 3]) - np.maximum(b1[..., 1], b2[..., 1]), 0, None)
    inter = inter_w * inter_h
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    union = area1 + area2 - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _box_iou(boxes1: np.ndarray, boxes2: np.ndarray, box_type: str) -> np.ndarray:
    if box_type == "hbb":
        return box_iou_hbb(boxes1, boxes2)
    from dbf_ext.ops import box_iou_rotated  # the compiled extension is needed only here

    return box_iou_rotated(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()


def _match_image(
    dets: np.ndarray, gts: np.ndarray, ignored: np.ndarray, iou_thr: float, box_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP flags ``(k,)`` of one image's detections ``(k, D + 1)`` of one class."""
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    if len(dets) == 0:
        return tp, fp
    all_gts = np.concatenate((gts, ignored))
    if len(all_gts) == 0:
        fp[:] = 1
        return tp, fp
    is_ignored = np.arange(len(all_gts)) >= len(gts)
    ious = _box_iou(dets[:, :-1], all_gts, box_type)
    best_gt = ious.argmax(axis=1)
    best_iou = ious[np.arange(len(dets)), best_gt]
    matched = np.zeros(len(all_gts), dtype=bool)
    for d in np.argsort(-dets[:, -1], kind="stable"):
        gt = best_gt[d]
        if best_iou[d] < iou_thr or (matched[gt] and not is_ignored[gt]):
            fp[d] = 1
        elif not is_ignored[gt]:
            matched[gt] = True
            tp[d] = 1
    return tp, fp


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP of a precision / recall curve (``(n,)`` each, detections in ranking order).

    ``use_07_metric``: the mean over recall thresholds ``0, 0.1, ..., 1`` of the best precision
    at a recall ≥ the threshold (0 when none). Otherwise the area under the curve after making
    precision monotone (each point takes the best precision at any higher recall).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        best = [precision[recall >= t].max(initial=0.0) for t in _ELEVEN_RECALL_THRESHOLDS]
        return float(np.mean(best))
    recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.maximum.accumulate(np.concatenate(([0.0], precision, [0.0]))[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def eval_map(
    det_results: Sequence[Sequence[Any]],
    annotations: Sequence[Mapping[str, Any]],
    iou_thr: float = 0.5,
    box_type: str = "obb",
    use_07_metric: bool = True,
) -> tuple[float, list[dict[str, Any]]]:
    """Mean AP of detections over a set of images (mmrotate's ``eval_rbbox_map`` formats).

    Args:
        det_results: ``det_results[image][class]``: an array ``(k, 6)`` = ``(cx, cy, w, h,
            theta, score)`` for ``"obb"`` or ``(k, 5)`` = ``(x1, y1, x2, y2, score)`` for
            ``"hbb"``; every image has an entry for every class (empty arrays allowed).
        annotations: ``annotations[image]`` with ``bboxes`` ``(g, 5 | 4)``, ``labels`` ``(g,)``
            0-based class indices and optionally ``bboxes_ignore``, ``labels_ignore``
            (difficult objects: detections matching them neither help nor hurt).
        iou_thr: a detection matches a ground truth at IoU ≥ ``iou_thr``.
        box_type: ``"obb"`` (rotated, radians, clockwise; see docs/design.md) or ``"hbb"``.
        use_07_metric: VOC07 11-point AP (DOTA's default) or area under the curve.

    Numpy arrays, tensors (any device) and nested lists are accepted.

    Returns:
        ``(mean_ap, per_class)``: ``mean_ap`` over classes with ``num_gts > 0`` (0.0 when none);
        ``per_class[c]`` a dict with ``ap`` (float), ``num_gts`` (normal ground truths),
        ``num_dets``, ``recall`` and ``precision`` (float64 ``(num_dets,)``, in ranking order).
    """
    dim = box_dim(box_type)
    if not 0 < iou_thr <= 1:
        raise ValueError(f"iou_thr must be in (0, 1], got {iou_thr}")
    if len(det_results) != len(annotations):
        raise ValueError(f"got detections for {len(det_results)} images and annotations for {len(annotations)}")
    if len(det_results) == 0:
        raise ValueError("eval_map needs at least one image")
    num_classes = len(det_results[0])
    dets = []  # dets[image][class]: (k, dim + 1)
    for i, per_class in enumerate(det_results):
        if len(per_class) != num_classes:
            raise ValueError(f"det_results[{i}] has {len(per_class)} classes, det_results[0] has {num_classes}")
        dets.append([_as_rows(d, dim + 1, f"det_results[{i}][{c}]") for c, d in enumerate(per_class)])
        for c, class_dets in enumerate(dets[-1]):
            if not np.all(np.isfinite(class_dets[:, -1])):
                raise ValueError(f"det_results[{i}][{c}] has non-finite scores")
    gts = [_split_annotation(ann, dim, num_classes, i) for i, ann in enumerate(annotations)]

    per_class = []
    for c in range(num_classes):
        flags = [
            _match_image(d[c], g["bboxes"][g["labels"] == c], g["bboxes_ignore"][g["labels_ignore"] == c],
                         iou_thr, box_type)
            for d, g in zip(dets, gts)
        ]
        scores = np.concatenate([d[c][:, -1] for d in dets])
        order = np.argsort(-scores, kind="stable")
        tp = np.cumsum(np.concatenate([f[0] for f in flags])[order])
        fp = np.cumsum(np.concatenate([f[1] for f in flags])[order])
        num_gts = int(sum(np.count_nonzero(g["labels"] == c) for g in gts))
        recall = tp / num_gts if num_gts else np.zeros_like(tp)
        counted = tp + fp  # detections matched to an ignored object count in neither
        precision = np.divide(tp, counted, out=np.zeros_like(tp), where=counted > 0)
        per_class.append({
            "ap": average_precision(recall, precision, use_07_metric) if num_gts else 0.0,
            "num_gts": num_gts,
            "num_dets": len(scores),
            "recall": recall,
            "precision": precision,
        })
    aps = [result["ap"] for result in per_class if result["num_gts"] > 0]
    return (float(np.mean(aps)) if aps else 0.0), per_class


def _split_annotation(ann: Mapping[str, Any], dim: int, num_classes: int, index: int) -> dict[str, np.ndarray]:
    """Checked float64 boxes and int64 labels of one image's annotation dict."""
    if not isinstance(ann, Mapping) or "bboxes" not in ann or "labels" not in ann:
        raise ValueError(f"annotations[{index}] must be a dict with 'bboxes' and 'labels'")
    out = {}
    for boxes_key, labels_key in (("bboxes", "labels"), ("bboxes_ignore", "labels_ignore")):
        boxes = _as_rows(ann.get(boxes_key, ()), dim, f"annotations[{index}][{boxes_key!r}]")
        out[boxes_key] = boxes
        out[labels_key] = _as_labels(ann.get(labels_key, ()), len(boxes), num_classes,
                                     f"annotations[{index}][{labels_key!r}]")
    return out


def detections_by_class(
    boxes: Any, scores: Any, labels: Any, num_classes: int, *, label_offset: int = 1
) -> list[np.ndarray]:
    """One image's flat detections -> the per-class arrays of :func:`eval_map`.

    Args:
        boxes: ``(k, 5)`` rotated or ``(k, 4)`` axis-aligned boxes.
        scores: ``(k,)``. labels: ``(k,)`` integer labels; ``labels - label_offset`` is the
            class index (torchvision detectors: label 0 is the background, so offset 1).
        num_classes: number of object classes (background not counted).

    Returns:
        ``num_classes`` float64 arrays ``(k_c, D + 1)`` = box + score, in input order.
    """
    boxes = _as_array(boxes, "boxes")
    boxes = boxes.reshape(0, 5) if boxes.size == 0 and boxes.ndim < 2 else boxes
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
        raise ValueError(f"boxes must have shape (k, 5) or (k, 4), got {boxes.shape}")
    scores = _as_array(scores, "scores").reshape(-1)
    if scores.shape != (len(boxes),):
        raise ValueError(f"got {len(boxes)} boxes and {scores.shape[0]} scores")
    classes = _as_labels(_as_array(labels, "labels").reshape(-1) - label_offset, len(boxes), num_classes,
                         f"labels - {label_offset}")
    rows = np.concatenate((boxes, scores[:, None]), axis=1)
    return [rows[classes == c] for c in range(num_classes)]


def evaluate_detections(
    predictions: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    dataset: Any,
    iou_thr: float = 0.5,
    use_07_metric: bool = True,
) -> tuple[float, list[dict[str, Any]]]:
    """mAP of a detector's outputs on a :class:`~dbf_ext.data.DotaDetectionDataset`.

    Args:
        predictions: torchvision-style outputs, dicts with ``boxes`` (in the dataset's
            ``box_type``), ``scores`` and ``labels`` (1-based, 0 = background) — either a
            sequence in dataset order, or a mapping from image id (``target["image_id"]``) to
            output, where a missing image has no detections.
        dataset: anything with ``image_ids``, ``classes``, ``box_type`` and
            ``eval_annotations()`` (difficult objects are ignored).

    Returns:
        :func:`eval_map`'s ``(mean_ap, per_class)``.
    """
    image_ids = list(dataset.image_ids)
    if isinstance(predictions, Mapping):
        unknown = sorted(set(predictions) - set(image_ids))
        if unknown:
            raise ValueError(f"predictions for images not in the dataset: {unknown[:5]}")
        empty = {"boxes": np.zeros((0, box_dim(dataset.box_type))), "scores": (), "labels": ()}
        predictions = [predictions.get(image_id, empty) for image_id in image_ids]
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} dataset images")
    num_classes = len(dataset.classes)
    det_results = [
        detections_by_class(p["boxes"], p["scores"], p["labels"], num_classes) for p in predictions
    ]
    return eval_map(det_results, dataset.eval_annotations(), iou_thr, dataset.box_type, use_07_metric)
