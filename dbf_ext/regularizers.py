"""Regularisers added to the detection loss.

:class:`FeatureEnhancement` follows the idea of "Feature Enhancement for Object Detectors"
(2024): train the early backbone stages towards small, edge-like responses and the late stages
towards smooth, large-scale ones, by adding to the detection loss an L2 penalty on the late
stages' weights minus a variance term on the early stages' weights.

The paper's exact definition and coefficients are not public (we searched for them and found
neither the paper's text nor code), so the definition below is ours, stated exactly, and the
defaults are chosen so that the term is a small fraction of the detection loss at
initialisation (measured on ``tiny-fpn``; see :data:`DEFAULT_L2_WEIGHT`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, PatchMergingV2

__all__ = ["DEFAULT_L2_WEIGHT", "DEFAULT_VARIANCE_WEIGHT", "FeatureEnhancement", "default_stages"]

# On tiny-fpn (4 classes, 192 px synthetic tiles, random initialisation) the
# late stage's L2 is 64.1 and the detection loss 2.48: 1e-4 makes the whole term 0.0037, 0.15 %
# of the loss. Its gradient, 2e-4 * w, is twice the trainer's default weight decay (1e-4): the
# late stages' weights decay three times as fast as the rest. (The L2 is a sum, so it grows
# with the late stages' size: 6144 on resnet18-fpn-lite and 36865 on resnet50-fpn at random
# initialisation, a term of 0.61 and 3.7 against detection losses of 2.6 and 3.7; the
# gradient per weight is the same.)
DEFAULT_L2_WEIGHT = 1e-4
# The variance part pushes an early weight by 2 * variance_weight * (w - filter mean) /
# (filter size * number of filters); on tiny-fpn's 49k early weights that is at most
# 4e-5 * (w - mean), below the trainer's weight decay (1e-4 * w), so weight decay still bounds
# the early weights (a variance term that outgrew it would let them grow without limit).
DEFAULT_VARIANCE_WEIGHT = 1.0


def _is_swin_features(module: nn.Module) -> bool:
    """torchvision's SwinTransformer.features: patch embedding, then 4 stages with patch
    merging between them (8 children)."""
    children = list(module.children())
    return (isinstance(module, nn.Sequential) and len(children) == 8
            and all(isinstance(children[i], (PatchMerging, PatchMergingV2)) for i in (2, 4, 6)))


def default_stages(backbone: nn.Module) -> tuple[list[str], list[str]]:
    """The early and late stages of ``backbone`` (or of the first trunk found inside it), as
    qualified submodule names of ``backbone``.

    * torchvision ResNet (or anything holding one, such as a detector's
      ``backbone.body``): early ``layer1``, ``layer2`` (strides 4, 8), late ``layer3``,
      ``layer4`` (strides 16, 32);
    * torchvision SwinTransformer (or anything holding its ``features``): early
      ``features.1``, ``features.3``, late ``features.5``, ``features.7`` (the same strides);
    * :func:`~dbf_ext.models.tiny_trunk` (``tiny-fpn``'s; ``stem``, ``layer1``, ``layer2``,
      strides 4, 8, 16): early ``stem``, ``layer1``, late ``layer2`` (split by stride as for
      ResNet: up to 8 early, 16 and beyond late).

    Raises ``ValueError`` asking for explicit ``early`` / ``late`` when none is found.
    """
    for name, module in backbone.named_modules():
        prefix = f"{name}." if name else ""
        children = dict(module.named_children())
        if all(f"layer{i}" in children for i in (1, 2, 3, 4)):
            return [prefix + "layer1", prefix + "layer2"], [prefix + "layer3", prefix + "layer4"]
        if _is_swin_features(module):
            return [prefix + "1", prefix + "3"], [prefix + "5", prefix + "7"]
        if set(children) == {"stem", "layer1", "layer2"}:
            return [prefix + "stem", prefix + "layer1"], [prefix + "layer2"]
    raise ValueError(
        f"no ResNet (layer1-layer4), Swin (features) or tiny trunk (stem, layer1, layer2) found "
        f"in {type(backbone).__name__}: pass early=[...] and late=[...] (submodule names)")


def _weights(backbone: nn.Module, names: Sequence[str], role: str) -> list[Tensor]:
    """The conv and linear weight tensors of the named submodules."""
    weights = []
    for name in names:
        try:
            stage = backbone.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{role} stage {name!r} is not a submodule of "
                             f"{type(backbone).__name__}") from None
        weights += [m.weight for m in stage.modules()
                    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if not weights:
        raise ValueError(f"the {role} stages {list(names)} hold no conv or linear weights")
    return weights


class FeatureEnhancement:
    """The feature-enhancement regulariser: ``l2_weight * L2(late) - variance_weight * Var(early)``.

    * ``L2(late)``: the sum of the squares of every weight tensor of the conv layers (any
      ``nn.Conv1d/2d/3d`` and transposed conv) and ``nn.Linear`` layers of the late stages.
      Biases, normalisation parameters (BatchNorm / LayerNorm scale and shift) and Swin's
      relative position bias tables do not count: they shift or scale a response but do not
      shape the kernel, and, as for weight decay in detection training, shrinking them only
      rescales features that the next layer rescales back.
    * ``Var(early)``: the mean, over every filter of the early stages' conv and linear layers,
      of the variance of that filter's weights (population variance, correction 0). A filter
      is one output channel: a conv weight ``(C_out, C_in / groups, kh, kw)`` has ``C_out``
      filters of ``C_in / groups * kh * kw`` weights, a linear weight ``(out, in)`` has ``out``
      filters of ``in`` weights. Filters rather than single 2-D kernels because a 1x1 conv or
      a linear layer (all of a Swin stage, the bottleneck convs of a ResNet) has no spatial
      kernel, and because a filter is what produces a feature channel: a filter with spread
      out positive and negative weights responds to local contrast (edges), a flat one
      averages. All filters weigh equally, whatever layer they are in.

    The paper's exact form of both parts and its coefficients are not public; the defaults
    (:data:`DEFAULT_L2_WEIGHT`, :data:`DEFAULT_VARIANCE_WEIGHT`) are ours, explained where
    they are defined.

    While the backbone is frozen (no selected weight requires grad, as under
    :class:`~dbf_ext.freeze.FrozenBackbone`) a call returns a zero scalar without a graph and
    computes nothing. While any selected weight requires grad, the whole term is computed
    (weights that do not require grad add constants).

    Args:
        backbone: the module holding the stages (a ResNet, a detector, a ``FrozenBackbone``...).
        early, late: submodule names of ``backbone``; default: :func:`default_stages`.
        l2_weight, variance_weight: the coefficients (non-negative).

    Attributes:
        parts: after each call, the unweighted parts as detached scalars:
            ``{"l2": L2(late), "variance": Var(early)}`` (zeros while frozen).
    """

    def __init__(self, backbone: nn.Module, early: Sequence[str] | None = None,
                 late: Sequence[str] | None = None, l2_weight: float = DEFAULT_L2_WEIGHT,
                 variance_weight: float = DEFAULT_VARIANCE_WEIGHT):
        if l2_weight < 0 or variance_weight < 0:
            raise ValueError(f"l2_weight and variance_weight must be >= 0, got {l2_weight}, "
                             f"{variance_weight}")
        if early is None or late is None:
            default_early, default_late = default_stages(backbone)
            early = default_early if early is None else early
            late = default_late if late is None else late
        self.early, self.late = list(early), list(late)
        self.l2_weight, self.variance_weight = float(l2_weight), float(variance_weight)
        self._early_weights = _weights(backbone, self.early, "early")
        self._late_weights = _weights(backbone, self.late, "late")
        self.parts: dict[str, Tensor] = {"l2": self._zero(), "variance": self._zero()}

    def _zero(self) -> Tensor:
        """A 0-d zero of the weights' dtype, on their current device, without a graph."""
        return torch.zeros((), dtype=self._late_weights[0].dtype, device=self._late_weights[0].device)

    @property
    def active(self) -> bool:
        """True when some selected weight requires grad (the backbone trains)."""
        return any(w.requires_grad for w in self._early_weights + self._late_weights)

    def late_l2(self) -> Tensor:
        """``L2(late)``, a scalar with the graph to the late weights."""
        return sum(w.square().sum() for w in self._late_weights)

    def early_variance(self) -> Tensor:
        """``Var(early)``, a scalar: the mean over filters of each filter's weight variance."""
        variances = [w.flatten(1).var(dim=1, correction=0) for w in self._early_weights]  # (C_out,) each
        return torch.cat(variances).mean()

    def __call__(self) -> Tensor:
        """The scalar term (0-d tensor on the weights' device)."""
        if not self.active:
            self.parts = {"l2": self._zero(), "variance": self._zero()}
            return self._zero()
        l2, variance = self.late_l2(), self.early_variance()
        self.parts = {"l2": l2.detach(), "variance": variance.detach()}
        return self.l2_weight * l2 - self.variance_weight * variance

    def __repr__(self) -> str:
        return (f"FeatureEnhancement(early={self.early}, late={self.late}, "
                f"l2_weight={self.l2_weight}, variance_weight={self.variance_weight})")
