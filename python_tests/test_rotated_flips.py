"""Keyed flips of rotated boxes (horizontal, vertical, diagonal) against an independent reference:
the box's corners mirrored in plain numpy, then the minimum-area rectangle of the mirrored corners
by shapely (float64), compared by shapely's IoU, the compiled rotated IoU and the le90 angle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch
from shapely_reference import box_polygon

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.ops import box_iou_rotated
from dbf_ext.train import KeyedFlipDataset, flip_boxes, load_dataset

WIDTH, HEIGHT = 200, 120
DIRECTIONS = {"horizontal": (True, False), "vertical": (False, True), "diagonal": (True, True)}


def mirrored_rectangle(box, hflip: bool, vflip: bool) -> shapely.Polygon:
    """The minimum-area rectangle of the box's corners mirrored across the image's axes."""
    corners = np.asarray(box_polygon(box).exterior.coords)[:4]
    if hflip:
        corners[:, 0] = WIDTH - corners[:, 0]
    if vflip:
        corners[:, 1] = HEIGHT - corners[:, 1]
    return shapely.Polygon(corners).minimum_rotated_rectangle


def long_side_angle(rectangle: shapely.Polygon) -> float:
    """The direction of the rectangle's longer side, in [-pi/2, pi/2) (le90's angle)."""
    corners = np.asarray(rectangle.exterior.coords)[:3]
    edges = corners[1:] - corners[:-1]
    longer = edges[np.argmax(np.hypot(edges[:, 0], edges[:, 1]))]
    return (math.atan2(longer[1], longer[0]) + math.pi / 2) % math.pi - math.pi / 2


def angle_difference(a: float, b: float) -> float:
    """|a - b| for directions of period pi."""
    return abs((a - b + math.pi / 2) % math.pi - math.pi / 2)


def random_le90_boxes(count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.uniform(8, 60, count)
    h = w * rng.uniform(0.2, 0.9, count)  # clearly longer than wide: one le90 form
    theta = rng.uniform(-math.pi / 2, math.pi / 2, count)
    theta[:4] = [-math.pi / 2, 0.0, math.pi / 4, -math.pi / 4]  # the range's edge, axis-aligned, diagonals
    cx, cy = rng.uniform(30, WIDTH - 30, count), rng.uniform(30, HEIGHT - 30, count)
    return torch.tensor(np.stack([cx, cy, w, h, theta], 1))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_flipped_rotated_boxes_match_the_mirrored_corners(direction):
    hflip, vflip = DIRECTIONS[direction]
    boxes = random_le90_boxes(200, seed=len(direction))
    flipped = flip_boxes(boxes, "obb", WIDTH, HEIGHT, hflip, vflip)
    assert flipped.dtype == boxes.dtype and flipped.shape == boxes.shape
    # le90: w >= h, theta in [-pi/2, pi/2)
    assert (flipped[:, 2] >= flipped[:, 3]).all()
    assert ((flipped[:, 4] >= -math.pi / 2) & (flipped[:, 4] < math.pi / 2)).all()
    for box, got in zip(boxes.tolist(), flipped.tolist()):
        want = mirrored_rectangle(box, hflip, vflip)
        got_polygon = box_polygon(got)
        iou = got_polygon.intersection(want).area / got_polygon.union(want).area
        assert iou == pytest.approx(1.0, abs=1e-9)
        assert angle_difference(got[4], long_side_angle(want)) < 1e-9
        assert got[2] == pytest.approx(box[2]) and got[3] == pytest.approx(box[3])
    # The compiled rotated IoU agrees: each flipped box is its mirrored rectangle.
    reference = torch.tensor([[*want.centroid.coords[0], *got[2:4], long_side_angle(want)]
                              for got, want in ((g, mirrored_rectangle(b, hflip, vflip))
                                                for b, g in zip(boxes.tolist(), flipped.tolist()))])
    ious = box_iou_rotated(flipped.float(), reference.float(), aligned=True)
    assert torch.allclose(ious, torch.ones_like(ious), atol=1e-4)


def test_diagonal_flip_is_a_half_turn_keeping_the_angle():
    boxes = random_le90_boxes(50, seed=7)
    flipped = flip_boxes(boxes, "obb", WIDTH, HEIGHT, True, True)
    assert torch.equal(flipped[:, 4], boxes[:, 4])
    assert torch.allclose(flipped[:, :2], torch.tensor([WIDTH, HEIGHT], dtype=boxes.dtype) - boxes[:, :2])


def test_flipping_twice_gives_the_boxes_back():
    boxes = random_le90_boxes(100, seed=3)
    for hflip, vflip in DIRECTIONS.values():
        twice = flip_boxes(flip_boxes(boxes, "obb", WIDTH, HEIGHT, hflip, vflip), "obb", WIDTH, HEIGHT,
                           hflip, vflip)
        assert torch.allclose(twice, boxes, atol=1e-12)


@pytest.mark.parametrize("version", ["le135", "oc"])
def test_flipped_boxes_take_the_angle_version_asked_for(version):
    from dbf_ext.boxes import regularize_obb

    boxes = regularize_obb(random_le90_boxes(100, seed=5), version)
    flipped = flip_boxes(boxes, "obb", WIDTH, HEIGHT, True, False, angle_version=version)
    assert torch.allclose(regularize_obb(flipped, version), flipped, atol=1e-12)
    want = regularize_obb(flip_boxes(boxes, "obb", WIDTH, HEIGHT, True, False), version)
    assert torch.allclose(flipped, want, atol=1e-9)


@pytest.fixture(scope="module")
def rotated_set(tmp_path_factory):
    config = SyntheticConfig(tile_size=96, train_tiles=3, val_tiles=1, min_objects=3, max_objects=5)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("data"), quiet=True)


def test_keyed_flips_of_a_rotated_dataset_follow_the_label_polygons(rotated_set):
    """Every flip outcome of every sample: the target boxes are the minimum-area rectangles of
    the label file's polygons mirrored (shapely), and the image is flipped the same way."""
    base = load_dataset(rotated_set, "train", box_type="obb")
    keyed = KeyedFlipDataset(base, hflip=0.5, vflip=0.5, seed=0)
    for index in range(len(base)):
        label_file = base.folder.root / "labelTxt" / f"{base.image_ids[index]}.txt"
        # Object lines: eight coordinates, the class, the difficult flag.
        polygons = [np.array(line.split()[:8], dtype=np.float64)
                    for line in label_file.read_text().splitlines() if len(line.split()) == 10]
        assert len(polygons) == len(base.load_target(index)["boxes"]) >= 3
        plain = base.load_image(index)
        for hflip, vflip in [(False, False), *DIRECTIONS.values()]:
            image, target = keyed.load_sample(index, (hflip, vflip))
            assert torch.equal(image, plain.flip([d for d, f in ((-1, hflip), (-2, vflip)) if f]))
            height, width = plain.shape[1:]
            for polygon, box in zip(polygons, target["boxes"].double().tolist()):
                corners = polygon.reshape(4, 2).copy()
                if hflip:
                    corners[:, 0] = width - corners[:, 0]
                if vflip:
                    corners[:, 1] = height - corners[:, 1]
                want = shapely.Polygon(corners).minimum_rotated_rectangle
                got = box_polygon(box)
                assert got.intersection(want).area / got.union(want).area > 1 - 1e-5


