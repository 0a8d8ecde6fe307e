"""Oriented R-CNN through the training engine and the command line: DBF schedules with the feature
cache (the float32 store bit-identical to recomputation), Dynamic R-CNN, an interrupted and
resumed run, evaluation of a checkpoint, trunk weights from files, faults, and the demo.

Every run is on the CPU, where training is bit-repeatable, with the small oriented model on
96 px tiles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torchvision

from dbf_ext.cli import main
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import TrainConfig, train

MODEL = "oriented-rcnn-tiny-fpn"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    config = SyntheticConfig(tile_size=96, train_tiles=4, val_tiles=2, min_objects=2, max_objects=4)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("data"), quiet=True)


def config(root, out, **overrides) -> TrainConfig:
    options = dict(data=str(root), output_dir=str(out), model=MODEL, image_size=96, batch_size=2,
                   hflip=0.0, cache="off", device="cpu")
    options.update(overrides)
    return TrainConfig(**options)


def run_train(root, out, *extra):
    return main(["train", "--data", str(root), "--output", str(out), "--model", MODEL, "--image-size", "96",
                 "--batch-size", "2", "--device", "cpu", *extra])


def epoch_losses(result) -> list[dict[str, float]]:
    return [record.losses for record in result.history]


def log_lines(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


class Interrupted(Exception):
    pass


def stop_after(epoch: int):
    def on_epoch_end(record):
        if record.epoch == epoch:
            raise Interrupted
    return on_epoch_end


def test_dbf_stretches_with_the_float32_cache_equal_recomputation(tiny_set, tmp_path):
    """Two trained and two frozen stretches, the frozen ones served from the float32 cache after
    their first epoch: losses, the final weights and the rotated mAP are those of the run that
    recomputes every feature, bit for bit."""
    common = dict(unfrozen_epochs=(0, 3), epochs=6, eval_every=3)
    reference = train(config(tiny_set, tmp_path / "off", **common))
    cached = train(config(tiny_set, tmp_path / "cached", cache="float32:cpu=64MB", **common))
    assert epoch_losses(cached) == epoch_losses(reference)
    assert [r.frozen for r in cached.history] == [False, True, True, False, True, True]
    assert [r.cache_hit_rate for r in cached.history] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert_same_weights(checkpoint(tmp_path / "cached")["model"], checkpoint(tmp_path / "off")["model"])
    assert cached.box_type == "obb" and cached.map_name == "rotated mAP50"
    assert [r.map50 for r in cached.history] == [r.map50 for r in reference.history]
    assert cached.final_map50 == reference.final_map50 and 0.0 <= cached.final_map50 <= 1.0
    assert all(set(r.losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
               for r in cached.history)
    # The validation example the plot draws: rotated ground truth and detections.
    example = cached.example
    assert example.box_type == "obb" and example.gt_boxes.shape[1] == 5 and example.boxes.shape[1] == 5
    assert example.image.shape == (96, 96, 3) and example.image.dtype.name == "uint8"


def test_lossy_cache_store_on_disk_trains_the_oriented_model(tiny_set, tmp_path):
    """The coarsest storage dtype on the disk tier: frozen epochs after the first are served from
    the cache, losses stay finite and close to recomputation's."""
    common = dict(unfrozen_epochs=(0,), epochs=3)
    reference = train(config(tiny_set, tmp_path / "off", **common))
    cached = train(config(tiny_set, tmp_path / "cached", cache="float8_e4m3:disk=64MB",
                           cache_dir=str(tmp_path / "cache"), **common))
    assert [r.cache_hit_rate for r in cached.history] == [0.0, 0.0, 1.0]
    assert epoch_losses(cached)[:2] == epoch_losses(reference)[:2]  # nothing served yet
    served, recomputed = cached.history[2].losses, reference.history[2].losses
    for name, value in served.items():
        assert math.isfinite(value) and value == pytest.approx(recomputed[name], rel=0.1, abs=0.02), name


