"""mmcv 1.7 + mmdet 2.28 + mmrotate 0.3.4 on dbf_ext's mmcv._ext shim: mmrotate's detectors
from their own configs, and DBFHook in an mmcv EpochBasedRunner (run by test_openmmlab.py inside
the mmcv1 environment)."""

from __future__ import annotations

import copy
import logging
import pathlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dbf_ext.integrations import mmcv_ops

mmcv_ops.install()

import mmrotate  # noqa: E402
from mmcv import Config  # noqa: E402
from mmcv.parallel import MMDataParallel  # noqa: E402
from mmcv.runner import HOOKS, Hook, build_optimizer, build_runner  # noqa: E402
from mmdet.datasets import build_dataloader  # noqa: E402
from mmrotate.datasets import build_dataset  # noqa: E402
from mmrotate.models import build_detector  # noqa: E402

import dbf_ext.integrations.mmcv  # noqa: E402,F401  (registers DBFHook)
import dbf_ext.ops  # noqa: E402
from dbf_ext.freeze import FrozenBackbone  # noqa: E402

CONFIGS = pathlib.Path(mmrotate.__file__).parent / ".mim" / "configs"
needs_roi_align_rotated = pytest.mark.skipif(
    not hasattr(dbf_ext.ops, "roi_align_rotated"),
    reason="runs once dbf_ext.ops.roi_align_rotated exists (the oriented-detector kernel)")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="mmrotate 0.3.4's single-stage heads make their anchors on device='cuda' by default")


def _small(config: Config) -> Config:
    """Random initialisation, no downloads, and fewer sampled RoIs / proposals so a CPU step is
    quick; the architecture is the config's."""
    config.model.backbone.init_cfg = None
    for stage in ("train_cfg", "test_cfg"):
        settings = config.model.get(stage) or {}
        for head in ("rpn_proposal", "rpn"):
            if isinstance(settings.get(head), dict) and "max_per_img" in settings[head]:
                settings[head].max_per_img = 64
                settings[head].nms_pre = 256
        rcnn = settings.get("rcnn")
        for stage_cfg in rcnn if isinstance(rcnn, list) else [rcnn]:
            if isinstance(stage_cfg, dict) and "sampler" in stage_cfg:
                stage_cfg.sampler.num = 64
    return config


def _batch(size: int, device: str):
    images = torch.rand(2, 3, size, size, device=device)
    metas = [dict(img_shape=(size, size, 3), pad_shape=(size, size, 3), ori_shape=(size, size, 3),
                  scale_factor=np.ones(4, dtype=np.float32), flip=False, flip_direction=None,
                  filename=f"image{i}.png") for i in range(2)]
    boxes = [torch.tensor([[30.0, 34.0, 36.0, 18.0, 0.4], [80.0, 70.0, 40.0, 24.0, -0.7]], device=device),
             torch.tensor([[64.0, 60.0, 50.0, 30.0, 1.2]], device=device)]
    labels = [torch.tensor([0, 3], device=device), torch.tensor([5], device=device)]
    return images, metas, boxes, labels


def _train_step_and_predict(config_name: str, device: str = "cpu", size: int = 128):
    config = _small(Config.fromfile(CONFIGS / config_name))
    torch.manual_seed(0)
    model = build_detector(config.model).to(device)
    model.init_weights()
    images, metas, boxes, labels = _batch(size, device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    losses = model(img=images, img_metas=metas, gt_bboxes=boxes, gt_labels=labels)
    loss, log_vars = model._parse_losses(losses)
    assert torch.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        results = model(img=[images[:1]], img_metas=[metas[:1]], return_loss=False, rescale=True)
    per_class = results[0]
    assert len(per_class) == 15  # DOTA classes
    assert all(r.ndim == 2 and r.shape[1] == 6 for r in per_class)  # (cx, cy, w, h, theta, score)
    return log_vars


def test_rotated_faster_rcnn_trains_and_predicts():
    log_vars = _train_step_and_predict("rotated_faster_rcnn/rotated_faster_rcnn_r50_fpn_1x_dota_le90.py")
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} <= set(log_vars)


@needs_roi_align_rotated
def test_oriented_rcnn_trains_and_predicts():
    _train_step_and_predict("oriented_rcnn/oriented_rcnn_r50_fpn_1x_dota_le90.py")


@needs_roi_align_rotated
def test_roi_transformer_trains_and_predicts():
    log_vars = _train_step_and_predict("roi_trans/roi_trans_r50_fpn_1x_dota_le90.py")
    assert {"s0.loss_bbox", "s1.loss_bbox"} <= set(log_vars)


@needs_gpu
def test_rotated_retinanet_trains_and_predicts_on_gpu():
    _train_step_and_predict("rotated_retinanet/rotated_retinanet_obb_r50_fpn_1x_dota_le90.py", "cuda")


