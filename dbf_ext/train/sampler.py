"""Cache-affine sampling: each rank of a data-parallel run keeps its shard of the training set
while the backbone is frozen, so its feature cache serves its own samples.

A ``DistributedSampler`` deals the whole data set out afresh every epoch: with ``W`` ranks a
sample lands on the rank that cached it with probability ``1/W``, and a frozen epoch's cache
hit rate falls to about ``1/W`` (12.5 % on 8 GPUs). :class:`CacheAffineSampler` deals shards
once and re-deals them only in epochs in which the backbone trains (the caches are invalid
then anyway) or never; within its shard each rank still sees a new order every epoch.

The trade-off: between re-deals a rank draws its batches from a fixed ``1/W`` of the data set.
A step's total batch is then one batch from each shard (a sample stratified by shard rather
than a uniform one), and every epoch still visits every sample once; the gradient is the
same kind of estimate. What full reshuffling adds is variety in which samples share one
rank's batch, which matters only for computations over a rank's batch: BatchNorm in training
mode (a frozen trunk runs none; ``--sync-bn`` pools it over ranks while the trunk trains) and
losses normalised per batch. With ``"when-trained"`` every epoch in which the trunk trains
deals new shards, so the trunk itself always trains on freshly dealt data.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

RESHARD_POLICIES = ("when-trained", "never")


def seeded_generator(*parts: object) -> torch.Generator:
    """A generator seeded from ``parts`` (ints and strings), the same in every process (Python's
    ``hash`` of strings is salted per process, so it is not used)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class CacheAffineSampler(Sampler[int]):
    """Indices of this rank's shard of a data set, shuffled within the shard every epoch.

    Args:
        dataset_size: samples in the data set (at least ``num_replicas``).
        num_replicas: ranks (default: the world size of the initialised process group, else 1).
        rank: this rank (default: its rank in the process group, else 0).
        seed: seeds the shards and the orders; the same on every rank.
        reshard: ``"when-trained"`` (default) deals new shards in every epoch in which the
            backbone trains; ``"never"`` keeps the first shards for the whole run.
        is_frozen: ``epoch -> bool``, the freezing schedule (e.g. ``FreezeSchedule.is_frozen``);
            ``None`` means the backbone trains in every epoch (with ``"when-trained"`` the
            shards are then re-dealt every epoch, like a ``DistributedSampler``).

    Call :meth:`set_epoch` before every epoch. Which shard an epoch uses is a pure function of
    ``(seed, epoch, schedule)``: the last epoch up to it in which the backbone trains (or the
    run's first deal when there is none, or with ``"never"``), so a resumed run deals the same
    shards without any saved state.

    Uneven sizes: the shards of ``N`` samples differ by at most one sample; every rank yields
    ``ceil(N / num_replicas)`` indices per epoch, a shorter shard repeating its own first
    samples of the epoch's order (already in its cache). Every rank therefore runs the same
    number of steps, which data-parallel training needs (a rank with one step more would wait
    forever in the gradient all-reduce), and a repeated sample is a cache hit, not a miss.
    Evaluation does not use this sampler: it shards by batch without repeats
    (:meth:`~dbf_ext.train.distributed.DistributedContext.shard_batches`).
    """

    def __init__(self, dataset_size: int, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, reshard: str = "when-trained",
                 is_frozen: Callable[[int], bool] | None = None):
        group = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if group else 1)
        rank = rank if rank is not None else (dist.get_rank() if group else 0)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of {num_replicas}")
        if dataset_size < num_replicas:
            raise ValueError(f"a data set of {dataset_size} samples cannot give each of "
                             f"{num_replicas} ranks a sample")
        if reshard not in RESHARD_POLICIES:
            raise ValueError(f"reshard must be one of {RESHARD_POLICIES}, got {reshard!r}")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.reshard = reshard
        self.is_frozen = is_frozen
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shard_epoch(self) -> int | None:
        """The epoch whose deal the current epoch's shards are (``None``: the run's first deal)."""
        if self.reshard == "never":
            return None
        if self.is_frozen is None:
            return self.epoch
        return next((e for e in range(self.epoch, -1, -1) if not self.is_frozen(e)), None)

    def shards(self) -> list[list[int]]:
        """Every rank's shard in the current epoch (unpadded, in dealing order)."""
        order = torch.randperm(self.dataset_size, generator=seeded_generator(
            "shards", self.seed, self.shard_epoch)).tolist()
        bounds = [self.dataset_size * r // self.num_replicas for r in range(self.num_replicas + 1)]
        return [order[bounds[r]:bounds[r + 1]] for r in range(self.num_replicas)]

    def shard(self) -> list[int]:
        """This rank's shard in the current epoch (unpadded, in dealing order)."""
        return self.shards()[self.rank]

    def __len__(self) -> int:
        return math.ceil(self.dataset_size / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        shard = self.shard()
        permutation = torch.randperm(len(shard), generator=seeded_generator(
            "order", self.seed, self.epoch, self.rank)).tolist()
        order = [shard[i] for i in permutation]
        return iter(order + order[: len(self) - len(order)])
