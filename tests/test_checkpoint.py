"""Checkpoints: a real SIGKILL of a real `alextrain` mid-epoch, then --resume, gives the same losses,
evaluations and final weights as a run that was never interrupted (CPU, float32, the paper's model
with dropout, so the per-step seeding of every random draw is checked too)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import checkpoint
from train.checkpoint import CheckpointError
from train.config import TrainConfig

ALEXTRAIN = [sys.executable, "-m", "train.cli"]


def train_args(shards: Path, out: Path, workers: int) -> list[str]:
    # 2 epochs of 4 steps; last.pt after global steps 2 and 6 (mid-epoch) and 4 and 8 (epoch ends).
    return ["--shards", str(shards), "--out", str(out), "--arch", "alexnet", "--crop-size", "64", "--batch-size", "8",
            "--epochs", "2", "--steps-per-epoch", "4", "--save-every", "2", "--log-every", "1", "--workers", str(workers),
            "--shuffle-buffer", "32", "--device", "cpu"]


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("images_per_s", "data_wait", "epoch_time", "eval_time", "time")}


def run(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        done = subprocess.run(ALEXTRAIN + args, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-2000:]


def wait_for_step(out: Path, global_step: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        if (out / "metrics.jsonl").exists() and any(r["global_step"] >= global_step for r in records(out, "train_step")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {global_step} within 300 s")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_repeats_the_uninterrupted_run(demo_shards, tmp_path, workers):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(train_args(demo_shards, reference, workers), tmp_path / "reference.log")

    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(ALEXTRAIN + train_args(demo_shards, killed, workers), stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_step(killed, 3, proc, log)  # step 3 logged: the step-2 checkpoint is on disk
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = checkpoint.load(killed)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 2, 2)  # mid-epoch
    assert not (killed / "best.pt").exists()

    run(["--resume", str(killed)], tmp_path / "resumed.log")

    # The killed run logged step 3 (and maybe 4) before dying; the resumed run rewound them.
    steps = [(r["global_step"], r["loss"]) for r in records(killed, "train_step")]
    assert [s for s, _ in steps] == list(range(1, 9))
    assert steps == [(r["global_step"], r["loss"]) for r in records(reference, "train_step")]
    epochs = [without_timing(r) for r in records(killed, "epoch")]
    assert epochs == [without_timing(r) for r in records(reference, "epoch")] and len(epochs) == 2
    assert [r["global_step"] for r in records(killed, "start")] == [0, 2]

    final, expected = checkpoint.load(killed), checkpoint.load(reference)
    assert (final["epoch"], final["step"], final["global_step"]) == (2, 0, 8)
    assert final["model"].keys() == expected["model"].keys()
    assert all(torch.equal(final["model"][k], expected["model"][k]) for k in expected["model"])
    assert final["config"] == {**expected["config"], "out": str(killed), "resume": str(killed / "last.pt")}
    assert not list(killed.glob(".tmp-*"))


def test_checkpoint_round_trip_and_errors(tmp_path):
    state = {"format": checkpoint.FORMAT, "model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "step": 0,
             "config": TrainConfig(shards="x").to_dict(), "classes": [{"index": 0, "wnid": "a", "name": "b"}], "best_top1_err": None}
    checkpoint.save(state, tmp_path / "last.pt")
    loaded = checkpoint.load(tmp_path)  # a run folder means its last.pt
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["config"] == state["config"]
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}
    assert checkpoint.config_for_resume(tmp_path, {"epochs": 5}) == TrainConfig(shards="x", epochs=5, resume=str(tmp_path / "last.pt"))

    checkpoint.link(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoint.save({**state, "epoch": 4}, tmp_path / "last.pt")  # replaces last.pt's name only
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 3 and checkpoint.load(tmp_path)["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]

    with pytest.raises(CheckpointError, match="no checkpoint here"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: unreadable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an alextrain checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
