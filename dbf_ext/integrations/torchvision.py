"""Dynamic R-CNN for torchvision's Faster R-CNN (and the switch for Oriented R-CNN).

:class:`DynamicRoIHeads` is a drop-in :class:`~torchvision.models.detection.roi_heads.RoIHeads`
that, in training, assigns the proposals with :func:`dbf_ext.assign.batched_max_iou_assign`
(mmdetection semantics, thresholds from a :class:`~dbf_ext.assign.DynamicRCNNController`),
records Dynamic R-CNN's statistics, and computes the box regression loss with
:class:`~dbf_ext.assign.DynamicSmoothL1Loss`. Inference is torchvision's, unchanged::

    model = fasterrcnn_resnet50_fpn(weights=...)
    controller = use_dynamic_roi_heads(model)     # same weights, same state_dict keys
    ...                                            # train as usual
    checkpoint = {"model": model.state_dict(), "dynamic_rcnn": controller.state_dict()}

Differences from torchvision's own training path:

* Assignment as mmdetection's ``MaxIoUAssigner`` with ``pos_iou_thr = neg_iou_thr =
  min_pos_iou = controller.iou_threshold`` and ``match_low_quality`` (Dynamic R-CNN's
  configuration): proposals with IoU ``>= iou_threshold`` are positives, the others negatives,
  and each gt also claims the proposals of its highest IoU when that IoU is
  ``>= iou_threshold``. The gt boxes are assigned to themselves after the proposals
  (mmdetection's sampler adds them as proposals after assignment), so they never take the
  low-quality matches away from the real proposals.
  torchvision's ``proposal_matcher`` thresholds are kept but not used in training.
* Box regression loss: SmoothL1 with the controller's beta (``initial_beta = 1`` where
  torchvision uses ``1 / 9``), summed over positives and divided by the number of sampled
  boxes, as torchvision's ``fastrcnn_loss``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.assign.losses import DynamicSmoothL1Loss, fast_rcnn_losses
from dbf_ext.assign.max_iou import assign_proposals_with_gts
from dbf_ext.models.oriented_rcnn import OrientedRCNN
from dbf_ext.models.rotated_roi_heads import RotatedRoIHeads
from dbf_ext.ops.max_iou_assign import MaxIoUAssignOptions

__all__ = ["DynamicRoIHeads", "use_dynamic_roi_heads"]


class DynamicRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with Dynamic R-CNN training (box heads only).

    Takes ``RoIHeads``' arguments, plus:

    Args:
        controller: the :class:`DynamicRCNNController` (a default one when None).
        gt_max_assign_all: MaxIoUAssigner option for the low-quality matches.
        match_low_quality: MaxIoUAssigner option (True in Dynamic R-CNN).

    Attributes:
        assign_options: the :class:`~dbf_ext.assign.MaxIoUAssignOptions` of the latest
            assignment: each one takes the controller's thresholds of the time.

    Mask and keypoint heads are not supported (ValueError).
    """

    def __init__(
        self,
        *args,
        controller: DynamicRCNNController | None = None,
        gt_max_assign_all: bool = True,
        match_low_quality: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.has_mask() or self.has_keypoint():
            raise ValueError("DynamicRoIHeads supports box heads only (no mask or keypoint heads)")
        self.controller = controller if controller is not None else DynamicRCNNController()
        self.box_loss = DynamicSmoothL1Loss(reduction="mean", controller=self.controller)
        self.assign_options = MaxIoUAssignOptions(
            **self.controller.assigner_options(),
            gt_max_assign_all=gt_max_assign_all,
            match_low_quality=match_low_quality,
        )

    @classmethod
    def from_roi_heads(cls, roi_heads: RoIHeads, **kwargs) -> DynamicRoIHeads:
        """A DynamicRoIHeads sharing ``roi_heads``' modules (so its weights) and settings."""
        heads = cls(
            roi_heads.box_roi_pool,
            roi_heads.box_head,
            roi_heads.box_predictor,
            roi_heads.proposal_matcher.high_threshold,
            roi_heads.proposal_matcher.low_threshold,
            roi_heads.fg_bg_sampler.batch_size_per_image,
            roi_heads.fg_bg_sampler.positive_fraction,
            roi_heads.box_coder.weights,
            roi_heads.score_thresh,
            roi_heads.nms_thresh,
            roi_heads.detections_per_img,
            mask_roi_pool=roi_heads.mask_roi_pool,
            mask_head=roi_heads.mask_head,
            mask_predictor=roi_heads.mask_predictor,
            keypoint_roi_pool=roi_heads.keypoint_roi_pool,
            keypoint_head=roi_heads.keypoint_head,
            keypoint_predictor=roi_heads.keypoint_predictor,
            **kwargs,
        )
        heads.box_coder.bbox_xform_clip = roi_heads.box_coder.bbox_xform_clip
        return heads.train(roi_heads.training)

    def assign_targets_to_proposals(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Called by ``select_training_samples`` on proposals that end with the image's gt boxes
        (``add_gt_proposals``): the proposals before them are assigned in one batched kernel
        call, each gt box to its own gt. Records the IoU statistic.

        Returns torchvision's ``(matched_idxs, labels)``: labels ``> 0`` positive (the gt's
        class), ``0`` background, ``-1`` ignored.
        """
        self.assign_options = dataclasses.replace(
            self.assign_options, **self.controller.assigner_options()
        )
        return assign_proposals_with_gts(proposals, gt_boxes, gt_labels, self.assign_options, "hbb",
                                         self.controller)

    def forward(self, features, proposals, image_shapes, targets=None):
        """Training: Dynamic R-CNN losses, then one controller step. Inference: torchvision's."""
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        num_images = len(proposals)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        positive = torch.where(labels > 0)[0]
        positive_targets = regression_targets[positive]
        box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
        losses = fast_rcnn_losses(class_logits, box_regression[positive, labels[positive]], labels,
                                  positive_targets, self.box_loss)
        self.controller.record_beta(positive_targets, num_images)
        self.controller.step()
        return [], losses


def use_dynamic_roi_heads(
    model: FasterRCNN | OrientedRCNN, controller: DynamicRCNNController | None = None, **kwargs
) -> DynamicRCNNController:
    """Turns on Dynamic R-CNN in a torchvision Faster R-CNN or a
    :class:`~dbf_ext.models.OrientedRCNN`.

    Faster R-CNN: ``model.roi_heads`` is replaced by a :class:`DynamicRoIHeads` with the same
    modules. Oriented R-CNN: its :class:`~dbf_ext.models.RotatedRoIHeads` switches to Dynamic
    R-CNN (:meth:`~dbf_ext.models.RotatedRoIHeads.use_dynamic_rcnn`). The weights (and the
    ``state_dict`` keys) are unchanged. ``kwargs``: ``gt_max_assign_all``,
    ``match_low_quality``. Returns the controller (a default one when None is given), whose
    ``state_dict`` belongs in checkpoints.
    """
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(roi_heads, RotatedRoIHeads):
        return roi_heads.use_dynamic_rcnn(controller, **kwargs)
    if not isinstance(roi_heads, RoIHeads):
        raise TypeError(
            "model must be a torchvision Faster R-CNN (with RoIHeads) or an Oriented R-CNN, got "
            f"{type(model).__name__}"
        )
    model.roi_heads = DynamicRoIHeads.from_roi_heads(roi_heads, controller=controller, **kwargs)
    return model.roi_heads.controller
