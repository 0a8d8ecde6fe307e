"""Data-parallel training on torch.distributed: the process group from torchrun's environment,
the DDP wrapper DBF needs, and the reductions that turn per-rank figures into the job's.

``torchrun --nproc_per_node=N -m dbf_ext train ...`` starts ``N`` processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address in their environment;
:func:`init_distributed` joins them into one process group (NCCL when every rank has its own
GPU, gloo otherwise). Without that environment (or with ``WORLD_SIZE=1``) it returns a
single-process context, and training runs exactly as it does without torchrun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.cache import CacheStats
from dbf_ext.train.config import resolve_device

Item = TypeVar("Item")


class RankMismatchError(RuntimeError):
    """Ranks that must agree (the freeze decision, the weights after an epoch, the resumed
    epoch) do not; raised on every rank, naming each rank's value."""


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job (a single process: rank 0 of 1).

    Attributes:
        rank, world_size: this process's rank and the number of processes.
        local_rank: its rank on its machine (which GPU it drives).
        device: the device it trains on.
        owns_group: whether :func:`init_distributed` created the process group (and
            :meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the log, the checkpoint and the plot."""
        return self.rank == 0

    def close(self) -> None:
        """Destroys the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives (no-ops in a single process) ----

    def all_gather(self, value: Item) -> list[Item]:
        """Every rank's ``value`` (any picklable object), in rank order."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def check_same(self, value: Any, what: str) -> None:
        """Raises :class:`RankMismatchError` on every rank unless all ranks pass equal
        ``value``; ``what`` names it in the message. Also a barrier."""
        values = self.all_gather(value)
        if any(v != values[0] for v in values[1:]):
            listed = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
            raise RankMismatchError(f"ranks disagree on {what} ({listed})")

    def check_same_weights(self, module: nn.Module, what: str) -> None:
        """:meth:`check_same` of :func:`weights_digest` (skipped in a single process)."""
        if self.is_distributed:
            self.check_same(weights_digest(module), what)

    def broadcast_buffers(self, module: nn.Module, skip: nn.Module | None = None) -> None:
        """Copies rank 0's floating-point buffers (BatchNorm running statistics) of ``module``
        to every rank, except those of ``skip`` (a frozen trunk: unchanged on every rank, and
        an in-place write would make its feature cache think its weights changed)."""
        if not self.is_distributed:
            return
        skipped = {id(b) for b in skip.buffers()} if skip is not None else set()
        for buffer in module.buffers():
            if buffer.is_floating_point() and id(buffer) not in skipped:
                dist.broadcast(buffer, src=0)

    # ---- sharded evaluation ----

    def shard_batches(self, count: int, batch_size: int, rank: int | None = None) -> list[range]:
        """The batches of ``range(count)`` (consecutive, ``batch_size`` each, the last maybe
        shorter) that ``rank`` (default: this one) evaluates: batches ``rank``,
        ``rank + world_size``, ... Every index once on one rank; each batch is the one a
        single process forms, so detections are computed exactly as there."""
        rank = self.rank if rank is None else rank
        starts = range(rank * batch_size, count, self.world_size * batch_size)
        return [range(start, min(start + batch_size, count)) for start in starts]

    def gather_sharded(self, items: Sequence[Item], count: int, batch_size: int) -> list[Item]:
        """One item per index of ``range(count)``, in index order, from each rank's ``items``
        (one per index of its :meth:`shard_batches`, in that order)."""
        if not self.is_distributed:
            return list(items)
        by_index: list[Any] = [None] * count
        for rank, part in enumerate(self.all_gather(list(items))):
            indices = [i for batch in self.shard_batches(count, batch_size, rank) for i in batch]
            if len(indices) != len(part):
                raise RankMismatchError(f"rank {rank} returned {len(part)} results for its "
                                        f"{len(indices)} samples")
            for index, item in zip(indices, part):
                by_index[index] = item
        return by_index

    # ---- per-rank resources ----

    def rank_folder(self, folder: str | os.PathLike | None) -> Path | None:
        """``folder/rank<R>`` in a distributed run (each rank's disk cache apart), else ``folder``."""
        if folder is None or not self.is_distributed:
            return Path(folder) if folder is not None else None
        return Path(folder) / f"rank{self.rank}"

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The seed of the detector's random draws (proposal sampling) in ``epoch``: rank 0's
        is a single process's, the other ranks' differ by ``rank * 2**32``."""
        return seed * 1000 + epoch + (self.rank << 32)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Joins the process group torchrun describes in the environment, or returns a
    single-process context on ``resolve_device(device)`` when there is none.

    ``device`` in a distributed run: ``"auto"`` (a GPU per local rank when CUDA is usable, else
    the CPU), ``"cuda"`` (``cuda:LOCAL_RANK``; there must be a GPU per local rank), ``"cpu"``,
    or ``"cuda:N"``: every local rank on GPU ``N`` (a smoke test on a one-GPU machine; gloo,
    since NCCL refuses two ranks on one GPU). NCCL is the backend when every rank has its own
    GPU, gloo otherwise. A process group the caller initialised already is used as it is.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and world_size <= 1:
        return DistributedContext(device=resolve_device(device))
    if initialised:
        world_size = dist.get_world_size()
    rank = dist.get_rank() if initialised else int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _rank_device(device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not initialised:
        shared_gpu = target.type == "cuda" and device.startswith("cuda:")
        backend = "nccl" if target.type == "cuda" and not shared_gpu else "gloo"
        dist.init_process_group(backend, device_id=target if backend == "nccl" else None)
    return DistributedContext(rank, world_size, local_rank, target, owns_group=not initialised)


def _rank_device(name: str, local_rank: int, local_world_size: int) -> torch.device:
    if name.startswith("cuda:"):
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        resolve_device(name)  # raises the one-line error of a bad name
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < local_world_size:
        raise ValueError(f"--device {name}: {local_world_size} processes on this machine need a GPU "
                         f"each, found {count} (start fewer with --nproc_per_node, use --device cpu, "
                         "or --device cuda:0 to share one GPU for a smoke test)")
    return torch.device("cuda", local_rank)


def wrap_model(model: nn.Module, context: DistributedContext, sync_batchnorm: bool = False) -> nn.Module:
    """``model`` in a single process; a ``DistributedDataParallel`` around it in a
    distributed run (``model`` on ``context.device`` already).

    The DDP is what dynamic backbone freezing needs (:mod:`dbf_ext.freeze.controller`):
    ``find_unused_parameters=True`` (frozen trunk parameters get no gradient), no static
    graph, built before the first freeze. Buffers are not broadcast at every forward, since
    that in-place write would make a frozen trunk's feature cache see changed weights at every
    step; :meth:`DistributedContext.broadcast_buffers` copies rank 0's after each epoch instead.
    ``sync_batchnorm`` converts BatchNorm layers to ``SyncBatchNorm`` (GPUs only: torch's
    SyncBatchNorm has no CPU implementation), which matters only while the trunk trains: a
    frozen trunk runs its norms in eval mode.
    """
    if not context.is_distributed:
        return model
    if sync_batchnorm:
        if context.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
                             "drop it on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    # torch >= 2.13 names the forward-time buffer broadcast forward_sync_buffers; older
    # versions only know broadcast_buffers (which also kept buffers out of the initial sync).
    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True,
                                   **no_forward_sync)


def weights_digest(module: nn.Module) -> str:
    """A digest of ``module``'s parameters and buffers (names, shapes, dtypes and bytes; not
    their device, which differs between ranks): equal on two ranks iff they hold the same
    weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        digest.update(repr((name, tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def reduce_epoch(context: DistributedContext, loss_sums: dict[str, float], images: int,
                 seconds: float, cache_counts: tuple[int, int, int] | None) -> dict[str, Any]:
    """The job's figures of an epoch from every rank's.

    Args:
        loss_sums: this rank's loss terms summed over its images (each batch's mean times
            its images).
        images: images this rank trained on.
        seconds: this rank's epoch time.
        cache_counts: ``(hits, lookups, bytes in use)`` of this rank's cache in the epoch
            (bytes at its end), or ``None`` without a cache.

    Returns:
        ``losses`` (mean per image over all ranks' images), ``images`` (all ranks'),
        ``seconds`` (the slowest rank's) and, with a cache, ``cache_hit_rate`` (all hits over
        all lookups), ``cache_hit_rate_per_rank`` and ``cache_bytes`` (all ranks').
    """
    ranks = context.all_gather((loss_sums, images, seconds, cache_counts))
    total_images = sum(n for _, n, _, _ in ranks)
    reduced: dict[str, Any] = {
        "losses": {name: sum(part[name] for part, *_ in ranks) / total_images for name in loss_sums},
        "images": total_images,
        "seconds": max(s for _, _, s, _ in ranks),
    }
    if cache_counts is not None:
        hits, lookups = (sum(c[i] for *_, c in ranks) for i in (0, 1))
        reduced["cache_hit_rate"] = hits / lookups if lookups else 0.0
        reduced["cache_hit_rate_per_rank"] = [c[0] / c[1] if c[1] else 0.0 for *_, c in ranks]
        reduced["cache_bytes"] = sum(c[2] for *_, c in ranks)
    return reduced


# The counters of CacheStats: they add up over ranks (rates are recomputed from the sums).
_SUMMED_STATS = tuple(field.name for field in dataclasses.fields(CacheStats))


def reduce_cache_stats(context: DistributedContext, stats: dict[str, Any]) -> dict[str, Any]:
    """The job's :class:`~dbf_ext.cache.CacheStats` fields (as a dict): every counter summed
    over ranks. Checkpoints keep this sum, and on resume rank 0 alone starts from it, so the
    job's totals stay exact even with another number of ranks."""
    ranks = context.all_gather(stats)
    return {name: sum(s[name] for s in ranks) for name in _SUMMED_STATS}


def reduce_cache_summary(context: DistributedContext, summary: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`FeatureCache.summary` of the whole job: counters, entries and bytes summed
    over ranks, the hit rate and bytes per sample recomputed from the sums, each rank's hit
    rate under ``"hit_rate_per_rank"``."""
    if not context.is_distributed:
        return summary
    ranks = context.all_gather(summary)
    reduced = {**summary, **{name: sum(s[name] for s in ranks) for name in _SUMMED_STATS}}
    for field in ("entries", "bytes"):
        reduced[field] = {tier: sum(s[field][tier] for s in ranks) for tier in summary[field]}
    lookups = reduced["hits"] + reduced["misses"]
    entries = sum(reduced["entries"].values())
    reduced["hit_rate"] = reduced["hits"] / lookups if lookups else 0.0
    reduced["bytes_per_sample"] = sum(reduced["bytes"].values()) / entries if entries else 0.0
    samples = reduced["backbone_samples"]
    reduced["seconds_saved_estimate"] = (reduced["hits"] * reduced["backbone_seconds"] / samples
                                         if samples else 0.0)
    reduced["hit_rate_per_rank"] = [s["hit_rate"] for s in ranks]
    reduced["ranks"] = context.world_size
    return reduced


def dynamic_rcnn_state(context: DistributedContext, controller: DynamicRCNNController) -> dict[str, Any]:
    """The controller's checkpoint state: its ``state_dict`` (thresholds and step count are the
    same on every rank) with, in a distributed run, every rank's statistics since the last
    update under ``"rank_histories"`` (``[(iou_history, beta_history), ...]`` in rank order)."""
    state = controller.state_dict()
    if context.is_distributed:
        state["rank_histories"] = context.all_gather((state["iou_history"], state["beta_history"]))
    return state


def load_dynamic_rcnn_state(context: DistributedContext, controller: DynamicRCNNController,
                            state: dict[str, Any]) -> None:
    """Resumes the controller from :func:`dynamic_rcnn_state`'s output. Each rank takes back
    its own statistics when the checkpoint has one entry per rank of this run (so the next
    update gathers exactly what it would have without the interruption); otherwise rank 0
    takes all of them, in rank order, and the other ranks start empty (the next update sees the
    same values)."""
    controller.load_state_dict(state)
    histories = state.get("rank_histories") or [(state["iou_history"], state["beta_history"])]
    if len(histories) == context.world_size:
        iou, beta = histories[context.rank]
    elif context.is_main:
        iou = [v for rank_iou, _ in histories for v in rank_iou]
        beta = [v for _, rank_beta in histories for v in rank_beta]
    else:
        iou, beta = [], []
    controller.iou_history = [float(v) for v in iou]
    controller.beta_history = [float(v) for v in beta]


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun job (or not part of one): the one that
    prints summaries and writes plots. Reads the environment, so it also answers after the
    process group is gone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def scaled_learning_rate(lr: float, base_batch: int | None, total_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``lr`` is meant for a total batch of
    ``base_batch`` images; a total batch of ``total_batch`` takes ``lr * total_batch /
    base_batch``. ``base_batch=None``: ``lr`` is already the total batch's."""
    return lr if base_batch is None else lr * total_batch / base_batch

