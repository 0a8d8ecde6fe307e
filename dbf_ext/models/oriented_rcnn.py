"""Oriented R-CNN (Xie et al., ICCV 2021) in torchvision's ``GeneralizedRCNN`` structure.

``model = OrientedRCNN(backbone, num_classes=16)`` (background included, as torchvision's
``FasterRCNN``), or a ready configuration from :func:`dbf_ext.models.build_detector`::

    model = build_detector("oriented-rcnn-r50-fpn", num_classes=15, image_size=1024)
    model.train()
    losses = model(images, targets)  # {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    model.eval()
    detections = model(images)       # [{"boxes": (D, 5), "scores": (D,), "labels": (D,)}, ...]

* ``images``: list of float ``(3, H_i, W_i)`` tensors, RGB in ``[0, 1]`` (sizes may differ).
* ``targets`` (training): one dict per image with ``"boxes"`` ``(G_i, 5)`` floating
  ``(cx, cy, w, h, theta)`` in image pixels, theta in radians, clockwise (mmrotate's
  convention; any angle form, e.g. ``le90`` as :class:`~dbf_ext.data.DotaDetectionDataset`
  gives with ``box_type="obb"``), and ``"labels"`` ``(G_i,)`` int64 in ``[1, num_classes)``
  (class index + 1, 0 is background: torchvision's convention). Other keys are ignored.
* Detections: ``boxes`` in the original image's pixels, ``le90`` form (``w >= h``, theta in
  ``[-pi/2, pi/2)``), ``labels`` as the targets', by decreasing score.

The model has ``box_type = "obb"`` and ``angle_version = "le90"`` (the Faster R-CNN models of
:func:`~dbf_ext.models.build_detector` have ``box_type = "hbb"``), and torchvision's parts
under torchvision's names: ``transform`` (:class:`RotatedRCNNTransform`), ``backbone`` (with
``backbone.body`` the trunk DBF freezes and the feature cache serves: it is called once per
forward on the transformed batch), ``rpn`` (:class:`~dbf_ext.models.OrientedRPN`),
``roi_heads`` (:class:`~dbf_ext.models.RotatedRoIHeads`).

Defaults are mmrotate 0.3.4's ``oriented_rcnn_r50_fpn_1x_dota_le90`` config; the modules'
docstrings list where and why ours differ. At the model level:

* Resizing is torchvision's rule (shorter side to ``min_size``, longer side at most
  ``max_size``; mmrotate's ``RResize`` with ``img_scale=(1024, 1024)`` is the same rule for
  ``min_size = max_size = 1024``), with one scale factor per image so that rotated boxes stay
  rectangles (:class:`RotatedRCNNTransform`).
* Normalisation and padding are torchvision's (ImageNet mean and std on ``[0, 1]`` images,
  equal to mmrotate's ``img_norm_cfg`` on ``[0, 255]``; padding to a multiple of 32).
* Backbones (:func:`~dbf_ext.models.build_detector`) start from random weights and train every
  stage and BatchNorm (mmrotate: ImageNet ResNet-50 with the stem and first stage frozen and
  BatchNorm statistics frozen): nothing is downloaded, ImageNet weights are loaded with
  :func:`~dbf_ext.models.load_backbone_weights`, and DBF freezes the trunk by schedule. The
  FPN and the shared FC layers keep torchvision's initialisation (mmdetection: Xavier).
* The optimiser, schedule and gradient clipping of the config belong to the training loop.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from dbf_ext._validation import check_float_dtype, check_labels, check_rotated_boxes, check_same_device, check_tensor
from dbf_ext.models.oriented_rpn import OrientedRPN, OrientedRPNHead
from dbf_ext.models.rotated_roi_heads import RotatedBoxPredictor, RotatedRoIHeads
from dbf_ext.ops import MultiScaleRoIAlignRotated

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]


class RotatedRCNNTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` (normalise, resize, pad into an ``ImageList``)
    for rotated boxes: each image is scaled by one factor ``s`` on both axes and its target
    boxes ``(cx, cy, w, h, theta)`` become ``(s cx, s cy, s w, s h, theta)``.

    ``s = min(min_size / shorter side, max_size / longer side)`` (torchvision's rule; in
    training ``min_size`` is drawn from the ``min_size`` tuple). The image is resampled
    bilinearly with the exact factor ``s`` (``floor(side * s)`` pixels): pixel centres map as
    ``(x + 0.5) s - 0.5``, the same geometry as the boxes. (torchvision recomputes the factor
    per axis from the rounded size, a sub-pixel anisotropy that would shear rotated boxes.)
    :meth:`postprocess` divides detections by the same ``s``.
    """

    def __init__(self, min_size: int | tuple[int, ...], max_size: int, image_mean: list[float],
                 image_std: list[float], size_divisible: int = 32):
        super().__init__(min_size, max_size, image_mean, image_std, size_divisible=size_divisible)

    def scale_factor(self, image_size: tuple[int, int], min_size: int) -> float:
        """The factor of an image of ``image_size = (h, w)`` resized for ``min_size``."""
        return min(min_size / min(image_size), self.max_size / max(image_size))

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        min_size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = self.scale_factor(tuple(image.shape[-2:]), min_size)
        if scale != 1.0:
            image = nn.functional.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                              recompute_scale_factor=False, align_corners=False)[0]
        if target is not None:
            target = {**target, "boxes": _scale_boxes(target["boxes"], scale)}
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for detections, original in zip(result, original_image_sizes):
            # The evaluation-mode factor of resize(), recomputed from the original size.
            scale = self.scale_factor(tuple(original), self.min_size[-1])
            detections["boxes"] = _scale_boxes(detections["boxes"], 1.0 / scale)
        return result

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size}, mean={self.image_mean}, "
                f"std={self.image_std}, size_divisible={self.size_divisible})")


