"""Two real processes under torchrun with gloo on the CPU: DDP training where rank 0 alone writes and
metrics cover both ranks, and a distributed evaluation that counts every validation image once."""

import json
import os
import subprocess
import sys

import pytest
import torch

from train import checkpoint, dist
from train.evaluate import evaluate_checkpoint
from train.run_folder import lock as lock_run_folder
from train.stream import ShardStream, epoch_order, open_shards, reader_plan

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train.cli"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(args, cwd):
    done = subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=300, cwd=cwd, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_read_disjoint_shards_that_cover_the_split(demo_shards):
    """The plan both ranks of the run below follow (2 ranks x 1 worker): disjoint, complete."""
    split = open_shards(str(demo_shards)).split("train")
    order = epoch_order(len(split.urls), seed=0, epoch=0, shuffle=True)
    plans = [reader_plan(order, rank, 2) for rank in range(2)]
    assert all(stride is None for _, stride in plans)
    assert sorted(plans[0][0] + plans[1][0]) == list(range(len(split.urls))) and not set(plans[0][0]) & set(plans[1][0])
    # And in a validation pass each image is seen exactly once over the ranks.
    keys = [s.key for rank in range(2) for batch in ShardStream(open_shards(str(demo_shards)).split("validation"), 16,
            train=False, rank=rank, world_size=2).batches() for s in batch]
    assert len(keys) == len(set(keys)) == 100


@pytest.mark.slow
def test_torchrun_two_process_gloo_training_and_evaluation(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(demo_shards), "--out", str(out), "--arch", "alexnet-tv", "--crop-size", "64", "--batch-size", "4",
            "--epochs", "1", "--steps-per-epoch", "3", "--log-every", "1", "--workers", "1", "--device", "cpu"]
    torchrun(args, cwd=tmp_path)

    # Rank 0 alone wrote, once: one start record, one record per step, nothing in the working folder.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "best.pt", "config.json", "last.pt", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["start", "train_step", "train_step", "train_step", "epoch"]
    assert lines[0]["world_size"] == 2 and lines[0]["steps_per_epoch"] == 3
    assert [r["images"] for r in lines[1:4]] == [8, 8, 8]  # 4 per rank, summed over both
    state = checkpoint.load(out)
    assert (state["world_size"], state["epoch"], state["global_step"]) == (2, 1, 3)
    assert lines[-1]["val_top1_err"] == state["best_top1_err"]

    # Batches of 1 and one thread everywhere: each image's logits are computed the same way in one
    # process and in two, so the error counts must agree exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate_checkpoint(str(out), batch_size=1, workers=0, device="cpu")
    finally:
        torch.set_num_threads(threads)
    both = torchrun(["eval", "--checkpoint", str(out), "--center", "--json", "--workers", "1", "--batch-size", "1"], cwd=tmp_path)
    (result,) = [json.loads(line) for line in both.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
    assert result["samples"] == single["samples"] == 100
    assert (result["top1_err"], result["top5_err"]) == (single["top1_err"], single["top5_err"])
    assert result["loss"] == pytest.approx(single["loss"], rel=1e-9)


@pytest.mark.slow
def test_when_rank_0_cannot_lock_the_run_folder_every_rank_stops(demo_shards, tmp_path):
    """Another process holds the run folder (as another alextrain would): rank 0 says so, and rank 1,
    which has nothing to write, stops too instead of waiting for rank 0 in a collective."""
    out = tmp_path / "run"
    args = ["--shards", str(demo_shards), "--out", str(out), "--arch", "alexnet-tv", "--crop-size", "64", "--batch-size", "4",
            "--epochs", "1", "--steps-per-epoch", "3", "--workers", "0", "--device", "cpu"]
    lock = lock_run_folder(out)
    try:
        done = subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ONE_THREAD)
    finally:
        os.close(lock)
    errors = {line for line in done.stderr.splitlines() if line.startswith("Error: ")}
    assert done.returncode != 0 and errors == {
        f"Error: {out}: another alextrain is writing this run folder (it holds {out / '.lock'}); wait for it to end, or use another --out",
        "Error: rank 1: stopped because rank 0 did (its error says why)"}, done.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.parametrize("cores, ranks_here, expected", [(16, None, 15), (64, "8", 7), (2, None, 1), (1, None, 0), (8, "8", 0)])
def test_default_workers_share_the_cores_among_the_ranks_on_the_machine(monkeypatch, cores, ranks_here, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    if ranks_here is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    assert dist.default_workers() == expected
