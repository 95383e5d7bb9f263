"""CPU loader benchmark: our shard stream against torchvision's ImageFolder + DataLoader, per core.

The same photo-like JPEGs (ImageNet-sized, about 500x375, q90) are written once as a class-folder tree
and built into 256 px shards with alexprep's folder source. Then, the methods taking turns, best of
`--repeat` passes:
  - decode alone, over the whole set once: PIL open + load of the original files; the shards' tar
    parsing alone; the 256 px shard JPEGs (bytes in memory) decoded into a channels_last uint8 batch
    as the loader workers do, by TorchCodec (what they use) and by PIL (pillow-simd where set up);
  - baseline: `ImageFolder` + `DataLoader` with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor
    and Normalize (the PyTorch ImageNet example's training input), workers 0, 1 and 2;
  - ours: `ShardStream` (train/stream.py) + `WorkerLoader` (train/loader.py) (shards -> uint8
    (B, 3, 256, 256) batches; crop, flip, lighting and normalisation happen later on the training
    device), workers 0, 1 and 2; and the same stream through torch's DataLoader workers (1 and 2), to
    measure the transport alone.
Both loaders run `--batches` batches and are timed in their steady state, from the arrival of batch
2 x workers + 2 to the arrival of the last one, as a long training epoch sees them (worker start-up
is excluded). "Per core" is images per CPU second of every process involved (the main process with all
its threads and the loader workers, from getrusage and /proc/PID/stat), so it holds while other
programs share the machine; wall-clock images/s are reported beside it. Torch's intra-op threads are
set to 1, as DataLoader sets them in its workers.
Last, the memory of our loader over 3 epochs: the main process's RSS after each epoch and the peak
anonymous PSS of main process plus workers during it (see benchmarks.common.ProcessMemory).

    .venv/bin/python -m benchmarks.cpu_loader --json /tmp/cpu_loader.json     # about 2 minutes on 2 cores
    .venv/bin/python -m benchmarks.cpu_loader --quick                          # a sanity run, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import (PHOTO_SIZES, QUICK_SIZES, StreamDataset, build_photo_shards, child_pids, process_memory,
                               tree_cpu_s, write_photo_tree)
from prep.contract import IMAGE_SIZE, write_json
from train.loader import WorkerLoader, decode_batch
from train.stream import Sample, ShardStream, SplitShards, read_shard

# ImageNet's usual constants, as the PyTorch ImageNet example normalises with them
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Run:
    images: int
    wall_s: float
    cpu_s: float  # user + system seconds of this process (all threads) and of its loader workers
    main_cpu_s: float  # the part of cpu_s spent in this process

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def images_per_cpu_s(self) -> float:
        return self.images / self.cpu_s

    @property
    def main_us_per_image(self) -> float:
        return 1e6 * self.main_cpu_s / self.images


def since(images: int, wall: float, cpu: tuple[float, float]) -> Run:
    """The run of `images` images since perf_counter() was `wall` and tree_cpu_s() was `cpu`."""
    now = tree_cpu_s()
    return Run(images, time.perf_counter() - wall, now[0] - cpu[0], now[1] - cpu[1])


def timed(fn, *args) -> Run:
    """Run fn(*args), which returns how many images it handled in this process, and time it."""
    gc.collect()
    cpu, wall = tree_cpu_s(), time.perf_counter()
    n = fn(*args)
    return since(n, wall, cpu)


def steady(loader, batches: int, warmup: int) -> Run:
    """Time a loader that yields `batches` batches in its steady state: from the arrival of batch `warmup`
    (the workers started and busy) to the arrival of the last batch (the workers still alive, so their
    CPU time can be read), counting the images of the batches in between."""
    if batches <= warmup + 1:
        raise ValueError(f"{batches} batches leave none to time after {warmup} warm-up batches")
    gc.collect()
    images = 0
    for i, (x, labels) in enumerate(loader):
        if i == warmup:
            cpu, wall = tree_cpu_s(), time.perf_counter()
        elif i > warmup:
            images += len(labels)
        if i == batches - 1:
            run = since(images, wall, cpu)
    return run


# ---------------------------------------------------------------------------------------------------
# The methods


def decode_pil_files(paths: list[Path]) -> int:
    for p in paths:
        with Image.open(p) as im:
            im.load()
    return len(paths)


def read_tars(split: SplitShards) -> int:
    return sum(1 for url, n in zip(split.urls, split.lengths) for _ in read_shard(url, n, split.num_classes))


DECODE_BATCH = 128  # images per batch buffer in the decode-alone runs


def batch_buffer() -> torch.Tensor:
    return torch.empty(DECODE_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8, memory_format=torch.channels_last)


def decode_torchcodec_bytes(jpegs: list[bytes]) -> int:
    """The loader workers' own decode (train.loader.decode_batch: TorchCodec) into a reused batch buffer."""
    out, samples = batch_buffer(), [Sample("", str(i), b, 0) for i, b in enumerate(jpegs)]
    for start in range(0, len(samples), DECODE_BATCH):
        decode_batch(samples[start : start + DECODE_BATCH], out=out)
    return len(jpegs)


