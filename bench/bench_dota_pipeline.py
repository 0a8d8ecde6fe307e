"""The DOTA large-image pipeline: splitting and merging, against a plain implementation.

Groups:

* ``split-<n>x4000x4000``: the whole split (read, windows, objects, crop, pad, PNG + label
  files) of ``n`` synthetic 4000 x 4000 scenes (:class:`~dbf_ext.data.SyntheticSceneConfig`,
  about 2,700 objects each), preset ``ss``: :func:`dbf_ext.data.split_dota` with a process per
  core and in one process, and ``shapely_loop``, a straightforward single-process
  implementation (per window, per object: bounding-box test, shapely intersection; PNG files
  by Pillow at the same zlib settings, level 1 with run-length strategy, so of the same size;
  no fsync). ``extra_info``: megapixels and objects of the source per second.
* ``select-<n>x4000x4000``: the object selection only (windows, IoF, kept objects) on the same
  scenes, preset ``ms`` (more windows): :func:`dbf_ext.data.window_objects` vs the shapely loop.
* ``merge-100k``: :func:`dbf_ext.inference.merge_patch_results` of 100,000 detections on the
  25 patches of a 4000 x 4000 image (10,000 objects x 10 jittered candidates, 15 classes):
  rotated (exact per-class rotated NMS) and axis-aligned boxes.

Run: ``python -m pytest bench/bench_dota_pipeline.py --benchmark-only`` (the scenes are
generated once, into the user cache, in about 15 s each).
"""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest
import shapely
import torch
from PIL import Image

from dbf_ext.data import (
    SPLIT_PRESETS,
    DotaFolder,
    SyntheticSceneConfig,
    format_dota_labels,
    patch_name,
    prepare_synthetic_dota,
    sliding_windows,
    split_dota,
    window_objects,
)
from dbf_ext.inference import merge_patch_results
from dbf_ext.testing import clustered_rotated_boxes

SCENES = 2
SIZE = 4000


@pytest.fixture(scope="module")
def scenes():
    root = prepare_synthetic_dota(SyntheticSceneConfig(width=SIZE, height=SIZE, train_scenes=SCENES, val_scenes=0))
    folder = DotaFolder(root / "train")
    objects = sum(len(folder.labels(i)) for i in folder.image_ids)
    return root / "train", folder, objects


def shapely_window_objects(polygons: np.ndarray, windows: np.ndarray, iof_thr: float):
    """Per window, per object: bounding boxes first, then shapely's intersection area over the
    object's area (mmrotate's ``bbox_overlaps_iof`` done one pair at a time)."""
    shapes = [shapely.Polygon(p.reshape(4, 2)) for p in polygons]
    bounds = np.array([s.bounds for s in shapes]).reshape(-1, 4)
    kept = []
    for window in windows:
        box = shapely.box(*window)
        indices, iofs = [], []
        for i, (shape, (x1, y1, x2, y2)) in enumerate(zip(shapes, bounds)):
            if min(x2, window[2]) <= max(x1, window[0]) or min(y2, window[3]) <= max(y1, window[1]):
                continue
            iof = shape.intersection(box).area / shape.area
            if iof >= iof_thr:
                indices.append(i)
                iofs.append(iof)
        kept.append((np.array(indices, dtype=np.int64), np.array(iofs)))
    return kept


def shapely_split(folder: DotaFolder, dst, patch_size: int, gap: int, iof_thr: float = 0.7):
    """The plain split: one image after the other, objects by :func:`shapely_window_objects`."""
    (dst / "images").mkdir(parents=True)
    (dst / "labelTxt").mkdir()
    pad = np.array((124, 116, 104), dtype=np.uint8)
    for image_id in folder.image_ids:
        pixels = np.asarray(Image.open(folder.image_path(image_id)).convert("RGB"))
        labels = folder.labels(image_id)
        windows = sliding_windows(pixels.shape[1], pixels.shape[0], patch_size, gap)
        for window, (indices, iof) in zip(windows, shapely_window_objects(labels.polygons, windows, iof_thr)):
            if not len(indices):
                continue
            x1, y1, x2, y2 = window
            patch = np.empty((y2 - y1, x2 - x1, 3), dtype=np.uint8)
            patch[...] = pad
            part = pixels[y1:y2, x1:x2]
            patch[:part.shape[0], :part.shape[1]] = part
            name = patch_name(image_id, window)
            Image.fromarray(patch).save(dst / "images" / f"{name}.png", compress_level=1, compress_type=zlib.Z_RLE)
            text = format_dota_labels(labels.polygons[indices] - np.tile([x1, y1], 4).astype(np.float64),
                                      [labels.class_names[i] for i in indices], labels.difficult[indices],
                                      truncated=iof < 1)
            (dst / "labelTxt" / f"{name}.txt").write_text(text)


