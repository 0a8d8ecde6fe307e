"""FeatureCache + CachedBackbone on a torchvision Faster R-CNN: exactness, invalidation,
budgets, disk spill, corruption, and the cache-aware data path."""

from __future__ import annotations

import errno
import multiprocessing
import os
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from dbf_ext.cache import (
    CacheAwareDataset,
    CachedBackbone,
    FeatureCache,
    PlaceholderMiss,
    cache_aware_collate,
)
from dbf_ext.cache import store as store_module
from dbf_ext.freeze import FrozenBackbone
from dbf_ext.testing import random_detection_batch

IMAGE = 96


def build_model(cache: FeatureCache) -> tuple[FasterRCNN, CachedBackbone]:
    """A small Faster R-CNN (ResNet-18 FPN with real BatchNorm) whose body is cached."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    model = FasterRCNN(backbone, num_classes=3, min_size=IMAGE, max_size=IMAGE,
                       rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    cached = CachedBackbone(FrozenBackbone(model.backbone.body), cache)
    model.backbone.body = cached
    return model, cached


def frozen_model(cache: FeatureCache, training: bool = False) -> tuple[FasterRCNN, CachedBackbone]:
    """:func:`build_model` with the backbone frozen, in train or eval mode."""
    model, cached = build_model(cache)
    model.train(training)
    cached.backbone.set_frozen(True)
    return model, cached


def batches(num_batches: int = 2, batch_size: int = 2):
    g = torch.Generator().manual_seed(5)
    out = []
    for b in range(num_batches):
        images, targets = random_detection_batch(batch_size, IMAGE, g)
        keys = [(f"img{b}_{i}", "noflip") for i in range(batch_size)]
        out.append((images, targets, keys))
    return out


def losses(model, cached, images, targets, keys):
    torch.manual_seed(123)  # the RPN and RoI samplers draw random numbers
    with cached.batch_keys(keys):
        return model(images, targets)


def total(loss_dict) -> torch.Tensor:
    return sum(loss_dict.values())


def run_epoch(model, cached, data, optimizer=None):
    results = []
    for images, targets, keys in data:
        loss = losses(model, cached, images, targets, keys)
        results.append({k: v.detach() for k, v in loss.items()})
        if optimizer is not None:
            optimizer.zero_grad()
            total(loss).backward()
            optimizer.step()
    return results


def recompute(model, cached, images, targets):
    return losses(model, cached, images, targets, None)  # keys None: pass-through


# Losses that depend continuously on the features. The RoI-head losses also depend on which
# proposals survive top-k and NMS over nearly tied scores of an untrained model: a discrete
# choice that a rounding of the features can flip, so they are compared exactly only for the
# lossless store.
RPN_LOSSES = ("loss_objectness", "loss_rpn_box_reg")


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_second_frozen_epoch_is_all_hits_and_matches_recomputation(storage):
    cache = FeatureCache(storage, cpu_bytes=1 << 30)
    model, cached = frozen_model(cache, training=True)
    data = batches()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    run_epoch(model, cached, data, optimizer)
    assert cache.stats.misses == 4 and cache.stats.hits == 0 and len(cache) == 4
    for images, targets, keys in data:  # second frozen epoch, heads have moved
        got = losses(model, cached, images, targets, keys)
        want = recompute(model, cached, images, targets)
        if storage == "float32":
            assert all(torch.equal(got[name], want[name]) for name in want)
        else:
            for name in RPN_LOSSES:
                torch.testing.assert_close(got[name], want[name], rtol=1e-2, atol=1e-3)
        with torch.no_grad():
            backbone_input = model.transform(images)[0].tensors  # what the model feeds it
            served = cached(backbone_input, keys)
            fresh = cached(backbone_input, None)
        for level in fresh:  # the stored features are exactly the rounded fresh ones
            assert torch.equal(served[level], fresh[level].to(getattr(torch, storage)).float())
    assert cache.stats.hits == 8 and cache.stats.misses == 4


def test_hits_need_no_pixels():
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    with torch.no_grad(), cached.batch_keys(keys):
        first = model.backbone(torch.stack(images))
        blank = model.backbone(torch.zeros(2, 3, IMAGE, IMAGE))  # served from the cache
    for name in first:
        assert torch.equal(first[name], blank[name])


def test_no_stale_features_after_an_unfrozen_epoch():
    cache = FeatureCache("float32")
    model, cached = build_model(cache)
    model.train()
    data = batches()
    cached.backbone.set_frozen(True)
    run_epoch(model, cached, data)
    assert len(cache) == 4
    cached.backbone.set_frozen(False)  # an unfrozen epoch changes the backbone's weights
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    run_epoch(model, cached, data, optimizer)
    cached.backbone.set_frozen(True)
    for images, targets, keys in data:
        got = losses(model, cached, images, targets, keys)
        want = recompute(model, cached, images, targets)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert cache.stats.invalidations == 1
    assert cache.stats.hits == 0  # everything was recomputed after the weights changed


def test_in_place_weight_change_invalidates():
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    batch = torch.stack(images)
    with torch.no_grad():
        cached(batch, keys)
        cached.backbone.load_state_dict(
            {k: v * 1.01 if v.is_floating_point() else v for k, v in cached.backbone.state_dict().items()})
        after = cached(batch, keys)
        want = cached(batch, None)
    assert all(torch.equal(after[k], want[k]) for k in want)


def test_budgets_are_respected_and_overflow_is_not_an_error():
    probe = FeatureCache("float32")
    model, cached = build_model(probe)
    cached.backbone.set_frozen(True)
    images, _, keys = batches(1, batch_size=4)[0]
    with torch.no_grad():
        cached(torch.stack(images), keys)
    per_sample = probe.bytes_used()["cpu"] // 4
    cache = FeatureCache("float32", cpu_bytes=per_sample * 2 + per_sample // 2)
    cached.cache = cache
    with torch.no_grad():
        out = cached(torch.stack(images), keys)
    assert len(cache) == 2 and cache.stats.not_stored == 2
    assert cache.bytes_used()["cpu"] <= cache.budgets["cpu"]
    assert out["0"].shape[0] == 4


def test_spill_to_disk_and_truncated_entry_is_recomputed(tmp_path):
    cache = FeatureCache("bfloat16", cpu_bytes=0, disk_dir=tmp_path / "cache", disk_bytes=1 << 30)
    model, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    batch = torch.stack(images)
    with torch.no_grad():
        first = cached(batch, keys)
        assert cache.entries_per_tier() == {"gpu": 0, "cpu": 0, "disk": 2}
        assert cache.entry_dir.parent.stat().st_mode & 0o777 == 0o700  # the private folder
        files = sorted(cache.entry_dir.glob("*.dbfc"))
        assert len(files) == 2 and all(keys[0][0] not in f.name for f in files)
        from_disk = cached(torch.zeros_like(batch), keys)
        for name in first:  # bfloat16 store, served from disk
            assert torch.equal(from_disk[name], first[name].to(torch.bfloat16).float())
        assert cache.stats.hits == 2
        data = files[0].read_bytes()
        files[0].write_bytes(data[: len(data) // 2])  # a crash mid-write, or a damaged disk
        again = cached(batch, keys)
        alone = [cached(batch[i : i + 1], None) for i in range(2)]
    assert cache.stats.corrupt == 1 and cache.stats.hits == 3
    # Only the damaged entry's row is recomputed (in a sub-batch of one, full precision); the
    # other row is still served from disk.
    served = [i for i in range(2) if all(
        torch.equal(again[n][i], first[n][i].to(torch.bfloat16).float()) for n in first)]
    recomputed = [i for i in range(2) if all(torch.equal(again[n][i], alone[i][n][0]) for n in first)]
    assert len(recomputed) == 1 and sorted(served + recomputed) == [0, 1]


def test_passthrough_when_not_frozen():
    cache = FeatureCache("float32")
    model, cached = build_model(cache)
    images, _, keys = batches(1)[0]
    out = cached(torch.stack(images), keys)
    assert len(cache) == 0 and cache.stats.misses == 0
    assert out["0"].requires_grad  # trains as usual


class FlipDataset:
    """A tiny CacheableDataset: random images, horizontal flips keyed per (epoch, index)."""

    def __init__(self, n: int = 4, uncacheable: bool = False):
        g = torch.Generator().manual_seed(1)
        self.images = [torch.rand(3, IMAGE, IMAGE, generator=g) for _ in range(n)]
        self.boxes = [torch.tensor([[10.0, 20.0, 40.0, 50.0]]) for _ in range(n)]
        self.decoded = 0
        self.uncacheable = uncacheable

    def __len__(self):
        return len(self.images)

    def sample_id(self, index):
        return f"tile-{index}"

    def augmentation_key(self, index, epoch):
        if self.uncacheable:
            return None
        return ("hflip",) if (index + epoch) % 2 else ("none",)

    def load_target(self, index, aug_key):
        boxes = self.boxes[index].clone()
        if aug_key == ("hflip",):
            boxes[:, [0, 2]] = IMAGE - boxes[:, [2, 0]]
        return {"boxes": boxes, "labels": torch.ones(1, dtype=torch.int64)}

    def load_sample(self, index, aug_key):
        self.decoded += 1
        image = self.images[index]
        if aug_key == ("hflip",):
            image = image.flip(-1)
        return image, self.load_target(index, aug_key)

    def image_size(self, index, aug_key):
        return IMAGE, IMAGE


def test_cache_aware_data_path_skips_decoding():
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache, training=True)
    dataset = FlipDataset()
    adapter = CacheAwareDataset(dataset)
    loader = torch.utils.data.DataLoader(adapter, batch_size=2, collate_fn=cache_aware_collate)
    per_epoch = []
    for epoch in range(4):
        adapter.set_epoch(epoch, cache.keys_snapshot())
        decoded_before = dataset.decoded
        epoch_losses = []
        for images, targets, keys in loader:
            epoch_losses.append(total(losses(model, cached, images, targets, keys)))
        per_epoch.append((dataset.decoded - decoded_before, epoch_losses))
    # Flip keys alternate per epoch: epochs 0 and 1 fill the cache for both flip states,
    # epochs 2 and 3 decode nothing and reuse features of epochs 0 and 1 exactly.
    assert [d for d, _ in per_epoch] == [4, 4, 0, 0]
    for a, b in zip(per_epoch[0][1], per_epoch[2][1]):
        assert torch.equal(a, b)


def test_uncacheable_augmentation_warns_and_bypasses():
    cache = FeatureCache("float32")
    _, cached = frozen_model(cache)
    adapter = CacheAwareDataset(FlipDataset(uncacheable=True))
    with pytest.warns(UserWarning, match="cannot be keyed"):
        images, targets, keys = cache_aware_collate([adapter[0], adapter[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter[2]  # warned once only
    with torch.no_grad():
        cached(torch.stack(images), keys)
    assert keys == [None, None] and len(cache) == 0


def test_rejects_datasets_without_the_protocol_and_bad_options():
    with pytest.raises(TypeError, match="CacheableDataset"):
        CacheAwareDataset([1, 2, 3])
    with pytest.raises(ValueError, match="storage_dtype"):
        FeatureCache("int4")
    with pytest.raises(ValueError, match="cpu_bytes"):
        FeatureCache(cpu_bytes=-1)
    cache = FeatureCache("float32")
    _, cached = frozen_model(cache)
    with pytest.raises(ValueError, match="cache keys"):
        cached(torch.zeros(2, 3, IMAGE, IMAGE), [("a", 0)])


def test_stats_survive_a_checkpoint():
    cache = FeatureCache("float32")
    cache.stats.hits, cache.stats.misses = 7, 3
    restored = FeatureCache("float32")
    restored.load_state_dict(torch.load(_round_trip(cache.state_dict()), weights_only=True))
    assert restored.stats.hits == 7 and restored.stats.hit_rate == 0.7


def _round_trip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# ---- validity: what invalidates, and when (the invalidation contract) ----


def test_keys_snapshot_is_empty_once_the_backbone_trains():
    """The data path asks for the snapshot after the schedule unfroze the backbone: it must not
    offer a single key, or the trained epoch would get placeholders."""
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    with torch.no_grad():
        cached(torch.stack(images), keys)
    assert cache.keys_snapshot() == frozenset(keys)
    cached.backbone.set_frozen(False)
    assert cache.keys_snapshot() == frozenset() and len(cache) == 0
    cached.backbone.set_frozen(True)  # frozen again, with possibly other weights: still nothing
    assert cache.keys_snapshot() == frozenset()


def _scale_first_weight_via_data(body):
    next(body.parameters()).data.mul_(1.5)


def _copy_into_first_weight_via_data(body):
    weight = next(body.parameters())
    weight.data.copy_(weight.detach() * 0.5)


def _write_through_numpy(body):
    next(body.parameters()).detach().numpy()[:] *= 0.5


def _change_batchnorm_eps(body):
    next(m for m in body.modules() if isinstance(m, nn.BatchNorm2d)).eps = 0.5


def _replace_activation(body):
    body.backbone.relu = nn.LeakyReLU(0.5)  # a module without parameters


def _replace_a_conv(body):
    conv = body.backbone.conv1
    replacement = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    replacement.weight.data.copy_(conv.weight * 0.5)
    body.backbone.conv1 = replacement


@pytest.mark.parametrize("change", [_scale_first_weight_via_data, _copy_into_first_weight_via_data,
                                   _write_through_numpy, _change_batchnorm_eps,
                                   _replace_activation, _replace_a_conv])
def test_changes_that_bypass_version_counters_invalidate_at_epoch_start(change):
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    batch = torch.stack(images)
    with torch.no_grad():
        before = cached(batch, keys)
        change(cached.backbone)
        assert cache.keys_snapshot() == frozenset()  # checked when the next epoch starts
        served = cached(batch, keys)
        fresh = cached(batch, None)
    assert not torch.equal(before["0"], fresh["0"])  # the change does change the features
    for name in fresh:
        assert torch.equal(served[name], fresh[name])
    assert cache.stats.invalidations == 1


# ---- the data path never computes on a placeholder ----


def test_placeholder_never_reaches_a_computing_backbone():
    cache = FeatureCache("float32")
    _, cached = frozen_model(cache)
    adapter = CacheAwareDataset(FlipDataset())
    images, _, keys = cache_aware_collate([adapter[0], adapter[1]])
    with torch.no_grad():
        cached(torch.stack(images), keys)  # decoded: computed and stored
    adapter.set_epoch(0, cache.keys_snapshot())
    images, _, keys = cache_aware_collate([adapter[0], adapter[1], adapter[2]])
    assert keys.undecoded == (0, 1)
    with torch.no_grad():
        cached(torch.stack(images), keys)  # rows 0, 1 served, row 2 computed: fine
        cache.invalidate()
        with pytest.raises(PlaceholderMiss) as miss:  # a miss on a placeholder: refused
            cached(torch.stack(images), keys)
        assert miss.value.rows == (0, 1)
        cached.backbone.set_frozen(False)
        with pytest.raises(PlaceholderMiss):  # a backbone that trains never sees one either
            cached(torch.stack(images), keys)


def test_a_miss_on_a_placeholder_decodes_the_sample():
    cache = FeatureCache("float32")
    model, cached = frozen_model(cache, training=True)
    dataset = FlipDataset()
    adapter = CacheAwareDataset(dataset)

    def step(images, keys, targets):
        return losses(model, cached, images, targets, keys)

    images, targets, keys = cache_aware_collate([adapter[0], adapter[1]])
    want = adapter.call_with_decoding(step, images, keys, targets)
    adapter.set_epoch(0, cache.keys_snapshot())
    images, targets, keys = cache_aware_collate([adapter[0], adapter[1]])
    cache.invalidate()  # entries lost after the data path decided not to decode
    decoded_before = dataset.decoded
    with pytest.warns(UserWarning, match="decoded"):
        got = adapter.call_with_decoding(step, images, keys, targets)
    assert dataset.decoded == decoded_before + 2
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- per-image input size ----


def test_multi_scale_batches_are_keyed_on_each_image_size():
    """torchvision multi-scale training: each image is resized to a random size, then the batch
    is padded. An entry is served only for the same image size in the same padded size."""
    cache = FeatureCache("float32")
    model, cached = build_model(cache)
    model.transform.min_size = (64, 80, 96)
    model.train()
    cached.backbone.set_frozen(True)
    cached.watch_input_sizes(model.transform)
    images, _, keys = batches(1, batch_size=2)[0]
    torch.manual_seed(3)
    for _ in range(12):
        with torch.no_grad(), cached.batch_keys(keys):
            image_list, _ = model.transform(images)  # random size per image, then padding
            served = model.backbone.body(image_list.tensors)
            fresh = cached(image_list.tensors, None)
        for name in fresh:
            assert torch.equal(served[name], fresh[name])
    assert cache.stats.hits > 0  # some sizes came back and were served


# ---- the disk folder ----


def test_disk_dir_is_not_chmodded_followed_or_emptied(tmp_path):
    user_dir = tmp_path / "shared"
    user_dir.mkdir(mode=0o755)
    os.chmod(user_dir, 0o755)
    (user_dir / "notes.dbfc").write_text("the user's file")
    link = tmp_path / "link"
    link.symlink_to(user_dir)
    cache = FeatureCache("float32", cpu_bytes=0, disk_dir=link, disk_bytes=1 << 30)
    _, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    with torch.no_grad():
        cached(torch.stack(images), keys)
    assert user_dir.stat().st_mode & 0o777 == 0o755
    assert (user_dir / "notes.dbfc").read_text() == "the user's file"
    private = cache.entry_dir.parent
    assert private.parent == link and private.stat().st_mode & 0o777 == 0o700
    assert len(list(cache.entry_dir.glob("*.dbfc"))) == 2
    cache.close()
    assert (user_dir / "notes.dbfc").exists() and not cache.entry_dir.exists()


def test_disk_dir_refusals(tmp_path):
    with pytest.raises(ValueError, match="disk_dir"):
        FeatureCache(disk_dir="")
    FeatureCache(disk_dir=tmp_path).close()
    (private,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    os.chmod(private, 0o755)
    with pytest.raises(PermissionError, match="permissions"):
        FeatureCache(disk_dir=tmp_path)
    os.chmod(private, 0o700)
    other = tmp_path / "other"
    other.mkdir()
    private.rmdir()
    private.symlink_to(other)
    with pytest.raises(PermissionError, match="symbolic link"):
        FeatureCache(disk_dir=tmp_path)


def _store_in_other_process(disk_dir: str, exit_without_cleanup: bool) -> None:
    cache = FeatureCache("float32", cpu_bytes=0, disk_dir=disk_dir, disk_bytes=1 << 30)
    cache.use_weights_version(0)
    maps = [torch.rand(2, 4, 8, 8)]
    cache.store([("other", 0), ("other", 1)], maps, None, (3, 32, 32))
    if exit_without_cleanup:
        os._exit(0)  # a crash: no finalizer runs, the lock goes with the process
    cache.close()


def disk_only_cached_model(disk_dir):
    """A frozen cached backbone whose cache has only a disk tier, and one batch ``(batch, keys)``."""
    cache = FeatureCache("float32", cpu_bytes=0, disk_dir=disk_dir, disk_bytes=1 << 30)
    _, cached = frozen_model(cache)
    images, _, keys = batches(1)[0]
    return cache, cached, torch.stack(images), keys


def test_two_processes_share_a_disk_dir_without_deleting_each_other(tmp_path):
    cache, cached, batch, keys = disk_only_cached_model(tmp_path)
    with torch.no_grad():
        first = cached(batch, keys)
    context = multiprocessing.get_context("spawn")
    for crash in (False, True):
        other = context.Process(target=_store_in_other_process, args=(str(tmp_path), crash))
        other.start()
        other.join(120)
        assert other.exitcode == 0
    # The crashed process left its entries; the next cache on the folder removes them, and
    # never those of a live process.
    assert len(list(tmp_path.rglob("*.dbfc"))) == 4
    FeatureCache(disk_dir=tmp_path).close()
    assert len(list(tmp_path.rglob("*.dbfc"))) == 2
    with torch.no_grad():
        again = cached(torch.zeros_like(batch), keys)
    assert cache.stats.hits == 2 and cache.stats.corrupt == 0
    for name in first:
        assert torch.equal(again[name], first[name])


# ---- faults on disk ----


def test_no_space_left_stores_nothing_and_warns_once(tmp_path, monkeypatch, caplog):
    cache = FeatureCache("float32", cpu_bytes=0, disk_dir=tmp_path, disk_bytes=1 << 30)
    _, cached = frozen_model(cache)
    written = []

    def write_until_full(fd, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        return os_write(fd, data[: len(data) // 2])  # a short write first

    os_write = os.write
    monkeypatch.setattr(store_module.os, "write", write_until_full)
    images, _, keys = batches(1)[0]
    with torch.no_grad(), caplog.at_level("WARNING", logger="dbf_ext.cache.store"):
        out = cached(torch.stack(images), keys)
        cached(torch.stack(images), [("more", 0), ("more", 1)])
        fresh = cached(torch.stack(images), None)
    assert [r.getMessage().count("not stored") for r in caplog.records] == [1]
    assert len(cache) == 0 and cache.bytes_used()["disk"] == 0 and cache.stats.not_stored == 4
    assert not any(p.name.endswith((".dbfc", ".partial")) for p in tmp_path.rglob("*"))
    for name in fresh:  # the miss still returns the fresh features
        assert torch.equal(out[name], fresh[name])


def test_swapped_and_foreign_files_are_misses(tmp_path):
    cache, cached, batch, keys = disk_only_cached_model(tmp_path)
    with torch.no_grad():
        cached(batch, keys)
        a, b = sorted(cache.entry_dir.glob("*.dbfc"))
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
        got = cached(batch, keys)
        want = cached(batch, None)
    assert cache.stats.corrupt == 2 and cache.stats.hits == 0
    for name in want:
        assert torch.equal(got[name], want[name])


def test_a_file_truncated_after_verification_is_not_a_crash(tmp_path, monkeypatch):
    """The bytes verified are the bytes served: a file cut short after the checksum was read
    cannot make the unpack read past the end of a mapping."""
    cache, cached, batch, keys = disk_only_cached_model(tmp_path)
    with torch.no_grad():
        first = cached(batch, keys)
        served = cached.cache.start_load(keys, torch.device("cpu"))
        for path in cache.entry_dir.glob("*.dbfc"):
            os.truncate(path, 10)
        maps, _ = cache.finish_load(served)
    for level, name in enumerate(first):
        assert torch.equal(maps[level], first[name])


# ---- accounting ----


def test_the_same_key_twice_in_a_batch_counts_once():
    cache = FeatureCache("float32")
    _, cached = frozen_model(cache)
    images, _, _ = batches(1)[0]
    with torch.no_grad():
        cached(torch.stack(images), [("same", 0), ("same", 0)])
    single = FeatureCache("float32")
    cached.cache = single
    with torch.no_grad():
        cached(torch.stack(images[:1] * 2), [("same", 0), None])
    assert len(cache) == 1 and cache.stats.stored == 1
    assert cache.bytes_used() == single.bytes_used()


@pytest.mark.parametrize("budget", [True, False, 1.5, "1GB"])
def test_budgets_must_be_integers(budget):
    with pytest.raises(ValueError, match="cpu_bytes"):
        FeatureCache(cpu_bytes=budget)
