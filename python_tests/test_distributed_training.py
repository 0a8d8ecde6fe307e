"""Data-parallel training as users start it: torchrun with 2 CPU processes (gloo) running the
``dbf-ext`` command line, watched per rank by distributed_worker.py; and the cache-affine
sampler and evaluation sharding on their own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dbf_ext.assign.dynamic_rcnn import DynamicRCNNController
from dbf_ext.cache import SlabLayout
from dbf_ext.cli import main
from dbf_ext.data import DotaDetectionDataset
from dbf_ext.data.synthetic import SyntheticConfig, prepare_synthetic_dota
from dbf_ext.freeze import StepInterval
from dbf_ext.train import CacheAffineSampler, DistributedContext, build_detector, evaluate
from dbf_ext.train.distributed import init_distributed, load_dynamic_rcnn_state, wrap_model

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT_S = 300
RANKS = 2
# Trained, then three frozen epochs; the cache in float32 (hits are bit-identical to the
# features they replace, so a resumed run can match an unbroken one bit for bit).
DBF_RUN = ("--epochs", "4", "--unfrozen-epochs", "0", "--cache", "float32:cpu=64MB", "--dynamic-rcnn",
           "--lr", "0.02", "--scale-lr-from", "8")


def tiles(tmp_path_factory, train_tiles: int):
    # 10 validation tiles: evaluation batches of 8 (rank 0) and 2 (rank 1). Seed 4 puts every
    # class in both splits.
    config = SyntheticConfig(tile_size=96, train_tiles=train_tiles, val_tiles=10, min_objects=2,
                             max_objects=4, seed=4)
    return prepare_synthetic_dota(config, cache_dir=tmp_path_factory.mktemp("data"), quiet=True)


@pytest.fixture(scope="module")
def dp_set(tmp_path_factory):
    """8 training tiles: 2 full batches of 2 per rank. A resumed run matches an unbroken one to
    the bit only when every miss is computed at the batch size its cached copy was (on the CPU
    a convolution's result depends on the batch size in the last bits): here every batch is
    all misses (first frozen epoch, or after the resume) or all hits."""
    return tiles(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def uneven_set(tmp_path_factory):
    """7 training tiles: shards of 3 and 4, the short one padded with a repeat of its own."""
    return tiles(tmp_path_factory, 7)


def torchrun(*command: str, worker: tuple[str, ...] | None = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2`` of distributed_worker.py with ``worker`` options and the
    dbf-ext ``command``, or of ``-m dbf_ext command`` with ``worker=None``."""
    program = ["-m", "dbf_ext"] if worker is None else [str(WORKER), *worker, "--"]
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}", "--standalone",
              "--monitor-interval=0.1", *program, *command]
    # cwd: `-m dbf_ext` must import the installed package, not a source tree in the current folder.
    return subprocess.run(launch, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=WORKER.parent)


def train_command(data, out, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--output", str(out), "--image-size", "96", "--batch-size", "2",
            "--device", "cpu", "--hflip", "0", *extra]


@pytest.fixture
def one_thread():
    """torch on one thread in this process, as in each torchrun worker (OMP_NUM_THREADS=1):
    CPU kernels split their sums by thread, so results agree to the bit only at equal counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def observations(folder) -> list[dict]:
    return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True) for rank in range(RANKS)]


def log_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def checkpoint(out) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def epoch_cache_counts(observed: dict, epoch: int) -> tuple[int, int]:
    """(hits, lookups) of one rank's cache in ``epoch``, from its counters at epoch ends."""
    def lookups(stats):
        return stats["hits"] + stats["misses"]

    after = observed["epochs"][epoch]["cache_stats"]
    before = observed["epochs"][epoch - 1]["cache_stats"] if epoch else {"hits": 0, "misses": 0}
    return after["hits"] - before["hits"], lookups(after) - lookups(before)


