"""The shard writer: source rows -> processed images -> deterministic, resumable WebDataset tar shards.

The plan (`plan_split`): per split, a generator seeded with (seed, split) permutes the source's rows
(numbered in file order, files in name order; counts from the parquet footers), and the permuted
order is cut into shards of `shard_size`. So every shard mixes classes even when the files are sorted
by class. `--limit N` first picks whole units (parquet row groups; single items of a listed source)
in a seeded random order until N rows are covered, so a trial reads only those row groups.

One sequential pass: the source's parts (parquet files) stream by in row order; workers process the
rows (ordered, so nothing depends on `workers`); each processed sample (its tar members, written here
as deterministic ustar headers + payload + padding) is appended to its shard's partial file in
`.build/parts/`. After each part, the partial files are synced and `.build/{split}.log.json` records
how many parts are done and every partial file's length: a rerun after any kill truncates the partial
files to those lengths and continues with the next part. A shard whose last row has arrived is put in
order, written under a temporary name, renamed into place, and then its sidecar
`.build/{split}-NNNNNN.json` (sha256, size, counts, skips, exact pixel sums of the shard's images in
the statistics sample, prep/stats.py) marks it done. `stats.json` and `_info.json` come last, from the
sidecars alone.

Hub files are downloaded into `.build/download/`, at most `prefetch` files at a time (the next ones
download while the current one is processed), checked against the listing (prep/fetch.py), and
deleted once read. Trial builds (`--limit`) read their row groups by ranged reads instead. The folder
is ours only if `.build/options.json` says so: a non-empty folder without it is refused, and the build
deletes only what it made inside `.build/`. An exclusive lock on `.build/lock` keeps a second build out
of the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import struct
import tarfile
import tempfile
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from prep.contract import INFO_NAME, SCHEMA_VERSION, SPLITS, STATS_NAME, IMAGE_SIZE, shard_name
from prep.fetch import FetchError
from prep.image import SkipImage, pillow_flavour, process
from prep.source import HUB_ID, Source, distinct_key, open_source, parquet_rows
from prep.stats import PixelSums, sample_every
from prep.synthetic import MAX_PER_CLASS

DEFAULT_SHARD_SIZE = 1000  # about 30 MB of 256 px q90 JPEGs; 1,282 train shards for ImageNet-1k
MAX_SHARD_SIZE = 100_000  # a shard is put in order in memory when it completes: 2-3 GB at this size
DEFAULT_PREFETCH = 3  # parquet files on disk at once for a Hub build (the one being read + downloads)
BUILD_DIR = ".build"  # resume bookkeeping inside the output folder; everything in it is the build's own
OPTIONS_NAME = "options.json"
LOCK_NAME = "lock"
PARTS_DIR = "parts"  # .build/parts/{split}-NNNNNN.part: samples of unfinished shards, in arrival order
TMP_DIR = "tmp"  # .build/tmp: temporary names of files on their way to their final names
DOWNLOAD_DIR = "download"  # .build/download/NNNNN/: parquet files being downloaded or read
_KEEP = (".gitkeep",)  # files a fresh --out may already hold (the repo's shards/ has one)
_CHUNK = 8  # rows per worker task: amortises IPC without starving workers at the end of a split
_BLOCK = 512  # tar block
_RECORD = 20 * _BLOCK  # tar files are padded to a multiple of this, as tarfile and GNU tar do
_PART_HEAD = struct.Struct("<qqII")  # partial-file record: row, label, meta length, member bytes length


class BuildError(Exception):
    """A build that cannot go ahead as asked (bad options, a folder that is not ours, a held lock)."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the shards (workers, prefetch and progress do not)."""

    source: str = HUB_ID
    splits: tuple[str, ...] = SPLITS
    limit: int | None = None  # at most this many inputs per split: whole units in a seeded order
    shard_size: int = DEFAULT_SHARD_SIZE  # inputs per shard (a shard holds fewer if some are skipped)
    seed: int = 0
    quality: int = 90  # JPEG quality of the 256 px images
    per_class: Mapping[str, int] | None = None  # synthetic source only: images per class, per split
    stats_every: int | None = None  # statistics from every k-th train image; None: stats.sample_every

    def __post_init__(self):
        # Normalised (splits and per_class in SPLITS order) so that equal builds compare and serialise equal.
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise BuildError(f"splits must be among {', '.join(SPLITS)}, got {', '.join(self.splits) or 'none'}")
        splits = tuple(s for s in SPLITS if s in self.splits)
        object.__setattr__(self, "splits", splits)
        if self.per_class is not None:
            counts = self.per_class.values()
            if set(self.per_class) - set(splits) or not all(isinstance(n, int) and 1 <= n <= MAX_PER_CLASS
                                                            for n in counts):
                raise BuildError(f"per_class must map splits among {', '.join(splits)} to counts in "
                                 f"1..{MAX_PER_CLASS}, got {dict(self.per_class)}")
            object.__setattr__(self, "per_class", {s: self.per_class[s] for s in splits if s in self.per_class})
        for name, low, high in (("limit", 1, None), ("shard_size", 1, MAX_SHARD_SIZE), ("seed", 0, None),
                                ("quality", 1, 100), ("stats_every", 1, None)):
            value = getattr(self, name)
            if name in ("limit", "stats_every") and value is None:
                continue
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                allowed = f"in {low}..{high}" if high is not None else f">= {low}"
                raise BuildError(f"{name} must be an integer {allowed}, got {value!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["splits"] = list(self.splits)
        d["per_class"] = dict(self.per_class) if self.per_class is not None else None
        return d


@dataclass(frozen=True)
class SplitPlan:
    """Which source rows a split's shards hold, in written order, and which units must be read."""

    split: str
    rows: np.ndarray  # (n,) int64 source rows in written order; shard k is rows[k * shard_size:][:shard_size]
    units: np.ndarray  # (u,) int64 rows per unit (row group or item), in row order
    read: np.ndarray  # (u,) bool: units holding kept rows (the only ones a build reads)
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.rows) // self.shard_size)

    def shard(self, k: int) -> np.ndarray:
        return self.rows[k * self.shard_size:(k + 1) * self.shard_size]

    def filename(self, k: int) -> str:
        return shard_name(self.split, k)


