"""Checkpoints: what a run needs to continue exactly where it stopped, and what eval/predict need.

A checkpoint is a dict of tensors and plain values only (so `torch.load(weights_only=True)` reads it):

    format        1
    model         the unwrapped model's state_dict (no DDP `module.` or torch.compile `_orig_mod.`)
    optimizer     the SGD state_dict (momentum buffers)
    schedule      the learning-rate schedule's state (plain numbers)
    epoch, step   the data position: `epoch` epochs are complete, `step` steps of the next are done
    global_step   optimizer steps since the start
    world_size    ranks that trained; with the config's seed, workers, batch size and shuffle buffer it
                  fixes every epoch's stream (train/stream.py), so resuming skips `step` batches
    best_top1_err best validation top-1 error so far (None before the first evaluation)
    epoch_totals  the epoch's running sums so far (loss, top-1 and top-5 hits, samples, seconds, seconds
                  waiting for data), so the epoch's record is whole after a mid-epoch resume
    config        the TrainConfig as a dict
    classes       [{"index", "wnid", "name"}] from _info.json
    stats         stats.json's content (eval and predict normalise with it, without the shard folder)

No RNG states are stored because none carry over between steps: every random draw (initial weights
aside) comes from generators seeded with (seed, epoch, step, rank) at each step (train/loop.py), so
the data position is also the RNG position, on every rank. bf16 autocast needs no GradScaler, so there
is no scaler state. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from prep.contract import atomic_write
from train.config import TrainConfig
from train.model import build_model

FORMAT = 1
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing or unreadable; the message says which and why."""


def save(state: dict, path: str | Path) -> None:
    """Write `state` to `path` through a temporary file, so a kill never leaves half a checkpoint."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def link(source: str | Path, path: str | Path) -> None:
    """Make `path` a second name of the finished checkpoint `source` (best.pt = this epoch's
    last.pt) without writing it again; a later save to `source` replaces that name only."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.link")
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    os.replace(tmp, path)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save` (tensors and plain values only: weights_only=True)."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors have no common base class
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an alextrain checkpoint of format {FORMAT}")
    return state


def config_for_resume(resume: str | Path, overrides: dict) -> TrainConfig:
    """The configuration of the run in `resume`, with `overrides` (options given on this command
    line) on top; `resume` itself is recorded as the checkpoint file."""
    path = resolve(resume)
    config = TrainConfig.from_dict(load(path)["config"])
    return config.replace(**{**overrides, "resume": str(path)})


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The trained model of a checkpoint, in eval mode on `device`, and the checkpoint itself."""
    state = load(path, map_location=device)
    model = build_model(state["config"]["arch"], num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
