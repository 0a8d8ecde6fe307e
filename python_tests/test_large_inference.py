"""Sliding-window inference and merging: objects cut by patch borders come out once, at their
place, at one or several scales; the split ground truth merges back to itself; mAP of merged
results equals mAP on the large image; names, Task1 files, faults."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch
from rich.progress import Progress
from shapely_reference import box_polygon, iou_matrix

from dbf_ext.data import (
    DotaFolder,
    SyntheticSceneConfig,
    boxes_to_polygons,
    generate_synthetic_dota,
    parse_patch_name,
    polygons_to_obb,
    read_dota_task1,
    sliding_windows,
    split_dota,
    write_dota_task1,
)
from dbf_ext.evaluation import detections_by_class, eval_map
from dbf_ext.inference import merge_patch_results, predict_large

RAMP = 4096.0  # the ramp image holds pixel index / RAMP: exact in float32 below 4096 px


def ramp_image(width: int, height: int) -> torch.Tensor:
    """A float (3, H, W) image whose pixels say where they are: channel 0 = x / RAMP,
    channel 1 = y / RAMP."""
    image = torch.full((3, height, width), 0.5)
    image[0] = torch.arange(width, dtype=torch.float32)[None, :] / RAMP
    image[1] = torch.arange(height, dtype=torch.float32)[:, None] / RAMP
    return image


class OracleDetector(torch.nn.Module):
    """A stand-in detector for a ramp image that "sees" known objects.

    From a patch's pixels it finds the window the patch was cut from (size among
    ``window_sizes``, corner) and the patch's scale, then reports, in the patch's pixels,
    every object wholly inside the window with its box and score, and every object at least
    30 % inside as the box of its visible part (minimum-area rectangle, or enclosing box) with
    a lower score — what a real detector does with a cut object. Boxes in float64.
    """

    def __init__(self, boxes, scores, labels, box_type, window_sizes, image_size):
        super().__init__()
        self.box_type = box_type
        self.boxes = np.asarray(boxes, dtype=np.float64)
        self.scores, self.labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
        self.window_sizes = sorted(window_sizes)
        self.image = shapely.box(0, 0, *image_size)
        self.shapes = [box_polygon(b) if box_type == "obb" else shapely.box(*b) for b in self.boxes]
        self.calls = 0

    def locate(self, patch: torch.Tensor) -> tuple[int, int, int]:
        """(x0, y0, window size) of a patch, read from its ramp values at patch pixels 2 and 12."""
        values_x = patch[0, 2, [2, 12]].double() * RAMP
        values_y = patch[1, [2, 12], 2].double() * RAMP
        per_pixel = float(values_x[1] - values_x[0]) / 10  # image pixels per patch pixel
        side = patch.shape[-1]
        size = min(self.window_sizes, key=lambda s: abs(s / side - per_pixel))
        # patch pixel u (centre u + 0.5) holds the image index x0 + (u + 0.5) * size / side - 0.5
        offset = 2.5 * size / side - 0.5
        return round(float(values_x[0]) - offset), round(float(values_y[0]) - offset), size

    def forward(self, images):
        self.calls += 1
        outputs = []
        for patch in images:
            x0, y0, size = self.locate(patch)
            scale = patch.shape[-1] / size
            window = shapely.box(x0, y0, x0 + size, y0 + size).intersection(self.image)
            boxes, scores, labels = [], [], []
            for box, shape, score, label in zip(self.boxes, self.shapes, self.scores, self.labels):
                visible = shape.intersection(window)
                fraction = visible.area / shape.area
                if window.covers(shape):
                    part = box.copy()
                elif fraction >= 0.3:
                    score = score * 0.9 * fraction
                    if self.box_type == "obb":
                        corners = np.asarray(visible.minimum_rotated_rectangle.exterior.coords)[:4]
                        part = polygons_to_obb(corners.reshape(1, 8))[0]
                    else:
                        part = np.array(visible.bounds)
                else:
                    continue
                if self.box_type == "obb":
                    part[:2] = (part[:2] - (x0, y0)) * scale
                    part[2:4] *= scale
                else:
                    part = (part - (x0, y0, x0, y0)) * scale
                boxes.append(part)
                scores.append(score)
                labels.append(label)
            width = 5 if self.box_type == "obb" else 4
            outputs.append({"boxes": torch.tensor(np.array(boxes).reshape(-1, width)),
                            "scores": torch.tensor(scores, dtype=torch.float64),
                            "labels": torch.tensor(labels, dtype=torch.int64)})
        return outputs


def separated_objects(rng, count, width, height, box_type, size=(12, 60), margin=4):
    """Objects inside the image whose enclosing circles keep apart (IoU 0 with each other)."""
    centres, radii = [], []
    while len(centres) < count:
        w, h = rng.uniform(*size, 2)
        radius = math.hypot(w, h) / 2
        centre = rng.uniform(radius + margin, (width - radius - margin, height - radius - margin))
        if all(np.hypot(*(centre - c)) > radius + r + 2 for c, r in zip(centres, radii)):
            centres.append(centre)
            radii.append(radius)
            yield (np.array([*centre, w, h, rng.uniform(-math.pi / 2, math.pi / 2)]) if box_type == "obb"
                   else np.array([*(centre - (w / 2, h / 2)), *(centre + (w / 2, h / 2))]))


def by_score(result):
    order = torch.argsort(result["scores"], descending=True)
    return {key: value[order] for key, value in result.items()}


def windows_of(patch_size, gap, rates):
    return [int(patch_size / r) for r in rates]


@pytest.mark.parametrize("box_type", ["obb", "hbb"])
@pytest.mark.parametrize("rates", [(1.0,), (0.5, 1.0, 1.5)])
def test_objects_cut_by_patch_borders_are_reported_once_at_their_place(box_type, rates):
    rng = np.random.default_rng(11)
    width, height = 700, 520
    boxes = np.array(list(separated_objects(rng, 40, width, height, box_type)))
    scores = rng.permutation(np.linspace(0.2, 0.99, len(boxes)))
    labels = rng.integers(1, 4, len(boxes))
    oracle = OracleDetector(boxes, scores, labels, box_type, windows_of(256, 96, rates), (width, height))
    image = ramp_image(width, height)
    with Progress(disable=True) as progress:
        merged = predict_large(oracle, image, patch_size=256, gap=96, rates=rates, batch_size=3, progress=progress)
    # without merging: several boxes per object (whole ones from overlapping windows, cut ones)
    unmerged = predict_large(oracle, image, patch_size=256, gap=96, rates=rates, iou_thr=1.0)
    assert len(unmerged["scores"]) > 1.5 * len(boxes)
    assert merged["boxes"].dtype == torch.float64 and merged["boxes"].shape == (len(boxes), boxes.shape[1])
    order = np.argsort(-scores)
    np.testing.assert_allclose(merged["boxes"].numpy(), boxes[order], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(merged["scores"].numpy(), scores[order])
    np.testing.assert_array_equal(merged["labels"].numpy(), labels[order])


def test_the_model_sees_batches_and_padded_windows():
    """An image smaller than a window: one window, padded; the oracle still finds it."""
    rng = np.random.default_rng(3)
    boxes = np.array(list(separated_objects(rng, 5, 200, 150, "obb")))
    oracle = OracleDetector(boxes, np.linspace(0.5, 0.9, 5), np.ones(5, dtype=int), "obb", [256], (200, 150))
    merged = predict_large(oracle, ramp_image(200, 150), patch_size=256, gap=96)
    assert oracle.calls == 1
    np.testing.assert_allclose(by_score(merged)["boxes"].numpy(), boxes[::-1], atol=1e-9)
    big = ramp_image(900, 700)
    oracle = OracleDetector(boxes, np.linspace(0.5, 0.9, 5), np.ones(5, dtype=int), "obb", [256], (900, 700))
    predict_large(oracle, big, patch_size=256, gap=96, batch_size=4)
    assert oracle.calls == math.ceil(len(sliding_windows(900, 700, 256, 96)) / 4) == 6  # 4 windows per call


def test_mean_ap_of_merged_results_equals_mean_ap_on_the_large_image(tmp_path):
    """Ground truth with difficult objects; detections: near hits, misses, duplicates of
    nothing, false positives. The model's detections on the whole image, merged from windows,
    score the same mAP as the same detections evaluated directly, and after a Task1 round
    trip."""
    rng = np.random.default_rng(5)
    width, height = 800, 600
    objects = list(separated_objects(rng, 60, width, height, "obb", size=(16, 50), margin=10))
    truth, fakes = np.array(objects[:45]), np.array(objects[45:])  # fakes: false positives in free space
    labels_truth = rng.integers(1, 4, len(truth))
    jitter = rng.normal(0, 1, truth.shape) * (2, 2, 2, 2, 0.05)
    detections = np.concatenate([truth + jitter, fakes])
    det_labels = np.concatenate([labels_truth, rng.integers(1, 4, len(fakes))])
    det_scores = rng.uniform(0.05, 1, len(detections))
    keep = rng.random(len(detections)) > 0.15  # some objects are missed
    detections, det_labels, det_scores = detections[keep], det_labels[keep], det_scores[keep]
    difficult = rng.random(len(truth)) < 0.1
    annotation = {"bboxes": truth[~difficult], "labels": labels_truth[~difficult] - 1,
                  "bboxes_ignore": truth[difficult], "labels_ignore": labels_truth[difficult] - 1}

    oracle = OracleDetector(detections, det_scores, det_labels, "obb", [256], (width, height))
    merged = predict_large(oracle, ramp_image(width, height), patch_size=256, gap=80)
    direct_map, direct = eval_map([detections_by_class(detections, det_scores, det_labels, 3)], [annotation])
    merged_map, per_class = eval_map(
        [detections_by_class(merged["boxes"], merged["scores"], merged["labels"], 3)], [annotation])
    assert 0.3 < direct_map < 1 and merged_map == direct_map
    assert [c["ap"] for c in per_class] == [c["ap"] for c in direct]

    classes = ["plane", "ship", "harbor"]
    by_class = detections_by_class(merged["boxes"], merged["scores"], merged["labels"], 3)
    write_dota_task1(tmp_path, ["P0001"], [by_class], classes)
    back = read_dota_task1(tmp_path, classes)
    for c, name in enumerate(classes):
        np.testing.assert_array_equal(back[name].scores, by_class[c][:, -1])
        np.testing.assert_allclose(back[name].polygons, boxes_to_polygons(by_class[c][:, :5], "obb"), rtol=1e-15)
    from_files = [np.concatenate([polygons_to_obb(back[n].polygons), back[n].scores[:, None]], 1) for n in classes]
    assert eval_map([from_files], [annotation])[0] == direct_map


def test_split_ground_truth_merges_back_to_every_object_once(tmp_path):
    """split -> each patch's labels as detections -> merge: every object of the large images,
    exactly once, at its place (objects crossing patch borders included)."""
    config = SyntheticSceneConfig(width=640, height=480, train_scenes=2, val_scenes=0, seed=2)
    root = generate_synthetic_dota(tmp_path / "scenes", config, quiet=True)
    summary = split_dota(root / "train", tmp_path / "split", patch_size=256, gap=100, workers=0)
    patches = DotaFolder(tmp_path / "split")
    originals = DotaFolder(root / "train")
    classes = originals.classes
    names, results = [], []
    for patch_id in patches.image_ids:
        labels = patches.labels(patch_id)
        names.append(patch_id)
        results.append({"boxes": labels.obb(), "scores": np.ones(len(labels)),
                        "labels": [classes.index(n) + 1 for n in labels.class_names]})
    truncated = sum(int(patches.labels(i).truncated.sum()) for i in patches.image_ids)
    assert truncated > 10 and summary.objects > sum(len(originals.labels(i)) for i in originals.image_ids)
    merged = merge_patch_results(results, names)
    assert sorted(merged) == list(originals.image_ids)
    for image_id, result in merged.items():
        labels = originals.labels(image_id)
        boxes = result["boxes"].numpy()
        ious = iou_matrix(labels.obb(), boxes)
        match = ious > 0.5
        assert (match.sum(axis=1) == 1).all() and (match.sum(axis=0) == 1).all(), image_id  # once each
        found = match.argmax(axis=1)
        # At its place: a minimum-area rectangle of the object's polygon. (Labels are rounded
        # to 0.01 px, so a polygon is a rectangle only nearly, and two of its edges can give
        # rectangles of the same least area; the translated copy in a patch may pick the other.)
        assert ious[np.arange(len(found)), found].min() > 0.999
        np.testing.assert_allclose(boxes[found, 2] * boxes[found, 3], labels.obb()[:, 2] * labels.obb()[:, 3],
                                   rtol=1e-9)
        expected = np.array([classes.index(n) + 1 for n in labels.class_names])
        np.testing.assert_array_equal(result["labels"].numpy()[found], expected)


def test_devkit_rate_names_are_rescaled_and_axis_aligned_results_merge_axis_aligned():
    results = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])},
        # the same object seen in the image scaled by 0.5, by a patch at (412, 100) of that image
        {"boxes": np.array([[5.0 - 412, 10.0 - 100, 15.0 - 412, 20.0 - 100]]), "scores": [0.8], "labels": [1]},
    ]
    merged = merge_patch_results(results, ["P9__1024__0___0", "P9__0.5__412___100.png"])
    # second: ((x + 412) / 0.5, (y + 100) / 0.5) = (10, 20, 30, 40): the same box, suppressed
    np.testing.assert_array_equal(merged["P9"]["boxes"].numpy(), [[10, 20, 30, 40]])
    assert merged["P9"]["scores"].tolist() == [pytest.approx(0.9)]  # the higher-scored one
    separate = merge_patch_results(results, ["P9__1024__0___0", "P9__1024__500___0"])
    assert len(separate["P9"]["scores"]) == 2


def test_merge_faults_are_clear():
    ok = {"boxes": np.zeros((1, 5)), "scores": [0.5], "labels": [1]}
    with pytest.raises(ValueError, match="2 patch results for 1 names"):
        merge_patch_results([ok, ok], ["P1__1024__0___0"])
    with pytest.raises(ValueError, match="cannot parse patch name 'P1_1024_0_0'"):
        merge_patch_results([ok], ["P1_1024_0_0"])
    with pytest.raises(ValueError, match=r"mix box widths \[4, 5\]"):
        merge_patch_results([ok, {"boxes": np.zeros((1, 4)), "scores": [1], "labels": [1]}],
                            ["P1__1024__0___0", "P1__1024__824___0"])
    with pytest.raises(ValueError, match=r"1 boxes with 2 scores"):
        merge_patch_results([{"boxes": np.zeros((1, 5)), "scores": [1, 2], "labels": [1]}], ["P1__1024__0___0"])
    with pytest.raises(ValueError, match="labels must be integers"):
        merge_patch_results([{"boxes": np.zeros((1, 5)), "scores": [1], "labels": [1.0]}], ["P1__1024__0___0"])
    with pytest.raises(ValueError, match="must be a dict"):
        merge_patch_results([np.zeros((1, 6))], ["P1__1024__0___0"])
    assert parse_patch_name("P1__1024__0___0").image_id == "P1"


class WrongShape(torch.nn.Module):
    box_type = "obb"

    def forward(self, images):
        return [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64)}
                for _ in images]


def test_predict_faults_are_clear():
    image = np.zeros((300, 300, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"boxes of shape \(1, 4\), expected \(K, 5\) for rotated"):
        predict_large(WrongShape(), image, patch_size=256, gap=64)
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        predict_large(WrongShape(), np.zeros((300, 300), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"float \(3, H, W\)"):
        predict_large(WrongShape(), torch.zeros(300, 300, 3))
    with pytest.raises(TypeError, match="image must be"):
        predict_large(WrongShape(), [image])
    with pytest.raises(ValueError, match="batch_size"):
        predict_large(WrongShape(), image, batch_size=0)
    with pytest.raises(ValueError, match="larger than the gap"):
        predict_large(WrongShape(), image, patch_size=256, gap=256)
    bad = WrongShape()
    bad.box_type = "rbox"
    with pytest.raises(ValueError, match="model.box_type must be"):
        predict_large(bad, image)
