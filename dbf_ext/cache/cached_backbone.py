"""A frozen backbone whose outputs are served from a :class:`FeatureCache`."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from dbf_ext import _ext
from dbf_ext.cache.data import PlaceholderMiss
from dbf_ext.cache.store import CacheKey, FeatureCache
from dbf_ext.freeze.frozen_backbone import (
    AttributeFallThrough,
    nest_wrapped_keys,
    unnest_wrapped_keys,
)


def weights_fingerprint(module: nn.Module) -> Hashable:
    """A digest of what ``module`` computes with: its structure and the content of every
    parameter and buffer.

    Structure: each submodule's name, type and ``extra_repr()`` (hyperparameters such as a
    BatchNorm's ``eps``), and each tensor's name, shape, dtype and device. Content: the bytes of
    every tensor, so changes that bypass version counters (``p.data.add_()``, writes through
    ``.numpy()``) are seen. Reads every tensor once (copied to the host): cost of the order of
    hashing the model's size in bytes, which is why :class:`CachedBackbone` computes it once per
    change of the cheap :func:`_version_counters` and at every epoch start, not per batch.
    """
    digest = hashlib.blake2b(digest_size=20)
    for name, submodule in module.named_modules():
        digest.update(repr((name, type(submodule).__qualname__, submodule.extra_repr())).encode())
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(repr((name, tuple(tensor.shape), tensor.dtype, tensor.device)).encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _version_counters(module: nn.Module) -> Hashable:
    """Changes whenever a parameter or buffer of ``module`` is replaced or written in place
    through autograd-visible operations (optimizer steps, ``load_state_dict``'s ``copy_``,
    running-statistics updates bump a tensor's version counter; a replaced tensor has another
    storage). Cheap enough for every call; blind to writes through ``.data`` or ``.numpy()``."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return hash(tuple((t.data_ptr(), t._version) for t in tensors))


