"""ImageNet rehearsal: `alexprep build-shards` at ImageNet's file and shard counts, as a user runs it, then
the trainer's loader and a killed and resumed `alextrain` over the shards it wrote.

The repo (tests/hubstub.py's `make_imagenet_like_repo`, served by `python -m tests.hubstub`) has the real
layout: 294 train, 14 validation and 28 test parquet files, row groups of 100 rows, the 1,000 ImageNet
wnids as ClassLabel names, train rows in random class order, and `--fraction` of each split's rows
(1,281,167 / 50,000 / 100,000) as small pictures; `--shard-size` is 1,000 x fraction, so the shards are
ImageNet's 1,282 + 50 at any fraction. Steps, each in its own process:
  1. (with `--baseline REF`) the same build by REF's alexprep (a temporary `git worktree` of REF on
     PYTHONPATH), its shards hashed and deleted, to compare times and bytes in one run;
  2. the build, watched: the wall time split at what shows on disk (the first source file staged, the
     last train / validation file read, i.e. gone from `.build/download/`, the last train / validation
     shard written), the peak disk inside `--out` and outside it (HF_HOME, TMPDIR), the peak RSS and
     PSS and open files of the process tree; then `alexprep verify`, and what finishing one shard of
     1,000 of its samples costs a worker (time, and RSS above what the worker held before);
  3. the trainer's loader (train.stream's ShardStream + train.loader's WorkerLoader, the host batches
     alextrain's DeviceLoader takes, `--workers`, batch 128): one epoch over the 1,282 train shards,
     images per CPU-second (benchmarks.common.tree_cpu_s) against a small set of the same pictures
     (8 shards, a `--limit` build), and the memory over the epoch;
  4. `alextrain` (alexnet-bn, 64 px crops, 8 steps of 16, checkpoint every 2 steps) run through, and
     run again killed after step 5 and resumed with `--resume`: the same losses and final weights;
and prints a projection to the full dataset on `--cores` cores. Needs about 22 GB x fraction of free
disk in `--work` (the repo, the partial shards and the shards; the baseline's shards are deleted once
hashed).

    .venv/bin/python -m benchmarks.imagenet_rehearsal --fraction 0.01 --workers 2      # about 2 minutes here
    .venv/bin/python -m benchmarks.imagenet_rehearsal --baseline 32cc10b --json /tmp/rehearsal.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (ALEXPREP, ROOT, folder_digests, hub_env, machine, peak_rss_kib, process_memory, process_tree,
                               stand_in_hub, tree_cpu_s)
from prep.contract import IMAGENET_TRAIN_IMAGES

IMAGENET_ROWS = {"train": IMAGENET_TRAIN_IMAGES, "validation": 50_000, "test": 100_000}
IMAGENET_FILES = {"train": 294, "validation": 14, "test": 28}
IMAGENET_PARQUET_GB = 155  # train + validation + test on the Hub (design.md)
IMAGENET_MS_PER_IMAGE = 2.0  # CPU ms per real ImageNet image, the build as on ImageNet (docs/benchmarks.md)
IMAGENET_KB_PER_SAMPLE = 25  # a real photo's 256 px q90 JPEG and its tar members (docs/benchmarks.md: 18.8 KB+)
ROW_GROUP = 100
SAMPLE_S = 0.5  # process tree and disk, sampled this often
POLL_S = 0.01  # the staging folder, polled this often
TRAIN_ARGS = ["--arch", "alexnet-bn", "--crop-size", "64", "--batch-size", "16", "--epochs", "1", "--steps-per-epoch",
              "8", "--save-every", "2", "--log-every", "1", "--workers", "2", "--shuffle-buffer", "32", "--device", "cpu"]


def disk_bytes(folder: Path) -> int:
    """Bytes of disk the files under `folder` take (allocated blocks); 0 if it is not there."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:  # deleted between listing and stat
                pass
    return total