def decode_pil_bytes(jpegs: list[bytes]) -> int:
    """The same with PIL: decode, then copy the (H, W, 3) pixels into the batch buffer."""
    out = batch_buffer()
    for i, b in enumerate(jpegs):
        with Image.open(io.BytesIO(b)) as im:
            out[i % DECODE_BATCH] = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
    return len(jpegs)


def warmup_batches(workers: int) -> int:
    """Batches to let pass before timing a loader: every worker's first batch, and two more."""
    return 2 * max(1, workers) + 2


def imagefolder_run(root: Path, batch: int, batches: int, workers: int, seed: int) -> Run:
    """`batches` batches of the PyTorch ImageNet example's training input (random order, as many passes
    over the files as that takes)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets, transforms

    augment = transforms.Compose([
        transforms.RandomResizedCrop(224),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(str(root / "train"), transform=augment)
    sampler = RandomSampler(dataset, num_samples=batches * batch, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
    return steady(loader, batches, warmup_batches(workers))  # batches of (B, 3, 224, 224) float32, (B,)


def ours_run(split: SplitShards, batch: int, batches: int, workers: int, seed: int) -> Run:
    """`batches` batches of alextrain's training stream on the CPU (cycling through the shards)."""
    stream = ShardStream(split, batch, train=True, seed=seed, epoch=0, steps=batches)
    return steady(WorkerLoader(stream, workers), batches, warmup_batches(workers))  # (B, 3, 256, 256) uint8, (B,)


def dataloader_run(split: SplitShards, batch: int, batches: int, workers: int, seed: int) -> Run:
    """The same stream through torch's DataLoader workers instead of alextrain's slot ring (the
    transport alextrain used before): each batch travels through a fresh shared-memory segment."""
    from torch.utils.data import DataLoader

    stream = ShardStream(split, batch, train=True, seed=seed, epoch=0, steps=batches)
    loader = DataLoader(StreamDataset(stream), batch_size=None, num_workers=workers, prefetch_factor=4)
    return steady(loader, batches, warmup_batches(workers))


# ---------------------------------------------------------------------------------------------------
# Memory


def loader_memory(split: SplitShards, *, epochs: int = 3, batch: int = 64, workers: int = 2, steps: int | None = None,
                  seed: int = 0) -> list[dict]:
    """Run `epochs` epochs of `steps` batches (default: one pass over the split) of our loader as
    alextrain does (a fresh stream and DataLoader per epoch) and
    record per epoch, in KiB: the main process's RSS after the epoch, and the peak over the epoch's
    batches of the anonymous PSS of the main process plus its workers (sampled as each batch arrives);
    and the most worker processes seen at once."""
    me, records = os.getpid(), []
    steps = steps or split.num_samples // batch
    for epoch in range(epochs):
        stream = ShardStream(split, batch, train=True, seed=seed, epoch=epoch, steps=steps)
        peak = seen = 0
        for images, labels in WorkerLoader(stream, workers):
            # Touch every page of the batch, as the copy to the training device does: a batch that is
            # kept alive by mistake then stays resident in the main process and shows in its RSS.
            images.permute(0, 2, 3, 1).reshape(-1)[::4096].sum()  # a view: the batch is channels_last
            children = child_pids(me)
            peak = max(peak, sum(process_memory(p).anon_pss_kib for p in [me, *children]))
            seen = max(seen, len(children))
        gc.collect()
        records.append({"epoch": epoch + 1, "main_rss_kib": process_memory(me).rss_kib, "peak_anon_pss_kib": peak,
                        "workers_seen": seen})
    return records


