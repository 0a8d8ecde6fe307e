"""Detections of patches mapped back to their large image and merged by per-class NMS."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from dbf_ext.data.dota import box_dim
from dbf_ext.data.split import parse_patch_name

#: IoU above which a detection is suppressed by a higher-scored one of its class when merging
#: (mmrotate's ``iou_thr`` of its DOTA merge and ``merge_iou_thr`` of its huge-image demo).
MERGE_IOU_THR = 0.1


def model_box_type(model: Any) -> str:
    """``model.box_type`` (``"obb"``: boxes ``(K, 5)`` cx, cy, w, h, theta); absent or None:
    ``"hbb"`` (``(K, 4)`` x1, y1, x2, y2, torchvision's detectors)."""
    box_type = getattr(model, "box_type", None) or "hbb"
    if box_type not in ("obb", "hbb"):
        raise ValueError(f"model.box_type must be 'obb' (rotated boxes) or 'hbb' (axis-aligned), got {box_type!r}")
    return box_type


def empty_detections(box_type: str) -> dict[str, Tensor]:
    return {
        "boxes": torch.zeros(0, box_dim(box_type), dtype=torch.float64),
        "scores": torch.zeros(0, dtype=torch.float64),
        "labels": torch.zeros(0, dtype=torch.int64),
    }


def checked_detections(output: Any, box_type: str, what: str) -> dict[str, Tensor]:
    """A torchvision-style output ``{"boxes", "scores", "labels"}`` (tensors or arrays) as
    float64 / int64 CPU tensors, its shapes checked against ``box_type``."""
    if not isinstance(output, Mapping) or not all(key in output for key in ("boxes", "scores", "labels")):
        raise ValueError(f"{what} must be a dict with 'boxes', 'scores' and 'labels'")
    boxes, scores, labels = (torch.as_tensor(output[key]).detach().cpu() for key in ("boxes", "scores", "labels"))
    dim = box_dim(box_type)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, dim)
    if boxes.dim() != 2 or boxes.shape[1] != dim:
        raise ValueError(f"{what}: boxes of shape {tuple(boxes.shape)}, expected (K, {dim}) for "
                         f"{'rotated' if box_type == 'obb' else 'axis-aligned'} boxes ({box_type})")
    count = boxes.shape[0]
    if scores.reshape(-1).shape != (count,) or labels.reshape(-1).shape != (count,):
        raise ValueError(f"{what}: {count} boxes with {scores.numel()} scores and {labels.numel()} labels")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integers, got {labels.dtype}")
    return {"boxes": boxes.to(torch.float64), "scores": scores.reshape(-1).to(torch.float64),
            "labels": labels.reshape(-1).to(torch.int64)}


def to_image_coordinates(boxes: Tensor, offset: tuple[float, float], scale: float, box_type: str) -> Tensor:
    """Boxes of a patch ``(K, 5 | 4)`` in the large image's pixels: ``patch / scale + offset``
    (``scale``: patch pixels per image pixel; a rotated box keeps its angle)."""
    ox, oy = offset
    if box_type == "hbb":
        return boxes / scale + boxes.new_tensor([ox, oy, ox, oy])
    mapped = boxes.clone()
    mapped[:, :4] /= scale
    mapped[:, 0] += ox
    mapped[:, 1] += oy
    return mapped


def merge_detections(detections: Mapping[str, Tensor], box_type: str,
                     iou_thr: float = MERGE_IOU_THR) -> dict[str, Tensor]:
    """Per-class NMS of one image's detections (float64 / int64 tensors): exact rotated NMS
    (:func:`dbf_ext.ops.batched_nms_rotated`) for ``"obb"``, torchvision's ``batched_nms``
    for ``"hbb"``; a box is suppressed by a higher-scored one of its label at IoU
    ``> iou_thr``. The kept detections come by decreasing score."""
    boxes, scores, labels = detections["boxes"], detections["scores"], detections["labels"]
    if box_type == "obb":
        from dbf_ext.ops import batched_nms_rotated  # the compiled extension is needed only here

        keep = batched_nms_rotated(boxes, scores, labels, iou_thr)
    else:
        import torchvision

        keep = torchvision.ops.batched_nms(boxes, scores, labels, iou_thr)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def concat_detections(parts: Sequence[Mapping[str, Tensor]], box_type: str) -> dict[str, Tensor]:
    if not parts:
        return empty_detections(box_type)
    return {key: torch.cat([part[key] for part in parts]) for key in ("boxes", "scores", "labels")}


def merge_patch_results(
    patch_detections: Sequence[Mapping[str, Any]],
    names: Sequence[str | os.PathLike],
    *,
    iou_thr: float = MERGE_IOU_THR,
    box_type: str | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Merges detections made on split patches into detections on their original images.

    Args:
        patch_detections: one torchvision-style dict per patch, ``boxes`` ``(K, 5)`` rotated
            (cx, cy, w, h, theta) or ``(K, 4)`` axis-aligned (x1, y1, x2, y2) in the patch's
            pixels, ``scores`` ``(K,)``, ``labels`` ``(K,)`` integers (tensors or arrays).
        names: the patches' names (or file names), ``<image id>__<size>__<x>___<y>`` as
            :func:`~dbf_ext.data.split_dota` and mmrotate write them, or the DOTA devkit's
            ``<image id>__<rate>__<x>___<y>`` (see :func:`~dbf_ext.data.parse_patch_name`);
            a name that is neither raises ``ValueError`` saying why.
        iou_thr: NMS threshold of the merge (suppression at IoU > ``iou_thr``).
        box_type: ``"obb"`` or ``"hbb"``; None: from the boxes' width (5 or 4).

    Returns:
        ``{image_id: {"boxes", "scores", "labels"}}`` in the original images' pixels (float64
        boxes and scores, int64 labels), by decreasing score; images in order of first
        appearance.
    """
    if len(patch_detections) != len(names):
        raise ValueError(f"got {len(patch_detections)} patch results for {len(names)} names")
    parsed = [parse_patch_name(name) for name in names]
    if box_type is None:
        widths = {int(torch.as_tensor(d["boxes"]).shape[-1]) for d in patch_detections
                  if isinstance(d, Mapping) and "boxes" in d and torch.as_tensor(d["boxes"]).numel()}
        if len(widths) > 1:
            raise ValueError(f"patch results mix box widths {sorted(widths)}: rotated (5) and axis-aligned (4)")
        box_type = {4: "hbb", 5: "obb"}.get(widths.pop() if widths else 5)
        if box_type is None:
            raise ValueError("boxes must have 5 (rotated) or 4 (axis-aligned) columns")
    box_dim(box_type)  # checks it
    per_image: dict[str, list[dict[str, Tensor]]] = {}
    for index, (output, name) in enumerate(zip(patch_detections, parsed)):
        dets = checked_detections(output, box_type, f"patch_detections[{index}] ({names[index]})")
        dets["boxes"] = to_image_coordinates(dets["boxes"], name.offset, name.scale, box_type)
        per_image.setdefault(name.image_id, []).append(dets)
    return {image_id: merge_detections(concat_detections(parts, box_type), box_type, iou_thr)
            for image_id, parts in per_image.items()}
