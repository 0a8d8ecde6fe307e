"""The training loop through the command line: a tiny end-to-end run, resume, eval, errors."""

from __future__ import annotations

import json

import pytest
import torch

from dbf_ext.cli import main
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import TrainConfig, flip_boxes, parse_cache_spec, train


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    config = SyntheticConfig(tile_size=96, train_tiles=4, val_tiles=2, min_objects=2, max_objects=4)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("data"), quiet=True)


def run_train(root, out, *extra):
    return main(["train", "--data", str(root), "--output", str(out), "--image-size", "96",
                 "--batch-size", "2", "--unfrozen-epochs", "0", *extra])


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_with_dbf_and_cache_then_eval(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(tiny_set, out, "--epochs", "3", "--hflip", "0", "--cache", "float32:cpu=64MB",
                     "--plot", str(tmp_path / "plot.png")) == 0
    records = log_lines(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["frozen"] for r in records] == [False, True, True]
    # Epoch 1 fills the cache, epoch 2 is served from it (no flips: one key per sample).
    assert records[1]["cache_hit_rate"] == 0.0 and records[2]["cache_hit_rate"] == 1.0
    assert records[2]["map50"] is not None and 0.0 <= records[2]["map50"] <= 1.0
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert "training summary" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0
    assert "mAP@0.5" in capsys.readouterr().out


class Interrupted(Exception):
    pass


def test_resume_continues_exactly(tiny_set, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--cache", "off", "--hflip", "0.5", "--epochs", "3")
    assert run_train(tiny_set, straight, *common) == 0

    def stop_after_epoch_1(record):
        if record.epoch == 1:
            raise Interrupted

    config = TrainConfig(data=str(tiny_set), output_dir=str(resumed), image_size=96, batch_size=2,
                         unfrozen_epochs=(0,), cache="off", hflip=0.5, epochs=3)
    with pytest.raises(Interrupted):  # a run killed after its second epoch's checkpoint
        train(config, on_epoch_end=stop_after_epoch_1)
    assert run_train(tiny_set, resumed, "--resume", *common) == 0
    assert [r["epoch"] for r in log_lines(resumed)] == [0, 1, 2]
    assert run_train(tiny_set, straight, *common) == 0  # a new run in the same folder
    assert [r["epoch"] for r in log_lines(straight)] == [0, 1, 2]
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["dbf"] == b["dbf"] and len(b["history"]) == 3
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for x, y in zip(a["history"], b["history"]):
        assert x["losses"] == y["losses"]


def test_user_errors_are_one_line(tiny_set, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dbf-ext train: error:") and "does not exist" in err and "\n" not in err
    assert run_train(tiny_set, tmp_path / "r", "--epochs", "1", "--cache", "int3:cpu=1GB") == 1
    assert "storage_dtype" in capsys.readouterr().err
    assert run_train(tiny_set, tmp_path / "r", "--epochs", "1", "--unfrozen-epochs", "a-b") == 1
    assert "--unfrozen-epochs" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tiny_set), "--schedule", "sometimes"])


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "dbf_ext" in capsys.readouterr().out
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["cuda"], bool) and "gpu_usable" in info


def test_cache_spec_parsing():
    assert parse_cache_spec("off") == {}
    assert parse_cache_spec("bfloat16") == {"storage_dtype": "bfloat16", "gpu_bytes": 0,
                                            "cpu_bytes": 4 << 30, "disk_bytes": 0}
    spec = parse_cache_spec("float8_e4m3:gpu=1.5GB,disk=20GB")
    assert spec["gpu_bytes"] == int(1.5 * (1 << 30)) and spec["disk_bytes"] == 20 << 30
    with pytest.raises(ValueError, match="tier"):
        parse_cache_spec("bfloat16:ram=1GB")
    with pytest.raises(ValueError, match="size"):
        parse_cache_spec("bfloat16:cpu=lots")


@pytest.mark.parametrize("hflip,vflip", [(True, False), (False, True), (True, True)])
def test_flips_move_boxes_with_the_image(hflip, vflip):
    from dbf_ext.boxes import obb2poly

    width, height = 100, 60
    hbb = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    obb = torch.tensor([[20.0, 15.0, 20.0, 8.0, 0.4]])
    image = torch.zeros(height, width)
    image[5:25, 10:30] = 1
    flipped = image.flip(-1) if hflip else image
    flipped = flipped.flip(-2) if vflip else flipped
    x1, y1, x2, y2 = flip_boxes(hbb, "hbb", width, height, hflip, vflip)[0].int().tolist()
    assert flipped[y1:y2, x1:x2].sum() == 400  # the box still covers the object
    corners = obb2poly(obb).reshape(4, 2)
    if hflip:
        corners[:, 0] = width - corners[:, 0]
    if vflip:
        corners[:, 1] = height - corners[:, 1]
    moved = obb2poly(flip_boxes(obb, "obb", width, height, hflip, vflip)).reshape(4, 2)
    # the same rectangle: each mirrored corner is one of the new box's corners
    assert torch.cdist(corners, moved).min(dim=1).values.max() < 1e-4