class CachedBackbone(AttributeFallThrough, nn.Module):
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
    nothing. Rows the keys mark as placeholders (:class:`~dbf_ext.cache.BatchKeys`) are never
    computed on: a placeholder that is not served, or any placeholder while the backbone
    trains, raises :class:`~dbf_ext.cache.PlaceholderMiss` before anything is computed.

    Validity: a stored entry is reused only for the same key, the same batch input size
    ``(C, H, W)``, the same size of the image itself inside it (:meth:`watch_input_sizes`) and
    the same weights: the backbone's ``weights_version`` and its parameters' version counters
    are checked at every call, and :func:`weights_fingerprint` (content and structure) whenever
    those change and at every :meth:`FeatureCache.keys_snapshot` (epoch start).

    Exactness: with the ``float32`` store a hit is bit-identical to the features computed when
    it was stored (a frozen backbone treats each sample independently: normalisation in eval
    mode). A backbone's result for a sample can depend on the batch size it runs at by a few
    ULP (convolution algorithms are chosen per shape), so a hit equals recomputation when it
    was computed at the same batch size. Outputs of any memory layout are stored (the pack
    kernel reads them through their strides: channels-last, or NCHW views of a transformer's
    NHWC tensors); hits come back as contiguous NCHW tensors with the same values.

    On a GPU, host and disk hits are copied on a side stream while the misses are computed.
    """

    def __init__(self, backbone: nn.Module, cache: FeatureCache):
        super().__init__()
        self.backbone = backbone
        self.cache = cache
        self._keys: Sequence[CacheKey | None] | None = None
        self._image_sizes: list[tuple[int, int]] | None = None  # of the next call, when watched
        self._batch_image_sizes: list[tuple[int, int]] | None = None  # set by batch_keys
        self._content_checked_for: Hashable = None  # the counters the content digest belongs to
        self._content_fingerprint: Hashable = None
        cache.bind_weights(self.serving_weights)
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending_timings: list[tuple[Any, Any, int]] = []
        # The state dict has the wrapped backbone's own keys (no extra level), so checkpoints
        # load into the model without the cache, and back.
        self.register_load_state_dict_pre_hook(
            lambda module, state_dict, prefix, *_: nest_wrapped_keys(state_dict, prefix))
        self.register_state_dict_post_hook(unnest_wrapped_keys)

    @property
    def frozen(self) -> bool:
        return bool(getattr(self.backbone, "frozen", False))

    def weights_version(self, verify_content: bool = False) -> Hashable:
        """Identifies the backbone's weights: its ``weights_version``, its tensors' version
        counters and their content digest (:func:`weights_fingerprint`), recomputed when the
        first two change or when ``verify_content`` is set."""
        counters = (getattr(self.backbone, "weights_version", None), _version_counters(self.backbone))
        if verify_content or counters != self._content_checked_for:
            self._content_fingerprint = weights_fingerprint(self.backbone)
            self._content_checked_for = counters
        return (*counters, self._content_fingerprint)

    def serving_weights(self, verify_content: bool = False) -> Hashable | None:
        """The weights version entries may be served for; ``None`` while the backbone trains
        (its weights change at every step). What :meth:`FeatureCache.keys_snapshot` asks."""
        return self.weights_version(verify_content) if self.frozen else None

    def watch_input_sizes(self, transform: nn.Module) -> RemovableHandle:
        """Keys entries on each image's own size, read from ``transform``'s output.

        ``transform`` is the module that resizes and pads the images before the backbone, e.g.
        torchvision's ``model.transform`` (a ``GeneralizedRCNNTransform`` returning an
        ``ImageList`` with ``image_sizes``). Needed with multi-scale training, or batches of
        images of several sizes: without it each image is taken to fill the padded batch.
        """
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            image_list = output[0] if isinstance(output, tuple) else output
            self._image_sizes = [tuple(int(s) for s in size) for size in image_list.image_sizes]

        return transform.register_forward_hook(record)

    @contextlib.contextmanager
    def batch_keys(self, keys: Sequence[CacheKey | None] | None,
                   image_sizes: Sequence[tuple[int, int]] | None = None) -> Iterator[None]:
        """Uses ``keys`` for the forward calls inside the block, and ``image_sizes`` (each
        image's own ``(H, W)`` inside the padded batch, see :meth:`watch_input_sizes`) unless
        a watched transform records them."""
        previous = self._keys, self._batch_image_sizes
        self._keys = keys
        self._batch_image_sizes = None if image_sizes is None else [
            tuple(int(s) for s in size) for size in image_sizes]
        try:
            yield
        finally:
            self._keys, self._batch_image_sizes = previous

    def forward(self, images: Tensor, keys: Sequence[CacheKey | None] | None = None) -> Any:
        """Features of ``images`` ``(B, C, H, W)`` in the backbone's output structure, e.g.
        ``{"0": (B, C0, H/4, W/4), ...}``; hits served from the cache (see the class)."""
        keys = keys if keys is not None else self._keys
        image_sizes, self._image_sizes = self._image_sizes, None  # belong to this call only
        if image_sizes is None:
            image_sizes = self._batch_image_sizes
        if keys is None:
            return self.backbone(images)
        if len(keys) != images.shape[0]:
            raise ValueError(f"got {len(keys)} cache keys for a batch of {images.shape[0]} images")
        placeholders = set(getattr(keys, "undecoded", ()))
        if not self.frozen:
            if placeholders:  # a training backbone must never see one
                raise PlaceholderMiss(placeholders)
            return self.backbone(images)
        self._resolve_timings()
        self.cache.bind_weights(self.serving_weights)
        self.cache.use_weights_version(self.weights_version())
        input_size = tuple(images.shape[1:])
        found = self.cache.lookup(keys, input_size, image_sizes)
        candidates = [i for i, f in enumerate(found) if f]
        pending, hits = None, []
        if candidates:
            stream = self._copy_stream(images.device)
            pending = self.cache.start_load([keys[i] for i in candidates], images.device, stream)
            hits = [candidates[j] for j in pending.loaded]  # a damaged disk entry is a miss
        hit_set = set(hits)
        misses = [i for i in range(len(keys)) if i not in hit_set]
        if placeholders.intersection(misses):  # checked before anything is computed or counted
            raise PlaceholderMiss(placeholders.intersection(misses))
        self.cache.stats.misses += len(misses)
        computed = structure = None
        if misses:
            computed, structure = self._compute_and_store(images, misses, keys, input_size,
                                                          image_sizes)
        if not hits:
            return pytree.tree_unflatten(computed, structure)
        loaded, loaded_structure = self.cache.finish_load(pending)
        if not misses:
            return pytree.tree_unflatten(loaded, loaded_structure)
        if loaded_structure != structure:
            raise RuntimeError("cached features have another structure than the backbone's output")
        index_hits = _ext.host_values_to(images.device, hits, torch.int64)
        index_misses = _ext.host_values_to(images.device, misses, torch.int64)
        merged = []
        for fresh, cached in zip(computed, loaded):
            out = fresh.new_empty((len(keys), *fresh.shape[1:]))
            out.index_copy_(0, index_misses, fresh)
            out.index_copy_(0, index_hits, cached)
            merged.append(out)
        return pytree.tree_unflatten(merged, structure)

    def _compute_and_store(self, images: Tensor, misses: list[int], keys, input_size, image_sizes):
        batch = images if len(misses) == images.shape[0] else images[misses]
        timing = self._start_timing(images.device)
        output = self.backbone(batch)
        self._stop_timing(timing, len(misses))
        leaves, structure = pytree.tree_flatten(output)
        if not all(isinstance(leaf, Tensor) for leaf in leaves):
            raise TypeError("CachedBackbone needs a backbone whose outputs are tensors "
                            "(a tensor, or a tuple, list or dict of tensors)")
        sizes = None if image_sizes is None else [image_sizes[i] for i in misses]
        self.cache.store([keys[i] for i in misses], leaves, structure, input_size, sizes)
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