def plan_split(units: int | Sequence[int], split: str, seed: int, shard_size: int, limit: int | None) -> SplitPlan:
    """The seeded plan of a split of `units` (rows per unit, or a row count: one row per unit).

    All rows, or with `limit` whole units in a seeded random order until `limit` rows are covered
    (the last one cut short); then the kept rows are permuted and cut into shards.
    """
    units = np.ones(units, np.int64) if isinstance(units, int) else np.asarray(units, np.int64)
    total = int(units.sum())
    starts = np.cumsum(units) - units
    read = np.ones(len(units), bool)
    if limit is None or limit >= total:
        kept = np.arange(total, dtype=np.int64)
    else:
        pick = np.random.default_rng([seed, zlib.crc32(split.encode()), 1]).permutation(len(units))
        take = int(np.searchsorted(np.cumsum(units[pick]), limit)) + 1
        kept = np.concatenate([np.arange(starts[u], starts[u] + units[u]) for u in pick[:take]])[:limit]
        read[:] = False
        read[pick[:take]] = True
        kept = np.sort(kept)
    order = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(len(kept))
    return SplitPlan(split, kept[order], units, read, shard_size)


@dataclass(frozen=True)
class _Task:
    """One row for a worker: its bytes (parquet) or None (a listed source's worker reads them)."""

    row: int
    key: str
    label: int
    data: bytes | None
    skip: str | None
    sums: bool  # in the statistics sample: the worker also sums the written JPEG's decoded pixels


