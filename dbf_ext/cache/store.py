"""The tiered feature store: GPU memory -> host memory -> disk."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import struct
import zlib
from contextlib import nullcontext
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dbf_ext.cache.layout import STORAGE_DTYPES, SlabLayout

logger = logging.getLogger(__name__)

TIERS = ("gpu", "cpu", "disk")
CacheKey = tuple[Hashable, Hashable]  # (sample id, augmentation key)

# Disk entry: header, then the slab bytes. The header ties the bytes to the entry the index
# expects (layout digest, weights version), so a file from another run or another layout is
# never served; the CRC-32 rejects truncated or corrupted payloads.
_MAGIC = b"DBFC"
_FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sIQI16s16s")  # magic, version, payload bytes, crc32, layout, weights
_SUFFIX = ".dbfc"


@dataclasses.dataclass
class CacheStats:
    """Counters of a :class:`FeatureCache` (part of checkpoints through ``state_dict``)."""

    hits: int = 0
    misses: int = 0
    stored: int = 0
    not_stored: int = 0  # no tier had room
    corrupt: int = 0  # disk entries that failed verification (recomputed)
    invalidations: int = 0
    backbone_seconds: float = 0.0  # measured on misses
    backbone_samples: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def seconds_saved_estimate(self) -> float:
        """Hits times the measured backbone time per sample (decoding savings not included)."""
        if not self.backbone_samples:
            return 0.0
        return self.hits * self.backbone_seconds / self.backbone_samples


@dataclasses.dataclass
class _Entry:
    tier: str
    layout: SlabLayout
    structure: Any  # pytree spec of the backbone output
    input_size: tuple[int, ...]  # spatial size of the backbone input it was computed from
    nbytes: int
    row: Tensor | None = None  # gpu / cpu tiers
    path: Path | None = None  # disk tier
    ready: torch.cuda.Event | None = None  # completion of an asynchronous copy into `row`


@dataclasses.dataclass
class _PendingLoad:
    rows: list[Tensor]
    layout: SlabLayout
    structure: Any
    copy_stream: torch.cuda.Stream | None


class FeatureCache:
    """Stores frozen-backbone features per ``(sample_id, aug_key)``.

    Args:
        storage_dtype: ``"float32"`` (lossless), ``"bfloat16"``, ``"float16"`` or
            ``"float8_e4m3"`` (per-channel scale); see :mod:`dbf_ext.cache.layout`.
        gpu_bytes: budget of the GPU tier (used only for features computed on a GPU).
        cpu_bytes: budget of the host-memory tier (pinned when features come from a GPU, so
            copies back are asynchronous).
        disk_dir: folder of the disk tier (created with user-only permissions); ``None``
            disables it. Its ``*.dbfc`` files are scratch for this run: stale ones are removed.
        disk_bytes: budget of the disk tier.

    Placement and eviction: an entry goes to the first tier with room, in the order GPU, host,
    disk; when none has room it is not stored (never an error). Entries are not evicted to make
    room: a frozen epoch visits every sample once, a cyclic pattern for which any recency-based
    eviction would throw away each entry just before its reuse, while keeping the first entries
    serves a stable fraction of every later epoch.

    Validity: entries are valid for the weights version they were stored with; a call with
    another version drops everything (see :class:`~dbf_ext.cache.CachedBackbone`).
    """

    def __init__(
        self,
        storage_dtype: str = "bfloat16",
        gpu_bytes: int = 0,
        cpu_bytes: int = 4 << 30,
        disk_dir: str | os.PathLike | None = None,
        disk_bytes: int = 16 << 30,
    ):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}"
            )
        for name, value in (("gpu_bytes", gpu_bytes), ("cpu_bytes", cpu_bytes),
                            ("disk_bytes", disk_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.storage_dtype = storage_dtype
        self.budgets = {"gpu": gpu_bytes, "cpu": cpu_bytes, "disk": disk_bytes if disk_dir else 0}
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.disk_dir, 0o700)
            for stale in self.disk_dir.glob(f"*{_SUFFIX}*"):
                stale.unlink(missing_ok=True)
        self._run_salt = secrets.token_hex(8)  # file names never repeat across runs
        self._entries: dict[CacheKey, _Entry] = {}
        self._used = dict.fromkeys(TIERS, 0)
        self._weights_version: Hashable = None
        self.stats = CacheStats()

    # ---- inspection ----

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def keys_snapshot(self) -> frozenset:
        """The stored keys (for data loaders deciding which samples need no decoding)."""
        return frozenset(self._entries)

    def bytes_used(self) -> dict[str, int]:
        return dict(self._used)

    def entries_per_tier(self) -> dict[str, int]:
        counts = dict.fromkeys(TIERS, 0)
        for entry in self._entries.values():
            counts[entry.tier] += 1
        return counts

    def summary(self) -> dict[str, Any]:
        """Plain-value statistics for logs: counters, entries and bytes per tier."""
        entries = len(self._entries)
        return {
            **dataclasses.asdict(self.stats),
            "hit_rate": self.stats.hit_rate,
            "seconds_saved_estimate": self.stats.seconds_saved_estimate,
            "entries": self.entries_per_tier(),
            "bytes": self.bytes_used(),
            "bytes_per_sample": sum(self._used.values()) / entries if entries else 0.0,
            "storage_dtype": self.storage_dtype,
        }

    # ---- validity ----

    def invalidate(self) -> None:
        """Drops every entry (and its disk file)."""
        for entry in self._entries.values():
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
        if self._entries:
            self.stats.invalidations += 1
        self._entries.clear()
        self._used = dict.fromkeys(TIERS, 0)

    def use_weights_version(self, version: Hashable) -> None:
        """Declares the weights the next lookups and stores refer to; a change drops all."""
        if version != self._weights_version:
            if self._entries:
                logger.info("backbone weights changed: feature cache invalidated (%d entries)",
                            len(self._entries))
            self.invalidate()
            self._weights_version = version

    # ---- lookup, load, store ----

    def lookup(self, keys: Sequence[CacheKey | None], input_size: tuple[int, ...]) -> list[bool]:
        """For each key, whether a stored entry computed at ``input_size`` exists."""
        found = []
        for key in keys:
            entry = self._entries.get(key) if key is not None else None
            found.append(entry is not None and entry.input_size == tuple(input_size))
        return found

    def start_load(self, keys: Sequence[CacheKey], device: torch.device,
                   copy_stream: torch.cuda.Stream | None = None) -> _PendingLoad | None:
        """Starts reading the entries of ``keys`` (all found by :meth:`lookup` at one input size)
        onto ``device``; :meth:`finish_load` returns the maps.

        Host and disk rows bound for a GPU are copied on ``copy_stream`` when given, so the
        copies overlap whatever the caller queues next on its own stream. Returns ``None`` when
        a disk entry failed verification (it is dropped; the caller recomputes).
        """
        entries = [self._entries[k] for k in keys]
        rows = []
        for key, entry in zip(keys, entries):
            if entry.ready is not None:
                entry.ready.synchronize()  # long done: it was queued an epoch ago
            row = entry.row if entry.path is None else self._read_disk(key, entry)
            if row is None:
                return None
            rows.append(row)
        device = torch.device(device)
        if device.type == "cuda" and any(r.device != device for r in rows):
            with torch.cuda.stream(copy_stream) if copy_stream is not None else nullcontext():
                rows = [r if r.device == device else r.to(device, non_blocking=True) for r in rows]
        else:
            copy_stream = None
        return _PendingLoad(rows, entries[0].layout, entries[0].structure, copy_stream)

    def finish_load(self, pending: _PendingLoad) -> tuple[list[Tensor], Any]:
        """``(maps, structure)``: one ``(len(keys), C, H, W)`` tensor per level and the pytree
        spec of the backbone output."""
        if pending.copy_stream is not None:
            current = torch.cuda.current_stream(pending.rows[0].device)
            current.wait_stream(pending.copy_stream)
            for row in pending.rows:  # allocated on the copy stream, read on this one
                row.record_stream(current)
        self.stats.hits += len(pending.rows)
        return pending.layout.unpack(pending.rows), pending.structure

    def store(self, keys: Sequence[CacheKey | None], maps: list[Tensor], structure: Any,
              input_size: tuple[int, ...]) -> None:
        """Packs a batch of computed maps and keeps the samples whose key is not ``None``."""
        wanted = [i for i, k in enumerate(keys) if k is not None and k not in self._entries]
        if not wanted:
            return
        layout = SlabLayout.for_maps(maps, self.storage_dtype)
        slabs = torch.empty((maps[0].shape[0], layout.slab_bytes), dtype=torch.uint8,
                            device=maps[0].device)
        layout.pack(maps, slabs)
        on_gpu = slabs.device.type == "cuda"
        placement: dict[str, list[int]] = {tier: [] for tier in TIERS}
        for i in wanted:
            tier = self._tier_with_room(layout, on_gpu)
            if tier is None:
                self.stats.not_stored += 1
                continue
            placement[tier].append(i)
            self._used[tier] += _entry_bytes(tier, layout)

        def make(tier: str, row: Tensor | None = None, path: Path | None = None) -> _Entry:
            return _Entry(tier, layout, structure, tuple(input_size), _entry_bytes(tier, layout),
                          row, path)

        if placement["gpu"]:
            rows = _compact_rows(slabs, placement["gpu"])
            for j, i in enumerate(placement["gpu"]):
                self._entries[keys[i]] = make("gpu", row=rows[j])
        host_indices = placement["cpu"] + placement["disk"]
        if host_indices:
            host = torch.empty((len(host_indices), layout.slab_bytes), dtype=torch.uint8,
                               pin_memory=on_gpu)
            host.copy_(slabs[torch.tensor(host_indices, device=slabs.device)], non_blocking=on_gpu)
            ready = None
            if on_gpu:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(slabs.device))
                if placement["disk"]:
                    ready.synchronize()  # the file writer reads the host copy now
            for j, i in enumerate(host_indices):
                if j < len(placement["cpu"]):
                    self._entries[keys[i]] = make("cpu", row=host[j])
                    self._entries[keys[i]].ready = ready
                else:
                    path = self._write_disk(keys[i], layout, structure, host[j])
                    self._entries[keys[i]] = make("disk", path=path)
        self.stats.stored += sum(len(v) for v in placement.values())

    def _tier_with_room(self, layout: SlabLayout, on_gpu: bool) -> str | None:
        for tier in TIERS:
            if tier == "gpu" and not on_gpu:
                continue
            if self._used[tier] + _entry_bytes(tier, layout) <= self.budgets[tier]:
                return tier
        return None

    # ---- disk tier ----

    def _entry_path(self, key: CacheKey) -> Path:
        digest = hashlib.blake2b(repr((self._run_salt, key)).encode(), digest_size=20).hexdigest()
        return self.disk_dir / f"{digest}{_SUFFIX}"

    def _header_tags(self, layout: SlabLayout, structure: Any) -> tuple[bytes, bytes]:
        layout_tag = hashlib.blake2b(repr((layout, structure)).encode(), digest_size=16).digest()
        weights_tag = hashlib.blake2b(repr(self._weights_version).encode(), digest_size=16).digest()
        return layout_tag, weights_tag

    def _write_disk(self, key: CacheKey, layout: SlabLayout, structure: Any, row: Tensor) -> Path:
        path = self._entry_path(key)
        payload = row.numpy()
        header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, payload.nbytes, zlib.crc32(payload),
                              *self._header_tags(layout, structure))
        # Written under a temporary name and renamed: a crash leaves no file under the final
        # name except a complete one (and the CRC catches what the file system may lose).
        partial = path.with_suffix(f"{_SUFFIX}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload.tobytes())
        os.replace(partial, path)
        return path

    def _read_disk(self, key: CacheKey, entry: _Entry) -> Tensor | None:
        expected_tags = self._header_tags(entry.layout, entry.structure)
        try:
            mapped = np.memmap(entry.path, dtype=np.uint8, mode="c")
            magic, version, size, crc, layout_tag, weights_tag = _HEADER.unpack_from(mapped)
            payload = mapped[_HEADER.size:]
            valid = (magic == _MAGIC and version == _FORMAT_VERSION
                     and size == entry.layout.slab_bytes and payload.nbytes == size and (layout_tag, weights_tag) == expected_tags
                     and zlib.crc32(payload) == crc)
        except (OSError, ValueError, struct.error):
            valid = False
        if not valid:
            logger.warning("feature cache: disk entry %s is incomplete or corrupt; recomputing",
                           entry.path.name)
            self.stats.corrupt += 1
            self._drop(key)
            return None
        return torch.from_numpy(payload)

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        self._used[entry.tier] -= entry.nbytes
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    # ---- checkpoints ----

    def state_dict(self) -> dict[str, Any]:
        """Statistics only: stored features are rebuilt after a resume (they would be invalid
        for a restored model anyway unless its weights were bit-identical)."""
        return {"stats": dataclasses.asdict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats = CacheStats(**state["stats"])


def _entry_bytes(tier: str, layout: SlabLayout) -> int:
    return layout.slab_bytes + (_HEADER.size if tier == "disk" else 0)


def _compact_rows(slabs: Tensor, indices: list[int]) -> Tensor:
    """The chosen rows of ``slabs``: the tensor itself when all are chosen, else a compact copy
    (so a partially kept batch does not hold the whole batch's memory)."""
    if len(indices) == slabs.shape[0]:
        return slabs
    return slabs[torch.tensor(indices, device=slabs.device)]
