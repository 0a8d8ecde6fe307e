"""Oriented R-CNN's proposal NMS: the enclosing axis-aligned boxes per level (mmrotate's
choice, ``rpn_nms_box_type="hbb"``) against exact rotated NMS (``"obb"``).

``oriented-rcnn-tiny-fpn`` is trained once on the synthetic aerial set (48 training tiles of
256 px, batch 4, AdamW, a plain loop on the CPU), then evaluated on the 16 validation tiles
with the same weights under both NMS kinds: the time of the proposal step (RPN head, top-k,
decoding, NMS) per batch of 4 tiles, the recall of the non-difficult gts by the top-k
proposals at rotated IoU 0.5 and 0.7 (up to 300 proposals per image in this measurement), and the
detector's rotated VOC07 mAP50 with them.
Run: ``python -m pytest bench/bench_oriented_rpn.py --benchmark-only``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dbf_ext.data import DotaDetectionDataset
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.evaluation import eval_map
from dbf_ext.models import build_detector
from dbf_ext.ops import box_iou_rotated

EPOCHS = 12
BATCH = 4
TOP_K = (50, 150, 300)


@pytest.fixture(scope="module")
def trained():
    """The trained model, the validation split, and the training time."""
    root = prepare_synthetic_dota(SyntheticConfig(), quiet=True)
    train_set = DotaDetectionDataset(root, "train", box_type="obb")
    val_set = DotaDetectionDataset(root, "val", classes=train_set.classes, box_type="obb")
    torch.manual_seed(0)
    model = build_detector("oriented-rcnn-tiny-fpn", train_set.num_classes, 256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    samples = [train_set[i] for i in range(len(train_set))]
    model.train()
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(order), BATCH):
            batch = [samples[i] for i in order[start:start + BATCH]]
            losses = model([image for image, _ in batch], [target for _, target in batch])
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    model.eval()
    model.rpn._post_nms_top_n["testing"] = max(TOP_K)
    return model, val_set, time.perf_counter() - started


def _batches(val_set):
    images = [val_set.load_image(i) for i in range(len(val_set))]
    return [images[i:i + BATCH] for i in range(0, len(images), BATCH)]


@pytest.mark.parametrize("nms_box_type", ["hbb", "obb"])
def test_proposal_nms_recall_and_time(benchmark, trained, nms_box_type):
    model, val_set, train_seconds = trained
    model.rpn.nms_box_type = nms_box_type
    benchmark.group = "oriented-rcnn-tiny-fpn proposals, 16 synthetic 256 px tiles (batches of 4), CPU"
    batches = _batches(val_set)
    with torch.no_grad():
        inputs = []
        for images in batches:
            image_list, _ = model.transform(images)
            inputs.append((image_list, model.backbone(image_list.tensors)))

        def propose():
            return [model.rpn(image_list, features)[0] for image_list, features in inputs]

        proposals = [p for batch in benchmark.pedantic(propose, rounds=5, iterations=1, warmup_rounds=1)
                     for p in batch]
        detections = [d for images in batches for d in model(images)]
    annotations = val_set.eval_annotations()
    recall = {}
    for k in TOP_K:
        for iou_thr in (0.5, 0.7):
            found = total = 0
            for image_proposals, annotation in zip(proposals, annotations):
                gts = torch.from_numpy(annotation["bboxes"]).float()
                total += len(gts)
                if len(gts) and len(image_proposals):
                    best = box_iou_rotated(gts, image_proposals[:k]).amax(1)
                    found += int((best >= iou_thr).sum())
            recall[f"recall@{k} IoU{iou_thr}"] = round(found / total, 4)
    results = []
    for output in detections:
        boxes, scores, labels = output["boxes"].double(), output["scores"].double(), output["labels"] - 1
        results.append([torch.cat((boxes[labels == c], scores[labels == c, None]), 1).numpy()
                        for c in range(val_set.num_classes)])
    mean_ap, _ = eval_map(results, annotations, iou_thr=0.5, box_type="obb", use_07_metric=True)
    benchmark.extra_info.update({
        "device": "cpu",
        **recall,
        "mean proposals per image": round(float(np.mean([len(p) for p in proposals])), 1),
        "rotated mAP50": round(float(mean_ap), 4),
        "training s (once, 12 epochs)": round(train_seconds, 1),
    })