@dataclass(frozen=True)
class _Sample:
    """What a worker sends back for one row: its tar members, or the reason it was skipped."""

    row: int
    key: str
    label: int
    members: bytes = b""  # the sample's tar members (headers, payloads, padding), contract.FIELDS order
    sums: PixelSums | None = None  # train images in the statistics sample only
    skipped: str | None = None


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pool workers inherit it through fork, so the source is never pickled."""

    source: Source
    quality: int


_WORKER_JOB: _Job | None = None  # a pool worker's job, set once by _init_worker in each worker process


def _init_worker(job: _Job, pool_worker: bool = True) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    if pool_worker:
        # Ctrl-C reaches the whole process group; the parent handles it (and stops the pool), so the
        # workers need not each print a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_chunk(split: str, tasks: list[_Task]) -> list[_Sample]:
    return [_process_one(_WORKER_JOB, split, t) for t in tasks]


def tar_header(name: str, size: int) -> bytes:
    """A ustar header that depends only on name and size (mode 644, no time or owner): tarfile's bytes."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():  # needs a pax record: let tarfile write it
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
        info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(_BLOCK)
    h[0:len(encoded)] = encoded
    h[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    h[124:136] = b"%011o\x00" % size
    h[136:148] = b"00000000000\x00"  # mtime 0
    h[148:157] = b"        0"  # checksum placeholder (8 spaces), type regular file
    h[257:265] = b"ustar\x0000"  # uname, gname, devmajor, devminor, prefix: all NUL
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


def _members(key: str, fields: Sequence[tuple[str, bytes]]) -> bytes:
    out = []
    for ext, payload in fields:
        out += [tar_header(f"{key}.{ext}", len(payload)), payload, bytes(-len(payload) % _BLOCK)]
    return b"".join(out)


def _process_one(job: _Job, split: str, task: _Task) -> _Sample:
    """Read (listed sources) and process one row -> _Sample."""
    if task.skip is not None:
        return _Sample(task.row, task.key, task.label, skipped=task.skip)
    try:
        data = task.data if task.data is not None else job.source.read(split, task.row)
        p = process(data, size=IMAGE_SIZE, quality=job.quality, sums=task.sums)
    except SkipImage as e:
        return _Sample(task.row, task.key, task.label, skipped=str(e))
    except OSError as e:  # a file the source lists but cannot read
        return _Sample(task.row, task.key, task.label, skipped=f"unreadable input: {type(e).__name__}: {e}")
    cls = job.source.classes[task.label]
    meta = {"key": task.key, "label": task.label, "wnid": cls.wnid, "width": p.width, "height": p.height,
            "mode": p.mode, "format": p.format}
    fields = (("jpg", p.jpeg), ("cls", str(task.label).encode("ascii")),
              ("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")))
    return _Sample(task.row, task.key, task.label, _members(task.key, fields), p.sums)


def _part_record(s: _Sample) -> bytes:
    meta = {"key": s.key}
    if s.skipped is not None:
        meta["skip"] = s.skipped
    if s.sums is not None:
        meta["sums"] = s.sums.to_json()
    encoded = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _PART_HEAD.pack(s.row, s.label, len(encoded), len(s.members)) + encoded + s.members


def _read_part_records(data: bytes) -> Iterator[tuple[int, int, dict, bytes]]:
    pos = 0
    while pos < len(data):
        row, label, n_meta, n_members = _PART_HEAD.unpack_from(data, pos)
        pos += _PART_HEAD.size
        meta = json.loads(data[pos:pos + n_meta])
        pos += n_meta
        yield row, label, meta, data[pos:pos + n_members]
        pos += n_members


# --- the output folder: ours or refused, locked, temporaries only inside .build ---------------------

@contextlib.contextmanager
def _final(out: Path, name: str, mode: str = "wb") -> Iterator:
    """Write `out/name` through a temporary file in `out/.build/tmp`, fsync, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f"{Path(name).name}.", dir=out / BUILD_DIR / TMP_DIR)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; shards are for reading by anyone
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_json(out: Path, name: str, obj) -> None:
    """Indented, key-sorted JSON (same object, same bytes) under `out/name`, atomically."""
    with _final(out, name, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _claim_folder(out: Path, record: dict) -> int:
    """Make `out` this build's folder (or check it is), take its lock; return the lock's file descriptor."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: not a folder")
    build_dir = out / BUILD_DIR
    options = build_dir / OPTIONS_NAME
    if out.is_dir() and not options.is_file():
        # Not (yet) ours: only an empty folder, or one a killed build left with nothing but its lock.
        foreign = [p.name for p in out.iterdir() if p.name not in (BUILD_DIR, *_KEEP)]
        if build_dir.is_dir():
            foreign += [f"{BUILD_DIR}/{p.name}" for p in build_dir.iterdir() if p.name not in (LOCK_NAME, TMP_DIR)]
        if foreign:
            raise BuildError(f"--out {out} holds files that no alexprep build made here (e.g. {sorted(foreign)[0]}); "
                             f"use an empty or new folder")
    (build_dir / TMP_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BuildError(f"--out {out}: another build is writing this folder (it holds {BUILD_DIR}/{LOCK_NAME}); "
                         f"wait for it to end, or use another --out") from None
    try:
        _clear(build_dir / TMP_DIR)  # temporaries of a killed run: ours, in our folder
        if options.is_file():
            try:
                previous = json.loads(options.read_text(encoding="utf-8"))
                _differences(previous, record)
            except (ValueError, AttributeError, TypeError) as e:
                raise BuildError(f"{options}: unreadable build record ({type(e).__name__}); this folder cannot be "
                                 f"resumed: use another --out") from None
            if previous != record:
                raise BuildError(f"--out {out} already holds shards built differently "
                                 f"({_differences(previous, record)}); use another --out or empty it")
        else:
            _write_json(out, f"{BUILD_DIR}/{OPTIONS_NAME}", record)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, links and `..` followed (neither need exist yet)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _clear(folder: Path) -> None:
    """Delete everything inside `folder` (one of the build's own folders in .build)."""
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _differences(old: dict, new: dict) -> str:
    """What differs between two options.json records, e.g. "seed: 0 -> 1; train inputs: changed"."""
    def flat(record: dict) -> dict:
        return {**record.get("options", {}), "pillow": record.get("pillow"),
                **{f"{split} inputs": digest for split, digest in record.get("inputs", {}).items()}}

    def shown(record: dict, k: str) -> str:
        return repr(record[k]) if k in record else "not recorded"  # e.g. an option newer than the folder

    a, b = flat(old), flat(new)
    return "; ".join(f"{k}: changed" if k.endswith(" inputs") else f"{k}: {shown(a, k)} -> {shown(b, k)}"
                     for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k])


