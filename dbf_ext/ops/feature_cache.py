"""The feature cache's pack and unpack kernels (CPU and CUDA kernels in csrc/feature_cache/).

Sample ``n`` of every ``(N, C, H, W)`` feature map goes to, or comes from, the slab that starts
at address ``slab_addresses[n]``; level ``i`` lies at byte ``value_offsets[i]`` of the slab and
its float8 scales at ``scale_offsets[i]`` (-1 without). :class:`dbf_ext.cache.SlabLayout`
computes these offsets and checks the inputs (the storage formats are stated there).

These are plain functions, not custom ops: the kernels follow raw slab addresses (rows
anywhere in memory, not tensors that torch sees), so the writes and reads are invisible to
torch's tracing and alias analysis. The feature cache runs eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dbf_ext import _ext


def run_feature_kernel(
    kernel: str,
    maps: Sequence[Tensor],
    value_offsets: Sequence[int],
    scale_offsets: Sequence[int],
    storage_dtype: torch.dtype,
    slab_addresses: Tensor,
) -> None:
    """``kernel="pack_features"`` writes sample ``n`` of every map, converted to
    ``storage_dtype``, into slab ``n``; ``"unpack_features"`` fills sample ``n`` of every map
    (in place, in its own dtype) from slab ``n``."""
    if kernel not in ("pack_features", "unpack_features"):
        raise ValueError(f"kernel must be 'pack_features' or 'unpack_features', got {kernel!r}")
    # One tuple per level, in the order csrc/bindings.cpp unpacks (LevelTuple).
    levels = [
        (m.data_ptr(), *m.shape[1:], *m.stride(), value_offset, scale_offset)
        for m, value_offset, scale_offset in zip(maps, value_offsets, scale_offsets)
    ]
    _ext.launch(
        kernel,
        maps[0].device,
        levels,
        _ext.dtype_code(maps[0].dtype),
        _ext.dtype_code(storage_dtype),
        slab_addresses.shape[0],
        slab_addresses.data_ptr(),
    )
