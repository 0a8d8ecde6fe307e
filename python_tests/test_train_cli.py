"""The training loop through the command line: a tiny end-to-end run, resume, eval, errors."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dbf_ext.cli import main
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import CheckpointError, TrainConfig, flip_boxes, load_checkpoint, parse_cache_spec, train


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache", ["bfloat16:gpu=256MB", "float8_e4m3:cpu=64MB", "float32:disk=64MB"])
def test_cuda_training_with_each_cache_tier(tiny_set, tmp_path, capsys, cache):
    """The main job on a GPU (AMP on): DBF with the cache in GPU memory, pinned host memory or
    on disk; frozen epochs after the first are served from the cache, losses stay finite."""
    out = tmp_path / "run"
    assert run_train(tiny_set, out, "--device", "cuda", "--epochs", "4", "--hflip", "0",
                     "--cache", cache, "--cache-dir", str(tmp_path / "cache")) == 0
    records = log_lines(out)
    assert [r["frozen"] for r in records] == [False, True, True, True]
    assert records[1]["cache_hit_rate"] == 0.0
    assert records[2]["cache_hit_rate"] == 1.0 and records[3]["cache_hit_rate"] == 1.0
    assert all(torch.isfinite(torch.tensor(list(r["losses"].values()))).all() for r in records)
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cuda"]) == 0
    assert "mAP@0.5" in capsys.readouterr().out


class Interrupted(Exception):
    pass


def test_resume_continues_exactly(tiny_set, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # On the CPU: there a training is bit-repeatable (on CUDA, cuDNN and torchvision's RoIAlign
    # backward accumulate with atomics, and two identical runs differ in the last bits).
    common = ("--cache", "off", "--hflip", "0.5", "--epochs", "3", "--device", "cpu")
    assert run_train(tiny_set, straight, *common) == 0

    def stop_after_epoch_1(record):
        if record.epoch == 1:
            raise Interrupted

    config = TrainConfig(data=str(tiny_set), output_dir=str(resumed), image_size=96, batch_size=2,
                         unfrozen_epochs=(0,), cache="off", hflip=0.5, epochs=3, device="cpu")
    with pytest.raises(Interrupted):  # a run killed after its second epoch's checkpoint
        train(config, on_epoch_end=stop_after_epoch_1)
    assert run_train(tiny_set, resumed, "--resume", *common) == 0
    assert [r["epoch"] for r in log_lines(resumed)] == [0, 1, 2]
    assert run_train(tiny_set, straight, "--overwrite", *common) == 0  # a new run in the same folder
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


# ----- crashes, resume, run folders ------------------------------------------------------------


def checkpoint_history(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["history"]


def assert_same_model(a, b):
    a = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


CRASH_COMMON = ("--cache", "off", "--hflip", "0.5", "--epochs", "4", "--device", "cpu")  # bitwise: CPU

# A training run in a child process that kills itself with SIGKILL (no cleanup, no finally:
# what a power cut or the OOM killer does) at a chosen point of its third epoch.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    from dbf_ext.cli import main

    where, argv = sys.argv[1], sys.argv[2:]
    calls = {"step": 0, "save": 0, "replace": 0}

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    step, save, replace = torch.optim.SGD.step, torch.save, os.replace

    def counted_step(self, *args, **kwargs):
        calls["step"] += 1
        if where == "mid-epoch" and calls["step"] == 6:  # epoch 2, its second step
            kill()
        return step(self, *args, **kwargs)

    def counted_save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if where == "writing-checkpoint" and calls["save"] == 3:
            f.write(b"PK\\x03\\x04 half a checkpoint")
            f.flush()
            kill()
        return save(obj, f, *args, **kwargs)

    def counted_replace(src, dst):
        replace(src, dst)
        if str(dst).endswith("checkpoint.pt"):
            calls["replace"] += 1
            if where == "after-checkpoint" and calls["replace"] == 3:
                kill()

    torch.optim.SGD.step, torch.save, os.replace = counted_step, counted_save, counted_replace
    sys.exit(main(argv))
""")


