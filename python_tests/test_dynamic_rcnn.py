"""Dynamic R-CNN: the controller against mmdetection's bookkeeping, the loss, and the
torchvision RoI heads on a small Faster R-CNN."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models.detection import FasterRCNN, fasterrcnn_mobilenet_v3_large_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

import dbf_ext.assign.max_iou as max_iou_module
from dbf_ext.assign import (
    DynamicRCNNController,
    DynamicSmoothL1Loss,
    MaxIoUAssignOptions,
    batched_max_iou_assign,
)
from dbf_ext.integrations.torchvision import DynamicRoIHeads, use_dynamic_roi_heads


class MmdetDynamicBookkeeping:
    """mmdetection's DynamicRoIHead statistics and update, written out plainly."""

    def __init__(self, iou_topk, beta_topk, update_iter_interval, initial_iou, initial_beta):
        self.iou_topk, self.beta_topk = iou_topk, beta_topk
        self.interval, self.initial_iou, self.initial_beta = (
            update_iter_interval, initial_iou, initial_beta)
        self.iou_thr, self.beta = initial_iou, initial_beta
        self.iou_history, self.beta_history = [], []

    def forward_train(self, max_overlaps_per_image, positive_targets, num_images):
        cur_iou = []
        for max_overlaps in max_overlaps_per_image:  # gts already prepended with IoU 1
            k = min(self.iou_topk, len(max_overlaps))
            cur_iou.append(torch.topk(max_overlaps, k).values[-1].item())
        self.iou_history.append(np.mean(cur_iou))
        if len(positive_targets) > 0:
            cur_target = positive_targets[:, :2].abs().mean(dim=1)
            k = min(self.beta_topk * num_images, len(positive_targets))
            self.beta_history.append(torch.kthvalue(cur_target, k)[0].item())
        if len(self.iou_history) % self.interval == 0:
            self.iou_thr = max(self.initial_iou, np.mean(self.iou_history))
            self.iou_history = []
            if np.median(self.beta_history) >= 1e-15:
                self.beta = min(self.initial_beta, np.median(self.beta_history))
            self.beta_history = []


def random_image(generator, num_gts, num_proposals):
    """(proposals, gts, labels): proposals scattered around the gts (or anywhere without)."""
    corner = torch.rand(num_gts, 2, generator=generator) * 150
    gts = torch.cat((corner, corner + 10 + torch.rand(num_gts, 2, generator=generator) * 60), 1)
    if num_gts:
        base = gts[torch.randint(0, num_gts, (num_proposals,), generator=generator)]
    else:
        base = torch.tensor([0.0, 0.0, 50.0, 50.0]).expand(num_proposals, 4)
    proposals = base + torch.randn(num_proposals, 4, generator=generator) * 8
    proposals[:, 2:] = torch.max(proposals[:, 2:], proposals[:, :2] + 1)
    return proposals, gts, torch.randint(1, 5, (num_gts,), generator=generator)


def test_controller_matches_mmdetection_bookkeeping():
    generator = torch.Generator().manual_seed(0)
    options = dict(iou_topk=20, beta_topk=3, update_iter_interval=3, initial_iou=0.4,
                   initial_beta=1.0)
    controller, reference = DynamicRCNNController(**options), MmdetDynamicBookkeeping(**options)
    seen_thresholds = set()
    for iteration in range(12):
        images = [random_image(generator, g, n) for g, n in [(3, 40), (0, 15), (25, 10)]]
        proposals, gts, labels = (list(column) for column in zip(*images))
        results = batched_max_iou_assign(proposals, gts, labels, **controller.assigner_options(),
                                         match_low_quality=True, return_topk_iou=20,
                                         topk_with_gts=True)
        controller.record_iou([r.kth_largest_overlap for r in results])
        # Targets shrink over the iterations; no positives at all in iteration 5.
        num_pos = 0 if iteration == 5 else 7 + iteration
        targets = torch.randn(num_pos, 4, generator=generator) / (1 + iteration)
        controller.record_beta(targets, num_images=3)
        updated = controller.step()

        with_gts = [torch.cat((torch.ones(len(g)), r.max_overlaps)) for r, g in zip(results, gts)]
        reference.forward_train(with_gts, targets, 3)
        assert updated == ((iteration + 1) % 3 == 0)
        assert controller.iou_threshold == pytest.approx(reference.iou_thr, abs=1e-12)
        assert controller.beta == pytest.approx(reference.beta, abs=1e-12)
        assert controller.iou_history == pytest.approx(reference.iou_history, abs=1e-12)
        assert controller.beta_history == pytest.approx(reference.beta_history, abs=1e-12)
        seen_thresholds.add(controller.iou_threshold)
    assert len(seen_thresholds) > 2 and controller.beta < 1.0  # both really moved


