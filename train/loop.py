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

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from prep.contract import ContractError, atomic_write, write_json
from train import checkpoint, dist
from train.augment import PixelStats, train_views
from train.config import PAPER_BATCH, ConfigError, TrainConfig
from train.device_decode import DecoderUnavailable, import_nvimgcodec
from train.evaluate import autocast, evaluate, topk_correct
from train.loader import DeviceLoader, make_loader
from train.model import build_model
from train.stream import ShardStream, open_shards, seed_for

METRICS, CONFIG = "metrics.jsonl", "config.json"


class RunFolderError(Exception):
    """The run folder holds another run; the message says how to continue it instead."""


class Schedule:
    """The learning rate at every step. "plateau" (the paper's): divide by 10 when the validation
    top-1 error has not improved for `patience` evaluations, at most 3 times. "step": divide by 10
    every `step_epochs` epochs. "cosine": from lr down to 0 over the run. All with an optional linear
    warm-up from 0 over `warmup_epochs`. State (for plateau) is plain numbers, saved in checkpoints."""

    MAX_REDUCTIONS = 3

    def __init__(self, config: TrainConfig, base_lr: float, steps_per_epoch: int):
        self.config, self.base_lr, self.steps_per_epoch = config, base_lr, steps_per_epoch
        self.reductions, self.best, self.bad = 0, math.inf, 0

    def lr(self, global_step: int) -> float:
        c, spe = self.config, self.steps_per_epoch
        warmup = c.warmup_epochs * spe  # in steps
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


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, global_step: int, epochs_done: int) -> None:
        """Forget what a killed run logged after its checkpoint (global_step, epochs_done), so the
        resumed run's records follow on without duplicates; a torn last line goes too."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["kind"] == "train_step" and record["global_step"] > global_step:
                continue
            if record["kind"] == "epoch" and record["epoch"] > epochs_done:
                continue
            kept.append(line + "\n")
        with atomic_write(self.path, "w") as f:
            f.writelines(kept)


def train(config: TrainConfig) -> dict:
    """Train (or resume, when config.resume is set) as configured; returns the last epoch record."""
    # ---- world and device
    device = dist.resolve_device(config.device)
    world = dist.init(device.type)
    try:
        return _train(config, world, device)
    finally:
        dist.teardown()


def _train(config: TrainConfig, world: dist.World, device: torch.device) -> dict:
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
    config = config.replace(device=device.type, workers=workers)

    # ---- run folder: rank 0 writes, the others only compute
    out = Path(config.out)
    existing = [name for name in (checkpoint.LAST, METRICS) if (out / name).exists()]
    if existing and not config.resume:
        raise RunFolderError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume {out}, or pick another --out")
    metrics = MetricsLog(out / METRICS, world.is_main)

    # ---- data: the shard folder's splits, classes and pixel statistics
    shards = open_shards(config.shards)
    train_split, val_split = shards.split("train"), shards.split("validation")
    classes = [c.to_json() for c in shards.classes]
    stats = PixelStats.from_json(shards.stats, device)
    global_batch = config.batch_size * world.world_size
    steps_per_epoch = config.steps_per_epoch or train_split.num_samples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{train_split.num_samples} training samples make no step of {global_batch} (batch size x ranks)")

    # ---- model: the same initial weights on every rank
    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes=len(classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw_model = model  # what checkpoints hold, without DDP or compile wrappers

    # ---- optimizer and schedule: the paper's SGD, weight decay on every parameter
    base_lr = config.lr * (global_batch / PAPER_BATCH if config.lr_scaling == "linear" else 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = Schedule(config, base_lr, steps_per_epoch)

    # ---- resume: weights, optimizer, schedule and the position in the data
    start_epoch, start_step, global_step, best = 0, 0, 0, None
    totals = torch.zeros(6, dtype=torch.float64)  # this epoch so far: see `epoch_record`
    if config.resume:
        state = checkpoint.load(config.resume, map_location=device)
        if state["classes"] != classes:
            raise ContractError(f"{config.shards}: its classes differ from those of {config.resume}")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        best, totals = state["best_top1_err"], torch.tensor(state["epoch_totals"], dtype=torch.float64)
        start_step = min(start_step, steps_per_epoch)  # in case --steps-per-epoch changed
        if world.is_main and (state["world_size"], state["config"]["workers"]) != (world.world_size, config.workers):
            tqdm.write(f"warning: resuming with {world.world_size} ranks x {config.workers} workers, the checkpoint had "
                       f"{state['world_size']} x {state['config']['workers']}: the rest of this epoch's data order differs")

    if config.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation bypasses DDP: ranks see different numbers of validation batches
    if world.distributed:
        model = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)

    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, config.to_dict())
        metrics.rewind(global_step, start_epoch)
        metrics.write({"kind": "start", "time": time.time(), "global_step": global_step, "world_size": world.world_size,
                       "steps_per_epoch": steps_per_epoch, "base_lr": base_lr, "resumed_from": config.resume})

    def save(name: str, epoch: int, step: int) -> None:
        if world.is_main:
            checkpoint.save({
                "format": checkpoint.FORMAT, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch, "step": step, "global_step": global_step,
                "world_size": world.world_size, "best_top1_err": best, "epoch_totals": totals.tolist(),
                "config": config.to_dict(), "classes": classes, "stats": shards.stats,
            }, out / name)

    aug_gen = torch.Generator(device)
    record, lr = {}, schedule.lr(global_step)
    if start_epoch >= config.epochs and world.is_main:
        tqdm.write(f"{config.resume}: all {config.epochs} epochs are done; pass a larger --epochs to train on")
    for epoch in range(start_epoch, config.epochs):
        # ---- one epoch of training steps
        model.train()
        stream = ShardStream(train_split, config.batch_size, train=True, seed=config.seed, epoch=epoch, steps=steps_per_epoch,
                             start=start_step, rank=world.rank, world_size=world.world_size,
                             shuffle_buffer=config.shuffle_buffer, decode=config.decode)
        loader = DeviceLoader(make_loader(stream, config.workers, device), device, config.gpu_decoder)
        with tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not world.is_main, dynamic_ncols=True) as bar:
            interval = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits
            interval_start, interval_samples = time.perf_counter(), 0
            for step, (images, labels) in enumerate(loader, start=start_step):
                lr = schedule.lr(global_step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # Every random draw of this step is a function of (seed, epoch, step, rank): resumable.
                seeds = (seed_for(config.seed, epoch, step, world.rank, 0), seed_for(config.seed, epoch, step, world.rank, 1))
                loss, logits = train_step(model, optimizer, images, labels, stats, crop_size=config.crop_size,
                                          lighting_std=config.lighting_std, generator=aug_gen, seeds=seeds)
                global_step += 1
                bar.update()
                interval += torch.cat([loss.double()[None] * len(labels), topk_correct(logits, labels)])
                interval_samples += len(labels)

                save_now = config.save_every and global_step % config.save_every == 0 and step + 1 < steps_per_epoch
                if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch or save_now:
                    # Syncs with the device and all ranks: once per log interval (and at each save, so
                    # that the saved epoch totals are complete).
                    packed = torch.cat([interval, torch.tensor([interval_samples], dtype=torch.float64, device=device)])
                    loss_sum, top1, top5, n = dist.sum_all(packed).tolist()
                    seconds, wait = time.perf_counter() - interval_start, loader.reset_wait()
                    totals += torch.tensor([loss_sum, top1, top5, n, seconds, wait], dtype=torch.float64)
                    metrics.write({"kind": "train_step", "epoch": epoch + 1, "step": step + 1, "global_step": global_step,
                                   "images": int(n), "loss": loss_sum / n, "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n,
                                   "lr": lr, "images_per_s": n / seconds, "data_wait": wait / seconds})
                    bar.set_postfix(loss=f"{loss_sum / n:.3f}", lr=f"{lr:.2e}", img_s=f"{n / seconds:.0f}", wait=f"{wait / seconds:.0%}")
                    interval.zero_()
                    interval_start, interval_samples = time.perf_counter(), 0
                    if save_now:
                        save(checkpoint.LAST, epoch, step + 1)

        # ---- end of epoch: evaluate, adapt the schedule, log, save
        record = epoch_record(epoch, global_step, totals, lr)
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            eval_start = time.perf_counter()
            val = evaluate(eval_model, val_split, stats, device, batch_size=config.batch_size, crop_size=config.crop_size,
                           workers=config.workers, decode=config.decode, gpu_decoder=config.gpu_decoder, rank=world.rank,
                           world_size=world.world_size)
            schedule.evaluated(val["top1_err"])
            record.update(val_top1_err=val["top1_err"], val_top5_err=val["top5_err"], val_loss=val["loss"],
                          eval_time=time.perf_counter() - eval_start)
            is_best = best is None or val["top1_err"] < best
            best = val["top1_err"] if is_best else best
            record["best_top1_err"] = best
        else:
            is_best = False
        record["time"] = time.time()  # wall clock, as in the "start" records
        metrics.write(record)
        if world.is_main:
            tqdm.write(summary_line(record))
        start_step, totals = 0, torch.zeros(6, dtype=torch.float64)
        save(checkpoint.LAST, epoch + 1, 0)
        if is_best and world.is_main:
            checkpoint.link(out / checkpoint.LAST, out / checkpoint.BEST)
    return record


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               stats: PixelStats, *, crop_size: int, lighting_std: float, generator: torch.Generator,
               seeds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on uint8 (B, 3, 256, 256) images and int64 (B,) labels, both on the device:
    augment (seeded by seeds[0]), forward (dropout seeded by seeds[1]), backward, update. Returns the
    detached loss and (B, C) logits without syncing with the device."""
    generator.manual_seed(seeds[0])
    torch.manual_seed(seeds[1])
    if images.is_cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    x = train_views(images, stats, crop_size, generator=generator, lighting_std=lighting_std)  # (B, 3, S, S)
    with autocast(images.device):
        logits = model(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def epoch_record(epoch: int, global_step: int, totals: torch.Tensor, lr: float) -> dict:
    """The epoch's training numbers from its totals: loss sum, top-1 hits, top-5 hits, samples,
    seconds of training steps, seconds waiting for data (summed over log intervals). Errors are
    fractions (0..1), times seconds."""
    loss_sum, top1, top5, n, seconds, wait = totals.tolist()
    return {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step, "train_loss": loss_sum / n,
            "train_top1_err": 1 - top1 / n, "train_top5_err": 1 - top5 / n, "lr": lr,
            "images_per_s": n / seconds, "data_wait": wait / seconds, "epoch_time": seconds}


def summary_line(record: dict) -> str:
    line = (f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, top-1 error {record['train_top1_err']:.1%}; "
            f"{record['images_per_s']:.0f} images/s, data wait {record['data_wait']:.0%}")
    if "val_top1_err" in record:
        line += f"; validation top-1 / top-5 error {record['val_top1_err']:.1%} / {record['val_top5_err']:.1%}"
    return line
