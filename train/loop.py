"""The training run, top to bottom: config -> world -> data -> model -> optimizer and schedule ->
resume -> epochs of steps (augment on the device, forward, backward, SGD) -> evaluation, metrics and
checkpoints.

Reproducibility: every random draw after the initial weights comes from generators seeded at each step
with (seed, epoch, step, rank): the augmentation generator on the device and torch's global generator
(dropout). The data stream is a pure function of (seed, epoch, rank, world size, workers, ...) as well
(train/stream.py). So a run resumed from a checkpoint taken after step s of an epoch repeats exactly
what the uninterrupted run does from step s + 1 on; on the CPU in float32 the losses are equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from prep.contract import ContractError, write_json
from train import checkpoint, dist, run_folder
from train.augment import StatsTensors, train_views
from train.config import FLOAT32_MAX, PAPER_BATCH, ConfigError, TrainConfig
from train.device_decode import DecoderUnavailable, import_nvimgcodec
from train.evaluate import autocast, evaluate
from train.loader import DeviceLoader, check_host_memory
from train.metrics import EpochTotals, Interval, MetricsLog, NonFiniteLoss, summary_line
from train.model import INPUTS, WARMUP_STEPS, build_model
from train.run_folder import BEST, CONFIG, LAST, METRICS, RunFolderError, writing
from train.stream import ShardStream, open_shards, seed_for


class Schedule:
    """The learning rate at every step. "plateau" (the paper's): divide by 10 when the validation
    top-1 error has not improved for `patience` evaluations, at most 3 times. "step": divide by 10
    every `step_epochs` epochs. "cosine": from lr down to 0 over the run. All with a linear warm-up
    from 0 over `warmup_epochs` (by default the arch's recipe: train/model.py WARMUP_STEPS). State
    (for plateau) is plain numbers, saved in checkpoints."""

    MAX_REDUCTIONS = 3

    def __init__(self, config: TrainConfig, base_lr: float, steps_per_epoch: int):
        self.config, self.base_lr, self.steps_per_epoch = config, base_lr, steps_per_epoch
        self.reductions, self.best, self.bad = 0, math.inf, 0

    def lr(self, global_step: int) -> float:
        c, spe = self.config, self.steps_per_epoch
        warmup = WARMUP_STEPS.get(c.arch, 0) if c.warmup_epochs is None else c.warmup_epochs * spe  # in steps
        factor = min(1.0, (global_step + 1) / warmup) if warmup else 1.0
        if c.schedule == "plateau":
            return self.base_lr * 0.1**self.reductions * factor
        if c.schedule == "step":
            return self.base_lr * 0.1 ** (global_step // spe // c.step_epochs) * factor
        progress = max(0.0, global_step - warmup) / max(1.0, c.epochs * spe - warmup)  # cosine
        return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * factor

    def evaluated(self, top1_err: float) -> None:
        """Tell the plateau schedule the latest validation top-1 error."""
        if top1_err < self.best:
            self.best, self.bad = top1_err, 0
        else:
            self.bad += 1
        if self.config.schedule == "plateau" and self.bad >= self.config.patience and self.reductions < self.MAX_REDUCTIONS:
            self.reductions, self.bad = self.reductions + 1, 0

    def state_dict(self) -> dict:
        return {"reductions": self.reductions, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.reductions, self.best, self.bad = state["reductions"], state["best"], state["bad"]


def train(config: TrainConfig) -> dict:
    """Train (or resume, when config.resume is set) as configured; returns the last epoch record."""
    device = dist.resolve_device(config.device)
    world = dist.init(device.type)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, until the run ends
            return _train(config, world, device, held)
    finally:
        dist.teardown()


def _train(config: TrainConfig, world: dist.World, device: torch.device, held: contextlib.ExitStack) -> dict:
    config, device = _resolve(config, world, device)
    out = Path(config.out)
    metrics = MetricsLog(out / METRICS, world.is_main)

    # ---- data: the shard folder's splits, classes and pixel statistics
    shards = open_shards(config.shards)
    train_split, val_split = shards.split("train"), shards.split("validation")
    classes = [c.to_json() for c in shards.classes]
    stats = StatsTensors.of(shards.stats, device)
    global_batch = config.batch_size * world.world_size
    steps_per_epoch = config.steps_per_epoch or train_split.num_samples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{train_split.num_samples} training samples make no step of {global_batch} (batch size x ranks)")
    check_host_memory(config.batch_size, config.workers)

    # ---- model, optimizer and schedule: the same initial weights on every rank; the paper's SGD
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes=len(classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what checkpoints hold, without DDP or compile wrappers
    base_lr = config.lr * (global_batch / PAPER_BATCH if config.lr_scaling == "linear" else 1.0)
    if base_lr > FLOAT32_MAX:
        raise ConfigError(f"lr {config.lr:g} x {global_batch / PAPER_BATCH:g} (--lr-scaling linear) is beyond {FLOAT32_MAX:.4g}, "
                          "the largest float32 (the weights' type)")
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = Schedule(config, base_lr, steps_per_epoch)

    # ---- the run folder: rank 0 locks it for the whole run (every rank stops if it cannot)
    lock = dist.on_main(world, device, lambda: _claim_run_folder(out, config, metrics))
    if lock is not None:
        held.callback(os.close, lock)

    # ---- where the run stands: a fresh start, or a checkpoint's weights, optimizer, schedule, data position
    at = Position(scaling=INPUTS[config.arch])
    if config.resume:
        at = _resume(config, world, device, classes, raw_model, optimizer, schedule, steps_per_epoch)

    def start() -> None:
        with writing(out):
            # A run killed between saving last.pt and linking best.pt left best.pt behind it.
            if config.resume and at.step == 0 and at.best_epoch == at.epoch and checkpoint.make_best(config.resume):
                tqdm.write(f"{out / BEST}: made the checkpoint of epoch {at.epoch} again (its best; a run stopped "
                           "before linking it)")
            write_json(out / CONFIG, config.to_dict())
            metrics.rewind(at.global_step, at.epoch)
            metrics.write({"kind": "start", "time": time.time(), "global_step": at.global_step, "world_size": world.world_size,
                           "steps_per_epoch": steps_per_epoch, "base_lr": base_lr, "resumed_from": config.resume})

    dist.on_main(world, device, start)

    if config.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation bypasses DDP: ranks see different numbers of validation batches
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)

    def save(epoch: int, step: int) -> None:
        """last.pt, for continuing after step `step` of epoch `epoch` (0-based); rank 0 only."""
        if not world.is_main:
            return
        if not all(p.isfinite().all() for p in raw_model.parameters()):  # one pass over the weights, beside a 450 MB write
            raise NonFiniteLoss(f"the weights are not finite after step {at.global_step}; {out / LAST} keeps the last good ones")
        with writing(out):
            checkpoint.save({
                "format": checkpoint.FORMAT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch, "step": step, "global_step": at.global_step,
                "world_size": world.world_size, "best_top1_err": at.best, "best_epoch": at.best_epoch,
                "epoch_totals": at.totals.to_json(), "config": config.to_dict(), "classes": classes,
                "stats": shards.stats.to_json(), "inputs": at.scaling,
            }, out / LAST)

    # ---- the epochs
    aug_gen = torch.Generator(device)
    record, lr = {}, schedule.lr(at.global_step)
    if at.epoch >= config.epochs and world.is_main:
        tqdm.write(f"{config.resume}: all {config.epochs} epochs are done; pass a larger --epochs to train on")
    for epoch in range(at.epoch, config.epochs):
        model.train()
        stream = ShardStream(train_split, config.batch_size, train=True, seed=config.seed, epoch=epoch, steps=steps_per_epoch,
                             start=at.step, rank=world.rank, world_size=world.world_size,
                             shuffle_buffer=config.shuffle_buffer)
        loader = DeviceLoader(stream, device, workers=config.workers, decode=config.decode, gpu_decoder=config.gpu_decoder)
        interval = Interval(device, at.global_step, at.last_finite)
        with tqdm(total=steps_per_epoch, initial=at.step, desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not world.is_main, dynamic_ncols=True) as bar:
            for step, (images, labels) in enumerate(loader, start=at.step):
                lr = schedule.lr(at.global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Every random draw of this step is a function of (seed, epoch, step, rank): resumable.
                seeds = (seed_for(config.seed, epoch, step, world.rank, 0), seed_for(config.seed, epoch, step, world.rank, 1))
                loss, logits = train_step(model, optimizer, images, labels, stats, scaling=at.scaling, crop_size=config.crop_size,
                                          lighting_std=config.lighting_std, generator=aug_gen, seeds=seeds)
                at.global_step += 1
                bar.update()
                interval.add(loss, logits, labels)

                save_now = config.save_every and at.global_step % config.save_every == 0 and step + 1 < steps_per_epoch
                if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch or save_now:
                    sums = interval.close(loader.reset_wait())  # syncs with the device and all ranks; raises NonFiniteLoss
                    at.totals.add(sums)
                    at.last_finite = interval.last_finite
                    _log_interval(metrics, bar, sums.step_record(epoch, step, at.global_step, lr))
                    interval = Interval(device, at.global_step, at.last_finite)
                    if save_now:
                        save(epoch, step + 1)

        # ---- end of epoch: evaluate, adapt the schedule, log, save
        record = at.totals.record(epoch, at.global_step, lr)
        is_best = False
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            eval_start = time.perf_counter()
            val = evaluate(eval_model, val_split, stats, device, scaling=at.scaling, batch_size=config.batch_size,
                           crop_size=config.crop_size, workers=config.workers, decode=config.decode, gpu_decoder=config.gpu_decoder,
                           rank=world.rank, world_size=world.world_size)
            schedule.evaluated(val["top1_err"])
            is_best = at.best is None or val["top1_err"] < at.best
            if is_best:
                at.best, at.best_epoch = val["top1_err"], epoch + 1
            record.update(val_top1_err=val["top1_err"], val_top5_err=val["top5_err"], val_loss=val["loss"],
                          eval_time=time.perf_counter() - eval_start, best_top1_err=at.best)
        record["time"] = time.time()  # wall clock, as in the "start" records
        metrics.write(record)
        if world.is_main:
            tqdm.write(summary_line(record))
        at.step, at.totals = 0, EpochTotals()
        save(epoch + 1, 0)
        if is_best and world.is_main:
            with writing(out):
                checkpoint.link(out / LAST, out / BEST)
    return record


@dataclass
class Position:
    """Where a run stands: `epoch` epochs done, `step` steps of the next, `global_step` in all; the
    best validation top-1 error so far and the epoch that scored it, the epoch's sums so far, and the
    model's input scaling."""

    scaling: str
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    best: float | None = None
    best_epoch: int | None = None  # 1-based; None also in format-1 checkpoints that did not record it
    totals: EpochTotals = dataclasses.field(default_factory=EpochTotals)
    last_finite: tuple[int, float] | None = None  # (global step, loss) of the last step with a finite loss


def _log_interval(metrics: MetricsLog, bar: tqdm, record: dict) -> None:
    """The interval's train_step record in metrics.jsonl and on the progress bar."""
    metrics.write(record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.0f}",
                    wait=f"{record['data_wait']:.0%}")


def _resolve(config: TrainConfig, world: dist.World, device: torch.device) -> tuple[TrainConfig, torch.device]:
    """This rank's device, the decode options checked against it, and the worker count filled in."""
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.backends.cudnn.benchmark = True
    if config.decode != "cpu" and device.type != "cuda":
        raise ConfigError(f"--decode {config.decode} needs a CUDA device")
    if config.decode != "cpu" and config.gpu_decoder == "nvimgcodec":
        try:
            import_nvimgcodec()
        except DecoderUnavailable as e:
            raise ConfigError(str(e)) from None
    workers = config.workers if config.workers is not None else dist.default_workers()
    return config.replace(device=device.type, workers=workers), device


def _claim_run_folder(out: Path, config: TrainConfig, metrics: MetricsLog) -> int:
    """Lock the run folder (`run_folder.lock`; returns the lock's descriptor) and make it ready: a new
    run is refused where a run has a checkpoint, what a killed save left goes (our own temporary
    checkpoint names), and a new run in a folder with metrics but no checkpoint replaces a run killed
    before its first save (there was nothing to continue)."""
    lock = run_folder.lock(out)
    try:
        if (out / LAST).exists() and not config.resume:
            raise RunFolderError(f"{out} already holds a run ({LAST}); continue it with --resume {out}, or pick another --out")
        with writing(out):
            run_folder.remove_stale_temps(out)
            if not config.resume and metrics.path.exists():
                tqdm.write(f"{out}: its run stopped before its first checkpoint; starting it over")
                metrics.path.unlink()
    except BaseException:
        os.close(lock)
        raise
    return lock


def _resume(config: TrainConfig, world: dist.World, device: torch.device, classes: list[dict], model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, schedule: Schedule, steps_per_epoch: int) -> Position:
    """Load the checkpoint config.resume into the model, optimizer and schedule; return its position."""
    state = checkpoint.load(config.resume, map_location=device)
    if state["classes"] != classes:
        raise ContractError(f"{config.shards}: its classes differ from those of {config.resume}")
    checkpoint.load_weights(model, state["model"], config.resume, config.arch)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if world.is_main and (state["world_size"], state["config"]["workers"]) != (world.world_size, config.workers):
        tqdm.write(f"warning: resuming with {world.world_size} ranks x {config.workers} workers, the checkpoint had "
                   f"{state['world_size']} x {state['config']['workers']}: the rest of this epoch's data order differs")
    return Position(scaling=state["inputs"], epoch=state["epoch"],
                    step=min(state["step"], steps_per_epoch),  # in case --steps-per-epoch changed
                    global_step=state["global_step"], best=state["best_top1_err"], best_epoch=state["best_epoch"],
                    totals=EpochTotals.from_json(state["epoch_totals"]))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               stats: StatsTensors, *, scaling: str, crop_size: int, lighting_std: float, generator: torch.Generator,
               seeds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on uint8 (B, 3, 256, 256) images and int64 (B,) labels, both on the device:
    augment (seeded by seeds[0]) into the model's input `scaling`, forward (dropout seeded by
    seeds[1]), backward, update. Returns the detached loss and (B, C) logits without syncing with
    the device."""
    generator.manual_seed(seeds[0])
    torch.manual_seed(seeds[1])
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    x = train_views(images, stats, crop_size, scaling=scaling, generator=generator, lighting_std=lighting_std)  # (B, 3, S, S)
    with autocast(images.device):
        logits = model(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()
