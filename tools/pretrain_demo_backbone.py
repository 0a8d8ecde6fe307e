"""Pretrains the trunk `dbf-ext demo` starts from, and stores it as package data.

The demo's detector (``dbf_ext.train.demo.DEMO_MODEL``) is trained with its backbone trained in
every epoch on a synthetic aerial set disjoint from the demo's: the same generator with seed 1
instead of 0 and four times the demo's training tiles (192). The trunk's weights (``model.backbone.body``,
a torchvision ResNet state dict without ``layer4`` and ``fc``) are then written in float16 to
``dbf_ext/models/weights/demo_trunk_synthetic.pt`` (``dbf_ext.train.demo.pretrained_trunk_path()``),
where ``--backbone-weights`` and the demo load them (into float32 parameters).

Command (from the repository root, with the package importable)::

    python tools/pretrain_demo_backbone.py            # about 10 minutes on 2 CPU cores

Deterministic on a given kind of CPU: one thread (the core count does not change the order of sums), fixed
seeds, the run's own data. The shipped file
was produced by this command; the run's figures are in the docstring of
``dbf_ext.train.demo`` (its rotated mAP50 on the seed-1 validation split, and its time).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.train import TrainConfig, train
from dbf_ext.train.checkpoint import load_checkpoint, save_checkpoint
from dbf_ext.train.demo import DEMO_MODEL, pretrained_trunk_path

# Disjoint from the demo's set (seed 0): another seed draws other scenes and objects.
PRETRAINING_SET = SyntheticConfig(seed=1, train_tiles=192, val_tiles=16)
TRUNK_PREFIX = "backbone.body."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=pretrained_trunk_path(),
                        help="where the float16 trunk state dict goes (default: the package's file)")
    parser.add_argument("--epochs", type=int, default=24, help="epochs of pretraining (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default %(default)s: the same result on machines of any core count)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        root = prepare_synthetic_dota(PRETRAINING_SET, cache_dir=Path(work) / "data", quiet=False)
        run = Path(work) / "run"
        result = train(TrainConfig(
            data=str(root), output_dir=str(run), model=DEMO_MODEL, image_size=PRETRAINING_SET.tile_size,
            epochs=args.epochs, batch_size=4, lr=0.02, schedule="never-frozen", cache="off", hflip=0.5,
            vflip=0.5, eval_every=4, device="cpu", seed=1,
        ))
        weights = load_checkpoint(run / "checkpoint.pt")["model"]
    trunk = {name[len(TRUNK_PREFIX):]: value.half() if value.is_floating_point() else value
             for name, value in weights.items()
             if name.startswith(TRUNK_PREFIX)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.output, trunk)
    parameters = sum(value.numel() for value in trunk.values())
    print(f"{args.output}: {len(trunk)} tensors, {parameters:,} values in float16, "
          f"{args.output.stat().st_size / 2**20:.2f} MiB; rotated mAP50 on the pretraining set's val split "
          f"{result.final_map50:.3f}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