def _sidecar_name(split: str, k: int) -> str:
    return f"{BUILD_DIR}/{split}-{k:06d}.json"


def _sidecar_path(out: Path, split: str, k: int) -> Path:
    return out / _sidecar_name(split, k)


def _finished(out: Path, split: str, k: int) -> dict | None:
    """The shard's sidecar if the shard is complete (sidecar present, tar of the recorded size), else None."""
    try:
        record = json.loads(_sidecar_path(out, split, k).read_text(encoding="utf-8"))
        return record if (out / shard_name(split, k)).stat().st_size == record["size"] else None
    except (OSError, ValueError, KeyError):
        return None


# --- one split: stream the parts, append samples to partial shards, commit, finish shards -----------

class _Downloads:
    """Whole Hub files, downloaded in daemon threads at most `depth` at a time, taken in order."""

    def __init__(self, store, parts: list, folder: Path, depth: int, keep: Path | None):
        self._store, self._folder, self._depth, self._keep = store, folder, depth, keep
        self._todo = deque(enumerate(parts))
        self._running: deque = deque()

    def _top_up(self) -> None:
        while self._todo and len(self._running) < self._depth:
            n, part = self._todo.popleft()
            result: dict = {}
            folder = self._folder / f"{n:05d}"

            def fetch(part=part, folder=folder, result=result):
                try:
                    result["path"] = self._store.download(part.name, folder)
                except BaseException as e:  # handed to the main thread by take()
                    result["error"] = e

            thread = threading.Thread(target=fetch, daemon=True)
            thread.start()
            self._running.append((folder, thread, result))

    def take(self) -> tuple[Path, Path]:
        """(the next part's staging folder, its downloaded file); call release(folder) when read."""
        self._top_up()
        folder, thread, result = self._running[0]
        thread.join()
        if "error" in result:
            raise result["error"]
        return folder, result["path"]

    def release(self, folder: Path, path: Path, name: str) -> None:
        self._running.popleft()
        if self._keep is not None:
            (self._keep / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, self._keep / name)
        shutil.rmtree(folder)
        self._top_up()


