"""Detectors the training loop builds (torchvision Faster R-CNN variants, no downloads)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

MODELS = ("tiny-fpn", "resnet18-fpn-lite", "resnet50-fpn")


def _conv_bn(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def tiny_trunk() -> nn.Sequential:
    """A 4-stage conv + BatchNorm trunk (strides 4, 8, 16; 32 / 64 / 96 channels)."""
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(_conv_bn(3, 24, 2), _conv_bn(24, 32, 2)),
        layer1=nn.Sequential(_conv_bn(32, 48, 2), _conv_bn(48, 64, 1)),
        layer2=nn.Sequential(_conv_bn(64, 96, 2), _conv_bn(96, 96, 1)),
    ))


# Fewer proposals and sampled RoIs than torchvision's defaults: small tiles, few objects.
_LIGHT_HEADS = dict(
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
    box_batch_size_per_image=128,
)


def build_detector(name: str, num_classes: int, image_size: int) -> FasterRCNN:
    """A Faster R-CNN with randomly initialised weights (nothing is downloaded).

    Args:
        name: ``"tiny-fpn"`` — a 4-layer conv trunk (:func:`tiny_trunk`) with a 64-channel FPN,
            the demo's model: it learns the synthetic aerial set on a CPU in a minute;
            ``"resnet50-fpn"`` — torchvision's standard configuration (256-channel FPN,
            1024-d box head); ``"resnet18-fpn-lite"`` — a ResNet-18 trunk with a 64-channel FPN,
            a 256-d box head and fewer proposals, small enough to train on a CPU in minutes
            (for real data on a CPU).
        num_classes: object classes, background excluded.
        image_size: images are resized so their sides are at most this (tiles are square).

    The trunk uses ordinary BatchNorm (trained from scratch, so it cannot be frozen
    statistics): the frozen-backbone wrapper puts it in eval mode while frozen.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    sizes = dict(min_size=image_size, max_size=image_size)
    if name == "resnet50-fpn":
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5,
                                       norm_layer=nn.BatchNorm2d)
        return FasterRCNN(backbone, num_classes=num_classes + 1, **sizes)
    channels, representation = 64, 256
    if name == "tiny-fpn":
        backbone = BackboneWithFPN(tiny_trunk(), {"layer1": "0", "layer2": "1"}, [64, 96], channels)
        anchors = AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
        return FasterRCNN(
            backbone,
            **sizes,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1"], output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            **_LIGHT_HEADS,
        )
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d, returned_layers=[2, 3, 4])
    backbone.fpn = type(backbone.fpn)([128, 256, 512], channels, extra_blocks=backbone.fpn.extra_blocks)
    backbone.out_channels = channels
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    # Strides 8, 16, 32 and 64 (the pooled level): anchors from 16 px, for small aerial objects.
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    return FasterRCNN(
        backbone,
        **sizes,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        **_LIGHT_HEADS,
    )