@pytest.fixture(scope="module")
def straight_run(tiny_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_train(tiny_set, out, *CRASH_COMMON) == 0
    return out


@pytest.mark.parametrize("where", ["mid-epoch", "writing-checkpoint", "after-checkpoint"])
def test_killed_run_resumes_with_log_and_checkpoint_in_agreement(tiny_set, straight_run, tmp_path, where):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_set), "--output", str(out), "--image-size", "96",
            "--batch-size", "2", "--unfrozen-epochs", "0", *CRASH_COMMON]
    child = subprocess.run([sys.executable, "-P", "-c", KILLED_RUN, where, *argv],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr  # killed, not finished or failed
    done = checkpoint_history(out)
    assert [r["epoch"] for r in done] == ([0, 1, 2] if where == "after-checkpoint" else [0, 1])
    if where == "mid-epoch":  # a line written past the checkpoint, cut off by the crash
        with (out / "log.jsonl").open("a") as log:
            log.write(json.dumps({**done[-1], "epoch": 7}) + "\n" + '{"epoch": 8, "fro')
    assert run_train(tiny_set, out, "--resume", *CRASH_COMMON) == 0
    history = checkpoint_history(out)
    assert log_lines(out) == history  # the log says what the checkpoint holds, line for line
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert history[: len(done)] == done  # epochs before the crash are not redone
    for x, y in zip(log_lines(straight_run), history):
        assert x["losses"] == y["losses"]
    assert_same_model(straight_run, out)  # and the resumed run ends where an unbroken one does


def test_run_folder_rules(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(tiny_set, out, "--resume", "--epochs", "1") == 1
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(out) in err and err.count("\n") == 1
    assert not (out / "log.jsonl").exists()
    assert run_train(tiny_set, out, "--epochs", "1", "--cache", "off") == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert run_train(tiny_set, out, "--epochs", "1", "--cache", "off") == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing of the old run was touched
    assert run_train(tiny_set, out, "--epochs", "1", "--resume", "--overwrite") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run_train(tiny_set, out, "--epochs", "2", "--cache", "off", "--overwrite") == 0
    assert [r["epoch"] for r in log_lines(out)] == [0, 1]


# ----- one-line errors ---------------------------------------------------------------------------


def one_line_error(capsys, command="train"):
    err = capsys.readouterr().err
    assert err.startswith(f"dbf-ext {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def finished_run(tiny_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(tiny_set, out, "--epochs", "1", "--cache", "off") == 0
    return out


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "a pickle", "not a training checkpoint"])
def test_corrupt_checkpoint_is_a_one_line_error(tiny_set, finished_run, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoint.pt"
    if damage == "garbage":
        checkpoint.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:-5000])
    elif damage == "empty":
        checkpoint.write_bytes(b"")
    elif damage == "a pickle":
        import pickle

        checkpoint.write_bytes(pickle.dumps(print))
    else:
        torch.save({"weights": torch.zeros(3)}, checkpoint)
    capsys.readouterr()
    assert run_train(tiny_set, out, "--resume", "--epochs", "2", "--cache", "off") == 1
    assert str(checkpoint) in one_line_error(capsys)
    assert main(["eval", "--checkpoint", str(checkpoint)]) == 1
    assert str(checkpoint) in one_line_error(capsys, "eval")


def test_any_garbage_checkpoint_is_a_checkpoint_error(tmp_path):
    """Random bytes drive torch's unpickler into many different failures (the first CI run met
    an IndexError from os.urandom bytes): every one must become the one-line CheckpointError."""
    path = tmp_path / "checkpoint.pt"
    for seed in range(200):
        path.write_bytes(random.Random(seed).randbytes(seed * 37 % 5000))
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_checkpoint(path)


