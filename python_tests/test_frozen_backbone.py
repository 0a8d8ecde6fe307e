"""FrozenBackbone and apply_dbf on single-process models (tiny models and torchvision detectors)."""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from dbf_ext.freeze import AlwaysFrozen, FrozenBackbone, StepInterval, apply_dbf

OUTPUT_KINDS = ("tensor", "tuple", "list", "dict")


class NormEvalStage(nn.Module):
    """A stage whose ``train()`` keeps its BatchNorm in eval mode (mmdet's ``norm_eval=True``)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels_out)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TinyBody(nn.Module):
    """A backbone trunk with every kind of normalisation / stochastic layer that matters here.

    Input ``(B, 3, H, W)``; features ``c1 (B, 8, H/2, W/2)`` and ``c2 (B, 16, H/4, W/4)``,
    returned as ``c2`` alone ("tensor"), ``(c1, c2)``, ``[c1, c2]`` or ``{"c1": c1, "c2": c2}``.
    """

    def __init__(self, output_kind: str = "dict"):
        super().__init__()
        self.output_kind = output_kind
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GroupNorm(2, 8),
            FrozenBatchNorm2d(8),
        )
        self.stage2 = nn.Sequential(
            NormEvalStage(8, 16),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.SyncBatchNorm(16),
            nn.Dropout(0.5),
        )

    def forward(self, images):
        c1 = self.stem(images)
        c2 = self.stage2(c1)
        if self.output_kind == "tensor":
            return c2
        if self.output_kind == "tuple":
            return c1, c2
        if self.output_kind == "list":
            return [c1, c2]
        return OrderedDict(c1=c1, c2=c2)


def last_feature(features):
    """``c2`` from any of TinyBody's output structures."""
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(features, dict):
        return features["c2"]
    return features[-1]


class TinyDetector(nn.Module):
    """torchvision layout: ``backbone.body`` (trunk) + ``backbone.fpn`` + ``head``."""

    def __init__(self, output_kind: str = "dict"):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = TinyBody(output_kind)
        self.backbone.fpn = nn.Conv2d(16, 16, 1)
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 2, 1))

    def forward(self, images):
        return self.head(self.backbone.fpn(last_feature(self.backbone.body(images))))


def make_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    targets = torch.rand(4, 2, 4, 4, generator=generator)
    return images, targets


def training_step(model, optimizer, images, targets, set_to_none=True):
    optimizer.zero_grad(set_to_none=set_to_none)
    loss = nn.functional.mse_loss(model(images), targets)
    loss.backward()
    optimizer.step()


def cloned_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_states_equal(module: nn.Module, expected: dict[str, torch.Tensor]):
    actual = module.state_dict()
    assert actual.keys() == expected.keys()
    changed = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert changed == []


def parameter_names(module: nn.Module) -> set[str]:
    """State-dict names of the parameters (named_parameters() shows a FrozenBackbone's extra level)."""
    return {name for name, value in module.state_dict(keep_vars=True).items() if isinstance(value, nn.Parameter)}


def changed_parameters(module: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    state = module.state_dict()
    return {name for name in parameter_names(module) if not torch.equal(state[name], before[name])}


def warmed_up_body(output_kind: str) -> TinyBody:
    """A body whose BatchNorm running statistics are not the initial (0, 1)."""
    torch.manual_seed(0)
    body = TinyBody(output_kind)
    body.train()
    with torch.no_grad():
        for seed in range(3):
            body(make_batch(seed)[0] * 3 + 1)
    return body


def flatten(features):
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, dict):
        return list(features.values())
    return list(features)


# ----------------------------------------------------------------------------- forward semantics


@pytest.mark.parametrize("output_kind", OUTPUT_KINDS)
def test_frozen_outputs_equal_eval_outputs_without_graph(output_kind):
    body = warmed_up_body(output_kind)
    images = make_batch(5)[0].requires_grad_(True)
    body.eval()
    with torch.no_grad():
        expected = body(images)
    torch.manual_seed(1)
    train_mode_output = copy.deepcopy(body).train()(images)

    wrapper = FrozenBackbone(body, frozen=True)
    wrapper.train()
    actual = wrapper(images)

    assert type(actual) is type(expected)
    if isinstance(expected, dict):
        assert list(actual) == list(expected)
    assert len(flatten(actual)) == len(flatten(expected))
    tensors = zip(flatten(actual), flatten(expected), flatten(train_mode_output))
    for actual_tensor, expected_tensor, train_tensor in tensors:
        assert torch.equal(actual_tensor, expected_tensor)
        assert not actual_tensor.requires_grad and actual_tensor.grad_fn is None
        # The comparison discriminates: train mode (batch statistics, dropout) differs.
        assert not torch.allclose(train_tensor, expected_tensor)


