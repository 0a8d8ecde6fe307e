"""The synthetic aerial set: determinism, geometry of its objects, the cache folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import shapely

from dbf_ext.data import (
    SYNTHETIC_CLASSES,
    DotaDetectionDataset,
    DotaFolder,
    SyntheticConfig,
    SyntheticSceneConfig,
    default_cache_dir,
    generate_synthetic_dota,
    prepare_synthetic_dota,
    render_synthetic_scene,
    render_synthetic_tile,
    sliding_windows,
    synthetic,
    window_iof,
)

SMALL = SyntheticConfig(tile_size=128, train_tiles=3, val_tiles=2, min_objects=3, max_objects=8, seed=5)


def test_tiles_are_deterministic_and_depend_on_the_seed():
    a = render_synthetic_tile(SMALL, "train", 1)
    b = render_synthetic_tile(SMALL, "train", 1)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.polygons, b.polygons)
    assert a.class_names == b.class_names
    other = render_synthetic_tile(SyntheticConfig(tile_size=128, seed=6), "train", 1)
    assert not np.array_equal(a.image, other.image)
    assert not np.array_equal(a.image, render_synthetic_tile(SMALL, "val", 1).image)
    with pytest.raises(ValueError, match="split"):
        render_synthetic_tile(SMALL, "test", 0)


def test_objects_are_valid_separate_and_inside_the_tile():
    config = SyntheticConfig()
    counts = {name: 0 for name in SYNTHETIC_CLASSES}
    for index in range(12):
        tile = render_synthetic_tile(config, "train", index)
        assert tile.image.shape == (256, 256, 3) and tile.image.dtype == np.uint8
        assert config.min_objects <= len(tile.class_names) <= config.max_objects
        polygons = [shapely.Polygon(p.reshape(4, 2)) for p in tile.polygons]
        for i, poly in enumerate(polygons):
            assert poly.is_valid
            assert poly.bounds[0] >= 0 and poly.bounds[1] >= 0 and poly.bounds[2] <= 256 and poly.bounds[3] <= 256
            assert 12 <= max(poly.bounds[2] - poly.bounds[0], poly.bounds[3] - poly.bounds[1])
            assert all(not poly.intersects(other) for other in polygons[i + 1:])
        for name in tile.class_names:
            counts[name] += 1
        # objects stand out: the pixels inside a box differ from the tile's median colour
        median = np.median(tile.image.reshape(-1, 3), axis=0)
        for polygon, difficult in zip(tile.polygons, tile.difficult):
            x0, y0 = np.floor(polygon.reshape(4, 2).min(0)).astype(int)
            x1, y1 = np.ceil(polygon.reshape(4, 2).max(0)).astype(int)
            patch = tile.image[y0:y1, x0:x1].reshape(-1, 3).astype(float)
            if not difficult:
                assert np.abs(patch - median).max() > 60
    assert all(count >= 5 for count in counts.values()), counts


def test_generated_folder_reads_back(tmp_path):
    root = generate_synthetic_dota(tmp_path / "set", SMALL, quiet=True)
    train = DotaDetectionDataset(root, "train", classes=SYNTHETIC_CLASSES, box_type="obb")
    val = DotaDetectionDataset(root, "val", classes=SYNTHETIC_CLASSES)
    assert train.image_ids == ("train_0000", "train_0001", "train_0002")
    assert len(val) == 2 and val.image_size(0) == (128, 128)
    tile = render_synthetic_tile(SMALL, "train", 2)
    labels = train.folder.labels("train_0002")
    np.testing.assert_array_equal(labels.polygons, tile.polygons)
    assert labels.class_names == tile.class_names and labels.header["imagesource"] == "synthetic-v1"
    image, target = train[2]
    np.testing.assert_array_equal((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), tile.image)
    assert target["boxes"].shape == (len(tile.class_names), 5)
    assert (target["boxes"][:, 2] >= target["boxes"][:, 3]).all()  # le90


def test_prepare_uses_the_cache_and_regenerates_incomplete_sets(tmp_path, monkeypatch):
    root = prepare_synthetic_dota(SMALL, cache_dir=tmp_path, quiet=True)
    assert root == tmp_path / "synthetic-v1" / SMALL.params_hash()
    marker = json.loads((root / synthetic.COMPLETE_MARKER).read_text())
    assert marker["params"]["seed"] == 5 and marker["classes"] == list(SYNTHETIC_CLASSES)
    assert [p.name for p in (tmp_path / "synthetic-v1").iterdir()] == [root.name]  # no temporaries left

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(synthetic, "generate_synthetic_dota", no_generation)
    assert prepare_synthetic_dota(SMALL, cache_dir=tmp_path) == root
    monkeypatch.undo()

    (root / synthetic.COMPLETE_MARKER).unlink()  # as if interrupted before the marker
    (root / "train" / "images" / "train_0000.png").write_bytes(b"")
    assert prepare_synthetic_dota(SMALL, cache_dir=tmp_path, quiet=True) == root
    assert (root / synthetic.COMPLETE_MARKER).is_file()
    assert len(DotaFolder(root / "train")) == 3
    assert (root / "train" / "images" / "train_0000.png").stat().st_size > 0


def test_generation_is_byte_identical_and_quiet(tmp_path, capsys):
    generate_synthetic_dota(tmp_path / "a", SMALL, quiet=True)
    generate_synthetic_dota(tmp_path / "b", SMALL)  # not a terminal: no progress bar either
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * (3 + 2)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert capsys.readouterr() == ("", "")


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DBF_EXT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "dbf_ext"
    monkeypatch.setenv("DBF_EXT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert prepare_synthetic_dota(SMALL, quiet=True).parent.parent == tmp_path / "mine"
    monkeypatch.delenv("DBF_EXT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "dbf_ext"


def test_config_hash_and_validation():
    assert SyntheticConfig().params_hash() == SyntheticConfig().params_hash()
    assert SyntheticConfig(seed=1).params_hash() != SyntheticConfig().params_hash()
    assert SyntheticConfig(val_tiles=17).params_hash() != SyntheticConfig().params_hash()
    with pytest.raises(ValueError, match="tile_size"):
        SyntheticConfig(tile_size=64)
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticConfig(min_objects=9, max_objects=8)
    with pytest.raises(ValueError, match="difficult_fraction"):
        SyntheticConfig(difficult_fraction=1.5)


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    parent = tmp_path / "synthetic-v1"
    stale = parent / f".{SMALL.params_hash()}.tmp-old"
    fresh = parent / f".{SMALL.params_hash()}.tmp-running"
    for temp in (stale, fresh):
        (temp / "train" / "images").mkdir(parents=True)
    for folder in (stale, stale / "train", stale / "train" / "images"):
        os.utime(folder, (0, 0))
    prepare_synthetic_dota(SMALL, cache_dir=tmp_path, quiet=True)
    assert not stale.exists() and fresh.exists()


def test_large_scenes_are_deterministic_valid_and_cross_patch_borders(tmp_path):
    # Adding scenes left the tiles' parameters, and so the demo's folder, as they were.
    assert SyntheticConfig().params_hash() == "6343e7d8d87b3834"
    config = SyntheticSceneConfig(width=600, height=400, train_scenes=1, val_scenes=1, seed=3)
    scene = render_synthetic_scene(config, "train", 0)
    again = render_synthetic_scene(config, "train", 0)
    np.testing.assert_array_equal(scene.image, again.image)
    np.testing.assert_array_equal(scene.polygons, again.polygons)
    assert scene.image.shape == (400, 600, 3) and not np.array_equal(
        scene.image[:256, :256], render_synthetic_tile(SyntheticConfig(seed=3), "train", 0).image)
    units = round(600 * 400 / 256**2)
    assert config.min_objects * units <= len(scene.class_names) <= config.max_objects * units
    polygons = [shapely.Polygon(p.reshape(4, 2)) for p in scene.polygons]
    assert all(p.is_valid and shapely.box(0, 0, 600, 400).contains(p) for p in polygons)
    assert not any(a.intersects(b) for i, a in enumerate(polygons) for b in polygons[i + 1:])
    _, _, iof = window_iof(scene.polygons, sliding_windows(600, 400, 256, 64))
    assert ((iof > 0) & (iof < 1)).sum() >= 5  # objects cut by patch borders
    root = prepare_synthetic_dota(config, cache_dir=tmp_path, quiet=True)
    assert root.parent.name == "synthetic-scenes-v1" and root.name == config.params_hash()
    dataset = DotaDetectionDataset(root, "val", classes=SYNTHETIC_CLASSES)
    assert dataset.image_size(0) == (600, 400)