def test_checkpoint_of_another_model_is_a_one_line_error(tiny_set, finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    assert run_train(tiny_set, out, "--resume", "--epochs", "2", "--model", "resnet18-fpn-lite") == 1
    assert "tiny-fpn" in one_line_error(capsys)
    # Weights of one model under the name of another (eval builds the model the checkpoint names)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["model"] = "resnet18-fpn-lite"
    torch.save(state, out / "renamed.pt")
    assert main(["eval", "--checkpoint", str(out / "renamed.pt")]) == 1
    assert "do not fit" in one_line_error(capsys, "eval")
    # Weights for other classes: the checkpoint's class list does not match this data
    other = tmp_path / "other"
    shutil.copytree(tiny_set, other)
    renamed = state["classes"][0]
    for split in ("train", "val"):
        for label in (other / split / "labelTxt").iterdir():
            label.write_text(label.read_text().replace(f" {renamed} ", " airliner "))
    assert main(["train", "--data", str(other), "--output", str(out), "--image-size", "96",
                 "--resume", "--epochs", "2", "--cache", "off"]) == 1
    assert "airliner" in one_line_error(capsys)


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device"),
    ("cuda:banana", "--device"),
    ("meta", "--device"),
    (f"cuda:{torch.cuda.device_count()}", "CUDA device"),  # one past the last GPU, if any
    ("cuda" if not torch.cuda.is_available() else "cuda:99", "CUDA device"),
])
def test_bad_device_is_a_one_line_error(tiny_set, finished_run, tmp_path, capsys, device, message):
    assert run_train(tiny_set, tmp_path / "run", "--epochs", "1", "--device", device) == 1
    assert message in one_line_error(capsys) and not (tmp_path / "run").exists()
    assert main(["eval", "--checkpoint", str(finished_run / "checkpoint.pt"), "--device", device]) == 1
    assert message in one_line_error(capsys, "eval")


