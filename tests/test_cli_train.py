"""`alextrain` on the command line: help, bad input as one clear error line, and both spellings of
the training command."""

import dataclasses
import shutil
import subprocess
import tarfile
import sys

import pytest
import torch
from click.testing import CliRunner

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
    for command in ("eval", "predict", "train"):
        assert invoke(command, "--help").exit_code == 0


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
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert error_line(invoke("--shards", str(demo_shards), "--out", str(run))) == (
        f"{run} already holds a run (metrics.jsonl); continue it with --resume {run}, or pick another --out")
    assert error_line(invoke("--resume", str(run))) == f"{run / 'last.pt'}: no checkpoint here"


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
