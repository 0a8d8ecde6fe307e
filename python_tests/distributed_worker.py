"""``dbf-ext`` under torchrun with observers, for test_distributed_training.py.

    python -m torch.distributed.run --nproc_per_node=2 --standalone distributed_worker.py \\
        [--observe DIR] [--kill-rank R --kill-at-step N] [--diverge-rank R] \\
        [--dynamic-interval K] -- train --data ... (any dbf-ext command line)

Runs ``dbf_ext.cli.main`` on the command line after ``--``, watching from outside what the
command does not report per rank. With ``--observe DIR`` each rank writes ``DIR/rank<R>.pt``
(rewritten after every epoch, so a killed run leaves what it had): per epoch the model's
weights, the rank's own cache counters and entries and the Dynamic R-CNN controller's state;
every Dynamic R-CNN update (the rank's own statistics before, the values after); the
detections that evaluation scored (passed to ``evaluate_detections``); the cache summary the run
returned.
``--kill-rank R --kill-at-step N``: rank R kills itself with SIGKILL just before its N-th
optimizer step (counted from 1 over the run). ``--diverge-rank R``: rank R's freezing schedule
also trains the backbone in epoch 1. ``--dynamic-interval K``: Dynamic R-CNN updates every K
steps (the default, 100, is longer than these tiny runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch

import dbf_ext.train
import dbf_ext.train.engine as engine
from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.cli import main
from dbf_ext.freeze import StepInterval
from dbf_ext.train.config import TrainConfig

options = argparse.ArgumentParser()
options.add_argument("--observe")
options.add_argument("--kill-rank", type=int)
options.add_argument("--kill-at-step", type=int)
options.add_argument("--diverge-rank", type=int)
options.add_argument("--dynamic-interval", type=int)
separator = sys.argv.index("--")
args = options.parse_args(sys.argv[1:separator])
command = sys.argv[separator + 1:]
rank = int(os.environ["RANK"])

observed = {"epochs": [], "dynamic_updates": [], "detections": None, "cache_summary": None}
built = {}


def save_observations() -> None:
    if args.observe:
        torch.save(observed, Path(args.observe) / f"rank{rank}.pt")


def build_and_keep(*build_args, **build_kwargs):
    built["model"] = build_detector(*build_args, **build_kwargs)
    return built["model"]


def observe_epoch(record) -> None:
    model = built["model"]
    epoch = {"epoch": record.epoch,
             "weights": {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}}
    cache = getattr(model.backbone.body, "cache", None)  # the CachedBackbone, with a cache
    if cache is not None:
        epoch["cache_stats"] = dataclasses.asdict(cache.stats)
        epoch["cache_entries"] = cache.entries_per_tier()
    controller = getattr(model.roi_heads, "controller", None)
    if controller is not None:
        epoch["dynamic_rcnn"] = controller.state_dict()
    observed["epochs"].append(epoch)
    save_observations()


def train_observed(config, console=None):
    result = train(config, console=console, on_epoch_end=observe_epoch)
    observed["cache_summary"] = result.cache_summary
    save_observations()
    return result


def update_observed(self) -> None:
    before = (list(self.iou_history), list(self.beta_history))
    update(self)
    observed["dynamic_updates"].append({"own_iou": before[0], "own_beta": before[1],
                                        "iou_threshold": self.iou_threshold, "beta": self.beta})


def evaluate_detections_observed(predictions, *map_args, **map_kwargs):
    observed["detections"] = [{key: value.clone() for key, value in p.items()} for p in predictions]
    save_observations()
    return evaluate_detections(predictions, *map_args, **map_kwargs)


build_detector, train, update, evaluate_detections = engine.build_detector, dbf_ext.train.train, \
    DynamicRCNNController.update, engine.evaluate_detections
engine.build_detector = build_and_keep
dbf_ext.train.train = train_observed  # what the command line calls
DynamicRCNNController.update = update_observed
engine.evaluate_detections = evaluate_detections_observed

if args.dynamic_interval:
    controller_init = DynamicRCNNController.__init__

    def init_with_interval(self, *init_args, **init_kwargs):
        controller_init(self, *init_args, **{**init_kwargs, "update_iter_interval": args.dynamic_interval})

    DynamicRCNNController.__init__ = init_with_interval

if args.kill_rank == rank:
    sgd_step, steps = torch.optim.SGD.step, []

    def step_or_die(self, *step_args, **step_kwargs):
        steps.append(1)
        if len(steps) == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return sgd_step(self, *step_args, **step_kwargs)

    torch.optim.SGD.step = step_or_die

if args.diverge_rank == rank:
    TrainConfig.freeze_schedule = lambda config: StepInterval((*config.unfrozen_epochs, 1))

sys.exit(main(command))