def test_output_path_that_is_a_file_is_a_one_line_error(tiny_set, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    assert run_train(tiny_set, tmp_path / "taken", "--epochs", "1") == 1
    assert "is a file" in one_line_error(capsys)
    assert run_train(tiny_set, tmp_path / "taken" / "run", "--epochs", "1") == 1
    assert "taken" in one_line_error(capsys)
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_diverging_loss_is_a_one_line_error_naming_epoch_and_step(tiny_set, tmp_path, capsys):
    assert run_train(tiny_set, tmp_path / "run", "--epochs", "3", "--cache", "off", "--lr", "1e30") == 1
    err = one_line_error(capsys)
    assert re.search(r"loss became (nan|inf|-inf) in epoch \d+, step \d+ of 2", err), err
    assert "--lr" in err


def test_cache_folder_problems_are_one_line_errors(tiny_set, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    folders = [tmp_path / "file" / "cache"]  # a file in the way
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        folders.append(locked / "cache")
    for folder in folders:
        assert run_train(tiny_set, tmp_path / "run", "--epochs", "1", "--cache", "float32:disk=1GB",
                         "--cache-dir", str(folder), "--overwrite") == 1
        assert str(folder.parent) in one_line_error(capsys)


def test_unfrozen_epoch_ranges_must_increase(tiny_set, tmp_path, capsys):
    assert run_train(tiny_set, tmp_path / "run", "--epochs", "6", "--unfrozen-epochs", "5-2") == 1
    assert "5-2" in one_line_error(capsys) and not (tmp_path / "run").exists()


def test_degenerate_polygon_stops_training_at_load_with_file_and_line(tiny_set, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    label = sorted((data / "train" / "labelTxt").iterdir())[1]
    label.write_text(label.read_text() + "5 5 25 5 25 5 5 5 plane 0\n")  # height 0
    line = len(label.read_text().splitlines())
    assert run_train(data, tmp_path / "run", "--epochs", "1") == 1
    assert f"{label}:{line}: degenerate polygon" in one_line_error(capsys)
    # --label-errors warn drops it (with the warning) and trains
    with pytest.warns(UserWarning, match=f"{label.name}:{line}: degenerate polygon"):
        assert run_train(data, tmp_path / "run", "--epochs", "1", "--label-errors", "warn") == 0


# ----- eval, help, piped output ----------------------------------------------------------------


def test_eval_takes_the_classes_from_the_checkpoint(tiny_set, finished_run, tmp_path, capsys):
    classes = torch.load(finished_run / "checkpoint.pt", weights_only=True)["classes"]
    assert classes == sorted(classes) and len(classes) >= 2
    # The training data is gone; a validation copy elsewhere lacks the first class entirely.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_set / "val", moved / "test")
    for label in (moved / "test" / "labelTxt").iterdir():
        label.write_text("".join(line + "\n" for line in label.read_text().splitlines()
                                 if not line.endswith(f" {classes[0]} 0") and not line.endswith(f" {classes[0]} 1")))
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"]["data"] = str(tmp_path / "deleted")
    torch.save(state, run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(moved), "--split", "test"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == classes  # every class, in the checkpoint's order


def test_every_option_has_help():
    import argparse

    from dbf_ext.cli import build_parser

    def parsers(parser):
        yield parser.prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{prog} {'/'.join(action.option_strings) or action.dest}"
               for prog, parser in parsers(build_parser()) for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and not (action.help or "").strip()]
    assert missing == []


def test_piped_output_keeps_every_figure_on_its_line(tiny_set, tmp_path):
    log = tmp_path / "stdout.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    with log.open("w") as stdout:
        subprocess.run([sys.executable, "-P", "-m", "dbf_ext", "train", "--data", str(tiny_set),
                        "--output", str(tmp_path / "run"), "--image-size", "96", "--batch-size", "2",
                        "--epochs", "2", "--eval-every", "1", "--cache", "float32:cpu=64MB"],
                       stdout=stdout, check=True, timeout=300, env=env)
    lines = log.read_text().splitlines()
    epoch_line = re.compile(r"epoch +\d+  (trained|frozen ) +[\d.]+ s +[\d.]+ img/s  loss [\d.]+"
                            r"  cache hits +\d+%  mAP50 \d\.\d{3}")
    assert sum(bool(epoch_line.fullmatch(line)) for line in lines) == 2, lines
    assert any(re.search(r"mAP50 \(VOC07, val\) +│ +\d\.\d{3} │", line) for line in lines), lines
    for line in lines:  # no figure or figure-less label alone on a line
        assert not re.fullmatch(r"[\s│]*[\d.]+%?[\s│]*", line), lines


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_mid_epoch_is_a_one_line_error_naming_it(tiny_set, tmp_path, capsys, workers):
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    image = sorted((data / "train" / "images").iterdir())[2]
    image.write_bytes(image.read_bytes()[:300])  # truncated: the header reads, the pixels do not
    assert run_train(data, tmp_path / "run", "--epochs", "1", "--cache", "off",
                     "--workers", str(workers)) == 1
    assert f"{image}: cannot read the image" in one_line_error(capsys)


def test_feature_enhancement_is_added_in_trained_epochs_only(tiny_set, tmp_path):
    out = tmp_path / "run"
    assert run_train(tiny_set, out, "--epochs", "2", "--cache", "off", "--feature-enhancement",
                     "--fe-l2-weight", "2e-4", "--fe-variance-weight", "0.5") == 0
    trained, frozen = log_lines(out)
    parts = trained["feature_enhancement"]
    assert parts["l2"] > 0 and parts["variance"] > 0
    # Equal batches (4 tiles, 2 per step): the image-weighted loss mean is the step mean.
    assert trained["losses"]["feature_enhancement"] == pytest.approx(
        2e-4 * parts["l2"] - 0.5 * parts["variance"], rel=1e-5)
    assert frozen["frozen"] and frozen["feature_enhancement"] is None
    assert "feature_enhancement" not in frozen["losses"]


def test_mutdet_recipe_always_frozen_pretraining_then_fine_tuning_from_it(tiny_set, tmp_path, capsys):
    """Pre-train neck and heads with the backbone frozen throughout (the cache serves every
    epoch after the first), then fine-tune from that checkpoint with the backbone trainable:
    into the same model, and into another variant, where what does not fit is skipped."""
    pretrained = tmp_path / "pretrain"
    assert run_train(tiny_set, pretrained, "--schedule", "always-frozen", "--epochs", "3", "--hflip", "0",
                     "--cache", "bfloat16:cpu=64MB") == 0
    records = log_lines(pretrained)
    assert all(r["frozen"] for r in records)
    assert [r["cache_hit_rate"] for r in records] == [0.0, 1.0, 1.0]
    checkpoint = pretrained / "checkpoint.pt"
    pretrained_weights = torch.load(checkpoint, weights_only=True)["model"]

    capsys.readouterr()
    same = tmp_path / "finetune"
    config = TrainConfig(data=str(tiny_set), output_dir=str(same), image_size=96, batch_size=2, epochs=2,
                         schedule="never-frozen", cache="off", init_from=str(checkpoint),
                         feature_enhancement=True, device="cpu")
    result = train(config)
    report = result.init_report
    assert sorted(report.loaded) == sorted(pretrained_weights) and not report.skipped
    assert not report.missing and not report.unused
    out = capsys.readouterr().out
    assert f"loaded {len(pretrained_weights)} of the model's {len(pretrained_weights)} tensors" in out
    # A new run, not a resume: its own log from epoch 0, the backbone trains.
    assert [r["epoch"] for r in log_lines(same)] == [0, 1] and not any(r["frozen"] for r in log_lines(same))
    assert all(torch.isfinite(torch.tensor(list(r.losses.values()))).all() for r in result.history)
    fine_tuned = torch.load(same / "checkpoint.pt", weights_only=True)
    assert fine_tuned["epoch"] == 1 and fine_tuned["config"]["init_from"] == str(checkpoint)
    trunk_key = "backbone.body.layer1.0.0.weight"
    assert not torch.equal(fine_tuned["model"][trunk_key], pretrained_weights[trunk_key])  # it trained

    other = tmp_path / "finetune-other"
    assert run_train(tiny_set, other, "--init-from", str(checkpoint), "--model", "resnet18-fpn-lite",
                     "--schedule", "never-frozen", "--epochs", "1", "--cache", "off") == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    loaded, skipped, missing, unused = (next(line for line in lines if line.startswith(word))
                                        for word in ("loaded", "skipped", "missing", "unused"))
    # The heads fit (same widths), the trunks do not: a ResNet-18's layer1 has other shapes,
    # its layer3 / layer4 are not in the tiny trunk, the tiny trunk's stem not in the ResNet.
    assert "roi_heads.box_predictor.cls_score.weight" not in skipped and int(loaded.split()[1]) > 10
    assert "backbone.body.layer1.0.conv1.weight" not in skipped  # a name only the ResNet has
    assert "backbone.body.layer2.0.0.weight [96, 64, 3, 3] -> " not in skipped
    assert "backbone.fpn.inner_blocks.0.0.weight [64, 64, 1, 1] -> [64, 128, 1, 1]" in skipped
    assert "backbone.body.layer4.0.conv1.weight" in missing and "backbone.body.stem.0.0.weight" in unused
    assert all(torch.isfinite(torch.tensor(list(r["losses"].values()))).all() for r in log_lines(other))


def test_init_from_faults(tiny_set, finished_run, tmp_path, capsys):
    capsys.readouterr()
    assert run_train(tiny_set, tmp_path / "a", "--epochs", "1", "--init-from", str(tmp_path / "none.pt")) == 1
    assert "does not exist" in one_line_error(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((finished_run / "checkpoint.pt").read_bytes()[:-5000])
    assert run_train(tiny_set, tmp_path / "b", "--epochs", "1", "--init-from", str(corrupt)) == 1
    assert "cannot be read" in one_line_error(capsys)
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, foreign)
    assert run_train(tiny_set, tmp_path / "c", "--epochs", "1", "--init-from", str(foreign)) == 1
    assert "no tensor" in one_line_error(capsys)
    torch.save({"weights": [1, 2]}, foreign)
    assert run_train(tiny_set, tmp_path / "c", "--epochs", "1", "--init-from", str(foreign)) == 1
    assert "neither" in one_line_error(capsys)
    assert run_train(tiny_set, finished_run, "--epochs", "2", "--resume",
                     "--init-from", str(finished_run / "checkpoint.pt")) == 1
    assert "exclude each other" in one_line_error(capsys)

    # A plain state dict whose box predictor was trained for 3 classes: skipped, reported.
    weights = torch.load(finished_run / "checkpoint.pt", weights_only=True)["model"]
    weights["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 256)
    state_dict = tmp_path / "state_dict.pt"
    torch.save(weights, state_dict)
    assert run_train(tiny_set, tmp_path / "d", "--epochs", "1", "--cache", "off",
                     "--init-from", str(state_dict)) == 0
    out = capsys.readouterr().out
    assert f"loaded {len(weights) - 1} of the model's {len(weights)} tensors" in out
    assert ("skipped (shape differs, file -> model) 1: "
            "roi_heads.box_predictor.cls_score.weight [3, 256] -> [4, 256]") in out
