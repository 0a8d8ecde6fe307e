"""The mmcv._ext shim through mmcv's own Python wrappers (mmcv 1.7 or 2.1, whichever stack runs
this file; run by test_openmmlab.py inside that stack's environment).

References: mmcv's published test values (tests/test_ops of mmcv), plain re-implementations
written from the ops' definitions (mm_reference.py), mmdet's pure-torch focal loss, shapely
through dbf_ext's own rotated IoU, and dbf_ext's ops."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import pkgutil
import subprocess
import sys
import textwrap

import mm_reference
import numpy as np
import pytest
import torch

from dbf_ext.integrations import mmcv_ops

SHIM = mmcv_ops.install()

import mmcv  # noqa: E402  (after the shim is in place)
import mmcv.ops  # noqa: E402

import dbf_ext.ops  # noqa: E402

needs_roi_align_rotated = pytest.mark.skipif(
    not hasattr(dbf_ext.ops, "roi_align_rotated"),
    reason="runs once dbf_ext.ops.roi_align_rotated exists (the oriented-detector kernel)")


def _checked_ext_names() -> set[str]:
    """Every name the installed mmcv's op modules check with ext_loader.load_ext('_ext', ...)."""
    names = set()
    for path in pathlib.Path(mmcv.__file__).parent.joinpath("ops").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load_ext"
                    and len(node.args) == 2 and getattr(node.args[0], "value", None) == "_ext"):
                names.update(element.value for element in node.args[1].elts)
    return names


# ---- installation ----

def test_install_is_idempotent_and_visible_to_module_lookups():
    assert mmcv_ops.install() is SHIM and mmcv_ops.is_installed()
    assert importlib.util.find_spec("mmcv._ext") is not None
    assert pkgutil.find_loader("mmcv._ext") is not None  # mmcv / mmengine "is mmcv-full" checks
    assert "dbf_ext" in mmcv.ops.get_compiler_version()


def test_every_name_mmcv_checks_exists_and_is_provided_or_catalogued():
    checked = _checked_ext_names()
    assert len(checked) > 100  # the scan found mmcv's op modules
    assert checked <= set(mmcv_ops.PROVIDED) | set(mmcv_ops.UNSUPPORTED)
    assert all(hasattr(SHIM, name) for name in checked)


def test_every_unsupported_name_raises_a_clear_error():
    for name, (op, users) in mmcv_ops.UNSUPPORTED.items():
        with pytest.raises(NotImplementedError) as error:
            getattr(SHIM, name)(torch.zeros(1))
        assert all(part in str(error.value) for part in (name, op, users))


def test_unsupported_op_through_mmcv_names_op_and_models():
    conv = mmcv.ops.DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(NotImplementedError, match=r"deform_conv_forward.*DCN"):
        conv(torch.zeros(1, 4, 8, 8), torch.zeros(1, 18, 8, 8))


_FAKE_EXT = """
import sys, tempfile, pathlib
folder = pathlib.Path(tempfile.mkdtemp())
(folder / "_ext.py").write_text({source!r})
import mmcv
mmcv.__path__.append(str(folder))  # a compiled mmcv._ext stand-in, without touching mmcv's files
from dbf_ext.integrations import mmcv_ops
"""


def _run_with_fake_compiled_ext(ext_source: str, body: str) -> subprocess.CompletedProcess:
    script = _FAKE_EXT.format(source=ext_source) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_refuses_to_replace_a_working_compiled_ext_unless_asked():
    result = _run_with_fake_compiled_ext("COMPILED = True\n", """
        try:
            mmcv_ops.install()
        except RuntimeError as error:
            print("refused:", error)
        import mmcv._ext
        assert getattr(mmcv._ext, "COMPILED", False)  # still the compiled one
        mmcv_ops.install(replace_compiled=True)
        assert mmcv_ops.is_installed()
        print("replaced")
    """)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "replace_compiled=True" in result.stdout
    assert "replaced" in result.stdout


