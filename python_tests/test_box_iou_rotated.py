"""box_iou_rotated against an independent float64 reference (shapely polygon clipping)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from shapely_reference import iou_matrix

from dbf_ext.ops import box_iou_rotated
from dbf_ext.ops._reference import box_iou_rotated_reference
from dbf_ext.testing import clustered_rotated_boxes, random_rotated_boxes

# Tolerance of the result against the float64 reference evaluated on the same (rounded) input
# boxes: float32 arithmetic for float32/16 inputs, then rounding of the output to its dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def box_sets(generator, dtype):
    """(name, boxes1, boxes2): scattered DOTA-like boxes and heavily overlapping clusters."""
    scattered = (
        random_rotated_boxes(70, tile=400, generator=generator, dtype=dtype),
        random_rotated_boxes(50, tile=400, generator=generator, dtype=dtype),
    )
    clusters = clustered_rotated_boxes(6, 12, tile=300, generator=generator, dtype=dtype)
    return [("scattered", *scattered), ("overlapping", clusters, clusters[torch.randperm(72, generator=generator)])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["iou", "iof"])
@pytest.mark.parametrize("clockwise", [True, False])
def test_pairwise_matches_shapely(device, generator, dtype, mode, clockwise):
    for name, b1, b2 in box_sets(generator, dtype):
        got = box_iou_rotated(b1.to(device), b2.to(device), mode=mode, clockwise=clockwise)
        assert got.dtype == dtype and got.shape == (b1.shape[0], b2.shape[0])
        want = iou_matrix(b1.double(), b2.double(), mode=mode, clockwise=clockwise)
        assert (want > 0).sum() > 20, name  # the set really overlaps
        np.testing.assert_allclose(got.cpu().double().numpy(), want, atol=ATOL[dtype], rtol=0,
                                   err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["iou", "iof"])
def test_aligned_matches_shapely(device, generator, dtype, mode):
    boxes = clustered_rotated_boxes(20, 2, generator=generator, dtype=dtype)
    b1, b2 = boxes[0::2], boxes[1::2]
    got = box_iou_rotated(b1.to(device), b2.to(device), mode=mode, aligned=True)
    assert got.shape == (20,)
    want = iou_matrix(b1, b2, mode=mode, aligned=True)
    np.testing.assert_allclose(got.cpu().double().numpy(), want, atol=ATOL[dtype], rtol=0)


def test_plain_torch_reference_agrees_with_shapely(generator):
    for _, b1, b2 in box_sets(generator, torch.float64):
        np.testing.assert_allclose(box_iou_rotated_reference(b1, b2).numpy(), iou_matrix(b1, b2),
                                   atol=1e-9, rtol=0)


def test_non_contiguous_and_mixed_dtype_inputs(generator):
    wide = random_rotated_boxes(40, tile=200, generator=generator, dtype=torch.float64)
    strided = torch.cat([wide, torch.zeros_like(wide)], dim=1)[:, :5]  # row stride 10
    transposed = wide.t().contiguous().t()  # column-major
    assert not strided.is_contiguous() and not transposed.is_contiguous()
    want = box_iou_rotated(wide, wide)
    torch.testing.assert_close(box_iou_rotated(strided, transposed), want, rtol=0, atol=0)
    mixed = box_iou_rotated(wide.float(), wide)  # promoted to float64
    assert mixed.dtype == torch.float64


def iou(b1, b2, **kwargs) -> float:
    t1 = torch.tensor([b1], dtype=kwargs.pop("dtype", torch.float64))
    t2 = torch.tensor([b2], dtype=t1.dtype)
    return float(box_iou_rotated(t1, t2, **kwargs)[0, 0])


class TestEdgeCases:
    """Cases where the common implementations are known to fail."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_near_identical_boxes(self, dtype):
        # Tiny perturbations of one box: duplicate intersection points break angle sorting
        # (detectron2 #2154, #2167; mmcv #2621).
        base = [325.1, 410.7, 72.3, 18.9, 0.7853]
        eps = 1e-6 if dtype == torch.float64 else 1e-4
        for delta in ([eps, 0, 0, 0, 0], [0, eps, 0, 0, 0], [0, 0, eps, 0, 0],
                      [0, 0, 0, 0, eps], [eps, -eps, eps, -eps, eps]):
            other = [b + d for b, d in zip(base, delta)]
            want = iou_matrix([base], [other])[0, 0]
            got = iou(base, other, dtype=dtype)
            assert 0.99 < want <= 1.0
            assert abs(got - want) < (1e-9 if dtype == torch.float64 else 2e-5)

    def test_identical_boxes_give_one(self, generator):
        boxes = random_rotated_boxes(500, generator=generator)
        self_iou = box_iou_rotated(boxes, boxes, aligned=True)
        assert torch.all(self_iou >= 1 - 1e-6) and torch.all(self_iou <= 1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_thin_and_tiny_boxes(self, dtype):
        # mmcv #2952 returned -1.2e7 for thin boxes.
        cases = [
            ([100.0, 100.0, 1e-3, 50.0, 0.3], [100.0, 100.0, 50.0, 1e-3, 0.3]),
            ([100.0, 100.0, 1e-3, 50.0, 0.3], [100.0, 100.0, 1e-3, 50.0, 0.3000001]),
            ([10.0, 10.0, 0.02, 0.01, 1.0], [10.005, 10.0, 0.02, 0.01, 1.2]),
            ([0.0, 0.0, 1e-4, 300.0, 0.0], [0.0, 0.0, 300.0, 1e-4, 1e-3]),
        ]
        for b1, b2 in cases:
            got = iou(b1, b2, dtype=dtype)
            rounded = torch.tensor([b1, b2], dtype=dtype).double()
            want = iou_matrix(rounded[:1], rounded[1:])[0, 0]
            assert 0.0 <= got <= 1.0
            assert abs(got - want) < (1e-9 if dtype == torch.float64 else 1e-4), (b1, b2, got, want)

    @pytest.mark.parametrize("offset,dtype", [(1e3, torch.float32), (1e5, torch.float32),
                                              (1e9, torch.float64), (1e18, torch.float64)])
    def test_far_from_origin(self, generator, offset, dtype):
        # Coordinates on a grid that is exact at the offset in this dtype (scaled up where its
        # spacing exceeds 1/4): the moved boxes are exactly the local ones, translated.
        spacing = float(np.spacing(np.array(offset, dtype=str(dtype).split(".")[1])))
        scale = max(1.0, 4 * spacing)
        local = clustered_rotated_boxes(4, 5, tile=64, generator=generator, dtype=torch.float64)
        local[:, :4] *= scale
        local[:, :2] = torch.round(local[:, :2] * 4 / scale) * scale / 4
        moved = local.clone()
        moved[:, :2] += offset
        got = box_iou_rotated(moved.to(dtype), moved.to(dtype))
        want = torch.from_numpy(iou_matrix(local, local))
        assert torch.all(got >= 0) and torch.all(got <= 1)
        torch.testing.assert_close(got.double(), want, atol=ATOL[dtype], rtol=0)

    @pytest.mark.parametrize("theta", [0.0, 0.3, -1.1])
    def test_touching_edges_give_zero(self, theta):
        c, s = math.cos(theta), math.sin(theta)
        b1 = [50.0, 50.0, 10.0, 6.0, theta]
        b2 = [50.0 + 10.0 * c, 50.0 + 10.0 * s, 10.0, 6.0, theta]  # shares b1's right edge
        got = iou(b1, b2)
        assert 0.0 <= got < 1e-12
        if theta == 0.0:
            assert got == 0.0

    def test_collinear_edges(self):
        assert iou([0, 0, 4, 2, 0], [1, 0, 4, 2, 0]) == pytest.approx(6 / 10, abs=1e-15)
        assert iou([0, 0, 4, 2, 0.5], [0, 0, 4, 1, 0.5]) == pytest.approx(0.5, abs=1e-12)

    def test_box_inside_another(self):
        outer, inner = [20.0, 30.0, 40.0, 20.0, 0.4], [21.0, 29.0, 10.0, 4.0, 1.3]
        assert iou(inner, outer, mode="iof") == 1.0
        assert iou(outer, inner, mode="iof") == pytest.approx(40 / 800, abs=1e-15)
        assert iou(inner, outer) == pytest.approx(40 / 800, abs=1e-15)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_same_box_other_descriptions(self, dtype):
        box = [30.0, 40.0, 24.0, 9.0, 0.6]
        pi_turn = [30.0, 40.0, 24.0, 9.0, 0.6 + math.pi]
        swapped = [30.0, 40.0, 9.0, 24.0, 0.6 + math.pi / 2]
        for other in (pi_turn, swapped):
            assert iou(box, other, dtype=dtype) == pytest.approx(1.0, abs=1e-6)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_invalid_boxes_overlap_nothing(self, dtype):
        tiny = 1e-30 if dtype == torch.float32 else 1e-200  # w*h below the smallest normal
        boxes = torch.tensor([
            [10, 10, 5, 5, 0.1],
            [10, 10, 5, 5, float("nan")],
            [float("inf"), 10, 5, 5, 0.1],
            [10, 10, 0, 5, 0.1],
            [10, 10, 5, -5, 0.1],
            [10, 10, tiny, tiny, 0.1],
            [10, float("nan"), 5, 5, 0.1],
        ], dtype=dtype)
        out = box_iou_rotated(boxes, boxes)
        assert not torch.isnan(out).any()
        assert out[0, 0] == pytest.approx(1.0, abs=1e-6)
        out[0, 0] = 0
        assert torch.all(out == 0)

    def test_huge_boxes(self):
        # w * h overflows float32; the scaled computation still gives the right answer.
        boxes = torch.tensor([[0, 0, 1e30, 1e30, 0.2], [0, 0, 1e30, 5e29, 0.2]])
        out = box_iou_rotated(boxes, boxes)
        torch.testing.assert_close(out, torch.tensor([[1.0, 0.5], [0.5, 1.0]]), atol=1e-6, rtol=0)

    def test_empty_inputs(self, device):
        some = torch.rand(3, 5, device=device) + 1
        none = torch.zeros(0, 5, device=device)
        assert box_iou_rotated(none, some).shape == (0, 3)
        assert box_iou_rotated(some, none).shape == (3, 0)
        assert box_iou_rotated(none, none, aligned=True).shape == (0,)


class TestBadInput:
    def test_wrong_shapes(self):
        good = torch.rand(3, 5)
        for bad in (torch.rand(3, 4), torch.rand(3, 6), torch.rand(5), torch.rand(2, 3, 5)):
            with pytest.raises(ValueError, match=r"shape \(N, 5\)"):
                box_iou_rotated(bad, good)
            with pytest.raises(ValueError, match="boxes2"):
                box_iou_rotated(good, bad)

    def test_wrong_types(self):
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            box_iou_rotated(torch.ones(3, 5, dtype=torch.int64), torch.rand(3, 5))
        with pytest.raises(TypeError, match="torch.Tensor"):
            box_iou_rotated([[0, 0, 1, 1, 0]], torch.rand(3, 5))

    def test_bad_options(self):
        boxes = torch.rand(3, 5)
        with pytest.raises(ValueError, match="mode"):
            box_iou_rotated(boxes, boxes, mode="giou")
        with pytest.raises(ValueError, match="aligned"):
            box_iou_rotated(boxes, torch.rand(2, 5), aligned=True)

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="same device"):
            box_iou_rotated(torch.rand(3, 5), torch.rand(3, 5, device="meta"))


