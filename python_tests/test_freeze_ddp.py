"""apply_dbf under DistributedDataParallel: 2 CPU processes, gloo, freeze -> unfreeze -> freeze."""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dbf_ext.freeze import StepInterval, apply_dbf

WORLD_SIZE = 2
NUM_EPOCHS = 4
STEPS_PER_EPOCH = 3
TRAINED_EPOCHS = (0, 2)  # trained, frozen, trained, frozen
JOIN_TIMEOUT_S = 120


class SmallDetector(nn.Module):
    """Input ``(B, 3, 16, 16)`` -> ``(B, 2, 4, 4)``; ``backbone.body`` is a conv-BN trunk."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        # No BatchNorm after the trunk: train-mode statistics of the head would legitimately
        # differ between ranks (each sees its own data) and spoil the equal-weights check.
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, images):
        return self.head(self.backbone.body(images))


def rank_batch(rank: int, epoch: int, step: int):
    """Different data on every rank, so equal final weights need the gradient all-reduce."""
    generator = torch.Generator().manual_seed(1000 * epoch + 10 * step + rank)
    return torch.rand(4, 3, 16, 16, generator=generator), torch.rand(4, 2, 4, 4, generator=generator)


class ListHandler(logging.Handler):
    """Collects the messages of WARNING and above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def rejection_message(**ddp_options) -> str | None:
    """apply_dbf's error for a DDP built with ``ddp_options``, or None when it accepts it."""
    try:
        apply_dbf(DistributedDataParallel(SmallDetector(), **ddp_options), StepInterval(TRAINED_EPOCHS))
    except ValueError as error:
        return str(error)
    return None


def train_worker(rank: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    # Rendezvous through a file: no port to pick, so no race with other processes for one.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        rejections = {
            "default": rejection_message(),
            "static_graph": rejection_message(find_unused_parameters=True, static_graph=True),
        }
        warnings = ListHandler()
        logging.getLogger("dbf_ext.freeze.controller").addHandler(warnings)
        apply_dbf(SmallDetector(), StepInterval(TRAINED_EPOCHS)).on_epoch_start(0)  # DDP not visible
        logging.getLogger("dbf_ext.freeze.controller").removeHandler(warnings)

        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        model = SmallDetector()
        ddp_model = DistributedDataParallel(model, find_unused_parameters=True)
        controller = apply_dbf(ddp_model, StepInterval(TRAINED_EPOCHS))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        body = model.backbone.body
        epochs = []
        for epoch in range(NUM_EPOCHS):
            controller.on_epoch_start(epoch)
            ddp_model.train()
            # DDP (broadcast_buffers=True, the default) copies rank 0's buffers to every rank at
            # each forward, so a frozen trunk must end the epoch exactly as rank 0's started it.
            rank0_body_before = {name: value.clone() for name, value in body.state_dict().items()}
            for value in rank0_body_before.values():
                dist.broadcast(value, src=0)
            for step in range(STEPS_PER_EPOCH):
                images, targets = rank_batch(rank, epoch, step)
                optimizer.zero_grad()
                nn.functional.mse_loss(ddp_model(images), targets).backward()
                optimizer.step()
            body_after = body.state_dict()
            epochs.append(
                {
                    "frozen": controller.is_frozen,
                    "body_unchanged": all(
                        torch.equal(body_after[name], value) for name, value in rank0_body_before.items()
                    ),
                    "body_grads_none": all(param.grad is None for param in body.parameters()),
                }
            )
        torch.save(
            {"epochs": epochs, "rejections": rejections, "warnings": warnings.messages, "state": model.state_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def spawn_and_wait(out_dir: Path) -> None:
    context = mp.spawn(train_worker, args=(str(out_dir),), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=1):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"DDP workers did not finish within {JOIN_TIMEOUT_S} s (hung collective?)")


def test_ddp_trains_across_freeze_transitions(tmp_path):
    spawn_and_wait(tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]

    expected_frozen = [epoch not in TRAINED_EPOCHS for epoch in range(NUM_EPOCHS)]
    for result in results:
        assert [epoch["frozen"] for epoch in result["epochs"]] == expected_frozen
        # Frozen epochs: unchanged trunk, no gradient even after DDP's reduction of unused ones.
        assert [epoch["body_unchanged"] for epoch in result["epochs"]] == expected_frozen
        assert [epoch["body_grads_none"] for epoch in result["epochs"]] == expected_frozen
        assert "find_unused_parameters=True" in result["rejections"]["default"]
        assert "static_graph" in result["rejections"]["static_graph"]
        assert len(result["warnings"]) == 1 and "not given the DistributedDataParallel" in result["warnings"][0]

    first, second = (result["state"] for result in results)
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert differing == []
