"""GPU training speed in one run: model-only, loader-only and end-to-end images/s, per arch, batch size,
eager or compiled, and CPU or GPU JPEG decode.

First it writes photo-like JPEGs (ImageNet-sized, about 500x375) and builds them into 256 px shards with
alexprep (benchmarks/common.py; about half a minute on 16 cores). Then:
  - loader-only: alextrain's input (ShardStream -> DeviceLoader) from the shards to uint8
    (B, 3, 256, 256) batches on the device: CPU workers decode into page-locked shared slots that are
    copied to the device on a side stream (decode="cpu"), or the workers pass JPEG bytes and the device
    decodes them in batches (decode="gpu"), or both (decode="both": the device decodes the batches the
    workers start while the loop waits for data); and, for comparison, the same stream through torch's
    DataLoader with pin_memory (transport "dataloader", decode="cpu"). "gpu-nvimgcodec" and
    "both-nvimgcodec" decode on the device with nvImageCodec (the GPU's hardware JPEG decoders) instead
    of torchvision's nvJPEG; they are left out when nvImageCodec is not installed;
  - model-only: alextrain's training step (crop, flip, PCA lighting and normalisation on the device,
    forward and backward under bf16 autocast in channels_last, SGD with momentum and weight decay) on
    random uint8 batches already on the device;
  - end-to-end: the loader feeding that step, with the share of the time spent waiting for data.
Each measurement runs a fixed number of warm-up steps (worker start-up, cudnn autotuning, compilation),
then a fixed number of timed steps between two device synchronisations. Results go to --json after every
measurement, so a run cut short keeps what it measured. Measurements that would start after
--time-limit seconds are skipped and listed; the paper model ("alexnet") goes first.

    python3 -m benchmarks.gpu_train --json gpu_train.json          # about 5 minutes on an H100, 16 cores
    .venv/bin/python -m benchmarks.gpu_train --device cpu --quick   # every code path, tiny sizes, on the CPU

Run it from the repository root (it imports prep, train and benchmarks from there).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import PHOTO_SIZES, QUICK_SIZES, StreamDataset, build_photo_shards, machine, sync, write_photo_tree
from prep.contract import IMAGE_SIZE, IMAGENET_TRAIN_IMAGES, write_json
from prep.text import first_line
from train.augment import StatsTensors
from train.device_decode import DecoderUnavailable, import_nvimgcodec
from train.loader import DeviceLoader
from train.loop import train_step
from train.metrics import topk_correct
from train.model import ARCHS, INPUTS, build_model
from train.stream import ShardStream, SplitShards, open_shards, seed_for

PAPER_EPOCHS = 90
NUM_CLASSES = 1000  # the ImageNet model's classifier, whatever the test shards' labels are
LIGHTING_STD = 0.1  # alextrain's default PCA lighting
DECODES = ("cpu", "gpu", "both", "gpu-nvimgcodec", "both-nvimgcodec")  # where JPEGs are decoded (and with what, on the GPU)


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    device: str
    archs: tuple[str, ...]
    batches: tuple[int, ...]
    modes: tuple[str, ...]  # "eager", "compile"
    decodes: tuple[str, ...]  # DECODES
    workers: int  # loader workers
    images: int  # photos built into shards
    shard_size: int
    photo_sizes: tuple[tuple[int, int], ...]
    model_warmup: int  # model-only warm-up steps (the first one compiles)
    model_images: int  # model-only timed images, rounded up to whole batches
    loader_warmup: int  # loader-only and end-to-end warm-up batches (worker start-up, first prefetches)
    loader_images: int  # loader-only and end-to-end timed images, rounded up to whole batches
    time_limit: float  # seconds after the shards are built; later measurements are skipped
    crop: int = 224

    def timed_steps(self, images: int, batch: int) -> int:
        return math.ceil(images / batch)


def make_plan(args: argparse.Namespace) -> Plan:
    cores = len(os.sched_getaffinity(0))
    decodes = list(args.decodes)
    try:
        import_nvimgcodec()
    except DecoderUnavailable as e:
        if any(d.endswith("-nvimgcodec") for d in decodes):
            print(f"gpu_train: leaving out the nvImageCodec decodes ({e})", flush=True)
        decodes = [d for d in decodes if not d.endswith("-nvimgcodec")]
    workers = args.workers if args.workers is not None else max(1, cores - 1)  # one core for the training loop
    if args.quick:
        return Plan(args.device, tuple(args.archs), (4,), tuple(args.modes), tuple(decodes), args.workers or 2,
                    images=48, shard_size=6, photo_sizes=QUICK_SIZES, model_warmup=1, model_images=4,
                    loader_warmup=1, loader_images=8, time_limit=args.time_limit)
    # Shards: many more than readers (each reader then owns whole shards), small enough to build fast.
    return Plan(args.device, tuple(args.archs), tuple(args.batches), tuple(args.modes), tuple(decodes), workers,
                images=args.images, shard_size=max(1, args.images // 80), photo_sizes=PHOTO_SIZES,
                model_warmup=10, model_images=16384, loader_warmup=workers + 8, loader_images=32768,
                time_limit=args.time_limit)


class TrainStep:
    """alextrain's training step (train.loop.train_step) without its logging and checkpoints: per-step
    seeds, channels_last on CUDA, train_views on the device, bf16 autocast (CUDA), cross-entropy in
    float32, SGD (lr 0.01, momentum 0.9, weight decay 5e-4), top-1/top-5 hits accumulated on the device."""

    def __init__(self, arch: str, device: torch.device, compile: bool, stats: StatsTensors, crop: int):
        torch.manual_seed(0)
        model = build_model(arch, NUM_CLASSES).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if compile:
            torch._dynamo.reset()  # a fresh, static-shape compile, as in a new alextrain process
            model = torch.compile(model)
        self.model, self.device, self.stats, self.crop = model.train(), device, stats, crop
        self.scaling = INPUTS[arch]  # the arch's own input scaling, as alextrain feeds it
        self.generator = torch.Generator(device)
        self.hits = torch.zeros(2, dtype=torch.float64, device=device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """One step on uint8 (B, 3, 256, 256) images and int64 (B,) labels, both on the device."""
        seeds = (seed_for(0, 0, step, 0, 0), seed_for(0, 0, step, 0, 1))
        _, logits = train_step(self.model, self.optimizer, images, labels, self.stats, scaling=self.scaling, crop_size=self.crop,
                               lighting_std=LIGHTING_STD, generator=self.generator, seeds=seeds)
        self.hits += topk_correct(logits, labels)


def model_only(step: TrainStep, batch: int, warmup: int, timed: int, device: torch.device) -> dict:
    """Images/s of `step` on random uint8 batches already on the device (two, alternating)."""
    gen = torch.Generator(device).manual_seed(0)
    images = [torch.randint(0, 256, (batch, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, device=device, generator=gen) for _ in range(2)]
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(images[i % 2], labels, i)
    sync(device)
    t1 = time.perf_counter()
    for i in range(warmup, warmup + timed):
        step(images[i % 2], labels, i)
    sync(device)
    seconds = time.perf_counter() - t1
    out = {"images": timed * batch, "seconds": seconds, "images_per_s": timed * batch / seconds, "warmup_s": t1 - t0}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class TorchDataLoaderInput:
    """A stream through torch's DataLoader (pinned memory, non_blocking copies): the transport alextrain
    used before train/loader.py, measured beside it. Yields (images, labels) on `device`; `wait` as in
    DeviceLoader."""

    def __init__(self, stream: ShardStream, workers: int, device: torch.device):
        from torch.utils.data import DataLoader

        self.loader = DataLoader(StreamDataset(stream), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                                 prefetch_factor=4)
        self.device, self.wait, self.decoded_here = device, 0.0, 0

    def reset_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait

    def __iter__(self):
        t0 = time.perf_counter()
        for images, labels in self.loader:
            self.wait += time.perf_counter() - t0
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            t0 = time.perf_counter()


def stream_run(split: SplitShards, batch: int, warmup: int, timed: int, workers: int, decode: str, device: torch.device,
               step: TrainStep | None, epoch: int, transport: str = "slots") -> dict:
    """Images/s of alextrain's loader alone (step None) or feeding `step`; `warmup` batches first.
    data_wait: the share of the timed seconds the loop spent blocked on the loader. transport
    "dataloader" (decode "cpu" only): torch's DataLoader instead of alextrain's worker slots."""
    where, _, gpu_decoder = decode.partition("-")  # "both-nvimgcodec": decode "both" with nvImageCodec
    stream = ShardStream(split, batch, train=True, seed=0, epoch=epoch, steps=warmup + timed)
    if transport == "dataloader":
        loader = TorchDataLoaderInput(stream, workers, device)
    else:
        loader = DeviceLoader(stream, device, workers=workers, decode=where, gpu_decoder=gpu_decoder or "torchvision")
    batches = iter(loader)
    t0 = time.perf_counter()
    for i in range(warmup):
        images, labels = next(batches)
        if step is not None:
            step(images, labels, i)
    sync(device)
    loader.reset_wait()
    decoded_before = loader.decoded_here
    t1 = time.perf_counter()
    for i in range(warmup, warmup + timed):
        images, labels = next(batches)  # (B, 3, 256, 256) uint8, (B,) int64 on the device
        if step is not None:
            step(images, labels, i)
    sync(device)
    seconds, wait = time.perf_counter() - t1, loader.reset_wait()
    on_device = (loader.decoded_here - decoded_before) / timed
    for _ in batches:  # the stream has no batches left: this ends the iteration and shuts the workers down
        pass
    return {"images": timed * batch, "seconds": seconds, "images_per_s": timed * batch / seconds,
            "data_wait": wait / seconds, "decoded_on_device": on_device, "warmup_s": t1 - t0}


class Bench:
    """Runs the measurements in order, skipping those that would start after the time limit, and
    writes the report after each one."""

    def __init__(self, plan: Plan, report: dict, json_path: str | None):
        self.plan, self.report, self.json_path = plan, report, json_path
        self.start = time.perf_counter()

    def save(self) -> None:
        self.report["table"] = table(self.report)
        self.report["seconds"] = time.perf_counter() - self.start + self.report["shards"].get("seconds", 0)
        if self.json_path:
            write_json(self.json_path, self.report)

    def measure(self, kind: str, key: dict, fn, *args) -> dict | None:
        """Run fn(*args) -> result dict for one row of report[kind] keyed by `key`, unless past the time
        limit; an exception is recorded as that row's error and the run goes on."""
        name = " ".join(f"{k}={v}" for k, v in key.items())
        elapsed = time.perf_counter() - self.start
        if elapsed > self.plan.time_limit:
            self.report["skipped"].append({"kind": kind, **key})
            print(f"skip {kind} {name}: past the time limit ({elapsed:.0f} s > {self.plan.time_limit:.0f} s)", flush=True)
            self.save()
            return None
        try:
            result = fn(*args)
        except Exception as e:  # one failing configuration (say, out of memory) must not lose the others
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {first_line(e)}"}
        row = {**key, **result}
        self.report[kind].append(row)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        print(f"{kind} {name}: {shown}  [{time.perf_counter() - self.start:.0f} s]", flush=True)
        self.save()
        return row