@pytest.fixture(scope="module")
def straight_run(dp_set, tmp_path_factory):
    """An unbroken 2-process run: ``(folder, observations)``, the run in ``folder / "run"``."""
    folder = tmp_path_factory.mktemp("straight")
    run = torchrun(*train_command(dp_set, folder / "run", *DBF_RUN), worker=("--observe", str(folder)))
    assert run.returncode == 0, run.stderr[-4000:]
    return folder / "run", observations(folder)


def test_two_process_dbf_run_with_cache(dp_set, straight_run, monkeypatch, one_thread):
    out, ranks = straight_run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl"]  # rank 0's only
    records = log_lines(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]  # one line per epoch, not one per rank
    assert [r["frozen"] for r in records] == [False, True, True, True]
    state = checkpoint(out)
    assert state["history"] == records
    # --lr 0.02 for a total batch of 8, scaled linearly to this run's 2 processes x 2 images
    assert [group["initial_lr"] for group in state["optimizer"]["param_groups"]] == [0.02 * 4 / 8]

    for epoch in range(4):  # every rank holds the same weights after every epoch
        first, second = (rank["epochs"][epoch]["weights"] for rank in ranks)
        assert first.keys() == second.keys()
        assert [name for name in first if not torch.equal(first[name], second[name])] == []
    weights = [rank["weights"] for rank in ranks[0]["epochs"]]
    assert torch.equal(weights[-1]["backbone.body.stem.0.0.weight"], weights[1]["backbone.body.stem.0.0.weight"])
    assert not torch.equal(weights[-1]["roi_heads.box_predictor.cls_score.weight"],
                           weights[1]["roi_heads.box_predictor.cls_score.weight"])  # the heads train
    for name, value in state["model"].items():
        assert torch.equal(value, weights[-1][name]), name

    # Cache: the second frozen epoch is served from each rank's own cache; the log's figures
    # are the ranks' counters reduced.
    per_rank = [epoch_cache_counts(rank, 2) for rank in ranks]
    assert all(hits / lookups >= 0.95 for hits, lookups in per_rank), per_rank
    assert records[2]["cache_hit_rate_per_rank"] == [hits / lookups for hits, lookups in per_rank]
    for epoch in (1, 2, 3):  # frozen epochs (while the backbone trains the cache is not asked)
        counts = [epoch_cache_counts(rank, epoch) for rank in ranks]
        assert records[epoch]["cache_hit_rate"] == pytest.approx(
            sum(h for h, _ in counts) / sum(n for _, n in counts), abs=1e-15)
    finals = [rank["epochs"][-1]["cache_stats"] for rank in ranks]
    for name in ("hits", "misses", "stored", "not_stored"):
        assert state["cache"]["stats"][name] == sum(f[name] for f in finals)
    summaries = [rank["cache_summary"] for rank in ranks]
    assert summaries[0] == summaries[1] and summaries[0]["hits"] == sum(f["hits"] for f in finals)
    assert summaries[0]["entries"]["cpu"] == 8  # every training tile once, over both ranks

    # Dynamic R-CNN: each rank's statistics since the last update are kept in the checkpoint.
    own = [(rank["epochs"][-1]["dynamic_rcnn"]["iou_history"], rank["epochs"][-1]["dynamic_rcnn"]["beta_history"])
           for rank in ranks]
    assert [tuple(pair) for pair in state["dynamic_rcnn"]["rank_histories"]] == own
    assert own[0] != own[1]

    # The final evaluation ran sharded over the ranks: the same detections and mAP as a
    # single process evaluating the checkpoint.
    import dbf_ext.train.engine as engine

    single = {}

    def evaluate_detections_kept(predictions, *args, **kwargs):
        single["detections"] = predictions
        return evaluate_detections(predictions, *args, **kwargs)

    evaluate_detections = engine.evaluate_detections
    monkeypatch.setattr(engine, "evaluate_detections", evaluate_detections_kept)
    classes = tuple(state["classes"])
    model = build_detector("tiny-fpn", len(classes), 96)
    model.load_state_dict(state["model"])
    val_set = DotaDetectionDataset(dp_set, "val", classes=classes)
    mean_ap, _ = evaluate(model, val_set, torch.device("cpu"))
    assert records[-1]["map50"] == mean_ap
    gathered = ranks[0]["detections"]
    assert len(gathered) == len(single["detections"]) == 10
    for image, (theirs, ours) in enumerate(zip(gathered, single["detections"])):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(theirs[key], ours[key]), f"image {image}, {key}"
    assert sum(len(p["scores"]) for p in single["detections"]) > 0