# ---- DBFHook in an EpochBasedRunner ----

_CLASSES = ("plane", "ship", "small-vehicle")


def _write_dota(root: pathlib.Path, count: int = 4, size: int = 96) -> None:
    """A tiny DOTA-format dataset: images with bright rotated rectangles and their polygons."""
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    generator = np.random.default_rng(0)
    for index in range(count):
        image = generator.integers(0, 60, (size, size, 3), dtype=np.uint8)
        lines = []
        for obj in range(2):
            cx, cy = generator.uniform(25, size - 25, 2)
            w, h, theta = generator.uniform(14, 30), generator.uniform(8, 16), generator.uniform(-1.5, 1.5)
            c, s = np.cos(theta), np.sin(theta)
            corners = [(cx + dx * c - dy * s, cy + dx * s + dy * c)
                       for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))]
            ys, xs = np.mgrid[:size, :size]
            along, across = (xs - cx) * c + (ys - cy) * s, -(xs - cx) * s + (ys - cy) * c
            inside = (np.abs(along) <= w / 2) & (np.abs(across) <= h / 2)
            image[inside] = 200 + 20 * obj
            lines.append(" ".join(f"{v:.1f}" for xy in corners for v in xy) + f" {_CLASSES[(index + obj) % 3]} 0")
        Image.fromarray(image).save(root / "images" / f"P{index:04d}.png")
        (root / "labelTxt" / f"P{index:04d}.txt").write_text("\n".join(lines) + "\n")


@HOOKS.register_module(force=True)
class RecordBackboneHook(Hook):
    """Keeps the backbone's state and the cache's hit count after each epoch."""

    records: list = []

    def after_train_epoch(self, runner):
        detector = runner.model.module
        RecordBackboneHook.records.append({
            "epoch": runner.epoch,
            "backbone": copy.deepcopy(detector.backbone.state_dict()),
            "hits": detector.backbone.cache.stats.hits,
            "frozen": detector.backbone.frozen,
        })