def test_opcheck(device, generator):
    b1 = random_rotated_boxes(7, tile=100, generator=generator).to(device)
    b2 = random_rotated_boxes(5, tile=100, generator=generator).to(device)
    for args in ((b1, b2, "iou", False, True), (b1, b1, "iof", True, False)):
        torch.library.opcheck(torch.ops.dbf_ext.box_iou_rotated.default, args)


def test_torch_compile(generator):
    b1 = random_rotated_boxes(30, tile=200, generator=generator)
    b2 = random_rotated_boxes(20, tile=200, generator=generator)

    @torch.compile(fullgraph=True, backend="eager")
    def matched_fraction(a, b):
        return (box_iou_rotated(a, b) > 0.1).float().mean(dim=1)

    torch.testing.assert_close(matched_fraction(b1, b2), (box_iou_rotated(b1, b2) > 0.1).float().mean(dim=1))


@pytest.mark.large
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_handles_64bit_sizes():
    g = torch.Generator().manual_seed(7)
    b1 = clustered_rotated_boxes(50, 40, generator=g)
    b2 = random_rotated_boxes(3000, generator=g)
    for mode in ("iou", "iof"):
        torch.testing.assert_close(box_iou_rotated(b1.cuda(), b2.cuda(), mode=mode).cpu(),
                                   box_iou_rotated(b1, b2, mode=mode), atol=2e-6, rtol=0)
    # N * M > 2**31: the output offset needs 64-bit arithmetic.
    free, _ = torch.cuda.mem_get_info()
    n = 47000
    if free < n * n * 4 * 1.2:
        pytest.skip("not enough GPU memory for the 2**31-element case")
    big = random_rotated_boxes(n, generator=g).cuda()
    out = box_iou_rotated(big, big)
    rows = torch.tensor([0, n // 2, n - 1])
    torch.testing.assert_close(out[rows].cpu(), box_iou_rotated(big[rows].cpu(), big.cpu()),
                               atol=2e-6, rtol=0)
    del out
