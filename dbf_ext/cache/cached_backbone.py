"""A frozen backbone whose outputs are served from a :class:`FeatureCache`."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from dbf_ext.cache.store import CacheKey, FeatureCache
from dbf_ext.freeze.frozen_backbone import nest_wrapped_keys


def weights_fingerprint(module: nn.Module) -> Hashable:
    """Changes whenever a parameter or buffer of ``module`` is replaced or modified in place.

    Every in-place write to a tensor (optimizer steps, ``load_state_dict``'s ``copy_``,
    running-statistics updates) bumps its version counter; a replaced tensor changes its
    storage. This catches weight changes that bypass :class:`~dbf_ext.freeze.FrozenBackbone`.
    """
    tensors = itertools.chain(module.parameters(), module.buffers())
    return hash(tuple((t.data_ptr(), t._version) for t in tensors))


class CachedBackbone(nn.Module):
    """Serves a frozen backbone's outputs from a feature cache.

    Args:
        backbone: usually a :class:`~dbf_ext.freeze.FrozenBackbone`; any module with a
            ``frozen`` attribute works (a module without one is treated as never frozen).
        cache: where features are kept.

    ``forward(images, keys)``: ``images`` is the backbone's input batch ``(B, C, H, W)``;
    ``keys`` gives one ``(sample_id, aug_key)`` per image (``None`` for a sample that must not
    be cached). Keys can also be set for the next calls with :meth:`batch_keys`, which is how
    a model that calls its backbone internally (torchvision's ``BackboneWithFPN``) is fed.

    While the backbone is frozen, hits are served from the cache (rows of ``images`` for hits
    are not read, so the data loader may leave them undecoded), all misses are computed in one
    backbone call and stored, and the output keeps the backbone's structure (tensor, tuple,
    list or dict). A miss returns the freshly computed features unchanged, in full precision.
    When the backbone is not frozen, or no keys are given, this is a pass-through that stores
    nothing.

    Exactness: a stored entry is reused only for the same key, the same backbone input size
    ``(C, H, W)`` and the same weights (see :func:`weights_fingerprint` and the backbone's
    ``weights_version``). With the ``float32`` store, a hit is bit-identical to recomputation
    when the backbone treats each sample independently (normalisation in eval mode, as a
    frozen backbone is) and the batch's images share one size, as aerial tiles do: padding to
    a larger batch size would change the input.

    On a GPU, host and disk hits are copied on a side stream while the misses are computed.
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache):
        super().__init__()
        self.backbone = backbone
        self.cache = cache
        self._keys: Sequence[CacheKey | None] | None = None
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending_timings: list[tuple[Any, Any, int]] = []
        self.register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *_: nest_wrapped_keys(state_dict, prefix))

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped backbone's state dict with its own keys (no extra level), so checkpoints
        load into the model without the cache, and back."""
        return self.backbone.state_dict(*args, **kwargs)

    @property
    def frozen(self) -> bool:
        return bool(getattr(self.backbone, "frozen", False))

    def weights_version(self) -> Hashable:
        return (getattr(self.backbone, "weights_version", None), weights_fingerprint(self.backbone))

    @contextlib.contextmanager
    def batch_keys(self, keys: Sequence[CacheKey | None] | None) -> Iterator[None]:
        """Uses ``keys`` for the forward calls inside the block."""
        previous, self._keys = self._keys, keys
        try:
            yield
        finally:
            self._keys = previous

    def forward(self, images: Tensor, keys: Sequence[CacheKey | None] | None = None) -> Any:
        keys = keys if keys is not None else self._keys
        if not self.frozen or keys is None:
            return self.backbone(images)
        if len(keys) != images.shape[0]:
            raise ValueError(f"got {len(keys)} cache keys for a batch of {images.shape[0]} images")
        self._resolve_timings()
        self.cache.use_weights_version(self.weights_version())
        input_size = tuple(images.shape[1:])
        found = self.cache.lookup(keys, input_size)
        hits = [i for i, f in enumerate(found) if f]
        pending = None
        if hits:
            stream = self._copy_stream(images.device)
            pending = self.cache.start_load([keys[i] for i in hits], images.device, stream)
            if pending is None:  # a disk entry failed verification: recompute those samples
                hits = []
        hit_set = set(hits)
        misses = [i for i in range(len(keys)) if i not in hit_set]
        self.cache.stats.misses += len(misses)
        computed = structure = None
        if misses:
            computed, structure = self._compute_and_store(images, misses, keys, input_size)
        if not hits:
            return pytree.tree_unflatten(computed, structure)
        loaded, loaded_structure = self.cache.finish_load(pending)
        if not misses:
            return pytree.tree_unflatten(loaded, loaded_structure)
        if loaded_structure != structure:
            raise RuntimeError("cached features have another structure than the backbone's output")
        index_hits = torch.tensor(hits, device=images.device)
        index_misses = torch.tensor(misses, device=images.device)
        merged = []
        for fresh, cached in zip(computed, loaded):
            out = fresh.new_empty((len(keys), *fresh.shape[1:]))
            out.index_copy_(0, index_misses, fresh)
            out.index_copy_(0, index_hits, cached)
            merged.append(out)
        return pytree.tree_unflatten(merged, structure)

    def _compute_and_store(self, images: Tensor, misses: list[int], keys, input_size):
        batch = images if len(misses) == images.shape[0] else images[misses]
        timing = self._start_timing(images.device)
        output = self.backbone(batch)
        self._stop_timing(timing, len(misses))
        leaves, structure = pytree.tree_flatten(output)
        if not all(isinstance(leaf, Tensor) for leaf in leaves):
            raise TypeError("CachedBackbone needs a backbone whose outputs are tensors "
                            "(a tensor, or a tuple, list or dict of tensors)")
        self.cache.store([keys[i] for i in misses], leaves, structure, input_size)
        return leaves, structure

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._copy_streams:
            self._copy_streams[device] = torch.cuda.Stream(device)
        return self._copy_streams[device]

    # Backbone time per sample, measured on misses without synchronising: CUDA events are read
    # at a later call, once they have completed.
    def _start_timing(self, device: torch.device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _stop_timing(self, start, samples: int) -> None:
        if isinstance(start, float):
            self.cache.stats.backbone_seconds += time.perf_counter() - start
            self.cache.stats.backbone_samples += samples
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending_timings.append((start, end, samples))

    def _resolve_timings(self) -> None:
        still_pending = []
        for start, end, samples in self._pending_timings:
            if end.query():
                self.cache.stats.backbone_seconds += start.elapsed_time(end) / 1e3
                self.cache.stats.backbone_samples += samples
            else:
                still_pending.append((start, end, samples))
        self._pending_timings = still_pending
