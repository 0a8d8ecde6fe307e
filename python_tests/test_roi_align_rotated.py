"""roi_align_rotated and MultiScaleRoIAlignRotated against the plain torch reference (explicit
sample points + bilinear interpolation), torchvision's roi_align at theta = 0, the box
convention of box_iou_rotated, hand-placed samples, autograd checks and mmdetection's level
rule."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import pytest
import torch
import torchvision

from dbf_ext.ops import MultiScaleRoIAlignRotated, roi_align_rotated
from dbf_ext.ops._reference import roi_align_rotated_reference, rotated_box_corners
from dbf_ext.testing import no_host_sync

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Kernel vs reference: float64 and float32 differ by rounding only; float16 / bfloat16 are
# computed in float32 on both sides and differ by at most one rounding of the result.
TOLERANCE = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def random_rois(num_rois: int, batch: int, image_height: float, image_width: float,
                generator: torch.Generator, min_side: float = 1.0) -> torch.Tensor:
    """(K, 6) float64 RoIs: centres over the image and up to 20 % beyond it, sides from
    ``min_side`` to 80 % of the image, any angle."""
    u = torch.rand(num_rois, 5, generator=generator, dtype=torch.float64)
    size = torch.tensor([image_width, image_height], dtype=torch.float64)
    return torch.cat([
        torch.randint(0, batch, (num_rois, 1), generator=generator).double(),
        (u[:, :2] * 1.4 - 0.2) * size,
        min_side + u[:, 2:4] * (0.8 * size - min_side),
        (u[:, 4:] * 2 - 1) * math.pi,
    ], dim=1)


def random_case(seed: int, batch=2, channels=3, height=9, width=12, num_rois=10, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    return features, random_rois(num_rois, batch, height / scale, width / scale, g)


def roi_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 RoIs with half-precision maps (as under mixed precision), else the map's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("clockwise", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_reference(device, dtype, aligned, clockwise, sampling_ratio):
    features, rois = random_case(seed=sampling_ratio + 2 * aligned + 4 * clockwise)
    features = features.to(device, dtype)
    rois = rois.to(device, roi_dtype(dtype))
    got = roi_align_rotated(features, rois, (3, 4), 0.5, sampling_ratio, aligned, clockwise)
    want = roi_align_rotated_reference(features, rois, (3, 4), 0.5, sampling_ratio, aligned,
                                       clockwise)
    assert got.shape == (10, 3, 3, 4) and got.dtype == dtype and got.device.type == device
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert want.abs().amax() > 0.5  # the RoIs do sample the map


@pytest.mark.parametrize("spatial_scale", [1.0, 0.3, 0.125])
def test_matches_reference_at_other_scales_and_sizes(device, spatial_scale):
    features, rois = random_case(seed=7, batch=3, channels=5, height=11, width=6, num_rois=25,
                                 scale=spatial_scale)
    features, rois = features.to(device), rois.to(device)
    for output_size in (1, 7, (2, 5)):
        for ratio in (0, 3):
            torch.testing.assert_close(
                roi_align_rotated(features, rois, output_size, spatial_scale, ratio),
                roi_align_rotated_reference(features, rois, output_size, spatial_scale, ratio),
                **TOLERANCE[torch.float64])


def test_half_precision_rois_of_the_maps_dtype(device):
    features, rois = random_case(seed=8)
    for dtype in (torch.float16, torch.bfloat16):
        f, r = features.to(device, dtype), rois.to(device, dtype)
        torch.testing.assert_close(roi_align_rotated(f, r, 3, 0.5),
                                   roi_align_rotated_reference(f, r, 3, 0.5), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_theta_zero_equals_torchvision_roi_align(device, dtype, sampling_ratio):
    features, rois = random_case(seed=11, num_rois=30)
    rois[:, 5] = 0
    features, rois = features.to(device, dtype), rois.to(device, dtype)
    cx, cy, w, h = rois[:, 1:5].unbind(1)
    boxes = torch.stack([rois[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    got = roi_align_rotated(features, rois, (4, 3), 0.5, sampling_ratio)
    want = torchvision.ops.roi_align(features, boxes, (4, 3), 0.5, sampling_ratio, aligned=True)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("clockwise", [True, False])
def test_angle_convention_is_box_iou_rotateds(device, clockwise):
    # On the ramps x and y, bilinear interpolation is exact and a bin's value is the mean of its
    # sample points: the two halves of a RoI along w average the points midway from the centre
    # to the ends of the w axis, which rotated_box_corners (the convention of box_iou_rotated)
    # places independently of the kernel.
    height, width = 40, 50
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    features = torch.stack([xs, ys])[None].to(device)
    boxes = torch.tensor([[25.0, 20.0, 16.0, 6.0, 0.6], [20.0, 18.0, 10.0, 20.0, -2.2],
                          [30.0, 22.0, 12.0, 4.0, 1.5708]], dtype=torch.float64)
    rois = torch.cat([torch.zeros(3, 1, dtype=torch.float64), boxes], 1).to(device)
    # aligned=False and scale 1: map coordinates are the input coordinates.
    pooled = roi_align_rotated(features, rois, (1, 2), 1.0, 2, aligned=False, clockwise=clockwise)
    corners = rotated_box_corners(boxes, clockwise=clockwise)  # corners 0 and 3 end the +w side
    plus_w_end = (corners[:, 0] + corners[:, 3]) / 2
    minus_w_end = (corners[:, 1] + corners[:, 2]) / 2
    centre = boxes[:, :2]
    torch.testing.assert_close(pooled[:, :, 0, 1].cpu(), (centre + plus_w_end) / 2)
    torch.testing.assert_close(pooled[:, :, 0, 0].cpu(), (centre + minus_w_end) / 2)


def test_samples_on_and_beyond_the_border(device):
    # One sample per RoI at its centre (1 x 1 output, sampling_ratio 1, aligned=False, scale 1):
    # a sample in [-1, 0) reads the first pixel, one beyond -1 (or beyond H / W) reads 0, one
    # past the last pixel up to H / W reads the last.
    features = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(1, 1, 3, 4).to(device)
    centres_and_values = [
        ((-1.0, 0.0), 1.0), ((-0.5, 0.0), 1.0), ((-1.0001, 0.0), 0.0), ((0.0, -1.0), 1.0),
        ((0.0, -1.0001), 0.0), ((4.0, 2.0), 12.0), ((3.5, 2.9), 12.0), ((4.0001, 2.0), 0.0),
        ((3.0, 3.0001), 0.0), ((1.5, 0.5), 4.5),
    ]
    for (cx, cy), value in centres_and_values:
        rois = torch.tensor([[0.0, cx, cy, 1.0, 1.0, 0.0]], dtype=torch.float64, device=device)
        got = roi_align_rotated(features, rois, 1, 1.0, 1, aligned=False).item()
        assert got == pytest.approx(value), (cx, cy)


def test_rois_partly_and_fully_outside(device):
    features, _ = random_case(seed=13)
    features = features.to(device)
    rois = torch.tensor([
        [0, -40.0, -40.0, 10.0, 10.0, 0.3],   # far outside: every sample is beyond the border
        [1, 100.0, 5.0, 20.0, 8.0, -1.0],     # outside on the right
        [0, 0.0, 0.0, 20.0, 20.0, 0.7],       # around the top-left corner: partly outside
        [1, 24.0, 18.0, 30.0, 6.0, 2.5],      # around the bottom-right corner
        [0, 12.0, 9.0, 80.0, 60.0, 0.2],      # larger than the whole map
    ], dtype=torch.float64, device=device)
    got = roi_align_rotated(features, rois, 4, 0.5)
    assert (got[:2] == 0).all()
    assert (got[2:] != 0).any(dim=(1, 2, 3)).all()
    torch.testing.assert_close(got, roi_align_rotated_reference(features, rois, 4, 0.5))


def test_zero_size_rois(device):
    features, _ = random_case(seed=14)
    features = features.to(device)
    rois = torch.tensor([[0, 6.0, 6.0, 0.0, 5.0, 0.4], [1, 6.0, 6.0, 0.0, 0.0, 0.0]],
                        dtype=torch.float64, device=device)
    # aligned: an empty sampling grid, zeros; not aligned: sides raised to 1 (mmcv's legacy).
    assert (roi_align_rotated(features, rois, 2, 0.5, aligned=True) == 0).all()
    torch.testing.assert_close(
        roi_align_rotated(features, rois, 2, 0.5, aligned=False),
        roi_align_rotated_reference(features, rois, 2, 0.5, aligned=False))
    assert (roi_align_rotated(features, rois, 2, 0.5, aligned=False) != 0).all()


def test_strided_features_are_read_in_place(device):
    features, rois = random_case(seed=15, channels=4)
    features, rois = features.to(device), rois.to(device)
    contiguous = roi_align_rotated(features, rois, 3, 0.5)
    channels_last = features.to(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align_rotated(channels_last, rois, 3, 0.5), contiguous,
                               atol=0, rtol=0)
    wide = torch.zeros(2, 8, 9, 30, dtype=torch.float64, device=device)
    wide[:, ::2, :, 3:15] = features
    torch.testing.assert_close(roi_align_rotated(wide[:, ::2, :, 3:15], rois, 3, 0.5), contiguous,
                               atol=0, rtol=0)


def test_empty_inputs(device):
    features, rois = random_case(seed=16)
    features, rois = features.to(device).requires_grad_(), rois.to(device)
    no_rois = roi_align_rotated(features, rois[:0], (2, 3), 0.5)
    assert no_rois.shape == (0, 3, 2, 3)
    no_rois.sum().backward()
    assert features.grad.shape == features.shape and (features.grad == 0).all()
    no_channels = torch.zeros(2, 0, 9, 12, dtype=torch.float64, device=device, requires_grad=True)
    out = roi_align_rotated(no_channels, rois, 2, 0.5)
    assert out.shape == (10, 0, 2, 2)
    out.sum().backward()
    assert no_channels.grad.shape == no_channels.shape
    empty_map = torch.zeros(2, 3, 0, 12, dtype=torch.float64, device=device)
    assert (roi_align_rotated(empty_map, rois, 2, 0.5) == 0).all()


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradcheck_float64(device, aligned, sampling_ratio):
    features, rois = random_case(seed=21, batch=2, channels=2, height=5, width=6, num_rois=4)
    features = features.to(device).requires_grad_()
    rois = rois.to(device)

    def pool(x):
        return roi_align_rotated(x, rois, 2, 0.5, sampling_ratio, aligned)

    assert torch.autograd.gradcheck(pool, (features,))
    assert torch.autograd.gradgradcheck(pool, (features,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clockwise", [True, False])
def test_backward_matches_reference_autograd(device, dtype, clockwise):
    features, rois = random_case(seed=22, num_rois=30)
    features = features.to(device, dtype)
    rois = rois.to(device, roi_dtype(dtype))
    grad = torch.randn(30, 3, 3, 4, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    grads = []
    for pool in (roi_align_rotated, roi_align_rotated_reference):
        x = features.clone().requires_grad_()
        pool(x, rois, (3, 4), 0.5, 0, True, clockwise).backward(grad)
        grads.append(x.grad)
    assert grads[0].dtype == dtype
    # bfloat16: the gradient is accumulated in float32 by both, then rounded once.
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCE[dtype])
    assert grads[1].abs().amax() > 0.1


def overlapping_case(seed: int):
    """Many RoIs over a small map, so that every pixel receives many gradient terms."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 7, 16, 16, generator=g, requires_grad=True)
    rois = random_rois(150, 2, 32.0, 32.0, g, min_side=4.0).float()
    grad = torch.randn(150, 7, 5, 5, generator=g)
    return features, rois, grad


