"""DBFHookCore, the runner-independent logic both DBFHook classes share, on a small torch model
(the hooks themselves run inside real mmcv 1.x / mmengine runners in test_openmmlab.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dbf_ext.freeze import FrozenBackbone, StepInterval
from dbf_ext.integrations.openmmlab import DBFHookCore, build_schedule


class _Detector(nn.Module):
    """Calls ``self.backbone`` as mmdet / mmrotate detectors do in ``extract_feat``."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.neck = nn.Conv2d(4, 2, 1)

    def forward(self, images):
        return self.neck(self.backbone(images)).mean()


class _Transform:
    pass


def _pipeline(*names):
    """A dataset whose pipeline has transforms of the given class names (as Compose holds them)."""
    transforms = [type(name, (_Transform,), {})() for name in names]
    return type("Dataset", (), {"pipeline": type("Compose", (), {"transforms": transforms})()})()


_STANDARD = ("LoadImageFromFile", "LoadAnnotations", "RResize", "RRandomFlip", "Normalize", "Pad",
             "DefaultFormatBundle", "Collect")


def _meta(path, flip=False, direction=None, shape=(32, 32, 3), scale=1.0):
    return {"filename": path, "flip": flip, "flip_direction": direction, "img_shape": shape,
            "scale_factor": np.full(4, scale, dtype=np.float32)}


def test_schedule_from_config_dict_and_bad_types():
    schedule = build_schedule(dict(type="StepInterval", unfrozen_epochs=[0, 20, 40]))
    assert isinstance(schedule, StepInterval) and schedule.unfrozen_epochs == (0, 20, 40)
    with pytest.raises(ValueError, match="schedule type must be one of"):
        build_schedule(dict(type="Bogus"))
    with pytest.raises(TypeError, match="schedule must be"):
        build_schedule(3)
    with pytest.raises(ValueError, match="storage_dtype"):
        DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="int8"))


def test_sequence_of_epochs_with_cache_keys_from_metas():
    torch.manual_seed(0)
    model = _Detector()
    core = DBFHookCore(dict(type="StepInterval", unfrozen_epochs=[0, 3]),
                       cache=dict(storage_dtype="float32", cpu_bytes="1MB"))
    core.attach(model)
    assert isinstance(model.backbone.backbone, FrozenBackbone)  # cached around frozen
    core.check_pipeline(_pipeline(*_STANDARD))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    images = torch.rand(2, 3, 32, 32)
    metas = [_meta("a.png", True, "horizontal"), _meta("b.png")]
    weights, hits, sizes = {}, {}, {}
    keys = [("a.png", (True, "horizontal", (32, 32, 3), (1.0,) * 4)),
            ("b.png", (False, None, (32, 32, 3), (1.0,) * 4))]
    for epoch in range(4):
        core.begin_epoch(core.schedule_epoch(epoch, 0, False))
        for _ in range(2):
            model.train()
            core.begin_iteration(metas)
            loss = model(images)
            core.end_iteration()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights[epoch] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        hits[epoch] = core.cached.cache.stats.hits
        sizes[epoch] = len(core.cached.cache)
        if epoch == 2:
            assert all(key in core.cached.cache for key in keys)
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name])  # frozen: bit-identical
        assert torch.equal(weights[0][name], weights[2][name])
    assert not all(torch.equal(weights[2][n], weights[3][n]) for n in weights[0])  # trains again
    # epoch 1 stores both samples (second iteration already hits), epoch 2 only hits
    assert hits[1] == 2 and hits[2] == 6 and hits[3] == 6
    assert sizes == {0: 0, 1: 2, 2: 2, 3: 0}  # dropped when epoch 3 unfroze the backbone
    state = core.state_dict()
    assert state["controller"]["epoch"] == 3 and state["controller"]["frozen"] is False


def test_keys_distinguish_flip_and_scale():
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="bfloat16"))
    core.attach(_Detector())
    core.check_pipeline(_pipeline(*_STANDARD))
    keys = {core.sample_key(m) for m in (_meta("a.png"), _meta("a.png", True, "horizontal"),
                                         _meta("a.png", True, "vertical"), _meta("a.png", scale=0.5),
                                         _meta("a.png"))}
    assert len(keys) == 4


