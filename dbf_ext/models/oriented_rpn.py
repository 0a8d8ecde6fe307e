"""The oriented region proposal network of Oriented R-CNN (mmrotate's ``OrientedRPNHead``).

Horizontal anchors (torchvision's ``AnchorGenerator``), one objectness logit and six
midpoint-offset deltas per anchor (:class:`~dbf_ext.models.MidpointOffsetCoder`), oriented
proposals ``(cx, cy, w, h, theta)``.

Training targets (mmrotate's ``OrientedRPNHead._get_targets_single``): the anchors inside the
image (``allowed_border``) are assigned to the **enclosing axis-aligned boxes** of the ground
truths with :func:`dbf_ext.assign.batched_max_iou_assign` (``box_type="hbb"``, pos 0.7,
neg 0.3, min_pos 0.3, low-quality matches), sampled (256 per image, half positive) by
torchvision's ``BalancedPositiveNegativeSampler``; a positive's regression target encodes its
gt's **rotated** box. Losses: binary cross entropy of the objectness averaged over the sampled
anchors, SmoothL1 (beta 1/9) of the positives' six deltas summed and divided by the number of
sampled anchors.

Proposals (mmrotate's ``_get_bboxes_single``): per FPN level the ``pre_nms_top_n`` highest
objectness anchors are decoded; NMS (IoU ``nms_thresh``) runs separately per level on the
proposals' enclosing axis-aligned boxes (``nms_box_type="hbb"``, torchvision's
``batched_nms``) or exactly on the rotated boxes (``"obb"``,
:func:`dbf_ext.ops.batched_nms_rotated`); the ``post_nms_top_n`` highest-scored survivors of
all levels are the image's proposals.

Differences from mmrotate, and why:

* torchvision's ``AnchorGenerator`` rounds the base anchors' corners to integers (mmdetection
  does not) and infers each level's stride as padded image size // feature size: strides are
  exact (4-64) when the padded batch is a multiple of the coarsest stride; DOTA's 1024 px tiles
  and 256 px demo tiles are.
* Anchors are filtered by ``allowed_border`` against each image's own (resized, unpadded)
  size; mmdetection's additional "valid flags" (feature positions inside the padded image)
  only matter for ``allowed_border < 0``, where every anchor is used here.
* The losses divide by the number of sampled anchors of the batch (torchvision);
  mmdetection counts at least one positive and one negative per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, permute_and_flatten

from dbf_ext._validation import check_choice
from dbf_ext.assign.max_iou import batched_max_iou_assign
from dbf_ext.boxes import obb2hbb
from dbf_ext.models.coders import MidpointOffsetCoder
from dbf_ext.ops import batched_nms_rotated

NMS_BOX_TYPES = ("hbb", "obb")


class OrientedRPNHead(RPNHead):
    """torchvision's ``RPNHead`` (3x3 conv + ReLU, 1x1 objectness) with six regression outputs
    per anchor: ``bbox_pred`` is a 1x1 conv to ``num_anchors * 6`` channels (weights normal with
    std 0.01, bias 0, like the other layers and mmrotate's init).

    ``forward(features: list[(B, C, H_l, W_l)])`` -> ``(objectness: list[(B, A, H_l, W_l)],
    deltas: list[(B, 6 A, H_l, W_l)])``.
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__(in_channels, num_anchors)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 6, kernel_size=1)
        nn.init.normal_(self.bbox_pred.weight, std=0.01)
        nn.init.zeros_(self.bbox_pred.bias)


