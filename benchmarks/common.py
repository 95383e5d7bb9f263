"""What the benchmarks share: the machine a number belongs to, the CPU time and memory of a process and
its workers (from /proc), a device sync, the photo-like test pictures (written once, built into shards
with alexprep, streamed through torch's DataLoader for comparison), and the stand-in Hub
(tests/hubstub.py) served from a process of its own for `alexprep` commands.

numpy, PIL and the project's modules are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parents[1]
ALEXPREP = str(Path(sys.executable).with_name("alexprep"))  # the console script installed beside this Python
# Sizes of typical ImageNet training photos (width, height); the mean ImageNet image is about 400 x 350.
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (400, 300), (333, 500), (500, 400))
QUICK_SIZES = ((200, 150), (150, 200))
PHOTO_QUALITY = 90  # JPEG quality of the test photos, as ImageNet's are about


def _first_value(path: str, prefix: str) -> str | None:
    """The value after ':' of the first line of `path` that starts with `prefix` (/proc files)."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def _command(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict:
    """The machine and software the numbers belong to, and how busy it was (no CUDA context is made)."""
    import PIL.features
    import torchvision

    from prep.image import pillow_flavour

    mem = _first_value("/proc/meminfo", "MemTotal")
    status = _command(["git", "status", "--porcelain"])
    return {
        "cpu": _first_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "gpu": _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": pillow_flavour(),
        "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
        "git_commit": _command(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(status) if status is not None else None,
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/PID/task/TID/children of each of its threads; [] if it has gone."""
    pids = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    for task in tasks:
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return sorted(pids)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (children, their children, ...)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += child_pids(p)
    return tree


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc/PID/stat (clock ticks); 0 if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": the comm may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15 of stat


def tree_cpu_s() -> tuple[float, float]:
    """CPU seconds used so far (by this process (all threads) and its children, by this process alone).
    The children still there (live or zombie) from /proc, those already waited for (a worker shut down
    early) from getrusage. The children are read first: one waited for in between would count twice,
    not never."""
    children = sum(process_cpu_s(pid) for pid in child_pids(os.getpid()))
    me, done = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main = me.ru_utime + me.ru_stime
    return children + main + done.ru_utime + done.ru_stime, main


class ProcessMemory(NamedTuple):
    """A process's memory in KiB (all 0 once it has gone, or is a zombie).

    RSS counts every resident page the process maps, also the shared library pages that other programs
    map too, and the pages a forked worker still shares with its parent. PSS splits each page among the
    processes that share it, so it adds up over a parent and its workers without counting twice; its
    anonymous part (heap, stacks, shared-memory batches) does not move when unrelated programs start or
    stop, as the file-backed part does."""

    rss_kib: int  # VmRSS
    pss_kib: int  # Pss of /proc/PID/smaps_rollup
    anon_pss_kib: int  # Pss_Anon + Pss_Shmem


def process_memory(pid: int | str) -> ProcessMemory:
    """`pid`'s memory now ("self": this process's)."""
    rss = _first_value(f"/proc/{pid}/status", "VmRSS:")
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split()[:2] for line in f if line.startswith(("Pss:", "Pss_Anon:", "Pss_Shmem:")))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ProcessMemory(0, 0, 0)
    if rss is None or not fields:  # gone, or a zombie (no VmRSS line, an empty smaps_rollup)
        return ProcessMemory(0, 0, 0)
    return ProcessMemory(int(rss.split()[0]), int(fields["Pss:"]), int(fields["Pss_Anon:"]) + int(fields["Pss_Shmem:"]))


def peak_rss_kib(pid: int | str = "self") -> int | None:
    """The largest RSS `pid` has had (VmHWM; writing 5 to /proc/PID/clear_refs sets it to the RSS now)."""
    value = _first_value(f"/proc/{pid}/status", "VmHWM:")
    return int(value.split()[0]) if value is not None else None


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def write_photo(task: tuple[Path, tuple[int, int], object]) -> None:
    """Write one photo-like JPEG: (path, (width, height), the seed of its numpy generator)."""
    import numpy as np
    from PIL import Image

    from prep.synthetic import photo

    path, (w, h), seed = task
    Image.fromarray(photo(np.random.default_rng(seed), w, h)).save(path, format="JPEG", quality=PHOTO_QUALITY)


def write_photos(tasks: list[tuple[Path, tuple[int, int], object]], workers: int) -> None:
    """`write_photo` for each task, in `workers` processes."""
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(write_photo, tasks, chunksize=8)
    else:
        for task in tasks:
            write_photo(task)


def write_photo_tree(root: Path, n: int, classes: int, *, seed: int = 0, workers: int = 1,
                     sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES) -> list[Path]:
    """Write n photo-like JPEGs as root/train/cNNN/NNNNNN.jpg (class i % classes, size drawn from
    `sizes`), deterministic for `seed`, with `workers` processes; return their paths, sorted."""
    import numpy as np

    picks = np.random.default_rng(seed).integers(len(sizes), size=n)
    tasks = []
    for i in range(n):
        folder = root / "train" / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{i:06d}.jpg", sizes[picks[i]], [seed, i]))
    write_photos(tasks, workers)
    return sorted(path for path, *_ in tasks)


def build_photo_shards(root: Path, out: Path, shard_size: int, workers: int):
    """Build root's train/ tree into shards under `out` with alexprep; return the train split's shards."""
    from prep.build import build_shards
    from train.stream import open_shards

    build_shards(out, source=str(root), splits=("train",), shard_size=shard_size, workers=workers)
    return open_shards(str(out), splits=("train",)).split("train")


class StreamDataset(IterableDataset):
    """A ShardStream as a torch IterableDataset decoded in DataLoader's workers: the transport alextrain
    used before train/loader.py's slots, measured beside them. Batches come as (images, labels)."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        from train.loader import decode_batch, reader_of

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader, too, takes batches from its workers in turn, worker 0 first.
        for batch in self.stream.batches(reader_of(worker, workers, self.stream), workers):
            yield tuple(decode_batch(batch))


def hub_env(hf_home: Path) -> dict[str, str]:
    """This process's environment for a command that uses the stand-in Hub: none of the caller's
    Hugging Face settings, `hf_home` (made here) as HF_HOME, the stand-in's token, no telemetry or
    progress bars. HF_ENDPOINT comes from `stand_in_hub`."""
    from tests.hubstub import DEFAULT_TOKEN

    hf_home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_HOME=str(hf_home), HF_TOKEN=DEFAULT_TOKEN, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


@contextlib.contextmanager
def stand_in_hub(repo: Path, bandwidth: float | None = None) -> Iterator[str]:
    """tests/hubstub.py serving the repo folder `repo` (tests.hubstub.make_imagenet_like_repo) from a
    process of its own, at most `bandwidth` bytes/s of file content over the whole server; yields its
    HF_ENDPOINT."""
    command = [sys.executable, "-m", "tests.hubstub", "--root", str(repo), "--port", "0"]
    if bandwidth is not None:
        command += ["--bandwidth", str(bandwidth)]
    stub = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        yield stub.stdout.readline().rsplit("HF_ENDPOINT=", 1)[1].strip()
    finally:
        stub.terminate()
        stub.wait()
        stub.stdout.close()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of each shard and of stats.json of a shard folder, by name: equal for byte-identical builds."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix == ".tar" or p.name == "stats.json"}
