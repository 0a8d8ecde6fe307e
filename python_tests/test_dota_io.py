"""DOTA label / Task1 reading and writing, folder indexing and the detection Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import torch
from PIL import Image

from dbf_ext import boxes as B
from dbf_ext.data import (
    DotaDetectionDataset,
    DotaFolder,
    DotaFormatError,
    DotaFormatWarning,
    ImageReadError,
    boxes_to_polygons,
    collate_fn,
    polygons_to_hbb,
    polygons_to_obb,
    read_dota_labels,
    read_dota_task1,
    write_dota_labels,
    write_dota_task1,
)

GOOD_LINE = "10 20 50 20 50 40 10 40 small-vehicle 0"


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_image(path, size=(40, 30), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(root, labels: dict[str, str], images=None):
    """A DOTA folder with a 40x30 png per image id (``images``, default: the label ids)."""
    for image_id in labels if images is None else images:
        write_image(root / "images" / f"{image_id}.png")
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    for image_id, text in labels.items():
        write_text(root / "labelTxt" / f"{image_id}.txt", text)
    return root


# ----- label files ---------------------------------------------------------------------------


def test_label_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    polygons = rng.uniform(0, 1000, size=(7, 8))
    names = ["plane", "small-vehicle", "plane", "storage-tank", "ship", "plane", "harbor"]
    difficult = rng.random(7) < 0.4
    header = {"imagesource": "GoogleEarth", "gsd": "0.146343590398"}
    path = tmp_path / "P0001.txt"
    write_dota_labels(path, polygons, names, difficult, header)
    labels, issues = read_dota_labels(path)
    assert issues == []
    np.testing.assert_array_equal(labels.polygons, polygons)
    assert labels.class_names == tuple(names)
    np.testing.assert_array_equal(labels.difficult, difficult)
    assert labels.header == header
    assert path.read_text().splitlines()[:2] == ["imagesource:GoogleEarth", "gsd:0.146343590398"]


def test_truncated_objects_have_difficulty_2_and_are_normal_objects(tmp_path):
    """Split tools write difficulty 2 for an object cut by a patch border: read back as
    truncated, not difficult; a truncated flag wins over difficult when writing (as they do)."""
    polygons = np.array([[10, 20, 50, 20, 50, 40, 10, 40]] * 4, dtype=np.float64)
    path = tmp_path / "P1__1024__0___0.txt"
    write_dota_labels(path, polygons, ["plane"] * 4, difficult=[False, True, False, True],
                      truncated=[False, False, True, True])
    assert [line.split()[-1] for line in path.read_text().splitlines()] == ["0", "1", "2", "2"]
    labels, _ = read_dota_labels(path)
    np.testing.assert_array_equal(labels.difficult, [False, True, False, False])
    np.testing.assert_array_equal(labels.truncated, [False, False, True, True])
    write_image(tmp_path / "data" / "images" / "P1.png")
    write_text(tmp_path / "data" / "labelTxt" / "P1.txt", path.read_text())
    ann = DotaDetectionDataset(tmp_path / "data").eval_annotations()[0]
    assert len(ann["bboxes"]) == 3 and len(ann["bboxes_ignore"]) == 1  # only flag 1 is ignored


def test_label_file_variants(tmp_path):
    # BOM, CRLF, blank lines, a 9-field line (difficult defaults to 0), "gsd:null"
    text = "\ufeffimagesource:GoogleEarth\r\ngsd:null\r\n\r\n" + GOOD_LINE + "\r\n1 2 3 2 3 4 1 4 plane\r\n  \r\n"
    labels, _ = read_dota_labels(write_text(tmp_path / "a.txt", text))
    assert labels.header == {"imagesource": "GoogleEarth", "gsd": "null"}
    assert labels.class_names == ("small-vehicle", "plane")
    np.testing.assert_array_equal(labels.difficult, [False, False])
    np.testing.assert_array_equal(labels.polygons[1], [1, 2, 3, 2, 3, 4, 1, 4])
    empty, _ = read_dota_labels(write_text(tmp_path / "b.txt", ""))
    assert len(empty) == 0 and empty.polygons.shape == (0, 8) and empty.obb().shape == (0, 5)


@pytest.mark.parametrize(
    "line, message",
    [
        ("10 20 50 20 50 40 10 40", "expected 10 fields"),
        ("10 20 50 20 50 40 10 40 plane 0 extra", "expected 10 fields"),
        ("10 20 50 twenty 50 40 10 40 plane 0", "coordinates must be numbers"),
        ("10 20 50 nan 50 40 10 40 plane 0", "coordinates must be finite"),
        ("10 20 50 20 50 40 10 40 plane 3", "difficult must be 0, 1 or 2"),
    ],
)
def test_malformed_line_raises_with_file_and_line(tmp_path, line, message):
    path = write_text(tmp_path / "P0007.txt", f"gsd:0.5\n{GOOD_LINE}\n{line}\n")
    with pytest.raises(DotaFormatError, match=message) as info:
        read_dota_labels(path)
    assert str(info.value).startswith(f"{path}:3:")


def test_malformed_lines_warn_and_are_reported_not_dropped_silently(tmp_path):
    path = write_text(tmp_path / "P0007.txt", f"1 2 3\n{GOOD_LINE}\n1 2 3 4 5 6 7 x plane 0\n{GOOD_LINE}\n")
    with pytest.warns(DotaFormatWarning) as record:
        labels, issues = read_dota_labels(path, errors="warn")
    assert len(labels) == 2
    assert [issue.line for issue in issues] == [1, 3]
    assert [str(w.message) for w in record] == [str(issue) for issue in issues]
    assert str(issues[0]).startswith(f"{path}:1: expected 10 fields")
    (tmp_path / "latin1.txt").write_bytes(b"gsd:0.5\n1 2 3 2 3 4 1 4 v\xe9hicule 0\n")
    with pytest.warns(DotaFormatWarning, match="latin1.txt: not UTF-8 text"):
        assert len(read_dota_labels(tmp_path / "latin1.txt", errors="warn")[0]) == 0
    with pytest.raises(ValueError, match="errors must be one of"):
        read_dota_labels(path, errors="ignore")


def test_unknown_class_with_a_known_list(tmp_path):
    path = write_text(tmp_path / "P0002.txt", f"{GOOD_LINE}\n1 2 3 2 3 4 1 4 spaceship 0\n")
    with pytest.raises(DotaFormatError, match=r"P0002.txt:2: unknown class 'spaceship'"):
        read_dota_labels(path, classes=("small-vehicle", "plane"))
    labels, _ = read_dota_labels(path)  # no list: every name is accepted
    assert labels.class_names == ("small-vehicle", "spaceship")


def test_write_labels_checks_its_input(tmp_path):
    with pytest.raises(ValueError, match="2 polygons, 1 class names"):
        write_dota_labels(tmp_path / "x.txt", np.zeros((2, 8)), ["plane"])
    with pytest.raises(ValueError, match="without whitespace"):
        write_dota_labels(tmp_path / "x.txt", np.zeros((1, 8)), ["small vehicle"])


# ----- box conversions -----------------------------------------------------------------------


def test_polygons_to_boxes():
    obb = torch.tensor([[100.0, 50.0, 40.0, 10.0, 0.3], [20.0, 30.0, 12.0, 30.0, -1.2]], dtype=torch.float64)
    polygons = B.obb2poly(obb).numpy()
    np.testing.assert_allclose(polygons_to_obb(polygons, "le90"), B.regularize_obb(obb, "le90").numpy(), atol=1e-9)
    hbb = polygons_to_hbb(polygons)
    np.testing.assert_allclose(hbb, B.obb2hbb(obb).numpy(), atol=1e-9)
    # DOTA corner order does not matter, and axis-aligned corners come back from boxes_to_polygons
    reordered = polygons.reshape(-1, 4, 2)[:, [2, 0, 3, 1]].reshape(-1, 8)
    np.testing.assert_array_equal(polygons_to_hbb(reordered), hbb)
    np.testing.assert_array_equal(polygons_to_hbb(boxes_to_polygons(hbb, "hbb")), hbb)
    np.testing.assert_allclose(boxes_to_polygons(obb.numpy(), "obb"), polygons)
    with pytest.raises(ValueError, match="box_type"):
        boxes_to_polygons(hbb, "xyxy")


# ----- folders ---------------------------------------------------------------------------------


def test_folder_index_classes_and_missing_files(tmp_path):
    root = make_folder(tmp_path / "train", {
        "P2": GOOD_LINE + "\n",
        "P1": "1 2 3 2 3 4 1 4 plane 1\n" + GOOD_LINE + "\n",
        "P3": "",
    }, images=["P1", "P2", "P3", "P4"])
    write_text(root / "images" / "notes.txt", "not an image")
    folder = DotaFolder(root)
    assert folder.image_ids == ("P1", "P2", "P3", "P4")
    assert folder.classes == ("plane", "small-vehicle")  # discovered, sorted
    assert len(folder.labels("P4")) == 0  # image without a label file: no objects
    assert folder.labels("P1").class_names == ("plane", "small-vehicle")
    with pytest.raises(KeyError):
        folder.labels("P9")
    assert DotaFolder(root, classes=["small-vehicle", "plane", "ship"]).classes == ("small-vehicle", "plane", "ship")
    with pytest.raises(ValueError, match="distinct"):
        DotaFolder(root, classes=["plane", "plane", "small-vehicle"])
    images_only = DotaFolder(root, labels_dir=None)
    assert images_only.classes == () and len(images_only.labels("P1")) == 0


def test_folder_missing_parts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image folder"):
        DotaFolder(tmp_path)
    write_image(tmp_path / "images" / "P1.png")
    with pytest.raises(FileNotFoundError, match="no label folder"):
        DotaFolder(tmp_path)


def test_label_without_image_and_duplicate_ids(tmp_path):
    root = make_folder(tmp_path, {"P1": GOOD_LINE, "P2": GOOD_LINE}, images=["P1"])
    with pytest.raises(DotaFormatError, match=r"P2.txt: label file has no image"):
        DotaFolder(root)
    with pytest.warns(DotaFormatWarning, match="has no image"):
        folder = DotaFolder(root, errors="warn")
    assert folder.image_ids == ("P1",) and len(folder.issues) == 1
    write_image(root / "images" / "P1.jpg")
    with pytest.raises(DotaFormatError, match="two images with id 'P1'"):
        DotaFolder(root)


def test_folder_reports_bad_lines_of_every_file(tmp_path):
    root = make_folder(tmp_path, {"P1": "1 2 3\n" + GOOD_LINE, "P2": GOOD_LINE + "\n1 2 3 4 5 6 7 8 ship 0\n"})
    with pytest.raises(DotaFormatError, match=r"P1.txt:1:"):
        DotaFolder(root)
    with pytest.warns(DotaFormatWarning):
        folder = DotaFolder(root, classes=["small-vehicle"], errors="warn")
    assert [(issue.path.name, issue.line) for issue in folder.issues] == [("P1.txt", 1), ("P2.txt", 2)]
    assert "unknown class 'ship'" in folder.issues[1].message


# ----- Task1 results ---------------------------------------------------------------------------


@pytest.mark.parametrize("box_type", ["obb", "hbb"])
def test_task1_round_trip(tmp_path, box_type):
    rng = np.random.default_rng(2)
    classes = ["plane", "small-vehicle", "storage-tank"]
    dim = 5 if box_type == "obb" else 4
    det_results = []
    for counts in ([2, 0, 1], [0, 0, 0], [3, 1, 0]):
        per_class = []
        for k in counts:
            boxes = rng.uniform(10, 100, size=(k, dim))
            if box_type == "hbb":
                boxes[:, 2:] += boxes[:, :2]
            per_class.append(np.concatenate((boxes, rng.random((k, 1))), axis=1))
        det_results.append(per_class)
    det_results[2][0] = torch.from_numpy(det_results[2][0])  # tensors are accepted too
    image_ids = ["P0001", "P0002", "P0003"]
    paths = write_dota_task1(tmp_path / "out", image_ids, det_results, classes, box_type)
    assert [p.name for p in paths] == ["Task1_plane.txt", "Task1_small-vehicle.txt", "Task1_storage-tank.txt"]
    assert paths[2].read_text().split()[0:2] == ["P0001", repr(float(det_results[0][2][0, -1]))]
    back = read_dota_task1(tmp_path / "out", classes)
    for c, name in enumerate(classes):
        expected = [(image_ids[i], np.asarray(res[c], dtype=np.float64)) for i, res in enumerate(det_results)]
        ids = tuple(i for i, dets in expected for _ in range(len(dets)))
        dets = np.concatenate([dets for _, dets in expected])
        assert back[name].image_ids == ids
        np.testing.assert_array_equal(back[name].scores, dets[:, -1])
        np.testing.assert_allclose(back[name].polygons, boxes_to_polygons(dets[:, :-1], box_type), rtol=1e-15)
    assert len(read_dota_task1(tmp_path / "out", ["ship"])["ship"].scores) == 0


def test_task1_errors(tmp_path):
    with pytest.raises(ValueError, match="2 image ids for 1"):
        write_dota_task1(tmp_path, ["a", "b"], [[np.zeros((0, 6))]], ["plane"])
    with pytest.raises(ValueError, match="results for 1 classes, expected 2"):
        write_dota_task1(tmp_path, ["a"], [[np.zeros((0, 6))]], ["plane", "ship"])
    with pytest.raises(ValueError, match="whitespace"):
        write_dota_task1(tmp_path, ["a b"], [[np.zeros((0, 6))]], ["plane"])
    write_text(tmp_path / "Task1_plane.txt", "P1 0.9 1 2 3 4 5 6 7 8\nP1 0.9 1 2 3\n")
    with pytest.raises(DotaFormatError, match=r"Task1_plane.txt:2: expected 10 fields"):
        read_dota_task1(tmp_path, ["plane"])


# ----- Dataset ---------------------------------------------------------------------------------


@pytest.fixture
def dota_root(tmp_path):
    split = tmp_path / "data" / "train"
    make_folder(split, {
        "P1": "imagesource:GoogleEarth\ngsd:0.5\n" + GOOD_LINE + "\n5 5 25 5 25 15 5 15 plane 1\n",
        "P2": "",
    }, images=["P1", "P2"])
    write_image(split / "images" / "P3.jpg", size=(24, 16), gray=True)
    return tmp_path / "data"


def test_dataset_items_hbb(dota_root):
    ds = DotaDetectionDataset(dota_root, "train", classes=["plane", "small-vehicle"])
    assert len(ds) == 3 and ds.num_classes == 2 and ds.image_ids == ("P1", "P2", "P3")
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[10.0, 20.0, 50.0, 40.0], [5.0, 5.0, 25.0, 15.0]]))
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False, True]
    assert target["image_id"] == "P1" and ds.sample_id(0) == "train/P1"
    gray, empty = ds[2]
    assert gray.shape == (3, 16, 24) and ds.image_size(2) == (24, 16)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert ds.image_size(0) == (40, 30)


def test_dataset_obb_targets_and_eval_annotations(dota_root):
    ds = DotaDetectionDataset(dota_root, "train", box_type="obb")
    assert ds.classes == ("plane", "small-vehicle")
    target = ds.load_target(0)
    torch.testing.assert_close(target["boxes"], torch.tensor([[30.0, 30.0, 40.0, 20.0, 0.0],
                                                              [15.0, 10.0, 20.0, 10.0, 0.0]]))
    ann = ds.eval_annotations()
    assert len(ann) == 3
    np.testing.assert_allclose(ann[0]["bboxes"], [[30, 30, 40, 20, 0]])
    assert ann[0]["labels"].tolist() == [1] and ann[0]["labels_ignore"].tolist() == [0]
    assert ann[1]["bboxes"].shape == (0, 5) and ann[1]["bboxes_ignore"].shape == (0, 5)
    with pytest.raises(ValueError, match="box_type"):
        DotaDetectionDataset(dota_root, "train", box_type="rbox")


def test_dataset_transforms_and_collate(dota_root):
    def flip(image, target):
        target = dict(target, boxes=target["boxes"].clone())
        target["boxes"][:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
        return image.flip(-1), target

    ds = DotaDetectionDataset(dota_root, "train", transforms=flip)
    image, target = ds[0]
    torch.testing.assert_close(image, ds.load_image(0).flip(-1))
    assert target["boxes"][0].tolist() == [-10.0, 20.0, 30.0, 40.0]
    assert ds.load_target(0)["boxes"][0].tolist() == [10.0, 20.0, 50.0, 40.0]  # untransformed
    ds.load_target(0)["boxes"].zero_()  # targets are copies: the dataset is not changed
    assert ds.load_target(0)["boxes"][0, 2] == 50
    images, targets = collate_fn([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == ["P1", "P2"]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    assert [len(images) for images, _ in loader] == [2, 1]


def test_dataset_without_split_and_image_formats(tmp_path):
    root = tmp_path / "flat"
    for ext in ("png", "jpg", "tif", "bmp"):
        write_image(root / "images" / f"im_{ext}.{ext}")
    (root / "labelTxt").mkdir()
    ds = DotaDetectionDataset(root)
    assert ds.sample_id(0) == ds.image_ids[0] == "im_bmp"
    assert all(ds.load_image(i).shape == (3, 30, 40) for i in range(len(ds)))
    exact = np.array(Image.open(root / "images" / "im_png.png"))
    torch.testing.assert_close(ds.load_image(ds.image_ids.index("im_png")),
                               torch.from_numpy(exact).permute(2, 0, 1).float() / 255)


# ----- bad data: degenerate polygons, upper-case extensions, corrupt and deep images -----------


@pytest.mark.parametrize(
    "polygon",
    [
        "10 20 10 20 10 20 10 20",       # four coincident corners
        "0 0 10 10 20 20 30 30",         # collinear, on a diagonal
        "0.1 0.3 0.2 0.6 0.3 0.9 0.4 1.2",  # collinear, coordinates not exact in binary
        "5 5 25 5 25 5 5 5",             # a rectangle of height 0
        "0 0 10 0 0 0 20 0",             # two corners coincide, all on one line
    ],
)
def test_degenerate_polygon_is_refused_or_dropped_with_file_and_line(tmp_path, polygon):
    path = write_text(tmp_path / "P0009.txt", f"gsd:0.5\n{GOOD_LINE}\n{polygon} plane 0\n{GOOD_LINE}\n")
    with pytest.raises(DotaFormatError, match="degenerate polygon") as info:
        read_dota_labels(path)
    assert str(info.value).startswith(f"{path}:3:")
    with pytest.warns(DotaFormatWarning, match=r"P0009.txt:3: degenerate polygon"):
        labels, issues = read_dota_labels(path, errors="warn")
    assert labels.class_names == ("small-vehicle", "small-vehicle") and [i.line for i in issues] == [3]


def test_thin_and_oddly_ordered_polygons_are_kept(tmp_path):
    # Positive area, however thin, and any corner order (a "bow tie" order has zero shoelace
    # area but spans a rectangle) are objects: the reference is shapely's convex hull.
    lines = ["0 0 100 0 100 0.5 0 0.5", "0 0 10 10 10 0 0 10", "3 1 1 3 -1 1 1 -1", "0 0 1e-3 0 1e-3 1e-3 0 1e-3"]
    labels, _ = read_dota_labels(write_text(tmp_path / "a.txt", "".join(f"{p} plane 0\n" for p in lines)))
    assert len(labels) == len(lines)
    for polygon in labels.polygons:
        assert shapely.MultiPoint(polygon.reshape(4, 2)).convex_hull.area > 0
    hbb = polygons_to_hbb(labels.polygons)
    assert np.all(hbb[:, 2] > hbb[:, 0]) and np.all(hbb[:, 3] > hbb[:, 1])


def test_upper_case_label_extensions_are_found(tmp_path):
    root = make_folder(tmp_path, {"P1": GOOD_LINE}, images=["P1", "P2"])
    write_text(root / "labelTxt" / "P2.TXT", "1 2 3 2 3 4 1 4 plane 1\n")
    write_image(root / "images" / "P3.PNG")
    write_text(root / "labelTxt" / "P3.Txt", GOOD_LINE + "\n")
    folder = DotaFolder(root)
    assert folder.image_ids == ("P1", "P2", "P3")
    assert folder.labels("P2").class_names == ("plane",)
    assert folder.labels("P3").class_names == ("small-vehicle",)
    write_text(root / "labelTxt" / "P1.TXT", GOOD_LINE + "\n")
    with pytest.raises(DotaFormatError, match="two label files for image 'P1'"):
        DotaFolder(root)


def image_dataset(root, name, save):
    """A one-image DOTA folder whose image is written by ``save(path)``."""
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    path = root / "images" / name
    save(path)
    return DotaDetectionDataset(root), path


def test_truncated_and_corrupt_images_raise_naming_the_file(tmp_path):
    def truncated(path):
        write_image(path, size=(64, 48))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def garbage(path):
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)

    for name, save in (("cut.png", truncated), ("junk.png", garbage)):
        ds, path = image_dataset(tmp_path / name, name, save)
        with pytest.raises(ImageReadError, match=f"{path}: ") as info:
            ds.load_image(0)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(ImageReadError, match="junk.png"):
        ds.image_size(0)


def png16(path, pixels):
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour PNGs):
    (H, W) grey or (H, W, 3) RGB uint16."""
    import struct
    import zlib

    height, width = pixels.shape[:2]
    color_type = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


