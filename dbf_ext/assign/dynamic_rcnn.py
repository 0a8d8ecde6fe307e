"""Dynamic R-CNN's schedule of the assignment IoU threshold and the SmoothL1 beta.

Zhang et al., "Dynamic R-CNN: Towards High Quality Object Detection via Dynamic Training"
(ECCV 2020), with mmdetection's ``DynamicRoIHead`` semantics. Training-loop contract, once per
training forward of the RoI head::

    results = batched_max_iou_assign(proposals, gts, labels, **controller.assigner_options(),
                                     return_topk_iou=controller.iou_topk, topk_with_gts=True)
    controller.record_iou([r.kth_largest_overlap for r in results])
    ...  # sample, compute regression targets of the sampled boxes
    controller.record_beta(targets_of_sampled_positives, num_images=len(proposals))
    loss = DynamicSmoothL1Loss(controller=controller)(predictions, targets)
    controller.step()   # every update_iter_interval-th call updates iou_threshold and beta

``dbf_ext.integrations.torchvision.DynamicRoIHeads`` does all of this for torchvision models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dbf_ext._validation import as_integer, check_finite_number

# mmdetection's bound under which the median beta is taken as degenerate (beta left unchanged).
_MIN_BETA = 1e-15


class DynamicRCNNController:
    """Keeps the two statistics of Dynamic R-CNN and updates the threshold and beta from them.

    Statistics, per training iteration:

    * IoU: per image, the ``K``-th largest ``max_overlaps`` of the proposals with the gt boxes
      added as proposals of IoU 1 (``K = min(iou_topk, candidates)``); the mean over the images
      is appended to ``iou_history``.
    * beta: the ``K``-th smallest ``mean(|dx|, |dy|)`` of the normalised regression targets of
      the sampled positives (``K = min(beta_topk * num_images, num_positives)``), appended to
      ``beta_history``; nothing without positives.

    Every ``update_iter_interval`` iterations (:meth:`step` calls):
    ``iou_threshold = max(initial_iou, mean(iou_history))`` becomes the positive, negative and
    minimum-positive IoU of the assigner; ``beta = min(initial_beta, median(beta_history))``
    unless that median is below 1e-15 (beta unchanged); both histories are cleared. An empty
    history leaves its value unchanged (mmdetection would take the mean or median of nothing).

    With ``distributed=True`` and ``torch.distributed`` initialised, the histories of all ranks
    are gathered before each update, so every rank takes the same values from all the data
    (mmdetection updates each rank from its own images). Every rank must call :meth:`step`
    equally often.

    Attributes:
        iou_threshold: current assignment threshold (pos = neg = min_pos IoU).
        beta: current SmoothL1 beta.
        iteration: number of :meth:`step` calls.
        iou_history, beta_history: statistics since the last update.
    """

    def __init__(
        self,
        iou_topk: int = 75,
        beta_topk: int = 10,
        update_iter_interval: int = 100,
        initial_iou: float = 0.4,
        initial_beta: float = 1.0,
        distributed: bool = False,
    ):
        self.iou_topk = as_integer("iou_topk", iou_topk, 1)
        self.beta_topk = as_integer("beta_topk", beta_topk, 1)
        self.update_iter_interval = as_integer("update_iter_interval", update_iter_interval, 1)
        self.initial_iou = check_finite_number("initial_iou", initial_iou)
        self.initial_beta = check_finite_number("initial_beta", initial_beta)
        if self.initial_beta < 0:
            raise ValueError(f"initial_beta must be >= 0, got {self.initial_beta}")
        self.distributed = bool(distributed)
        self.iou_threshold = self.initial_iou
        self.beta = self.initial_beta
        self.iteration = 0
        self.iou_history: list[float] = []
        self.beta_history: list[float] = []

    def assigner_options(self) -> dict[str, float]:
        """The thresholds to pass to :func:`dbf_ext.assign.max_iou_assign` now."""
        return {"pos_iou_thr": self.iou_threshold, "neg_iou_thr": self.iou_threshold,
                "min_pos_iou": self.iou_threshold}

    def record_iou(self, kth_largest: Tensor | Sequence[float | Tensor]) -> None:
        """Appends the mean over images of the per-image ``K``-th largest IoU.

        Args:
            kth_largest: one value per image (e.g. ``AssignResult.kth_largest_overlap`` with
                ``return_topk_iou=iou_topk, topk_with_gts=True``); NaN marks an image without
                any candidate and is left out. Nothing is appended when no value remains.
        """
        values = [v for v in _to_floats(kth_largest) if not math.isnan(v)]
        if values:
            self.iou_history.append(float(np.mean(values)))

    def record_beta(self, positive_targets: Tensor, num_images: int) -> None:
        """Appends the ``K``-th smallest ``mean(|dx|, |dy|)`` of the positives' targets.

        Args:
            positive_targets: ``(P, 4)`` normalised regression targets ``(dx, dy, dw, dh)`` of
                the sampled positive proposals of the iteration (all images).
            num_images: images in the iteration; ``K = min(beta_topk * num_images, P)``.
        """
        if positive_targets.dim() != 2 or positive_targets.shape[1] < 2:
            raise ValueError(
                f"positive_targets must have shape (P, 4), got {tuple(positive_targets.shape)}"
            )
        num_positives = positive_targets.shape[0]
        if num_positives == 0:
            return
        k = min(self.beta_topk * as_integer("num_images", num_images, 1), num_positives)
        centre_offsets = positive_targets.detach()[:, :2].abs().mean(dim=1)
        self.beta_history.append(float(torch.kthvalue(centre_offsets, k).values))

    def step(self) -> bool:
        """Ends a training iteration; True when it updated ``iou_threshold`` and ``beta``."""
        self.iteration += 1
        if self.iteration % self.update_iter_interval != 0:
            return False
        self.update()
        return True

    def update(self) -> None:
        """Updates ``iou_threshold`` and ``beta`` from the histories (all ranks' when distributed)
        and clears them. Called by :meth:`step`; public for schedules of one's own."""
        iou_history, beta_history = self.iou_history, self.beta_history
        if self.distributed and dist.is_available() and dist.is_initialized():
            iou_history = _all_gather_floats(iou_history)
            beta_history = _all_gather_floats(beta_history)
        if iou_history:
            self.iou_threshold = max(self.initial_iou, float(np.mean(iou_history)))
        if beta_history:
            median = float(np.median(beta_history))
            if median >= _MIN_BETA:
                self.beta = min(self.initial_beta, median)
        self.iou_history = []
        self.beta_history = []

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides future updates (plain Python values, checkpoint-safe)."""
        return {
            "iou_threshold": self.iou_threshold,
            "beta": self.beta,
            "iteration": self.iteration,
            "iou_history": list(self.iou_history),
            "beta_history": list(self.beta_history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iou_threshold = float(state["iou_threshold"])
        self.beta = float(state["beta"])
        self.iteration = int(state["iteration"])
        self.iou_history = [float(v) for v in state["iou_history"]]
        self.beta_history = [float(v) for v in state["beta_history"]]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(iou_threshold={self.iou_threshold:.4f}, beta={self.beta:.4f}, "
            f"iteration={self.iteration}, iou_topk={self.iou_topk}, beta_topk={self.beta_topk}, "
            f"update_iter_interval={self.update_iter_interval})"
        )


def _to_floats(values: Tensor | Sequence[float | Tensor]) -> list[float]:
    """Python floats, with one host synchronisation for tensors on a GPU."""
    if isinstance(values, Tensor):
        return values.detach().reshape(-1).double().cpu().tolist()
    if any(isinstance(v, Tensor) for v in values):
        stacked = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in values])
        return stacked.double().cpu().tolist()
    return [float(v) for v in values]


def _all_gather_floats(values: list[float]) -> list[float]:
    """The values of every rank, in rank order (ranks may hold different numbers of values)."""
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    world = dist.get_world_size()
    count = torch.tensor([len(values)], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    if max(counts) == 0:
        return []
    padded = torch.zeros(max(counts), dtype=torch.float64, device=device)
    padded[: len(values)] = torch.tensor(values, dtype=torch.float64)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [v for part, n in zip(gathered, counts) for v in part[:n].tolist()]