def test_cpu_backward_is_deterministic_across_runs_and_thread_counts():
    features, rois, grad = overlapping_case(seed=23)
    results = []
    for threads in (1, 2, 3, 2):
        with num_threads(threads):
            features.grad = None
            roi_align_rotated(features, rois, 5, 0.5).backward(grad)
            results.append(features.grad.clone())
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_opcheck(device):
    features, rois = random_case(seed=24, channels=2, num_rois=5)
    features, rois = features.to(device), rois.to(device)
    op = torch.ops.dbf_ext.roi_align_rotated.default
    for args in ((features.requires_grad_(), rois, 2, 3, 0.5, 2, False, False),
                 (features.half(), rois.float(), 2, 2, 0.5, 0, True, True)):
        torch.library.opcheck(op, args)
    grad = torch.randn(5, 2, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dbf_ext.roi_align_rotated_backward.default,
                          (grad, rois, 2, 9, 12, 0.5, 0, True, True))


def test_torch_compile():
    features, rois = random_case(seed=25)
    features = features.float().requires_grad_()
    rois = rois.float()

    @torch.compile(fullgraph=True, backend="eager")
    def pooled_energy(x, r):
        return roi_align_rotated(x, r, 3, 0.5).square().sum()

    pooled_energy(features, rois).backward()
    compiled_grad = features.grad.clone()
    features.grad = None
    eager = roi_align_rotated(features, rois, 3, 0.5).square().sum()
    eager.backward()
    torch.testing.assert_close(pooled_energy(features, rois), eager)
    torch.testing.assert_close(compiled_grad, features.grad)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def bad_calls():
    f = torch.zeros(2, 3, 8, 8)
    r = torch.tensor([[0, 4.0, 4.0, 2.0, 2.0, 0.0]])

    def with_roi(column: int, value: float) -> torch.Tensor:
        bad = r.clone()
        bad[0, column] = value
        return bad

    return [
        (lambda: roi_align_rotated(f[0], r, 2, 1.0), ValueError, r"\(B, C, H, W\)"),
        (lambda: roi_align_rotated(f, r[:, 1:], 2, 1.0), ValueError, r"\(K, 6\).*MultiScale"),
        (lambda: roi_align_rotated(f, r[0], 2, 1.0), ValueError, r"\(K, 6\)"),
        (lambda: roi_align_rotated(f.long(), r, 2, 1.0), TypeError, "features must be float"),
        (lambda: roi_align_rotated(f, r.double(), 2, 1.0), TypeError, "features' dtype"),
        (lambda: roi_align_rotated(f.half(), r.double(), 2, 1.0), TypeError, "features' dtype"),
        (lambda: roi_align_rotated(f, r.to("meta"), 2, 1.0), ValueError, "same device"),
        (lambda: roi_align_rotated([f], r, 2, 1.0), TypeError, "torch.Tensor"),
        (lambda: roi_align_rotated(f, r, 0, 1.0), ValueError, "output_size must be >= 1"),
        (lambda: roi_align_rotated(f, r, (2, 2, 2), 1.0), ValueError, "output_size"),
        (lambda: roi_align_rotated(f, r, 2.5, 1.0), TypeError, "output_size"),
        (lambda: roi_align_rotated(f, r, 2, 0.0), ValueError, "spatial_scale must be > 0"),
        (lambda: roi_align_rotated(f, r, 2, math.inf), ValueError, "spatial_scale"),
        (lambda: roi_align_rotated(f, r, 2, 1.0, -1), ValueError, "sampling_ratio"),
        (lambda: roi_align_rotated(f, with_roi(0, 2.0), 2, 1.0), ValueError, r"\[0, 2\)"),
        (lambda: roi_align_rotated(f, with_roi(0, -1.0), 2, 1.0), ValueError, "batch indices"),
        (lambda: roi_align_rotated(f, with_roi(0, 0.5), 2, 1.0), ValueError, "integers"),
        (lambda: roi_align_rotated(f, with_roi(3, math.nan), 2, 1.0), ValueError, "finite"),
        (lambda: roi_align_rotated(f, with_roi(5, math.inf), 2, 1.0), ValueError, "finite"),
        (lambda: roi_align_rotated(f, with_roi(0, math.nan), 2, 1.0), ValueError, "finite"),
        (lambda: roi_align_rotated(f, with_roi(3, -1.0), 2, 1.0), ValueError, "w and h"),
        (lambda: roi_align_rotated(f, with_roi(4, -0.5), 2, 1.0, aligned=False), ValueError,
         "must be >= 0"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_input_raises_one_clear_error(case):
    call, error, message = bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_kernel_skips_invalid_rois_it_is_handed():
    # Past the Python checks (torch.ops directly, or compiled code), a RoI whose batch index is
    # out of range or whose values are not finite samples nothing instead of reading outside.
    features = torch.ones(1, 2, 6, 6, requires_grad=True)
    rois = torch.tensor([[5, 3.0, 3.0, 2.0, 2.0, 0.0], [-1, 3.0, 3.0, 2.0, 2.0, 0.0],
                         [0.5, 3.0, 3.0, 2.0, 2.0, 0.0], [0, math.nan, 3.0, 2.0, 2.0, 0.0],
                         [0, 3.0, 3.0, math.inf, 2.0, 0.0], [0, 3.0, 3.0, 2.0, 2.0, 0.0]])
    out = torch.ops.dbf_ext.roi_align_rotated(features, rois, 2, 2, 1.0, 0, True, True)
    assert (out[:5] == 0).all() and (out[5] == 1).all()
    out.sum().backward()
    assert features.grad.sum().item() == pytest.approx(2 * 4)  # the valid RoI's 4 bins, 2 channels


# ---------------------------------------------------------------------------------------------
# MultiScaleRoIAlignRotated
# ---------------------------------------------------------------------------------------------

NAMES = ["p2", "p3", "p4", "p5"]
STRIDES = (4, 8, 16, 32)


def pyramid(device, batch=2, channels=3, height=128, width=96, seed=31):
    """Maps of a padded (height, width) batch at strides 4 to 32."""
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(batch, channels, height // s, width // s, generator=g,
                           dtype=torch.float64).to(device))
        for name, s in zip(NAMES, STRIDES)
    )


