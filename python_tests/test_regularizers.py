"""The feature-enhancement regulariser: stage defaults, gradient against an independent
re-implementation, and doing nothing while the backbone is frozen."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.swin_transformer import SwinTransformer

from dbf_ext.freeze import FrozenBackbone, StepInterval, apply_dbf
from dbf_ext.models import build_detector, tiny_trunk
from dbf_ext.regularizers import FeatureEnhancement, default_stages


def small_swin() -> SwinTransformer:
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                           window_size=[4, 4])


def test_default_stages_of_resnet_swin_and_the_tiny_trunk():
    assert default_stages(resnet18()) == (["layer1", "layer2"], ["layer3", "layer4"])
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None).body  # IntermediateLayerGetter
    assert default_stages(body) == (["layer1", "layer2"], ["layer3", "layer4"])
    detector = build_detector("resnet18-fpn-lite", 3, 96)
    assert default_stages(detector) == (["backbone.body.layer1", "backbone.body.layer2"],
                                        ["backbone.body.layer3", "backbone.body.layer4"])
    assert default_stages(small_swin()) == (["features.1", "features.3"], ["features.5", "features.7"])

    class SwinTrunk(nn.Module):  # a detector's Swin trunk keeps torchvision's `features`
        def __init__(self):
            super().__init__()
            self.features = small_swin().features

    assert default_stages(SwinTrunk()) == (["features.1", "features.3"], ["features.5", "features.7"])
    assert default_stages(tiny_trunk()) == (["stem", "layer1"], ["layer2"])
    assert default_stages(FrozenBackbone(tiny_trunk())) == (["backbone.stem", "backbone.layer1"],
                                                            ["backbone.layer2"])
    FeatureEnhancement(resnet18())()  # the defaults make the bare call work


def test_unknown_backbone_asks_for_explicit_stages():
    vgg_like = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="pass early"):
        FeatureEnhancement(vgg_like)
    term = FeatureEnhancement(vgg_like, early=["0"], late=["2"])()
    assert term.ndim == 0 and term.requires_grad
    with pytest.raises(ValueError, match="'9' is not a submodule"):
        FeatureEnhancement(vgg_like, early=["9"], late=["2"])
    with pytest.raises(ValueError, match="no conv or linear"):
        FeatureEnhancement(vgg_like, early=["1"], late=["2"])
    with pytest.raises(ValueError, match=">= 0"):
        FeatureEnhancement(vgg_like, early=["0"], late=["2"], l2_weight=-1)


def plain_term(backbone, early, late, l2_weight, variance_weight):
    """The definition written out independently: per-module loops, explicit filter rows."""
    def layer_weights(names):
        for name in names:
            for module in backbone.get_submodule(name).modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    yield module.weight

    l2 = sum((w * w).sum() for w in layer_weights(late))
    filter_variances = []
    for w in layer_weights(early):
        for row in w.reshape(w.shape[0], -1):
            filter_variances.append(((row - row.mean()) ** 2).sum() / row.numel())
    variance = sum(filter_variances) / len(filter_variances)
    return l2_weight * l2 - variance_weight * variance, l2, variance


@pytest.mark.parametrize("make, early, late", [
    (resnet18, ["layer1", "layer2"], ["layer3", "layer4"]),
    (small_swin, ["features.1", "features.3"], ["features.5", "features.7"]),
    (tiny_trunk, ["stem", "layer1"], ["layer2"]),
])
def test_value_and_gradient_equal_a_plain_autograd_reimplementation(make, early, late):
    torch.manual_seed(0)
    backbone = make().double()
    for p in backbone.parameters():  # weights of varied scale and mean, not just the init
        p.data.mul_(1 + torch.rand(()).item()).add_(0.01 * torch.randn(()).item())
    regulariser = FeatureEnhancement(backbone, l2_weight=3e-4, variance_weight=2.5)
    term = regulariser()
    expected, l2, variance = plain_term(backbone, early, late, 3e-4, 2.5)
    params = [p for p in backbone.parameters()]
    got = torch.autograd.grad(term, params, allow_unused=True)
    want = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(term, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(regulariser.parts["l2"], l2.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(regulariser.parts["variance"], variance.detach(), rtol=1e-12, atol=0)
    touched = 0
    for (name, _), g, w in zip(backbone.named_parameters(), got, want):
        if w is None:  # biases, norms, parameters outside the stages
            assert g is None or not g.any(), name
            continue
        touched += 1
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-18, msg=name)
    assert touched > 0


def test_does_nothing_while_frozen_and_moves_early_and_late_weights_when_training():
    """A real FrozenBackbone driven by a schedule: epoch 0 frozen, 1 trains, 2 frozen (after
    momentum built up). SGD with momentum over every parameter, as in the trainer; a head on
    the trunk's output always trains, so every step has a backward pass. No weight decay: it
    would pull the early weights' variance down too."""
    torch.manual_seed(0)
    trunk = tiny_trunk()
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.body = trunk
    model.head = nn.Conv2d(96, 1, 1)
    dbf = apply_dbf(model, StepInterval((1,)))
    regulariser = FeatureEnhancement(dbf.backbone)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.0)
    images = torch.rand(2, 3, 32, 32)

    def snapshot():
        return {k: v.clone() for k, v in trunk.state_dict().items()}

    for epoch in range(3):
        dbf.on_epoch_start(epoch)
        before = snapshot()
        l2_before, variance_before = regulariser.late_l2().item(), regulariser.early_variance().item()
        for _ in range(3):
            term = regulariser()
            if dbf.is_frozen:
                assert term.item() == 0.0 and not term.requires_grad and term.grad_fn is None
                assert regulariser.parts["l2"].item() == 0.0
            # The head sees detached features: only the regulariser reaches the trunk.
            loss = model.head(dbf.backbone(images).detach()).mean() + term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        after = snapshot()
        if dbf.is_frozen:
            assert all(torch.equal(before[k], after[k]) for k in before), epoch
        else:
            moved = [k for k in before if not torch.equal(before[k], after[k])]
            assert {"stem.0.0.weight", "layer1.1.0.weight", "layer2.1.0.weight"} <= set(moved)
            assert regulariser.late_l2().item() < l2_before  # late weights shrink
            assert regulariser.early_variance().item() > variance_before  # early filters spread