class OrientedRPN(nn.Module):
    """Oriented region proposal network (module docstring: targets, proposals, differences).

    Args:
        anchor_generator: torchvision ``AnchorGenerator`` (one entry per FPN level used).
        head: :class:`OrientedRPNHead`.
        fg_iou_thresh, bg_iou_thresh, min_pos_iou: MaxIoU assignment of anchors to the gts'
            enclosing boxes (positive ``>= fg``, negative ``< bg``, low-quality matches from
            ``min_pos_iou``).
        batch_size_per_image, positive_fraction: anchors sampled per image.
        pre_nms_top_n, post_nms_top_n: ``{"training": n, "testing": n}``: anchors kept per
            level before NMS, proposals kept per image after it.
        nms_thresh: NMS IoU threshold (suppression when IoU > threshold).
        nms_box_type: ``"hbb"`` (mmrotate: NMS of the enclosing axis-aligned boxes) or
            ``"obb"`` (exact rotated NMS).
        min_size: proposals with ``w`` or ``h`` below this are dropped before NMS (0: none).
        allowed_border: anchors reaching more than this many pixels outside the image are
            neither positive nor negative; negative: every anchor is used.
        box_coder: :class:`~dbf_ext.models.MidpointOffsetCoder` (mmrotate's config when None).
        smooth_l1_beta: beta of the regression loss.

    ``forward(images: ImageList, features: dict[str, (B, C, H_l, W_l)], targets=None)`` ->
    ``(proposals: list[(K_i, 5)], losses)``: proposals (detached, by decreasing objectness) in
    the transformed images' coordinates; ``losses`` ``{"loss_objectness", "loss_rpn_box_reg"}``
    in training (``targets`` required, ``"boxes"`` ``(G_i, 5)``), ``{}`` otherwise.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: OrientedRPNHead,
        *,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        min_pos_iou: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int] | None = None,
        post_nms_top_n: dict[str, int] | None = None,
        nms_thresh: float = 0.8,
        nms_box_type: str = "hbb",
        min_size: float = 0.0,
        allowed_border: float = 0.0,
        box_coder: MidpointOffsetCoder | None = None,
        smooth_l1_beta: float = 1.0 / 9,
    ):
        super().__init__()
        check_choice("nms_box_type", nms_box_type, NMS_BOX_TYPES)
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = box_coder if box_coder is not None else MidpointOffsetCoder()
        self.assign_thresholds = {"pos_iou_thr": fg_iou_thresh, "neg_iou_thr": bg_iou_thresh,
                                  "min_pos_iou": min_pos_iou}
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n or {"training": 2000, "testing": 2000}
        self._post_nms_top_n = post_nms_top_n or {"training": 2000, "testing": 2000}
        self.nms_thresh = nms_thresh
        self.nms_box_type = nms_box_type
        self.min_size = min_size
        self.allowed_border = allowed_border
        self.smooth_l1_beta = smooth_l1_beta

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        levels = list(features.values())
        objectness, deltas = self.head(levels)
        anchors = self.anchor_generator(images, levels)
        num_images = len(anchors)
        level_counts = [o[0].numel() for o in objectness]
        # (B, total anchors) logits and (B, total anchors, 6) deltas, in the anchors' order;
        # float32 under autocast (decoding and the losses want it).
        objectness = torch.cat([permute_and_flatten(o, num_images, o.shape[1], 1, *o.shape[-2:]) for o in objectness],
                               1).squeeze(-1).float()
        deltas = torch.cat([permute_and_flatten(d, num_images, d.shape[1] // 6, 6, *d.shape[-2:]) for d in deltas],
                           1).float()
        # As mmrotate, proposals are not clipped to the image (MidpointOffsetCoder takes no bounds).
        proposals = [self.select_proposals(a, o, d, level_counts)
                     for a, o, d in zip(anchors, objectness.detach(), deltas.detach())]
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses = self.compute_loss(anchors, objectness, deltas, [t["boxes"] for t in targets],
                                       images.image_sizes)
        return [boxes for boxes, _ in proposals], losses

    def select_proposals(
        self, anchors: Tensor, objectness: Tensor, deltas: Tensor, level_counts: list[int]
    ) -> tuple[Tensor, Tensor]:
        """One image's proposals ``(K, 5)`` and their scores ``(K,)`` by decreasing score, from
        its ``anchors`` ``(A, 4)``, ``objectness`` logits ``(A,)`` and ``deltas`` ``(A, 6)``
        (levels one after the other, ``level_counts`` anchors each)."""
        chosen, level_ids = [], []
        start = 0
        for level, count in enumerate(level_counts):
            top = objectness[start:start + count].topk(min(self.pre_nms_top_n(), count)).indices
            chosen.append(top + start)
            level_ids.append(torch.full_like(top, level))
            start += count
        chosen, level_ids = torch.cat(chosen), torch.cat(level_ids)
        boxes = self.box_coder.decode(anchors[chosen], deltas[chosen])
        scores = objectness[chosen].sigmoid()
        if self.min_size > 0:
            large = (boxes[:, 2] >= self.min_size) & (boxes[:, 3] >= self.min_size)
            boxes, scores, level_ids = boxes[large], scores[large], level_ids[large]
        if self.nms_box_type == "hbb":
            keep = torchvision.ops.batched_nms(obb2hbb(boxes), scores, level_ids, self.nms_thresh)
        else:
            keep = batched_nms_rotated(boxes, scores, level_ids, self.nms_thresh)
        keep = keep[: self.post_nms_top_n()]
        return boxes[keep], scores[keep]

    def assign_targets(
        self, anchors: list[Tensor], gt_boxes: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: ``labels`` ``(A,)`` (1 positive, 0 negative, -1 ignored: outside the
        border or between the thresholds) and ``matched`` ``(A,)`` the assigned gt (0 where not
        positive)."""
        inside = [self._inside(a, size) for a, size in zip(anchors, image_sizes)]
        results = batched_max_iou_assign(
            [a[m] for a, m in zip(anchors, inside)], [obb2hbb(g) for g in gt_boxes],
            **self.assign_thresholds, match_low_quality=True, box_type="hbb")
        labels, matched = [], []
        for image_anchors, mask, result in zip(anchors, inside, results):
            image_labels = torch.full((image_anchors.shape[0],), -1, dtype=torch.int64, device=image_anchors.device)
            image_labels[mask] = torch.where(result.gt_inds > 0, 1, result.gt_inds.clamp(max=0))
            image_matched = torch.zeros_like(image_labels)
            image_matched[mask] = (result.gt_inds - 1).clamp(min=0)
            labels.append(image_labels)
            matched.append(image_matched)
        return labels, matched

    def compute_loss(
        self, anchors: list[Tensor], objectness: Tensor, deltas: Tensor, gt_boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> dict[str, Tensor]:
        """``loss_objectness`` and ``loss_rpn_box_reg`` of ``objectness`` ``(B, A)`` and
        ``deltas`` ``(B, A, 6)``."""
        labels, matched = self.assign_targets(anchors, gt_boxes, image_sizes)
        positive_masks, negative_masks = self.fg_bg_sampler(labels)
        box_loss = objectness.new_zeros(())
        sampled_logits, sampled_labels = [], []
        for i, (positive, negative) in enumerate(zip(positive_masks, negative_masks)):
            positive = torch.where(positive)[0]
            sampled = torch.cat((positive, torch.where(negative)[0]))
            sampled_logits.append(objectness[i, sampled])
            sampled_labels.append(labels[i][sampled])
            targets = self.box_coder.encode(anchors[i][positive], gt_boxes[i][matched[i][positive]].to(deltas.dtype))
            box_loss = box_loss + F.smooth_l1_loss(deltas[i, positive], targets, beta=self.smooth_l1_beta,
                                                   reduction="sum")
        sampled_logits, sampled_labels = torch.cat(sampled_logits), torch.cat(sampled_labels)
        num_sampled = max(sampled_labels.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(sampled_logits, sampled_labels.to(sampled_logits.dtype),
                                                             reduction="sum") / num_sampled
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss / num_sampled}

    def _inside(self, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        """mmdetection's ``anchor_inside_flags`` against the image's own size ``(h, w)``."""
        if self.allowed_border < 0:
            return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        border = self.allowed_border
        height, width = image_size
        return ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border) & (anchors[:, 2] < width + border)
                & (anchors[:, 3] < height + border))