DEEP = (np.arange(48, dtype=np.int64).reshape(6, 8) * 1393 % 65536).astype(np.uint16)


@pytest.mark.parametrize(
    "name, save, expected",
    [
        # 16-bit grey: scaled by the 16-bit range, not clipped at 255
        ("g16.png", lambda p: png16(p, DEEP), np.repeat(DEEP[None] / 65535.0, 3, 0)),
        ("g16.tif", lambda p: Image.fromarray(DEEP).save(p), np.repeat(DEEP[None] / 65535.0, 3, 0)),
        # 16-bit RGB: Pillow keeps the high byte of each channel
        ("rgb16.png", lambda p: png16(p, np.stack([DEEP, DEEP[::-1], 65535 - DEEP], -1)),
         np.stack([DEEP, DEEP[::-1], 65535 - DEEP]) // 256 / 255.0),
        # float in [0, 1]: taken as it is, not clipped to {0, 1}
        ("f32.tif", lambda p: Image.fromarray((DEEP / 65535.0).astype(np.float32)).save(p),
         np.repeat((DEEP / 65535.0).astype(np.float32)[None], 3, 0)),
    ],
)
def test_deep_images_are_scaled_by_their_range(tmp_path, name, save, expected):
    ds, _ = image_dataset(tmp_path, name, save)
    image = ds.load_image(0)
    assert image.dtype == torch.float32 and image.shape == (3, 6, 8)
    np.testing.assert_allclose(image.numpy(), expected, rtol=0, atol=1e-6)
    assert image.max() > 0.9  # neither black nor clipped


@pytest.mark.parametrize(
    "name, pixels, message",
    [
        ("radiance.tif", DEEP.astype(np.float32) * 3.5, rf"float image with values in \[0, {DEEP.max() * 3.5}\]"),
        ("negative.tif", np.full((6, 8), -0.25, np.float32), r"values in \[-0.25, -0.25\]"),
        ("nan.tif", np.full((6, 8), np.nan, np.float32), "not finite"),
        ("int32.tif", DEEP.astype(np.int32) * 40000, "32-bit integer"),
    ],
)
def test_images_without_a_known_range_are_refused(tmp_path, name, pixels, message):
    ds, path = image_dataset(tmp_path, name, lambda p: Image.fromarray(pixels).save(p))
    with pytest.raises(ImageReadError, match=message) as info:
        ds.load_image(0)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "", "two words", "nul\0", "..", "x:y", "q?"])
def test_task1_refuses_class_names_that_are_not_safe_file_names(tmp_path, name):
    out = tmp_path / "out" / "deeper"
    with pytest.raises(ValueError, match="class name"):
        write_dota_task1(out, ["P1"], [[np.zeros((0, 6))]], [name])
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="class name"):
        read_dota_task1(out, [name])
    # the names of DOTA, DIOR-R and FAIR1M-style sets are fine
    write_dota_task1(out, ["P1"], [[np.zeros((0, 6))] * 3],
                     ["container-crane", "Expressway-toll-station", "Boeing737_v1.2"])