class _SplitBuild:
    """The state of one split's build: plan, partial files, commit log, finished shards."""

    def __init__(self, out: Path, source: Source, plan: SplitPlan, records: list, stats_every: int):
        self.out, self.source, self.plan, self.records = out, source, plan, records
        self.stats_every = stats_every if plan.split == "train" else 0  # 0: no statistics
        self.split = source.split(plan.split)
        self.parts_dir = out / BUILD_DIR / PARTS_DIR
        self.log_name = f"{plan.split}.log.json"
        self.keys_path = out / BUILD_DIR / f"{plan.split}.keys"  # parquet sources: keys so far, one a line
        # Row -> place in written order (-1: not kept); part and shard of every kept row.
        total = int(plan.units.sum())
        self.place = np.full(total, -1, np.int64)
        self.place[plan.rows] = np.arange(len(plan.rows))
        part_rows = [p.num_rows for p in self.split.parts]
        self.part_start = np.cumsum(part_rows) - part_rows
        unit_counts = [len(p.units) for p in self.split.parts]
        self.part_unit_start = np.cumsum(unit_counts) - unit_counts
        # Parts holding kept rows, in row order; a shard is complete after the last part holding its rows.
        self.needed = [i for i in range(len(part_rows))
                       if plan.read[self.part_unit_start[i]:self.part_unit_start[i] + unit_counts[i]].any()]
        position = np.full(len(part_rows), -1, np.int64)  # part index -> its number among the needed parts
        position[self.needed] = np.arange(len(self.needed))
        self.needed_of_row = needed_of_row = position[np.searchsorted(self.part_start, plan.rows, side="right") - 1]
        padded = np.full(plan.num_shards * plan.shard_size, -1, np.int64)
        padded[:len(needed_of_row)] = needed_of_row
        self.shard_last = padded.reshape(plan.num_shards, plan.shard_size).max(axis=1)

    def finished_row(self, row: int) -> bool:
        """Whether the shard of (kept) `row` is already complete, so the row needs no processing."""
        return self.records[int(self.place[row]) // self.plan.shard_size] is not None

    def sampled_row(self, row: int) -> bool:
        """Whether (kept) `row` is in the statistics sample: every k-th place in written order."""
        return self.stats_every > 0 and int(self.place[row]) % self.stats_every == 0

    def part_path(self, k: int) -> Path:
        return self.parts_dir / f"{self.plan.split}-{k:06d}.part"

    def resume(self) -> tuple[int, set[str] | None]:
        """Truncate partial files to the committed log, finish complete shards; return (parts done, keys seen)."""
        self.parts_dir.mkdir(exist_ok=True)
        log_path = self.out / BUILD_DIR / self.log_name
        try:
            state = json.loads(log_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {"parts_done": 0, "lengths": {}, "keys": 0}
        except ValueError:
            raise BuildError(f"{log_path}: unreadable build record; this folder cannot be resumed: "
                             f"use another --out") from None
        self.done, self.lengths = state["parts_done"], {int(k): v for k, v in state["lengths"].items()}
        mine = {self.part_path(k).name for k in range(self.plan.num_shards)}
        for p in self.parts_dir.glob(f"{self.plan.split}-*.part"):
            if p.name not in mine:
                p.unlink()
        unfinished = [k for k in range(self.plan.num_shards) if self.records[k] is None]
        sizes = {k: self.part_path(k).stat().st_size if self.part_path(k).exists() else 0 for k in unfinished}
        if any(sizes[k] < self.lengths.get(k, 0) or (self.shard_last[k] < self.done and not sizes[k])
               for k in unfinished):
            # A partial file lost or cut short (or a finished shard damaged since): read the split again;
            # the shards that are still complete are kept and not processed again.
            self.done, self.lengths, state["keys"] = 0, {}, 0
        for k in range(self.plan.num_shards):
            path = self.part_path(k)
            length = self.lengths.get(k, 0) if self.records[k] is None else 0
            if length == 0:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, length)
        seen = None
        if self.split.items is None:  # parquet keys come from the rows: remember them to find duplicates
            with open(self.keys_path, "a+b") as f:
                f.truncate(state["keys"])
                f.seek(0)
                seen = set(f.read().decode("utf-8").splitlines())
        for k in range(self.plan.num_shards):
            if self.records[k] is None and self.shard_last[k] < self.done:
                self.finish(k)
        return self.done, seen

    def commit(self, j: int, buffers: dict[int, list[bytes]], keys: list[str]) -> None:
        """Part `j` (of the needed parts) is processed: append, sync, log, then finish completed shards."""
        for k, chunks in sorted(buffers.items()):
            with open(self.part_path(k), "ab") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fdatasync(f.fileno())
                self.lengths[k] = f.tell()
        keys_length = 0
        if self.split.items is None:
            with open(self.keys_path, "ab") as f:
                f.write("".join(f"{key}\n" for key in keys).encode("utf-8"))
                f.flush()
                os.fdatasync(f.fileno())
                keys_length = f.tell()
        self.done = j + 1
        _write_json(self.out, f"{BUILD_DIR}/{self.log_name}",
                    {"parts_done": self.done, "keys": keys_length,
                     "lengths": {str(k): n for k, n in sorted(self.lengths.items()) if self.records[k] is None}})
        for k in np.flatnonzero(self.shard_last == j):
            if self.records[k] is None:
                self.finish(int(k))

    def close(self) -> None:
        """Once every shard is finished, the split's log and key list have served: remove them."""
        if all(r is not None for r in self.records):
            (self.out / BUILD_DIR / self.log_name).unlink(missing_ok=True)
            self.keys_path.unlink(missing_ok=True)

    def finish(self, k: int) -> None:
        """Put shard k's samples in their planned order, write the tar and then its sidecar."""
        path = self.part_path(k)
        expected = self.plan.shard(k)
        records = sorted(_read_part_records(path.read_bytes()) if path.exists() else [],
                         key=lambda r: self.place[r[0]])
        if [r[0] for r in records] != expected.tolist():  # the plan's rows are in written order
            raise BuildError(f"{path}: holds other samples than shard {k} needs; this folder cannot be resumed: "
                             f"use another --out")
        skipped, class_counts = [], {}
        sums = PixelSums() if self.plan.split == "train" else None
        sha, size = hashlib.sha256(), 0
        name = self.plan.filename(k)
        with _final(self.out, name) as f:
            for _, label, meta, members in records:
                if "skip" in meta:
                    skipped.append({"key": meta["key"], "reason": meta["skip"]})
                    continue
                class_counts[label] = class_counts.get(label, 0) + 1
                if "sums" in meta:
                    sums.add(PixelSums.from_json(meta["sums"]))
                f.write(members)
                sha.update(members)
                size += len(members)
            end = bytes(2 * _BLOCK + (-(size + 2 * _BLOCK) % _RECORD))  # end-of-archive blocks + padding
            f.write(end)
            sha.update(end)
            size += len(end)
        record = {"filename": name, "num_inputs": len(expected), "num_samples": sum(class_counts.values()),
                  "class_counts": {str(label): n for label, n in sorted(class_counts.items())},
                  "sha256": sha.hexdigest(), "size": size, "skipped": skipped,
                  "sums": sums.to_json() if sums is not None else None}
        _write_json(self.out, _sidecar_name(self.plan.split, k), record)
        path.unlink(missing_ok=True)
        self.records[k] = record


def _tasks(build: _SplitBuild, parts: list[int], downloads: _Downloads | None, seen: set[str] | None,
           stats: dict) -> Iterator[tuple[str, object]]:
    """("chunk", [_Task]) for the kept rows of `parts` (indices into build.needed), then ("end", j) per part."""
    split, plan, source = build.split, build.plan, build.source
    store = source.store
    for j in parts:
        i = build.needed[j]
        part = split.parts[i]
        first_unit = build.part_unit_start[i]
        units = [u for u in range(len(part.units)) if plan.read[first_unit + u]]
        keys: list[str] = []
        tasks: list[_Task] = []
        if split.items is not None:
            for r in range(int(build.part_start[i]), int(build.part_start[i]) + part.num_rows):
                if build.place[r] >= 0 and not build.finished_row(r):
                    tasks.append(_Task(r, split.items[r].key, split.items[r].label, None, None, build.sampled_row(r)))
                    if len(tasks) == _CHUNK:
                        yield "chunk", tasks
                        tasks = []
        else:
            staged = None
            if downloads is not None:
                staged = downloads.take()
                pf = _parquet_file(staged[1], store.where(part.name))
            else:
                pf = store.parquet(part.name)
            unit_first_row = np.cumsum(part.units) - part.units
            for u in units:
                table = _read_group(pf, u, part.units[u], store.where(part.name))
                if downloads is None:
                    meta = pf.metadata.row_group(u)
                    stats["bytes"] += sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
                first = int(build.part_start[i] + unit_first_row[u])
                for n, row in enumerate(parquet_rows(table, plan.split, first, len(source.classes))):
                    r = first + n
                    if build.place[r] < 0:
                        continue
                    key = distinct_key(row, r, seen)
                    keys.append(key)
                    if build.finished_row(r):
                        continue
                    tasks.append(_Task(r, key, row.label, row.data, row.skip, build.sampled_row(r)))
                    if len(tasks) == _CHUNK:
                        yield "chunk", tasks
                        tasks = []
            pf.close()
            if staged is not None:
                stats["bytes"] += part.size
                downloads.release(staged[0], staged[1], part.name)
        if tasks:
            yield "chunk", tasks
        yield "end", (j, keys)


def _read_group(pf, group: int, rows: int, where: str):
    """Row group `group` (of `rows` rows, as the footer read at open says) of parquet file `where` as a
    table; FetchError (one line naming the file) if it cannot be fetched or read, or holds other rows."""
    try:
        table = pf.read_row_group(group, columns=["image", "label"])
    except FetchError:  # the network's doing (prep.fetch retried it already)
        raise
    except Exception as e:
        raise FetchError(f"{where}: not a readable parquet file ({_line(e)}); the build stopped "
                         f"(finished shards are complete)") from None
    if table.num_rows != rows:
        raise FetchError(f"{where}: row group {group} holds {table.num_rows} rows where the footer read when the "
                         f"build started says {rows}; the build stopped (finished shards are complete)")
    return table


def _parquet_file(path: Path, where: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FetchError(f"{where}: not a readable parquet file ({_line(e)}); the build stopped "
                         f"(finished shards are complete)") from None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _ordered(pool, split: str, items: Iterator[tuple[str, object]], window: int) -> Iterator[tuple[str, object]]:
    """Process the chunks in `items` (in the pool, at most `window` in flight), yielding results in order."""
    if pool is None:
        for kind, value in items:
            yield (kind, [_process_one(_WORKER_JOB, split, t) for t in value]) if kind == "chunk" else (kind, value)
        return
    pending: deque = deque()
    try:
        for kind, value in items:
            pending.append((kind, pool.apply_async(_pool_chunk, (split, value)) if kind == "chunk" else value))
            while len(pending) > window:
                kind, value = pending.popleft()
                yield kind, value.get() if kind == "chunk" else value
    except Exception:
        # Reading failed (a file that cannot be fetched or read): first hand over what was read before
        # it, so the parts read in full are committed and a rerun continues after them.
        while pending:
            kind, value = pending.popleft()
            yield kind, value.get() if kind == "chunk" else value
        raise
    while pending:
        kind, value = pending.popleft()
        yield kind, value.get() if kind == "chunk" else value


def _build_splits(out: Path, source: Source, plans: dict[str, SplitPlan], records: dict[str, list], pool,
                  workers: int, progress: bool, prefetch: int, keep_download: Path | None, stats_every: int) -> None:
    """Stream every split's remaining parts into its shards, filling in `records` (sidecars) as shards finish.

    Whole files of a Hub source are downloaded ahead across the splits, so the next split's first
    files are ready when the last shards of the previous one are being finished.
    """
    builds = [_SplitBuild(out, source, plans[split], records[split], stats_every) for split in plans]
    resumed = [build.resume() for build in builds]
    store = source.store
    whole = [store is not None and store.remote and build.plan.read.all() for build in builds]
    parts = [build.split.parts[build.needed[j]] for build, (done, _), w in zip(builds, resumed, whole) if w
             for j in range(done, len(build.needed))]
    downloads = None
    if parts:
        (out / BUILD_DIR / DOWNLOAD_DIR).mkdir(exist_ok=True)
        downloads = _Downloads(store, parts, out / BUILD_DIR / DOWNLOAD_DIR, prefetch, keep_download)
    for build, (done, seen), w in zip(builds, resumed, whole):
        todo = list(range(done, len(build.needed)))
        if todo:
            _stream(build, todo, seen, pool, workers, progress, downloads if w else None)
        build.close()


def _stream(build: _SplitBuild, todo: list[int], seen: set[str] | None, pool, workers: int, progress: bool,
            downloads: _Downloads | None) -> None:
    """Read the needed parts `todo` in order, process their rows, commit after each part."""
    plan, records = build.plan, build.records
    done = todo[0]
    stats = {"bytes": 0}
    start = time.monotonic()
    finished = np.array([r is not None for r in records]).repeat(plan.shard_size)[:len(plan.rows)]
    in_done = build.needed_of_row < done
    initial = int((finished | in_done).sum())
    with tqdm(total=len(plan.rows), initial=initial, desc=plan.split, unit="img", disable=not progress,
              smoothing=0.1) as bar:
        buffers: dict[int, list[bytes]] = {}
        for kind, value in _ordered(pool, plan.split, _tasks(build, todo, downloads, seen, stats), 4 * workers):
            if kind == "end":
                j, keys = value
                build.commit(j, buffers, keys)
                buffers = {}
                continue
            for sample in value:
                k = int(build.place[sample.row]) // plan.shard_size
                buffers.setdefault(k, []).append(_part_record(sample))
            bar.update(len(value))
            if progress:
                bar.set_postfix_str(f"{stats['bytes'] / 1e6 / max(time.monotonic() - start, 1e-9):.1f} MB/s source",
                                    refresh=False)


def _split_info(split: str, records: list[dict], num_classes: int) -> dict:
    """The `_info.json` entry of one split, from its shards' sidecars in shard order."""
    class_counts = [0] * num_classes
    for r in records:
        for label, n in r["class_counts"].items():
            class_counts[int(label)] += n
    return {
        "name": split,
        "filenames": [r["filename"] for r in records],
        "shard_lengths": [r["num_samples"] for r in records],
        "num_samples": sum(r["num_samples"] for r in records),
        "num_inputs": sum(r["num_inputs"] for r in records),
        "shards": [{k: r[k] for k in ("filename", "num_samples", "sha256", "size")} for r in records],
        "skipped": [s for r in records for s in r["skipped"]],
        "class_counts": class_counts,  # samples written per class index
    }


def build(out: str | os.PathLike, config: BuildConfig, workers: int | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None, prefetch: int = DEFAULT_PREFETCH,
          keep_download: str | os.PathLike | None = None) -> dict:
    """Build (or finish building) the shard folder `out` as `config` says; return the `_info.json` content.

    The source is opened (files listed, footers read) before anything is written, so a source that
    cannot be read, or an `out` inside the folders a local source lists its inputs from, leaves no
    trace. `workers` processes (default: all CPUs) decode and encode; `prefetch` parquet files of a
    Hub build may be on disk at once; `keep_download` (outside `out`) receives each downloaded file
    instead of its deletion; `progress` shows a tqdm bar per split; `log` receives a few
    human-readable lines.
    """
    log = log or (lambda line: None)
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    if prefetch < 1:
        raise BuildError(f"prefetch must be >= 1, got {prefetch}")
    if keep_download is not None and _inside(Path(keep_download), out):
        raise BuildError(f"--keep-download {keep_download}: inside --out {out}, which holds only the shards, "
                         f"{INFO_NAME}, {STATS_NAME} and the build's own {BUILD_DIR}/; choose a folder outside it")
    source = open_source(config.source, config.splits, config.per_class)
    for folder in source.input_dirs:
        if _inside(out, folder):  # its files would become inputs, and a rerun would find the inputs changed
            raise BuildError(f"--out {out}: inside {folder}, where the source's inputs are listed; "
                             f"choose a folder outside it")
    config = replace(config, source=source.identity)  # e.g. a local path, resolved
    flavour = pillow_flavour()
    plans = {split: plan_split([u for p in source.split(split).parts for u in p.units], split, config.seed,
                               config.shard_size, config.limit) for split in config.splits}
    stats_every = config.stats_every or (sample_every(len(plans["train"].rows)) if "train" in plans else 1)

    lock = _claim_folder(out, {"options": config.to_json(), "pillow": flavour, "inputs": source.digest()})
    try:
        log(f"source {source.identity}: " + ", ".join(
            f"{s} {source.split(s).num_rows} inputs, {len(plans[s].rows)} kept, {plans[s].num_shards} shards"
            for s in config.splits) + f"; {flavour}; {workers} workers"
            + (f"; pixel statistics from a seeded sample, 1 in {stats_every} train images" if stats_every > 1 else ""))
        records = {s: [_finished(out, s, k) for k in range(plans[s].num_shards)] for s in config.splits}
        staging = out / BUILD_DIR / DOWNLOAD_DIR
        if staging.is_dir():
            shutil.rmtree(staging)  # files a killed run was downloading: ours, and re-fetched as needed
        if any(r is None for rs in records.values() for r in rs):
            job = _Job(source, config.quality)
            pool = None
            if workers > 1:
                pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (job,))
            else:
                _init_worker(job, pool_worker=False)
            try:
                _build_splits(out, source, plans, records, pool, workers, progress, prefetch,
                              Path(keep_download) if keep_download is not None else None, stats_every)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
                if staging.is_dir():
                    shutil.rmtree(staging)
        parts_dir = out / BUILD_DIR / PARTS_DIR
        if parts_dir.is_dir() and not any(parts_dir.iterdir()):
            parts_dir.rmdir()

        summaries = {split: _split_info(split, records[split], len(source.classes)) for split in config.splits}
        if "train" in config.splits:
            sums = PixelSums()
            for record in records["train"]:
                sums.add(PixelSums.from_json(record["sums"]))
            if sums.num_pixels:
                _write_json(out, STATS_NAME, sums.stats(stats_every))
        # What decides the bytes (options, Pillow build, inputs), as .build/options.json has it: a rerun of
        # the same command on the finished folder can tell it is the same build.
        info = {"name": source.name, "schema_version": SCHEMA_VERSION, "splits": summaries,
                "classes": [c.to_json() for c in source.classes], "options": config.to_json(), "pillow": flavour,
                "inputs": source.digest()}
        _write_json(out, INFO_NAME, info)  # last: its presence means the folder is complete
        return info
    finally:
        os.close(lock)


def build_shards(out: str | os.PathLike, source: str = "synthetic", splits: tuple[str, ...] = SPLITS,
                 limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                 seed: int = 0, quality: int = 90, progress: bool = False,
                 per_class: int | Mapping[str, int] | None = None, prefetch: int = DEFAULT_PREFETCH,
                 keep_download: str | os.PathLike | None = None, stats_every: int | None = None) -> dict:
    """`build` with keyword options (the tests' entry point); returns the `_info.json` content."""
    if isinstance(per_class, int):
        per_class = {split: per_class for split in splits}
    config = BuildConfig(source=source, splits=tuple(splits), limit=limit, shard_size=shard_size, seed=seed,
                         quality=quality, per_class=per_class, stats_every=stats_every)
    return build(out, config, workers=workers, progress=progress, prefetch=prefetch, keep_download=keep_download)