def test_flip_draws_are_keys_and_quarter_each_with_both_probabilities_half(rotated_set):
    base = load_dataset(rotated_set, "train", box_type="obb")
    keyed = KeyedFlipDataset(base, hflip=0.5, vflip=0.5, seed=3)
    draws = [keyed.augmentation_key(index, epoch) for index in range(3) for epoch in range(400)]
    counts = {key: draws.count(key) for key in [(False, False), *DIRECTIONS.values()]}
    assert sum(counts.values()) == len(draws)
    assert all(abs(count / len(draws) - 0.25) < 0.04 for count in counts.values()), counts
    # Keys are reproducible: the same (seed, epoch, index), the same flips (the cache's key).
    again = KeyedFlipDataset(base, hflip=0.5, vflip=0.5, seed=3)
    assert [again.augmentation_key(i, e) for i in range(3) for e in range(400)] == draws
    # Without vertical flips the keys are those of the horizontal-only dataset of before.
    horizontal = KeyedFlipDataset(base, hflip=0.5, seed=3)
    assert all(not key[1] for key in (horizontal.augmentation_key(i, 0) for i in range(3)))


def test_flip_probability_outside_unit_interval_is_an_error(rotated_set):
    base = load_dataset(rotated_set, "train", box_type="obb")
    with pytest.raises(ValueError, match="vflip must be a probability"):
        KeyedFlipDataset(base, vflip=1.5)


def test_with_box_type_converts_without_rereading_the_labels(rotated_set):
    hbb = load_dataset(rotated_set, "train")
    obb = hbb.with_box_type("obb")
    direct = load_dataset(rotated_set, "train", box_type="obb")
    assert hbb.box_type == "hbb" and obb.box_type == "obb" and obb.folder is hbb.folder
    for index in range(len(direct)):
        assert torch.equal(obb.load_target(index)["boxes"], direct.load_target(index)["boxes"])
        assert hbb.load_target(index)["boxes"].shape[1] == 4
    assert hbb.with_box_type("hbb") is hbb
    with pytest.raises(ValueError, match="box_type"):
        hbb.with_box_type("rbox")
