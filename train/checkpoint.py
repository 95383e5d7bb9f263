"""Checkpoints: what a run needs to continue exactly where it stopped, and what eval/predict need.

A checkpoint is a dict of tensors and plain values only (so `torch.load(weights_only=True)` reads it):

    format        2
    model         the unwrapped model's state_dict (no DDP `module.` or torch.compile `_orig_mod.`)
    optimizer     the SGD state_dict (momentum buffers)
    schedule      the learning-rate schedule's state (plain numbers)
    epoch, step   the data position: `epoch` epochs are complete, `step` steps of the next are done
    global_step   optimizer steps since the start
    world_size    ranks that trained; with the config's seed, workers, batch size and shuffle buffer it
                  fixes every epoch's stream (train/stream.py), so resuming skips `step` batches
    best_top1_err best validation top-1 error so far (None before the first evaluation)
    best_epoch    the epoch (1-based) whose end-of-epoch weights scored best_top1_err, so best.pt holds
                  the checkpoint saved after it; absent in checkpoints written before it was recorded
    epoch_totals  the epoch's running sums so far, by name (train/metrics.py EpochTotals: loss_sum, top1,
                  top5, samples, seconds, wait), so the epoch's record is whole after a mid-epoch resume
    config        the TrainConfig as a dict
    classes       [{"index", "wnid", "name"}] from _info.json
    stats         stats.json's content (eval and predict scale inputs with it, without the shard folder)
    inputs        how pixels became the model's inputs (train/augment.py: INPUT_SCALINGS)

No RNG states are stored because none carry over between steps: every random draw (initial weights
aside) comes from generators seeded with (seed, epoch, step, rank) at each step (train/loop.py), so
the data position is also the RNG position, on every rank. bf16 autocast needs no GradScaler, so there
is no scaler state. Files are written to a temporary name and renamed.

A checkpoint belongs to the run folder it lies in: `--resume` continues the run there, whatever
folder the checkpoint's own config names (a copied folder is a run of its own).

Format 1 (alextrain before format 2) is converted when loaded, so its runs resume, evaluate, predict
and export as before: its `epoch_totals` was a list in the order above, and it may lack `best_epoch`
(None: unknown) and `inputs` (its models were trained with "standardize").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from prep.contract import atomic_write
from prep.text import first_line
from train.config import ConfigError, TrainConfig
from train.model import build_model
from train.run_folder import BEST, LAST, METRICS, remove_stale_temps

FORMAT = 2
_FORMAT_1_TOTALS = ("loss_sum", "top1", "top5", "samples", "seconds", "wait")  # format 1's epoch_totals list, in order


class CheckpointError(Exception):
    """A checkpoint that is missing or unreadable; the message says which and why."""


def save(state: dict, path: str | Path) -> None:
    """Write `state` to `path` through a temporary file, so a kill never leaves half a checkpoint.
    First removes what a save killed earlier left behind: our own temporary names for `path`."""
    remove_stale_temps(Path(path).parent)
    with atomic_write(path, "wb") as f:
        writer = _Writes(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:  # torch's zip writer turns a failed write (a full disk) into a vague RuntimeError
                raise writer.error from None
            raise


class _Writes:
    """A file's write() that remembers the OSError it raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def link(source: str | Path, path: str | Path) -> None:
    """Make `path` a second name of the finished checkpoint `source` (best.pt = this epoch's
    last.pt) without writing it again; a later save to `source` replaces that name only. On a file
    system without hard links (FAT, some network and FUSE mounts), a copy through a temporary name."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # EPERM, EOPNOTSUPP, ENOSYS...: no hard links here
        with open(source, "rb") as f, atomic_write(path, "wb") as copy:
            shutil.copyfileobj(f, copy, 1 << 24)
        return
    os.replace(tmp, path)


def make_best(path: str | Path) -> bool:
    """Make best.pt, beside the checkpoint `path`, that checkpoint (`link`) unless it already is. For
    a `path` that holds the run's best epoch: a run killed between saving last.pt and linking best.pt
    left best.pt missing or an older epoch's. Returns whether best.pt had to be made."""
    path = Path(path)
    best = path.with_name(BEST)
    if best.exists() and os.path.samefile(path, best):
        return False
    link(path, best)
    return True


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's last.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / LAST).exists() and (path / METRICS).exists():
            raise CheckpointError(f"{path}: the run stopped before its first checkpoint; start it again without --resume")
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save` (tensors and plain values only: weights_only=True), in
    format 2 (format 1 converted, module docstring)."""
    path = resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors have no common base class
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(e)})") from None
    if isinstance(state, dict) and state.get("format") == 1:
        state = _from_format_1(state)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an alextrain checkpoint of format 1 or {FORMAT}")
    return state


def _from_format_1(state: dict) -> dict:
    """A format-1 checkpoint in format 2: the epoch's sums by name, and the records format 1 could lack."""
    totals = state.get("epoch_totals")
    if isinstance(totals, list) and len(totals) == len(_FORMAT_1_TOTALS):
        totals = dict(zip(_FORMAT_1_TOTALS, totals))
    return {"best_epoch": None, "inputs": "standardize", **state, "format": FORMAT, "epoch_totals": totals}


def trusted_shards(path: str | Path, shards: str | None) -> str | None:
    """The shard location a checkpoint names, unless it is a `pipe:` command: a checkpoint is data
    (possibly a stranger's), so nothing in it may become a shell command; only a `--shards` typed on
    the command line may be one."""
    if shards is not None and shards.startswith("pipe:"):
        raise CheckpointError(f"{path}: its shards are a shell command ({shards!r}); "
                              "not run from a checkpoint: give --shards on the command line")
    return shards


def config_for_resume(resume: str | Path, overrides: dict) -> TrainConfig:
    """The configuration of the run in `resume`, with `overrides` (options given on this command
    line) on top; `resume` itself is recorded as the checkpoint file, and `out` is the folder the
    checkpoint lies in (an `out` override naming another folder is refused). A `pipe:` shard
    location from the checkpoint is refused unless `overrides` gives the shards."""
    path = resolve(resume)
    folder = path.parent
    if "out" in overrides and Path(overrides["out"]).resolve() != folder.resolve():
        raise CheckpointError(f"--out {overrides['out']}: --resume {resume} continues the run in its own folder, {folder}; "
                              f"to branch that run, copy {folder} to {overrides['out']} and resume the copy")
    try:
        config = TrainConfig.from_dict(load(path)["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: its configuration is not one this alextrain reads ({e})") from None
    if "shards" not in overrides:
        trusted_shards(path, config.shards)
    return config.replace(**{**overrides, "out": str(folder), "resume": str(path)})


def load_weights(model: nn.Module, weights: dict, path: str | Path, arch: str) -> None:
    """Load a checkpoint's state_dict into `model` (an `arch`); one line instead of a key dump when
    they do not fit (a checkpoint of another --arch or class count)."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(f"{path}: its weights do not fit --arch {arch} (a checkpoint of another architecture "
                              "or class count)") from None


def load_model(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The trained model of a checkpoint, in eval mode on `device`, and the checkpoint itself."""
    path = resolve(path)
    state = load(path, map_location=device)
    return model_from(state, path, device), state


def model_from(state: dict, path: str | Path, device: torch.device) -> nn.Module:
    """The trained model of the checkpoint `state` (read from `path`), in eval mode on `device`."""
    arch = state["config"]["arch"]
    model = build_model(arch, num_classes=len(state["classes"]))
    load_weights(model, state["model"], path, arch)
    return model.to(device).eval()