def test_unfrozen_wrapper_is_transparent():
    body = warmed_up_body("dict")
    twin = copy.deepcopy(body)
    wrapper = FrozenBackbone(twin)
    images = make_batch(1)[0]
    torch.manual_seed(3)
    expected = body(images)
    torch.manual_seed(3)
    actual = wrapper(images)
    for actual_tensor, expected_tensor in zip(flatten(actual), flatten(expected)):
        assert torch.equal(actual_tensor, expected_tensor)
        assert actual_tensor.grad_fn is not None
    assert_states_equal(twin, cloned_state(body))  # same running-statistics update as unwrapped


# ------------------------------------------------------------------- modes and requires_grad state


def test_training_modes_forced_to_eval_and_restored_exactly():
    model = TinyDetector()
    model.train()
    body = model.backbone.body
    modes_before = {name: module.training for name, module in body.named_modules()}
    assert modes_before["stage2.0.bn"] is False and modes_before["stage2.2"] is True

    controller = apply_dbf(model, AlwaysFrozen())
    controller.on_epoch_start(0)
    wrapped = model.backbone.body.backbone
    assert wrapped is body
    for _ in range(2):  # a training loop calls model.train() every epoch; the body stays in eval
        assert all(not module.training for module in body.modules())
        assert model.backbone.body.training and model.head.training and model.head[1].training
        model.train()

    controller.backbone.set_frozen(False)
    assert {name: module.training for name, module in body.named_modules()} == modes_before


def test_unfreeze_restores_the_modes_the_model_was_set_to_while_frozen():
    model = TinyDetector()
    wrapper = apply_dbf(model, AlwaysFrozen()).backbone
    model.train()
    wrapper.set_frozen(True)
    model.eval()  # e.g. a validation pass that ends the frozen epoch
    wrapper.set_frozen(False)
    assert all(not module.training for module in model.modules())

    wrapper.set_frozen(True)
    model.train()
    wrapper.set_frozen(False)
    reference = TinyDetector().train()
    assert [module.training for module in model.backbone.body.backbone.modules()] == [
        module.training for module in reference.backbone.body.modules()
    ]


def test_requires_grad_restored_exactly_and_gradients_reach_backbone_again():
    model = TinyDetector()
    # As torchvision's trainable_backbone_layers does: the user fixes the stem themselves.
    for param in model.backbone.body.stem.parameters():
        param.requires_grad_(False)
    body = model.backbone.body
    flags_before = {name: param.requires_grad for name, param in body.named_parameters()}
    images, targets = make_batch()
    nn.functional.mse_loss(model(images), targets).backward()
    assert any(param.grad is not None for param in body.parameters())

    controller = apply_dbf(model, StepInterval([1]))
    controller.on_epoch_start(0)
    assert all(not param.requires_grad and param.grad is None for param in body.parameters())

    controller.on_epoch_start(1)
    assert {name: param.requires_grad for name, param in body.named_parameters()} == flags_before
    model.train()
    nn.functional.mse_loss(model(images), targets).backward()
    for name, param in body.named_parameters():
        if flags_before[name]:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


# -------------------------------------------------------------------------------- optimizer steps