def test_unkeyable_pipeline_warns_once_and_caches_nothing():
    model = _Detector()
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"))
    core.attach(model)
    with pytest.warns(UserWarning, match="PhotoMetricDistortion, PolyRandomRotate"):
        core.check_pipeline(_pipeline(*_STANDARD, "PolyRandomRotate", "PhotoMetricDistortion"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        core.check_pipeline(_pipeline("PolyRandomRotate"))
        core.begin_epoch(0)
        for _ in range(2):
            core.begin_iteration([_meta("a.png")])
            model(torch.rand(1, 3, 16, 16))
            core.end_iteration()
    assert len(core.cached.cache) == 0 and core.cached.cache.stats.hits == 0
    assert core.backbone_path == "backbone" and model.backbone.frozen  # still frozen on schedule


def test_transforms_of_wrapped_datasets_are_checked():
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"))
    core.attach(_Detector())
    inner = _pipeline(*_STANDARD)
    mosaic = type("MultiImageMixDataset", (), {  # mmdet 2.x keeps a plain list of transforms
        "pipeline": [type("Mosaic", (_Transform,), {})()], "dataset": inner})()
    concat = type("ConcatDataset", (), {"datasets": [inner, mosaic]})()
    with pytest.warns(UserWarning, match=r"\(Mosaic\)"):
        core.check_pipeline(concat)


def test_declared_keyable_transform_is_accepted():
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"),
                       keyable_transforms=["MyDeterministicCrop"])
    core.attach(_Detector())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        core.check_pipeline(_pipeline(*_STANDARD, "MyDeterministicCrop"))
    assert core.sample_key(_meta("a.png")) is not None


def test_metas_without_fields_are_not_cached_with_one_warning():
    core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"))
    core.attach(_Detector())
    core.check_pipeline(_pipeline(*_STANDARD))
    with pytest.warns(UserWarning, match="lack flip"):
        assert core.sample_key({"filename": "a.png"}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core.sample_key({"img_shape": (3, 3)}) is None


def test_iteration_based_schedule_epochs():
    core = DBFHookCore(dict(type="StepInterval", unfrozen_epochs=[1]), iters_per_epoch=5)
    assert [core.schedule_epoch(0, i, True, 100) for i in (0, 4, 5, 14)] == [0, 0, 1, 2]
    default = DBFHookCore(dict(type="AlwaysFrozen"))
    assert default.schedule_epoch(0, 7, True, loader_length=3) == 2
    with pytest.raises(ValueError, match="iters_per_epoch"):
        default.schedule_epoch(0, 7, True, None)
    with pytest.raises(ValueError, match="iters_per_epoch"):
        DBFHookCore(dict(type="AlwaysFrozen"), iters_per_epoch=0)


def test_resume_state_before_attach_and_bad_state():
    first = DBFHookCore(dict(type="StepInterval", unfrozen_epochs=[0]))
    first.attach(_Detector())
    first.begin_epoch(0)
    first.begin_epoch(1)
    resumed = DBFHookCore(dict(type="StepInterval", unfrozen_epochs=[0]))
    resumed.load_state_dict(first.state_dict())  # mmengine loads checkpoints before training
    model = _Detector()
    resumed.attach(model)
    assert model.backbone.frozen and resumed.epoch == 1
    with pytest.raises(ValueError, match="DBFHook state"):
        resumed.load_state_dict({"controller": {}})


def test_ddp_wrapper_must_find_unused_parameters(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        strict = nn.parallel.DistributedDataParallel(_Detector())
        with pytest.raises(ValueError, match="find_unused_parameters=True"):
            DBFHookCore(dict(type="AlwaysFrozen")).attach(strict)
        model = nn.parallel.DistributedDataParallel(_Detector(), find_unused_parameters=True)
        core = DBFHookCore(dict(type="AlwaysFrozen"), cache=dict(storage_dtype="float32"))
        core.attach(model)
        assert isinstance(model.module.backbone.backbone, FrozenBackbone)
    finally:
        dist.destroy_process_group()