def _runner_config(data_root: pathlib.Path, work_dir: pathlib.Path, max_epochs: int) -> Config:
    config = _small(Config.fromfile(CONFIGS / "rotated_faster_rcnn/rotated_faster_rcnn_r50_fpn_1x_dota_le90.py"))
    config.model.backbone.update(depth=18, init_cfg=None)
    config.model.neck.in_channels = [64, 128, 256, 512]
    norm = config.img_norm_cfg
    config.data.train.update(
        ann_file=f"{data_root}/labelTxt/", img_prefix=f"{data_root}/images/",
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                  dict(type="RResize", img_scale=(96, 96)),
                  dict(type="RRandomFlip", flip_ratio=1.0, direction="horizontal", version="le90"),
                  dict(type="Normalize", **norm), dict(type="Pad", size_divisor=32),
                  dict(type="DefaultFormatBundle"), dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"])])
    config.work_dir = str(work_dir)
    config.runner = dict(type="EpochBasedRunner", max_epochs=max_epochs)
    config.optimizer = dict(type="SGD", lr=0.005, momentum=0.9, weight_decay=1e-4)
    config.lr_config = dict(policy="fixed")
    config.checkpoint_config = dict(interval=1)
    config.log_config = dict(interval=1, hooks=[dict(type="TextLoggerHook")])
    config.custom_hooks = [
        dict(type="DBFHook", schedule=dict(type="StepInterval", unfrozen_epochs=[0, 3]),
             cache=dict(storage_dtype="float32", cpu_bytes="256MB")),
        dict(type="RecordBackboneHook", priority="LOWEST"),
    ]
    return config


def _train(config: Config, resume_from: str | None = None):
    """mmrotate's train_detector, on the CPU (it moves the model to CUDA unconditionally)."""
    dataset = build_dataset(config.data.train)
    loader = build_dataloader(dataset, samples_per_gpu=2, workers_per_gpu=0, num_gpus=1, dist=False,
                              shuffle=False, seed=0, persistent_workers=False)
    torch.manual_seed(0)
    model = build_detector(config.model)
    model.init_weights()
    model = MMDataParallel(model)
    optimizer = build_optimizer(model, config.optimizer)
    runner = build_runner(config.runner, default_args=dict(
        model=model, optimizer=optimizer, work_dir=config.work_dir,
        logger=logging.getLogger("mmcv1-runner"), meta=dict()))
    runner.register_training_hooks(config.lr_config, config.optimizer_config, config.checkpoint_config,
                                   config.log_config, custom_hooks_config=config.custom_hooks)
    if resume_from:
        runner.resume(resume_from)
    runner.run([loader], [("train", 1)])
    return runner


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_epoch_runner_with_dbf_hook_freezes_caches_and_resumes(tmp_path):
    _write_dota(tmp_path / "dota")
    RecordBackboneHook.records = []
    runner = _train(_runner_config(tmp_path / "dota", tmp_path / "run", max_epochs=4))
    records = RecordBackboneHook.records
    assert [r["frozen"] for r in records] == [False, True, True, False]
    assert _same(records[0]["backbone"], records[1]["backbone"])  # frozen: bit-identical,
    assert _same(records[0]["backbone"], records[2]["backbone"])  # running statistics included
    assert not _same(records[2]["backbone"], records[3]["backbone"])
    # epoch 1 stores the 4 samples (2 iterations), epoch 2 is served from the cache
    assert records[1]["hits"] == 0 and records[2]["hits"] == 4
    detector = runner.model.module
    assert isinstance(detector.backbone.backbone, FrozenBackbone)

    checkpoint = torch.load(tmp_path / "run" / "epoch_2.pth", map_location="cpu", weights_only=False)
    assert not any(".backbone.backbone." in key or key.startswith("backbone.backbone.")
                   for key in checkpoint["state_dict"])  # the unwrapped model's keys
    assert checkpoint["meta"]["dbf"]["controller"] == {
        "epoch": 1, "frozen": True, "schedule": {"type": "StepInterval", "unfrozen_epochs": [0, 3]}}

    RecordBackboneHook.records = []
    resumed = _train(_runner_config(tmp_path / "dota", tmp_path / "resumed", max_epochs=4),
                     resume_from=str(tmp_path / "run" / "epoch_2.pth"))
    records = RecordBackboneHook.records
    assert [r["epoch"] for r in records] == [2, 3] and [r["frozen"] for r in records] == [True, False]
    saved = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    assert _same(records[0]["backbone"], saved)  # the resumed frozen epoch keeps the weights
    assert not _same(records[1]["backbone"], saved)
    assert resumed.model.module.backbone.cache.stats.misses == 4 + 4  # counters resumed, cache rebuilt


def test_unkeyable_pipeline_is_detected_on_a_real_dataset(tmp_path):
    from dbf_ext.integrations.openmmlab import DBFHookCore

    _write_dota(tmp_path / "dota", count=1)
    config = _runner_config(tmp_path / "dota", tmp_path / "run", max_epochs=1)
    config.data.train.pipeline.insert(3, dict(type="PolyRandomRotate", rotate_ratio=0.5, version="le90"))
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"))
    core.attach(build_detector(config.model))
    with pytest.warns(UserWarning, match="PolyRandomRotate"):
        core.check_pipeline(build_dataset(config.data.train))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.sample_key({"filename": "P0000.png", "flip": False, "flip_direction": None,
                                "img_shape": (96, 96, 3), "scale_factor": np.ones(4)}) is None


def test_launcher_installs_the_shim_before_a_script_imports_mmrotate(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text("import sys\nimport mmrotate.models, mmcv.ops\n"
                      "print('args', sys.argv[1:], mmcv.ops.get_compiler_version())\n")
    result = subprocess.run([sys.executable, "-m", "dbf_ext.integrations.mmcv_ops", str(script),
                             "config.py", "--work-dir", "x"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "args ['config.py', '--work-dir', 'x'] none: mmcv._ext is dbf_ext" in result.stdout
    usage = subprocess.run([sys.executable, "-m", "dbf_ext.integrations.mmcv_ops"], capture_output=True,
                           text=True, timeout=600)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_iteration_based_runner_decides_per_iters_per_epoch(tmp_path):
    _write_dota(tmp_path / "dota", count=2)
    config = _runner_config(tmp_path / "dota", tmp_path / "run", max_epochs=1)
    config.runner = dict(type="IterBasedRunner", max_iters=4)
    config.checkpoint_config = dict(interval=4, by_epoch=False)
    config.custom_hooks = [dict(type="DBFHook", schedule=dict(type="StepInterval", unfrozen_epochs=[1]),
                                cache=dict(storage_dtype="float32", cpu_bytes="64MB"), iters_per_epoch=2)]
    import dbf_ext.integrations.openmmlab as core_module

    decisions = []
    original = core_module.DBFHookCore.begin_epoch

    def spy(core, epoch):
        changed = original(core, epoch)
        decisions.append((epoch, core.controller.is_frozen))
        return changed

    core_module.DBFHookCore.begin_epoch = spy
    try:
        runner = _train(config)
    finally:
        core_module.DBFHookCore.begin_epoch = original
    # one batch of 2 images per iteration, 2 iterations per schedule epoch
    assert decisions == [(0, True), (0, True), (1, False), (1, False)]
    checkpoint = torch.load(tmp_path / "run" / "iter_4.pth", map_location="cpu", weights_only=False)
    assert checkpoint["meta"]["dbf"]["controller"]["epoch"] == 1
    assert runner.model.module.backbone.cache.stats.hits == 2  # iteration 1 reused iteration 0's
