"""The detectors :func:`build_detector` makes (no downloads), and the loading of classification
weights into their trunks.

Two families on the same backbones (:mod:`dbf_ext.models.backbones`):

* Faster R-CNN (torchvision's ``FasterRCNN``, axis-aligned boxes, ``model.box_type ==
  "hbb"``): :data:`FASTER_RCNN_MODELS`;
* Oriented R-CNN (:class:`~dbf_ext.models.OrientedRCNN`, rotated boxes, ``model.box_type ==
  "obb"``): :data:`ORIENTED_RCNN_MODELS`.

:func:`detector_box_type` tells a name's box type without building the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from dbf_ext.models.backbones import (
    resnet10_lite_fpn_backbone,
    resnet18_lite_fpn_backbone,
    resnet50_fpn_backbone,
    swin_fpn_backbone,
    tiny_fpn_backbone,
)
from dbf_ext.models.oriented_rcnn import OrientedRCNN
from dbf_ext.models.rotated_roi_heads import RotatedBoxPredictor
from dbf_ext.ops import MultiScaleRoIAlignRotated

FASTER_RCNN_MODELS = ("tiny-fpn", "resnet18-fpn-lite", "resnet50-fpn", "swin-t-fpn", "swin-v2-t-fpn")
ORIENTED_RCNN_MODELS = ("oriented-rcnn-tiny-fpn", "oriented-rcnn-resnet10-fpn-lite", "oriented-rcnn-resnet18-fpn-lite",
                        "oriented-rcnn-r50-fpn", "oriented-rcnn-swin-t-fpn")
MODELS = FASTER_RCNN_MODELS + ORIENTED_RCNN_MODELS

# The backbone of each detector.
_BACKBONES = {
    "tiny-fpn": tiny_fpn_backbone,
    "resnet18-fpn-lite": resnet18_lite_fpn_backbone,
    "resnet50-fpn": resnet50_fpn_backbone,
    "swin-t-fpn": lambda: swin_fpn_backbone("swin-t"),
    "swin-v2-t-fpn": lambda: swin_fpn_backbone("swin-v2-t"),
    "oriented-rcnn-tiny-fpn": tiny_fpn_backbone,
    "oriented-rcnn-resnet10-fpn-lite": resnet10_lite_fpn_backbone,
    "oriented-rcnn-resnet18-fpn-lite": resnet18_lite_fpn_backbone,
    "oriented-rcnn-r50-fpn": resnet50_fpn_backbone,
    "oriented-rcnn-swin-t-fpn": lambda: swin_fpn_backbone("swin-t"),
}

# The torchvision classification model whose trunk each detector uses, and its ImageNet weights
# (what --pretrained loads from the local torch hub cache). The tiny and ResNet-10 trunks have
# none (torchvision publishes no ResNet-10 weights).
_CLASSIFIERS = {
    "resnet18-fpn-lite": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50-fpn": models.ResNet50_Weights.IMAGENET1K_V1,
    "swin-t-fpn": models.Swin_T_Weights.IMAGENET1K_V1,
    "swin-v2-t-fpn": models.Swin_V2_T_Weights.IMAGENET1K_V1,
    "oriented-rcnn-resnet18-fpn-lite": models.ResNet18_Weights.IMAGENET1K_V1,
    "oriented-rcnn-r50-fpn": models.ResNet50_Weights.IMAGENET1K_V1,
    "oriented-rcnn-swin-t-fpn": models.Swin_T_Weights.IMAGENET1K_V1,
}

# The small detectors that train on a CPU: anchor sizes per FPN level (two per stride, for small
# aerial objects), the levels the RoIs are pooled from, a 256-d box head, and fewer proposals
# and sampled RoIs than the standard configurations (small tiles, few objects).
_LIGHT_LAYOUTS = {
    tiny_fpn_backbone: (((16,), (32,), (64,)), ["0", "1"]),
    resnet10_lite_fpn_backbone: (((16,), (32,), (64,), (128,)), ["0", "1", "2"]),
    resnet18_lite_fpn_backbone: (((16,), (32,), (64,), (128,)), ["0", "1", "2"]),
}
_LIGHT_REPRESENTATION = 256
_LIGHT_HEADS = dict(
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=150,
    box_batch_size_per_image=128,
)


def detector_box_type(name: str) -> str:
    """``"obb"`` for the Oriented R-CNN models, ``"hbb"`` for the Faster R-CNN ones."""
    _check_name(name)
    return "obb" if name in ORIENTED_RCNN_MODELS else "hbb"


def build_detector(name: str, num_classes: int, image_size: int, **options) -> FasterRCNN | OrientedRCNN:
    """A detector with randomly initialised weights (nothing is downloaded).

    Args:
        name: one of :data:`MODELS`:

            * ``"tiny-fpn"`` — a 4-layer conv trunk (:func:`~dbf_ext.models.tiny_trunk`) with
              a 64-channel FPN: it learns the synthetic aerial set on a CPU in a minute;
            * ``"resnet18-fpn-lite"`` — a ResNet-18 trunk with a 64-channel FPN, a 256-d box
              head and fewer proposals, small enough to train on a CPU in minutes (for real
              data on a CPU);
            * ``"resnet50-fpn"`` — torchvision's standard configuration (256-channel FPN,
              1024-d box head);
            * ``"swin-t-fpn"`` / ``"swin-v2-t-fpn"`` — torchvision's Swin-T / Swin-V2-T trunk
              (:class:`~dbf_ext.models.SwinBackboneWithFPN`) in torchvision's standard
              configuration otherwise (256-channel FPN on strides 4-32 plus a pooled level);
            * ``"oriented-rcnn-r50-fpn"`` — Oriented R-CNN with mmrotate's
              ``oriented_rcnn_r50_fpn_1x_dota_le90`` configuration
              (:class:`~dbf_ext.models.OrientedRCNN`'s defaults) on the ResNet-50 FPN;
            * ``"oriented-rcnn-swin-t-fpn"`` — the same on the Swin-T FPN (mmrotate's
              ``oriented_rcnn_swin_tiny_fpn_1x_dota_le90``);
            * ``"oriented-rcnn-tiny-fpn"`` / ``"oriented-rcnn-resnet18-fpn-lite"`` — Oriented
              R-CNN on the tiny / ResNet-18 lite backbones with the light settings of
              ``tiny-fpn`` / ``resnet18-fpn-lite`` (anchors from 16 px, 256-d box head,
              600 / 300 proposals per level / image in training, 300 / 150 in evaluation, 128
              sampled RoIs): they train on 256 px tiles on a CPU in minutes;
            * ``"oriented-rcnn-resnet10-fpn-lite"`` — the demo's (``dbf-ext demo``): the same
              light settings on a ResNet-10 trunk to stride 16
              (:func:`~dbf_ext.models.backbones.resnet10_lite_fpn_backbone`, FPN levels at
              strides 4-32, RoIs pooled at 4-16), whose trunk is most of a CPU training step;
              ``dbf_ext/models/weights/demo_trunk_synthetic.pt`` holds pretrained trunk weights.

        num_classes: object classes, background excluded.
        image_size: images are resized so their sides are at most this (tiles are square).
        options: keyword arguments of the detector's constructor (torchvision's
            ``FasterRCNN`` or :class:`~dbf_ext.models.OrientedRCNN`) replacing the builder's,
            e.g. ``rpn_nms_box_type="obb"`` or ``dynamic_rcnn=True`` for an Oriented R-CNN.

    The model's ``box_type`` is ``"hbb"`` (Faster R-CNN) or ``"obb"`` (Oriented R-CNN). The
    ResNet and tiny trunks use ordinary BatchNorm (trained from scratch, so it cannot be
    frozen statistics): the frozen-backbone wrapper puts it in eval mode while frozen. The Swin
    trunks use LayerNorm (no running statistics) and torchvision's stochastic depth (rate up to
    0.2 in the last block): active while the trunk trains, off while it is frozen.
    Classification weights go into the trunk (``model.backbone.body``) with
    :func:`load_backbone_weights`.
    """
    _check_name(name)
    oriented = name in ORIENTED_RCNN_MODELS
    build_backbone = _BACKBONES[name]
    backbone = build_backbone()
    settings: dict = dict(min_size=image_size, max_size=image_size)
    if build_backbone in _LIGHT_LAYOUTS:
        anchor_sizes, roi_levels = _LIGHT_LAYOUTS[build_backbone]
        anchors = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(anchor_sizes))
        if oriented:
            roi_pool = MultiScaleRoIAlignRotated(featmap_names=roi_levels, output_size=7, sampling_ratio=2,
                                                 finest_scale=56)
        else:
            roi_pool = MultiScaleRoIAlign(featmap_names=roi_levels, output_size=7, sampling_ratio=2)
        box_head = TwoMLPHead(backbone.out_channels * 7 * 7, _LIGHT_REPRESENTATION)
        predictor = (RotatedBoxPredictor if oriented else FastRCNNPredictor)(_LIGHT_REPRESENTATION, num_classes + 1)
        settings.update(rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head,
                        box_predictor=predictor, **_LIGHT_HEADS)
    else:
        settings["num_classes"] = num_classes + 1
    settings.update(options)
    if oriented:
        return OrientedRCNN(backbone, **settings)
    model = FasterRCNN(backbone, **settings)
    model.box_type = "hbb"
    return model


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def pretrained_weights_path(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of detector ``name``'s trunk in the local
    torch hub cache (``torch.hub.get_dir()/checkpoints``); nothing is downloaded.

    Raises ``ValueError`` naming ``--backbone-weights`` for a detector without torchvision
    weights (``tiny-fpn``, the ResNet-10 ones) and
    ``FileNotFoundError`` when the file is not there.
    """
    if name not in _CLASSIFIERS:
        raise ValueError(f"--pretrained: torchvision has no ImageNet weights for the trunk of {name}; "
                         f"give a state dict of it with --backbone-weights PATH instead (models with "
                         f"torchvision weights: {', '.join(_CLASSIFIERS)})")
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