OPTIMIZERS = {
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov_wd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad_none", "zero_grad_zeros"])
@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_frozen_epochs_leave_backbone_bit_identical(optimizer_name, set_to_none):
    torch.manual_seed(0)
    model = TinyDetector()
    controller = apply_dbf(model, StepInterval([0, 2]))
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    body = model.backbone.body
    model.train()

    controller.on_epoch_start(0)  # trained: the backbone gets momentum / Adam state
    for seed in range(2):
        training_step(model, optimizer, *make_batch(seed), set_to_none=set_to_none)
    assert all(param in optimizer.state for param in body.parameters())

    controller.on_epoch_start(1)  # frozen
    body_before, head_before = cloned_state(body), cloned_state(model.head)
    optimizer_state_before = [copy.deepcopy(optimizer.state[param]) for param in body.parameters()]
    model.train()
    for seed in range(2, 5):
        training_step(model, optimizer, *make_batch(seed), set_to_none=set_to_none)
    assert_states_equal(body, body_before)  # parameters and BatchNorm buffers
    for param, state_before in zip(body.parameters(), optimizer_state_before):
        for key, value in state_before.items():
            assert torch.equal(optimizer.state[param][key], value)
    assert changed_parameters(model.head, head_before) == parameter_names(model.head)

    controller.on_epoch_start(2)  # trained again: the backbone moves
    training_step(model, optimizer, *make_batch(6), set_to_none=set_to_none)
    assert changed_parameters(body, body_before) == parameter_names(body)


class DetachedOutputs(nn.Module):
    """The DBF reference code's 'freezing': the backbone runs with autograd, outputs detached."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, images):
        return {name: feature.detach() for name, feature in self.body(images).items()}


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_control_detach_only_freezing_moves_the_backbone(optimizer_name):
    # Shows that the protocol above detects movement: with only a detach, zero gradients plus
    # momentum / weight decay move the weights, and train-mode BatchNorm updates its statistics.
    torch.manual_seed(0)
    model = TinyDetector()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    model.train()
    for seed in range(2):
        training_step(model, optimizer, *make_batch(seed), set_to_none=False)
    body = model.backbone.body
    model.backbone.body = DetachedOutputs(body)
    body_before = cloned_state(body)
    for seed in range(2, 5):
        training_step(model, optimizer, *make_batch(seed), set_to_none=False)
    assert changed_parameters(body, body_before) == parameter_names(body)
    assert not torch.equal(body.stem[1].running_mean, body_before["stem.1.running_mean"])


# ------------------------------------------------------------------ weights_version and state dict


def test_weights_version_changes_only_when_weights_may_change():
    model = TinyDetector()
    wrapper = apply_dbf(model, AlwaysFrozen()).backbone
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    versions = [wrapper.weights_version]
    wrapper.set_frozen(True)
    versions.append(wrapper.weights_version)
    wrapper.set_frozen(True)  # no transition
    training_step(model, optimizer, *make_batch())
    model.train()
    model.eval()
    versions.append(wrapper.weights_version)
    model.load_state_dict(TinyDetector().state_dict())
    versions.append(wrapper.weights_version)
    wrapper.mark_weights_changed()
    versions.append(wrapper.weights_version)
    wrapper.set_frozen(False)
    versions.append(wrapper.weights_version)
    assert versions == [0, 1, 1, 2, 3, 4]


def test_state_dict_keys_are_those_of_the_unwrapped_model():
    plain = TinyDetector()
    wrapped = TinyDetector()
    expected_keys = list(wrapped.state_dict())
    apply_dbf(wrapped, AlwaysFrozen()).on_epoch_start(0)
    assert list(wrapped.state_dict()) == expected_keys
    assert list(wrapped.backbone.body.state_dict()) == list(plain.backbone.body.state_dict())

    wrapped.load_state_dict(plain.state_dict())  # strict
    assert_states_equal(wrapped, cloned_state(plain))
    assert all(not param.requires_grad for param in wrapped.backbone.body.parameters())
    reloaded = TinyDetector()
    reloaded.load_state_dict(wrapped.state_dict())  # strict, into an unwrapped model
    assert_states_equal(reloaded, cloned_state(plain))
    with pytest.raises(RuntimeError, match="Missing key"):
        wrapped.load_state_dict({key: value for key, value in plain.state_dict().items() if "stem.0" not in key})


def test_wrapper_reads_through_to_backbone_and_survives_copying():
    model = TinyDetector()
    body = model.backbone.body
    apply_dbf(model, AlwaysFrozen()).on_epoch_start(0)
    assert model.backbone.body.stage2 is body.stage2
    assert model.get_submodule("backbone.body.stem.0") is body.stem[0]
    with pytest.raises(AttributeError):
        _ = model.backbone.body.no_such_attribute
    images = make_batch()[0]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.backbone.body.frozen
        assert torch.equal(clone(images), model(images))


def test_apply_dbf_rejects_bad_paths_and_double_application():
    model = TinyDetector()
    with pytest.raises(ValueError, match="has children \\['body', 'fpn'\\]"):
        apply_dbf(model, AlwaysFrozen(), backbone="backbone.trunk")
    with pytest.raises(ValueError, match="dotted path"):
        apply_dbf(model, AlwaysFrozen(), backbone="")
    apply_dbf(model, AlwaysFrozen())
    for path in ("backbone.body", "backbone", "backbone.body.stage2"):
        with pytest.raises(ValueError, match="already"):
            apply_dbf(model, AlwaysFrozen(), backbone=path)
    with pytest.raises(TypeError):
        FrozenBackbone(lambda images: images)


# ------------------------------------------------------------------------- torchvision detectors


def detection_batch(num_images: int = 2, size: int = 128):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(num_images)]
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0, 30.0, 120.0, 100.0]]), "labels": torch.tensor([1, 2])}
        for _ in range(num_images)
    ]
    return images, targets


def detector_training_step(model, optimizer, images, targets):
    optimizer.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()


@pytest.mark.parametrize(
    "build",
    [
        torchvision.models.detection.fasterrcnn_resnet50_fpn,
        torchvision.models.detection.retinanet_resnet50_fpn,
        torchvision.models.detection.fcos_resnet50_fpn,
    ],
    ids=lambda build: build.__name__,
)
def test_torchvision_detector_frozen_step_changes_everything_but_the_body(build):
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128)
    controller = apply_dbf(model, StepInterval([0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    images, targets = detection_batch()
    controller.on_epoch_start(0)  # trained: momentum for the body
    detector_training_step(model, optimizer, images, targets)

    controller.on_epoch_start(1)  # frozen
    body = model.backbone.body
    body_before = cloned_state(body)
    rest = {name: module for name, module in model.named_children() if name != "backbone"}
    rest["fpn"] = model.backbone.fpn
    rest_before = {name: cloned_state(module) for name, module in rest.items()}
    detector_training_step(model, optimizer, images, targets)

    assert_states_equal(body, body_before)
    assert any(isinstance(module, nn.BatchNorm2d) for module in body.modules())  # buffers were compared
    for name, module in rest.items():
        assert changed_parameters(module, rest_before[name]) == parameter_names(module), name
