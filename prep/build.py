"""The shard build: the seeded plan, partial shards and their journal, finishing; `build` runs it all.

The plan (`plan_split`): per split, a generator seeded with (seed, split) permutes the source's rows
(numbered in part order, counted from the parts' units, prep/source.py), and the permuted order is cut
into shards of `shard_size`. So every shard mixes classes even when the files are sorted by class.
`--limit N` first picks whole units (parquet row groups; single items of a listed source) in a seeded
random order until N rows are covered, so a trial reads only those row groups.

One sequential pass per split: the source hands over the kept rows part by part, the workers process
them in order (prep/workers.py: nothing depends on their number), and each sample (its tar members,
prep/tar_format.py) is appended to its shard's partial shard `.build/partial/{split}-NNNNNN.partial`,
entries in arrival order. After each part the partial shards are synced, and the split's journal
`.build/{split}.journal.json` records how many parts are done, every partial shard's length and how far
the split's key list `.build/{split}.keys` goes (keys a source made distinct, prep/parquet_source.py):
a rerun after any kill truncates the partial shards to those lengths and continues with the next part.
A shard is finished as soon as its last row is processed, by a worker (`finish_shard`) while the others
go on processing rows: its entries put in planned order (in memory: a worker holds one partial shard),
the tar written under a temporary name and renamed into place, then its sidecar
`.build/sidecars/{split}-NNNNNN.json` (sha256, size, counts, skips, exact pixel sums of its images in
the statistics sample, prep/stats.py) marks it done. `stats.json` and `_info.json` come last, from the
sidecars alone; then `.build/` goes, and the folder holds the contract alone (prep/out_folder.py).
Measured at ImageNet's file and shard counts: docs/benchmarks.md, "ImageNet rehearsal".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from prep import out_folder
from prep.contract import (INFO_NAME, SPLITS, STATS_NAME, ContractError, FolderInfo, ShardRecord, SkippedInput, SplitInfo,
                           atomic_write, read_info, shard_name, write_json)
from prep.errors import BuildError
from prep.image import pillow_flavour
from prep.open_source import HUB_ID, open_source
from prep.source import PartRequest, RowReader, Source, Staging
from prep.stats import PixelSums, sample_every
from prep.synthetic import MAX_PER_CLASS
from prep.tar_format import archive_end
from prep.workers import CHUNK, MAX_WORKERS, Chunk, Pending, Sample, Task, Workers

DEFAULT_SHARD_SIZE = 1000  # about 30 MB of 256 px q90 JPEGs; 1,282 train shards for ImageNet-1k
MAX_SHARD_SIZE = 100_000  # a finishing worker puts a shard in order in memory: 2-3 GB at this size
DEFAULT_PREFETCH = 3  # parquet files on disk at once for a Hub build (the one being read + downloads)
PARTIAL_DIR = "partial"  # .build/partial/{split}-NNNNNN.partial: entries of an unfinished shard, in arrival order
SIDECAR_DIR = "sidecars"  # .build/sidecars/{split}-NNNNNN.json: a finished shard's record
DOWNLOAD_DIR = "download"  # .build/download/: whole source files waiting to be read (prep/parquet_source.py)
_ENTRY_HEAD = struct.Struct("<qqII")  # a partial shard's entry: row, label, meta length, members length


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


# --- partial shards and finishing ------------------------------------------------------------------

@dataclass(frozen=True)
class Sidecar:
    """A finished shard as `_info.json` and `stats.json` need it; `.build/sidecars/` keeps it until the end."""

    filename: str
    num_inputs: int  # rows the plan put in the shard
    num_samples: int  # of them written (the others skipped)
    class_counts: dict[int, int]  # samples per class index
    sha256: str
    size: int  # bytes of the tar
    skipped: tuple[SkippedInput, ...] = ()  # in written order
    sums: PixelSums | None = None  # train: pixel sums of the shard's images in the statistics sample

    @property
    def record(self) -> ShardRecord:
        return ShardRecord(self.filename, self.num_samples, self.sha256, self.size)

    def to_json(self) -> dict:
        return {"filename": self.filename, "num_inputs": self.num_inputs, "num_samples": self.num_samples,
                "class_counts": {str(label): n for label, n in sorted(self.class_counts.items())},
                "sha256": self.sha256, "size": self.size, "skipped": [s.to_json() for s in self.skipped],
                "sums": self.sums.to_json() if self.sums is not None else None}

    @classmethod
    def from_json(cls, d: dict, source: str) -> Sidecar:
        """The sidecar read from `source`; KeyError, TypeError or ContractError where it is damaged."""
        skipped = tuple(SkippedInput.from_json(s, source, f"skipped input {i}") for i, s in enumerate(d["skipped"]))
        return cls(d["filename"], d["num_inputs"], d["num_samples"], {int(k): n for k, n in d["class_counts"].items()},
                   d["sha256"], d["size"], skipped, PixelSums.from_json(d["sums"]) if d["sums"] else None)


class _Entry(NamedTuple):
    """One sample in a partial shard."""

    row: int
    label: int
    meta: dict  # {"key"}, and "skip" (the reason) or "sums" (PixelSums.to_json)
    members: memoryview  # its tar members (empty for a skip)


def entry_bytes(s: Sample) -> bytes:
    """A processed row as its shard's partial shard holds it (an _Entry)."""
    meta = {"key": s.key}
    if s.skipped is not None:
        meta["skip"] = s.skipped
    if s.sums is not None:
        meta["sums"] = s.sums.to_json()
    encoded = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _ENTRY_HEAD.pack(s.row, s.label, len(encoded), len(s.members)) + encoded + s.members


