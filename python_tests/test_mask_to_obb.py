"""mask2obb / mask_to_obb against independent float64 references: shapely (union of the pixel
squares -> convex hull -> minimum_rotated_rectangle) and poly2obb of the pixel corners."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely_reference import box_polygon

from dbf_ext.boxes import ANGLE_VERSIONS, mask2obb, poly2obb, regularize_obb
from dbf_ext.ops import mask_to_obb
from dbf_ext.ops._reference import mask_to_obb_reference
from dbf_ext.testing import no_host_sync, random_masks

# float64 results against float64 references; float32 results are rounded to float32.
AREA_RTOL = {torch.float64: 1e-9, torch.float32: 1e-6}


def pixel_hull(mask: np.ndarray) -> shapely.Polygon:
    """The convex hull of the union of a mask's pixel squares, by shapely."""
    ys, xs = np.nonzero(mask)
    return shapely.union_all(shapely.box(xs, ys, xs + 1, ys + 1)).convex_hull


def check_boxes(masks: torch.Tensor, boxes: torch.Tensor, dtype: torch.dtype) -> None:
    """Each box has the area of shapely's minimum rotated rectangle of the pixel hull and of
    poly2obb of the hull's vertices, and encloses the hull (several rectangles may have the
    least area, so the box itself is not compared); an empty mask has a NaN row."""
    assert boxes.shape == (masks.shape[0], 5) and boxes.dtype == dtype
    for mask, box in zip(masks.cpu().numpy(), boxes.cpu().double()):
        if not mask.any():
            assert box.isnan().all()
            continue
        hull = pixel_hull(mask)
        want_area = hull.minimum_rotated_rectangle.area
        vertices = torch.from_numpy(np.asarray(hull.exterior.coords[:-1]).reshape(1, -1))
        poly2obb_box = poly2obb(vertices)[0]
        assert float(poly2obb_box[2] * poly2obb_box[3]) == pytest.approx(want_area, rel=1e-12, abs=0)
        got = box_polygon(box)
        assert got.area == pytest.approx(want_area, rel=AREA_RTOL[dtype], abs=0)
        scale = math.sqrt(want_area)
        assert hull.difference(got).area <= AREA_RTOL[dtype] * 10 * want_area + 1e-12 * scale


