"""The tiered feature store: GPU memory -> host memory -> disk."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import stat
import struct
import tempfile
import weakref
import zlib
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dbf_ext import _ext
from dbf_ext.cache.layout import STORAGE_DTYPES, SlabLayout

logger = logging.getLogger(__name__)

TIERS = ("gpu", "cpu", "disk")
CacheKey = tuple[Hashable, Hashable]  # (sample id, augmentation key)

# Disk entry: header, then the slab bytes. The header ties the bytes to the entry the index
# expects (key, layout and weights digests), so a file of another sample (two files swapped),
# another run or another layout is never served; the CRC-32 rejects truncated or corrupted
# payloads.
_MAGIC = b"DBFC"
_FORMAT_VERSION = 2
# magic, version, payload bytes, crc32, key digest, layout digest, weights digest
_HEADER = struct.Struct("<4sIQI16s16s16s")
_SUFFIX = ".dbfc"
_PARTIAL_SUFFIX = ".partial"
_LOCK = "lock"
_RUN_PREFIX = "run-"


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
    input_size: tuple[int, ...]  # (C, H, W) of the (padded) batch it was computed in
    image_size: tuple[int, int]  # (H, W) of the image itself inside that batch
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
    loaded: list[int]  # positions in the requested keys whose rows these are


class FeatureCache:
    """Stores frozen-backbone features per ``(sample_id, aug_key)``.

    Args:
        storage_dtype: ``"float32"`` (lossless), ``"bfloat16"``, ``"float16"`` or
            ``"float8_e4m3"`` (per-channel scale); see :mod:`dbf_ext.cache.layout`.
        gpu_bytes: budget of the GPU tier (used only for features computed on a GPU).
        cpu_bytes: budget of the host-memory tier (pinned when features come from a GPU, so
            copies back are asynchronous).
        disk_dir: folder of the disk tier; ``None`` disables it. The folder is the user's: it
            is created when missing but never chmodded, and nothing in it is touched except a
            private sub-folder ``dbf_ext-cache-<uid>`` (created ``0700``; one that exists with
            another owner, wider permissions or as a symbolic link is refused). Each cache
            writes its entries into its own ``run-*`` folder inside, locked while it lives, so
            processes sharing ``disk_dir`` never delete each other's entries; a run folder
            whose lock is free (its process died) is removed by the next cache on the folder.
        disk_bytes: budget of the disk tier.

    Placement and eviction: an entry goes to the first tier with room, in the order GPU, host,
    disk; when none has room it is not stored (never an error). Entries are not evicted to make
    room: a frozen epoch visits every sample once, a cyclic pattern for which any recency-based
    eviction would throw away each entry just before its reuse, while keeping the first entries
    serves a stable fraction of every later epoch.

    Validity: entries are valid for the weights version they were stored with; a call with
    another version drops everything. A :class:`~dbf_ext.cache.CachedBackbone` binds itself as
    the source of that version (:meth:`bind_weights`), so :meth:`keys_snapshot` checks it
    before it names a single key.

    Disk faults (no space left, any ``OSError``) while storing leave the entry unstored with
    one warning; an entry whose file is missing, truncated, corrupt or another entry's is a
    miss, counted in ``stats.corrupt``.
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
            # bool is an int subclass: cpu_bytes=True would silently be a 1-byte budget
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if disk_dir is not None and not os.fspath(disk_dir):
            raise ValueError("disk_dir must name a folder (or be None for no disk tier), got ''")
        self.storage_dtype = storage_dtype
        self.budgets = {"gpu": gpu_bytes, "cpu": cpu_bytes,
                        "disk": disk_bytes if disk_dir is not None else 0}
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.entry_dir: Path | None = None  # this cache's own run folder inside disk_dir
        self._close_disk = None
        if self.disk_dir is not None:
            self.entry_dir, lock_fd = _open_run_folder(self.disk_dir)
            self._close_disk = weakref.finalize(self, _remove_run_folder, self.entry_dir, lock_fd)
        self._entries: dict[CacheKey, _Entry] = {}
        self._used = dict.fromkeys(TIERS, 0)
        self._weights_version: Hashable = None
        self._weights_source: weakref.WeakMethod | None = None
        self._warned_disk_write = False
        self.stats = CacheStats()

    def close(self) -> None:
        """Drops every entry and removes this cache's disk folder (also done when the cache is
        garbage collected or the process exits); the disk tier is off afterwards."""
        self.invalidate()
        self.budgets["disk"] = 0
        if self._close_disk is not None:
            self._close_disk()

    # ---- inspection ----

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def keys_snapshot(self) -> frozenset:
        """The keys that can be served now (for data loaders deciding which samples need no
        decoding). Call it at the start of each epoch, after the freezing decision: it first
        asks the bound backbone (:meth:`bind_weights`) whether the entries are still valid,
        with a full check of its weights' content, and is empty while the backbone trains."""
        source = self._weights_source() if self._weights_source is not None else None
        if source is not None:
            self.use_weights_version(source(True))
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

    def bind_weights(self, source: Callable[[bool], Hashable | None]) -> None:
        """Makes the bound method ``source`` the judge of validity for :meth:`keys_snapshot`.

        ``source(verify_content)`` returns the current weights version (``None`` while the
        backbone trains: nothing may be served then). Held weakly; the last one bound wins.
        """
        if self._weights_source is None or self._weights_source() != source:
            self._weights_source = weakref.WeakMethod(source)

    def use_weights_version(self, version: Hashable) -> None:
        """Declares the weights the next lookups and stores refer to; a change drops all.
        ``None`` means no valid weights (a training backbone): everything is dropped."""
        if version is None or version != self._weights_version:
            if self._entries:
                logger.info("backbone weights changed: feature cache invalidated (%d entries)",
                            len(self._entries))
            self.invalidate()
            self._weights_version = version

    # ---- lookup, load, store ----

    def lookup(self, keys: Sequence[CacheKey | None], input_size: tuple[int, ...],
               image_sizes: Sequence[tuple[int, int]] | None = None) -> list[bool]:
        """For each key, whether a stored entry exists that was computed in a batch of
        ``input_size`` ``(C, H, W)`` with the image itself of size ``image_sizes[i]`` ``(H, W)``
        (default: the image fills the batch, ``input_size[1:]``)."""
        image_sizes = _image_sizes(len(keys), input_size, image_sizes)
        found = []
        for key, image_size in zip(keys, image_sizes):
            entry = self._entries.get(key) if key is not None else None
            found.append(entry is not None and entry.input_size == tuple(input_size)
                         and entry.image_size == image_size)
        return found

    def start_load(self, keys: Sequence[CacheKey], device: torch.device,
                   copy_stream: torch.cuda.Stream | None = None) -> _PendingLoad:
        """Starts reading the entries of ``keys`` (all found by :meth:`lookup` at one input size)
        onto ``device``; :meth:`finish_load` returns the maps.

        Host and disk rows bound for a GPU are copied on ``copy_stream`` when given, so the
        copies overlap whatever the caller queues next on its own stream. A disk entry that
        fails verification is dropped and left out: ``loaded`` lists the positions in ``keys``
        that were read (the others are misses now).
        """
        rows, loaded, layout, structure = [], [], None, None
        for position, key in enumerate(keys):
            entry = self._entries[key]
            if entry.ready is not None:
                entry.ready.synchronize()  # long done: it was queued an epoch ago
            row = entry.row if entry.path is None else self._read_disk(key, entry)
            if row is None:
                continue
            rows.append(row)
            loaded.append(position)
            layout, structure = entry.layout, entry.structure
        device = torch.device(device)
        if device.type == "cuda" and any(r.device != device for r in rows):
            with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
                rows = [r if r.device == device else r.to(device, non_blocking=True) for r in rows]
        else:
            copy_stream = None
        return _PendingLoad(rows, layout, structure, copy_stream, loaded)

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
              input_size: tuple[int, ...],
              image_sizes: Sequence[tuple[int, int]] | None = None) -> None:
        """Packs a batch of computed ``(N, C, H, W)`` maps and keeps the samples whose key is not
        ``None`` (a key present twice is kept once), computed in a batch of ``input_size`` with
        images of ``image_sizes`` (see :meth:`lookup`)."""
        image_sizes = _image_sizes(len(keys), input_size, image_sizes)
        wanted: list[int] = []
        for i, key in enumerate(keys):
            if key is not None and key not in self._entries and all(keys[j] != key for j in wanted):
                wanted.append(i)
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

        def make(i: int, tier: str, row: Tensor | None = None, path: Path | None = None) -> _Entry:
            return _Entry(tier, layout, structure, tuple(input_size), image_sizes[i],
                          _entry_bytes(tier, layout), row, path)

        if placement["gpu"]:
            rows = _compact_rows(slabs, placement["gpu"])
            for j, i in enumerate(placement["gpu"]):
                self._entries[keys[i]] = make(i, "gpu", row=rows[j])
        host_indices = placement["cpu"] + placement["disk"]
        if host_indices:
            host = torch.empty((len(host_indices), layout.slab_bytes), dtype=torch.uint8,
                               pin_memory=on_gpu)
            host.copy_(slabs[_ext.host_values_to(slabs.device, host_indices, torch.int64)],
                       non_blocking=on_gpu)
            ready = None
            if on_gpu:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(slabs.device))
                if placement["disk"]:
                    ready.synchronize()  # the file writer reads the host copy now
            for j, i in enumerate(host_indices):
                if j < len(placement["cpu"]):
                    self._entries[keys[i]] = make(i, "cpu", row=host[j])
                    self._entries[keys[i]].ready = ready
                    continue
                path = self._write_disk(keys[i], layout, structure, host[j])
                if path is None:  # the disk refused it: as if the tier had had no room
                    self._used["disk"] -= _entry_bytes("disk", layout)
                    placement["disk"].remove(i)
                    self.stats.not_stored += 1
                else:
                    self._entries[keys[i]] = make(i, "disk", path=path)
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
        return self.entry_dir / f"{_digest(key, 20).hex()}{_SUFFIX}"

    def _header_tags(self, key: CacheKey, layout: SlabLayout, structure: Any) -> tuple[bytes, ...]:
        return _digest(key), _digest((layout, structure)), _digest(self._weights_version)

    def _write_disk(self, key: CacheKey, layout: SlabLayout, structure: Any,
                    row: Tensor) -> Path | None:
        """Writes one entry's file; ``None`` (and a warning, once) when the disk refuses it."""
        path = self._entry_path(key)
        payload = row.numpy()
        header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, payload.nbytes, zlib.crc32(payload),
                              *self._header_tags(key, layout, structure))
        # Written under a temporary name and renamed: a crash leaves no file under the final
        # name except a complete one (and the CRC catches what the file system may lose).
        partial = path.with_name(path.name + _PARTIAL_SUFFIX)
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, header)
                _write_all(fd, payload)
            finally:
                os.close(fd)
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            if not self._warned_disk_write:
                logger.warning("feature cache: disk entries not stored (%s); they are "
                               "recomputed when needed (warned once)", error)
                self._warned_disk_write = True
            return None
        return path

    def _read_disk(self, key: CacheKey, entry: _Entry) -> Tensor | None:
        """The entry's slab, read into memory and verified there (what is verified is what is
        served: no mapping a later truncation could invalidate); ``None`` when invalid."""
        size = entry.layout.slab_bytes
        row = torch.empty(size, dtype=torch.uint8)
        payload = row.numpy()
        try:
            with open(entry.path, "rb") as f:
                header = _HEADER.unpack(f.read(_HEADER.size))
                complete = f.readinto(payload) == size and not f.read(1)
            magic, version, stored_size, crc, *tags = header
            valid = (complete and magic == _MAGIC and version == _FORMAT_VERSION
                     and stored_size == size
                     and tuple(tags) == self._header_tags(key, entry.layout, entry.structure)
                     and zlib.crc32(payload) == crc)
        except (OSError, struct.error):
            valid = False
        if not valid:
            logger.warning("feature cache: disk entry %s is missing, incomplete, corrupt or "
                           "another entry's; recomputing", entry.path.name)
            self.stats.corrupt += 1
            self._drop(key)
            return None
        return row

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


