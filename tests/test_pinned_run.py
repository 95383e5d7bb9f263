"""Pinned training run (issue 17 item 6): what a short `alextrain` run on the CPU gives, exactly.

From main at 1362294 (2026-12-05), before train/ was reorganised: the run's config.json (its two paths
aside), its metrics.jsonl records less the wall-clock fields (test_checkpoint.without_timing: the only
ones that differed between two runs), and a sha256 of its final weights (the state_dict's tensors by
name, not the checkpoint file, whose layout may change); and the same from that run killed mid-epoch and
resumed. A change that alters these on purpose updates them here and says why in its commit.

The CPU is taken out of the arithmetic (ALEXTRAIN_ENV, RUN), so the pins hold on any x86-64 machine:
torch's own kernels at ATEN_CPU_CAPABILITY=default (the same code on every x86-64 CPU; avx2 and avx512
each gave other weights), MKL's sgemm on its CPU-independent path (MKL_CBWR=COMPATIBLE; its default path
gave other weights), oneDNN and NNPACK off (they choose kernels by ISA: ONEDNN_MAX_CPU_ISA=AVX2 and
SSE41 each gave other weights, and so did NNPACK on), one thread (2 and 3 each gave other weights).
With these the weights stayed the same (this AMD EPYC with AVX-512, 2026-12-06) under OMP_NUM_THREADS=2,
MKL_ENABLE_INSTRUCTIONS=AVX2 or SSE4_2, ONEDNN_MAX_CPU_ISA=AVX2, glibc told to hide AVX-512 or AVX2 and
FMA (GLIBC_TUNABLES), libjpeg-turbo's SIMD off (JSIMD_FORCENONE=1, JSIMD_FORCESSE2=1: TorchCodec's
decode is bit-exact without it) and a stats.json from OpenBLAS's AVX-512 eigen kernels (different last
bits, the same float32 values in PixelStats). What is left is software: the torch build (the tests skip
under another) and the shard bytes (tests/test_pinned_shards.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import wait_for_step, without_timing
from test_pinned_shards import pinned_pillow

from train import checkpoint

PINNED_TORCH = "torch 2.14.1+cu130 on x86_64"
TORCH = f"torch {torch.__version__} on {platform.machine()}"
pytestmark = [pinned_pillow, pytest.mark.slow, pytest.mark.skipif(TORCH != PINNED_TORCH, reason=(
    f"run pinned under {PINNED_TORCH}, whose CPU kernels this is not ({TORCH})"))]

# The run's arithmetic, the same on any x86-64 CPU (module docstring): set before torch starts.
ALEXTRAIN_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                 "MKL_NUM_THREADS": "1"}
RUN = """import sys, torch
torch.backends.mkldnn.enabled = False
torch.backends.nnpack.set_flags(False)
torch.set_num_threads(1)
from train.cli import main
main(sys.argv[1:], prog_name="alextrain")
"""
# scripts/demo.sh's CPU run, made short: 2 epochs of 4 steps of 16 images on the demo shards; last.pt
# after global steps 2 and 6 (mid-epoch) and 4 and 8 (epoch ends).
ARGS = ["--arch", "alexnet-bn", "--crop-size", "64", "--batch-size", "16", "--lr", "0.005", "--epochs", "2",
        "--steps-per-epoch", "4", "--save-every", "2", "--log-every", "1", "--workers", "1", "--shuffle-buffer", "32",
        "--device", "cpu"]

PINNED_CONFIG = {
    "arch": "alexnet-bn", "batch_size": 16, "compile": False, "crop_size": 64, "decode": "cpu", "device": "cpu",
    "epochs": 2, "eval_every": 1, "gpu_decoder": "torchvision", "lighting_std": 0.1, "log_every": 1, "lr": 0.005,
    "lr_scaling": "none", "momentum": 0.9, "out": "OUT", "patience": 5, "resume": None, "save_every": 2,
    "schedule": "plateau", "seed": 0, "shards": "SHARDS", "shuffle_buffer": 32, "step_epochs": 30,
    "steps_per_epoch": 4, "warmup_epochs": None, "weight_decay": 0.0005, "workers": 1,
}
PINNED_METRICS = [
    {"kind": "start", "global_step": 0, "world_size": 1, "steps_per_epoch": 4, "base_lr": 0.005, "resumed_from": None},
    {"kind": "train_step", "epoch": 1, "step": 1, "global_step": 1, "images": 16, "loss": 2.508594274520874, "top1_err": 1.0, "top5_err": 0.5, "lr": 0.005},
    {"kind": "train_step", "epoch": 1, "step": 2, "global_step": 2, "images": 16, "loss": 2.865636110305786, "top1_err": 0.75, "top5_err": 0.625, "lr": 0.005},
    {"kind": "train_step", "epoch": 1, "step": 3, "global_step": 3, "images": 16, "loss": 2.6798694133758545, "top1_err": 0.9375, "top5_err": 0.375, "lr": 0.005},
    {"kind": "train_step", "epoch": 1, "step": 4, "global_step": 4, "images": 16, "loss": 2.9445252418518066, "top1_err": 0.9375, "top5_err": 0.5, "lr": 0.005},
    {"kind": "epoch", "epoch": 1, "global_step": 4, "train_loss": 2.7496562600135803, "train_top1_err": 0.90625, "train_top5_err": 0.5, "lr": 0.005, "val_top1_err": 0.9, "val_top5_err": 0.4, "val_loss": 2.293664617538452, "best_top1_err": 0.9},
    {"kind": "train_step", "epoch": 2, "step": 1, "global_step": 5, "images": 16, "loss": 2.999518394470215, "top1_err": 1.0, "top5_err": 0.3125, "lr": 0.005},
    {"kind": "train_step", "epoch": 2, "step": 2, "global_step": 6, "images": 16, "loss": 3.5198545455932617, "top1_err": 0.9375, "top5_err": 0.4375, "lr": 0.005},
    {"kind": "train_step", "epoch": 2, "step": 3, "global_step": 7, "images": 16, "loss": 3.4074249267578125, "top1_err": 0.875, "top5_err": 0.5625, "lr": 0.005},
    {"kind": "train_step", "epoch": 2, "step": 4, "global_step": 8, "images": 16, "loss": 3.340343475341797, "top1_err": 0.9375, "top5_err": 0.5, "lr": 0.005},
    {"kind": "epoch", "epoch": 2, "global_step": 8, "train_loss": 3.3167853355407715, "train_top1_err": 0.9375, "train_top5_err": 0.453125, "lr": 0.005, "val_top1_err": 0.9, "val_top5_err": 0.45999999999999996, "val_loss": 2.213440651893616, "best_top1_err": 0.9},
]
PINNED_WEIGHTS = "db839006c6c5f485f1b53a2782b0da87026fe785f9710970ffcbc5f549ed7575"


def alextrain(args: list[str], log: Path) -> subprocess.Popen:
    """Start `alextrain ARGS` in the pinned arithmetic (module docstring), its output into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-c", RUN, *args], env={**os.environ, **ALEXTRAIN_ENV},
                                stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=600)
    finally:
        proc.kill()  # a no-op once it has ended
    assert proc.returncode == 0, log.read_text()[-2000:]


