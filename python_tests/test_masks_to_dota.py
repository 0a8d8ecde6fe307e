"""masks_to_dota and `dbf-ext masks2dota`: a folder of PNG instance maps -> DOTA label files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dbf_ext.boxes import mask2obb, poly2obb
from dbf_ext.cli import main
from dbf_ext.data import ImageReadError, masks_to_dota, read_dota_labels


def write_png(path, values: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(values, mode=mode).save(path)


@pytest.fixture
def mask_folder(tmp_path):
    """Two 8-bit maps (three instances, one split in two parts; none) and a 16-bit one."""
    masks = tmp_path / "masks"
    masks.mkdir()
    first = np.zeros((40, 50), dtype=np.uint8)
    first[2:6, 3:20] = 1
    first[10:30, 30:34] = 7
    first[35:38, 1:3] = 200
    first[35:38, 45:48] = 200  # instance 200 has two parts: one box spans both
    write_png(masks / "a.png", first)
    write_png(masks / "empty.png", np.zeros((8, 8), dtype=np.uint8))
    wide = np.zeros((20, 30), dtype=np.uint16)
    wide[5:9, 5:25] = 1000
    write_png(masks / "wide.png", wide)
    (masks / "notes.txt").write_text("not a mask")
    return masks, {"a": first, "empty": np.zeros((8, 8)), "wide": wide.astype(np.int64)}


def test_folder_conversion_writes_the_minimum_rectangles(mask_folder, tmp_path):
    masks, maps = mask_folder
    written = masks_to_dota(masks, tmp_path / "labelTxt", class_name="car")
    assert [p.name for p in written] == ["a.txt", "empty.txt", "wide.txt"]
    for path in written:
        labels, _ = read_dota_labels(path)
        instance_map = maps[path.stem]
        ids = np.unique(instance_map[instance_map > 0])
        assert labels.class_names == ("car",) * len(ids)
        if not len(ids):
            continue
        want = mask2obb(torch.from_numpy(instance_map[None] == ids[:, None, None]), dtype=torch.float64)
        got = poly2obb(torch.from_numpy(labels.polygons))  # the corners read back as boxes
        torch.testing.assert_close(got[:, 2] * got[:, 3], want[:, 2] * want[:, 3], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[:, :2], want[:, :2], rtol=0, atol=1e-9)
    a, _ = read_dota_labels(tmp_path / "labelTxt" / "a.txt")
    np.testing.assert_allclose(a.polygons[0].reshape(4, 2).min(0), [3, 2])  # pixel corners
    np.testing.assert_allclose(a.polygons[0].reshape(4, 2).max(0), [20, 6])


def test_classes_from_class_maps(mask_folder, tmp_path):
    masks, maps = mask_folder
    classes_dir = tmp_path / "classes"
    classes_dir.mkdir()
    for stem, instance_map in maps.items():
        class_map = np.where(instance_map == 7, 2, np.where(instance_map > 0, 1, 0)).astype(np.uint8)
        write_png(classes_dir / f"{stem}.png", class_map)
    masks_to_dota(masks, tmp_path / "out", class_dir=classes_dir, classes=["ship", "plane"])
    labels, _ = read_dota_labels(tmp_path / "out" / "a.txt")
    assert labels.class_names == ("ship", "plane", "ship")
    # An instance over two classes is refused, naming the file and the instance.
    bad = np.zeros((40, 50), dtype=np.uint8)
    bad[2:4, 3:20] = 1
    write_png(classes_dir / "a.png", bad)
    with pytest.raises(ValueError, match=r"a\.png: instance 1 must lie on one class"):
        masks_to_dota(masks, tmp_path / "out", class_dir=classes_dir, classes=["ship", "plane"])


def test_unreadable_png_names_the_file(mask_folder, tmp_path):
    masks, _ = mask_folder
    (masks / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError, match=r"broken\.png: cannot read"):
        masks_to_dota(masks, tmp_path / "out")
    (masks / "broken.png").unlink()
    write_png(masks / "rgb.png", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageReadError, match=r"rgb\.png: an instance map must have one channel"):
        masks_to_dota(masks, tmp_path / "out")


def test_cli(mask_folder, tmp_path, capsys):
    masks, _ = mask_folder
    assert main(["masks2dota", str(masks), str(tmp_path / "cli"), "--class-name", "tree"]) == 0
    assert "3 label files" in capsys.readouterr().out
    labels, _ = read_dota_labels(tmp_path / "cli" / "wide.txt")
    assert labels.class_names == ("tree",)
    (masks / "broken.png").write_bytes(b"garbage")
    assert main(["masks2dota", str(masks), str(tmp_path / "cli")]) == 1
    assert "broken.png" in capsys.readouterr().err