def run(plan: Plan, folder: Path | None, json_path: str | None) -> dict:
    """Build the shards (unless `folder` holds some), then measure as `plan` says; returns the report."""
    device = torch.device(plan.device)
    report = {"what": "GPU training speed: model-only, loader-only, end-to-end", "plan": asdict(plan),
              "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shards": {}, "loader_only": [], "model_only": [], "end_to_end": [], "skipped": []}
    with tempfile.TemporaryDirectory(prefix="gpu-train-bench-") as tmp:
        # Built before CUDA is touched, so the build's forked pool starts from a process without a CUDA context.
        if folder is None:
            t = time.perf_counter()
            cores = len(os.sched_getaffinity(0))
            write_photo_tree(Path(tmp, "photos"), plan.images, 100, workers=cores, sizes=plan.photo_sizes)
            generated = time.perf_counter() - t
            folder = Path(tmp, "shards")
            build_photo_shards(Path(tmp, "photos"), folder, plan.shard_size, workers=cores)
            report["shards"] = {"images": plan.images, "generate_s": generated, "seconds": time.perf_counter() - t}
        shards = open_shards(str(folder), splits=("train",))
        split = shards.split("train")
        report["shards"].update(folder=str(folder), num_samples=split.num_samples, num_shards=len(split.urls),
                                mean_sample_kb=sum(f.stat().st_size for f in folder.glob("train-*.tar")) / split.num_samples / 1e3)
        report["machine"] = {**machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        print(f"shards: {report['shards']}\nmachine: {report['machine']}", flush=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as alextrain does
        bench = Bench(plan, report, json_path)
        bench.save()
        stats = StatsTensors.of(shards.stats, device)
        epoch = 0  # each stream gets its own epoch number, so its shard order differs from the last one's

        for batch in plan.batches:
            for decode in plan.decodes:
                for transport in ("slots", "dataloader") if decode == "cpu" else ("slots",):
                    epoch += 1
                    timed = plan.timed_steps(plan.loader_images, batch)
                    bench.measure("loader_only", {"batch": batch, "decode": decode, "workers": plan.workers, "transport": transport},
                                  stream_run, split, batch, plan.loader_warmup, timed, plan.workers, decode, device, None, epoch, transport)

        for arch in plan.archs:
            for mode in plan.modes:
                for batch in plan.batches:
                    key = {"arch": arch, "batch": batch, "mode": mode}
                    try:
                        step = TrainStep(arch, device, mode == "compile", stats, plan.crop)
                    except Exception as e:
                        traceback.print_exc()
                        report["model_only"].append({**key, "error": f"{type(e).__name__}: {e}"})
                        bench.save()
                        continue
                    timed = plan.timed_steps(plan.model_images, batch)
                    alone = bench.measure("model_only", key, model_only, step, batch, plan.model_warmup, timed, device)
                    if alone is None or "error" in alone:
                        continue  # past the time limit, or the model itself fails: no end-to-end either
                    for decode in plan.decodes:
                        epoch += 1
                        timed = plan.timed_steps(plan.loader_images, batch)
                        row = bench.measure("end_to_end", {**key, "decode": decode, "workers": plan.workers}, stream_run,
                                            split, batch, plan.loader_warmup, timed, plan.workers, decode, device, step, epoch)
                        if row is not None and "images_per_s" in row:
                            row["x_model_only"] = row["images_per_s"] / alone["images_per_s"]
                            row["hours_90_epochs"] = PAPER_EPOCHS * IMAGENET_TRAIN_IMAGES / row["images_per_s"] / 3600
                            bench.save()
                    del step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        bench.save()
    return report


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    """One row per (arch, batch, mode, decode): model-only, loader-only, end-to-end images/s and their
    ratio; then the loader-only rows, alextrain's worker slots beside torch's DataLoader."""
    loader = {(r["batch"], r["decode"]): r.get("images_per_s") for r in report["loader_only"] if r["transport"] == "slots"}
    alone = {(r["arch"], r["batch"], r["mode"]): r.get("images_per_s") for r in report["model_only"]}
    lines = ["| arch | batch | mode | decode | model-only img/s | loader-only img/s | end-to-end img/s | e2e / model | data wait "
             "| decoded on the device | 90 epochs, h |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["end_to_end"]:
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['mode']} | {r['decode']} | {fmt(alone.get((r['arch'], r['batch'], r['mode'])), ',.0f')} | "
            f"{fmt(loader.get((r['batch'], r['decode'])), ',.0f')} | {fmt(r.get('images_per_s'), ',.0f')} | "
            f"{fmt(r.get('x_model_only'), '.2f')} | {fmt(r.get('data_wait'), '.0%')} | {fmt(r.get('decoded_on_device'), '.0%')} | "
            f"{fmt(r.get('hours_90_epochs'), '.1f')} |"
            + (f" error: {r['error']}" if "error" in r else ""))
    for r in report["model_only"]:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['batch']} | {r['mode']} | - | error: {r['error']} | | | | | | |")
    for s in report["skipped"]:
        lines.append(f"| {s.get('arch', '(loader)')} | {s['batch']} | {s.get('mode', '-')} | {s.get('decode', '-')} | "
                     f"skipped ({s['kind']}, time limit) | | | | | | |")
    lines += ["", "| loader-only: batch | decode | transport | workers | img/s | decoded on the device |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["loader_only"]:
        lines.append(f"| {r['batch']} | {r['decode']} | {r['transport']} | {r['workers']} | "
                     + (f"error: {r['error']} | |" if "error" in r else f"{r['images_per_s']:,.0f} | {r['decoded_on_device']:.0%} |"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="48 small images, batch 4, 2 workers, 1 or 2 timed steps (a sanity run)")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=["alexnet", "alexnet-tv"])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--modes", nargs="+", choices=("eager", "compile"), default=["eager", "compile"])
    parser.add_argument("--decodes", nargs="+", choices=DECODES, default=list(DECODES))
    parser.add_argument("--workers", type=int, help="loader workers (default: cores - 1)")
    parser.add_argument("--images", type=int, default=16000, help="photos built into shards (default 16000)")
    parser.add_argument("--shards", type=Path, help="measure on this shard folder instead of building one")
    parser.add_argument("--time-limit", type=float, default=200, help="seconds after the shards are ready; later measurements are skipped (default 200)")
    parser.add_argument("--json", help="write the results here (rewritten after every measurement)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_train: skipped, no CUDA device here (use --device cpu --quick for a sanity run)")
        return 0
    report = run(make_plan(args), args.shards, args.json)
    print("\n" + report["table"])
    failed = [r for kind in ("loader_only", "model_only", "end_to_end") for r in report[kind] if "error" in r]
    print(f"\n{len(failed)} failed, {len(report['skipped'])} skipped, {report['seconds']:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
