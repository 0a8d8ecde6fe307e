"""The feature cache inside the training loop, against runs with the cache off: multi-stretch
schedules, damaged disk entries, resumes and a whole realistic sequence.

The reference for every comparison is the same run with ``cache="off"``: with the float32 store
and no flips the cache must change nothing, epoch by epoch, bit for bit.
"""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    config = SyntheticConfig(tile_size=96, train_tiles=4, val_tiles=1, min_objects=2, max_objects=4)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("data"), quiet=True)


def config(root, out, cache="off", **overrides) -> TrainConfig:
    # On the CPU, where a training is bit-repeatable: every test here compares runs bit for bit.
    options = dict(data=str(root), output_dir=str(out), image_size=96, batch_size=2, hflip=0.0,
                   cache=cache, eval_every=0, device="cpu")
    options.update(overrides)
    return TrainConfig(**options)


def epoch_losses(result) -> list[dict[str, float]]:
    return [record.losses for record in result.history]


_reference_runs: dict[tuple, list[dict[str, float]]] = {}


def reference_losses(root, tmp_path, **overrides) -> list[dict[str, float]]:
    """Per-epoch losses of the run with the cache off (computed once per configuration)."""
    key = tuple(sorted(overrides.items()))
    if key not in _reference_runs:
        _reference_runs[key] = epoch_losses(train(config(root, tmp_path / "reference", **overrides)))
    return _reference_runs[key]


class Interrupted(Exception):
    pass


def stop_after(epoch: int):
    def on_epoch_end(record):
        if record.epoch == epoch:
            raise Interrupted
    return on_epoch_end


@pytest.mark.parametrize("unfrozen_epochs", [(0, 3), (1, 3), (0, 2, 4)])
def test_multi_stretch_schedules_equal_cache_off(tiny_set, tmp_path, unfrozen_epochs):
    """Every epoch after an unfreeze trains on decoded images, and every frozen stretch serves
    the features of its own weights: the losses are those of the cache-off run exactly."""
    common = dict(unfrozen_epochs=unfrozen_epochs, epochs=6)
    want = reference_losses(tiny_set, tmp_path, **common)
    result = train(config(tiny_set, tmp_path / "cached", cache="float32:cpu=64MB", **common))
    assert epoch_losses(result) == want
    frozen = [r.frozen for r in result.history]
    # Proof that the cache served something: a frozen epoch after a frozen epoch is all hits.
    for epoch in range(1, 6):
        if frozen[epoch] and frozen[epoch - 1]:
            assert result.history[epoch].cache_hit_rate == 1.0


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage", "swap"])
def test_damaged_disk_entries_are_decoded_not_served(tiny_set, tmp_path, damage):
    """A disk entry that cannot be served is a miss of an undecoded sample: the sample is
    decoded and computed, never computed from its placeholder."""
    common = dict(unfrozen_epochs=(0,), epochs=3)
    want = reference_losses(tiny_set, tmp_path, **common)

    def damage_entries(record):
        if record.epoch != 1:
            return
        files = sorted((tmp_path / "cache").rglob("*.dbfc"))
        assert len(files) == 4
        if damage == "truncate":
            files[0].write_bytes(files[0].read_bytes()[:-7])
        elif damage == "delete":
            files[0].unlink()
        elif damage == "garbage":
            files[0].write_bytes(b"\0" * files[0].stat().st_size)
        else:  # two entries' files exchanged: each is complete, but for another sample
            a, b = files[0].read_bytes(), files[1].read_bytes()
            files[0].write_bytes(b)
            files[1].write_bytes(a)

    result = train(config(tiny_set, tmp_path / "cached", cache="float32:disk=64MB",
                          cache_dir=str(tmp_path / "cache"), **common), on_epoch_end=damage_entries)
    assert epoch_losses(result) == want
    assert result.cache_summary["corrupt"] == (2 if damage == "swap" else 1)


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resume_with_the_cache_on_is_exact(tiny_set, tmp_path, stop):
    """A run interrupted after epoch ``stop`` and resumed equals the uninterrupted run and the
    cache-off run (float32 store): resumed inside a frozen stretch (stop=1, 2: the resumed run
    recomputes the features the uninterrupted one served) or at a trained epoch (stop=3)."""
    common = dict(unfrozen_epochs=(0, 4), epochs=6)
    want = reference_losses(tiny_set, tmp_path, **common)
    common["cache"] = "float32:cpu=64MB"
    straight = train(config(tiny_set, tmp_path / "straight", **common))
    assert epoch_losses(straight) == want
    with pytest.raises(Interrupted):
        train(config(tiny_set, tmp_path / "resumed", **common), on_epoch_end=stop_after(stop))
    resumed = train(config(tiny_set, tmp_path / "resumed", resume=True, **common))
    assert epoch_losses(resumed) == epoch_losses(straight)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_whole_sequence_with_disk_tier_and_resume(tiny_set, tmp_path):
    """Three frozen stretches, the host tier too small for every entry (the rest spills to
    disk), a resume in the middle of the second stretch: the same losses as the cache-off run,
    epoch by epoch, and no entry file left of a dropped stretch."""
    common = dict(unfrozen_epochs=(0, 3, 6), epochs=9)
    want = reference_losses(tiny_set, tmp_path, **common)
    probe = train(config(tiny_set, tmp_path / "probe", cache="float32:cpu=64MB",
                         unfrozen_epochs=(0,), epochs=2))
    per_sample = probe.cache_summary["bytes_per_sample"]
    spec = f"float32:cpu={int(per_sample * 2.5)}B,disk=64MB"
    cache_dir = tmp_path / "cache"
    run = config(tiny_set, tmp_path / "cached", cache=spec, cache_dir=str(cache_dir), **common)
    files_per_epoch = []

    def count_files(record):
        files_per_epoch.append(len(list(cache_dir.rglob("*.dbfc"))))

    with pytest.raises(Interrupted):
        train(run, on_epoch_end=lambda record: (count_files(record), stop_after(4)(record)))
    gc.collect()  # what a crash does to the interrupted run's cache: it is gone
    resumed = train(dataclasses.replace(run, resume=True), on_epoch_end=count_files)
    assert epoch_losses(resumed) == want
    frozen = [r.frozen for r in resumed.history]
    assert frozen == [False, True, True, False, True, True, False, True, True]
    # 2 of 4 entries fit the host tier, 2 spill to disk; a trained epoch drops them all.
    assert files_per_epoch == [0, 2, 2, 0, 2, 2, 0, 2, 2]
    assert [r.cache_hit_rate for r in resumed.history if r.frozen] == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]

