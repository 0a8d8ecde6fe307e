"""Detection backbones (trunk + FPN) shared by the Faster R-CNN and Oriented R-CNN builders.

Every backbone has the layout of torchvision's ``BackboneWithFPN``: ``backbone.body`` is the
trunk (what DBF freezes and the feature cache serves), ``backbone.fpn`` the neck,
``backbone.out_channels`` the FPN width; ``backbone(images (B, 3, H, W))`` returns an
``OrderedDict`` of FPN levels, the coarsest (``"pool"``) a stride-2 max-pool of the last one.
Weights are random (nothing is downloaded); classification weights go into ``backbone.body``
with :func:`dbf_ext.models.load_backbone_weights`.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

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


def tiny_fpn_backbone() -> BackboneWithFPN:
    """:func:`tiny_trunk` with a 64-channel FPN: levels ``"0"`` (stride 8), ``"1"`` (16) and
    ``"pool"`` (32)."""
    return BackboneWithFPN(tiny_trunk(), {"layer1": "0", "layer2": "1"}, [64, 96], 64)


def resnet10_lite_fpn_backbone() -> BackboneWithFPN:
    """A ResNet-10 trunk (torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])``: one basic block per
    stage; stages 1-3 used, 1.2 M parameters) with a 64-channel FPN: levels ``"0"`` (stride 4),
    ``"1"`` (8), ``"2"`` (16) and ``"pool"`` (32). Fine strides for small objects on small tiles,
    and a trunk that is most of a training step on a CPU (the demo's: freezing it shows)."""
    trunk = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(trunk, {"layer1": "0", "layer2": "1", "layer3": "2"}, [64, 128, 256], 64)


def resnet18_lite_fpn_backbone() -> BackboneWithFPN:
    """A ResNet-18 trunk (stages 2-4) with a 64-channel FPN: levels ``"0"`` (stride 8), ``"1"``
    (16), ``"2"`` (32) and ``"pool"`` (64)."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d, returned_layers=[2, 3, 4])
    backbone.fpn = type(backbone.fpn)([128, 256, 512], 64, extra_blocks=backbone.fpn.extra_blocks)
    backbone.out_channels = 64
    return backbone


def resnet50_fpn_backbone() -> BackboneWithFPN:
    """torchvision's ResNet-50 FPN (256 channels): levels ``"0"`` to ``"3"`` (strides 4-32) and
    ``"pool"`` (64); every stage and every BatchNorm trains (random weights: nothing to keep)."""
    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5,
                               norm_layer=nn.BatchNorm2d)


SWIN_FACTORIES = {"swin-t": models.swin_t, "swin-v2-t": models.swin_v2_t}


def swin_fpn_backbone(name: str) -> SwinBackboneWithFPN:
    """torchvision's Swin-T (``"swin-t"``) or Swin-V2-T (``"swin-v2-t"``) trunk with a
    256-channel FPN (:class:`SwinBackboneWithFPN`)."""
    return SwinBackboneWithFPN(SWIN_FACTORIES[name](weights=None))
