"""Detectors the training loop builds (torchvision Faster R-CNN variants, no downloads), and
the loading of classification weights into their trunks."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

MODELS = ("tiny-fpn", "resnet18-fpn-lite", "resnet50-fpn", "swin-t-fpn", "swin-v2-t-fpn")

# The torchvision classification model whose trunk each detector uses, and its ImageNet weights
# (what --pretrained loads from the local torch hub cache). tiny-fpn has no such model.
_CLASSIFIERS = {
    "resnet18-fpn-lite": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50-fpn": models.ResNet50_Weights.IMAGENET1K_V1,
    "swin-t-fpn": models.Swin_T_Weights.IMAGENET1K_V1,
    "swin-v2-t-fpn": models.Swin_V2_T_Weights.IMAGENET1K_V1,
}
_SWIN_FACTORIES = {"swin-t-fpn": models.swin_t, "swin-v2-t-fpn": models.swin_v2_t}

# The stages of torchvision's Swin in its ``features`` Sequential; the modules in between are
# the patch embedding (0) and the patch mergings (2, 4, 6).
SWIN_STAGES = (1, 3, 5, 7)


class SwinTrunk(nn.Module):
    """The four stages of a torchvision Swin Transformer (v1 or v2) as a detection trunk.

    Keeps the classifier's ``features`` Sequential as the submodule ``features`` (parameter
    names ``features.1...`` as in the classification model, so its state dict loads as is);
    the classifier's final norm and head are dropped.

    ``forward(images (B, 3, H, W))`` returns an ``OrderedDict`` like torchvision's
    ``IntermediateLayerGetter``: ``"0"`` ``(B, C, H/4, W/4)``, ``"1"`` ``(B, 2C, H/8, W/8)``,
    ``"2"`` ``(B, 4C, H/16, W/16)``, ``"3"`` ``(B, 8C, H/32, W/32)`` (``C`` the embedding dimension, 96 for
    Swin-T; the patch embedding rounds ``H/4`` down, each patch merging halves rounding up),
    float, contiguous NCHW.
    """

    def __init__(self, swin: SwinTransformer):
        super().__init__()
        self.features = swin.features
        # Every block of a stage starts with a LayerNorm over the stage's channels.
        self.channels = [self.features[i][-1].norm1.normalized_shape[0] for i in SWIN_STAGES]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        outputs = OrderedDict()
        x = images
        for index, module in enumerate(self.features):
            x = module(x)  # (B, H', W', C'): torchvision's Swin runs channels-last throughout
            if index in SWIN_STAGES:
                # NHWC -> NCHW as a copy, not a strided view: the feature cache hands hits back
                # as contiguous NCHW, so the FPN then sees one memory layout whether a feature
                # comes from the trunk or from the cache (convolutions choose their algorithm
                # per layout, and results may differ in the last bits between layouts). The
                # copy is small next to the attention blocks.
                outputs[str(len(outputs))] = x.permute(0, 3, 1, 2).contiguous()
        return outputs


class SwinBackboneWithFPN(nn.Module):
    """A :class:`SwinTrunk` (``body``) and torchvision's ``FeaturePyramidNetwork`` (``fpn``),
    laid out like torchvision's ``BackboneWithFPN`` (``backbone.body`` is the trunk that DBF
    freezes and the feature cache serves).

    ``forward(images (B, 3, H, W))``: ``{"0": (B, out_channels, H/4, W/4), ..., "3": (B,
    out_channels, H/32, W/32), "pool": (B, out_channels, H/64, W/64)}``.
    """

    def __init__(self, swin: SwinTransformer, out_channels: int = 256):
        super().__init__()
        self.body = SwinTrunk(swin)
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))


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
            (for real data on a CPU); ``"swin-t-fpn"`` / ``"swin-v2-t-fpn"`` — torchvision's Swin-T
            / Swin-V2-T trunk (:class:`SwinBackboneWithFPN`) in torchvision's standard
            configuration otherwise (256-channel FPN on strides 4-32 plus a pooled level).
        num_classes: object classes, background excluded.
        image_size: images are resized so their sides are at most this (tiles are square).

    The ResNet and tiny trunks use ordinary BatchNorm (trained from scratch, so it cannot be
    frozen statistics): the frozen-backbone wrapper puts it in eval mode while frozen. The Swin
    trunks use LayerNorm (no running statistics) and torchvision's stochastic depth (rate up to
    0.2 in the last block): active while the trunk trains, off while it is frozen.
    Classification weights go into the trunk with :func:`load_backbone_weights`.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    sizes = dict(min_size=image_size, max_size=image_size)
    if name in _SWIN_FACTORIES:
        backbone = SwinBackboneWithFPN(_SWIN_FACTORIES[name](weights=None))
        return FasterRCNN(backbone, num_classes=num_classes + 1, **sizes)
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


def pretrained_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of detector ``name``'s trunk in the local
    torch hub cache (``torch.hub.get_dir()/checkpoints``); nothing is downloaded.

    Raises ``ValueError`` for a detector without a torchvision classifier (``tiny-fpn``) and
    ``FileNotFoundError`` when the file is not there.
    """
    if name not in _CLASSIFIERS:
        raise ValueError(f"--pretrained: model {name} has no ImageNet weights (models with them: "
                         f"{', '.join(_CLASSIFIERS)})")
    weights = _CLASSIFIERS[name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        builder = weights.__class__.__name__.removesuffix("_Weights").lower()
        raise FileNotFoundError(
            f"--pretrained: the ImageNet weights of {name} are not in the torch hub cache ({path}); "
            f"download them first on a machine with internet, e.g. python -c \"import torchvision; "
            f"torchvision.models.{builder}(weights='{weights.name}')\", and copy the file there")
    return path


def load_backbone_weights(model: nn.Module, path: str | Path) -> str:
    """Loads a torchvision classification model's state dict file (``torch.save(
    torchvision.models.resnet50(...).state_dict(), path)``, a ``swin_t`` one, ...) into the
    trunk ``model.backbone.body`` of a detector from :func:`build_detector`.

    Tensors whose names are not in the trunk (the classifier head: ``fc.*`` of a ResNet,
    ``norm.*`` / ``head.*`` of a Swin) are skipped. Every trunk tensor must be in the file with
    its shape, else a ``ValueError`` naming the file says which are missing or differ.

    Returns one line saying what was loaded and what was skipped.
    """
    from dbf_ext.train.checkpoint import read_weights_file  # it imports this module

    trunk = model.backbone.body
    expected = trunk.state_dict()
    given = read_weights_file(path, what="backbone weights file")
    if not isinstance(given, dict) or not all(isinstance(v, Tensor) for v in given.values()):
        raise ValueError(f"{path} is not a state dict (a dict of tensors)")
    missing = [key for key in expected if key not in given]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the trunk's {len(expected)} tensors "
                         f"(first: {', '.join(missing[:3])}): not weights of this model's classifier")
    mismatched = [f"{key} {tuple(given[key].shape)} vs {tuple(value.shape)}"
                  for key, value in expected.items() if given[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"{path} does not fit the trunk: {len(mismatched)} shapes differ "
                         f"(file vs model; first: {', '.join(mismatched[:3])})")
    trunk.load_state_dict({key: given[key] for key in expected})
    skipped = sorted({key.split(".")[0] for key in given if key not in expected})
    return (f"backbone weights from {path}: loaded {len(expected)} tensors into the trunk, skipped "
            f"{len(given) - len(expected)} not in it ({', '.join(skipped) or 'none'})")
