"""Storage slabs of cached feature maps, filled and read by the pack / unpack kernels
(dbf_ext/ops/feature_cache.py).

One *slab* holds all feature maps of one sample in the storage dtype: for each level, its
``C x H x W`` values (channel-major), then for ``float8_e4m3`` one float32 scale per channel.
Every region starts on a 16-byte boundary. A :class:`SlabLayout` describes the slab of one
backbone output structure at one input size; the kernels (``csrc/feature_cache/``) only follow
the offsets computed here.

Conversions:

* ``float32``: lossless.
* ``bfloat16`` / ``float16``: round to nearest even, bit-identical to ``tensor.to(dtype)``.
* ``float8_e4m3``: ``x / scale`` rounded to nearest even in e4m3 (saturating at 448), with
  ``scale = max|x| / 448`` per (sample, level, channel), computed in the same pass. Error
  bound for a channel with scale ``s``: ``|x - x_hat| <= max(|x| * 2**-4, s * 2**-10)``
  (half a unit in the last place of a 3-bit mantissa, or half the smallest subnormal), plus
  the float32 rounding of the division and product (~1e-7 relative). The scale is at least
  the smallest float32 subnormal (so a channel with max|x| below ~6e-43 does not divide by 0);
  below max|x| ~5e-36 the scale is itself subnormal and the bound is looser, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext._validation import check_choice
from dbf_ext.ops.feature_cache import run_feature_kernel

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3": torch.float8_e4m3fn,
}
MAP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN = 16


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class SlabLayout:
    """Where each level of one sample's features lies in its slab.

    Attributes:
        shapes: ``(C, H, W)`` of each level.
        map_dtype: dtype of the feature maps (what unpack returns).
        storage_dtype: one of :data:`STORAGE_DTYPES`' names.
        value_offsets / scale_offsets: byte offsets of each level's values and (float8 only)
            its per-channel float32 scales; scale offsets are -1 otherwise.
        slab_bytes: bytes of one sample's slab.
    """

    shapes: tuple[tuple[int, int, int], ...]
    map_dtype: torch.dtype
    storage_dtype: str
    value_offsets: tuple[int, ...]
    scale_offsets: tuple[int, ...]
    slab_bytes: int

    @classmethod
    def for_maps(cls, maps: list[Tensor], storage_dtype: str) -> SlabLayout:
        """The layout for a batch of ``(N, C, H, W)`` maps (all of one dtype)."""
        check_choice("storage_dtype", storage_dtype, sorted(STORAGE_DTYPES))
        if not maps:
            raise ValueError("a feature cache entry needs at least one feature map")
        map_dtype = maps[0].dtype
        for m in maps:
            if m.dim() != 4:
                raise ValueError(f"cached feature maps must be (N, C, H, W), got {tuple(m.shape)}")
            if m.dtype != map_dtype or m.dtype not in MAP_DTYPES:
                raise TypeError(
                    "cached feature maps must share one dtype among float32, bfloat16, float16; "
                    f"got {[str(t.dtype) for t in maps]}"
                )
        element = torch.empty((), dtype=STORAGE_DTYPES[storage_dtype]).element_size()
        scaled = storage_dtype == "float8_e4m3"
        offset, value_offsets, scale_offsets, shapes = 0, [], [], []
        for m in maps:
            c, h, w = (int(s) for s in m.shape[1:])
            shapes.append((c, h, w))
            value_offsets.append(offset)
            offset = _aligned(offset + c * h * w * element)
            scale_offsets.append(offset if scaled else -1)
            if scaled:
                offset = _aligned(offset + c * 4)
        return cls(tuple(shapes), map_dtype, storage_dtype, tuple(value_offsets),
                   tuple(scale_offsets), offset)

    def matches(self, maps: list[Tensor]) -> bool:
        """True when ``maps`` (a batch) have this layout's per-sample shapes and dtype."""
        return len(maps) == len(self.shapes) and all(
            m.dtype == self.map_dtype and tuple(m.shape[1:]) == s for m, s in zip(maps, self.shapes)
        )

    def pack(self, maps: list[Tensor], slabs: Tensor) -> None:
        """Writes sample ``n`` of every ``(N, C, H, W)`` map into row ``n`` of ``slabs``.

        Args:
            maps: the batch's feature maps, matching this layout, on one device.
            slabs: ``(N, slab_bytes)`` uint8 on the maps' device, rows contiguous.
        """
        self._check_slabs(slabs, maps)
        if slabs.shape[0]:
            run_feature_kernel("pack_features", maps, self.value_offsets, self.scale_offsets,
                               STORAGE_DTYPES[self.storage_dtype], _row_addresses(slabs))

    def unpack(self, rows: list[Tensor]) -> list[Tensor]:
        """The feature maps stored in slab ``rows`` (each ``(slab_bytes,)`` uint8, anywhere in
        memory, all on one device): one ``(len(rows), C, H, W)`` tensor per level, in
        ``map_dtype``, on that device. The rows are read in place (no gathering copy)."""
        device = rows[0].device if rows else torch.device("cpu")
        maps = [
            torch.empty((len(rows), *shape), dtype=self.map_dtype, device=device)
            for shape in self.shapes
        ]
        for row in rows:
            if row.dtype != torch.uint8 or row.shape != (self.slab_bytes,) or row.device != device:
                raise ValueError(f"slab rows must be ({self.slab_bytes},) uint8 on {device}, got "
                                 f"{tuple(row.shape)} {row.dtype} on {row.device}")
            if not row.is_contiguous():
                raise ValueError("slab rows must be contiguous")
        if rows:
            addresses = _ext.host_values_to(device, [r.data_ptr() for r in rows], torch.int64)
            run_feature_kernel("unpack_features", maps, self.value_offsets, self.scale_offsets,
                               STORAGE_DTYPES[self.storage_dtype], addresses)
        return maps

    def _check_slabs(self, slabs: Tensor, maps: list[Tensor]) -> None:
        if slabs.dtype != torch.uint8 or slabs.dim() != 2 or slabs.shape[1] != self.slab_bytes:
            raise ValueError(f"slabs must be (N, {self.slab_bytes}) uint8, got "
                             f"{tuple(slabs.shape)} {slabs.dtype}")
        if slabs.stride(1) != 1:
            raise ValueError("slab rows must be contiguous")
        if not self.matches(maps) or any(m.shape[0] != slabs.shape[0] for m in maps):
            raise ValueError("feature maps do not match the slab layout")
        if any(m.device != slabs.device for m in maps):
            raise ValueError("feature maps and slabs must be on the same device")


def _row_addresses(slabs: Tensor) -> Tensor:
    """Start address of each row of ``slabs``, as an int64 tensor on the slabs' device."""
    base, row_stride = slabs.data_ptr(), slabs.stride(0)
    # Computed on the device: no host-to-device copy to wait for.
    return torch.arange(slabs.shape[0], dtype=torch.int64, device=slabs.device) * row_stride + base