def test_dynamic_rcnn_run_interrupted_and_resumed_is_exact(tiny_set, tmp_path):
    """--dynamic-rcnn on the oriented model, flips in both directions: the controller moves,
    lands in the log and the checkpoint, and a run interrupted after epoch 1 and resumed ends
    where the uninterrupted one does (losses, weights, controller state)."""
    common = ("--dynamic-rcnn", "--hflip", "0.5", "--vflip", "0.5", "--cache", "off", "--epochs", "3",
              "--unfrozen-epochs", "0,2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(tiny_set, straight, *common) == 0
    records = log_lines(straight)
    assert all(set(r["dynamic_rcnn"]) == {"iou_threshold", "beta"} for r in records)
    state = checkpoint(straight)
    controller = state["dynamic_rcnn"]
    assert controller["iteration"] == 3 * 2  # one step per batch: 4 tiles, 2 per batch, 3 epochs
    assert any(key.startswith("roi_heads.") for key in state["model"])

    config_resumed = config(tiny_set, resumed, dynamic_rcnn=True, hflip=0.5, vflip=0.5, epochs=3,
                            unfrozen_epochs=(0, 2))
    with pytest.raises(Interrupted):
        train(config_resumed, on_epoch_end=stop_after(1))
    train(dataclasses.replace(config_resumed, resume=True))
    assert [r["losses"] for r in log_lines(resumed)] == [r["losses"] for r in records]
    assert_same_weights(checkpoint(resumed)["model"], state["model"])
    assert checkpoint(resumed)["dynamic_rcnn"] == controller


def test_eval_of_an_oriented_checkpoint_is_rotated_map(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(tiny_set, out, "--epochs", "2", "--cache", "float32:cpu=64MB",
                     "--plot", str(tmp_path / "plot.png")) == 0
    printed = capsys.readouterr().out
    assert "rotated mAP50 (VOC07, val)" in printed
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    final = log_lines(out)[-1]["map50"]
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("rotated mAP@0.5 (VOC07) on 2 images of 'val': ")
    assert float(first.rsplit(" ", 1)[1]) == pytest.approx(final, abs=5e-5)


def test_trunk_weights_from_a_torchvision_resnet_state_dict(tiny_set, tmp_path, capsys):
    """--backbone-weights loads a torchvision ResNet-18 state dict (saved here) into an oriented
    model's trunk; with the backbone frozen throughout, the trunk ends as the file has it."""
    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(weights=None)
    weights = tmp_path / "resnet18.pt"
    torch.save(resnet.state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_set), "--output", str(out), "--model", "oriented-rcnn-resnet18-fpn-lite",
                 "--image-size", "96", "--batch-size", "2", "--device", "cpu", "--epochs", "1",
                 "--schedule", "always-frozen", "--cache", "off", "--backbone-weights", str(weights)]) == 0
    assert "skipped 2 not in it (fc)" in capsys.readouterr().out
    model = checkpoint(out)["model"]
    for name, value in resnet.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(model[f"backbone.body.{name}"], value), name


def test_pretrained_without_torchvision_weights_names_backbone_weights(tiny_set, tmp_path, capsys):
    assert run_train(tiny_set, tmp_path / "run", "--epochs", "1", "--pretrained") == 1
    err = one_line_error(capsys)
    assert MODEL in err and "--backbone-weights" in err
    assert not (tmp_path / "run").exists()