def test_killed_rank_ends_the_job_and_resume_continues_identically(dp_set, straight_run, tmp_path):
    straight, _ = straight_run
    out = tmp_path / "run"
    # Rank 1 dies (SIGKILL) before its 6th step, the second step of epoch 2: rank 0 cannot
    # finish the epoch without it; torchrun ends the job.
    killed = torchrun(*train_command(dp_set, out, *DBF_RUN), worker=("--kill-rank", "1", "--kill-at-step", "6"))
    assert killed.returncode != 0
    assert [r["epoch"] for r in checkpoint(out)["history"]] == [0, 1]
    assert log_lines(out) == checkpoint(out)["history"]

    resumed = torchrun(*train_command(dp_set, out, *DBF_RUN, "--resume"), worker=None)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    a, b = checkpoint(straight), checkpoint(out)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert a["dbf"] == b["dbf"] and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["dynamic_rcnn"] == b["dynamic_rcnn"]  # each rank resumed its own statistics
    for x, y in zip(a["history"], b["history"]):
        assert x["losses"] == y["losses"]
    assert log_lines(out) == b["history"] and [r["epoch"] for r in b["history"]] == [0, 1, 2, 3]


def test_two_process_eval_command_equals_single_process(straight_run, capsys, one_thread):
    out, _ = straight_run
    command = ["eval", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", "--iou-thr", "0.1"]
    two = torchrun(*command, worker=None)
    assert two.returncode == 0, two.stderr[-4000:]
    assert main(command) == 0
    single = capsys.readouterr().out
    assert two.stdout == single  # printed once (rank 0), the same figures
    assert float(single.split(":")[1].split()[0]) > 0  # detections match objects at IoU 0.1


def test_one_process_resumes_a_two_process_run(dp_set, straight_run, tmp_path, capsys):
    """Another number of processes: the run goes on (and says what changes); the job's cache
    counters continue and rank 0 takes every rank's pending Dynamic R-CNN statistics."""
    straight, _ = straight_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = checkpoint(out)
    assert main(train_command(dp_set, out, *DBF_RUN[2:], "--epochs", "5", "--resume")) == 0
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    after = checkpoint(out)
    assert [r["epoch"] for r in after["history"]] == [0, 1, 2, 3, 4]
    assert after["history"][:4] == before["history"] and after["world_size"] == 1
    assert after["cache"]["stats"]["hits"] == before["cache"]["stats"]["hits"]  # a new cache: epoch 4 fills it
    assert after["cache"]["stats"]["misses"] == before["cache"]["stats"]["misses"] + 8
    pending = [v for iou, _ in before["dynamic_rcnn"]["rank_histories"] for v in iou]
    assert after["dynamic_rcnn"]["iou_history"][:len(pending)] == pending  # no update since


def test_ranks_disagreeing_on_the_freeze_decision_fail_loudly(dp_set, tmp_path):
    out = tmp_path / "run"
    run = torchrun(*train_command(dp_set, out, "--epochs", "3", "--unfrozen-epochs", "0", "--cache", "off"),
                   worker=("--diverge-rank", "1"))
    assert run.returncode != 0
    message = ("dbf-ext train: error: ranks disagree on the freeze decision of epoch 1 "
               "(rank 0: frozen, rank 1: trained)")
    assert run.stderr.count(message) == RANKS, run.stderr[-4000:]  # every rank says it, in one line
    assert [r["epoch"] for r in log_lines(out)] == [0]


def test_rank_budget_smaller_than_its_shard(uneven_set, tmp_path):
    """Each rank's cache holds 3 of its shard's samples (2 in host memory, 1 on disk): rank 0's
    shard (3 tiles, padded to 4 by a repeat) fits, rank 1's (4 tiles) does not. Dynamic R-CNN
    updates every step from both ranks' statistics."""
    features = build_detector("tiny-fpn", 4, 96).backbone.body.eval()(torch.zeros(1, 3, 96, 96))
    slab = SlabLayout.for_maps(list(features.values()), "float32").slab_bytes
    cache = f"float32:cpu={int(2.5 * slab)},disk={int(1.5 * slab)}"
    run = torchrun(*train_command(uneven_set, tmp_path / "run", "--epochs", "3", "--unfrozen-epochs", "0",
                                  "--cache", cache, "--cache-dir", str(tmp_path / "cache"), "--dynamic-rcnn"),
                   worker=("--observe", str(tmp_path), "--dynamic-interval", "1"))
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = observations(tmp_path)
    records = log_lines(tmp_path / "run")
    assert [epoch_cache_counts(rank, 2) for rank in ranks] == [(4, 4), (3, 4)]
    assert records[2]["cache_hit_rate_per_rank"] == [1.0, 0.75] and records[2]["cache_hit_rate"] == 7 / 8
    for rank in ranks:
        assert rank["epochs"][-1]["cache_entries"] == {"gpu": 0, "cpu": 2, "disk": 1}
    assert ranks[1]["epochs"][-1]["cache_stats"]["not_stored"] >= 1
    summary = ranks[0]["cache_summary"]
    assert summary["entries"] == {"gpu": 0, "cpu": 4, "disk": 2} and summary["ranks"] == RANKS
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["rank0", "rank1"]

    updates = [rank["dynamic_updates"] for rank in ranks]
    assert len(updates[0]) == len(updates[1]) == 3 * 2  # every step of 3 epochs of 2 steps
    ranks_differ = False
    for first, second in zip(*updates):
        assert (first["iou_threshold"], first["beta"]) == (second["iou_threshold"], second["beta"])
        both_iou, both_beta = first["own_iou"] + second["own_iou"], first["own_beta"] + second["own_beta"]
        if both_iou:
            assert first["iou_threshold"] == pytest.approx(max(0.4, sum(both_iou) / len(both_iou)), rel=1e-12)
        if both_beta and np.median(both_beta) >= 1e-15:
            assert first["beta"] == pytest.approx(min(1.0, float(np.median(both_beta))), rel=1e-12)
        ranks_differ |= first["own_iou"] != second["own_iou"]
    assert ranks_differ  # so agreeing values mean gathered statistics, not equal ones


# ----- the sampler and evaluation sharding, without processes ----------------------------------


def yielded(sampler: CacheAffineSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("size, ranks", [(12, 3), (7, 2), (10, 4), (5, 5), (1, 1)])
def test_sampler_shards_are_disjoint_and_cover_the_data_set(size, ranks):
    samplers = [CacheAffineSampler(size, ranks, rank, seed=3) for rank in range(ranks)]
    shards = [set(s.shard()) for s in samplers]
    assert sorted(i for shard in shards for i in shard) == list(range(size))  # disjoint, covering
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for sampler, shard in zip(samplers, shards):
        order = yielded(sampler, 0)
        # Every rank the same number of steps: ceil(size / ranks), a short shard repeating its own.
        assert len(order) == len(sampler) == -(-size // ranks)
        assert set(order) == shard and len(order) - len(shard) in (0, 1)


def test_sampler_keeps_shards_while_frozen_and_reshuffles_within():
    schedule = StepInterval((0, 3))  # trains in 0 and 3
    samplers = [CacheAffineSampler(40, 2, rank, seed=0, is_frozen=schedule.is_frozen) for rank in range(2)]
    for sampler in samplers:
        orders = [yielded(sampler, epoch) for epoch in range(6)]
        assert len({frozenset(o) for o in orders[:3]}) == 1  # epochs 0-2: one shard
        assert len({frozenset(o) for o in orders[3:]}) == 1  # epochs 3-5: the one dealt in epoch 3
        assert set(orders[0]) != set(orders[3])
        assert len({tuple(o) for o in orders}) == 6  # a new order every epoch
    # a fresh sampler (a resumed run) deals the same shards and orders
    fresh = CacheAffineSampler(40, 2, 1, seed=0, is_frozen=schedule.is_frozen)
    assert yielded(fresh, 4) == yielded(samplers[1], 4)
    # other seeds, other shards; "never" keeps the first deal; no schedule: a new deal every epoch
    assert set(yielded(CacheAffineSampler(40, 2, 0, seed=1), 0)) != set(yielded(samplers[0], 0))
    never = CacheAffineSampler(40, 2, 0, seed=0, reshard="never", is_frozen=schedule.is_frozen)
    assert {frozenset(yielded(never, epoch)) for epoch in range(6)} == {frozenset(never.shard())}
    every = CacheAffineSampler(40, 2, 0, seed=0)
    assert len({frozenset(yielded(every, epoch)) for epoch in range(4)}) == 4


def test_sampler_shard_epoch_follows_the_schedule():
    sampler = CacheAffineSampler(10, 2, 0, is_frozen=StepInterval((2, 5)).is_frozen)
    deals = []
    for epoch in range(7):
        sampler.set_epoch(epoch)
        deals.append(sampler.shard_epoch)
    assert deals == [None, None, 2, 2, 2, 5, 5]  # frozen from the start: the first deal


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="3 samples cannot give each of 4 ranks"):
        CacheAffineSampler(3, 4, 0)
    with pytest.raises(ValueError, match="rank"):
        CacheAffineSampler(10, 2, 2)
    with pytest.raises(ValueError, match="reshard"):
        CacheAffineSampler(10, 2, 0, reshard="sometimes")


@pytest.mark.parametrize("count, batch_size, ranks", [(10, 8, 2), (21, 4, 3), (3, 8, 4), (16, 4, 2)])
def test_evaluation_shards_are_the_single_process_batches(count, batch_size, ranks):
    single = DistributedContext().shard_batches(count, batch_size)
    shards = [DistributedContext(rank=r, world_size=ranks).shard_batches(count, batch_size) for r in range(ranks)]
    assert sorted((b for shard in shards for b in shard), key=lambda b: b.start) == single
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(count))  # each once


def test_dynamic_rcnn_statistics_resume_per_rank_or_on_rank_0():
    controller_state = DynamicRCNNController().state_dict()
    state = {**controller_state, "iou_history": [0.5], "beta_history": [0.2],
             "rank_histories": [([0.5], [0.2]), ([0.6, 0.7], [])]}
    resumed = {}
    for world_size in (2, 3):
        for rank in range(world_size):
            controller = DynamicRCNNController()
            load_dynamic_rcnn_state(DistributedContext(rank=rank, world_size=world_size), controller, state)
            resumed[world_size, rank] = (controller.iou_history, controller.beta_history)
    assert resumed[2, 0] == ([0.5], [0.2]) and resumed[2, 1] == ([0.6, 0.7], [])  # each its own
    assert resumed[3, 0] == ([0.5, 0.6, 0.7], [0.2]) and resumed[3, 1] == resumed[3, 2] == ([], [])
    single = {**controller_state, "iou_history": [0.5], "beta_history": [0.2]}  # a 1-process run's
    controller = DynamicRCNNController()
    load_dynamic_rcnn_state(DistributedContext(rank=1, world_size=2), controller, single)
    assert (controller.iou_history, controller.beta_history) == ([], [])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="two GPUs would be enough")
def test_a_gpu_per_process_or_a_one_line_error(monkeypatch):
    """Under torchrun with two processes on this machine, --device cuda needs two GPUs; the
    error comes before any process group is set up (nothing waits for a peer)."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="2 processes on this machine need a GPU each"):
        init_distributed("cuda")
    with pytest.raises(ValueError, match="--device"):
        init_distributed("tpu")
    assert not torch.distributed.is_initialized()


def test_sync_batchnorm_on_the_cpu_is_a_one_line_error():
    context = DistributedContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match="--sync-bn needs GPUs"):
        wrap_model(torch.nn.BatchNorm2d(3), context, sync_batchnorm=True)