def _digest(value: Any, size: int = 16) -> bytes:
    return hashlib.blake2b(repr(value).encode(), digest_size=size).digest()


def _image_sizes(count: int, input_size: tuple[int, ...],
                 image_sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if image_sizes is None:
        return [tuple(input_size[-2:])] * count
    if len(image_sizes) != count:
        raise ValueError(f"got {len(image_sizes)} image sizes for {count} keys")
    return [tuple(int(s) for s in size) for size in image_sizes]


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _private_folder(disk_dir: Path) -> Path:
    """``disk_dir/dbf_ext-cache-<uid>``, created ``0700`` or checked to be ours and private."""
    disk_dir.mkdir(parents=True, exist_ok=True)  # the user's folder: never chmodded
    private = disk_dir / f"dbf_ext-cache-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(private, 0o700)
    info = os.lstat(private)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"feature cache folder {private} is a symbolic link; refusing it")
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"feature cache folder {private} exists and is not a folder")
    if info.st_uid != os.getuid():
        raise PermissionError(f"feature cache folder {private} belongs to another user; refusing it")
    if info.st_mode & 0o077:
        raise PermissionError(
            f"feature cache folder {private} has permissions {stat.S_IMODE(info.st_mode):04o}; "
            "it must be private (0700): refusing it")
    return private


