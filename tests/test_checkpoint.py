"""Checkpoints: a real SIGKILL of a real `alextrain` mid-epoch, then --resume, gives the same losses,
evaluations and final weights as a run that was never interrupted (CPU, float32, the paper's model
with dropout, so the per-step seeding of every random draw is checked too)."""

import errno
import filecmp
import json
import os
import shutil
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
from train.evaluate import evaluate_checkpoint
from train.loop import train
from train.metrics import MetricsError, MetricsLog
from train.model import build_model

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
    # the run goes on in the folder the checkpoint lies in, not in the config's "runs/train"
    assert checkpoint.config_for_resume(tmp_path, {"epochs": 5}) == TrainConfig(shards="x", epochs=5, out=str(tmp_path),
                                                                                 resume=str(tmp_path / "last.pt"))

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


def test_zero_byte_checkpoint_is_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path / "empty.pt")
    assert str(e.value).startswith(f"{tmp_path / 'empty.pt'}: unreadable checkpoint (") and "\n" not in str(e.value)


def test_weights_of_another_arch_are_one_line(tmp_path):
    torch.manual_seed(0)
    state = {"format": checkpoint.FORMAT, "model": build_model("alexnet-tv", 10).state_dict(), "epoch": 1, "step": 0,
             "config": TrainConfig(shards="x", arch="alexnet").to_dict(), "classes": [{"index": i} for i in range(10)]}
    checkpoint.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(tmp_path, torch.device("cpu"))
    assert str(e.value) == (f"{tmp_path / 'last.pt'}: its weights do not fit --arch alexnet (a checkpoint of another "
                            "architecture or class count)")


def test_a_pipe_command_in_a_checkpoint_is_never_run(tmp_path):
    """A checkpoint is data; its config.shards must not become a shell command for eval or --resume."""
    marker = tmp_path / "ran"
    state = {"format": checkpoint.FORMAT, "model": {}, "epoch": 1, "step": 0, "classes": [],
             "config": TrainConfig(shards=f"pipe:touch {marker}; cat shards/{{}}").to_dict()}
    checkpoint.save(state, tmp_path / "last.pt")
    refusal = (f"{tmp_path / 'last.pt'}: its shards are a shell command ('pipe:touch {marker}; cat shards/{{}}'); "
               "not run from a checkpoint: give --shards on the command line")
    with pytest.raises(CheckpointError) as e:
        checkpoint.config_for_resume(tmp_path, {"epochs": 5})
    assert str(e.value) == refusal
    # typed on this command line, it is the user's own command
    assert checkpoint.config_for_resume(tmp_path, {"shards": "pipe:cat x/{}"}).shards == "pipe:cat x/{}"
    with pytest.raises(CheckpointError) as e:
        evaluate_checkpoint(str(tmp_path), device="cpu")
    assert str(e.value) == refusal and not marker.exists()


def test_save_removes_stale_temporary_checkpoints_and_nothing_else(tmp_path):
    """A kill during a save leaves `.tmp-last.pt.XXXXXXXX` (up to a whole checkpoint): the next save
    removes it; a user's own `.tmp-` files stay."""
    stale = [tmp_path / ".tmp-last.pt.k2j4h5_x", tmp_path / ".tmp-best.pt.link"]
    kept = [tmp_path / ".tmp-draft.txt", tmp_path / ".tmp-last.pt"]  # not one of our temporary names
    for p in stale + kept:
        p.write_bytes(b"x" * 100)
    checkpoint.save({"format": checkpoint.FORMAT}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt"] + [p.name for p in kept])


def test_resume_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "start", "global_step": 0}\n')
    with pytest.raises(CheckpointError) as e:
        checkpoint.resolve(tmp_path)
    assert str(e.value) == f"{tmp_path}: the run stopped before its first checkpoint; start it again without --resume"


TOTALS_FORMAT_1 = ("loss_sum", "top1", "top5", "samples", "seconds", "wait")  # EpochTotals' fields when format 1 was written


def as_format_1(state: dict) -> dict:
    """A format-2 checkpoint as alextrain wrote it in format 1 (main at b1711cb, train/loop.py's save):
    the epoch's sums a list in EpochTotals' field order; all else the same."""
    return {**state, "format": 1, "epoch_totals": [state["epoch_totals"][k] for k in TOTALS_FORMAT_1]}


def test_a_format_1_checkpoint_is_converted_when_loaded(tmp_path):
    """Format 2 stores the epoch's sums by name and always records `inputs` and `best_epoch`; a format-1
    checkpoint (tensors and plain values only) loads as its format-2 twin, the oldest ones, which lack
    both records, with their meaning: trained "standardize", best epoch unknown."""
    totals = {"loss_sum": 9.5, "top1": 2.0, "top5": 5.0, "samples": 8.0, "seconds": 0.25, "wait": 0.125}
    state = {"format": checkpoint.FORMAT, "model": {"w": torch.arange(6.0)}, "epoch": 0, "step": 2, "epoch_totals": totals,
             "inputs": "subtract-mean", "best_epoch": None, "config": TrainConfig(shards="x").to_dict()}
    torch.save(as_format_1(state), tmp_path / "one.pt")
    loaded = checkpoint.load(tmp_path / "one.pt")
    assert loaded["epoch_totals"] == totals and loaded["format"] == 2 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}
    oldest = {k: v for k, v in as_format_1(state).items() if k not in ("inputs", "best_epoch")}
    torch.save(oldest, tmp_path / "oldest.pt")
    assert {k: checkpoint.load(tmp_path / "oldest.pt")[k] for k in ("inputs", "best_epoch")} == {"inputs": "standardize", "best_epoch": None}
    torch.save({**oldest, "format": 3}, tmp_path / "later.pt")
    with pytest.raises(CheckpointError, match=r"later.pt: not an alextrain checkpoint of format 1 or 2$"):
        checkpoint.load(tmp_path / "later.pt")


