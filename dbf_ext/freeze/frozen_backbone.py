"""``FrozenBackbone``: a backbone that can be frozen and unfrozen between epochs.

Freezing here is stronger than the DBF reference code, which only detaches the backbone output
before the neck. There the backbone still runs forward with autograd (activations kept in
memory), its BatchNorm running statistics keep changing, and an optimizer that sees zero
gradients (``zero_grad(set_to_none=False)``, the mmcv default) still moves the weights through
momentum and weight decay. A frozen ``FrozenBackbone`` instead

* runs its forward under ``torch.no_grad()``: outputs are plain tensors without a graph;
* keeps every submodule in eval mode, even when the model is put in ``train()``: no running
  statistics change (BatchNorm, SyncBatchNorm, any ``_NormBase``; FrozenBatchNorm2d and
  GroupNorm / LayerNorm are unaffected anyway) and no dropout / drop-path noise, so the frozen
  backbone is a fixed, deterministic function of its input (which is what makes its features
  cacheable);
* sets ``requires_grad=False`` and ``.grad = None`` on all its parameters, so optimizers skip
  them entirely (PyTorch optimizers only update parameters whose ``.grad`` is not None).

Unfreezing restores the per-parameter ``requires_grad`` flags and per-module training modes
exactly (a stage the user froze on purpose stays frozen; a norm layer kept in eval mode by a
``train()`` override stays in eval mode).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FrozenBackbone"]


def nest_wrapped_keys(state_dict: dict[str, Any], prefix: str, inner: str = "backbone") -> None:
    """Moves every ``prefix + key`` of ``state_dict`` to ``prefix + inner + "." + key``, in place.

    For wrappers whose state dict hides their own level (this one and
    :class:`dbf_ext.cache.CachedBackbone`): their load pre-hook calls this, so checkpoints of the
    unwrapped model load into the wrapped one and back.
    """
    _move_keys(state_dict, prefix, f"{prefix}{inner}.")


def unnest_wrapped_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                        *unused_hook_args: Any, inner: str = "backbone") -> None:
    """State-dict post-hook of those wrappers: moves every ``prefix + inner + "." + key`` to
    ``prefix + key``, in place, so the saved keys are those of the unwrapped model.

    A hook rather than a ``state_dict()`` override, because checkpoint writers that walk the
    modules themselves (mmcv's and mmengine's ``get_state_dict``) skip overrides but run hooks.
    """
    _move_keys(state_dict, f"{prefix}{inner}.", prefix)


def _move_keys(state_dict: dict[str, Any], old_prefix: str, new_prefix: str) -> None:
    # Pop everything first, then insert: renaming one key at a time could overwrite a key that
    # is itself still waiting to be renamed.
    moved = {
        new_prefix + key[len(old_prefix) :]: state_dict.pop(key)
        for key in [key for key in state_dict if key.startswith(old_prefix)]
    }
    state_dict.update(moved)


def _load_with_unwrapped_keys(
    module: FrozenBackbone, state_dict: dict[str, Any], prefix: str, *unused_hook_args: Any
) -> None:
    """Load-state-dict pre-hook: accept the unwrapped key layout (see ``FrozenBackbone.state_dict``)."""
    nest_wrapped_keys(state_dict, prefix)
    module.mark_weights_changed()


class AttributeFallThrough:
    """Mixin of the backbone wrappers (this one and :class:`dbf_ext.cache.CachedBackbone`): an
    attribute the wrapper does not have is read from its ``backbone`` child, so code that
    reaches into the backbone (``model.backbone.layer4``, a framework's ``init_weights``
    walk) keeps working after wrapping."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Look the wrapped module up without recursing into __getattr__: during unpickling
            # or deepcopy, _modules may not exist yet.
            wrapped = self.__dict__.get("_modules", {}).get("backbone")
            if wrapped is None:
                raise
            return getattr(wrapped, name)