def thin_lines(size: int = 40) -> torch.Tensor:
    """One-pixel-wide lines at several slopes (Bresenham-like rasterisation)."""
    masks = torch.zeros(6, size, size, dtype=torch.bool)
    t = torch.arange(size)
    masks[0, t, t] = True  # diagonal
    masks[1, t, size - 1 - t] = True  # anti-diagonal
    masks[2, t // 2, t] = True  # slope 1/2
    masks[3, t, (t * 3) // 7] = True  # slope 7/3
    masks[4, 5, 3:30] = True  # horizontal
    masks[5, 2:37, 9] = True  # vertical
    return masks


def test_one_pixel_is_a_unit_box_at_the_pixel_centre(device):
    masks = torch.zeros(3, 7, 9, dtype=torch.bool)
    for i, (y, x) in enumerate([(0, 0), (3, 5), (6, 8)]):
        masks[i, y, x] = True
    boxes = mask2obb(masks.to(device), dtype=torch.float64).cpu()
    want = torch.tensor([[0.5, 0.5, 1, 1, 0], [5.5, 3.5, 1, 1, 0], [8.5, 6.5, 1, 1, 0]],
                        dtype=torch.float64)
    # A square is described equally with theta = 0 or -pi/2 in le90: compare the corners.
    torch.testing.assert_close(boxes[:, :4], want[:, :4], rtol=0, atol=1e-12)
    assert torch.all((boxes[:, 4] == 0) | (boxes[:, 4] == -math.pi / 2))


def test_full_mask_is_the_image(device):
    boxes = mask2obb(torch.ones(1, 30, 50, dtype=torch.bool, device=device), dtype=torch.float64)
    torch.testing.assert_close(boxes.cpu(), torch.tensor([[25.0, 15.0, 50.0, 30.0, 0.0]],
                                                         dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_shapes_match_shapely(device, generator, dtype):
    shapes = random_masks(80, 48, 56, generator=generator)
    # Convex shapes and non-convex, often disconnected blobs (an ellipse and a rectangle each).
    masks = torch.cat([shapes[:40], shapes[40::2] | shapes[41::2]])
    assert masks.flatten(1).any(1).sum() > 50
    check_boxes(masks, mask2obb(masks.to(device), dtype=dtype), dtype)


def test_thin_lines_match_shapely(device):
    masks = thin_lines()
    check_boxes(masks, mask2obb(masks.to(device), dtype=torch.float64), torch.float64)
    # The diagonal line of 40 pixels: a rectangle along the diagonal, not the 40 x 40 square.
    diagonal = mask2obb(masks[:1].to(device), dtype=torch.float64)[0].cpu()
    assert diagonal[2] * diagonal[3] < 40 * 40 / 10


def test_rasterised_rotated_rectangle_gives_its_angle(device):
    """A large rotated rectangle's box has nearly its angle and size (rasterisation adds at
    most about a pixel to each side)."""
    cx, cy, w, h, theta = 60.0, 50.0, 80.0, 30.0, 0.5
    ys = torch.arange(100, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(120, dtype=torch.float64)[None, :] + 0.5
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    mask = ((u.abs() <= w / 2) & (v.abs() <= h / 2))[None]
    box = mask2obb(mask.to(device), dtype=torch.float64)[0].cpu()
    assert abs(box[0] - cx) < 0.5 and abs(box[1] - cy) < 0.5
    assert 0 <= box[2] - w < 2.5 and 0 <= box[3] - h < 2.5
    assert abs(box[4] - theta) < 0.03
    check_boxes(mask, box[None], torch.float64)


def test_matches_plain_torch_reference(device, generator):
    masks = torch.cat([random_masks(12, 20, 20, generator=generator), thin_lines(20)])
    got = mask2obb(masks.to(device), dtype=torch.float64).cpu()
    want = mask_to_obb_reference(masks)
    torch.testing.assert_close(got[:, 2] * got[:, 3], want[:, 2] * want[:, 3], rtol=1e-9, atol=0,
                               equal_nan=True)


def test_empty_masks_give_nan_rows(device):
    masks = torch.zeros(4, 10, 12, dtype=torch.bool, device=device)
    masks[1, 2:5, 3:9] = True
    boxes = mask2obb(masks)
    valid = ~boxes[:, 0].isnan()
    assert valid.tolist() == [False, True, False, False]
    assert boxes[~valid].isnan().all()
    assert boxes[1].tolist() == [6.0, 3.5, 6.0, 3.0, 0.0]  # axis-aligned: theta exactly 0
    assert mask2obb(torch.zeros(0, 5, 5, dtype=torch.bool, device=device)).shape == (0, 5)
    assert mask2obb(torch.zeros(2, 0, 5, dtype=torch.bool, device=device)).isnan().all()


@pytest.mark.parametrize("version", ANGLE_VERSIONS)
def test_angle_versions_regularise_the_kernel_box(device, generator, version):
    masks = random_masks(10, 32, 32, generator=generator).to(device)
    raw = mask_to_obb(masks, torch.float64)
    torch.testing.assert_close(mask2obb(masks, version, torch.float64), regularize_obb(raw, version),
                               equal_nan=True)


def test_uint8_and_non_contiguous_masks(device, generator):
    masks = random_masks(8, 30, 40, generator=generator)
    want = mask2obb(masks.to(device))
    as_uint8 = masks.to(torch.uint8) * 7  # any nonzero value is set
    torch.testing.assert_close(mask2obb(as_uint8.to(device)), want, rtol=0, atol=0, equal_nan=True)
    transposed = masks.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(mask2obb(transposed.to(device)), want, rtol=0, atol=0, equal_nan=True)


def test_same_bits_with_any_thread_count(generator):
    masks = random_masks(64, 40, 40, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mask_to_obb(masks)
        torch.set_num_threads(4)
        many = mask_to_obb(masks)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.nan_to_num(-1), many.nan_to_num(-1))


class TestBadInputs:
    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="masks must be a torch.Tensor"):
            mask2obb(np.zeros((1, 4, 4), dtype=bool))

    @pytest.mark.parametrize("shape", [(4, 4), (1, 1, 4, 4)])
    def test_wrong_dim(self, shape):
        with pytest.raises(ValueError, match=r"masks must have shape \(N, H, W\)"):
            mask2obb(torch.zeros(shape, dtype=torch.bool))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
    def test_wrong_dtype(self, dtype):
        with pytest.raises(TypeError, match="masks must be bool or uint8"):
            mask2obb(torch.zeros(1, 4, 4, dtype=dtype))

    def test_sparse(self):
        with pytest.raises(ValueError, match="dense"):
            mask_to_obb(torch.zeros(1, 4, 4, dtype=torch.bool).to_sparse())

    def test_side_beyond_the_exact_range(self):
        no_masks = torch.zeros(0, 1, 2**30, dtype=torch.bool)  # no memory: N = 0
        with pytest.raises(ValueError, match="height and width must be below 1073741824"):
            mask_to_obb(no_masks)

    def test_wrong_output_dtype_and_version(self):
        masks = torch.zeros(1, 4, 4, dtype=torch.bool)
        for convert in (mask_to_obb, mask2obb):
            with pytest.raises(ValueError, match="dtype must be one of"):
                convert(masks, dtype=torch.float16)
        with pytest.raises(ValueError, match="angle version"):
            mask2obb(masks, version="le45")


def test_opcheck(device, generator):
    masks = random_masks(6, 20, 24, generator=generator).to(device)
    for args in ((masks, torch.float32), (masks.to(torch.uint8), torch.float64)):
        torch.library.opcheck(torch.ops.dbf_ext.mask_to_obb.default, args)


def test_torch_compile(generator):
    masks = random_masks(10, 24, 24, generator=generator)

    @torch.compile(fullgraph=True, backend="eager")
    def areas(m):
        boxes = mask2obb(m)
        return boxes[:, 2] * boxes[:, 3]

    boxes = mask2obb(masks)
    torch.testing.assert_close(areas(masks), boxes[:, 2] * boxes[:, 3], equal_nan=True)


masks_strategy = st.integers(1, 12).flatmap(
    lambda h: st.integers(1, 12).flatmap(
        lambda w: st.lists(st.lists(st.booleans(), min_size=w, max_size=w), min_size=h, max_size=h)
    )
)


@settings(max_examples=150, deadline=None)
@given(masks_strategy)
def test_any_small_mask_matches_shapely(rows):
    mask = torch.tensor(rows, dtype=torch.bool)[None]
    check_boxes(mask, mask2obb(mask, dtype=torch.float64), torch.float64)


@settings(max_examples=60, deadline=None)
@given(masks_strategy, st.integers(0, 9), st.integers(0, 9))
def test_translation_moves_only_the_centre_and_mirrors_keep_the_area(rows, shift_y, shift_x):
    mask = torch.tensor(rows, dtype=torch.bool)
    h, w = mask.shape
    moved = torch.zeros(h + shift_y, w + shift_x, dtype=torch.bool)
    moved[shift_y:, shift_x:] = mask
    base, shifted = (mask_to_obb(m[None], torch.float64)[0] for m in (mask, moved))
    # The same hull, translated: the same edge and the same exact projections.
    assert torch.equal(base[2:].nan_to_num(-1), shifted[2:].nan_to_num(-1))
    torch.testing.assert_close(shifted[:2], base[:2] + torch.tensor([shift_x, shift_y]),
                               rtol=0, atol=1e-12, equal_nan=True)
    area = base[2] * base[3]
    for mirrored in (mask.flip(0), mask.flip(1), mask.t()):
        box = mask_to_obb(mirrored[None].contiguous(), torch.float64)[0]
        torch.testing.assert_close(box[2] * box[3], area, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(generator):
    """Same hull and edge on both: every value but theta bit for bit, theta within an ulp."""
    masks = torch.cat([random_masks(300, 70, 70, generator=generator), thin_lines(70),
                       torch.zeros(2, 70, 70, dtype=torch.bool)])
    cpu = mask_to_obb(masks, torch.float64)
    on_gpu = masks.cuda()
    with no_host_sync():
        cuda = mask_to_obb(on_gpu, torch.float64)
    cuda = cuda.cpu()
    assert torch.equal(cpu[:, :4].nan_to_num(-1), cuda[:, :4].nan_to_num(-1))
    torch.testing.assert_close(cuda[:, 4], cpu[:, 4], rtol=0, atol=1e-15, equal_nan=True)


@pytest.mark.large
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_masks_match_cpu_and_64bit_offsets():
    """Large masks agree with the CPU; a mask starting beyond byte 2**31 is read correctly."""
    g = torch.Generator().manual_seed(3)
    masks = random_masks(16, 1500, 2100, generator=g)
    cpu = mask_to_obb(masks, torch.float64)
    cuda = mask_to_obb(masks.cuda(), torch.float64).cpu()
    assert torch.equal(cpu[:, :4].nan_to_num(-1), cuda[:, :4].nan_to_num(-1))
    many = torch.zeros(1100, 1400, 1400, dtype=torch.bool, device="cuda")  # 2.16e9 bytes
    many[-1, 3:7, 10:20] = True
    boxes = mask2obb(many, dtype=torch.float64)
    assert boxes[:-1].isnan().all()
    assert boxes[-1].tolist() == [15.0, 5.0, 10.0, 4.0, 0.0]
