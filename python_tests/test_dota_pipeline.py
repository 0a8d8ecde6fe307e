"""The large-image path as a user runs it, on synthetic scenes the package makes itself:
split -> train on patches -> predict on the large images with merging -> Task1 -> eval."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from dbf_ext.cli import main
from dbf_ext.data import (
    DotaFolder,
    SyntheticSceneConfig,
    parse_patch_name,
    prepare_synthetic_dota,
    read_dota_labels,
    read_dota_task1,
)


def printed_map(out: str) -> float:
    return float(re.search(r"mAP@[0-9.]+ \(VOC07\) on .*: ([0-9.]+)", out)[1])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    config = SyntheticSceneConfig(width=512, height=384, train_scenes=3, val_scenes=1, min_objects=4,
                                  max_objects=8, seed=1)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("cache"), quiet=True)


@pytest.mark.parametrize(("model", "box_type"), [("tiny-fpn", "hbb"), ("oriented-rcnn-tiny-fpn", "obb")])
def test_split_train_predict_task1_eval(scenes, tmp_path, capsys, model, box_type):
    split, run, out = tmp_path / "split", tmp_path / "run", tmp_path / "predict"
    windows = ["--patch-size", "256", "--gap", "64"]
    # 1. split both splits of the folder (train/, val/) into patches
    assert main(["split", str(scenes), str(split), *windows, "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("patches of 256 px, gap 64, rates 1" in line for line in lines)
    patches = DotaFolder(split / "train")
    assert {parse_patch_name(i).image_id for i in patches.image_ids} == set(DotaFolder(scenes / "train").image_ids)
    assert any(patches.labels(i).truncated.any() for i in patches.image_ids)  # objects cut by borders
    # 2. train on the patches (a tiny model, just to exercise the path)
    assert main(["train", "--data", str(split), "--output", str(run), "--model", model, "--epochs", "2",
                 "--image-size", "128", "--batch-size", "4", "--cache", "off", "--lr", "0.01"]) == 0
    capsys.readouterr()
    # 3. predict on the large images: merged detections, Task1 files, labels, drawings
    checkpoint = str(run / "checkpoint.pt")
    assert main(["predict", "--checkpoint", checkpoint, "--images", str(scenes / "val" / "images"),
                 "--out", str(out), "--task1", "--draw", "--score-thr", "0.05", *windows]) == 0
    assert "Task1 files" in capsys.readouterr().out
    classes = DotaFolder(split / "train").classes
    task1 = read_dota_task1(out, classes)
    assert sorted(p.name for p in out.glob("Task1_*.txt")) == sorted(f"Task1_{c}.txt" for c in classes)
    assert {i for dets in task1.values() for i in dets.image_ids} <= {"val_0000"}
    assert Image.open(out / "drawings" / "val_0000.jpg").size == (512, 384)
    confident, _ = read_dota_labels(out / "labelTxt" / "val_0000.txt", classes)  # detections as DOTA labels
    assert len(confident) == sum(int((dets.scores >= 0.05).sum()) for dets in task1.values())
    # 4. evaluate against the original (unsplit) labels: the Task1 files, and the model predicting the
    #    large images directly, give the same mAP (with the model's box type). A model trained for
    #    two epochs rarely reaches IoU 0.5; at IoU 0.01 every detection touching an object counts.
    evaluated = ["--data", str(scenes), "--split", "val", "--iou-thr", "0.01"]
    assert main(["eval", "--detections", str(out), *evaluated, "--box-type", box_type]) == 0
    from_files = printed_map(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", checkpoint, *evaluated, *windows]) == 0
    direct = printed_map(capsys.readouterr().out)
    # Task1 files hold polygons: a rotated box comes back through its corners (rounding only).
    assert 0.0 < from_files <= 1.0 and from_files == pytest.approx(direct, abs=1e-12 if box_type == "hbb" else 1e-6)
    assert main(["eval", "--detections", str(out), "--data", str(scenes), "--split", "val"]) == 0  # rotated
    assert 0.0 <= printed_map(capsys.readouterr().out) <= 1.0


def test_pipeline_faults_are_one_line_errors(scenes, tmp_path, capsys):
    def error(*argv):
        assert main(list(argv)) == 1
        message = capsys.readouterr().err.strip()
        assert "\n" not in message
        return message

    assert "no Task1_<class>.txt files" in error("eval", "--detections", str(tmp_path), "--data", str(scenes))
    (tmp_path / "Task1_plane.txt").write_text("val_0000 0.9 1 2 3 4 5 6 7 8\nval_0000 0.9 1 2\n")
    assert "Task1_plane.txt:2: expected 10 fields" in error(
        "eval", "--detections", str(tmp_path), "--data", str(scenes))
    (tmp_path / "Task1_plane.txt").write_text("P9999 0.9 1 2 3 4 5 6 7 8\n")
    assert "predictions for images not in the dataset: ['P9999']" in error(
        "eval", "--detections", str(tmp_path), "--data", str(scenes))
    assert "needs --data" in error("eval", "--detections", str(tmp_path))
    assert "does not exist" in error("predict", "--checkpoint", str(tmp_path / "none.pt"), "--images",
                                     str(scenes / "val" / "images"), "--out", str(tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in error("predict", "--checkpoint", str(tmp_path / "none.pt"), "--images", str(empty),
                                "--out", str(tmp_path / "o"))
    broken = tmp_path / "broken" / "images"
    broken.mkdir(parents=True)
    (broken / "P1.png").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    assert f"{broken / 'P1.png'}: cannot read the image" in error("split", str(broken.parent), str(tmp_path / "s"),
                                                                   "--workers", "0")
