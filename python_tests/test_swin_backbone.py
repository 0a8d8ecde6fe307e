"""Swin Transformer backbones: the trunk-to-FPN adapter, freezing, the feature cache, and
loading classification weights (--backbone-weights / --pretrained) into detector trunks.

A small Swin configuration (embedding 16, two blocks per stage, 4 x 4 windows) keeps the CPU
tests fast; the full Swin-T is only built, not trained, except in one end-to-end CLI run.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerBlockV2,
)
from torchvision.ops import StochasticDepth

from dbf_ext.cache import CachedBackbone, FeatureCache
from dbf_ext.cli import main
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.freeze import AlwaysFrozen, FrozenBackbone, apply_dbf
from dbf_ext.models import (
    MODELS,
    SWIN_STAGES,
    SwinBackboneWithFPN,
    SwinTrunk,
    build_detector,
    load_backbone_weights,
    pretrained_weights_path,
)
from dbf_ext.testing import random_detection_batch
from dbf_ext.train import TrainConfig

VERSIONS = ("v1", "v2")
EMBED_DIM = 16
IMAGE = 96


def small_swin(version: str = "v1", seed: int = 0, embed_dim: int = EMBED_DIM, **noise) -> SwinTransformer:
    """A torchvision Swin classifier (v1 or v2 blocks) small enough for CPU tests; ``noise``:
    ``stochastic_depth_prob``, ``dropout``, ``attention_dropout``."""
    torch.manual_seed(seed)
    blocks = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == "v2" else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=embed_dim, depths=[2, 2, 2, 2],
                           num_heads=[1, 2, 2, 4], window_size=[4, 4], num_classes=10, **blocks, **noise)


def small_detector(version: str = "v1", **noise) -> FasterRCNN:
    return FasterRCNN(SwinBackboneWithFPN(small_swin(version, **noise), out_channels=32), num_classes=3,
                      min_size=IMAGE, max_size=IMAGE, rpn_batch_size_per_image=32,
                      box_batch_size_per_image=32)


def stage_reference(swin: SwinTransformer) -> nn.Module:
    """torchvision's own feature extractor (FX graph) returning the four stages' NHWC outputs."""
    return create_feature_extractor(swin, {f"features.{i}": f"features.{i}" for i in SWIN_STAGES})


class ChannelsLastStages(nn.Module):
    """The Swin stages as NCHW *views* of the NHWC tensors (non-contiguous, channels-last
    strides): what a trunk that skips the copy would hand to the cache."""

    def __init__(self, swin: SwinTransformer):
        super().__init__()
        self.stages = stage_reference(swin)

    def forward(self, images):
        return {name: out.permute(0, 3, 1, 2) for name, out in self.stages(images).items()}


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), what


def detection_batch(batch_size: int = 2, seed: int = 5):
    return random_detection_batch(batch_size, IMAGE, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", VERSIONS)
def test_trunk_returns_the_four_stages_as_contiguous_nchw(version):
    swin = small_swin(version).eval()
    trunk = SwinTrunk(swin)
    images = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        features = trunk(images)
        reference = stage_reference(swin)(images)
    assert list(features) == ["0", "1", "2", "3"]
    assert trunk.channels == [16, 32, 64, 128]
    for level, (name, expected) in enumerate(reference.items()):
        stride = 4 << level
        assert features[str(level)].shape == (2, EMBED_DIM << level, 96 // stride, 64 // stride)
        assert features[str(level)].is_contiguous()
        assert_bit_identical(features[str(level)], expected.permute(0, 3, 1, 2), name)


@pytest.mark.parametrize("version", VERSIONS)
def test_fpn_gets_strides_4_to_32_with_the_stage_channels(version):
    backbone = SwinBackboneWithFPN(small_swin(version), out_channels=32).eval()
    assert [block[0].in_channels for block in backbone.fpn.inner_blocks] == [16, 32, 64, 128]
    with torch.no_grad():
        pyramid = backbone(torch.rand(1, 3, 128, 64))
    assert {name: tuple(f.shape) for name, f in pyramid.items()} == {
        "0": (1, 32, 32, 16), "1": (1, 32, 16, 8), "2": (1, 32, 8, 4), "3": (1, 32, 4, 2),
        "pool": (1, 32, 2, 1),
    }


@pytest.mark.parametrize(("name", "block"), [("swin-t-fpn", SwinTransformerBlock),
                                              ("swin-v2-t-fpn", SwinTransformerBlockV2)])
def test_build_detector_offers_torchvision_swin_t(name, block):
    assert name in MODELS
    model = build_detector(name, num_classes=3, image_size=64)
    trunk = model.backbone.body
    stages = dict(trunk.named_modules())
    # Stage lookup by name (used by regularisers): torchvision's layout is kept.
    for index in SWIN_STAGES:
        assert all(isinstance(b, block) for b in stages[f"features.{index}"])
    assert trunk.channels == [96, 192, 384, 768] and model.backbone.out_channels == 256
    classifier = {"swin-t-fpn": torchvision.models.swin_t,
                  "swin-v2-t-fpn": torchvision.models.swin_v2_t}[name](weights=None)
    classifier_keys = set(classifier.state_dict())
    assert set(trunk.state_dict()) == {k for k in classifier_keys if k.startswith("features.")}
    model.eval()
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 64, 64)])
    assert set(detections) == {"boxes", "labels", "scores"}


@pytest.mark.parametrize("version", VERSIONS)
def test_frozen_epochs_keep_every_swin_weight_bit_identical(version):
    model = small_detector(version, stochastic_depth_prob=0.2, dropout=0.1)
    dbf = apply_dbf(model, AlwaysFrozen())
    # As in the trainer: one optimizer over every parameter, built before the first freeze.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    trunk_before = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    fpn_before = {k: v.clone() for k, v in model.backbone.fpn.state_dict().items()}
    assert any("relative_position" in k for k in trunk_before)  # buffers are compared too
    assert dbf.on_epoch_start(0)
    model.train()
    for seed in range(2):
        images, targets = detection_batch(seed=seed)
        optimizer.zero_grad(set_to_none=False)
        sum(model(images, targets).values()).backward()
        optimizer.step()
    for key, value in model.backbone.body.state_dict().items():
        assert_bit_identical(value, trunk_before[key], key)
    # The neck trained meanwhile: the optimizer did step.
    assert not torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, fpn_before["inner_blocks.0.0.weight"])


def stochastic_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (StochasticDepth, nn.Dropout))]


@pytest.mark.parametrize("version", VERSIONS)
def test_frozen_swin_is_deterministic_and_unfreeze_restores_the_noise(version):
    noise = dict(stochastic_depth_prob=0.5, dropout=0.3, attention_dropout=0.3)
    trunk = SwinTrunk(small_swin(version, **noise))
    reference = copy.deepcopy(trunk).eval()  # a plain module without stochastic depth / dropout
    frozen = FrozenBackbone(trunk).train()
    assert stochastic_modules(trunk)
    images = torch.rand(2, 3, 64, 64)

    def stage4(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return frozen(images)["3"]

    assert not torch.equal(stage4(1), stage4(2))  # the noise is there while training
    frozen.set_frozen(True)
    frozen.train()  # the detector's model.train() at each step
    with torch.no_grad():
        expected = reference(images)["3"]
    for seed in (1, 2):
        out = stage4(seed)
        assert out.grad_fn is None
        assert_bit_identical(out, expected, f"seed {seed}")
    frozen.set_frozen(False)
    assert all(m.training for m in stochastic_modules(trunk))
    assert not torch.equal(stage4(1), stage4(2))


@pytest.mark.parametrize("layout", ["contiguous (SwinTrunk)", "channels-last views"])
@pytest.mark.parametrize("version", VERSIONS)
def test_float32_cache_hits_equal_recomputation(version, layout):
    swin = small_swin(version)
    trunk = SwinTrunk(swin) if layout.startswith("contiguous") else ChannelsLastStages(swin)
    frozen = FrozenBackbone(trunk, frozen=True)
    cached = CachedBackbone(frozen, FeatureCache("float32", cpu_bytes=1 << 28))
    images = torch.rand(4, 3, 64, 64)
    keys = [(f"tile{i}", 0) for i in range(4)]
    first = cached(images, keys)
    layouts = {name: f.is_contiguous() for name, f in first.items()}
    assert all(layouts.values()) == layout.startswith("contiguous")
    recomputed = frozen(images)  # the same batch size as when stored
    hits = cached(images, keys)
    assert cached.cache.stats.hits == 4 and cached.cache.stats.misses == 4
    assert list(hits) == list(recomputed)
    for name in recomputed:
        assert_bit_identical(hits[name], recomputed[name], name)
    # A batch of two hits and two misses: hits as stored, misses as computed in their own batch.
    new_images = torch.rand(2, 3, 64, 64)
    mixed = cached(torch.cat([new_images, images[:2]]), [("new0", 0), ("new1", 0), *keys[:2]])
    fresh = frozen(new_images)
    for name in recomputed:
        assert_bit_identical(mixed[name][2:], recomputed[name][:2], name)
        assert_bit_identical(mixed[name][:2], fresh[name], name)


def test_cached_swin_detector_losses_equal_recomputation():
    model = small_detector()
    cached = CachedBackbone(FrozenBackbone(model.backbone.body, frozen=True),
                            FeatureCache("float32", cpu_bytes=1 << 28))
    model.backbone.body = cached
    model.train()
    images, targets = detection_batch()
    keys = [("a", 0), ("b", 0)]

    def losses(batch_keys):
        torch.manual_seed(123)  # the RPN and RoI samplers draw random numbers
        with cached.batch_keys(batch_keys):
            return model(images, targets)

    losses(keys)  # stores
    served, recomputed = losses(keys), losses(None)
    assert cached.cache.stats.hits == 2
    for name, value in recomputed.items():
        assert_bit_identical(served[name].detach(), value.detach(), name)


# ---- classification weights into detector trunks ----------------------------------------


def test_backbone_weights_load_a_swin_classifier_and_skip_its_head(tmp_path):
    classifier = small_swin(seed=1)
    path = tmp_path / "swin.pt"
    torch.save(classifier.state_dict(), path)
    model = small_detector()
    trunk = model.backbone.body
    assert not torch.equal(trunk.features[0][0].weight, classifier.features[0][0].weight)
    message = load_backbone_weights(model, path)
    for key, value in trunk.state_dict().items():
        assert_bit_identical(value, classifier.state_dict()[key], key)
    head_keys = [k for k in classifier.state_dict() if not k.startswith("features.")]
    assert message == (f"backbone weights from {path}: loaded {len(trunk.state_dict())} tensors into "
                       f"the trunk, skipped {len(head_keys)} not in it (head, norm)")


def test_backbone_weights_load_a_resnet_classifier(tmp_path):
    torch.manual_seed(1)
    classifier = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(classifier.state_dict(), path)
    model = build_detector("resnet18-fpn-lite", num_classes=3, image_size=64)
    assert "skipped 2 not in it (fc)" in load_backbone_weights(model, path)
    for key, value in model.backbone.body.state_dict().items():
        assert_bit_identical(value, classifier.state_dict()[key], key)


def test_backbone_weights_of_another_shape_or_model_name_the_file(tmp_path):
    model = small_detector()
    wider = tmp_path / "wider.pt"
    torch.save(small_swin(embed_dim=24).state_dict(), wider)
    with pytest.raises(ValueError, match=rf"{wider} does not fit the trunk: \d+ shapes differ"):
        load_backbone_weights(model, wider)
    resnet = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    with pytest.raises(ValueError, match=rf"{resnet} lacks"):
        load_backbone_weights(model, resnet)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(resnet.read_bytes()[:1000])  # a one-line error, not torch's traceback
    with pytest.raises(ValueError, match=rf"backbone weights file {damaged} cannot be read"):
        load_backbone_weights(model, damaged)


def test_pretrained_reads_the_torch_hub_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    config = TrainConfig(data=str(tmp_path), model="swin-t-fpn", pretrained=True)
    with pytest.raises(FileNotFoundError, match="download them first.*swin_t.weights='IMAGENET1K_V1'"):
        config.validate()
    expected = tmp_path / "checkpoints" / Path(torchvision.models.Swin_T_Weights.IMAGENET1K_V1.url).name
    expected.parent.mkdir()
    expected.write_bytes(b"")
    assert pretrained_weights_path("swin-t-fpn") == expected == config.initial_backbone_weights()
    with pytest.raises(ValueError, match="no ImageNet weights for the trunk of tiny-fpn.*--backbone-weights"):
        pretrained_weights_path("tiny-fpn")
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(data=str(tmp_path), pretrained=True, backbone_weights=str(expected)).validate()


def test_cli_pretrained_without_cached_weights_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert main(["train", "--data", str(tmp_path), "--model", "resnet50-fpn", "--pretrained"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dbf-ext train: error: --pretrained: the ImageNet weights of resnet50-fpn")
    assert err.count("\n") == 1


def test_cli_trains_swin_t_from_backbone_weights_with_dbf_and_cache(tmp_path, capsys):
    data = prepare_synthetic_dota(SyntheticConfig(tile_size=96, train_tiles=2, val_tiles=1,
                                                  min_objects=1, max_objects=2),
                                  cache_dir=tmp_path / "data", quiet=True)
    weights = tmp_path / "swin_t.pt"
    torch.save(torchvision.models.swin_t(weights=None).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--model", "swin-t-fpn",
                 "--backbone-weights", str(weights), "--image-size", "64", "--batch-size", "2",
                 "--epochs", "2", "--unfrozen-epochs", "0", "--hflip", "0",
                 "--cache", "float32:cpu=64MB", "--device", "cpu"]) == 0
    assert f"backbone weights from {weights}: loaded" in capsys.readouterr().out.replace("\n", "")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["frozen"] for r in records] == [False, True]
    assert records[1]["cache_hit_rate"] == 0.0  # the frozen epoch filled the cache