def memory_growth(records: list[dict]) -> dict:
    """Growth from the first epoch (the warm-up) to the largest later value, as a fraction: of the main
    process's RSS after each epoch, and of the peak anonymous PSS of main process + workers."""
    first, later = records[0], records[1:]
    return {key: max(r[key] for r in later) / first[key] - 1 for key in ("main_rss_kib", "peak_anon_pss_kib")}


# ---------------------------------------------------------------------------------------------------


def run(images: int, classes: int, batch: int, batches: int, workers: list[int], repeat: int, seed: int, quick: bool,
        memory_epochs: int, log=print) -> dict:
    """Everything above in one pass; returns the JSON-able results."""
    torch.set_num_threads(1)
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="cpu-loader-bench-") as tmp:
        root, out = Path(tmp, "photos"), Path(tmp, "shards")
        t = time.perf_counter()
        paths = write_photo_tree(root, images, classes, seed=seed, workers=cores, sizes=QUICK_SIZES if quick else PHOTO_SIZES)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        # More shards than readers (2 at most here), so that each reader owns whole shards.
        split = build_photo_shards(root, out, shard_size=max(1, images // 8), workers=cores)
        build_s = time.perf_counter() - t
        jpegs = [s.jpg for url, n in zip(split.urls, split.lengths) for s in read_shard(url, n, split.num_classes)]
        data = {
            "images": len(paths), "classes": classes, "shards": len(split.urls),
            "original_mean_kb": sum(p.stat().st_size for p in paths) / len(paths) / 1e3,
            "shard_jpeg_mean_kb": sum(map(len, jpegs)) / len(jpegs) / 1e3,
            "generate_s": gen_s, "build_s": build_s,
        }
        log(f"{len(paths)} photos ({data['original_mean_kb']:.0f} KB) in {gen_s:.1f} s; "
            f"{len(split.urls)} shards ({data['shard_jpeg_mean_kb']:.1f} KB/JPEG) built in {build_s:.1f} s on {cores} cores")

        methods = {
            "decode_pil_originals": partial(timed, decode_pil_files, paths),
            "read_tars": partial(timed, read_tars, split),
            "decode_torchcodec_256": partial(timed, decode_torchcodec_bytes, jpegs),
            "decode_pil_256": partial(timed, decode_pil_bytes, jpegs),
        }
        for w in workers:
            methods[f"imagefolder_w{w}"] = partial(imagefolder_run, root, batch, batches, w, seed)
        for w in workers:
            if w > 0:
                methods[f"dataloader_w{w}"] = partial(dataloader_run, split, batch, batches, w, seed)
            methods[f"ours_w{w}"] = partial(ours_run, split, batch, batches, w, seed)
        best: dict[str, Run] = {}
        for r in range(repeat):
            for name, method in methods.items():
                result = method()
                log(f"pass {r + 1}/{repeat} {name}: {result.images} images, {result.images_per_s:.0f}/s wall, "
                    f"{result.images_per_cpu_s:.0f}/CPU-s")
                if name not in best or result.cpu_s < best[name].cpu_s:
                    best[name] = result

        t = time.perf_counter()
        memory = loader_memory(split, epochs=memory_epochs, batch=batch, workers=max(workers))
        memory_s = time.perf_counter() - t

    results = {name: {**asdict(r), "images_per_s": r.images_per_s, "images_per_cpu_s": r.images_per_cpu_s,
                      "main_us_per_image": r.main_us_per_image}
               for name, r in best.items()}
    for w in workers:
        ours, base = results[f"ours_w{w}"], results[f"imagefolder_w{w}"]
        ours["x_imagefolder_per_core"] = ours["images_per_cpu_s"] / base["images_per_cpu_s"]
        ours["x_imagefolder_wall"] = ours["images_per_s"] / base["images_per_s"]
        if f"dataloader_w{w}" in results:
            dataloader = results[f"dataloader_w{w}"]
            dataloader["x_imagefolder_per_core"] = dataloader["images_per_cpu_s"] / base["images_per_cpu_s"]
            ours["x_dataloader_per_core"] = ours["images_per_cpu_s"] / dataloader["images_per_cpu_s"]
    # The loader workers' decoder against PIL, same JPEGs, same run: which is faster per core.
    results["decode_torchcodec_256"]["x_pil_per_core"] = (results["decode_torchcodec_256"]["images_per_cpu_s"]
                                                          / results["decode_pil_256"]["images_per_cpu_s"])
    growth = memory_growth(memory) if len(memory) > 1 else None
    return {"data": data, "batch": batch, "batches": batches, "repeat": repeat, "results": results,
            "memory": {"epochs": memory, "growth": growth, "workers": max(workers), "seconds": memory_s}}


LABELS = {
    "decode_pil_originals": "decode alone: PIL open + load of the original files",
    "read_tars": "tar parsing alone: the shards' samples as bytes (train.stream.read_shard)",
    "decode_torchcodec_256": "decode alone: TorchCodec (the loader's decode_batch), 256 px shard JPEGs into a batch",
    "decode_pil_256": "decode alone: PIL, 256 px shard JPEGs into a batch",
}


def ordered(names) -> list[str]:
    """Result names in table order: decode alone, then ImageFolder, then our stream through DataLoader,
    then ours, by workers."""
    rank = {name: i for i, name in enumerate(LABELS)}
    kinds = ("imagefolder", "dataloader", "ours")
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), kinds.index(n.rsplit("_w", 1)[0]) if n not in rank else 0, len(n), n))


