"""Oriented R-CNN (dbf_ext.models): the oriented RPN's targets and proposals and the rotated RoI
head's sampling against plain re-implementations, resizing, Dynamic R-CNN, DBF / feature cache
compatibility, every builder, bad input, and a whole-model overfit of a few synthetic images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList

import dbf_ext.assign.max_iou as max_iou_module
import dbf_ext.models as models
import dbf_ext.train as train
from dbf_ext.assign import DynamicRCNNController, MaxIoUAssignOptions
from dbf_ext.assign._reference import max_iou_assign_reference
from dbf_ext.boxes import obb2poly
from dbf_ext.cache import CachedBackbone, FeatureCache
from dbf_ext.freeze import AlwaysFrozen, apply_dbf
from dbf_ext.integrations.torchvision import use_dynamic_roi_heads
from dbf_ext.models import (
    DeltaXYWHAOBBoxCoder,
    MidpointOffsetCoder,
    OrientedRCNN,
    OrientedRPN,
    OrientedRPNHead,
    RotatedBoxPredictor,
    RotatedRoIHeads,
    build_detector,
)
from dbf_ext.ops import MultiScaleRoIAlignRotated, box_iou_rotated, roi_align_rotated

PI = math.pi


def enclosing_boxes(obbs: torch.Tensor) -> torch.Tensor:
    """Axis-aligned boxes around rotated ones, from their corners."""
    corners = obb2poly(obbs).reshape(-1, 4, 2)
    return torch.cat((corners.amin(1), corners.amax(1)), 1)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, overlap) -> list[int]:
    """Plain greedy NMS: visit by decreasing score, drop a box whose overlap with a kept one
    exceeds the threshold (``overlap(i, kept)`` says whether it does)."""
    kept: list[int] = []
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if not any(overlap(i, k) for k in kept):
            kept.append(i)
    return kept


def draw_rectangles(size: int, boxes: torch.Tensor, colours, generator) -> torch.Tensor:
    """A dark noisy ``(3, size, size)`` image with the rotated ``boxes`` filled in ``colours``
    (pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)``, centre ``(x + 0.5, y + 0.5)``)."""
    image = torch.rand(3, size, size, generator=generator) * 0.2
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for (cx, cy, w, h, theta), colour in zip(boxes.tolist(), colours):
        along = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
        across = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
        inside = (along.abs() <= w / 2) & (across.abs() <= h / 2)
        image[:, inside] = torch.tensor(colour)[:, None]
    return image


# ------------------------------------------------------------------------------------------------
# The RoIAlignRotated contract the model relies on
# ------------------------------------------------------------------------------------------------

def test_roi_align_rotated_contract_used_by_the_model(generator):
    features = torch.randn(2, 4, 16, 20, generator=generator, dtype=torch.float64)
    rois = torch.tensor([[0, 30.0, 22, 24, 12, 0], [1, 40, 30, 16, 20, 0], [0, 75, 60, 30, 10, 0]],
                        dtype=torch.float64)
    corners = torch.cat((rois[:, :1], rois[:, 1:3] - rois[:, 3:5] / 2, rois[:, 1:3] + rois[:, 3:5] / 2), 1)
    got = roi_align_rotated(features, rois, 7, 0.25, sampling_ratio=2)
    want = torchvision.ops.roi_align(features, corners, 7, 0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(got, want)
    # A quarter turn (clockwise, y down) with w and h swapped: the RoI frame's x axis points down
    # the image, its y axis to the left.
    turned = rois[:1].clone()
    turned[0, 3:] = torch.tensor([12, 24, PI / 2], dtype=torch.float64)
    upright = roi_align_rotated(features, rois[:1], (6, 4), 0.25, sampling_ratio=2)
    quarter = roi_align_rotated(features, turned, (4, 6), 0.25, sampling_ratio=2)
    torch.testing.assert_close(upright, quarter.transpose(2, 3).flip(3))
    # The pyramid version pools each RoI from level floor(log2(sqrt(w h) / 56)), clamped.
    pool = MultiScaleRoIAlignRotated(featmap_names=["a", "b"], output_size=7, sampling_ratio=2, finest_scale=56)
    levels = {"a": features, "b": torch.randn(2, 4, 8, 10, generator=generator, dtype=torch.float64)}
    # sqrt(w h) = 17 -> level 0; sqrt(150 * 90) = 116 -> floor(log2(116 / 56)) = 1.
    small, large = torch.tensor([[30.0, 22, 24, 12, 0.3]]), torch.tensor([[40.0, 30, 150, 90, -0.5]])
    pooled = pool(levels, [small.double(), large.double()], [(64, 80), (60, 78)])
    torch.testing.assert_close(pooled[:1], roi_align_rotated(levels["a"], F.pad(small.double(), (1, 0)), 7, 0.25, 2))
    torch.testing.assert_close(pooled[1:], roi_align_rotated(levels["b"], F.pad(large.double(), (1, 0), value=1),
                                                             7, 0.125, 2))


# ------------------------------------------------------------------------------------------------
# Oriented RPN
# ------------------------------------------------------------------------------------------------

def small_rpn(**options) -> OrientedRPN:
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    return OrientedRPN(anchors, OrientedRPNHead(8, 3), **options)


def rpn_inputs():
    """Two images padded to 64 x 64 (sizes 64 x 64 and 56 x 48), FPN levels at strides 8, 16."""
    images = ImageList(torch.zeros(2, 3, 64, 64), [(64, 64), (56, 48)])
    features = {"0": torch.zeros(2, 8, 8, 8), "1": torch.zeros(2, 8, 4, 4)}
    gts = [torch.tensor([[20.0, 24, 22, 8, 0.4], [44, 40, 30, 14, -1.1], [46, 42, 10, 6, 0.2]]),
           torch.tensor([[24.0, 30, 26, 12, 1.3]])]
    return images, features, gts


def test_rpn_assignment_matches_a_dense_reference():
    rpn = small_rpn(allowed_border=0)
    images, features, gts = rpn_inputs()
    anchors = rpn.anchor_generator(images, list(features.values()))
    labels, matched = rpn.assign_targets(anchors, gts, images.image_sizes)
    for image_anchors, (height, width), image_gts, got_labels, got_matched in zip(
            anchors, images.image_sizes, gts, labels, matched):
        inside = ((image_anchors[:, 0] >= 0) & (image_anchors[:, 1] >= 0) & (image_anchors[:, 2] < width)
                  & (image_anchors[:, 3] < height))
        assert 0 < inside.sum() < len(inside)  # the border rule is exercised
        enclosing = models.oriented_rpn.obb2hbb(image_gts)
        torch.testing.assert_close(enclosing, enclosing_boxes(image_gts))
        ref = max_iou_assign_reference(image_anchors[inside], enclosing, pos_iou_thr=0.7,
                                       neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
        want = torch.full_like(got_labels, -1)
        want[inside] = torch.where(ref.gt_inds > 0, 1, torch.where(ref.gt_inds == 0, 0, -1))
        assert torch.equal(got_labels, want)
        positive = want == 1
        assert positive.any() and (want == 0).any()
        want_matched = torch.zeros_like(got_matched)
        want_matched[inside] = (ref.gt_inds - 1).clamp(min=0)
        assert torch.equal(got_matched[positive], want_matched[positive])
    # allowed_border < 0: every anchor takes part.
    every = small_rpn(allowed_border=-1).assign_targets(anchors, gts, images.image_sizes)[0]
    assert all((image_labels >= 0).any() and len(image_labels) == len(a) for image_labels, a in zip(every, anchors))
    assert (every[0] != -1).sum() > (labels[0] != -1).sum()


def test_rpn_losses_match_a_reference_on_all_anchors(generator):
    # A sampler that takes every labelled anchor makes the losses deterministic.
    rpn = small_rpn(batch_size_per_image=10**7, positive_fraction=0.5)
    images, features, gts = rpn_inputs()
    anchors = rpn.anchor_generator(images, list(features.values()))
    num = anchors[0].shape[0]
    objectness = torch.randn(2, num, generator=generator, requires_grad=True)
    deltas = (torch.randn(2, num, 6, generator=generator) * 0.3).requires_grad_()
    losses = rpn.compute_loss(anchors, objectness, deltas, gts, images.image_sizes)
    labels, matched = rpn.assign_targets(anchors, gts, images.image_sizes)
    coder = MidpointOffsetCoder()
    logits, targets, box_terms = [], [], []
    for i in range(2):
        labelled = labels[i] >= 0
        logits.append(objectness[i, labelled])
        targets.append(labels[i][labelled].float())
        positive = labels[i] == 1
        want = coder.encode(anchors[i][positive], gts[i][matched[i][positive]])
        box_terms.append(F.smooth_l1_loss(deltas[i, positive], want, beta=1 / 9, reduction="sum"))
    count = sum(len(t) for t in targets)
    torch.testing.assert_close(losses["loss_objectness"],
                               F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(targets)))
    torch.testing.assert_close(losses["loss_rpn_box_reg"], sum(box_terms) / count)
    sum(losses.values()).backward()
    assert deltas.grad.abs().sum() > 0 and objectness.grad.abs().sum() > 0


def proposal_case(generator, count=(60, 20)):
    """Clustered anchors on two levels, random objectness and deltas."""
    anchors = []
    for n, size in zip(count, (16.0, 32.0)):
        centres = 30 + torch.rand(n, 2, generator=generator) * 20
        sides = size * (0.7 + 0.6 * torch.rand(n, 2, generator=generator))
        anchors.append(torch.cat((centres - sides / 2, centres + sides / 2), 1))
    anchors = torch.cat(anchors)
    objectness = torch.randn(anchors.shape[0], generator=generator)
    deltas = torch.randn(anchors.shape[0], 6, generator=generator) * 0.2
    return anchors, objectness, deltas, list(count)


@pytest.mark.parametrize("nms_box_type", ["hbb", "obb"])
def test_proposals_are_per_level_top_k_then_per_level_nms(generator, nms_box_type):
    rpn = small_rpn(pre_nms_top_n={"training": 30, "testing": 25}, post_nms_top_n={"training": 9, "testing": 12},
                    nms_thresh=0.5, nms_box_type=nms_box_type).eval()
    anchors, objectness, deltas, counts = proposal_case(generator)
    boxes, scores = rpn.select_proposals(anchors, objectness, deltas, counts)

    coder, candidates = MidpointOffsetCoder(), []
    start = 0
    for count in counts:
        order = torch.sort(objectness[start:start + count], descending=True).indices[:25] + start
        level_boxes = coder.decode(anchors[order], deltas[order])
        level_scores = objectness[order].sigmoid()
        if nms_box_type == "hbb":
            iou = torchvision.ops.box_iou(enclosing_boxes(level_boxes), enclosing_boxes(level_boxes))
        else:
            iou = box_iou_rotated(level_boxes, level_boxes)
        kept = greedy_nms(level_boxes, level_scores, lambda i, k, iou=iou: iou[i, k] > 0.5)
        assert len(kept) < len(order)  # NMS removed something on every level
        candidates += [(level_scores[i].item(), level_boxes[i]) for i in kept]
        start += count
    candidates.sort(key=lambda c: -c[0])
    assert len(candidates) > 12
    torch.testing.assert_close(scores, torch.tensor([c[0] for c in candidates[:12]]))
    torch.testing.assert_close(boxes, torch.stack([c[1] for c in candidates[:12]]))
    rpn.train()
    assert rpn.select_proposals(anchors, objectness, deltas, counts)[0].shape[0] == 9


def test_enclosing_box_nms_suppresses_a_crossing_box_that_rotated_nms_keeps():
    """Two thin boxes crossing as an X share their enclosing box (IoU 1) but overlap little;
    boxes of different levels never suppress each other."""
    coder = MidpointOffsetCoder()
    targets = torch.tensor([[50.0, 50, 60, 6, PI / 4], [50, 50, 60, 6, -PI / 4], [50, 50, 60, 6, PI / 4]])
    anchors = torch.tensor([[30.0, 30, 70, 70], [28, 28, 72, 72], [20, 20, 80, 80]])
    deltas = coder.encode(anchors, targets)
    objectness = torch.tensor([3.0, 2.0, 1.0])
    assert box_iou_rotated(targets[:1], targets[1:2]).item() < 0.2
    for box_type, want in (("hbb", [0, 2]), ("obb", [0, 1, 2])):
        rpn = small_rpn(nms_thresh=0.8, nms_box_type=box_type).eval()
        boxes, scores = rpn.select_proposals(anchors, objectness, deltas, [2, 1])
        torch.testing.assert_close(scores, objectness[want].sigmoid())
        torch.testing.assert_close(boxes, coder.decode(anchors, deltas)[want])


# ------------------------------------------------------------------------------------------------
# Rotated RoI head
# ------------------------------------------------------------------------------------------------

def small_roi_heads(**options) -> RotatedRoIHeads:
    pool = MultiScaleRoIAlignRotated(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return RotatedRoIHeads(pool, TwoMLPHead(8 * 49, 32), RotatedBoxPredictor(32, 4), **options)


def roi_case(generator):
    gts = [torch.tensor([[30.0, 30, 24, 10, 0.3], [70, 60, 30, 14, -1.0], [40, 80, 20, 20, 0.8]]),
           torch.zeros(0, 5)]
    labels = [torch.tensor([1, 3, 2]), torch.zeros(0, dtype=torch.int64)]
    jittered = gts[0].repeat(8, 1)
    jittered[:, :2] += torch.randn(24, 2, generator=generator) * 4
    jittered[:, 2:4] *= 1 + 0.3 * torch.randn(24, 2, generator=generator).clamp(-2, 2)
    jittered[:, 4] += torch.randn(24, generator=generator) * 0.3
    scattered = torch.cat((torch.rand(20, 2, generator=generator) * 100,
                           8 + torch.rand(20, 2, generator=generator) * 30,
                           torch.rand(20, 1, generator=generator) * PI), 1)
    proposals = [torch.cat((jittered, scattered)), scattered[:10]]
    return proposals, gts, labels


def test_roi_sampling_and_assignment_match_a_dense_reference(generator):
    proposals, gts, labels = roi_case(generator)
    heads = small_roi_heads(batch_size_per_image=64, positive_fraction=0.5)
    assert heads.assign_options == MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                                       match_low_quality=False)
    rois, roi_labels, matched = heads.select_training_samples(proposals, gts, labels)
    for image_rois, image_labels, image_matched, image_proposals, image_gts, gt_labels in zip(
            rois, roi_labels, matched, proposals, gts, labels):
        candidates = torch.cat((image_proposals, image_gts))
        # Every RoI is a candidate (a proposal or a gt box).
        assert (image_rois[:, None] == candidates[None]).all(-1).any(1).all()
        positive = image_labels > 0
        if len(image_gts) == 0:
            assert not positive.any() and len(image_rois) == len(image_proposals)
            continue
        iou = box_iou_rotated(image_rois.double(), image_gts.double())
        best, argmax = iou.max(1)
        is_gt = (image_rois[:, None] == image_gts[None]).all(-1).any(1)
        want = torch.where(best >= 0.5, gt_labels[argmax], 0)
        assert torch.equal(image_labels, want)
        torch.testing.assert_close(image_matched, image_gts[argmax[positive]])
        # All positives fit (at most 32 of 64), so every gt box is among them; negatives fill up.
        assert is_gt.sum() == len(image_gts) and positive[is_gt].all()
        num_negatives = (box_iou_rotated(image_proposals.double(), image_gts.double()).amax(1) < 0.5).sum()
        assert len(image_rois) == min(64, positive.sum() + num_negatives)
    # The sample size and the positive fraction are bounded.
    few = small_roi_heads(batch_size_per_image=8, positive_fraction=0.25)
    rois, roi_labels, _ = few.select_training_samples(proposals, gts, labels)
    assert len(rois[0]) == 8 and (roi_labels[0] > 0).sum() == 2


def test_roi_head_losses_match_a_reference(generator):
    proposals, gts, labels = roi_case(generator)
    heads = small_roi_heads(batch_size_per_image=32).train()
    features = {"0": torch.randn(2, 8, 16, 16, generator=generator)}
    shapes = [(128, 128), (128, 128)]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gts, labels)]
    torch.manual_seed(0)
    detections, losses = heads(features, proposals, shapes, targets)
    assert detections == [] and set(losses) == {"loss_classifier", "loss_box_reg"}
    torch.manual_seed(0)  # the same draws of the sampler
    rois, roi_labels, matched = heads.select_training_samples(proposals, gts, labels)
    logits, regression = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, shapes)))
    roi_labels = torch.cat(roi_labels)
    positive = roi_labels > 0
    targets_pos = DeltaXYWHAOBBoxCoder().encode(torch.cat(rois)[positive], torch.cat(matched))
    torch.testing.assert_close(losses["loss_classifier"], F.cross_entropy(logits, roi_labels))
    want_box = F.smooth_l1_loss(regression[positive], targets_pos, beta=1.0, reduction="sum") / len(roi_labels)
    torch.testing.assert_close(losses["loss_box_reg"], want_box)


def test_roi_head_inference_decodes_and_runs_multiclass_rotated_nms(generator):
    proposals, _, _ = roi_case(generator)
    heads = small_roi_heads(score_thresh=0.2, nms_thresh=0.1, detections_per_img=5).eval()
    features = {"0": torch.randn(2, 8, 16, 16, generator=generator)}
    with torch.no_grad():
        heads.box_predictor.bbox_pred.weight.normal_(std=0.05, generator=generator)
        detections, losses = heads(features, proposals, [(128, 128), (100, 90)])
        logits, regression = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals,
                                                                                   [(128, 128), (100, 90)])))
    assert losses == {}
    start = 0
    for image_proposals, shape, got in zip(proposals, [(128, 128), (100, 90)], detections):
        rows = slice(start, start + len(image_proposals))
        boxes = DeltaXYWHAOBBoxCoder().decode(image_proposals, regression[rows], max_shape=shape)
        scores = logits[rows].softmax(-1)
        # Plain reference: every (box, foreground class) above the threshold, greedy per class.
        pairs = [(scores[i, c].item(), i, c) for i in range(len(boxes)) for c in range(1, 4) if scores[i, c] > 0.2]
        pairs.sort(key=lambda p: -p[0])
        iou = box_iou_rotated(boxes, boxes)
        kept = []
        for score, i, c in pairs:
            if not any(c == kc and iou[i, ki] > 0.1 for _, ki, kc in kept):
                kept.append((score, i, c))
        kept = kept[:5]
        assert len(kept) > 0
        torch.testing.assert_close(got["scores"], torch.tensor([k[0] for k in kept]))
        assert got["labels"].tolist() == [k[2] for k in kept]
        torch.testing.assert_close(got["boxes"], boxes[[k[1] for k in kept]])
        assert (got["boxes"][:, 0] <= shape[1] - 1).all() and (got["boxes"][:, 1] <= shape[0] - 1).all()
        start += len(image_proposals)


# ------------------------------------------------------------------------------------------------
# Dynamic R-CNN on the rotated head
# ------------------------------------------------------------------------------------------------

def test_dynamic_rcnn_moves_the_rotated_heads_thresholds_and_beta(monkeypatch):
    torch.manual_seed(0)
    model = build_detector("oriented-rcnn-tiny-fpn", 3, 96, dynamic_rcnn=True)
    assert isinstance(model.roi_heads.controller, DynamicRCNNController)
    controller = DynamicRCNNController(iou_topk=2, beta_topk=2, update_iter_interval=2, initial_iou=0.3)
    assert use_dynamic_roi_heads(model, controller) is controller is model.roi_heads.controller
    assert model.roi_heads.assign_options == MaxIoUAssignOptions(pos_iou_thr=0.3, neg_iou_thr=0.3,
                                                                 min_pos_iou=0.3, match_low_quality=True)
    used, histories = [], []
    assign = max_iou_module.batched_max_iou_assign

    def spying_assign(*args, **kwargs):  # only the RoI head assigns through this module's name
        negative = kwargs["neg_iou_thr"]  # (lo, hi) once normalised by MaxIoUAssignOptions
        assert negative == (0.0, kwargs["pos_iou_thr"]) and kwargs["min_pos_iou"] == kwargs["pos_iou_thr"]
        used.append((kwargs["pos_iou_thr"], kwargs["box_type"]))
        return assign(*args, **kwargs)

    update = controller.update

    def spying_update():
        histories.append((list(controller.iou_history), list(controller.beta_history)))
        update()

    monkeypatch.setattr(max_iou_module, "batched_max_iou_assign", spying_assign)
    monkeypatch.setattr(controller, "update", spying_update)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[30.0, 30, 30, 12, 0.4], [60, 64, 36, 16, -0.9]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[48.0, 40, 40, 14, 1.2]]), "labels": torch.tensor([2])}]
    model.train()
    betas = []
    for _ in range(4):
        losses = model(images, targets)
        betas.append(model.roi_heads.box_loss.beta)
        sum(losses.values()).backward()
    assert controller.iteration == 4 and len(histories) == 2
    first_threshold = max(0.3, float(np.mean(histories[0][0])))
    assert [u[0] for u in used] == pytest.approx([0.3, 0.3, first_threshold, first_threshold])
    assert first_threshold > 0.3 and all(u[1] == "obb" for u in used)
    assert controller.iou_threshold == pytest.approx(max(0.3, float(np.mean(histories[1][0]))))
    assert model.roi_heads.assign_options.pos_iou_thr == pytest.approx(first_threshold)
    # The loss's beta is the controller's: 1 until the first update (after forward 2), then
    # min(1, median of the beta statistic) each update.
    expected, beta = [], 1.0
    for _, beta_history in histories:
        assert len(beta_history) == 2
        median = float(np.median(beta_history))
        beta = beta if median < 1e-15 else min(1.0, median)
        expected.append(beta)
    assert betas == pytest.approx([1.0, expected[0], expected[0], expected[1]])
    assert expected[1] < 1.0


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------

def test_tiny_oriented_rcnn_overfits_two_images():
    """Two 96 px images with two rotated rectangles each (two classes told apart by colour):
    the losses fall by more than 85 % and each gt's best detection of its class overlaps it
    with rotated IoU > 0.5."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    targets = [
        {"boxes": torch.tensor([[30.0, 32, 44, 18, 0.5], [66, 64, 40, 20, -1.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[48.0, 28, 48, 16, -0.3], [40, 68, 36, 22, 1.3]]), "labels": torch.tensor([2, 1])},
    ]
    colours = {1: (0.9, 0.2, 0.2), 2: (0.2, 0.3, 0.9)}
    images = [draw_rectangles(96, t["boxes"], [colours[int(c)] for c in t["labels"]], generator) for t in targets]
    model = build_detector("oriented-rcnn-tiny-fpn", 2, 96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(50):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.15 * history[0]
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for got, target in zip(detections, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            mine = got["labels"] == label
            assert mine.any()
            best = got["boxes"][mine][0]  # detections come by decreasing score
            assert got["scores"][mine][0] > 0.5
            assert box_iou_rotated(best[None], box[None]).item() > 0.5


def test_eval_boxes_come_back_in_original_coordinates():
    """A 96 x 128 image is resized by 0.5 (min_size = max_size = 64); the same model on the
    image resized beforehand (not resized again) detects the same boxes at half the size."""
    torch.manual_seed(0)
    # Normalisation off, so that resizing before the model and in it give the same pixels.
    model = build_detector("oriented-rcnn-tiny-fpn", 3, 64, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 96, 128, generator=generator)
    small = F.interpolate(image[None], scale_factor=0.5, mode="bilinear", recompute_scale_factor=False,
                          align_corners=False)[0]
    with torch.no_grad():
        big_out, small_out = model([image, small])
    assert len(big_out["boxes"]) > 0
    torch.testing.assert_close(big_out["scores"], small_out["scores"])
    assert torch.equal(big_out["labels"], small_out["labels"])
    torch.testing.assert_close(big_out["boxes"][:, :4], 2 * small_out["boxes"][:, :4])
    torch.testing.assert_close(big_out["boxes"][:, 4], small_out["boxes"][:, 4])
    assert model.box_type == "obb" and model.angle_version == "le90"
    assert ((big_out["boxes"][:, 2] >= big_out["boxes"][:, 3]).all()
            and (big_out["boxes"][:, 4].abs() <= PI / 2).all())


def test_transform_scales_images_and_rotated_targets_alike():
    """Targets are scaled by the image's factor; the image is resampled with that exact factor
    (pixel centres at (x + 0.5) s - 0.5): at s = 0.5 a drawn rectangle's centroid halves."""
    model = build_detector("oriented-rcnn-tiny-fpn", 3, 64).train()
    box = torch.tensor([[70.3, 41.7, 40, 14, 0.6]])
    image = (draw_rectangles(128, box, [(1.0, 1.0, 1.0)], torch.Generator().manual_seed(0)) > 0.5).float()
    images, targets = model.transform([image], [{"boxes": box, "labels": torch.tensor([1])}])
    assert images.image_sizes == [(64, 64)]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[35.15, 20.85, 20, 7, 0.6]]))
    assert torch.equal(box, torch.tensor([[70.3, 41.7, 40, 14, 0.6]]))  # the caller's target is untouched
    # Undo the normalisation, then compare mass centroids (pixel x covers [x, x + 1)).
    std = torch.tensor(model.transform.image_std)[:, None, None]
    mean = torch.tensor(model.transform.image_mean)[:, None, None]
    resized = images.tensors[0] * std + mean

    def centroid(pixels):
        mass = pixels.double().sum(0)
        ys, xs = torch.meshgrid(torch.arange(mass.shape[0]) + 0.5, torch.arange(mass.shape[1]) + 0.5, indexing="ij")
        return torch.stack(((mass * xs).sum(), (mass * ys).sum())) / mass.sum()

    torch.testing.assert_close(centroid(resized), centroid(image) * 0.5, atol=1e-3, rtol=0)
    assert (centroid(image) - box[0, :2]).abs().max() < 0.5