def test_degenerate_rotated_labels(tiny_set, tmp_path, capsys):
    """A sliver (a polygon of almost no width) and a polygon with its corners out of order train
    as rotated boxes with finite losses; a polygon of no area stops the run at load, naming
    file and line."""
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    label = sorted((data / "train" / "labelTxt").iterdir())[0]
    label.write_text(label.read_text() + "10 10 60 40 60.2 39.7 10.2 9.7 plane 0\n"  # 0.35 px wide
                     + "20 20 50 50 50 20 20 50 storage-tank 0\n")  # a bow tie: corners crossed
    result = train(config(data, tmp_path / "run", epochs=2, cache="float32:cpu=64MB"))
    assert all(math.isfinite(v) for r in result.history for v in r.losses.values())
    from dbf_ext.train import load_dataset

    boxes = load_dataset(data, "train", box_type="obb").load_target(0)["boxes"][-2:]
    assert boxes[0, 3] < 0.5 and boxes[0, 2] > 50  # the sliver: long and thin
    assert torch.allclose(boxes[1, 2:4], torch.tensor([30.0, 30.0]))  # the bow tie's square hull
    label.write_text(label.read_text() + "5 5 25 5 25 5 5 5 plane 0\n")  # height 0
    line = len(label.read_text().splitlines())
    capsys.readouterr()
    assert run_train(data, tmp_path / "run2", "--epochs", "1") == 1
    assert f"{label}:{line}: degenerate polygon" in one_line_error(capsys)


def test_shipped_demo_trunk_is_a_small_float16_state_dict_of_the_demo_model():
    from dbf_ext.models import build_detector, load_backbone_weights
    from dbf_ext.train.demo import DEMO_MODEL, pretrained_trunk_path

    path = pretrained_trunk_path()
    assert path.stat().st_size < 4 * 2**20
    weights = torch.load(path, weights_only=True)
    assert {value.dtype for value in weights.values()} == {torch.float16, torch.int64}  # int64: BN counters
    model = build_detector(DEMO_MODEL, 4, 256)
    trunk = model.backbone.body.state_dict()
    assert "loaded 54 tensors into the trunk, skipped 0" in load_backbone_weights(model, path)
    assert sum(v.numel() for k, v in trunk.items() if v.is_floating_point()) < 1.5e6
    for name, value in model.backbone.body.state_dict().items():
        assert torch.equal(value, weights[name].to(value.dtype)), name


def test_demo_sequence_with_comparison_on_a_small_set(tmp_path, monkeypatch, capsys):
    """The demo's whole sequence, small: the synthetic set is generated, the DBF run starts from
    the shipped trunk with the cache, --compare trains the full fine-tuning baseline, and the
    summary compares the two; the plot is written."""
    from dbf_ext.train import output_console
    from dbf_ext.train.demo import DEMO_MODEL, pretrained_trunk_path, run_demo

    monkeypatch.setenv("DBF_EXT_CACHE", str(tmp_path / "cache"))
    synthetic = SyntheticConfig(tile_size=128, train_tiles=4, val_tiles=2, min_objects=2, max_objects=4)
    result, rows, plot = run_demo(tmp_path / "demo", output_console(), epochs=3, unfrozen_epochs=(0,),
                                  device="cpu", compare=True, synthetic=synthetic)
    printed = capsys.readouterr().out
    assert f"backbone weights from {pretrained_trunk_path()}: loaded 54 tensors" in printed
    assert result.config.model == DEMO_MODEL and result.map_name == "rotated mAP50"
    assert [r.frozen for r in result.history] == [False, True, True]
    assert result.history[2].cache_hit_rate > 0  # flips both ways: some of the 4 keys repeat
    baseline = log_lines(tmp_path / "demo" / "full_fine_tuning")
    assert [r["frozen"] for r in baseline] == [False] * 3 and baseline[0]["cache_hit_rate"] is None
    dbf_seconds = sum(r.seconds for r in result.history)
    full_seconds = sum(r["seconds"] for r in baseline)
    names = [name for name, _ in rows]
    assert names == ["full fine-tuning: training time, rotated mAP50",
                     "DBF + cache: training time / full fine-tuning's",
                     "DBF + cache: rotated mAP50 - full fine-tuning's"]
    assert rows[1][1].endswith(f"= {dbf_seconds / full_seconds:.2f}")
    assert rows[2][1].endswith(f"= {result.final_map50 - baseline[-1]['map50']:+.3f}")
    assert plot == tmp_path / "demo" / "demo.png" and plot.stat().st_size > 10_000