def open_files(pid: int) -> int:
    """File descriptors `pid` holds; 0 if it has gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0


@dataclass
class Watch:
    """What a watched command did, in seconds since its start (None: not seen)."""

    pid: int = 0  # the command's process
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the whole process tree's, from wait4
    peak_rss_mib: float = 0.0  # sum over the process tree
    peak_pss_mib: float = 0.0
    peak_open_files: int = 0
    peak_disk_out_gb: float = 0.0
    peak_disk_outside_gb: float = 0.0
    mean_load: float = 0.0  # 1-minute load average over the run
    staged: dict[str, float] = field(default_factory=dict)  # source file -> last seen in .build/download/
    first_staged_s: float | None = None
    rss_kib: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # pid -> [(t, RSS)]


def watch(cmd: list[str], env: dict[str, str], out: Path | None = None, outside: tuple[Path, ...] = (),
          log: Path | None = None, stop_when=None) -> tuple[int, Watch]:
    """Run `cmd`, sampling its process tree and the disk under `out` and `outside`, and polling `out`'s
    staging folder; `stop_when(w)` true: SIGKILL its process group. Returns (exit status, Watch)."""
    w = Watch()
    sink = open(log, "w") if log is not None else subprocess.DEVNULL
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    w.pid = proc.pid
    done = threading.Event()
    staging = out / ".build" / "download" if out is not None else None

    def poll() -> None:
        killed = False
        while not done.is_set():
            now = time.monotonic() - start
            if staging is not None and staging.is_dir():
                for dirpath, _, names in os.walk(staging):
                    for name in names:
                        if name.endswith(".parquet"):
                            w.staged[name] = now
                            w.first_staged_s = w.first_staged_s if w.first_staged_s is not None else now
            if stop_when is not None and not killed and stop_when(w):
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(POLL_S)

    def sample() -> None:
        loads = []
        while not done.is_set():
            now = time.monotonic() - start
            memory = {p: m for p in process_tree(proc.pid) if (m := process_memory(p)).rss_kib}  # gone: all 0
            w.peak_rss_mib = max(w.peak_rss_mib, sum(m.rss_kib for m in memory.values()) / 1024)
            w.peak_pss_mib = max(w.peak_pss_mib, sum(m.pss_kib for m in memory.values()) / 1024)
            w.peak_open_files = max(w.peak_open_files, sum(open_files(p) for p in memory))
            for p, m in memory.items():
                w.rss_kib.setdefault(p, []).append((now, m.rss_kib))
            if out is not None:
                w.peak_disk_out_gb = max(w.peak_disk_out_gb, disk_bytes(out) / 1e9)
            w.peak_disk_outside_gb = max(w.peak_disk_outside_gb, sum(disk_bytes(f) for f in outside) / 1e9)
            loads.append(os.getloadavg()[0])
            w.mean_load = sum(loads) / len(loads)
            done.wait(SAMPLE_S)

    threads = [threading.Thread(target=poll, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)  # its CPU and that of every descendant it waited for
    proc.returncode = os.waitstatus_to_exitcode(status)
    w.wall_s = time.monotonic() - start
    w.cpu_s = usage.ru_utime + usage.ru_stime
    done.set()
    for t in threads:
        t.join()
    if log is not None:
        sink.close()
    return proc.returncode, w


def mtimes(folder: Path, pattern: str) -> list[float]:
    return sorted(p.stat().st_mtime for p in folder.glob(pattern))


def build_phases(w: Watch, out: Path, started: float, files: dict[str, int]) -> dict[str, float]:
    """The build's moments in seconds since its start, from what showed on disk (module docstring)."""
    last = {split: f"{split}-{n - 1:05d}-of-{n:05d}.parquet" for split, n in files.items()}
    train, validation = mtimes(out, "train-*.tar"), mtimes(out, "validation-*.tar")
    return {"first_file_staged": w.first_staged_s, "last_train_row_read": w.staged[last["train"]] + POLL_S,
            "first_train_shard": train[0] - started, "last_train_shard": train[-1] - started,
            "last_validation_row_read": w.staged[last["validation"]] + POLL_S,
            "last_validation_shard": validation[-1] - started, "end": w.wall_s}


def worker_rss(w: Watch, t0: float, t1: float) -> dict[str, float]:
    """MiB: the largest RSS of one process of the tree (the command's own aside) before `t0` and in [t0, t1]."""
    before, after = 0, 0
    for pid, series in w.rss_kib.items():
        if pid != w.pid:
            before = max([before] + [r for t, r in series if t < t0])
            after = max([after] + [r for t, r in series if t0 <= t <= t1])
    return {"before_mib": before / 1024, "after_mib": after / 1024}