def _open_run_folder(disk_dir: Path) -> tuple[Path, int]:
    """A new run folder in the private folder, and the descriptor of its lock (held while the
    cache lives). Stale run folders, whose lock no process holds, are removed first."""
    private = _private_folder(disk_dir)
    for folder in private.glob(f"{_RUN_PREFIX}*"):
        _remove_if_stale(folder)
    # Created under a name the cleanup above skips, locked, then renamed: no other process can
    # see the folder unlocked.
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=private))
    lock_fd = os.open(staging / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    folder = private / f"{_RUN_PREFIX}{staging.name[len('.new-'):]}"
    os.rename(staging, folder)
    return folder, lock_fd


def _remove_if_stale(folder: Path) -> None:
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return
        lock_fd = os.open(folder / _LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # not a run folder of ours, or gone
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        return  # a live process holds it
    _remove_run_folder(folder, lock_fd)


def _remove_run_folder(folder: Path, lock_fd: int) -> None:
    """Removes the files a cache writes (entries, partial entries, the lock) and the folder if
    that empties it; then releases the lock."""
    try:
        for path in folder.iterdir():
            if path.name.endswith((_SUFFIX, _SUFFIX + _PARTIAL_SUFFIX)) or path.name == _LOCK:
                with contextlib.suppress(OSError):
                    path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
    except OSError:
        pass
    finally:
        os.close(lock_fd)


def _entry_bytes(tier: str, layout: SlabLayout) -> int:
    return layout.slab_bytes + (_HEADER.size if tier == "disk" else 0)


def _compact_rows(slabs: Tensor, indices: list[int]) -> Tensor:
    """The chosen rows of ``slabs``: the tensor itself when all are chosen, else a compact copy
    (so a partially kept batch does not hold the whole batch's memory)."""
    if len(indices) == slabs.shape[0]:
        return slabs
    return slabs[_ext.host_values_to(slabs.device, indices, torch.int64)]