def test_update_rules_and_edge_cases():
    controller = DynamicRCNNController(update_iter_interval=2, initial_iou=0.5, initial_beta=0.8)
    controller.record_iou(torch.tensor([0.3, math.nan]))  # NaN: an image without candidates
    controller.record_iou([math.nan])  # nothing left: nothing recorded
    controller.record_beta(torch.zeros(0, 4), num_images=2)  # no positives: skipped
    assert controller.iou_history == pytest.approx([0.3]) and controller.beta_history == []
    assert not controller.step() and controller.step()
    assert controller.iou_threshold == 0.5 and controller.beta == 0.8  # floors / empty history
    controller.record_iou([0.7, 0.9])
    controller.record_beta(torch.zeros(5, 4), num_images=1)  # median 0 < 1e-15: beta unchanged
    controller.step()
    controller.step()
    assert controller.iou_threshold == pytest.approx(0.8) and controller.beta == 0.8
    controller.record_beta(torch.full((4, 4), 0.1), num_images=1)
    controller.record_beta(torch.full((4, 4), 0.3), num_images=1)
    controller.step()
    controller.step()
    assert controller.beta == pytest.approx(0.2)  # median of two
    assert controller.assigner_options() == {"pos_iou_thr": controller.iou_threshold,
                                             "neg_iou_thr": controller.iou_threshold,
                                             "min_pos_iou": controller.iou_threshold}
    with pytest.raises(ValueError, match="update_iter_interval"):
        DynamicRCNNController(update_iter_interval=0)
    with pytest.raises(ValueError, match=r"shape \(P, 4\)"):
        controller.record_beta(torch.zeros(4), num_images=1)


def test_state_dict_round_trip(tmp_path):
    controller = DynamicRCNNController(update_iter_interval=4)
    for value in (0.5, 0.6, 0.7, 0.8, 0.9):
        controller.record_iou([value])
        controller.record_beta(torch.full((2, 4), value / 10), num_images=1)
        controller.step()
    path = tmp_path / "controller.pt"
    torch.save(controller.state_dict(), path)
    restored = DynamicRCNNController(update_iter_interval=4)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.state_dict() == controller.state_dict()
    for c in (controller, restored):  # both continue identically
        for _ in range(3):
            c.record_iou([0.95])
            c.step()
    assert restored.state_dict() == controller.state_dict() and restored.iteration == 8


def test_dynamic_smooth_l1_loss():
    pred = torch.tensor([[0.0, 0.5, 2.0, -3.0]], requires_grad=True)
    target = torch.zeros(1, 4)
    controller = DynamicRCNNController(initial_beta=1.0)
    loss = DynamicSmoothL1Loss(reduction="sum", controller=controller)
    assert loss(pred, target).item() == pytest.approx(0.125 + 1.5 + 2.5)
    controller.beta = 0.0  # L1
    assert loss(pred, target).item() == pytest.approx(5.5)
    fixed = DynamicSmoothL1Loss(beta=0.5, reduction="mean", loss_weight=2.0)
    want = 2.0 * torch.nn.functional.smooth_l1_loss(pred, target, beta=0.5, reduction="sum") / 8
    torch.testing.assert_close(fixed(pred, target, avg_factor=8), want)
    assert fixed(pred[:0], target[:0]).item() == 0.0
    fixed(pred, target).backward()
    assert pred.grad is not None
    with pytest.raises(ValueError, match="beta"):
        fixed.beta = -1.0


