"""Pack / unpack kernels of the feature cache against tensor.to() and a float64 fp8 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dbf_ext.cache import SlabLayout
from dbf_ext.testing import no_host_sync

MAP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXACT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def feature_maps(generator, dtype, device="cpu"):
    """Two levels with awkward values: ties of every rounding, subnormals, overflow, inf, NaN."""
    level0 = torch.randn(3, 5, 6, 7, generator=generator) * 10
    level1 = torch.randn(3, 4, 3, 5, generator=generator).exp() * 1e-3
    flat = level0.view(-1)
    specials = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 6e-8, 1e-5, 65504.0, 65520.0, 7e4,
                             3.3e38, float("inf"), float("-inf"), float("nan"),
                             1.00390625, 1.0029296875, 2.0 ** -24 * 1.5, 448.0, 464.0])
    flat[: specials.numel()] = specials
    # Exact ties of the bf16 and fp16 roundings, both parities.
    flat[40:48] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                                -(1 + 2 ** -8), 2 ** -15 * (1 + 2 ** -11), 3 * 2 ** -25, 2 ** -25])
    return [level0.to(dtype).to(device), level1.to(dtype).to(device)]


def round_trip(maps, storage):
    layout = SlabLayout.for_maps(maps, storage)
    slabs = torch.full((maps[0].shape[0], layout.slab_bytes), 0xAB, dtype=torch.uint8,
                       device=maps[0].device)
    layout.pack(maps, slabs)
    return layout, slabs, layout.unpack(list(slabs.unbind(0)))


def bits(t: torch.Tensor) -> torch.Tensor:
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(as_int)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that all NaNs are equal."""
    nan_a, nan_b = torch.isnan(a.float()), torch.isnan(b.float())
    return torch.equal(nan_a, nan_b) and torch.equal(bits(a)[~nan_a], bits(b)[~nan_b])


@pytest.mark.parametrize("map_dtype", MAP_DTYPES)
@pytest.mark.parametrize("storage", list(EXACT_STORAGE))
def test_exact_formats_match_tensor_to(device, generator, map_dtype, storage):
    maps = feature_maps(generator, map_dtype, device)
    layout, slabs, unpacked = round_trip(maps, storage)
    element = EXACT_STORAGE[storage]
    for level, (m, out) in enumerate(zip(maps, unpacked)):
        n, c, h, w = m.shape
        start = layout.value_offsets[level]
        stored = slabs[:, start:start + c * h * w * element.itemsize].contiguous().view(element)
        assert same_values(stored.reshape(n, c, h, w).cpu(), m.to(element).cpu())
        assert out.dtype == map_dtype
        assert same_values(out.cpu(), m.to(element).to(map_dtype).cpu())
    if storage == "float32" and map_dtype == torch.float32:
        assert all(same_values(a, b) for a, b in zip(unpacked, maps))  # lossless


def float8_reference(values: np.ndarray) -> np.ndarray:
    """Round float64 values to e4m3fn (ties to even, saturating at 448), in float64."""
    exps = np.arange(1, 16)
    normals = (1 + np.arange(8)[None, :] / 8) * 2.0 ** (exps[:, None] - 7)
    grid = np.concatenate([np.arange(8) * 2.0 ** -9, normals.ravel()])[:127]  # codes 0..126
    magnitude = np.minimum(np.abs(values), 448.0)
    idx = np.clip(np.searchsorted(grid, magnitude), 1, len(grid) - 1)
    lower, upper = grid[idx - 1], grid[idx]
    pick_upper = (magnitude - lower > upper - magnitude) | (
        (magnitude - lower == upper - magnitude) & (idx % 2 == 0))  # even code wins a tie
    return np.sign(values) * np.where(pick_upper, upper, lower)


@pytest.mark.parametrize("map_dtype", MAP_DTYPES)
def test_float8_against_float64_reference(device, generator, map_dtype):
    maps = [torch.randn(2, 6, 9, 11, generator=generator).to(map_dtype).to(device),
            (torch.randn(2, 3, 4, 4, generator=generator) * 1e-4).to(map_dtype).to(device)]
    maps[0][0, 1] = 0  # an all-zero channel keeps scale 1
    # Channels whose largest magnitude is near or below 448 times the smallest subnormal, where
    # max|x| / 448 rounds to 0 or to a few subnormal units.
    tiny_amax = torch.tensor([1e-45, 1e-44, 3e-43, 5e-43, 7e-43, 1e-40, 1e-39, 2e-38])
    tiny = torch.rand(2, tiny_amax.numel(), 5, 5, generator=generator) * 2 - 1
    tiny = tiny / tiny.abs().amax(dim=(2, 3), keepdim=True) * tiny_amax[None, :, None, None]
    maps.append(tiny.to(map_dtype).to(device))
    layout, slabs, unpacked = round_trip(maps, "float8_e4m3")
    for level, (m, out) in enumerate(zip(maps, unpacked)):
        x = m.float().cpu().numpy()
        amax = np.abs(x).max(axis=(2, 3))
        smallest_subnormal = np.float32(2.0 ** -149)
        quotient_scale = np.maximum((amax / np.float32(448)).astype(np.float32), smallest_subnormal)
        scale = np.where(amax > 0, quotient_scale, np.float32(1))
        start = layout.scale_offsets[level]
        stored_scale = slabs[:, start:start + 4 * m.shape[1]].contiguous().view(torch.float32)
        np.testing.assert_array_equal(stored_scale.cpu().numpy(), scale)
        quotient = (x / scale[:, :, None, None]).astype(np.float32)  # float32 division, as kernel
        want = float8_reference(quotient.astype(np.float64)) * scale[:, :, None, None]
        got = out.float().cpu().numpy()
        if map_dtype == torch.float32:
            np.testing.assert_array_equal(got, want.astype(np.float32))
        else:  # then rounded to the map dtype
            np.testing.assert_array_equal(got, torch.from_numpy(want).to(map_dtype).float().numpy())
        # The documented bound.
        assert np.all(np.isfinite(got))
        # The documented bound, for channels whose scale is a normal float32 (subnormal scales,
        # max|x| below about 5e-36, carry fewer significant bits).
        bound = np.maximum(np.abs(x) * 2.0 ** -4, scale[:, :, None, None] * 2.0 ** -10) * 1.001
        slack = 0 if map_dtype == torch.float32 else np.abs(x) * 2.0 ** -7
        normal_scale = np.broadcast_to((scale >= np.finfo(np.float32).tiny)[:, :, None, None], x.shape)
        assert np.all((np.abs(got - x) <= bound + slack)[normal_scale])