def test_replaces_a_compiled_ext_that_fails_to_load():
    result = _run_with_fake_compiled_ext(
        "raise ImportError('undefined symbol: _ZN2at4_ops')\n", """
        import logging
        logging.basicConfig(level=logging.WARNING)
        mmcv_ops.install()
        assert mmcv_ops.is_installed()
        import mmcv.ops
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "undefined symbol" in result.stderr


# ---- axis-aligned NMS ----

def test_nms_docstring_example():
    boxes = np.array([[49.1, 32.4, 51.0, 35.9], [49.3, 32.9, 51.0, 35.3], [49.2, 31.8, 51.0, 35.4],
                      [35.1, 11.5, 39.1, 15.7], [35.6, 11.8, 39.3, 14.2], [35.3, 11.5, 39.9, 14.5],
                      [35.2, 11.7, 39.7, 15.7]], dtype=np.float32)
    scores = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.4, 0.3], dtype=np.float32)
    dets, inds = mmcv.ops.nms(boxes, scores, 0.6)
    assert len(inds) == len(dets) == 3 and isinstance(inds, np.ndarray)


@pytest.mark.parametrize("offset", [0, 1])
def test_nms_matches_greedy_reference(offset):
    generator = np.random.default_rng(3)
    corners = generator.uniform(0, 60, (300, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + generator.uniform(2, 20, (300, 2))], 1).astype(np.float32)
    scores = generator.permutation(300).astype(np.float32) / 300  # distinct: no tie ambiguity
    _, inds = mmcv.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3, offset=offset)
    assert inds.tolist() == mm_reference.greedy_nms(boxes, scores, 0.3, offset)


def test_nms_rejects_nan():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        mmcv.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)


# ---- soft NMS ----

_SOFT_BOXES = np.array([[6.0, 3.0, 8.0, 7.0], [3.0, 6.0, 9.0, 11.0], [3.0, 7.0, 10.0, 12.0],
                        [1.0, 4.0, 13.0, 7.0]], dtype=np.float32)
_SOFT_SCORES = np.array([0.6, 0.9, 0.7, 0.2], dtype=np.float32)
_SOFT_PUBLISHED = {  # mmcv's tests/test_ops/test_nms.py
    "linear": ([1, 0, 2, 3], [0.9, 0.6, 0.29024392, 0.2]),
    "gaussian": ([1, 0, 2, 3], [0.9, 0.59630775, 0.35275510, 0.18650459]),
    "naive": ([1, 0, 3], [0.9, 0.6, 0.2]),
}


@pytest.mark.parametrize("method", sorted(_SOFT_PUBLISHED))
def test_soft_nms_published_values(method):
    dets, inds = mmcv.ops.soft_nms(torch.from_numpy(_SOFT_BOXES), torch.from_numpy(_SOFT_SCORES),
                                   iou_threshold=0.3, sigma=0.5, min_score=0.01, method=method)
    expected_inds, expected_scores = _SOFT_PUBLISHED[method]
    assert inds.tolist() == expected_inds
    np.testing.assert_allclose(dets[:, :4].numpy(), _SOFT_BOXES[expected_inds])
    np.testing.assert_allclose(dets[:, 4].numpy(), expected_scores, rtol=1e-6)


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_soft_nms_matches_reference(method):
    generator = np.random.default_rng(5)
    corners = generator.uniform(0, 40, (60, 2))
    boxes = np.concatenate([corners, corners + generator.uniform(4, 15, (60, 2))], 1).astype(np.float32)
    scores = generator.uniform(0.05, 1, 60).astype(np.float32)
    dets, inds = mmcv.ops.soft_nms(boxes, scores, 0.4, sigma=0.5, min_score=0.05, method=method)
    kept, kept_scores = mm_reference.soft_nms(boxes, scores, 0.4, 0.5, 0.05, method)
    assert inds.tolist() == kept
    np.testing.assert_allclose(dets[:, 4], kept_scores, rtol=1e-5)


# ---- rotated IoU and NMS ----

_IOU_BOXES1 = [[1.0, 1.0, 3.0, 4.0, 0.5], [2.0, 2.0, 3.0, 4.0, 0.6], [7.0, 7.0, 8.0, 8.0, 0.4]]
_IOU_BOXES2 = [[0.0, 2.0, 2.0, 5.0, 0.3], [2.0, 1.0, 3.0, 3.0, 0.5], [5.0, 5.0, 6.0, 7.0, 0.4]]
_IOU_PUBLISHED = [[0.3708, 0.4351, 0.0000], [0.1104, 0.4487, 0.0424], [0.0000, 0.0000, 0.3622]]


@pytest.mark.parametrize("clockwise", [True, False])
def test_box_iou_rotated_published_values(clockwise):
    boxes1, boxes2 = torch.tensor(_IOU_BOXES1), torch.tensor(_IOU_BOXES2)
    if not clockwise:
        boxes1[:, 4] *= -1
        boxes2[:, 4] *= -1
    ious = mmcv.ops.box_iou_rotated(boxes1, boxes2, clockwise=clockwise)
    np.testing.assert_allclose(ious.numpy(), _IOU_PUBLISHED, atol=1e-4)
    aligned = mmcv.ops.box_iou_rotated(boxes1, boxes2, aligned=True, clockwise=clockwise)
    np.testing.assert_allclose(aligned.numpy(), np.diag(_IOU_PUBLISHED), atol=1e-4)


def test_box_iou_rotated_equals_dbf_ext_including_edge_cases():
    generator = torch.Generator().manual_seed(7)
    boxes1 = torch.cat([torch.rand(40, 2, generator=generator) * 50,
                        torch.rand(40, 2, generator=generator) * 20 + 1,
                        torch.rand(40, 1, generator=generator) * 6 - 3], 1)
    boxes2 = boxes1[torch.randperm(40, generator=generator)] + 0.5
    boxes2[0] = boxes1[0]  # identical: IoU 1
    boxes2[1, 2] = 0.0  # degenerate: IoU 0 with everything
    for mode in ("iou", "iof"):
        ious = mmcv.ops.box_iou_rotated(boxes1, boxes2, mode=mode)
        assert torch.equal(ious, dbf_ext.ops.box_iou_rotated(boxes1, boxes2, mode=mode))
    ious = mmcv.ops.box_iou_rotated(boxes1, boxes2)
    assert abs(float(ious[0, 0]) - 1) < 1e-6 and float(ious[:, 1].abs().max()) == 0


_NMS_ROTATED = np.array([[6.0, 3.0, 8.0, 7.0, 0.5, 0.7], [3.0, 6.0, 9.0, 11.0, 0.6, 0.8],
                         [3.0, 7.0, 10.0, 12.0, 0.3, 0.5], [1.0, 4.0, 13.0, 7.0, 0.6, 0.9]],
                        dtype=np.float32)
_NMS_LABELS = np.array([1, 0, 1, 0], dtype=np.float32)


def test_nms_rotated_published_values():
    boxes = torch.from_numpy(_NMS_ROTATED)
    dets, keep = mmcv.ops.nms_rotated(boxes[:, :5], boxes[:, 5], 0.5)
    assert keep.tolist() == [3, 1, 0]
    np.testing.assert_allclose(dets[:, :5].numpy(), _NMS_ROTATED[[3, 1, 0], :5])
    # With labels mmcv's kernels give the same [3, 1, 0] (they ignore the labels); the shim
    # gives the per-class result, which is mmcv's published batched_nms result below.
    dets, keep = mmcv.ops.nms_rotated(boxes[:, :5], boxes[:, 5], 0.5, torch.from_numpy(_NMS_LABELS))
    assert keep.tolist() == [3, 1, 0, 2]
    counter_clockwise = boxes.clone()
    counter_clockwise[:, 4] *= -1
    _, keep = mmcv.ops.nms_rotated(counter_clockwise[:, :5], counter_clockwise[:, 5], 0.5,
                                   clockwise=False)
    assert keep.tolist() == [3, 1, 0]


def test_batched_nms_rotated_published_values():
    boxes, scores = torch.from_numpy(_NMS_ROTATED[:, :5]), torch.from_numpy(_NMS_ROTATED[:, 5])
    config = dict(type="nms_rotated", iou_threshold=0.5)
    _, keep = mmcv.ops.batched_nms(boxes, scores, torch.from_numpy(_NMS_LABELS), config)
    assert keep.tolist() == [3, 1, 0, 2]
    _, keep = mmcv.ops.batched_nms(boxes, scores, torch.from_numpy(_NMS_LABELS), config,
                                   class_agnostic=True)
    assert keep.tolist() == [3, 1, 0]


def test_nms_rotated_equals_dbf_ext_with_and_without_labels():
    generator = torch.Generator().manual_seed(17)
    boxes = torch.cat([torch.rand(200, 2, generator=generator) * 100,
                       torch.rand(200, 2, generator=generator) * 25 + 2,
                       torch.rand(200, 1, generator=generator) * 6 - 3], 1)
    scores = torch.rand(200, generator=generator)
    labels = torch.randint(0, 4, (200,), generator=generator)
    _, keep = mmcv.ops.nms_rotated(boxes, scores, 0.2)
    assert torch.equal(keep, dbf_ext.ops.nms_rotated(boxes, scores, 0.2))
    _, keep = mmcv.ops.nms_rotated(boxes, scores, 0.2, labels)
    assert torch.equal(keep, dbf_ext.ops.batched_nms_rotated(boxes, scores, labels, 0.2))


def test_nms_rotated_with_labels_keeps_boxes_of_other_classes():
    # mmcv's kernels ignore the labels (one of two identical boxes survives); the shim does not
    boxes = torch.tensor([[10.0, 10.0, 8.0, 4.0, 0.3], [10.0, 10.0, 8.0, 4.0, 0.3]])
    scores = torch.tensor([0.9, 0.8])
    _, keep = mmcv.ops.nms_rotated(boxes, scores, 0.5, torch.tensor([0, 1]))
    assert keep.tolist() == [0, 1]
    _, keep = mmcv.ops.nms_rotated(boxes, scores, 0.5)
    assert keep.tolist() == [0]


# ---- RoIAlign ----

_ROI_INPUTS = [  # mmcv's tests/test_ops/test_roi_align.py
    ([[[[1., 2.], [3., 4.]]]], [[0., 0., 0., 1., 1.]],
     [[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [[0., 0., 0., 3., 3.]], [[[[1.9375, 4.75], [7.5625, 10.375]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]


@pytest.mark.parametrize("case", range(len(_ROI_INPUTS)))
def test_roi_align_published_values(case):
    features, rois, expected, expected_grad = _ROI_INPUTS[case]
    x = torch.tensor(features, requires_grad=True)
    output = mmcv.ops.roi_align(x, torch.tensor(rois), (2, 2), 1.0, 2, "avg", True)
    output.backward(torch.ones_like(output))
    np.testing.assert_allclose(output.detach().numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(x.grad.numpy(), expected_grad, atol=1e-3)


def test_roi_align_max_mode_is_reported_unsupported():
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        mmcv.ops.roi_align(torch.rand(1, 1, 4, 4), torch.tensor([[0., 0., 0., 3., 3.]]), (2, 2), 1.0,
                           2, "max", True)


# ---- RoIAlignRotated ----

_ROTATED_INPUTS = [  # mmcv's tests/test_ops/test_roi_align_rotated.py (clockwise=False)
    ([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., 0]],
     [[[[1.0, 1.25], [1.5, 1.75]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2.], [3., 4.]]]], [[0., 0.5, 0.5, 1., 1., np.pi / 2]],
     [[[[1.5, 1], [1.75, 1.25]]]], [[[[3.0625, 0.4375], [0.4375, 0.0625]]]]),
    ([[[[1., 2., 5., 6.], [3., 4., 7., 8.], [9., 10., 13., 14.], [11., 12., 15., 16.]]]],
     [[0., 1.5, 1.5, 3., 3., np.pi / 2]], [[[[7.5625, 1.9375], [10.375, 4.75]]]],
     [[[[0.47265625, 0.42968750, 0.42968750, 0.04296875],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.42968750, 0.39062500, 0.39062500, 0.03906250],
        [0.04296875, 0.03906250, 0.03906250, 0.00390625]]]]),
]


@needs_roi_align_rotated
@pytest.mark.parametrize("case", range(len(_ROTATED_INPUTS)))
def test_roi_align_rotated_published_values(case):
    features, rois, expected, expected_grad = _ROTATED_INPUTS[case]
    x = torch.tensor(features, requires_grad=True)
    output = mmcv.ops.roi_align_rotated(x, torch.tensor(rois), (2, 2), 1.0, 2, True, False)
    output.backward(torch.ones_like(output))
    np.testing.assert_allclose(output.detach().numpy(), expected, atol=1e-3)
    np.testing.assert_allclose(x.grad.numpy(), expected_grad, atol=1e-3)


@needs_roi_align_rotated
@pytest.mark.parametrize("clockwise", [True, False])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_rotated_matches_reference_forward_and_backward(clockwise, aligned):
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(2, 3, 24, 30, generator=generator, requires_grad=True)
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=generator).float(),
                      torch.rand(12, 2, generator=generator) * 50,
                      torch.rand(12, 2, generator=generator) * 30 + 0.5,
                      torch.rand(12, 1, generator=generator) * 6 - 3], 1)
    layer = mmcv.ops.RoIAlignRotated((7, 5), spatial_scale=0.5, sampling_ratio=0, aligned=aligned,
                                     clockwise=clockwise)
    output = layer(features, rois)
    grad_output = torch.randn(output.shape, generator=generator)
    output.backward(grad_output)
    reference_features = features.detach().double().requires_grad_()
    reference = mm_reference.roi_align_rotated(reference_features, rois, (7, 5), 0.5, 0, aligned,
                                               clockwise)
    reference.backward(grad_output.double())
    torch.testing.assert_close(output.detach().double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.grad.double(), reference_features.grad, atol=1e-5, rtol=1e-5)


# ---- sigmoid focal loss ----

@pytest.mark.parametrize("with_weight", [False, True])
def test_sigmoid_focal_loss_matches_mmdet_pure_torch_loss(with_weight):
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    generator = torch.Generator().manual_seed(13)
    logits = (torch.randn(50, 6, generator=generator) * 3).requires_grad_()
    target = torch.randint(0, 7, (50,), generator=generator)  # 6 = background
    class_weight = torch.rand(6, generator=generator) + 0.5 if with_weight else None
    loss = mmcv.ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, class_weight, "sum")
    loss.backward()
    reference_logits = logits.detach().double().requires_grad_()
    one_hot = torch.nn.functional.one_hot(target, 7)[:, :6].double()
    element_weight = None
    if with_weight:  # weight of the sample's class; background samples weigh 1
        row = torch.where(target < 6, class_weight[target.clamp(max=5)].double(), 1.0)
        element_weight = row[:, None].expand(50, 6)
    reference = py_sigmoid_focal_loss(reference_logits, one_hot, element_weight, 2.0, 0.25, "sum")
    reference.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), reference_logits.grad, rtol=1e-4, atol=1e-6)