def _scale_boxes(boxes: Tensor, scale: float) -> Tensor:
    return torch.cat((boxes[:, :4] * scale, boxes[:, 4:]), dim=1)


class OrientedRCNN(GeneralizedRCNN):
    """Oriented R-CNN (module docstring: inputs, outputs, attributes).

    Args:
        backbone: a module returning an ``OrderedDict`` of FPN levels (finest first) with an
            ``out_channels`` attribute, e.g. torchvision's ``BackboneWithFPN``.
        num_classes: classes **including background** (as torchvision's ``FasterRCNN``); None
            when ``box_predictor`` is given.
        min_size, max_size, image_mean, image_std: :class:`RotatedRCNNTransform`.
        rpn_anchor_generator: torchvision ``AnchorGenerator``; default: sizes 32-512 (scale 8
            at strides 4-64), ratios 0.5, 1, 2 (the config's), one level per backbone output.
        rpn_head: :class:`~dbf_ext.models.OrientedRPNHead`.
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test: anchors per level before NMS (2000).
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: proposals per image (2000).
        rpn_nms_thresh: proposal NMS IoU (0.8).
        rpn_nms_box_type: ``"hbb"`` (mmrotate: NMS of the enclosing axis-aligned boxes) or
            ``"obb"`` (exact rotated NMS).
        rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_min_pos_iou: anchor assignment (0.7, 0.3, 0.3).
        rpn_batch_size_per_image, rpn_positive_fraction: anchor sampling (256, 0.5).
        rpn_allowed_border: anchors further outside the image are ignored in training (0).
        rpn_min_size: proposals with a side below this are dropped (0: none).
        box_roi_pool: default :class:`~dbf_ext.ops.MultiScaleRoIAlignRotated` on levels
            ``"0"``-``"3"``, 7 x 7, sampling ratio 2.
        box_head: default torchvision ``TwoMLPHead(out_channels * 49, 1024)``.
        box_predictor: default :class:`~dbf_ext.models.RotatedBoxPredictor` (a replacement
            keeps its ``cls_score`` layer: :attr:`num_classes` reads it).
        box_score_thresh, box_nms_thresh, box_detections_per_img: post-processing (0.05, 0.1,
            2000).
        box_fg_iou_thresh, box_bg_iou_thresh, box_min_pos_iou, box_match_low_quality: rotated
            assignment of the proposals (0.5, 0.5, 0.5, False).
        box_batch_size_per_image, box_positive_fraction: RoI sampling (512, 0.25).
        dynamic_rcnn: Dynamic R-CNN on the RoI head
            (:meth:`~dbf_ext.models.RotatedRoIHeads.use_dynamic_rcnn`; the controller is
            ``model.roi_heads.controller``).
    """

    box_type = "obb"
    angle_version = "le90"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int | None = None,
        *,
        min_size: int | tuple[int, ...] = 1024,
        max_size: int = 1024,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        rpn_anchor_generator: AnchorGenerator | None = None,
        rpn_head: nn.Module | None = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 2000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 2000,
        rpn_nms_thresh: float = 0.8,
        rpn_nms_box_type: str = "hbb",
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_min_pos_iou: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_allowed_border: float = 0.0,
        rpn_min_size: float = 0.0,
        box_roi_pool: nn.Module | None = None,
        box_head: nn.Module | None = None,
        box_predictor: nn.Module | None = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.1,
        box_detections_per_img: int = 2000,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_min_pos_iou: float = 0.5,
        box_match_low_quality: bool = False,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        dynamic_rcnn: bool = False,
    ):
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the channels of its feature maps)")
        if (num_classes is None) == (box_predictor is None):
            raise ValueError("give num_classes (background included) or box_predictor, not both or neither")
        out_channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        if rpn_head is None:
            rpn_head = OrientedRPNHead(out_channels, rpn_anchor_generator.num_anchors_per_location()[0])
        rpn = OrientedRPN(
            rpn_anchor_generator, rpn_head,
            fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh, min_pos_iou=rpn_min_pos_iou,
            batch_size_per_image=rpn_batch_size_per_image, positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh, nms_box_type=rpn_nms_box_type, min_size=rpn_min_size,
            allowed_border=rpn_allowed_border,
        )
        if box_roi_pool is None:
            box_roi_pool = MultiScaleRoIAlignRotated(featmap_names=["0", "1", "2", "3"], output_size=7,
                                                     sampling_ratio=2, finest_scale=56)
        if box_head is None:
            box_head = TwoMLPHead(out_channels * 7 * 7, 1024)
        if box_predictor is None:
            box_predictor = RotatedBoxPredictor(1024, num_classes)
        roi_heads = RotatedRoIHeads(
            box_roi_pool, box_head, box_predictor,
            fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh, min_pos_iou=box_min_pos_iou,
            match_low_quality=box_match_low_quality, batch_size_per_image=box_batch_size_per_image,
            positive_fraction=box_positive_fraction, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
            detections_per_img=box_detections_per_img,
        )
        if dynamic_rcnn:
            roi_heads.use_dynamic_rcnn()
        transform = RotatedRCNNTransform(min_size, max_size, image_mean or _IMAGENET_MEAN, image_std or _IMAGENET_STD)
        super().__init__(backbone, rpn, roi_heads, transform)

    @property
    def num_classes(self) -> int:
        """Classes including background (the predictor's outputs)."""
        return self.roi_heads.box_predictor.cls_score.out_features

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections otherwise (module docstring)."""
        _check_images(images)
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if targets is not None:
            _check_targets(targets, images, self.num_classes)
        original_image_sizes = [tuple(image.shape[-2:]) for image in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_image_sizes)
        return self.eager_outputs({**detector_losses, **proposal_losses}, detections)


def _check_images(images: object) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise TypeError(f"images must be a non-empty list of (3, H, W) tensors, got {type(images).__name__}")
    for i, image in enumerate(images):
        check_tensor(f"images[{i}]", image)
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] must have shape (3, H, W), got {tuple(image.shape)}")
        check_float_dtype(f"images[{i}]", image)


def _check_targets(targets: object, images: list[Tensor], num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise ValueError(f"targets must be a list with one dict per image ({len(images)})")
    for i, (target, image) in enumerate(zip(targets, images)):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' and 'labels'")
        boxes = check_rotated_boxes(f"targets[{i}]['boxes']", target["boxes"])
        labels = check_labels(f"targets[{i}]['labels']", target["labels"], boxes.shape[0])
        check_same_device(image=image, boxes=boxes, labels=labels)
        if boxes.shape[0] == 0:
            continue
        if not torch.isfinite(boxes).all() or not (boxes[:, 2:4] > 0).all():
            raise ValueError(f"targets[{i}]['boxes'] must be finite with w > 0 and h > 0 "
                             "(rotated boxes (cx, cy, w, h, theta))")
        if labels.min() < 1 or labels.max() >= num_classes:
            raise ValueError(f"targets[{i}]['labels'] must be in [1, {num_classes - 1}] (0 is background), got "
                             f"values in [{int(labels.min())}, {int(labels.max())}]")