def float16_nan_codes() -> torch.Tensor:
    """All 2,046 float16 NaN bit patterns (exponent 31, mantissa != 0, either sign), as int16."""
    codes = np.concatenate([np.arange(0x7C01, 0x8000), np.arange(0xFC01, 0x10000)])
    return torch.from_numpy(codes.astype(np.uint16).view(np.int16))


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "float8_e4m3"])
def test_every_float16_nan_stays_nan(device, storage):
    nans = float16_nan_codes().view(torch.float16).reshape(1, 2, 31, 33).to(device)
    _, _, (out,) = round_trip([nans], storage)
    assert out.dtype == torch.float16 and bool(torch.isnan(out).all())


def test_every_float16_nan_code_in_a_slab_decodes_to_a_quiet_nan(device):
    codes = float16_nan_codes().reshape(1, 2, 31, 33)
    layout = SlabLayout.for_maps([torch.zeros(codes.shape)], "float16")
    slab = torch.zeros(layout.slab_bytes, dtype=torch.uint8)
    slab[: 2 * codes.numel()] = codes.reshape(-1).view(torch.uint8)
    (out,) = layout.unpack([slab.to(device)])
    # numpy's conversion keeps sign and payload; the decoder also sets the quiet bit (as the
    # F16C and CUDA conversions do), so a signalling NaN never leaves the cache.
    payload = codes.numpy().view(np.float16).astype(np.float32).view(np.uint32) | 0x400000
    assert bool(torch.isnan(out).all())
    assert np.array_equal(out.cpu().numpy().view(np.uint32), payload)


def test_float8_codes_match_torch_cast(generator):
    """torch's own float8_e4m3fn cast (ties to even) agrees wherever it does not overflow."""
    x = torch.randn(1, 4, 16, 16, generator=generator) * 3
    layout, slabs, _ = round_trip([x], "float8_e4m3")
    codes = slabs[0, : x.numel()].view(torch.float8_e4m3fn).reshape(x.shape[1:])
    scale = slabs[0, layout.scale_offsets[0]: layout.scale_offsets[0] + 16].view(torch.float32)
    expected = (x[0] / scale[:, None, None]).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))


def test_strided_maps(generator):
    maps = [torch.randn(2, 8, 5, 6, generator=generator).to(memory_format=torch.channels_last),
            torch.randn(2, 3, 7, 4, generator=generator).transpose(2, 3)]
    assert not maps[1].is_contiguous()
    _, _, unpacked = round_trip(maps, "float32")
    assert all(torch.equal(a, b) for a, b in zip(unpacked, maps))


def test_layout_checks():
    with pytest.raises(ValueError, match="storage_dtype"):
        SlabLayout.for_maps([torch.zeros(1, 2, 3, 3)], "int8")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        SlabLayout.for_maps([torch.zeros(2, 3, 3)], "float32")
    with pytest.raises(TypeError, match="one dtype"):
        SlabLayout.for_maps([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.float16)],
                            "float32")
    layout = SlabLayout.for_maps([torch.zeros(2, 2, 3, 3)], "float32")
    with pytest.raises(ValueError, match="slabs must be"):
        layout.pack([torch.zeros(2, 2, 3, 3)], torch.zeros(2, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not match"):
        layout.pack([torch.zeros(2, 2, 4, 3)], torch.zeros(2, layout.slab_bytes, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "float16", "float8_e4m3"])
def test_cuda_slabs_identical_to_cpu(generator, storage):
    maps = feature_maps(generator, torch.float32)
    _, cpu_slabs, cpu_out = round_trip(maps, storage)
    _, gpu_slabs, gpu_out = round_trip([m.cuda() for m in maps], storage)
    assert torch.equal(cpu_slabs, gpu_slabs.cpu())
    assert all(same_values(a, b.cpu()) for a, b in zip(cpu_out, gpu_out))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pack_and_unpack_never_wait_for_the_gpu(generator):
    maps = [m.cuda() for m in feature_maps(generator, torch.float32)]
    _, _, expected = round_trip(maps, "float8_e4m3")
    with no_host_sync():
        _, _, unpacked = round_trip(maps, "float8_e4m3")
    assert all(same_values(a, b) for a, b in zip(unpacked, expected))