class FrozenBackbone(AttributeFallThrough, nn.Module):
    """Wraps a backbone so it can be frozen (see the module docstring) and unfrozen.

    The wrapped module may return a tensor, or a tuple, list or dict (e.g. the ``OrderedDict``
    of torchvision's ``IntermediateLayerGetter``) of tensors; the structure is passed through
    unchanged. Example shapes for a ResNet-50 body on a ``(B, 3, H, W)`` batch:
    ``{"0": (B, 256, H/4, W/4), ..., "3": (B, 2048, H/32, W/32)}``.

    Checkpoints stay compatible with the unwrapped model: ``state_dict()`` has exactly the keys of
    the wrapped module (no extra ``backbone.`` level), and ``load_state_dict`` accepts them.
    Reading an attribute the wrapper does not have falls through to the wrapped module
    (``model.backbone.body.layer4`` keeps working after wrapping ``model.backbone.body``). Only
    ``named_parameters()`` / ``named_modules()`` show the extra ``backbone.`` level.

    Args:
        backbone: the module to wrap.
        frozen: initial state.
    """

    def __init__(self, backbone: nn.Module, frozen: bool = False):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(backbone, FrozenBackbone):
            raise TypeError("backbone is already a FrozenBackbone")
        self._frozen = False
        self._weights_version = 0
        # Saved by _freeze, given back by _unfreeze; keyed by name (not identity) so that
        # parameters replaced while frozen, e.g. by load_state_dict(assign=True), are covered.
        self._requires_grad_before_freeze: dict[str, bool] = {}
        self._training_before_freeze: dict[str, bool] = {}
        self.backbone = backbone
        self.training = backbone.training
        self.register_load_state_dict_pre_hook(_load_with_unwrapped_keys)
        self.register_state_dict_post_hook(unnest_wrapped_keys)
        self.set_frozen(frozen)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def weights_version(self) -> int:
        """Increasing counter identifying the backbone weights while frozen (for caches).

        It increases on every freeze and unfreeze, on every ``load_state_dict`` that reaches this
        module, and on :meth:`mark_weights_changed`. Features computed while frozen with equal
        ``weights_version`` come from identical weights. While unfrozen the weights change at every
        optimizer step and the value identifies nothing: do not serve cached features then.

        The counter starts at 0 for every wrapper in every process: a cache that outlives the
        process (on disk) must combine it with an identity of the run or checkpoint.
        """
        return self._weights_version

    def mark_weights_changed(self) -> None:
        """Declare that the weights changed outside this wrapper's knowledge (EMA swap, manual copy)."""
        self._weights_version += 1

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (True) or unfreeze (False); a no-op when already in that state."""
        if not isinstance(frozen, bool):
            raise TypeError(f"frozen must be a bool, got {type(frozen).__name__}")
        if frozen == self._frozen:
            return
        if frozen:
            self._freeze()
        else:
            self._unfreeze()
        self.mark_weights_changed()

    def _freeze(self) -> None:
        self._requires_grad_before_freeze = {
            name: param.requires_grad for name, param in self.backbone.named_parameters()
        }
        self._training_before_freeze = self._training_modes()
        for param in self.backbone.parameters():
            param.requires_grad_(False)
            # A zero gradient is not the same as none: SGD momentum, weight decay and Adam still
            # move a parameter whose .grad is a zero tensor. Optimizers skip .grad None.
            param.grad = None
        self.backbone.eval()
        self._frozen = True

    def _unfreeze(self) -> None:
        # Parameters / modules added while frozen have no saved state and keep their current one.
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(self._requires_grad_before_freeze.get(name, param.requires_grad))
        for name, module in self.backbone.named_modules():
            module.training = self._training_before_freeze.get(name, self.training)
        self._requires_grad_before_freeze = {}
        self._training_before_freeze = {}
        self._frozen = False

    def _training_modes(self) -> dict[str, bool]:
        return {name: module.training for name, module in self.backbone.named_modules()}

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Set the training mode; while frozen, the backbone stays in eval mode.

        While frozen the mode the backbone *would* have is recorded (after its own ``train()``
        overrides ran, e.g. mmdet's ``norm_eval``) and given back on unfreeze.
        """
        super().train(mode)
        if self._frozen:
            self._training_before_freeze = self._training_modes()
            self.backbone.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped backbone's forward; without autograd while frozen."""
        if not self._frozen:
            return self.backbone(*args, **kwargs)
        with torch.no_grad():
            return self.backbone(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"frozen={self._frozen}, weights_version={self._weights_version}"
