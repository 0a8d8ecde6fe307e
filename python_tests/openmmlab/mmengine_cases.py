"""mmengine + mmcv-lite 2.1 + mmdet 3.3 on dbf_ext's mmcv._ext shim: mmdet's Faster R-CNN from
its config, trained by mmengine's Runner with DBFHook, configured the way users do, with a
config file whose custom_imports install the shim and register the hook (run by
test_openmmlab.py inside the mmengine environment)."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys
import textwrap

import mmdet
import numpy as np
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image

from dbf_ext.freeze import FrozenBackbone

FASTER_RCNN = (pathlib.Path(mmdet.__file__).parent / ".mim" / "configs" / "faster_rcnn"
               / "faster-rcnn_r50_fpn_1x_coco.py")
CLASSES = ("plane", "ship", "vehicle")


def _write_coco(root: pathlib.Path, count: int = 4, size: int = 96) -> None:
    (root / "images").mkdir(parents=True)
    generator = np.random.default_rng(1)
    images, annotations = [], []
    for index in range(count):
        image = generator.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for obj in range(2):
            x, y = generator.integers(4, size - 40, 2)
            w, h = generator.integers(12, 34, 2)
            image[y:y + h, x:x + w] = 200 + 20 * obj
            annotations.append(dict(id=len(annotations) + 1, image_id=index + 1,
                                    category_id=(index + obj) % 3 + 1, bbox=[int(x), int(y), int(w), int(h)],
                                    area=int(w * h), iscrowd=0))
        Image.fromarray(image).save(root / "images" / f"{index}.png")
        images.append(dict(id=index + 1, file_name=f"{index}.png", height=size, width=size))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    (root / "annotations.json").write_text(json.dumps(
        dict(images=images, annotations=annotations, categories=categories)))


def _write_config(path: pathlib.Path, data_root: pathlib.Path, work_dir: pathlib.Path,
                  resume_from: pathlib.Path | None = None) -> pathlib.Path:
    """A user's config: mmdet's Faster R-CNN, small, with the shim and DBFHook."""
    path.write_text(textwrap.dedent(f"""
        _base_ = [{str(FASTER_RCNN)!r}]
        custom_imports = dict(imports=["dbf_ext.integrations.mmcv_ops.auto",
                                       "dbf_ext.integrations.mmengine", "record_hook"],
                              allow_failed_imports=False)
        custom_hooks = [
            dict(type="DBFHook", schedule=dict(type="StepInterval", unfrozen_epochs=[0, 3]),
                 cache=dict(storage_dtype="float32", cpu_bytes="256MB")),
            dict(type="RecordBackboneHook", priority="LOWEST"),
        ]
        model = dict(
            backbone=dict(depth=18, init_cfg=None),
            neck=dict(in_channels=[64, 128, 256, 512]),
            roi_head=dict(bbox_head=dict(num_classes=3)),
            train_cfg=dict(rpn_proposal=dict(nms_pre=256, max_per_img=64),
                           rcnn=dict(sampler=dict(num=64))),
            test_cfg=dict(rpn=dict(nms_pre=256, max_per_img=64)))
        train_pipeline = [
            dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
            dict(type="Resize", scale=(96, 96), keep_ratio=True),
            dict(type="RandomFlip", prob=1.0), dict(type="PackDetInputs")]
        train_dataloader = dict(
            batch_size=2, num_workers=0, persistent_workers=False, batch_sampler=None,
            sampler=dict(type="DefaultSampler", shuffle=False),
            dataset=dict(data_root={str(data_root)!r}, ann_file="annotations.json",
                         data_prefix=dict(img="images/"), metainfo=dict(classes={CLASSES!r}),
                         filter_cfg=dict(filter_empty_gt=True, min_size=0), pipeline=train_pipeline))
        val_dataloader = None
        val_cfg = None
        val_evaluator = None
        test_dataloader = None
        test_cfg = None
        test_evaluator = None
        train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=4, val_interval=100)
        param_scheduler = []
        optim_wrapper = dict(optimizer=dict(type="SGD", lr=0.005, momentum=0.9, weight_decay=1e-4))
        default_hooks = dict(logger=dict(type="LoggerHook", interval=1))
        randomness = dict(seed=0)
        work_dir = {str(work_dir)!r}
        load_from = {str(resume_from) if resume_from else None!r}
        resume = {resume_from is not None!r}
    """))
    return path


RECORD_HOOK = '''
import copy
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class RecordBackboneHook(Hook):
    """Keeps the backbone's state and the cache's counters after each epoch."""

    records = []

    def after_train_epoch(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        RecordBackboneHook.records.append({
            "epoch": runner.epoch, "backbone": copy.deepcopy(model.backbone.state_dict()),
            "hits": model.backbone.cache.stats.hits, "misses": model.backbone.cache.stats.misses,
            "frozen": model.backbone.frozen, "wrapped": type(model.backbone.backbone).__name__})
'''


def _same(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _train(config_path: pathlib.Path) -> list:
    config = Config.fromfile(str(config_path))  # custom_imports: shim, DBFHook, the recorder
    record_hook = sys.modules["record_hook"].RecordBackboneHook
    record_hook.records = []
    runner = Runner.from_cfg(config)
    runner.train()
    return copy.copy(record_hook.records)


def test_mmengine_runner_with_dbf_hook_freezes_caches_and_resumes(tmp_path, monkeypatch):
    (tmp_path / "record_hook.py").write_text(RECORD_HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    _write_coco(tmp_path / "coco")
    records = _train(_write_config(tmp_path / "config.py", tmp_path / "coco", tmp_path / "run"))
    assert [r["frozen"] for r in records] == [False, True, True, False]
    assert records[0]["wrapped"] == FrozenBackbone.__name__
    assert _same(records[0]["backbone"], records[1]["backbone"])  # frozen: bit-identical
    assert _same(records[0]["backbone"], records[2]["backbone"])
    assert not _same(records[2]["backbone"], records[3]["backbone"])
    assert records[1]["hits"] == 0 and records[2]["hits"] == 4  # served in the 2nd frozen epoch

    checkpoint = torch.load(tmp_path / "run" / "epoch_2.pth", map_location="cpu", weights_only=False)
    assert not any(key.startswith("backbone.backbone.") for key in checkpoint["state_dict"])
    assert checkpoint["dbf"]["controller"]["epoch"] == 1 and checkpoint["dbf"]["controller"]["frozen"]

    # mmengine 0.10 checkpoints hold Python objects (its message hub's HistoryBuffer) that
    # torch >= 2.6's default weights-only loading refuses; users resume with this switch.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    resumed = _train(_write_config(tmp_path / "resume.py", tmp_path / "coco", tmp_path / "resumed",
                                   resume_from=tmp_path / "run" / "epoch_2.pth"))
    assert [r["epoch"] for r in resumed] == [2, 3] and [r["frozen"] for r in resumed] == [True, False]
    saved = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    assert _same(resumed[0]["backbone"], saved)
    assert not _same(resumed[1]["backbone"], saved)
    assert resumed[0]["misses"] == 4 + 4  # counters resumed, entries rebuilt


def test_custom_imports_one_liner_makes_mmdet_models_importable(tmp_path):
    config = tmp_path / "only_shim.py"
    config.write_text('custom_imports = dict(imports=["dbf_ext.integrations.mmcv_ops.auto"], '
                      'allow_failed_imports=False)\n')
    script = (f"from mmengine.config import Config; Config.fromfile({str(config)!r}); "
              "import mmdet.models, mmcv.ops; print(mmcv.ops.get_compiler_version())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dbf_ext" in result.stdout