def run_build(label: str, pythonpath: Path, out: Path, args: argparse.Namespace, env: dict[str, str],
              work: Path) -> dict:
    """One `alexprep build-shards` against the stand-in Hub, watched; its numbers."""
    cmd = [ALEXPREP, "build-shards", "--out", str(out), "--shard-size", str(args.shard_size), "--workers",
           str(args.workers), "--no-progress"]
    started = time.time()
    status, w = watch(cmd, {**env, "PYTHONPATH": str(pythonpath)}, out, (Path(env["HF_HOME"]), Path(env["TMPDIR"])),
                      work / f"{label}.log")
    if status != 0:
        raise SystemExit(f"{label} build failed: {(work / f'{label}.log').read_text()[-2000:]}")
    phases = build_phases(w, out, started, IMAGENET_FILES)
    finishing = phases["last_train_shard"] - phases["last_train_row_read"]
    shard_bytes = sum(p.stat().st_size for p in out.glob("train-*.tar"))
    return {"phases_s": phases, "train_finishing_s": finishing, "total_s": w.wall_s, "cpu_s": w.cpu_s,
            "train_shard_gb": shard_bytes / 1e9, "largest_shard_mib": max(p.stat().st_size for p in out.glob("*.tar")) / 2**20,
            "peak_rss_mib": w.peak_rss_mib, "peak_pss_mib": w.peak_pss_mib, "peak_open_files": w.peak_open_files,
            "peak_disk_out_gb": w.peak_disk_out_gb, "peak_disk_outside_gb": w.peak_disk_outside_gb,
            "worker_rss": worker_rss(w, phases["last_train_row_read"], phases["last_train_shard"]),
            "main_rss_mib": max(r for _, r in w.rss_kib[w.pid]) / 1024, "mean_load": w.mean_load,
            "left_in_out": sorted(p.name for p in out.iterdir() if not p.name.endswith(".tar"))}


def loader_epoch(folder: str, workers: int, batch: int, steps: int | None) -> None:
    """One epoch of the trainer's loader over `folder`'s train split, decoded on the CPU; prints one JSON line."""
    from train.loader import WorkerLoader
    from train.stream import ShardStream, open_shards

    split = open_shards(folder, ("train",)).split("train")
    steps = steps or split.num_samples // batch
    stream = ShardStream(split, batch, train=True, steps=steps)
    cpu, start, images = tree_cpu_s()[0], time.monotonic(), 0
    for batch_ in WorkerLoader(stream, workers):
        images += len(batch_.labels)
    wall, cpu = time.monotonic() - start, tree_cpu_s()[0] - cpu  # the workers' CPU included
    print(json.dumps({"shards": len(split.urls), "images": images, "wall_s": wall, "cpu_s": cpu}))


def finishing_cost(folder: str, samples: int, repeat: int) -> None:
    """What finishing one shard of `samples` of `folder`'s train samples costs a worker (prep.build.finish_shard,
    entries in reverse order, 1 in 8 with pixel sums, as on ImageNet): seconds and the largest RSS above
    what the worker held before (VmHWM after the peak was reset); prints one JSON line."""
    import numpy as np

    from prep.build import FinishJob, entry_bytes, finish_shard
    from prep.contract import CLS, FIELDS, JPG, iter_samples
    from prep.image import jpeg_sums
    from prep.tar_format import sample_members
    from prep.workers import Sample

    entries = []
    for shard in sorted(Path(folder).glob("train-*.tar")):
        with open(shard, "rb") as f:
            for key, fields in iter_samples(f):
                sums = jpeg_sums(fields[JPG]) if len(entries) % 8 == 0 else None
                members = sample_members(key, [(name, fields[name]) for name in FIELDS])
                entries.append(entry_bytes(Sample(len(entries), key, int(fields[CLS]), members, sums)))
                if len(entries) == samples:
                    break
        if len(entries) == samples:
            break
    work = Path(tempfile.mkdtemp(prefix="finishing-", dir=folder))
    seconds, extra, size = [], [], 0
    for n in range(repeat):
        partial = work / f"{n}.partial"
        partial.write_bytes(b"".join(reversed(entries)))
        job = FinishJob(partial, work / f"{n}.tar", work / f"{n}.json", np.arange(len(entries)), sums=True)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        rss = process_memory("self").rss_kib
        start = time.perf_counter()
        size = finish_shard(job).size
        seconds.append(time.perf_counter() - start)
        extra.append(peak_rss_kib() - rss)
    shutil.rmtree(work)
    print(json.dumps({"samples": len(entries), "shard_bytes": size, "seconds": min(seconds),
                      "extra_rss_kib": max(extra)}))