def _entries(data: memoryview) -> Iterator[_Entry]:
    pos = 0
    while pos < len(data):
        row, label, n_meta, n_members = _ENTRY_HEAD.unpack_from(data, pos)
        pos += _ENTRY_HEAD.size
        meta = json.loads(bytes(data[pos:pos + n_meta]))
        pos += n_meta
        yield _Entry(row, label, meta, data[pos:pos + n_members])
        pos += n_members


@dataclass(frozen=True)
class FinishJob:
    """Everything a worker needs to finish one shard."""

    partial: Path
    shard: Path
    sidecar: Path
    rows: np.ndarray  # (n,) the shard's rows in written order (the plan's)
    sums: bool  # train: add up the entries' pixel sums


def finish_shard(job: FinishJob) -> Sidecar:
    """Put the partial shard's entries in planned order, write the tar (renamed into place), then the sidecar;
    the partial shard goes last. Memory: the partial shard, read whole (entries are views into it)."""
    data = memoryview(job.partial.read_bytes() if job.partial.exists() else b"")
    position = {row: i for i, row in enumerate(job.rows.tolist())}
    entries = sorted(_entries(data), key=lambda e: position.get(e.row, -1))
    if [e.row for e in entries] != job.rows.tolist():
        raise BuildError(f"{job.partial}: holds other samples than {job.shard.name} needs; this folder cannot be "
                         f"resumed: use another --out")
    skipped, class_counts = [], {}
    sums = PixelSums() if job.sums else None
    sha, size = hashlib.sha256(), 0
    with atomic_write(job.shard) as f:
        for e in entries:
            if "skip" in e.meta:
                skipped.append(SkippedInput(e.meta["key"], e.meta["skip"]))
                continue
            class_counts[e.label] = class_counts.get(e.label, 0) + 1
            if "sums" in e.meta:
                sums.add(PixelSums.from_json(e.meta["sums"]))
            f.write(e.members)
            sha.update(e.members)
            size += len(e.members)
        end = archive_end(size)
        f.write(end)
        sha.update(end)
        size += len(end)
    sidecar = Sidecar(job.shard.name, len(entries), sum(class_counts.values()), class_counts, sha.hexdigest(), size,
                      tuple(skipped), sums)
    write_json(job.sidecar, sidecar.to_json())
    job.partial.unlink(missing_ok=True)
    return sidecar


class KeyJournal:
    """A split's keys so far (prep.source.SeenKeys), and those added since the last part was committed."""

    def __init__(self, seen: set[str]):
        self._seen = seen
        self._new: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._seen

    def add(self, key: str) -> None:
        self._seen.add(key)
        self._new.append(key)

    def take_new(self) -> list[str]:
        new, self._new = self._new, []
        return new


@dataclass(frozen=True)
class _PartEnd:
    """Pipeline message: every row of needed part `index` has gone before; `keys` are those its rows got."""

    index: int
    keys: list[str]