def metrics(run: Path) -> list[dict]:
    return [without_timing(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights_digest(run: Path) -> str:
    """sha256 over the run's last model weights: each state_dict tensor's name, dtype, shape and bytes, by name."""
    weights = checkpoint.load(run)["model"]
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def test_short_run_is_pinned(demo_shards, tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    finish(alextrain(["--shards", str(demo_shards), "--out", str(run), *ARGS], log), log)

    config = json.loads((run / "config.json").read_text())
    assert (config["shards"], config["out"]) == (str(demo_shards), str(run))
    assert {**config, "shards": "SHARDS", "out": "OUT"} == PINNED_CONFIG
    assert metrics(run) == PINNED_METRICS
    assert weights_digest(run) == PINNED_WEIGHTS


def test_killed_mid_epoch_and_resumed_run_is_pinned(demo_shards, tmp_path):
    run, log = tmp_path / "run", tmp_path / "killed.log"
    proc = alextrain(["--shards", str(demo_shards), "--out", str(run), *ARGS], log)
    try:
        wait_for_step(run, 3, proc, log)  # step 3 logged: the step-2 checkpoint is on disk
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = checkpoint.load(run)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 2, 2)  # mid-epoch

    finish(alextrain(["--resume", str(run)], tmp_path / "resumed.log"), tmp_path / "resumed.log")
    resumed = metrics(run)
    assert [r for r in resumed if r["kind"] != "start"] == [r for r in PINNED_METRICS if r["kind"] != "start"]
    assert [(r["global_step"], r["resumed_from"]) for r in resumed if r["kind"] == "start"] == [
        (0, None), (2, str(run / checkpoint.LAST))]
    assert weights_digest(run) == PINNED_WEIGHTS
