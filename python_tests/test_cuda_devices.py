"""Every compiled op runs on the device of its inputs and leaves the caller's current CUDA
device as it was (needs two GPUs: with one, there is no other device to leave current)."""

from __future__ import annotations

import pytest
import torch

from dbf_ext.assign import max_iou_assign
from dbf_ext.cache import SlabLayout
from dbf_ext.ops import box_iou_rotated, nms_rotated
from dbf_ext.testing import random_rotated_boxes

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def run_every_op(device: torch.device) -> list[torch.Tensor]:
    boxes = random_rotated_boxes(200, generator=torch.Generator().manual_seed(3)).to(device)
    scores = torch.linspace(1, 0, 200, device=device)
    hbb = torch.cat([boxes[:, :2] - 5, boxes[:, :2] + 5], dim=1)
    maps = [torch.randn(2, 3, 8, 8, device=device)]
    layout = SlabLayout.for_maps(maps, "float8_e4m3")
    slabs = torch.empty((2, layout.slab_bytes), dtype=torch.uint8, device=device)
    layout.pack(maps, slabs)
    return [
        box_iou_rotated(boxes, boxes[:50]),
        nms_rotated(boxes, scores, 0.1),
        max_iou_assign(hbb, hbb[:20], pos_iou_thr=0.5, neg_iou_thr=0.4).gt_inds,
        *layout.unpack(list(slabs.unbind(0))),
    ]


def test_ops_on_the_second_gpu_keep_the_current_device():
    torch.cuda.set_device(0)
    on_second = run_every_op(torch.device("cuda", 1))
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda", 1) for t in on_second)
    on_first = run_every_op(torch.device("cuda", 0))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(on_first, on_second))
