"""mAP evaluation against an independent plain implementation (shapely IoU, VOC AP from scratch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely_reference import iou_matrix

from dbf_ext.data import DotaDetectionDataset, write_dota_labels
from dbf_ext.evaluation import average_precision, box_iou_hbb, detections_by_class, eval_map, evaluate_detections

# ----- the reference: DOTA devkit structure (one global ranking, then matching in that order) ---


def reference_iou(det, gt, box_type):
    if box_type == "obb":
        return float(iou_matrix([det], [gt])[0, 0])
    iw = max(0.0, min(det[2], gt[2]) - max(det[0], gt[0]))
    ih = max(0.0, min(det[3], gt[3]) - max(det[1], gt[1]))
    union = (det[2] - det[0]) * (det[3] - det[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def reference_voc_ap(recall, precision, use_07_metric):
    if use_07_metric:
        total = 0.0
        for i in range(11):
            threshold = i * 0.1  # the devkit's float thresholds (0.30000000000000004, ...)
            reached = [p for r, p in zip(recall, precision) if r >= threshold]
            total += max(reached) if reached else 0.0
        return total / 11
    points = [(0.0, 0.0)] + list(zip(recall, precision)) + [(1.0, 0.0)]
    ap = 0.0
    for k in range(1, len(points)):
        step = points[k][0] - points[k - 1][0]
        if step > 0:
            ap += step * max(p for _, p in points[k:])
    return ap


def reference_eval(det_results, annotations, iou_thr, box_type, use_07_metric):
    num_classes = len(det_results[0])
    results = []
    for c in range(num_classes):
        gts = {}
        num_gts = 0
        for i, ann in enumerate(annotations):
            normal = [(list(b), False) for b, lab in zip(ann["bboxes"], ann["labels"]) if lab == c]
            ignored = [(list(b), True) for b, lab in zip(ann["bboxes_ignore"], ann["labels_ignore"]) if lab == c]
            gts[i] = {"boxes": normal + ignored, "taken": [False] * (len(normal) + len(ignored))}
            num_gts += len(normal)
        dets = [(-float(d[-1]), i, k, list(d[:-1])) for i, res in enumerate(det_results)
                for k, d in enumerate(res[c])]
        dets.sort(key=lambda d: (d[0], d[1], d[2]))  # score desc; ties: image order, then input order
        tp, fp = [], []
        for _, i, _, box in dets:
            ious = [reference_iou(box, g, box_type) for g, _ in gts[i]["boxes"]]
            best = int(np.argmax(ious)) if ious else -1
            if best < 0 or ious[best] < iou_thr:
                tp.append(0), fp.append(1)
            elif gts[i]["boxes"][best][1]:
                tp.append(0), fp.append(0)
            elif gts[i]["taken"][best]:
                tp.append(0), fp.append(1)
            else:
                gts[i]["taken"][best] = True
                tp.append(1), fp.append(0)
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        recall = [t / num_gts if num_gts else 0.0 for t in ctp]
        precision = [t / (t + f) if t + f else 0.0 for t, f in zip(ctp, cfp)]
        ap = reference_voc_ap(recall, precision, use_07_metric) if num_gts else 0.0
        results.append({"ap": ap, "num_gts": num_gts, "num_dets": len(dets), "recall": recall, "precision": precision})
    aps = [r["ap"] for r in results if r["num_gts"]]
    return (float(np.mean(aps)) if aps else 0.0), results


# ----- random problems ---------------------------------------------------------------------------


def random_boxes(rng, n, box_type):
    if box_type == "obb":
        return np.column_stack((rng.uniform(0, 200, (n, 2)), rng.uniform(8, 40, (n, 2)), rng.uniform(-np.pi, np.pi, n)))
    corner = rng.uniform(0, 200, (n, 2))
    return np.column_stack((corner, corner + rng.uniform(8, 40, (n, 2))))


def jitter(rng, boxes, box_type, amount):
    out = boxes.copy()
    scale = 30 * amount
    out[:, :4] += rng.uniform(-scale, scale, out[:, :4].shape) * (0.3 if box_type == "obb" else 0.5)
    if box_type == "obb":
        out[:, 2:4] = np.abs(out[:, 2:4]) + 1
        out[:, 4] += rng.uniform(-amount, amount, len(out))
    else:
        out[:, 2:4] = np.maximum(out[:, 2:4], out[:, :2] + 1)
    return out


def random_problem(seed, box_type, num_images=6, num_classes=4):
    """Detections near ground truths (duplicates, near-threshold overlaps), stray detections,
    difficult objects, duplicate ground truths, quantised scores (ties), a class without gts."""
    rng = np.random.default_rng(seed)
    dim = 5 if box_type == "obb" else 4
    det_results, annotations = [], []
    for image in range(num_images):
        num_gts = 0 if image == 1 else int(rng.integers(1, 9))
        gts = random_boxes(rng, num_gts, box_type)
        labels = rng.integers(0, num_classes - 1, num_gts)  # the last class never has gts
        if num_gts > 2:
            gts[1], labels[1] = gts[0], labels[0]  # two identical ground truths
        difficult = rng.random(num_gts) < 0.25
        annotations.append({
            "bboxes": gts[~difficult], "labels": labels[~difficult],
            "bboxes_ignore": gts[difficult], "labels_ignore": labels[difficult],
        })
        per_class = []
        for c in range(num_classes):
            near = gts[labels == c]
            near = np.tile(near, (int(rng.integers(0, 3)), 1))
            stray = random_boxes(rng, int(rng.integers(0, 3)), box_type)
            dets = np.concatenate((jitter(rng, near, box_type, 0.4), stray))
            scores = np.round(rng.random(len(dets)), 1)  # many ties
            per_class.append(np.column_stack((dets, scores)).reshape(-1, dim + 1))
        det_results.append(per_class)
    return det_results, annotations


@pytest.mark.parametrize("box_type", ["obb", "hbb"])
@pytest.mark.parametrize("use_07_metric", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_problems(box_type, use_07_metric, seed):
    det_results, annotations = random_problem(seed, box_type)
    iou_thr = (0.5, 0.3, 0.7, 0.5)[seed]
    mean_ap, per_class = eval_map(det_results, annotations, iou_thr, box_type, use_07_metric)
    ref_map, ref = reference_eval(det_results, annotations, iou_thr, box_type, use_07_metric)
    assert mean_ap == pytest.approx(ref_map, abs=1e-12)
    for ours, theirs in zip(per_class, ref):
        assert ours["num_gts"] == theirs["num_gts"] and ours["num_dets"] == theirs["num_dets"]
        assert ours["ap"] == pytest.approx(theirs["ap"], abs=1e-12)
        np.testing.assert_allclose(ours["recall"], theirs["recall"], atol=1e-12)
        np.testing.assert_allclose(ours["precision"], theirs["precision"], atol=1e-12)
    assert per_class[-1]["num_gts"] == 0 and per_class[-1]["ap"] == 0.0
    assert 0 < mean_ap < 1  # the problems are neither trivial nor hopeless


def test_tensor_inputs_give_the_same_result():
    det_results, annotations = random_problem(7, "obb")
    as_tensors = [[torch.from_numpy(d).float() for d in res] for res in det_results]
    ann_tensors = [{k: torch.from_numpy(np.asarray(v)) for k, v in ann.items()} for ann in annotations]
    expected = eval_map([[d.numpy().astype(np.float64) for d in res] for res in as_tensors], annotations)
    assert eval_map(as_tensors, ann_tensors)[0] == pytest.approx(expected[0], abs=1e-15)


# ----- hand-checked cases -----------------------------------------------------------------------

GT = np.array([[50.0, 50.0, 40.0, 20.0, 0.3], [150.0, 60.0, 30.0, 30.0, -0.7]])
FAR = [300.0, 300.0, 10.0, 10.0, 0.0]


def one_class(dets, gts=GT, ignore=None):
    ignore = np.zeros((0, 5)) if ignore is None else ignore
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 6)
    ann = {"bboxes": gts, "labels": np.zeros(len(gts), dtype=int),
           "bboxes_ignore": ignore, "labels_ignore": np.zeros(len(ignore), dtype=int)}
    return [[dets]], [ann]


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_perfect_and_empty_detections(use_07_metric):
    perfect = np.column_stack((GT, [0.9, 0.8]))
    mean_ap, per_class = eval_map(*one_class(perfect), use_07_metric=use_07_metric)
    assert mean_ap == pytest.approx(1.0) and per_class[0]["ap"] == pytest.approx(1.0)
    np.testing.assert_allclose(per_class[0]["recall"], [0.5, 1.0])
    np.testing.assert_allclose(per_class[0]["precision"], [1.0, 1.0])
    mean_ap, per_class = eval_map(*one_class(np.zeros((0, 6))), use_07_metric=use_07_metric)
    assert mean_ap == 0.0 and per_class[0]["num_dets"] == 0 and per_class[0]["recall"].shape == (0,)


def test_known_ap_values():
    # one FP ranked above one TP, one gt: precision [0, 1/2], recall [0, 1] -> 0.5 for both metrics
    dets = [[*FAR, 0.9], [*GT[0], 0.8]]
    for use_07 in (True, False):
        assert eval_map(*one_class(dets, GT[:1]), use_07_metric=use_07)[0] == pytest.approx(0.5)
    # TP, FP (duplicate), TP on two gts: recall [.5, .5, 1], precision [1, .5, 2/3]
    dets = [[*GT[0], 0.9], [*GT[0], 0.8], [*GT[1], 0.7]]
    mean_ap, per_class = eval_map(*one_class(dets), use_07_metric=True)
    assert mean_ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    np.testing.assert_allclose(per_class[0]["precision"], [1, 0.5, 2 / 3])
    assert eval_map(*one_class(dets), use_07_metric=False)[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_eleven_point_thresholds_are_the_devkits():
    # 3 of 10 gts found with precision 1: recall 0.3 does not reach 0.30000000000000004.
    gts = np.array([[20.0 + 40 * i, 50.0, 20.0, 10.0, 0.0] for i in range(10)])
    dets = np.column_stack((gts[:3], [0.9, 0.8, 0.7]))
    assert eval_map(*one_class(dets, gts))[0] == pytest.approx(3 / 11)
    assert average_precision(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11)


def test_difficult_objects_are_ignored_and_ties_keep_input_order():
    # A detection on a difficult object counts neither way; the best gt decides, even if ignored.
    dets = [[*GT[1], 0.95], [*GT[0], 0.9]]
    mean_ap, per_class = eval_map(*one_class(dets, GT[:1], ignore=GT[1:]))
    assert mean_ap == pytest.approx(1.0)
    assert per_class[0]["num_gts"] == 1 and per_class[0]["num_dets"] == 2
    np.testing.assert_allclose(per_class[0]["precision"], [0.0, 1.0])  # nothing counted yet, then 1/1
    # Equal scores: the earlier detection takes the gt, the later one is the duplicate (FP).
    shifted = GT[0] + [2.0, 0, 0, 0, 0]
    _, per_class = eval_map(*one_class([[*shifted, 0.5], [*GT[0], 0.5]], GT[:1]))
    np.testing.assert_allclose(per_class[0]["precision"], [1.0, 0.5])


def test_mean_is_over_classes_with_ground_truth():
    ann = {"bboxes": GT, "labels": np.array([0, 2])}
    dets = [[np.column_stack((GT[:1], [0.9])), np.array([[*FAR, 0.5]]), np.zeros((0, 6))]]
    mean_ap, per_class = eval_map(dets, [ann])
    assert [r["num_gts"] for r in per_class] == [1, 0, 1]
    assert per_class[1]["ap"] == 0.0 and per_class[1]["num_dets"] == 1
    assert mean_ap == pytest.approx(0.5)  # (1 + 0) / 2: class 1 is left out


def test_hbb_iou_convention():
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [3.0, 3.0, 3.0, 8.0]])
    iou = box_iou_hbb(boxes, boxes)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])  # no +1 on widths
    assert iou[2, 2] == 0.0  # zero area: 0, not NaN


def test_bad_inputs():
    det_results, annotations = one_class([[*GT[0], 0.9]])
    with pytest.raises(ValueError, match="shape"):
        eval_map([[np.zeros((1, 5))]], annotations)
    with pytest.raises(ValueError, match="box_type"):
        eval_map(det_results, annotations, box_type="rbb")
    with pytest.raises(ValueError, match="class indices"):
        eval_map(det_results, [{"bboxes": GT, "labels": [0, 1]}])
    with pytest.raises(ValueError, match="one per box"):
        eval_map(det_results, [{"bboxes": GT, "labels": [0]}])
    with pytest.raises(ValueError, match="1 images and annotations for 2"):
        eval_map(det_results, annotations * 2)
    with pytest.raises(ValueError, match="non-finite scores"):
        eval_map([[np.array([[*GT[0], np.nan]])]], annotations)
    with pytest.raises(ValueError, match="iou_thr"):
        eval_map(det_results, annotations, iou_thr=0)
    with pytest.raises(ValueError, match="at least one image"):
        eval_map([], [])


# ----- torchvision-style outputs on a dataset --------------------------------------------------


def test_detections_by_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 8, 8]])
    per_class = detections_by_class(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([2, 1, 2]), num_classes=3)
    assert [len(d) for d in per_class] == [1, 2, 0]
    np.testing.assert_allclose(per_class[1][:, -1], [0.9, 0.7])
    with pytest.raises(ValueError, match="class indices"):
        detections_by_class(boxes, torch.ones(3), torch.tensor([0, 1, 2]), num_classes=3)


@pytest.mark.parametrize("box_type", ["hbb", "obb"])
def test_evaluate_detections_on_a_dataset(tmp_path, box_type):
    from PIL import Image

    for image_id in ("A", "B"):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (64, 64)).save(tmp_path / "images" / f"{image_id}.png")
    (tmp_path / "labelTxt").mkdir()
    polygons = [[10, 10, 30, 10, 30, 20, 10, 20], [40, 40, 60, 40, 60, 50, 40, 50]]
    write_dota_labels(tmp_path / "labelTxt" / "A.txt", polygons, ["car", "tank"], [False, True])
    ds = DotaDetectionDataset(tmp_path, box_type=box_type)
    perfect = [{"boxes": ds.load_target(i)["boxes"], "scores": torch.ones(len(ds.load_target(i)["labels"])),
                "labels": ds.load_target(i)["labels"]} for i in range(len(ds))]
    mean_ap, per_class = evaluate_detections(perfect, ds)
    assert mean_ap == pytest.approx(1.0) and [r["num_gts"] for r in per_class] == [1, 0]
    assert evaluate_detections({"A": perfect[0]}, ds)[0] == pytest.approx(1.0)  # B: no detections
    assert evaluate_detections({"B": perfect[1]}, ds)[0] == 0.0
    with pytest.raises(ValueError, match="not in the dataset"):
        evaluate_detections({"C": perfect[0]}, ds)
    with pytest.raises(ValueError, match="1 predictions for 2"):
        evaluate_detections(perfect[:1], ds)
