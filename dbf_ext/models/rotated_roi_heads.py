"""The rotated RoI head of Oriented R-CNN (mmrotate's ``OrientedStandardRoIHead`` with a
``RotatedShared2FCBBoxHead``), with optional Dynamic R-CNN.

Training (per image): the gt boxes are appended to the proposals; the proposals are assigned
to the gts by rotated IoU (:func:`dbf_ext.assign.assign_proposals_with_gts`, ``box_type="obb"``;
Oriented R-CNN: pos = neg = min_pos 0.5, no low-quality matches), each gt box to itself;
torchvision's ``BalancedPositiveNegativeSampler`` draws 512 RoIs, at most 25 % positive. The
sampled RoIs are pooled by :class:`~dbf_ext.ops.MultiScaleRoIAlignRotated` (7 x 7), go through
two shared fully connected layers (torchvision's ``TwoMLPHead``, 1024) and a
:class:`RotatedBoxPredictor` (softmax classes with background, one class-agnostic rotated box
regression). Losses (:func:`dbf_ext.assign.fast_rcnn_losses`): cross entropy averaged over the
sampled RoIs, SmoothL1 (beta 1) of the positives' deltas
(:class:`~dbf_ext.models.DeltaXYWHAOBBoxCoder`) summed and divided by the sampled RoIs.

Inference: deltas decoded on the proposals (centres clipped to the image), softmax scores,
:func:`dbf_ext.ops.multiclass_nms_rotated` (score > 0.05, IoU 0.1 per class, 2000 per image).

Dynamic R-CNN (:meth:`RotatedRoIHeads.use_dynamic_rcnn`, or ``dynamic_rcnn=True`` on the
model): exactly what :class:`~dbf_ext.integrations.torchvision.DynamicRoIHeads` does for the
axis-aligned head, with the same shared pieces: pos = neg = min_pos IoU = the
:class:`~dbf_ext.assign.DynamicRCNNController`'s threshold (with low-quality matches, Dynamic
R-CNN's configuration), its IoU statistic recorded at assignment, the SmoothL1 beta the
controller's, the beta statistic (``mean(|dx|, |dy|)`` of the positives' normalised targets)
recorded after the loss, one controller step per training forward.

Differences from mmrotate, and why:

* Labels follow torchvision: class ``k`` of ``num_classes`` is label ``k + 1``, background is
  column / label 0 (mmdetection puts background last).
* The shared FC layers keep torchvision's ``TwoMLPHead`` initialisation (mmdetection: Xavier
  uniform); the predictor uses mmdetection's (normal, std 0.01 classes / 0.001 boxes).
* The RoIs of each image are its sampled proposals in torchvision's order (positives, then
  negatives, in sampler order), not mmdetection's (gts first).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.assign.losses import DynamicSmoothL1Loss, fast_rcnn_losses
from dbf_ext.assign.max_iou import assign_proposals_with_gts
from dbf_ext.models.coders import DeltaXYWHAOBBoxCoder
from dbf_ext.ops import multiclass_nms_rotated
from dbf_ext.ops.max_iou_assign import MaxIoUAssignOptions


class RotatedBoxPredictor(nn.Module):
    """Classification (``num_classes`` logits, background included as class 0) and one
    class-agnostic rotated box regression (5 deltas).

    ``forward(x (S, in_channels) or (S, ...))`` -> ``(class_logits (S, num_classes),
    box_regression (S, 5))``.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 5)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class RotatedRoIHeads(nn.Module):
    """Rotated RoI head (module docstring: training, inference, Dynamic R-CNN, differences).

    Args:
        box_roi_pool: :class:`~dbf_ext.ops.MultiScaleRoIAlignRotated`.
        box_head: e.g. torchvision's ``TwoMLPHead``.
        box_predictor: :class:`RotatedBoxPredictor`.
        fg_iou_thresh, bg_iou_thresh, min_pos_iou: rotated MaxIoU assignment (positive
            ``>= fg``, negative ``< bg``; ``min_pos_iou`` for low-quality matches).
        match_low_quality: MaxIoUAssigner's option (False in Oriented R-CNN).
        batch_size_per_image, positive_fraction: RoIs sampled per image.
        score_thresh, nms_thresh, detections_per_img: post-processing.
        box_coder: :class:`~dbf_ext.models.DeltaXYWHAOBBoxCoder` (mmrotate's config when None).
        smooth_l1_beta: beta of the box loss (without Dynamic R-CNN).

    Attributes:
        assign_options: the :class:`~dbf_ext.assign.MaxIoUAssignOptions` of the latest
            assignment (with Dynamic R-CNN, each takes the controller's threshold of the time).
        controller: the :class:`~dbf_ext.assign.DynamicRCNNController`, None without Dynamic
            R-CNN.
        box_loss: the :class:`~dbf_ext.assign.DynamicSmoothL1Loss`.

    ``forward(features, proposals: list[(K_i, 5)], image_shapes: list[(h, w)], targets=None)``
    -> ``(detections, losses)``: in training ``([], {"loss_classifier", "loss_box_reg"})``
    (targets required: ``"boxes"`` ``(G_i, 5)``, ``"labels"`` ``(G_i,)`` in
    ``[1, num_classes)``); otherwise one ``{"boxes": (D, 5), "scores": (D,), "labels": (D,)
    int64 >= 1}`` per image, by decreasing score, and ``{}``.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        min_pos_iou: float = 0.5,
        match_low_quality: bool = False,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.1,
        detections_per_img: int = 2000,
        box_coder: DeltaXYWHAOBBoxCoder | None = None,
        smooth_l1_beta: float = 1.0,
    ):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = box_coder if box_coder is not None else DeltaXYWHAOBBoxCoder()
        self.assign_options = MaxIoUAssignOptions(pos_iou_thr=fg_iou_thresh, neg_iou_thr=bg_iou_thresh,
                                                  min_pos_iou=min_pos_iou, match_low_quality=match_low_quality)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.controller: DynamicRCNNController | None = None
        self.box_loss = DynamicSmoothL1Loss(beta=smooth_l1_beta, reduction="mean")

    def use_dynamic_rcnn(
        self,
        controller: DynamicRCNNController | None = None,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ) -> DynamicRCNNController:
        """Switches training to Dynamic R-CNN: the assignment thresholds and the SmoothL1 beta
        follow ``controller`` (a default one when None), as in
        :class:`~dbf_ext.integrations.torchvision.DynamicRoIHeads`. Weights are unchanged.
        Returns the controller, whose ``state_dict`` belongs in checkpoints."""
        self.controller = controller if controller is not None else DynamicRCNNController()
        self.box_loss = DynamicSmoothL1Loss(reduction="mean", controller=self.controller)
        self.assign_options = MaxIoUAssignOptions(**self.controller.assigner_options(),
                                                  gt_max_assign_all=gt_max_assign_all,
                                                  match_low_quality=match_low_quality)
        return self.controller

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return self.detect(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("targets are required in training mode")
        gt_boxes = [t["boxes"].to(p.dtype) for t, p in zip(targets, proposals)]
        gt_labels = [t["labels"] for t in targets]
        rois, labels, matched_gts = self.select_training_samples(proposals, gt_boxes, gt_labels)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, rois,
                                                                                          image_shapes)))
        labels = torch.cat(labels)
        positive = labels > 0
        positive_targets = self.box_coder.encode(torch.cat(rois)[positive], torch.cat(matched_gts))
        losses = fast_rcnn_losses(class_logits.float(), box_regression.float()[positive], labels, positive_targets,
                                  self.box_loss)
        if self.controller is not None:
            self.controller.record_beta(positive_targets, len(proposals))
            self.controller.step()
        return [], losses

    def select_training_samples(
        self, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Appends the gts to the proposals, assigns and samples them. Per image: the sampled
        RoIs ``(S_i, 5)``, their labels ``(S_i,)`` (0 background) and the gt boxes of the
        positives among them ``(P_i, 5)``, in the RoIs' order."""
        if self.controller is not None:
            self.assign_options = dataclasses.replace(self.assign_options, **self.controller.assigner_options())
        with_gts = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes)]
        matched_idxs, labels = assign_proposals_with_gts(with_gts, gt_boxes, gt_labels, self.assign_options, "obb",
                                                         self.controller)
        positive_masks, negative_masks = self.fg_bg_sampler(labels)
        rois, sampled_labels, matched_gts = [], [], []
        for boxes, gts, image_matched, image_labels, positive, negative in zip(
                with_gts, gt_boxes, matched_idxs, labels, positive_masks, negative_masks):
            sampled = torch.where(positive | negative)[0]
            rois.append(boxes[sampled])
            sampled_labels.append(image_labels[sampled])
            matched_gts.append(gts[image_matched[sampled][image_labels[sampled] > 0]])
        return rois, sampled_labels, matched_gts

    def detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections of each image (the inference path of :meth:`forward`)."""
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        counts = [p.shape[0] for p in proposals]
        scores = F.softmax(class_logits.float(), -1).split(counts)
        box_regression = box_regression.float().split(counts)
        detections = []
        for image_proposals, image_scores, image_regression, shape in zip(proposals, scores, box_regression,
                                                                           image_shapes):
            boxes = self.box_coder.decode(image_proposals.float(), image_regression, max_shape=shape)
            dets, labels = multiclass_nms_rotated(boxes, image_scores[:, 1:], self.score_thresh, self.nms_thresh,
                                                  max_num=self.detections_per_img)
            detections.append({"boxes": dets[:, :5], "scores": dets[:, 5], "labels": labels + 1})
        return detections