# The standard models keep their structure but pool fewer RoIs here (their 1024-d head on
# 2000 proposals is most of a CPU forward; test_mmrotate_config_defaults checks the defaults).
FEWER_ROIS = {"oriented-rcnn-r50-fpn": dict(rpn_post_nms_top_n_test=100, box_batch_size_per_image=64),
              "oriented-rcnn-swin-t-fpn": dict(rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)}


@pytest.mark.parametrize("name", models.ORIENTED_RCNN_MODELS)
def test_every_oriented_builder_trains_and_predicts(name):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3, image_size=64, **FEWER_ROIS.get(name, {}))
    assert isinstance(model, OrientedRCNN) and model.box_type == "obb" == models.detector_box_type(name)
    assert hasattr(model.backbone, "body") and model.num_classes == 4
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=generator), torch.rand(3, 48, 60, generator=generator)]
    targets = [{"boxes": torch.tensor([[20.0, 24, 24, 10, 0.3], [44, 40, 20, 12, -1.2]]),
                "labels": torch.tensor([1, 3]), "difficult": torch.tensor([False, False]), "image_id": "a"},
               {"boxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.int64)}]  # background only
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    assert model.rpn.head.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for output in detections:
        assert set(output) == {"boxes", "scores", "labels"}
        count = output["boxes"].shape[0]
        assert output["boxes"].shape == (count, 5) and output["scores"].shape == (count,)
        assert output["labels"].dtype == torch.int64 and ((output["labels"] >= 1) & (output["labels"] <= 3)).all()


def test_mmrotate_config_defaults_of_the_standard_model():
    model = build_detector("oriented-rcnn-r50-fpn", 15, 1024)
    rpn, heads = model.rpn, model.roi_heads
    assert rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert rpn.assign_thresholds == {"pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "min_pos_iou": 0.3}
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    assert rpn._pre_nms_top_n == rpn._post_nms_top_n == {"training": 2000, "testing": 2000}
    assert (rpn.nms_thresh, rpn.nms_box_type, rpn.allowed_border, rpn.smooth_l1_beta) == (0.8, "hbb", 0, 1 / 9)
    assert rpn.box_coder.stds == (1, 1, 1, 1, 0.5, 0.5) and rpn.box_coder.angle_version == "le90"
    assert heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"] and heads.box_roi_pool.sampling_ratio == 2
    assert heads.box_head.fc7.out_features == 1024 and model.num_classes == 16
    assert heads.box_predictor.bbox_pred.out_features == 5
    assert heads.assign_options == MaxIoUAssignOptions(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                                       match_low_quality=False)
    assert (heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction) == (512, 0.25)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.1, 2000)
    assert heads.box_loss.beta == 1.0 and heads.controller is None
    coder = heads.box_coder
    assert (coder.stds, coder.edge_swap, coder.proj_xy, coder.norm_factor) == ((0.1, 0.1, 0.2, 0.2, 0.1), True,
                                                                               True, None)
    assert (model.transform.min_size, model.transform.max_size) == ((1024,), 1024)
    # Options reach the constructor.
    assert build_detector("oriented-rcnn-tiny-fpn", 2, 64, rpn_nms_box_type="obb").rpn.nms_box_type == "obb"


def test_old_names_still_work_through_dbf_ext_train():
    from dbf_ext.train.model import build_detector as old_build
    from dbf_ext.train.model import tiny_trunk

    assert train.MODELS is models.MODELS and train.build_detector is models.build_detector is old_build
    assert set(models.FASTER_RCNN_MODELS) | set(models.ORIENTED_RCNN_MODELS) == set(models.MODELS)
    model = train.build_detector("tiny-fpn", 3, 64)
    assert isinstance(model, torchvision.models.detection.FasterRCNN) and model.box_type == "hbb"
    assert models.detector_box_type("swin-t-fpn") == "hbb"
    assert [name for name, _ in model.backbone.body.named_children()] == [
        name for name, _ in tiny_trunk().named_children()]
    with pytest.raises(ValueError, match="model must be one of"):
        build_detector("oriented-rcnn-r101", 3, 64)
    with pytest.raises(ValueError, match="model must be one of"):
        models.detector_box_type("yolo")


def test_dbf_and_the_feature_cache_wrap_the_oriented_backbone():
    """As the training engine does: FrozenBackbone around backbone.body, a CachedBackbone
    around that, input sizes from the transform. The trunk runs once per forward; a second
    frozen pass is served from the cache with the same losses (float32 store)."""
    torch.manual_seed(0)
    model = build_detector("oriented-rcnn-tiny-fpn", 3, 96)
    dbf = apply_dbf(model, AlwaysFrozen())
    dbf.on_epoch_start(0)
    cached = CachedBackbone(dbf.backbone, FeatureCache("float32", cpu_bytes=1 << 26))
    cached.watch_input_sizes(model.transform)
    model.backbone.body = cached
    calls = []
    dbf.backbone.backbone.register_forward_hook(lambda *_: calls.append(1))
    generator = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 96, 96, generator=generator), torch.rand(3, 80, 96, generator=generator)]
    targets = [{"boxes": torch.tensor([[30.0, 30, 30, 12, 0.4]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[50.0, 40, 36, 14, -0.7]]), "labels": torch.tensor([1])}]
    keys = [("a", "noflip"), ("b", "noflip")]
    model.train()
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        with cached.batch_keys(keys):
            results.append({k: v.detach() for k, v in model(images, targets).items()})
    assert len(calls) == 1  # the second pass was served from the cache
    assert cached.cache.stats.hits == 2 and cached.cache.stats.misses == 2
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_bad_input_gives_one_line_errors():
    model = build_detector("oriented-rcnn-tiny-fpn", 3, 64).train()
    image = torch.rand(3, 64, 64)

    def target(boxes, labels=(1,)):
        return [{"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}]

    with pytest.raises(ValueError, match="targets are required"):
        model([image])
    with pytest.raises(ValueError, match=r"must have shape \(N, 5\)"):
        model([image], target([[0.0, 0, 10, 10]]))
    with pytest.raises(ValueError, match=r"labels'\] must be in \[1, 3\]"):
        model([image], target([[20.0, 20, 10, 5, 0]], (4,)))
    with pytest.raises(ValueError, match=r"labels'\] must be in \[1, 3\]"):
        model([image], target([[20.0, 20, 10, 5, 0]], (0,)))
    with pytest.raises(ValueError, match="finite with w > 0"):
        model([image], target([[20.0, 20, 0, 5, 0]]))
    with pytest.raises(ValueError, match="finite with w > 0"):
        model([image], target([[20.0, math.nan, 10, 5, 0]]))
    with pytest.raises(ValueError, match="one dict per image"):
        model([image, image], target([[20.0, 20, 10, 5, 0]]))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        model([torch.rand(1, 64, 64)], target([[20.0, 20, 10, 5, 0]]))
    with pytest.raises(TypeError, match="float"):
        model([torch.zeros(3, 64, 64, dtype=torch.uint8)], target([[20.0, 20, 10, 5, 0]]))
    with pytest.raises(TypeError, match="non-empty list"):
        model(image)
    with pytest.raises(ValueError, match="nms_box_type"):
        build_detector("oriented-rcnn-tiny-fpn", 3, 64, rpn_nms_box_type="poly")
    with pytest.raises(ValueError, match="not both or neither"):
        OrientedRCNN(model.backbone)
    with pytest.raises(ValueError, match="out_channels"):
        OrientedRCNN(torch.nn.Identity(), num_classes=3)