def test_a_run_resumed_from_a_format_1_checkpoint_is_the_run_resumed_from_format_2(demo_shards, tmp_path, monkeypatch):
    """A run stopped mid-epoch (its epoch's sums so far in the checkpoint), its last.pt also written in
    format 1: resumed from either, the epoch's record and the final weights are the same."""
    two, one = tmp_path / "two", tmp_path / "one"
    save = checkpoint.save

    def killed_after_the_first_save(state, path):
        save(state, path)
        raise Killed

    monkeypatch.setattr(checkpoint, "save", killed_after_the_first_save)
    with pytest.raises(Killed):  # after step 2 of 4
        train(TrainConfig(shards=str(demo_shards), out=str(two), arch="alexnet-tv", crop_size=64, batch_size=8, epochs=1,
                          steps_per_epoch=4, save_every=2, log_every=1, workers=0, device="cpu"))
    monkeypatch.setattr(checkpoint, "save", save)
    state = checkpoint.load(two)
    assert (state["step"], state["epoch_totals"]["samples"]) == (2, 16.0)
    shutil.copytree(two, one)
    torch.save(as_format_1(state), one / "last.pt")  # tensors and plain values: what format 1 held

    for run in (two, one):
        train(checkpoint.config_for_resume(run, {}))
    assert [without_timing(r) for r in records(one, "epoch")] == [without_timing(r) for r in records(two, "epoch")]
    final_one, final_two = checkpoint.load(one)["model"], checkpoint.load(two)["model"]
    assert all(torch.equal(final_one[k], final_two[k]) for k in final_two)


def test_resume_reads_metrics_as_report_does(tmp_path):
    """Rewinding a killed run's metrics.jsonl drops what came after its checkpoint and a torn last line
    of any bytes (as `alextrain report` does); a broken line in the middle is one error naming it."""
    records = [{"kind": "start", "global_step": 0}, {"kind": "train_step", "epoch": 1, "global_step": 1},
               {"kind": "train_step", "epoch": 1, "global_step": 2}]
    whole = "".join(json.dumps(r) + "\n" for r in records).encode()
    path = tmp_path / "metrics.jsonl"
    for torn in (b'{"kind": "tr\xff\xfe\x80', b"\x00" * 300):
        path.write_bytes(whole + torn)
        MetricsLog(path, enabled=True).rewind(global_step=1, epochs_done=0)
        assert path.read_bytes() == "".join(json.dumps(r) + "\n" for r in records[:2]).encode()
    path.write_bytes(whole + b"\xff{oops\n" + whole)
    with pytest.raises(MetricsError, match=r"metrics.jsonl: line 4 is not a metrics record: '\ufffd\{oops'$"):
        MetricsLog(path, enabled=True).rewind(global_step=1, epochs_done=0)
    path.write_bytes(whole + b'{"kind": "train_step", "epoch": 1}\n' + whole)
    with pytest.raises(MetricsError, match=r"metrics.jsonl: line 4: a train_step record without a number for global_step$"):
        MetricsLog(path, enabled=True).rewind(global_step=1, epochs_done=0)


class Killed(BaseException):
    """Stands for a SIGKILL where it is raised: nothing after it runs, nothing catches it."""


@pytest.mark.slow
@pytest.mark.parametrize("hard_links", [True, False])
def test_a_run_killed_before_linking_its_best_epoch_gets_best_pt_when_resumed(demo_shards, tmp_path, monkeypatch, hard_links):
    """The run dies after saving epoch 2 (better than epoch 1) as last.pt, before linking it as
    best.pt: best.pt still holds epoch 1. The next start makes best.pt epoch 2's checkpoint again: a
    second name of last.pt, or on a file system without hard links (FAT, some network mounts) a copy."""
    out = tmp_path / "run"
    if not hard_links:
        def no_hard_links(*args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_hard_links)
    link = checkpoint.link

    def killed_at_the_second_link(source, path):
        if (out / "best.pt").exists():
            raise Killed
        link(source, path)

    monkeypatch.setattr(checkpoint, "link", killed_at_the_second_link)
    # A seeded run whose epoch 2 scores better than its epoch 1 (checked below), so epoch 2 is linked.
    with pytest.raises(Killed):
        train(TrainConfig(shards=str(demo_shards), out=str(out), arch="alexnet-bn", crop_size=64, batch_size=32, steps_per_epoch=4,
                          lr=0.005, epochs=2, workers=0, device="cpu"))
    monkeypatch.setattr(checkpoint, "link", link)
    first, second = records(out, "epoch")
    assert second["val_top1_err"] < first["val_top1_err"] and second["best_top1_err"] == second["val_top1_err"]
    assert checkpoint.load(out / "best.pt")["epoch"] == 1 and checkpoint.load(out)["epoch"] == 2  # stale

    train(checkpoint.config_for_resume(out, {}))  # all epochs done: the start alone
    best = checkpoint.load(out / "best.pt")
    assert best["epoch"] == 2 and (best["best_epoch"], best["best_top1_err"]) == (2, second["val_top1_err"])
    assert filecmp.cmp(out / "best.pt", out / "last.pt", shallow=False)
    assert os.path.samefile(out / "best.pt", out / "last.pt") == hard_links
    assert not list(out.glob(".tmp-*"))
