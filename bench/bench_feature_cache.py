"""Feature cache: a frozen epoch with and without the cache, bytes per image per storage dtype,
and host / disk tier throughput.

CPU: a Faster R-CNN with a ResNet-50 FPN, and one with a Swin-T FPN (torchvision's ``swin_t``
trunk, :class:`dbf_ext.models.SwinBackboneWithFPN`), on synthetic 512 x 512 tiles; GPU
(when present): the same at 1024 x 1024. Run: ``python -m pytest bench/bench_feature_cache.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import swin_t
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from dbf_ext.cache import CachedBackbone, FeatureCache, SlabLayout
from dbf_ext.freeze import FrozenBackbone
from dbf_ext.models import SwinBackboneWithFPN

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
IMAGE = 1024 if ON_GPU else 512
BACKBONES = ("resnet50", "swin_t")
NUM_IMAGES, BATCH = (16, 4) if ON_GPU else (4, 2)


# What is frozen (and cached): the ResNet trunk only, as in the DBF paper (the FPN neck keeps
# training and runs in every step), or the trunk and the FPN (e.g. detection pre-training with
# a frozen backbone and neck, MutDet-style).
FROZEN_PARTS = {"trunk": "body", "trunk+FPN": None}


def make_model(part: str = "trunk", trunk: str = "resnet50"):
    torch.manual_seed(0)
    if trunk == "swin_t":
        backbone = SwinBackboneWithFPN(swin_t(weights=None))
    else:
        backbone = resnet_fpn_backbone(backbone_name=trunk, weights=None, trainable_layers=5,
                                       norm_layer=nn.BatchNorm2d)
    model = FasterRCNN(backbone, num_classes=4, min_size=IMAGE, max_size=IMAGE).to(DEVICE)
    attribute = FROZEN_PARTS[part]
    frozen = FrozenBackbone(getattr(model.backbone, attribute) if attribute else model.backbone)
    frozen.set_frozen(True)
    return model, frozen


def install(model, part: str, module) -> None:
    attribute = FROZEN_PARTS[part]
    if attribute:
        setattr(model.backbone, attribute, module)
    else:
        module.out_channels = model.backbone.out_channels  # read by the RPN and RoI heads
        model.backbone = module


def dataset():
    g = torch.Generator().manual_seed(0)
    data = []
    for b in range(NUM_IMAGES // BATCH):
        images = [torch.rand(3, IMAGE, IMAGE, generator=g).to(DEVICE) for _ in range(BATCH)]
        targets = []
        for _ in range(BATCH):
            xy = torch.rand(8, 2, generator=g) * IMAGE * 0.8
            boxes = torch.cat([xy, xy + 8 + torch.rand(8, 2, generator=g) * IMAGE * 0.1], 1)
            targets.append({"boxes": boxes.to(DEVICE), "labels": torch.randint(1, 4, (8,)).to(DEVICE)})
        data.append((images, targets, [(f"tile{b}_{i}", 0) for i in range(BATCH)]))
    return data


def frozen_epoch(model, optimizer, data, cached: CachedBackbone | None):
    for images, targets, keys in data:
        if cached is not None:
            with cached.batch_keys(keys):
                losses = model(images, targets)
        else:
            losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("trunk", BACKBONES)
@pytest.mark.parametrize("part", list(FROZEN_PARTS))
@pytest.mark.parametrize("variant", ["no cache", "cache hits (bfloat16)"])
def test_frozen_epoch(benchmark, part, variant, trunk):
    model, frozen = make_model(part, trunk)
    cached = None
    data = dataset()
    if variant != "no cache":
        cache = FeatureCache("bfloat16", gpu_bytes=(8 << 30) if ON_GPU else 0, cpu_bytes=4 << 30)
        cached = CachedBackbone(frozen, cache)
        install(model, part, cached)
    else:
        install(model, part, frozen)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    frozen_epoch(model, optimizer, data, cached)  # warm-up; fills the cache
    if cached is not None:
        hits_before, misses_before = cached.cache.stats.hits, cached.cache.stats.misses
    benchmark.group = f"frozen epoch ({part} frozen): {NUM_IMAGES} images {IMAGE}px, {trunk}-FPN"
    benchmark.extra_info.update(device=DEVICE, images=NUM_IMAGES, batch=BATCH)
    benchmark.pedantic(frozen_epoch, (model, optimizer, data, cached), rounds=3, iterations=1)
    if cached is not None:
        assert cached.cache.stats.misses == NUM_IMAGES  # only the warm-up epoch missed
        hits = cached.cache.stats.hits - hits_before
        lookups = hits + cached.cache.stats.misses - misses_before
        benchmark.extra_info["hit_rate_measured_epochs"] = round(hits / lookups, 3)


def resnet_features(batch: int = BATCH):
    model, frozen = make_model()
    with torch.no_grad():
        out = frozen(torch.rand(batch, 3, IMAGE, IMAGE, device=DEVICE))
    return list(out.values())


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "float8_e4m3"])
def test_pack_throughput(benchmark, storage):
    maps = resnet_features()
    layout = SlabLayout.for_maps(maps, storage)
    slabs = torch.empty((maps[0].shape[0], layout.slab_bytes), dtype=torch.uint8, device=DEVICE)
    benchmark.group = "pack (features -> slabs)"
    source_bytes = sum(m.numel() * m.element_size() for m in maps)
    benchmark.extra_info.update(device=DEVICE, bytes_per_image=layout.slab_bytes,
                                float32_bytes_per_image=source_bytes // maps[0].shape[0])

    def pack():
        layout.pack(maps, slabs)
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark(pack)
    benchmark.extra_info["GB_per_s_read"] = round(source_bytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_tier_load_throughput(benchmark, tier, tmp_path):
    maps = resnet_features()
    cache = FeatureCache("bfloat16", cpu_bytes=(1 << 34) if tier == "cpu" else 0,
                         disk_dir=tmp_path if tier == "disk" else None, disk_bytes=1 << 34)
    cache.use_weights_version(0)
    keys = [(i, 0) for i in range(BATCH)]
    size = tuple(maps[0].shape[1:])
    cache.store(keys, maps, None, size)
    assert cache.entries_per_tier()[tier] == BATCH

    def load():
        out = cache.finish_load(cache.start_load(keys, torch.device(DEVICE)))
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    benchmark.group = "load from tier (slabs -> features)"
    benchmark.extra_info.update(device=DEVICE)
    benchmark(load)
    stored = sum(cache.bytes_used().values())
    benchmark.extra_info["GB_per_s_stored"] = round(stored / benchmark.stats.stats.median / 1e9, 2)