class _SplitBuild:
    """The state of one split's build: plan, partial shards and their journal, finished shards."""

    def __init__(self, work: Path, out: Path, source: Source, plan: SplitPlan, sidecars: list[Sidecar | None],
                 stats_every: int, workers: Workers):
        self.work, self.out, self.source, self.plan, self.sidecars = work, out, source, plan, sidecars
        self.workers = workers
        self.stats_every = stats_every if plan.split == "train" else 0  # 0: no statistics
        self.journal_path = work / f"{plan.split}.journal.json"
        self.keys_path = work / f"{plan.split}.keys"
        self.finishing: dict[int, Pending[Sidecar]] = {}  # shard -> its finish_shard result, to come
        # Row -> place in written order (-1: not kept); part and shard of every kept row.
        total = int(plan.units.sum())
        self.place = np.full(total, -1, np.int64)
        self.place[plan.rows] = np.arange(len(plan.rows))
        parts = source.parts(plan.split)
        part_rows = [p.num_rows for p in parts]
        part_start = np.cumsum(part_rows) - part_rows
        unit_counts = [len(p.units) for p in parts]
        unit_start = np.cumsum(unit_counts) - unit_counts
        # Parts holding kept rows, in row order; a shard is complete after the last part holding its rows.
        self.needed = [i for i in range(len(parts)) if plan.read[unit_start[i]:unit_start[i] + unit_counts[i]].any()]
        position = np.full(len(parts), -1, np.int64)  # part index -> its number among the needed parts
        position[self.needed] = np.arange(len(self.needed))
        self.needed_of_row = position[np.searchsorted(part_start, plan.rows, side="right") - 1]
        padded = np.full(plan.num_shards * plan.shard_size, -1, np.int64)
        padded[:len(self.needed_of_row)] = self.needed_of_row
        self.shard_last = padded.reshape(plan.num_shards, plan.shard_size).max(axis=1)
        kept = np.sort(plan.rows)
        self._part_rows = np.split(kept, np.searchsorted(kept, part_start[1:]))  # kept rows of each part

    def request(self, j: int) -> PartRequest:
        """Needed part `j` as the source is asked for it."""
        i = self.needed[j]
        return PartRequest(self.plan.split, i, self._part_rows[i], bool(self.plan.read.all()))

    def finished_row(self, row: int) -> bool:
        """Whether the shard of (kept) `row` is already complete, so the row needs no processing."""
        return self.sidecars[int(self.place[row]) // self.plan.shard_size] is not None

    def sampled_row(self, row: int) -> bool:
        """Whether (kept) `row` is in the statistics sample: every k-th place in written order."""
        return self.stats_every > 0 and int(self.place[row]) % self.stats_every == 0

    def partial_path(self, k: int) -> Path:
        return self.work / PARTIAL_DIR / f"{self.plan.split}-{k:06d}.partial"

    def resume(self) -> None:
        """Truncate partial shards to the journal, finish complete shards; `done` and `keys` say where to go on."""
        (self.work / PARTIAL_DIR).mkdir(exist_ok=True)
        try:
            state = json.loads(self.journal_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {"parts_done": 0, "lengths": {}, "keys": 0}
        except ValueError:
            raise BuildError(f"{self.journal_path}: unreadable build record; this folder cannot be resumed: "
                             f"use another --out") from None
        self.done, self.lengths = state["parts_done"], {int(k): v for k, v in state["lengths"].items()}
        mine = {self.partial_path(k).name for k in range(self.plan.num_shards)}
        for p in (self.work / PARTIAL_DIR).glob(f"{self.plan.split}-*.partial"):
            if p.name not in mine:
                p.unlink()
        unfinished = [k for k in range(self.plan.num_shards) if self.sidecars[k] is None]
        sizes = {k: self.partial_path(k).stat().st_size if self.partial_path(k).exists() else 0 for k in unfinished}
        if any(sizes[k] < self.lengths.get(k, 0) or (self.shard_last[k] < self.done and not sizes[k])
               for k in unfinished):
            # A partial shard lost or cut short (or a finished shard damaged since): read the split again;
            # the shards that are still complete are kept and not processed again.
            self.done, self.lengths, state["keys"] = 0, {}, 0
        for k in range(self.plan.num_shards):
            path = self.partial_path(k)
            length = self.lengths.get(k, 0) if self.sidecars[k] is None else 0
            if length == 0:
                path.unlink(missing_ok=True)
            else:
                os.truncate(path, length)
        self.keys_length, seen = state["keys"], set()
        if self.keys_path.exists():
            with open(self.keys_path, "r+b") as f:
                f.truncate(self.keys_length)
                seen = set(f.read().decode("utf-8").splitlines())
        self.keys = KeyJournal(seen)
        # Rows each shard still waits for: those of the needed parts not done yet (positions in written order).
        self.waiting = np.bincount(np.flatnonzero(self.needed_of_row >= self.done) // self.plan.shard_size,
                                   minlength=self.plan.num_shards)
        for k in range(self.plan.num_shards):
            if self.sidecars[k] is None and self.waiting[k] == 0:
                self._finish(k)

    def messages(self, reader: RowReader) -> Iterator[Chunk | _PartEnd]:
        """The remaining needed parts' rows to process, in chunks, each part followed by its _PartEnd."""
        split = self.plan.split
        for j in range(self.done, len(self.needed)):
            tasks = []
            for row in reader.rows(self.request(j), self.keys):
                if self.finished_row(row.number):
                    continue
                tasks.append(Task(row.number, row.key, row.label, row.data, row.skip, self.sampled_row(row.number)))
                if len(tasks) == CHUNK:
                    yield Chunk(split, tasks)
                    tasks = []
            if tasks:
                yield Chunk(split, tasks)
            yield _PartEnd(j, self.keys.take_new())

    def arrived(self, sample: Sample, entries: dict[int, list[bytes]]) -> None:
        """Add a processed row to its shard's new entries; a shard whose last row this is goes to the workers
        to be finished at once (its entries synced first, as a commit would: the journal may count them)."""
        k = int(self.place[sample.row]) // self.plan.shard_size
        entries.setdefault(k, []).append(entry_bytes(sample))
        self.waiting[k] -= 1
        if self.waiting[k] == 0:
            self._append(k, entries.pop(k))
            self._finish(k)

    def _append(self, k: int, chunks: list[bytes]) -> None:
        with open(self.partial_path(k), "ab") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fdatasync(f.fileno())
            self.lengths[k] = f.tell()

    def commit(self, j: int, entries: dict[int, list[bytes]], keys: list[str]) -> None:
        """Needed part `j` is processed: append and sync the shards' new entries and the keys, then journal."""
        for k, chunks in sorted(entries.items()):
            self._append(k, chunks)
        if keys:
            with open(self.keys_path, "ab") as f:
                f.write("".join(f"{key}\n" for key in keys).encode("utf-8"))
                f.flush()
                os.fdatasync(f.fileno())
                self.keys_length = f.tell()
        self.done = j + 1
        write_json(self.journal_path, {"parts_done": self.done, "keys": self.keys_length, "lengths": {
            str(k): n for k, n in sorted(self.lengths.items()) if self.sidecars[k] is None}})
        self.collect(wait=False)

    def _finish(self, k: int) -> None:
        job = FinishJob(self.partial_path(k), self.out / self.plan.filename(k),
                        self.work / SIDECAR_DIR / f"{self.plan.split}-{k:06d}.json", self.plan.shard(k),
                        sums=self.stats_every > 0)
        self.finishing[k] = self.workers.submit(finish_shard, job)

    def collect(self, wait: bool) -> None:
        """Take the finished shards' sidecars (all of them, waiting, with `wait`); raise what a finishing raised."""
        for k, result in list(self.finishing.items()):
            if wait or result.ready():
                del self.finishing[k]
                self.sidecars[k] = result.get()



def _finished(work: Path, out: Path, split: str, k: int) -> Sidecar | None:
    """The shard's sidecar if the shard is complete (sidecar present, tar of the recorded size), else None."""
    path = work / SIDECAR_DIR / f"{split}-{k:06d}.json"
    try:
        sidecar = Sidecar.from_json(json.loads(path.read_text("utf-8")), str(path))
        return sidecar if (out / shard_name(split, k)).stat().st_size == sidecar.size else None
    except (OSError, ValueError, KeyError, TypeError, ContractError):
        return None


def _build_splits(work: Path, out: Path, source: Source, plans: dict[str, SplitPlan],
                  sidecars: dict[str, list[Sidecar | None]], workers: Workers, progress: bool, staging: Staging,
                  stats_every: int) -> None:
    """Stream every split's remaining parts into its shards, filling in `sidecars` as shards finish.

    One reader over all splits' parts, so a Hub source downloads the next split's first files while the
    last ones of the previous split are read, and the previous split's shards are finished.
    """
    builds = [_SplitBuild(work, out, source, plans[split], sidecars[split], stats_every, workers) for split in plans]
    try:
        for b in builds:
            b.resume()
        requests = [b.request(j) for b in builds for j in range(b.done, len(b.needed))]
        with source.reader(requests, staging) as reader:
            for b in builds:
                if b.done < len(b.needed):
                    _stream(b, reader, workers, progress)
        for b in builds:
            b.collect(wait=True)
    except Exception:
        # Stopped by a file that cannot be fetched or read, or a full disk: the shards being finished
        # are completed first (what they raise is not news), so a rerun has less to do.
        for b in builds:
            for result in b.finishing.values():
                try:
                    result.get()
                except Exception:
                    pass
        raise


def _stream(b: _SplitBuild, reader: RowReader, workers: Workers, progress: bool) -> None:
    """Read the split's remaining needed parts in order, process their rows, commit after each part."""
    plan = b.plan
    read_before, start = reader.bytes_read, time.monotonic()
    finished = np.array([s is not None for s in b.sidecars]).repeat(plan.shard_size)[:len(plan.rows)]
    initial = int((finished | (b.needed_of_row < b.done)).sum())
    with tqdm(total=len(plan.rows), initial=initial, desc=plan.split, unit="img", disable=not progress,
              smoothing=0.1) as bar:
        entries: dict[int, list[bytes]] = {}  # shard -> its new entries since the last commit (unfinished shards)
        for item in workers.ordered(b.messages(reader), 4 * workers.n):
            if isinstance(item, _PartEnd):
                b.commit(item.index, entries, item.keys)
                entries = {}
                continue
            for sample in item.samples:
                b.arrived(sample, entries)
            bar.update(len(item.samples))
            if progress:
                rate = (reader.bytes_read - read_before) / 1e6 / max(time.monotonic() - start, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} MB/s source", refresh=False)


def _split_info(split: str, sidecars: list[Sidecar], num_classes: int) -> SplitInfo:
    """The `_info.json` entry of one split, from its shards' sidecars in shard order."""
    class_counts = [0] * num_classes  # samples written per class index
    for s in sidecars:
        for label, n in s.class_counts.items():
            class_counts[label] += n
    return SplitInfo(name=split, filenames=tuple(s.filename for s in sidecars),
                     shard_lengths=tuple(s.num_samples for s in sidecars), num_samples=sum(s.num_samples for s in sidecars),
                     num_inputs=sum(s.num_inputs for s in sidecars), shards=tuple(s.record for s in sidecars),
                     skipped=tuple(item for s in sidecars for item in s.skipped), class_counts=tuple(class_counts))


class Built(NamedTuple):
    """What `build` did: the folder's `_info.json`, and whether this call wrote it (False: the folder was
    complete already)."""

    info: FolderInfo
    wrote: bool


def build(out: str | os.PathLike, config: BuildConfig, workers: int | None = None, progress: bool = False,
          log: Callable[[str], None] | None = None, prefetch: int = DEFAULT_PREFETCH,
          keep_download: str | os.PathLike | None = None) -> Built:
    """Build (or finish building) the shard folder `out` as `config` says.

    The source is opened (files listed, footers read) before anything is written, so a source that
    cannot be read, or an `out` inside the folders a local source lists its inputs from, leaves no
    trace; a folder that already holds this build is left as it is. `workers` processes (default: all
    CPUs, at most MAX_WORKERS) decode, encode and finish shards; `prefetch` parquet files of a Hub build
    may be on disk at once; `keep_download` (outside `out`) receives each downloaded file instead of its
    deletion; `progress` shows a tqdm bar per split; `log` receives a few human-readable lines.
    """
    log = log or (lambda line: None)
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    if not 1 <= workers <= MAX_WORKERS:
        raise BuildError(f"workers must be in 1..{MAX_WORKERS} (4 per core), got {workers}")
    if prefetch < 1:
        raise BuildError(f"prefetch must be >= 1, got {prefetch}")
    if keep_download is not None and out_folder.inside(Path(keep_download), out):
        raise BuildError(f"--keep-download {keep_download}: inside --out {out}, which holds only the shards, "
                         f"{INFO_NAME}, {STATS_NAME} and the build's own {out_folder.BUILD_DIR}/; choose a folder "
                         f"outside it")
    source = open_source(config.source, config.splits, config.per_class)
    for folder in source.input_dirs:
        if out_folder.inside(out, folder):  # its files would become inputs, and a rerun would find the inputs changed
            raise BuildError(f"--out {out}: inside {folder}, where the source's inputs are listed; "
                             f"choose a folder outside it")
    config = replace(config, source=source.identity)  # e.g. a local path, resolved
    flavour = pillow_flavour()
    plans = {split: plan_split([u for p in source.parts(split) for u in p.units], split, config.seed,
                               config.shard_size, config.limit) for split in config.splits}
    stats_every = config.stats_every or (sample_every(len(plans["train"].rows)) if "train" in plans else 1)
    record = out_folder.BuildRecord(config.to_json(), flavour, source.digest())

    claim = out_folder.claim(out, record)
    if claim is None:
        log(f"{out}: complete, as {INFO_NAME} records this very build; nothing written "
            f"(`alexprep verify {out}` checks every byte)")
        return Built(read_info(out), wrote=False)
    try:
        log(f"source {source.identity}: " + ", ".join(
            f"{s} {source.num_rows(s)} inputs, {len(plans[s].rows)} kept, {plans[s].num_shards} shards"
            for s in config.splits) + f"; {flavour}; {workers} workers"
            + (f"; pixel statistics from a seeded sample, 1 in {stats_every} train images" if stats_every > 1 else ""))
        claim.remove_temporaries([plans[s].filename(k) for s in plans for k in range(plans[s].num_shards)]
                                 + [INFO_NAME, STATS_NAME])
        work = claim.work
        (work / SIDECAR_DIR).mkdir(exist_ok=True)
        sidecars = {s: [_finished(work, out, s, k) for k in range(plans[s].num_shards)] for s in config.splits}
        staging = Staging(work / DOWNLOAD_DIR, prefetch, Path(keep_download) if keep_download is not None else None)
        if staging.folder.is_dir():
            shutil.rmtree(staging.folder)  # files a killed run was downloading: ours, and fetched again as needed
        if any(s is None for ss in sidecars.values() for s in ss):
            pool = Workers(source, config.quality, workers)
            try:
                _build_splits(work, out, source, plans, sidecars, pool, progress, staging, stats_every)
            finally:
                pool.close()
                if staging.folder.is_dir():
                    shutil.rmtree(staging.folder)

        summaries = {split: _split_info(split, sidecars[split], len(source.classes)) for split in config.splits}
        if "train" in config.splits:
            sums = PixelSums()
            for sidecar in sidecars["train"]:
                sums.add(sidecar.sums)
            if sums.num_pixels:
                write_json(out / STATS_NAME, sums.stats(stats_every).to_json())
        info = FolderInfo(name=source.name, splits=summaries, classes=tuple(source.classes), options=record.options,
                          pillow=record.pillow, inputs=record.inputs)
        write_json(out / INFO_NAME, info.to_json())  # last: its presence means the folder is complete
        claim.done()
        return Built(info, wrote=True)
    finally:
        claim.release()


def build_shards(out: str | os.PathLike, source: str = "synthetic", splits: tuple[str, ...] = SPLITS,
                 limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                 seed: int = 0, quality: int = 90, progress: bool = False,
                 per_class: int | Mapping[str, int] | None = None, prefetch: int = DEFAULT_PREFETCH,
                 keep_download: str | os.PathLike | None = None, stats_every: int | None = None) -> dict:
    """`build` with keyword options (the tests' entry point); returns the `_info.json` content (a dict)."""
    if isinstance(per_class, int):
        per_class = {split: per_class for split in splits}
    config = BuildConfig(source=source, splits=tuple(splits), limit=limit, shard_size=shard_size, seed=seed,
                         quality=quality, per_class=per_class, stats_every=stats_every)
    return build(out, config, workers=workers, progress=progress, prefetch=prefetch, keep_download=keep_download).info.to_json()
