"""Splitting large images into patches: windows, objects kept (against shapely), names, the
written folder, resuming after an interruption, faults."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import shapely
from PIL import Image

from dbf_ext.cli import main
from dbf_ext.data import (
    DotaDetectionDataset,
    DotaFolder,
    DotaFormatError,
    ImageReadError,
    PatchName,
    parse_patch_name,
    patch_name,
    sliding_windows,
    split_dota,
    window_objects,
    write_dota_labels,
)
from dbf_ext.data import split as split_module

# ----- an independent reference: the rules in words, shapely for the geometry ------------------


def reference_starts(length: int, size: int, step: int) -> list[int]:
    """Windows from 0 on, one step apart, until the border is covered; the last one ends at
    the border."""
    starts = [0]
    while starts[-1] + size < length:
        starts.append(min(starts[-1] + step, length - size))
    return starts


def reference_windows(width, height, patch_size, gap, rates, img_rate_thr):
    windows = {}  # insertion-ordered, each window once
    for rate in rates:
        size, step = int(patch_size / rate), int(patch_size / rate) - int(gap / rate)
        for x in reference_starts(width, size, step):
            for y in reference_starts(height, size, step):
                windows[x, y, x + size, y + size] = None
    part = [(min(x2, width) - x1) * (min(y2, height) - y1) / ((x2 - x1) * (y2 - y1)) for x1, y1, x2, y2 in windows]
    kept = [w for w, p in zip(windows, part) if p > img_rate_thr]
    return kept or [w for w, p in zip(windows, part) if abs(p - max(part)) < 0.01]


def reference_region(polygon) -> shapely.Geometry:
    """The polygon as written; corners in crossing order (shapely: invalid) mean their hull."""
    points = np.asarray(polygon, dtype=np.float64).reshape(4, 2)
    region = shapely.Polygon(points)
    return region if region.is_valid else shapely.MultiPoint(points).convex_hull


def reference_iof(polygon, window) -> float:
    region = reference_region(polygon)
    if region.area == 0:
        return 0.0
    return region.intersection(shapely.box(*window)).area / region.area


def random_polygons(rng, count, width, height):
    """Objects of every kind: rotated rectangles, arbitrary quadrilaterals (convex, non-convex,
    bow ties), triangles (a repeated corner), three corners on a line, no area at all, tiny
    ones; anywhere, including across and beyond the image border."""
    centres = rng.uniform(-20, 1, size=(count, 2)) + rng.uniform(0, 1, size=(count, 2)) * (width + 20, height + 20)
    polygons = []
    for centre in centres:
        kind = rng.integers(6)
        if kind == 0:
            w, h, theta = *rng.uniform(2, 90, size=2), rng.uniform(-math.pi, math.pi)
            c, s = math.cos(theta), math.sin(theta)
            corners = np.array([[w, h], [-w, h], [-w, -h], [w, -h]]) / 2 @ np.array([[c, s], [-s, c]])
        elif kind in (1, 2):
            corners = rng.uniform(-50, 50, size=(4, 2))
        elif kind == 3:
            corners = rng.uniform(-40, 40, size=(4, 2))
            corners[2] = corners[1]  # a triangle
        elif kind == 4:
            corners = rng.uniform(-40, 40, size=(4, 2))
            corners[1] = (corners[0] + corners[2]) / 2  # three corners on a line
        else:
            direction = rng.uniform(-1, 1, size=2)
            corners = np.outer(rng.uniform(-30, 30, size=4), direction)  # no area
        polygons.append((centre + corners).reshape(8))
    return np.round(np.array(polygons), 3)


# ----- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_windows_match_the_rules_on_random_sizes_and_rates(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        width, height = (int(v) for v in rng.integers(1, 3000, size=2))
        patch_size = int(rng.integers(128, 1100))
        gap = int(rng.integers(0, patch_size)) if rng.random() < 0.1 else int(rng.integers(0, 0.75 * patch_size))
        rates = tuple(rng.choice([0.5, 1.0, 1.5, 2.0, 0.75], size=int(rng.integers(1, 4)), replace=False))
        img_rate_thr = float(rng.choice([0.0, 0.3, 0.6, 0.9]))
        if any(int(patch_size / r) <= int(gap / r) for r in rates):
            with pytest.raises(ValueError, match="larger than the gap"):
                sliding_windows(width, height, patch_size, gap, rates, img_rate_thr)
            continue
        windows = sliding_windows(width, height, patch_size, gap, rates, img_rate_thr)
        assert windows.dtype == np.int64
        assert [tuple(w) for w in windows.tolist()] == reference_windows(width, height, patch_size, gap, rates,
                                                                         img_rate_thr)


def test_windows_cover_the_image_and_end_at_its_border():
    windows = sliding_windows(3000, 2000, 1024, 200)
    assert sorted({x for x, *_ in windows.tolist()}) == [0, 824, 1648, 1976]  # the last moved back
    assert sorted({y for _, y, *_ in windows.tolist()}) == [0, 824, 976]
    assert windows[:, 2].max() == 3000 and windows[:, 3].max() == 2000
    # smaller than a window: one window at 0, kept although mostly padding (the largest part)
    np.testing.assert_array_equal(sliding_windows(700, 500), [[0, 0, 1024, 1024]])
    # ms: rates pooled, the 2048-px window of rate 0.5 dropped (image part 0.54 <= 0.6)
    ms = sliding_windows(1500, 1500, 1024, 500, (0.5, 1.0, 1.5))
    assert sorted({x2 - x1 for x1, _, x2, _ in ms.tolist()}) == [682, 1024]
    with pytest.raises(ValueError, match="img_rate_thr"):
        sliding_windows(100, 100, img_rate_thr=1.0)


# ----- objects in windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_kept_objects_and_iof_match_shapely_on_random_polygons(seed):
    rng = np.random.default_rng(100 + seed)
    width, height = (int(v) for v in rng.integers(50, 900, size=2))
    rates = (1.0,) if seed % 2 else (0.5, 1.0, 1.5)
    windows = sliding_windows(width, height, 256, 64, rates)
    polygons = random_polygons(rng, 150, width, height)
    iof_thr = float(rng.choice([0.3, 0.7, 1.0]))
    # Both sides round: the area of a sliver of area A with corners near L is known to about
    # eps * L^2 / A of itself.
    areas = np.array([reference_region(p).area for p in polygons])
    tolerance = 1e-9 + 64 * np.finfo(np.float64).eps * np.abs(polygons).max() ** 2 / np.maximum(areas, 1e-300)
    for (indices, iof), window in zip(window_objects(polygons, windows, iof_thr), windows):
        expected = np.array([reference_iof(p, window) for p in polygons])
        borderline = np.abs(expected - iof_thr) < tolerance
        kept = np.zeros(len(polygons), dtype=bool)
        kept[indices] = True
        np.testing.assert_array_equal(kept[~borderline], (expected >= iof_thr)[~borderline])
        assert np.all(np.abs(iof - expected[indices]) <= tolerance[indices])
        # wholly inside: exactly 1, never marked truncated by rounding
        inside = [i for i in indices if shapely.box(*window).contains(reference_region(polygons[i]))]
        assert np.all(iof[np.isin(indices, inside)] == 1.0)


def test_iof_of_special_polygons():
    window = np.array([[0, 0, 100, 100]])
    cases = {
        "square half inside": ([80, 10, 120, 10, 120, 50, 80, 50], 0.5),
        "bow tie (crossing corner order) is its hull": ([80, 10, 120, 50, 120, 10, 80, 50], 0.5),
        "non-convex dart": ([50, 50, 150, 0, 110, 50, 150, 100], None),
        "triangle with a repeated corner": ([90, 0, 110, 0, 110, 0, 90, 20], None),
        "no area": ([10, 10, 20, 20, 30, 30, 40, 40], 0.0),
        "touching from outside": ([100, 10, 120, 10, 120, 30, 100, 30], None),
    }
    for name, (polygon, expected) in cases.items():
        polygon = np.array([polygon], dtype=np.float64)
        objects, _, iof = split_module.window_iof(polygon, window)
        value = float(iof[0]) if len(objects) else 0.0
        reference = reference_iof(polygon[0], window[0]) if expected is None else expected
        assert value == pytest.approx(reference, abs=1e-12), name
    assert window_objects(np.array([[10, 10, 20, 20, 30, 30, 40, 40.0]]), window, 0.01)[0][0].size == 0


# ----- names ------------------------------------------------------------------------------------------


def test_patch_names_round_trip_and_devkit_names():
    assert patch_name("P0001", [824, 0, 1848, 1024]) == "P0001__1024__824___0"
    assert parse_patch_name("P0001__1024__824___0") == PatchName("P0001", 824, 0, size=1024)
    # an id with double underscores, a file name, a path
    parsed = parse_patch_name("/data/split/images/scene__a__2__682__349___698.png")
    assert (parsed.image_id, parsed.size, parsed.offset, parsed.scale) == ("scene__a__2", 682, (349, 698), 1.0)
    # DOTA devkit: the rate, offsets in the scaled image
    devkit = parse_patch_name("P0003__0.5__412___100.txt")
    assert (devkit.rate, devkit.offset, devkit.scale) == (0.5, (824.0, 200.0), 0.5)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("P0001_1024_824_0", "single underscores"),
        ("P0001", "no '___' before the y offset"),
        ("P0001__1024__824___y", "y offset 'y' is not"),
        ("P0001__1024__-5___0", "x offset '-5' is not"),
        ("P0001__big__8___0", "size or rate 'big' is not a number"),
        ("__1024__8___0", "lacks the image id"),
        ("P1__0__8___0", "window size is 0"),
    ],
)
def test_unparsable_patch_names_say_why(name, problem):
    with pytest.raises(ValueError, match=problem) as info:
        parse_patch_name(name)
    assert "'<image id>__<window size>__<x>___<y>'" in str(info.value) or "window size is 0" in str(info.value)


# ----- splitting a folder ----------------------------------------------------------------------------


def make_source(root, sizes, rng, objects=12):
    """A DOTA folder of random images with random (valid) objects, some on and across borders."""
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    for index, (width, height) in enumerate(sizes):
        image_id = f"P{index:04d}"
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(
            root / "images" / f"{image_id}.png")
        polygons = random_polygons(rng, objects, width, height)
        polygons = polygons[[reference_region(p).area > 1 for p in polygons]]  # the reader refuses no-area ones
        names = list(rng.choice(["plane", "ship", "small-vehicle"], size=len(polygons)))
        write_dota_labels(root / "labelTxt" / f"{image_id}.txt", polygons, names, rng.random(len(polygons)) < 0.2,
                          header={"gsd": "0.5"})
    return root


def expected_split(src, patch_size, gap, rates, iof_thr=0.7, img_rate_thr=0.6, pad_rgb=(124, 116, 104)):
    """{patch name: (pixels, label lines)} by the reference rules, for patches with objects."""
    folder = DotaFolder(src)
    patches = {}
    for image_id in folder.image_ids:
        pixels = np.asarray(Image.open(folder.image_path(image_id)).convert("RGB"))
        height, width = pixels.shape[:2]
        labels = folder.labels(image_id)
        for x1, y1, x2, y2 in reference_windows(width, height, patch_size, gap, rates, img_rate_thr):
            lines = []
            for polygon, name, difficult in zip(labels.polygons, labels.class_names, labels.difficult):
                iof = reference_iof(polygon, (x1, y1, x2, y2))
                if iof >= iof_thr:
                    shifted = polygon - np.tile([x1, y1], 4)
                    lines.append((tuple(shifted), name, "2" if iof < 1 - 1e-12 else str(int(difficult))))
            if lines:
                patch = np.empty((y2 - y1, x2 - x1, 3), dtype=np.uint8)
                patch[...] = pad_rgb
                part = pixels[y1:y2, x1:x2]
                patch[:part.shape[0], :part.shape[1]] = part
                patches[f"{image_id}__{x2 - x1}__{x1}___{y1}"] = (patch, sorted(lines))
    return patches


def read_split(dst):
    folder = DotaFolder(dst)
    out = {}
    for image_id in folder.image_ids:
        labels = folder.labels(image_id)
        flags = np.where(labels.truncated, "2", labels.difficult.astype(int).astype(str))
        lines = sorted(zip(map(tuple, labels.polygons), labels.class_names, flags))
        out[image_id] = (np.asarray(Image.open(folder.image_path(image_id))), lines)
    return out


def assert_same_split(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, (pixels, lines) in expected.items():
        np.testing.assert_array_equal(actual[name][0], pixels, err_msg=name)
        assert [(list(p), n, f) for p, n, f in actual[name][1]] == [(list(p), n, f) for p, n, f in lines], name


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rng = np.random.default_rng(7)
    # wider than a window, smaller than a window, one window exactly, a thin strip
    return make_source(tmp_path_factory.mktemp("src") / "train", [(300, 220), (90, 70), (128, 128), (400, 60)], rng)


@pytest.mark.parametrize("rates, workers", [((1.0,), 2), ((0.5, 1.0, 1.5), 0)])
def test_split_folder_matches_the_reference(source, tmp_path, rates, workers):
    summary = split_dota(source, tmp_path / "out", patch_size=128, gap=32, rates=rates, workers=workers)
    expected = expected_split(source, 128, 32, rates)
    assert_same_split(read_split(tmp_path / "out"), expected)
    assert (summary.images, summary.patches, summary.written) == (4, len(expected), len(expected))
    assert summary.objects == sum(len(lines) for _, lines in expected.values())
    assert any(flag == "2" for _, lines in expected.values() for *_, flag in lines)  # truncated ones exist
    # the output is a DOTA folder the dataset reads, patches of the window size
    dataset = DotaDetectionDataset(tmp_path / "out", box_type="obb")
    assert len(dataset) == len(expected) and dataset.image_size(0)[0] in {int(128 / r) for r in rates}


def test_save_empty_padding_and_folders_without_labels(source, tmp_path):
    summary = split_dota(source, tmp_path / "all", patch_size=128, gap=32, save_empty=True, workers=0,
                         pad_value=(1, 2, 3))
    assert summary.patches == sum(len(reference_windows(w, h, 128, 32, (1.0,), 0.6))
                                  for w, h in ((300, 220), (90, 70), (128, 128), (400, 60)))
    small = np.asarray(Image.open(tmp_path / "all" / "images" / "P0001__128__0___0.png"))
    assert small.shape == (128, 128, 3)
    assert (small[70:] == (3, 2, 1)).all() and (small[:, 90:] == (3, 2, 1)).all()  # B, G, R given
    # no labelTxt/: every window, no labels written
    unlabelled = tmp_path / "test"
    (unlabelled / "images").mkdir(parents=True)
    for path in (source / "images").iterdir():
        (unlabelled / "images" / path.name).write_bytes(path.read_bytes())
    summary = split_dota(unlabelled, tmp_path / "test_out", patch_size=128, gap=32, workers=0)
    assert summary.patches == len(list((tmp_path / "test_out" / "images").iterdir())) > 0
    assert not (tmp_path / "test_out" / "labelTxt").exists()


def test_images_beyond_pillows_pixel_limit_are_split(source, tmp_path, monkeypatch):
    expected = expected_split(source, 128, 32, (1.0,))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 300 x 220 is now a "decompression bomb"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(source / "images" / "P0000.png")
    split_dota(source, tmp_path / "out", patch_size=128, gap=32, workers=0)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is back
    monkeypatch.undo()
    assert_same_split(read_split(tmp_path / "out"), expected)


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (64, 65)])
def test_patch_png_files_read_back_exactly(shape, tmp_path, monkeypatch):
    rng = np.random.default_rng(shape[0])
    pixels = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    pixels[: shape[0] // 2] = pixels[: shape[0] // 2] // 32 * 32  # runs as well as noise
    monkeypatch.setattr(split_module, "_PNG_CHUNK_BYTES", 1000)  # several data chunks
    path = tmp_path / "patch.png"
    path.write_bytes(split_module.encode_png(pixels))
    with Image.open(path) as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), pixels)
    assert split_module._png_is_complete(path)
    path.write_bytes(path.read_bytes()[:-1])
    assert not split_module._png_is_complete(path)


# ----- interruptions ---------------------------------------------------------------------------------


def test_an_exception_midway_leaves_only_complete_patches_and_a_rerun_finishes(source, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    split_dota(source, reference, patch_size=128, gap=32, workers=0)
    calls = []
    original = split_module.cut_window

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return original(*args)

    monkeypatch.setattr(split_module, "cut_window", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        split_dota(source, out, patch_size=128, gap=32, workers=0)
    images = sorted(p.name for p in (out / "images").iterdir())
    assert len(images) == 3 and not list(out.rglob("*.partial"))
    assert all(split_module._png_is_complete(out / "images" / name) for name in images)
    monkeypatch.setattr(split_module, "cut_window", original)
    summary = split_dota(source, out, patch_size=128, gap=32, workers=0)
    assert summary.written == summary.patches - 3
    assert_same_split(read_split(out), read_split(reference))
    # a finished split: nothing to do, not even reading an image
    monkeypatch.setattr(split_module, "read_rgb8", lambda path: pytest.fail("image read again"))
    assert split_dota(source, out, patch_size=128, gap=32, workers=2).written == 0


def test_a_killed_worker_leaves_no_half_patch_and_a_rerun_finishes(source, tmp_path):
    """A worker process dies (SIGKILL) in the middle of writing a patch: the command fails with
    one line, the half-written file never has a patch's name, and the same command finishes
    the split, identical to an uninterrupted one."""
    out, marker = tmp_path / "out", tmp_path / "killed"
    script = textwrap.dedent(f"""
        import io, os, signal, sys
        import dbf_ext.data.split as split
        from dbf_ext.cli import main
        real_write = split.write_durably

        def write_durably(path, mode, write, **options):
            if path.suffix == ".png" and not os.path.exists({str(marker)!r}):
                open({str(marker)!r}, "w").close()

                def half_then_killed(file):
                    whole = io.BytesIO()
                    write(whole)
                    file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                    file.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

                return real_write(path, mode, half_then_killed, **options)
            return real_write(path, mode, write, **options)

        split.write_durably = write_durably
        sys.exit(main(["split", {str(source)!r}, {str(out)!r}, "--patch-size", "128", "--gap", "32",
                       "--workers", "2"]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "worker process died" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert marker.exists() and list(out.rglob("*.partial"))  # the killed write's debris
    assert all(split_module._png_is_complete(p) for p in (out / "images").glob("*.png"))
    assert main(["split", str(source), str(out), "--patch-size", "128", "--gap", "32", "--workers", "0"]) == 0
    assert not list(out.rglob("*.partial"))
    split_dota(source, tmp_path / "reference", patch_size=128, gap=32, workers=0)
    assert_same_split(read_split(out), read_split(tmp_path / "reference"))


def test_other_parameters_or_a_foreign_folder_are_refused(source, tmp_path):
    split_dota(source, tmp_path / "out", patch_size=128, gap=32, workers=0)
    with pytest.raises(FileExistsError, match=r"other parameters \(gap 32 -> 48\)"):
        split_dota(source, tmp_path / "out", patch_size=128, gap=48, workers=0)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        split_dota(source, tmp_path / "foreign", patch_size=128, gap=32, workers=0)


# ----- faults --------------------------------------------------------------------------------------


def test_malformed_label_stops_before_any_patch_with_file_and_line(source, tmp_path, capsys):
    src = tmp_path / "src"
    make_source(src, [(200, 150)], np.random.default_rng(3))
    label = src / "labelTxt" / "P0000.txt"
    label.write_text(label.read_text() + "1 2 3 4 5 6 7 8 plane 0 extra\n")
    line = len(label.read_text().splitlines())
    with pytest.raises(DotaFormatError, match=f"{label}:{line}: expected 10 fields"):
        split_dota(src, tmp_path / "out", patch_size=128, gap=32)
    assert not (tmp_path / "out").exists()
    assert main(["split", str(src), str(tmp_path / "out2"), "--patch-size", "128", "--gap", "32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dbf-ext split: error:") and f"{label}:{line}:" in err and "\n" not in err


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_an_error_naming_it(source, tmp_path, workers):
    src = tmp_path / "src"
    make_source(src, [(200, 150), (210, 160)], np.random.default_rng(4))
    broken = src / "images" / "P0001.png"
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=f"{broken}: cannot read the image"):
        split_dota(src, tmp_path / "out", patch_size=128, gap=32, workers=workers)
    assert not list((tmp_path / "out").rglob("*.partial"))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(patch_size=128, gap=128), "larger than the gap"),
        (dict(iof_thr=0.0), r"iof_thr must be in \(0, 1\]"),
        (dict(img_rate_thr=1.0), r"img_rate_thr must be in \[0, 1\)"),
        (dict(rates=(0.0,)), "rates must be positive"),
        (dict(pad_value=(1, 2)), "pad_value"),
        (dict(workers=-1), "workers"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(source, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        split_dota(source, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_split_command_on_a_folder_of_splits(source, tmp_path, capsys):
    root = tmp_path / "dota"
    root.mkdir()
    (root / "train").symlink_to(source, target_is_directory=True)
    assert main(["split", str(root), str(tmp_path / "out"), "--preset", "ms", "--patch-size", "128",
                 "--gap", "32", "--workers", "0"]) == 0
    assert "patches of 128 px, gap 32, rates 0.5, 1, 1.5" in capsys.readouterr().out
    assert_same_split(read_split(tmp_path / "out" / "train"), expected_split(source, 128, 32, (0.5, 1.0, 1.5)))