def run_finishing_cost(folder: Path, env: dict[str, str]) -> dict:
    code = f"from benchmarks.imagenet_rehearsal import finishing_cost; finishing_cost({str(folder)!r}, 1000, 5)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"finishing cost failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "s_per_gb": result["seconds"] / (result["shard_bytes"] / 1e9)}


def run_loader(folder: Path, args: argparse.Namespace, env: dict[str, str], steps: int | None) -> dict:
    code = (f"from benchmarks.imagenet_rehearsal import loader_epoch; "
            f"loader_epoch({str(folder)!r}, {args.workers}, 128, {steps})")
    log = folder.parent / f"loader-{folder.name}.log"
    status, w = watch([sys.executable, "-c", code], env, log=log)
    if status != 0:
        raise SystemExit(f"loader epoch failed: {log.read_text()[-2000:]}")
    result = json.loads(log.read_text().strip().splitlines()[-1])
    series = [r / 1024 for _, r in w.rss_kib[w.pid]]
    return {**result, "images_per_s": result["images"] / result["wall_s"],
            "images_per_cpu_s": result["images"] / result["cpu_s"], "peak_rss_mib": w.peak_rss_mib,
            "peak_pss_mib": w.peak_pss_mib, "main_rss_first_mib": series[0], "main_rss_peak_mib": max(series),
            "main_rss_last_mib": series[-1], "mean_load": w.mean_load}


