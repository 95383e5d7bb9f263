"""`alextrain` on the command line: help, bad input as one clear error line, and both spellings of
the training command."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from train import checkpoint
from train.cli import main
from train.config import TrainConfig


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def error_line(result) -> str:
    """The one line a failed command prints."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0][len("Error: ") :]


def final_error(result) -> str:
    """The error line that ends a failed training run (after its progress bar), without a traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0][len("Error: ") :]


@pytest.fixture
def shards_copy(demo_shards, tmp_path):
    return shutil.copytree(demo_shards, tmp_path / "shards")


def test_help_lists_every_training_option_with_its_default():
    text = " ".join(invoke("--help").output.split())  # undo click's line wrapping
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text
    for default in ("--epochs INTEGER number of epochs [default: 90]", "--batch-size INTEGER images per step on each rank [default: 128]",
                    "--lr FLOAT base learning rate, for a global batch of 128 [default: 0.01]", "[default: plateau]",
                    "--arch [alexnet|alexnet-tv|alexnet-bn]"):
        assert default in text
    # patience counts evaluations (one every --eval-every epochs), and the help says so
    assert "--patience INTEGER plateau schedule: evaluations (one every --eval-every epochs) without a better" in text
    for command in ("eval", "predict", "train"):
        assert invoke(command, "--help").exit_code == 0
    eval_help = " ".join(invoke("eval", "--help").output.split())
    assert "--workers INTEGER RANGE loader worker processes that read and decode the shards" in eval_help and "DataLoader" not in eval_help


@pytest.mark.parametrize("command", [[], ["train"]])
def test_missing_shard_folder(tmp_path, command):
    missing = tmp_path / "nowhere"
    line = error_line(invoke(*command, "--shards", str(missing), "--out", str(tmp_path / "run")))
    assert line == f"{missing}: no such shard folder; build one with `alexprep build-shards --out {missing}`"
    assert not (tmp_path / "run").exists()


def test_missing_stats_json(shards_copy, tmp_path):
    (shards_copy / "stats.json").unlink()
    line = error_line(invoke("--shards", str(shards_copy), "--out", str(tmp_path / "run")))
    assert line.startswith(f"{shards_copy / 'stats.json'}: no stats.json here")


def test_truncated_shard_is_caught_before_training(shards_copy, tmp_path):
    shard = shards_copy / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[:10_000])
    line = error_line(invoke("--shards", str(shards_copy), "--out", str(tmp_path / "run")))
    assert line.startswith(f"{shard}: 10000 bytes, _info.json says ")


@pytest.mark.slow
def test_corrupt_shard_met_while_training_fails_with_its_name(shards_copy, tmp_path):
    """Damage that keeps the size passes the start-up check; the worker that meets it must stop the
    run with the shard's name (a subprocess with a timeout: a hang fails the test)."""
    shard = shards_copy / "train-000006.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmembers()[30].offset  # the tar header of the 11th sample's first file
    data = bytearray(shard.read_bytes())
    data[offset : offset + 512] = bytes(range(256)) * 2
    shard.write_bytes(bytes(data))
    args = ["--shards", str(shards_copy), "--out", str(tmp_path / "run"), "--arch", "alexnet-tv", "--crop-size", "64",
            "--batch-size", "8", "--workers", "2", "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "train.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"Error: {shard}: 10 samples, _info.json says 32 (truncated or corrupt shard)"


def test_bad_values_and_run_folder_clashes(demo_shards, tmp_path):
    assert error_line(invoke("--shards", str(demo_shards), "--crop-size", "300")) == "crop_size must be in 1..256, not 300"
    if not torch.cuda.is_available():
        assert error_line(invoke("--shards", str(demo_shards), "--device", "cuda")) == "--device cuda: no CUDA device available"
        assert error_line(invoke("--shards", str(demo_shards), "--decode", "gpu", "--device", "cpu")) == "--decode gpu needs a CUDA device"
        assert error_line(invoke("--shards", str(demo_shards), "--decode", "both", "--device", "cpu")) == "--decode both needs a CUDA device"
    for value in ("nan", "inf", "-inf"):
        assert error_line(invoke("--shards", str(demo_shards), "--lr", value)) == f"lr must be a finite number, not {float(value)}"
    assert error_line(invoke("--shards", str(demo_shards), "--lighting-std", "nan")) == "lighting_std must be a finite number, not nan"
    run = tmp_path / "run"
    run.mkdir()
    assert error_line(invoke("--resume", str(run))) == f"{run / 'last.pt'}: no checkpoint here"
    (run / "last.pt").write_bytes(b"")
    assert error_line(invoke("--shards", str(demo_shards), "--out", str(run))) == (
        f"{run} already holds a run (last.pt); continue it with --resume {run}, or pick another --out")
    assert error_line(invoke("--resume", str(run))).startswith(f"{run / 'last.pt'}: unreadable checkpoint (")


def test_usage_errors():
    result = invoke()
    assert result.exit_code == 2 and "give --shards DIR (or --resume RUN to continue a run)" in result.output
    result = invoke("--epochs", "3", "eval", "--checkpoint", "x")
    assert result.exit_code == 2 and "training options go after the command name" in result.output


def test_predict_and_eval_errors(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    assert error_line(invoke("predict", "--checkpoint", str(tmp_path), str(not_image))) == f"{tmp_path / 'last.pt'}: no checkpoint here"
    assert error_line(invoke("eval", "--checkpoint", str(tmp_path / "x.pt"))) == f"{tmp_path / 'x.pt'}: no checkpoint here"
    # As in training: 16 workers x 4 slots x 100,000 images is more memory than any machine here has, said
    # in one line before anything is read (the loader's shared-memory slots failed with ENOMEM).
    line = error_line(invoke("eval", "--checkpoint", str(tmp_path / "x.pt"), "--batch-size", "100000", "--workers", "16"))
    assert re.fullmatch(r"batch_size 100000: the loader's batches take 1258\.3 GB \(16 workers x 4 batches of 100000 x 196,608 "
                        r"bytes\), more than the \d+\.\d GB of memory available here", line), line


# A run of two steps that costs seconds: BatchNorm AlexNet on 64 px crops, no loader processes.
TINY = ["--arch", "alexnet-bn", "--crop-size", "64", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "2",
        "--workers", "0", "--device", "cpu"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over(demo_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"kind": "start", "global_step": 0}\n{"kind": "train_step", "global_step": 1}\n')
    (run / ".tmp-last.pt.a1b2c3d4").write_bytes(b"\0" * 1000)  # a save killed half-way
    assert error_line(invoke("--resume", str(run))) == f"{run}: the run stopped before its first checkpoint; start it again without --resume"
    result = invoke("--shards", str(demo_shards), "--out", str(run), *TINY)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["start", "train_step", "epoch"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "best.pt", "config.json", "last.pt", "metrics.jsonl"]


@pytest.mark.slow
def test_a_loss_that_is_not_finite_stops_the_run_keeping_the_last_good_checkpoint(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "--steps-per-epoch", "6", "--log-every", "1", "--save-every", "1", "--lr", "1e4"]
    line = final_error(invoke("--shards", str(demo_shards), "--out", str(run), *args))
    assert re.fullmatch(r"stopped: the loss is (nan|inf) at step 3; the last finite loss was \S+ at step 2; "
                        r"last.pt keeps the last checkpoint saved before it \(try a lower --lr\)", line), line
    assert checkpoint.load(run)["global_step"] == 2 and not (run / "best.pt").exists()
    assert [r["global_step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2]


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a checkpoint (about 460 MB) cannot fit. Needs root and mount rights."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_or_a_file_in_the_way_is_one_line(demo_shards, tmp_path, full_disk):
    line = final_error(invoke("--shards", str(demo_shards), "--out", str(full_disk / "run"), *TINY))
    assert line == f"{full_disk / 'run'}: cannot write (No space left on device)"
    assert sorted(p.name for p in (full_disk / "run").iterdir()) == [".lock", "config.json", "metrics.jsonl"]
    (tmp_path / "file").write_text("")
    line = error_line(invoke("--shards", str(demo_shards), "--out", str(tmp_path / "file" / "run"), *TINY))
    assert line == f"{tmp_path / 'file' / 'run'}: cannot write (Not a directory)"


@pytest.mark.slow
def test_a_killed_loader_worker_ends_the_run_with_one_line(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(demo_shards), "--out", str(out), "--arch", "alexnet-bn", "--crop-size", "64", "--batch-size", "8",
            "--steps-per-epoch", "1000", "--log-every", "1", "--workers", "2", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and "train_step" in (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("Error: loader worker "), lines[-1]


def test_bad_eval_and_predict_numbers_are_usage_errors(tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"")
    for args, option in ((["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
                         (["predict", "--checkpoint", "x", str(picture), "--top", "-1"], "--top")):
        result = invoke(*args)
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output


def test_values_that_cannot_work_are_one_line_and_write_nothing(demo_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train = ["--shards", str(demo_shards), "--out", str(run), "--device", "cpu"]
    for arch in ("alexnet", "alexnet-tv", "alexnet-bn"):  # 63 px: conv1 (11/4, pad 2) makes 15, the 3/2 max-pools 7, 3, 1
        for crop in (1, 16, 62):
            assert error_line(invoke(*train, "--arch", arch, "--crop-size", str(crop))) == (
                f"crop_size must be at least 63 for --arch {arch} (a kernel of its layers is larger than a smaller input), not {crop}")
    assert error_line(invoke(*train, "--seed", "99999999999999999999999")) == (
        "seed must be in 0..2**64-1 (torch's seed range), not 99999999999999999999999")
    assert error_line(invoke(*train, "--seed", "-1")) == "seed must be in 0..2**64-1 (torch's seed range), not -1"
    for option in ("lr", "weight-decay"):
        assert error_line(invoke(*train, f"--{option}", "1e300")) == (
            f"{option.replace('-', '_')} must be at most 3.403e+38 (the largest float32, the weights' type), not 1e+300")
    assert error_line(invoke(*train, "--lr", "3e38", "--lr-scaling", "linear", "--batch-size", "256", "--workers", "0")) == (
        "lr 3e+38 x 2 (--lr-scaling linear) is beyond 3.403e+38, the largest float32 (the weights' type)")
    # 16 workers x 4 slots x 100,000 images x 196,608 bytes = 1,258 GB: more than any machine here has
    line = error_line(invoke(*train, "--batch-size", "100000", "--workers", "16", "--steps-per-epoch", "10"))
    assert re.fullmatch(r"batch_size 100000: the loader's batches take 1258\.3 GB \(16 workers x 4 batches of 100000 x 196,608 bytes\), "
                        r"more than the \d+\.\d GB of memory available here", line), line
    assert error_line(invoke("--shards", str(demo_shards), "--out", "")) == "out must name a run folder, not an empty string"
    assert list(tmp_path.iterdir()) == []


def stamps(folder: Path) -> dict:
    """Each file's (inode, size, mtime): a file replaced (through a temporary name) or appended to shows."""
    return {p.name: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.slow
def test_resuming_a_copied_run_folder_goes_on_in_the_copy(demo_shards, tmp_path):
    """`cp -r A B; alextrain --resume B` trains B (the checkpoint's own config still names A); an --out
    that names another folder than the one resumed is refused, naming both."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert invoke("--shards", str(demo_shards), "--out", str(a), *TINY).exit_code == 0
    shutil.copytree(a, b)
    before = stamps(a)
    assert error_line(invoke("--resume", str(b), "--out", str(a), "--epochs", "2")) == (
        f"--out {a}: --resume {b} continues the run in its own folder, {b}; to branch that run, copy {b} to {a} and resume the copy")
    result = invoke("--resume", str(b), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == f"done: {b} (last.pt, best.pt, metrics.jsonl)"
    assert stamps(a) == before
    state = checkpoint.load(b)
    assert (state["epoch"], state["global_step"], state["config"]["out"]) == (2, 4, str(b))
    assert [r["epoch"] for r in map(json.loads, (b / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((b / "config.json").read_text())["out"] == str(b)


@pytest.mark.slow
def test_one_alextrain_at_a_time_writes_a_run_folder(demo_shards, tmp_path):
    """A second alextrain on a run folder that one is training in stops with one line and touches
    nothing; once the first is killed (its loader worker too may outlive it a moment), the folder is
    free at once."""
    out = tmp_path / "run"
    args = ["--shards", str(demo_shards), "--out", str(out), *TINY]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, "-m", "train.cli", *args, "--steps-per-epoch", "1000", "--log-every", "1",
                                  "--workers", "1"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and "train_step" in (out / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        assert error_line(invoke(*args)) == (f"{out}: another alextrain is writing this run folder (it holds {out / '.lock'}); "
                                             "wait for it to end, or use another --out")
        assert first.poll() is None
        kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert kinds[0] == "start" and set(kinds[1:]) == {"train_step"}
    finally:
        first.kill()
        first.wait()
    result = invoke(*args)  # the killed run had no checkpoint yet: this one starts it over
    assert result.exit_code == 0, result.output
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["start", "train_step", "epoch"]