def per_image_boxes(device, counts=(9, 6), seed=32):
    """(K_i, 5) boxes with sqrt(w * h) from 8 to 600 px: every level, and clamping at both ends."""
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for k in counts:
        scale = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(math.log(8), math.log(600),
                                                                       generator=g))
        aspect = torch.empty(k, dtype=torch.float64).uniform_(0.3, 3.0, generator=g)
        centre = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([96.0, 128.0])
        theta = (torch.rand(k, 1, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        sides = torch.stack([scale * aspect.sqrt(), scale / aspect.sqrt()], 1)
        boxes.append(torch.cat([centre, sides, theta], 1).to(device))
    return boxes


def mmdet_level(w: float, h: float, levels: int = 4, finest_scale: float = 56.0) -> int:
    return min(max(math.floor(math.log2(math.sqrt(w * h) / finest_scale + 1e-6)), 0), levels - 1)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multiscale_equals_per_level_calls(device, sampling_ratio):
    features = pyramid(device)
    boxes = per_image_boxes(device)
    pool = MultiScaleRoIAlignRotated(NAMES, 7, sampling_ratio)
    got = pool(features, boxes, [(120, 90), (128, 96)])
    assert got.shape == (15, 3, 7, 7)
    want, used = [], set()
    for image, image_boxes in enumerate(boxes):
        for box in image_boxes:
            level = mmdet_level(float(box[2]), float(box[3]))
            used.add(level)
            roi = torch.cat([box.new_tensor([image]), box])[None]
            want.append(roi_align_rotated(features[NAMES[level]], roi, 7, 1 / STRIDES[level],
                                          sampling_ratio))
    assert used == {0, 1, 2, 3}
    torch.testing.assert_close(got, torch.cat(want), atol=0, rtol=0)


def test_multiscale_level_rule_at_its_boundaries():
    pool = MultiScaleRoIAlignRotated(NAMES, 7)
    sides = [(1.0, 1.0), (111.9, 1.0e-9 + 111.9), (112.0, 112.0), (56.0, 224.0), (223.9, 224.0),
             (224.0, 224.0), (448.0, 448.0), (5000.0, 5000.0), (0.0, 10.0)]
    rois = torch.tensor([[0, 0, 0, w, h, 0.3] for w, h in sides], dtype=torch.float64)
    assert pool.map_levels(rois).tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 0]
    assert pool.map_levels(rois).tolist() == [mmdet_level(w, h) for w, h in sides]
    assert MultiScaleRoIAlignRotated(NAMES, 7, finest_scale=28).map_levels(rois).tolist() == [
        0, 1, 2, 2, 2, 3, 3, 3, 0]


def test_multiscale_inputs_and_strides_agree(device):
    features = pyramid(device)
    boxes = per_image_boxes(device)
    pool = MultiScaleRoIAlignRotated(NAMES, (7, 5), 2)
    inferred = pool(features, boxes, [(120, 90), (128, 96)])
    given = MultiScaleRoIAlignRotated(NAMES, (7, 5), 2, strides=STRIDES)(features, boxes)
    batched = torch.cat([torch.cat([b.new_full((b.shape[0], 1), i), b], 1)
                         for i, b in enumerate(boxes)])
    shuffled = torch.randperm(batched.shape[0], generator=torch.Generator().manual_seed(1))
    from_tensor = pool(features, batched[shuffled], [(120, 90), (128, 96)])
    torch.testing.assert_close(given, inferred, atol=0, rtol=0)
    torch.testing.assert_close(from_tensor, inferred[shuffled], atol=0, rtol=0)
    # torchvision's FPN order: any mapping type, extra levels (a "pool" level) ignored.
    extra = dict(features, pool=torch.zeros(2, 3, 2, 2, dtype=torch.float64, device=device))
    torch.testing.assert_close(pool(extra, boxes, [(120, 90), (128, 96)]), inferred)


def test_multiscale_empty_images_and_batches(device):
    features = pyramid(device)
    boxes = per_image_boxes(device)
    pool = MultiScaleRoIAlignRotated(NAMES, 7)
    shapes = [(128, 96), (128, 96)]
    one_empty = pool(features, [boxes[0][:0], boxes[1]], shapes)
    torch.testing.assert_close(one_empty, pool(features, boxes, shapes)[9:], atol=0, rtol=0)
    assert pool(features, [boxes[0][:0], boxes[1][:0]], shapes).shape == (0, 3, 7, 7)
    empty_batch = OrderedDict((k, v[:0]) for k, v in features.items())
    assert pool(empty_batch, [], shapes).shape == (0, 3, 7, 7)


def test_multiscale_bad_input():
    features = pyramid("cpu")
    boxes = per_image_boxes("cpu")
    shapes = [(128, 96), (128, 96)]
    pool = MultiScaleRoIAlignRotated(NAMES, 7)
    cases = [
        (lambda: pool(features, boxes[:1], shapes), ValueError, "one \\(K_i, 5\\) tensor per image"),
        (lambda: pool(dict(list(features.items())[:3]), boxes, shapes), ValueError, "no level"),
        (lambda: pool(list(features.values()), boxes, shapes), TypeError, "mapping"),
        (lambda: pool(features, boxes), ValueError, "image_shapes"),
        (lambda: pool(features, boxes, [(128, 40)]), ValueError, "cannot infer the stride"),
        (lambda: pool(features, [boxes[0].float(), boxes[1]], shapes), ValueError, "one dtype"),
        (lambda: pool(features, [b.float() for b in boxes], shapes), TypeError, "dtype"),
        (lambda: pool(features, [boxes[0][:, :4], boxes[1]], shapes), ValueError, r"\(N, 5\)"),
        (lambda: pool(features, torch.zeros(3, 6, dtype=torch.float64) + 2, shapes), ValueError,
         "batch indices"),
        (lambda: pool(features, [boxes[0] * math.nan, boxes[1]], shapes), ValueError, "finite"),
        (lambda: pool(dict(features, p3=features["p3"][:, :2]), boxes, shapes), ValueError,
         "channels"),
        (lambda: MultiScaleRoIAlignRotated(list(reversed(NAMES)), 7)(features, boxes, shapes),
         ValueError, "finest to coarsest"),
        (lambda: MultiScaleRoIAlignRotated(NAMES, 7, strides=(4, 8, 16)), ValueError, "one stride"),
        (lambda: MultiScaleRoIAlignRotated(NAMES, 7, strides=(4, 8, 8, 16)), ValueError, "finest"),
        (lambda: MultiScaleRoIAlignRotated("p2", 7), ValueError, "featmap_names"),
        (lambda: MultiScaleRoIAlignRotated(["p2", "p2"], 7), ValueError, "distinct"),
        (lambda: MultiScaleRoIAlignRotated(NAMES, 7, finest_scale=0), ValueError, "finest_scale"),
        (lambda: MultiScaleRoIAlignRotated(NAMES, 7, sampling_ratio=-2), ValueError, "sampling"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_multiscale_in_a_training_step_of_a_roi_head(device):
    # The sequence of a two-stage detector's second stage: torchvision FPN over backbone maps,
    # rotated RoIs per image, the pooler, two FC layers, a loss, backward, an optimiser step.
    g = torch.Generator().manual_seed(33)
    torch.manual_seed(33)
    fpn = torchvision.ops.FeaturePyramidNetwork([8, 16, 32, 32], 16).to(device)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 3)).to(device)
    backbone_maps = OrderedDict(
        (name, torch.randn(2, c, 160 // s, 128 // s, generator=g).to(device))
        for name, c, s in zip(NAMES, (8, 16, 32, 32), STRIDES)
    )
    boxes = [b.float() for b in per_image_boxes(device, counts=(20, 12))]
    labels = torch.randint(0, 3, (32,), generator=g).to(device)
    pool = MultiScaleRoIAlignRotated(NAMES, 7, 2)
    optimiser = torch.optim.SGD([*fpn.parameters(), *head.parameters()], lr=0.1)
    losses = []
    for _ in range(2):
        pooled = pool(fpn(backbone_maps), boxes, [(150, 120), (160, 128)])
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optimiser.zero_grad()
        loss.backward()
        # Every FPN output level got RoIs, so every lateral convolution receives a gradient.
        for conv in fpn.inner_blocks:
            assert conv[0].weight.grad.abs().sum() > 0
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
def test_cuda_matches_cpu():
    features, rois, grad = overlapping_case(seed=41)
    cpu_out = roi_align_rotated(features, rois, 5, 0.5, 0)
    cpu_out.backward(grad)
    cuda_features = features.detach().cuda().requires_grad_()
    cuda_out = roi_align_rotated(cuda_features, rois.cuda(), 5, 0.5, 0)
    cuda_out.backward(grad.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cuda_features.grad.cpu(), features.grad, atol=1e-4, rtol=1e-5)


@needs_gpu
def test_cuda_deterministic_backward_under_deterministic_algorithms():
    features, rois, grad = overlapping_case(seed=42)
    features = features.detach().cuda()
    rois, grad = rois.cuda(), grad.cuda()

    def gradient():
        x = features.clone().requires_grad_()
        roi_align_rotated(x, rois, 5, 0.5).backward(grad)
        return x.grad

    atomic = gradient()
    with deterministic_algorithms():
        first, second = gradient(), gradient()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, atomic, atol=1e-4, rtol=1e-5)
    # The pooler's own indexing runs in deterministic mode too.
    maps = OrderedDict((k, v.float().requires_grad_()) for k, v in pyramid("cuda").items())
    boxes = [b.float() for b in per_image_boxes("cuda")]
    with deterministic_algorithms():
        pooled = MultiScaleRoIAlignRotated(NAMES, 7, 2)(maps, boxes, [(128, 96)] * 2)
        pooled.square().sum().backward()
    assert all(m.grad is not None for m in maps.values())


@needs_gpu
def test_cuda_operator_never_waits_for_the_gpu():
    features, rois, grad = overlapping_case(seed=43)
    features, rois, grad = features.detach().cuda(), rois.cuda(), grad.cuda()
    for dtype in (torch.float32, torch.float16):
        x = features.detach().to(dtype).requires_grad_()
        with no_host_sync():
            out = torch.ops.dbf_ext.roi_align_rotated(x, rois, 5, 5, 0.5, 0, True, True)
            out.backward(grad.to(dtype))
        torch.testing.assert_close(out.float().cpu(), roi_align_rotated_reference(
            x.detach().cpu(), rois.cpu(), 5, 0.5).float(), **TOLERANCE[dtype])


@needs_gpu
def test_cuda_on_a_second_device_keeps_the_current_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    features, rois = random_case(seed=44)
    before = torch.cuda.current_device()
    out = roi_align_rotated(features.to("cuda:1"), rois.to("cuda:1"), 3, 0.5)
    assert torch.cuda.current_device() == before
    torch.testing.assert_close(out.cpu(), roi_align_rotated(features, rois, 3, 0.5))
