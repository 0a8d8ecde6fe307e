"""SmoothL1 loss whose beta is scheduled (Dynamic R-CNN)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController

_REDUCTIONS = ("none", "mean", "sum")


class DynamicSmoothL1Loss(nn.Module):
    """SmoothL1 (Huber-like) loss with a beta that can change during training.

    ``loss = 0.5 x^2 / beta`` for ``|x| < beta``, else ``|x| - 0.5 beta``, elementwise on
    ``x = input - target``; ``beta = 0`` is the L1 loss. With a ``controller`` the beta is the
    controller's current ``beta`` (Dynamic R-CNN lowers it as the regression targets shrink);
    otherwise it is the ``beta`` attribute, which may be set at any time.

    Args:
        beta: initial beta (``>= 0``); ignored when ``controller`` is given.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        loss_weight: factor on the result (mmdetection's ``loss_weight``).
        controller: a :class:`~dbf_ext.assign.DynamicRCNNController` providing beta.
    """

    def __init__(
        self,
        beta: float = 1.0,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        controller: DynamicRCNNController | None = None,
    ):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.controller = controller
        self.beta = beta
        self.reduction = reduction
        self.loss_weight = float(loss_weight)

    @property
    def beta(self) -> float:
        return self.controller.beta if self.controller is not None else self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        value = float(value)
        if not value >= 0:
            raise ValueError(f"beta must be >= 0, got {value}")
        self._beta = value

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | None = None,
    ) -> Tensor:
        """Loss of ``input`` against ``target`` (same shape).

        Args:
            weight: optional elementwise weights (broadcast to ``input``).
            avg_factor: with ``reduction="mean"``, divide the sum by this instead of the number
                of elements (torchvision's Fast R-CNN loss divides by the number of sampled
                boxes; mmdetection by the number of positives).
        """
        if target.numel() == 0:  # no positives: a zero that keeps the graph
            return input.sum() * 0
        loss = F.smooth_l1_loss(input, target, reduction="none", beta=self.beta)
        if weight is not None:
            loss = loss * weight
        if self.reduction == "sum":
            loss = loss.sum()
        elif self.reduction == "mean":
            loss = loss.mean() if avg_factor is None else loss.sum() / avg_factor
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        source = "controller" if self.controller is not None else "fixed"
        return (
            f"beta={self.beta} ({source}), reduction={self.reduction}, "
            f"loss_weight={self.loss_weight}"
        )


def fast_rcnn_losses(
    class_logits: Tensor,
    positive_regression: Tensor,
    labels: Tensor,
    positive_targets: Tensor,
    box_loss: DynamicSmoothL1Loss,
) -> dict[str, Tensor]:
    """The losses of a two-stage detector's box head on its sampled RoIs (torchvision's
    ``fastrcnn_loss`` with a scheduled SmoothL1; mmdetection's ``BBoxHead.loss`` likewise).

    Args:
        class_logits: ``(S, num_classes + 1)`` logits of the ``S`` sampled RoIs.
        positive_regression: ``(P, D)`` predicted deltas of the positives (of their class).
        labels: ``(S,)`` int64 class of each sampled RoI, ``0`` background.
        positive_targets: ``(P, D)`` regression targets of the positives.
        box_loss: the SmoothL1 (``reduction="mean"``), fixed or following a controller.

    Returns:
        ``{"loss_classifier": cross entropy averaged over the sampled RoIs, "loss_box_reg":
        SmoothL1 summed over the positives' deltas and divided by the sampled RoIs}``.
    """
    return {
        "loss_classifier": F.cross_entropy(class_logits, labels),
        "loss_box_reg": box_loss(positive_regression, positive_targets, avg_factor=max(labels.numel(), 1)),
    }