def _distributed_worker(rank, world_size, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        controller = DynamicRCNNController(update_iter_interval=2, initial_iou=0.0,
                                           distributed=True)
        # Rank 0 contributes IoUs 0.2, 0.4 and beta statistics 0.1; rank 1 IoUs 0.6, 0.8 and
        # no beta statistic (no positives).
        for step in range(2):
            controller.record_iou([0.2 + 0.4 * rank + 0.2 * step])
            if rank == 0:
                controller.record_beta(torch.full((3, 4), 0.1), num_images=1)
            controller.step()
        assert controller.iou_threshold == pytest.approx(0.5)  # mean of 0.2, 0.4, 0.6, 0.8
        assert controller.beta == pytest.approx(0.1)  # rank 1 too
    finally:
        dist.destroy_process_group()


def test_histories_are_gathered_across_ranks(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init")), nprocs=2)


# ---------------------------------------------------------------------------------------------
# torchvision integration
# ---------------------------------------------------------------------------------------------

def tiny_faster_rcnn():
    """A Faster R-CNN with a two-layer backbone: torchvision's heads at a tiny cost."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = 32
    return FasterRCNN(
        backbone, min_size=128, max_size=128,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(32 * 7 * 7, 128), box_predictor=FastRCNNPredictor(128, 4),
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, box_batch_size_per_image=64,
    )


def training_batch():
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20, 60, 90], [70, 60, 120, 110], [72, 60, 120, 112]]),
         "labels": torch.tensor([1, 3, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # background
    ]
    return images, targets


def test_dynamic_roi_heads_train_and_update(monkeypatch):
    model = tiny_faster_rcnn()
    before = copy.deepcopy(model.state_dict())
    controller = DynamicRCNNController(iou_topk=2, beta_topk=2, update_iter_interval=2,
                                       initial_iou=0.3, initial_beta=1.0)
    assert use_dynamic_roi_heads(model, controller) is controller
    assert isinstance(model.roi_heads, DynamicRoIHeads)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    thresholds_used = []
    assign = max_iou_module.batched_max_iou_assign

    def spying_assign(*args, **kwargs):
        thresholds_used.append(kwargs["pos_iou_thr"])
        return assign(*args, **kwargs)

    # The RoI head assigns through dbf_ext.assign.assign_proposals_with_gts (the RPN keeps
    # torchvision's matcher).
    monkeypatch.setattr(max_iou_module, "batched_max_iou_assign", spying_assign)
    histories = []
    update = controller.update

    def spying_update():
        histories.append((list(controller.iou_history), list(controller.beta_history)))
        update()

    monkeypatch.setattr(controller, "update", spying_update)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, targets = training_batch()
    model.train()
    for _ in range(4):
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                               "loss_rpn_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
        optimizer.step()

    assert controller.iteration == 4 and len(histories) == 2
    # iou_topk = 2 and image 0 has 3 gts (IoU 1): its statistic is 1; image 1 has no gt and
    # no proposal overlaps anything: 0. Mean 0.5 every iteration.
    for iou_history, beta_history in histories:
        assert iou_history == pytest.approx([0.5, 0.5])
        assert len(beta_history) == 2
    assert controller.iou_threshold == pytest.approx(0.5)
    beta = 1.0
    for _, beta_history in histories:  # a median below 1e-15 leaves beta unchanged
        median = np.median(beta_history)
        beta = beta if median < 1e-15 else min(1.0, median)
    assert controller.beta == pytest.approx(beta)
    # Thresholds in force: the initial one for two iterations, then the updated one.
    assert thresholds_used == pytest.approx([0.3, 0.3, 0.5, 0.5])
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_assignment_follows_mmdetection_with_gts_added_after():
    """Proposals assigned without the gts; each gt box appended as its own positive."""
    model = tiny_faster_rcnn()
    use_dynamic_roi_heads(model, DynamicRCNNController(initial_iou=0.5))
    heads = model.roi_heads
    generator = torch.Generator().manual_seed(3)
    proposals, gts, labels = random_image(generator, 4, 30)
    with_gts = heads.add_gt_proposals([proposals], [gts])
    matched, box_labels = heads.assign_targets_to_proposals(with_gts, [gts], [labels])
    result = batched_max_iou_assign([proposals], [gts], [labels], pos_iou_thr=0.5,
                                    neg_iou_thr=0.5, min_pos_iou=0.5)[0]
    assert matched[0].tolist() == (result.gt_inds - 1).clamp(min=0).tolist() + [0, 1, 2, 3]
    want = torch.where(result.gt_inds > 0, result.labels, 0).tolist() + labels.tolist()
    assert box_labels[0].tolist() == want


def test_assigner_flags_kept_thresholds_follow_the_controller():
    model = tiny_faster_rcnn()
    controller = DynamicRCNNController(initial_iou=0.4)
    use_dynamic_roi_heads(model, controller, gt_max_assign_all=False)
    heads = model.roi_heads
    assert heads.assign_options == MaxIoUAssignOptions(
        pos_iou_thr=0.4, neg_iou_thr=0.4, min_pos_iou=0.4, gt_max_assign_all=False)
    controller.iou_threshold = 0.6
    generator = torch.Generator().manual_seed(5)
    proposals, gts, labels = random_image(generator, 3, 20)
    matched, _ = heads.assign_targets_to_proposals(heads.add_gt_proposals([proposals], [gts]),
                                                   [gts], [labels])
    assert heads.assign_options == MaxIoUAssignOptions(
        pos_iou_thr=0.6, neg_iou_thr=0.6, min_pos_iou=0.6, gt_max_assign_all=False)
    result = batched_max_iou_assign([proposals], [gts], [labels], pos_iou_thr=0.6,
                                    neg_iou_thr=0.6, min_pos_iou=0.6, gt_max_assign_all=False)[0]
    assert matched[0][:20].tolist() == (result.gt_inds - 1).clamp(min=0).tolist()


def test_swap_keeps_inference_and_weights():
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3,
                                              min_size=128, max_size=128)
    model.eval()
    images = [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(7))]
    with torch.no_grad():
        want = model(images)[0]
        use_dynamic_roi_heads(model)
        got = model(images)[0]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert not model.roi_heads.training
    with pytest.raises(TypeError, match="Faster R-CNN"):
        use_dynamic_roi_heads(nn.Linear(2, 2))
