"""Detections drawn on an image, for a look at what a model found."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from dbf_ext.data.dota import boxes_to_polygons

# Distinct, saturated colours (matplotlib's tab10), one per class in turn.
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def draw_detections(
    pixels: np.ndarray,
    detections: Mapping[str, Tensor],
    classes: Sequence[str],
    box_type: str,
    score_thr: float = 0.3,
) -> Image.Image:
    """The outlines of the detections with ``score >= score_thr`` on a copy of ``pixels``
    (uint8 ``(H, W, 3)``), one colour per class, with the class name and score beside each.

    ``detections``: ``boxes`` in ``box_type``'s form, ``scores``, ``labels`` (1-based:
    ``classes[label - 1]``), as :func:`~dbf_ext.inference.predict_large` returns them.
    """
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 1000))  # lines visible on large images too
    keep = (detections["scores"] >= score_thr).numpy()
    polygons = boxes_to_polygons(detections["boxes"].numpy()[keep], box_type)
    for polygon, score, label in zip(polygons, detections["scores"].numpy()[keep],
                                     detections["labels"].numpy()[keep]):
        colour = _COLOURS[(int(label) - 1) % len(_COLOURS)]
        corners = [tuple(point) for point in polygon.reshape(4, 2).tolist()]
        draw.polygon(corners, outline=colour, width=width)
        name = classes[int(label) - 1] if 1 <= label <= len(classes) else str(int(label))
        draw.text(min(corners, key=lambda point: point[1]), f"{name} {score:.2f}", fill=colour)
    return image
