"""What a run measures and logs: top-k hits, the sums of a log interval and of an epoch, and
metrics.jsonl, the run's record (written by rank 0, rewound on resume, read by `alextrain report`
and `export`).

metrics.jsonl holds one JSON object per line, each with a "kind":
    start       a run (or a resumed run) began: global_step, world_size, steps_per_epoch, base_lr, resumed_from
    train_step  a log interval ended: epoch, step (1-based), global_step, images, loss, top1_err,
                top5_err, lr, images_per_s, data_wait (the share of the interval spent waiting for data)
    epoch       an epoch ended: train_loss, train_top1_err, train_top5_err, lr, images_per_s, data_wait,
                epoch_time; where evaluated also val_top1_err, val_top5_err, val_loss, eval_time, best_top1_err
Errors are fractions (0..1), times seconds, losses the mean cross-entropy in nats; "time" is the wall clock.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prep.contract import atomic_write
from prep.text import fit
from train import dist
from train.run_folder import LAST, writing


class MetricsError(Exception):
    """A metrics.jsonl line that is not a record, other than a torn last line; the message names it."""


class NonFiniteLoss(Exception):
    """The loss (or the weights) stopped being finite; the message names the step and the last finite loss."""


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """(B, C) scores, (B,) labels -> (len(ks),) float64 counts of samples whose label is among the k
    best scores. With fewer than k classes every sample counts."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (B, k)
    hit = top == labels[:, None]  # (B, k), at most one True per row
    return torch.stack([hit[:, :k].any(dim=1).sum() for k in ks]).double()


@dataclass
class EpochTotals:
    """The epoch's training sums so far, over all ranks; a checkpoint keeps them by name
    (`to_json`), so that the epoch's record is whole after a mid-epoch resume."""

    loss_sum: float = 0.0  # cross-entropy summed over samples
    top1: float = 0.0  # samples whose label was the best score
    top5: float = 0.0  # samples whose label was among the 5 best
    samples: float = 0.0
    seconds: float = 0.0  # in training steps, summed over log intervals
    wait: float = 0.0  # of those, waiting for data

    def add(self, other: EpochTotals) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, float]) -> EpochTotals:
        return cls(**values)

    def record(self, epoch: int, global_step: int, lr: float) -> dict:
        """The epoch's "epoch" record (before its evaluation); `epoch` 0-based."""
        n, s = self.samples, self.seconds
        return {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step, "train_loss": self.loss_sum / n,
                "train_top1_err": 1 - self.top1 / n, "train_top5_err": 1 - self.top5 / n, "lr": lr,
                "images_per_s": n / s, "data_wait": self.wait / s, "epoch_time": s}

    def step_record(self, epoch: int, step: int, global_step: int, lr: float) -> dict:
        """A log interval's "train_step" record, these being its sums; `epoch` and `step` 0-based."""
        n = self.samples
        return {"kind": "train_step", "epoch": epoch + 1, "step": step + 1, "global_step": global_step,
                "images": int(n), "loss": self.loss_sum / n, "top1_err": 1 - self.top1 / n, "top5_err": 1 - self.top5 / n,
                "lr": lr, "images_per_s": n / self.seconds, "data_wait": self.wait / self.seconds}


class Interval:
    """One log interval's training numbers, kept on the device until `close` (no sync per step).
    `last_finite` carries (global step, loss) of the last step with a finite loss from interval to
    interval, for the message of NonFiniteLoss."""

    def __init__(self, device: torch.device, global_step: int, last_finite: tuple[int, float] | None = None):
        self.first_step = global_step + 1  # the global step number of the interval's first step
        self.last_finite = last_finite
        self.losses: list[torch.Tensor] = []  # per step, 0-d on the device: this rank's mean loss
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_sum, self.top1, self.top5 = zero.clone(), zero.clone(), zero.clone()  # summed over samples
        self.samples, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.losses.append(loss)
        self.loss_sum += loss.double() * len(labels)
        top1, top5 = topk_correct(logits, labels)
        self.top1 += top1
        self.top5 += top5
        self.samples += len(labels)

    def close(self, wait: float) -> EpochTotals:
        """The interval's sums over all ranks (one collective, one sync with the device), `wait` being
        the seconds it spent waiting for data. A loss that is not finite on any rank raises
        NonFiniteLoss, naming this rank's first such step."""
        samples = torch.tensor(self.samples, dtype=torch.float64, device=self.loss_sum.device)
        loss_sum, top1, top5, n = dist.sum_all(torch.stack([self.loss_sum, self.top1, self.top5, samples])).tolist()
        for i, value in enumerate(torch.stack(self.losses).tolist()):
            if not math.isfinite(value):
                raise NonFiniteLoss(_non_finite_message(self.first_step + i, value, self.last_finite))
            self.last_finite = (self.first_step + i, value)
        if not math.isfinite(loss_sum):  # another rank's
            raise NonFiniteLoss(_non_finite_message(self.first_step, loss_sum, self.last_finite, other_rank=True))
        return EpochTotals(loss_sum, top1, top5, n, time.perf_counter() - self.started, wait)


def _non_finite_message(step: int, value: float, last: tuple[int, float] | None, other_rank: bool = False) -> str:
    where = f"a rank's loss is {value} in the steps from {step}" if other_rank else f"the loss is {value} at step {step}"
    before = f"the last finite loss was {last[1]:.4g} at step {last[0]}" if last else "no step had a finite loss"
    return f"stopped: {where}; {before}; {LAST} keeps the last checkpoint saved before it (try a lower --lr)"


def summary_line(record: dict) -> str:
    """An "epoch" record in one line, for the terminal."""
    line = (f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, top-1 error {record['train_top1_err']:.1%}; "
            f"{record['images_per_s']:.0f} images/s, data wait {record['data_wait']:.0%}")
    if "val_top1_err" in record:
        line += f"; validation top-1 / top-5 error {record['val_top1_err']:.1%} / {record['val_top5_err']:.1%}"
    return line


def read_metrics(path: Path, needs: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """The records of a metrics.jsonl, in order. A killed run may leave its last line torn (no newline
    at the end, any bytes before it): that line is left out unless it is a whole record. Every other
    line that is not blank must be a record (a JSON object with a "kind"), and a record of a kind in
    `needs` must hold a number in each field listed there (the fields its reader uses), else
    MetricsError names the line. Resume (`MetricsLog.rewind`), `alextrain report` and `export` read
    the file through this."""
    *lines, rest = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines + [rest], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
        except (ValueError, TypeError, KeyError):  # UnicodeDecodeError is a ValueError
            if number > len(lines):
                break
            raise MetricsError(f"{path}: line {number} is not a metrics record: {fit(line.decode(errors='replace'), 60)!r}") from None
        missing = [name for name in (needs or {}).get(kind, ()) if not _is_number(record.get(name))]
        if missing:
            raise MetricsError(f"{path}: line {number}: a {kind} record without a number for {', '.join(missing)}")
        records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with writing(self.path.parent), open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, global_step: int, epochs_done: int) -> None:
        """Forget what a killed run logged after its checkpoint (global_step, epochs_done), so the
        resumed run's records follow on without duplicates; a torn last line goes too (`read_metrics`)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [record for record in read_metrics(self.path, {"train_step": ("global_step",), "epoch": ("epoch",)})
                if not (record["kind"] == "train_step" and record["global_step"] > global_step)
                and not (record["kind"] == "epoch" and record["epoch"] > epochs_done)]
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)