@pytest.mark.parametrize("name", ["dbf_ext_workers_2", "dbf_ext_one_process", "shapely_loop"])
def test_split(benchmark, scenes, tmp_path, name):
    src, folder, objects = scenes
    preset = SPLIT_PRESETS["ss"]
    dst = tmp_path / "out"

    def setup():
        shutil.rmtree(dst, ignore_errors=True)

    def run():
        if name == "shapely_loop":
            shapely_split(folder, dst, preset.patch_size, preset.gap)
        else:
            split_dota(src, dst, preset.patch_size, preset.gap, workers=2 if name == "dbf_ext_workers_2" else 0)

    benchmark.group = f"split-{SCENES}x{SIZE}x{SIZE}"
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device="cpu", images=SCENES, objects=objects, patches=len(list((dst / "images").iterdir())),
        megapixels_per_s=round(SCENES * SIZE * SIZE / 1e6 / median, 2), objects_per_s=round(objects / median))


@pytest.mark.parametrize("name", ["dbf_ext", "shapely_loop"])
def test_select_objects(benchmark, scenes, name):
    _, folder, objects = scenes
    preset = SPLIT_PRESETS["ms"]
    polygons = [folder.labels(i).polygons for i in folder.image_ids]
    select = window_objects if name == "dbf_ext" else shapely_window_objects

    def run():
        return [select(p, sliding_windows(SIZE, SIZE, preset.patch_size, preset.gap, preset.rates), 0.7)
                for p in polygons]

    benchmark.group = f"select-{SCENES}x{SIZE}x{SIZE}"
    kept = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info.update(device="cpu", objects=objects, windows=sum(len(k) for k in kept),
                                kept=sum(len(i) for k in kept for i, _ in k),
                                objects_per_s=round(objects / benchmark.stats.stats.median))


def patch_detections(box_type: str):
    """100,000 detections (10,000 objects x 10 candidates of the object's class, 15 classes) of a
    4000 x 4000 image,
    each given to a window that holds its centre, in that patch's pixels."""
    generator = torch.Generator().manual_seed(0)
    boxes = clustered_rotated_boxes(10_000, 10, tile=SIZE, min_side=8, max_side=80, generator=generator,
                                    dtype=torch.float64)
    boxes[:, :2] = boxes[:, :2].clamp(1, SIZE - 1)
    scores = torch.rand(len(boxes), generator=generator, dtype=torch.float64)
    labels = torch.randint(1, 16, (10_000,), generator=generator).repeat_interleave(10)  # one class per object
    if box_type == "hbb":
        boxes = torch.cat([boxes[:, :2] - boxes[:, 2:4] / 2, boxes[:, :2] + boxes[:, 2:4] / 2], dim=1)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    else:
        centres = boxes[:, :2]
    windows = torch.from_numpy(sliding_windows(SIZE, SIZE, 1024, 200)).double()
    inside = ((centres[:, None] >= windows[None, :, :2]) & (centres[:, None] < windows[None, :, 2:])).all(-1)
    owner = inside.int().argmax(dim=1)
    results, names = [], []
    for w, window in enumerate(windows):
        mine = owner == w
        shifted = boxes[mine].clone()
        if box_type == "hbb":
            shifted -= window[[0, 1, 0, 1]]
        else:
            shifted[:, :2] -= window[:2]
        results.append({"boxes": shifted, "scores": scores[mine], "labels": labels[mine]})
        names.append(patch_name("P0001", window.long().tolist()))
    return results, names


@pytest.mark.parametrize("box_type", ["obb", "hbb"])
def test_merge(benchmark, box_type):
    results, names = patch_detections(box_type)
    assert sum(len(r["scores"]) for r in results) == 100_000
    benchmark.group = "merge-100k"
    merged = benchmark.pedantic(merge_patch_results, (results, names), rounds=5, iterations=1)
    benchmark.extra_info.update(device="cpu", box_type=box_type, detections=100_000,
                                kept=len(merged["P0001"]["scores"]), threads=torch.get_num_threads())