def label(name: str) -> str:
    if name.startswith("imagefolder_w"):
        return f"ImageFolder + DataLoader, RandomResizedCrop/flip/ToTensor/Normalize, {name[13:]} workers"
    if name.startswith("dataloader_w"):
        return f"ShardStream through torch's DataLoader (a shared-memory segment per batch), {name[12:]} workers"
    if name.startswith("ours_w"):
        return f"ours: ShardStream + WorkerLoader (reused shared slots) -> uint8 (B,3,256,256), {name[6:]} workers"
    return LABELS[name]


def table(report: dict) -> str:
    lines = ["| what | images/s wall | images per CPU-s (per core) | main process CPU-us per image | x ImageFolder per core "
             "| x DataLoader transport per core |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ordered(report["results"]):
        r = report["results"][name]
        x, y = (f"{r[key]:.2f}" if key in r else "" for key in ("x_imagefolder_per_core", "x_dataloader_per_core"))
        lines.append(f"| {label(name)} | {r['images_per_s']:,.0f} | {r['images_per_cpu_s']:,.0f} | {r['main_us_per_image']:,.0f} | {x} | {y} |")
    memory = report["memory"]
    for e in memory["epochs"]:
        lines.append(f"| epoch {e['epoch']} of ours, {memory['workers']} workers: main RSS after / peak anonymous PSS of "
                     f"main + workers | {e['main_rss_kib'] / 1024:.0f} MiB / {e['peak_anon_pss_kib'] / 1024:.0f} MiB | | | | |")
    if memory["growth"]:
        g = memory["growth"]
        lines.append(f"| growth after epoch 1: main RSS / peak anonymous PSS of main + workers | "
                     f"{g['main_rss_kib']:+.1%} / {g['peak_anon_pss_kib']:+.1%} | | | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="test photos (default 2000)")
    parser.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    parser.add_argument("--batch", type=int, default=128, help="batch size of both loaders (default 128)")
    parser.add_argument("--batches", type=int, default=32, help="batches per loader run, the first 2 x workers + 2 untimed (default 32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to try (default 0 1 2)")
    parser.add_argument("--repeat", type=int, default=2, help="passes per method; the least CPU time counts (default 2)")
    parser.add_argument("--memory-epochs", type=int, default=3, help="epochs of the memory measurement (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="96 small photos, batch 16, 12 batches, one pass (a sanity run)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch, args.batches, args.repeat = 96, 16, 12, 1
    t0 = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (progress; the table goes to stdout)
    report = run(args.images, args.classes, args.batch, args.batches, args.workers, args.repeat, args.seed, args.quick, args.memory_epochs, log)
    report.update(what="CPU loader", quick=args.quick, torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  cores=len(os.sched_getaffinity(0)), seconds=time.perf_counter() - t0)
    report["table"] = table(report)
    print(report["table"])
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