def train_records(run: Path) -> tuple[list, list]:
    """(global step, loss) of every train step, and the epoch records without their timing fields."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timing = ("images_per_s", "data_wait", "epoch_time", "eval_time", "time")
    return ([(r["global_step"], r["loss"]) for r in records if r["kind"] == "train_step"],
            [{k: v for k, v in r.items() if k not in timing} for r in records if r["kind"] == "epoch"])


def run_resume(shards: Path, work: Path, env: dict[str, str]) -> dict:
    """alextrain run through, and killed after step 5 (checkpoint of step 4 on disk) then resumed: the same?"""
    import torch

    from train import checkpoint

    alextrain = [sys.executable, "-m", "train.cli"]
    through, killed = work / "run-through", work / "run-killed"
    start = time.monotonic()
    status, _ = watch(alextrain + ["--shards", str(shards), "--out", str(through), *TRAIN_ARGS], env,
                      log=work / "run-through.log")
    through_s = time.monotonic() - start

    def step_5_logged(_) -> bool:
        metrics = killed / "metrics.jsonl"
        return metrics.exists() and '"global_step": 5' in metrics.read_text()

    kill_status, _ = watch(alextrain + ["--shards", str(shards), "--out", str(killed), *TRAIN_ARGS], env,
                           log=work / "run-killed.log", stop_when=step_5_logged)
    state = checkpoint.load(killed)
    resumed_at = state["global_step"]
    resume_status, _ = watch(alextrain + ["--resume", str(killed)], env, log=work / "run-resumed.log")
    if status != 0 or resume_status != 0:
        raise SystemExit(f"alextrain failed: see {work}/run-*.log")
    a, b = checkpoint.load(through)["model"], checkpoint.load(killed)["model"]
    return {"killed": kill_status == -signal.SIGKILL, "resumed_at_step": resumed_at,
            "same_losses_and_evaluation": train_records(through) == train_records(killed),
            "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "run_through_s": through_s}


def baseline_tree(ref: str, work: Path) -> Path:
    """A temporary worktree of `ref` (git worktree add); remove it with `git worktree remove`."""
    tree = work / "baseline-src"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    return tree


def disk_write_mb_s(folder: Path) -> float:
    """MB/s of writing 1 GiB into `folder` and syncing it (what bounds finishing, which writes every shard)."""
    path, chunk = folder / "disk-speed", bytes(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(128):
            f.write(chunk)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return (1 << 30) / 1e6 / seconds


def projection(build: dict, finishing: dict, args: argparse.Namespace, parallel: bool) -> dict:
    """The full dataset on `args.cores` cores: download (overlapping processing), processing at this run's
    CPU per image (all of the build's processes, finishing included: on the safe side), then the train
    shards finished after the last file (at 1,000 per shard nearly all of them wait for it) at the measured
    finishing cost per GB, by every core or (not `parallel`) by one, and no faster than the disk writes
    them (`args.disk_mb_s`); as these pictures, and as real photos (IMAGENET_MS_PER_IMAGE,
    IMAGENET_KB_PER_SAMPLE)."""
    cores = args.cores
    full, train = IMAGENET_ROWS["train"] + IMAGENET_ROWS["validation"], IMAGENET_ROWS["train"]
    download = IMAGENET_PARQUET_GB * 1e9 / (args.bandwidth_mb_s * 1e6)
    out = {"cores": cores, "bandwidth_mb_s": args.bandwidth_mb_s, "disk_mb_s": args.disk_mb_s,
           "download_s": download, "finishing_s_per_gb": finishing["s_per_gb"]}
    here = (build["cpu_s"] / build["images"] * 1000, build["train_shard_gb"] * 1e6 / build["train_images"])
    for name, (ms, kb) in (("these_pictures", here), ("real_photos", (IMAGENET_MS_PER_IMAGE, IMAGENET_KB_PER_SAMPLE))):
        processing = full * ms / 1000 / cores
        gb = train * kb / 1e6
        finishing_s = max(gb * finishing["s_per_gb"] / (cores if parallel else 1), gb * 1e3 / args.disk_mb_s)
        out[name] = {"cpu_ms_per_image": ms, "kb_per_sample": kb, "processing_s": processing,
                     "train_finishing_s": finishing_s, "total_s": max(processing, download) + finishing_s}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fraction", type=float, default=0.1, help="of ImageNet's rows per split")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--shard-size", type=int, help="default: 1,000 x fraction (ImageNet's shard counts)")
    ap.add_argument("--baseline", metavar="REF", help="also build with this git ref's alexprep, first")
    ap.add_argument("--cores", type=int, default=16, help="for the projection to the full dataset")
    ap.add_argument("--bandwidth-mb-s", type=float, default=100.0, help="for the projection: the Hub's MB/s")
    ap.add_argument("--disk-mb-s", type=float, help="for the projection: the disk's write MB/s (default: measured in --work)")
    ap.add_argument("--work", type=Path, help="folder for the repo, the shards and the runs (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.shard_size = args.shard_size or max(1, round(1000 * args.fraction))
    rows = {split: max(1, round(n * args.fraction)) for split, n in IMAGENET_ROWS.items()}
    work = args.work or Path(tempfile.mkdtemp(prefix="imagenet-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    need = 22e9 * args.fraction
    if shutil.disk_usage(work).free < need:
        raise SystemExit(f"{work}: {shutil.disk_usage(work).free / 1e9:.1f} GB free, the rehearsal needs about "
                         f"{need / 1e9:.1f} GB at fraction {args.fraction}")
    from prep.contract import imagenet_classes
    from tests.hubstub import make_imagenet_like_repo

    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "command": " ".join(sys.argv),
                     "fraction": args.fraction, "workers": args.workers, "shard_size": args.shard_size, "rows": rows,
                     "load_at_start": os.getloadavg()}
    baseline_src, hub = None, contextlib.ExitStack()  # hub: the stand-in Hub's process, once started
    try:
        start = time.monotonic()
        summary = make_imagenet_like_repo(work / "repo", files=IMAGENET_FILES, split_rows=rows, row_group_size=ROW_GROUP,
                                          class_names=[c.wnid for c in imagenet_classes()], shuffled_train=True)
        results["repo"] = {"files": len(summary.files), "gb": summary.total_bytes / 1e9,
                           "seconds": time.monotonic() - start}
        args.disk_mb_s = args.disk_mb_s or disk_write_mb_s(work)
        results["disk_write_mb_s"] = args.disk_mb_s
        # The repo's pages on disk before any build: their writeback slows the first build's many fsyncs
        # (measured without: the build run first took 1.2-2x the next; with, on the same repo, 113 s and 109 s).
        os.sync()
        print(f"repo: {len(summary.files)} parquet files, {summary.total_bytes / 1e9:.2f} GB, {rows} rows", flush=True)
        (work / "tmp").mkdir(exist_ok=True)
        env = {**hub_env(work / "hf-home"), "HF_ENDPOINT": hub.enter_context(stand_in_hub(work / "repo")),
               "TMPDIR": str(work / "tmp"), "PYTHONPATH": str(ROOT)}

        if args.baseline:
            baseline_src = baseline_tree(args.baseline, work)
            results["baseline"] = run_build("baseline", baseline_src, work / "baseline", args, env, work)
            results["baseline"]["ref"] = args.baseline
            baseline_digests = folder_digests(work / "baseline")
            shutil.rmtree(work / "baseline")  # the disk it takes is needed for ours at fraction 1
            print(f"baseline {args.baseline}: {results['baseline']['total_s']:.1f} s", flush=True)
        ours = results["ours"] = run_build("ours", ROOT, work / "shards", args, env, work)
        ours["train_images"], ours["images"] = rows["train"], rows["train"] + rows["validation"]
        print(f"ours: {ours['total_s']:.1f} s", flush=True)
        if args.baseline:
            base = results["baseline"]
            base["train_images"], base["images"] = rows["train"], rows["train"] + rows["validation"]
            results["identical_to_baseline"] = folder_digests(work / "shards") == baseline_digests
            results["ratios"] = {"train_finishing": ours["train_finishing_s"] / base["train_finishing_s"],
                                 "total": ours["total_s"] / base["total_s"]}

        start = time.monotonic()
        verify = subprocess.run([ALEXPREP, "verify", str(work / "shards"), "--workers", str(args.workers)],
                                env=env, capture_output=True, text=True)
        results["verify"] = {"ok": verify.returncode == 0, "seconds": time.monotonic() - start,
                             "last_line": verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else verify.stderr}
        finishing = results["finishing_cost"] = run_finishing_cost(work / "shards", env)
        results["projection"] = projection(ours, finishing, args, parallel=True)
        if args.baseline:
            results["projection_baseline"] = projection(results["baseline"], finishing, args, parallel=False)

        small = work / "small"
        subprocess.run([ALEXPREP, "build-shards", "--out", str(small), "--splits", "train", "--limit", "2000",
                        "--shard-size", "250", "--workers", str(args.workers), "--no-progress"], env=env, check=True,
                       capture_output=True)
        results["loader"] = {"epoch": run_loader(work / "shards", args, env, None),
                             "small_set": run_loader(small, args, env, min(200, rows["train"] // 128) or None)}
        results["resume"] = run_resume(work / "shards", work, env)
    finally:
        hub.close()
        if baseline_src is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_src)], check=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["load_at_end"] = os.getloadavg()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict) -> None:
    """The results as markdown tables."""
    m = r["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, Python {m['python']}, {m['pillow']}; "
          f"{r['date']}; fraction {r['fraction']}, --workers {r['workers']}, --shard-size "
          f"{r['shard_size']}; load {r['load_at_start'][0]:.1f} at the start, {r['load_at_end'][0]:.1f} at the end")
    runs = [("baseline", r["baseline"])] if "baseline" in r else []
    runs.append(("this tree", r["ours"]))
    print("\n| build | " + " | ".join(name for name, _ in runs) + " |\n| --- |" + " --- |" * len(runs))
    rows = [("first source file staged (s)", lambda b: b["phases_s"]["first_file_staged"]),
            ("last train row read (s)", lambda b: b["phases_s"]["last_train_row_read"]),
            ("first / last train shard (s)", lambda b: f"{b['phases_s']['first_train_shard']:.1f} / "
                                                       f"{b['phases_s']['last_train_shard']:.1f}"),
            ("train finishing: last row read to last shard (s)", lambda b: b["train_finishing_s"]),
            ("last validation row read / shard (s)", lambda b: f"{b['phases_s']['last_validation_row_read']:.1f} / "
                                                               f"{b['phases_s']['last_validation_shard']:.1f}"),
            ("total (s)", lambda b: b["total_s"]), ("CPU of the process tree (s)", lambda b: b["cpu_s"]),
            ("peak RSS / PSS of the process tree (MiB)", lambda b: f"{b['peak_rss_mib']:.0f} / {b['peak_pss_mib']:.0f}"),
            ("peak RSS of the main process (MiB)", lambda b: b["main_rss_mib"]),
            ("largest RSS of a pool worker: before / after the last train row (MiB)",
             lambda b: f"{b['worker_rss']['before_mib']:.0f} / {b['worker_rss']['after_mib']:.0f}"),
            ("largest shard (MiB)", lambda b: b["largest_shard_mib"]),
            ("peak open files of the process tree", lambda b: b["peak_open_files"]),
            ("peak disk inside --out / outside (GB)", lambda b: f"{b['peak_disk_out_gb']:.2f} / {b['peak_disk_outside_gb']:.3f}"),
            ("left in --out besides the shards", lambda b: ", ".join(b["left_in_out"])),
            ("mean load", lambda b: b["mean_load"])]
    for label, get in rows:
        values = [get(b) for _, b in runs]
        print(f"| {label} | " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in values) + " |")
    if "ratios" in r:
        print(f"\nthis tree / baseline: train finishing {r['ratios']['train_finishing']:.2f}x, total "
              f"{r['ratios']['total']:.2f}x; shards and stats.json identical: {r['identical_to_baseline']}")
    print(f"verify: {r['verify']['last_line']} ({r['verify']['seconds']:.0f} s)")
    f = r["finishing_cost"]
    print(f"finishing one shard of {f['samples']} samples ({f['shard_bytes'] / 2**20:.1f} MiB) in a worker: "
          f"{f['seconds'] * 1000:.0f} ms ({f['s_per_gb']:.1f} s per GB), {f['extra_rss_kib'] / 1024:.1f} MiB of RSS "
          f"above what the worker held before")
    e, s = r["loader"]["epoch"], r["loader"]["small_set"]
    print(f"loader, one epoch over {e['shards']} shards: {e['images']} images, {e['images_per_s']:.0f} images/s, "
          f"{e['images_per_cpu_s']:.0f} per CPU-second ({e['images_per_cpu_s'] / s['images_per_cpu_s']:.2f}x the "
          f"{s['shards']}-shard set's {s['images_per_cpu_s']:.0f}); main RSS {e['main_rss_first_mib']:.0f} -> peak "
          f"{e['main_rss_peak_mib']:.0f} -> {e['main_rss_last_mib']:.0f} MiB, tree peak RSS {e['peak_rss_mib']:.0f} / "
          f"PSS {e['peak_pss_mib']:.0f} MiB")
    v = r["resume"]
    print(f"alextrain killed after step 5, resumed from step {v['resumed_at_step']}: same losses and evaluation "
          f"{v['same_losses_and_evaluation']}, same weights {v['same_weights']}")
    for key, label in (("projection_baseline", "baseline"), ("projection", "this tree")):
        if key in r:
            p = r[key]
            for kind in ("these_pictures", "real_photos"):
                q = p[kind]
                print(f"projection, {label}, ImageNet-1k as {kind.replace('_', ' ')} ({q['cpu_ms_per_image']:.2f} CPU-ms "
                      f"and {q['kb_per_sample']:.1f} KB per sample) on {p['cores']} cores, {p['bandwidth_mb_s']:.0f} MB/s "
                      f"download, {p['disk_mb_s']:.0f} MB/s disk: download {p['download_s'] / 60:.1f} min overlapping "
                      f"processing {q['processing_s'] / 60:.1f} min, then train finishing "
                      f"{q['train_finishing_s'] / 60:.1f} min: about {q['total_s'] / 60:.0f} min")


if __name__ == "__main__":
    main()
