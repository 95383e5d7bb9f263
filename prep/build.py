"""The shard writer: source -> processed images -> deterministic, resumable WebDataset tar shards.

The plan: per split, the source's items in key order are permuted by a generator seeded with
(seed, split), cut to `limit`, and cut into consecutive shards of `shard_size`. Each shard holds its
items in that permuted order (minus skipped inputs). Images are processed in a forked pool with an
ordered `imap`, so the bytes of every shard depend only on the source, the options and the Pillow
build, never on `workers`.

Resume: `.build/options.json` is written first; after a shard's tar is renamed into place, a sidecar
`.build/{split}-NNNNNN.json` records its sha256, size, counts, skips and exact pixel sums. A shard is
done when its sidecar exists and the tar's size matches, so a rerun after a kill (even SIGKILL)
skips finished shards, removes `.tmp-*` leftovers and redoes the rest. `stats.json` and then
`_info.json` are written last, from the sidecars alone, so they are the same whether or not the build
was interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import tarfile
import zlib
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from prep.contract import (INFO_NAME, SCHEMA_VERSION, SPLITS, STATS_NAME, IMAGE_SIZE, atomic_write,
                           shard_name, write_json)
from prep.image import SkipImage, pillow_flavour, process
from prep.source import HUB_ID, Source, open_source
from prep.stats import PixelSums

DEFAULT_SHARD_SIZE = 1000  # about 30 MB of 256 px q90 JPEGs; 1,282 train shards for ImageNet-1k
BUILD_DIR = ".build"  # resume bookkeeping inside the output folder
OPTIONS_NAME = "options.json"
_CHUNKSIZE = 4  # images per pool task: amortises IPC without starving workers at the end of a split


class BuildError(Exception):
    """A build that cannot go ahead as asked (bad options, a folder holding other shards)."""


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the shards (workers and progress do not)."""

    source: str = HUB_ID
    splits: tuple[str, ...] = SPLITS
    limit: int | None = None  # at most this many inputs per split: the first ones of the seeded order
    shard_size: int = DEFAULT_SHARD_SIZE  # inputs per shard (a shard holds fewer if some are skipped)
    seed: int = 0
    quality: int = 90  # JPEG quality of the 256 px images
    per_class: Mapping[str, int] | None = None  # synthetic source only: images per class, per split

    def __post_init__(self):
        # Normalised (splits and per_class in SPLITS order) so that equal builds compare and serialise equal.
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise BuildError(f"splits must be among {', '.join(SPLITS)}, got {', '.join(self.splits) or 'none'}")
        splits = tuple(s for s in SPLITS if s in self.splits)
        object.__setattr__(self, "splits", splits)
        if self.per_class is not None:
            counts = self.per_class.values()
            if set(self.per_class) - set(splits) or not all(isinstance(n, int) and n >= 1 for n in counts):
                raise BuildError(f"per_class must map splits among {', '.join(splits)} to counts >= 1, "
                                 f"got {dict(self.per_class)}")
            object.__setattr__(self, "per_class", {s: self.per_class[s] for s in splits if s in self.per_class})
        for name, low, high in (("limit", 1, None), ("shard_size", 1, None), ("seed", 0, None), ("quality", 1, 100)):
            value = getattr(self, name)
            if name == "limit" and value is None:
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
class ShardPlan:
    """Which inputs go into shard `index` of `split`, in order."""

    split: str
    index: int
    items: np.ndarray  # (n,) int64 positions in source.items(split), in the order they are written

    @property
    def filename(self) -> str:
        return shard_name(self.split, self.index)


def plan_split(num_items: int, split: str, seed: int, shard_size: int, limit: int | None) -> list[ShardPlan]:
    """Permute `range(num_items)` with a generator seeded by (seed, split), cut to `limit`, chunk into shards."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    order = rng.permutation(num_items)[:limit]
    return [ShardPlan(split, k, order[start:start + shard_size])
            for k, start in enumerate(range(0, len(order), shard_size))]


@dataclass(frozen=True)
class _Sample:
    """What a worker sends back for one input: the three fields, or the reason it was skipped."""

    key: str
    label: int
    fields: tuple[tuple[str, bytes], ...] = ()  # ((ext, payload), ...) in contract.FIELDS order
    sums: PixelSums | None = None  # train split only
    skipped: str | None = None


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pool workers inherit it through fork, so the source is never pickled."""

    source: Source
    quality: int


_WORKER_JOB: _Job | None = None  # a pool worker's job, set once by _init_worker in each worker process


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    # Ctrl-C reaches the whole process group; the parent handles it (and stops the pool), so the
    # workers need not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_task(task: tuple[str, int]) -> _Sample:
    return _process_one(_WORKER_JOB, task)


def _process_one(job: _Job, task: tuple[str, int]) -> _Sample:
    """Read and process one input: (split, position in source.items(split)) -> _Sample."""
    split, index = task
    item = job.source.items(split)[index]
    try:
        p = process(job.source.read(split, index), size=IMAGE_SIZE, quality=job.quality)
    except SkipImage as e:
        return _Sample(item.key, item.label, skipped=str(e))
    except OSError as e:  # a file the source lists but cannot read
        return _Sample(item.key, item.label, skipped=f"unreadable input: {type(e).__name__}: {e}")
    cls = job.source.classes[item.label]
    meta = {"key": item.key, "label": item.label, "wnid": cls.wnid, "width": p.width, "height": p.height,
            "mode": p.mode, "format": p.format}
    fields = (("jpg", p.jpeg), ("cls", str(item.label).encode("ascii")),
              ("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")))
    return _Sample(item.key, item.label, fields, PixelSums.of_jpeg(p.jpeg) if split == "train" else None)


class _HashingWriter:
    """File wrapper for tarfile: passes writes through while counting bytes and hashing them."""

    def __init__(self, f):
        self._f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends only on name and size (no time, owner or umask)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


def _write_shard(out: Path, plan: ShardPlan, samples: Iterable[_Sample], on_sample: Callable[[], None]) -> dict:
    """Write one shard atomically and return its sidecar record."""
    skipped, class_counts = [], {}  # class_counts: {label: samples written}
    sums = PixelSums() if plan.split == "train" else None
    with atomic_write(out / plan.filename) as f:
        writer = _HashingWriter(f)
        with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                on_sample()
                if sample.skipped is not None:
                    skipped.append({"key": sample.key, "reason": sample.skipped})
                    continue
                class_counts[sample.label] = class_counts.get(sample.label, 0) + 1
                for ext, payload in sample.fields:
                    tar.addfile(_member(f"{sample.key}.{ext}", len(payload)), io.BytesIO(payload))
                if sums is not None:
                    sums.add(sample.sums)
    return {"filename": plan.filename, "num_inputs": len(plan.items), "num_samples": sum(class_counts.values()),
            "class_counts": {str(label): n for label, n in sorted(class_counts.items())},
            "sha256": writer.sha256.hexdigest(), "size": writer.size, "skipped": skipped,
            "sums": sums.to_json() if sums is not None else None}


def _sidecar_path(out: Path, plan: ShardPlan) -> Path:
    return out / BUILD_DIR / f"{plan.split}-{plan.index:06d}.json"


def _finished(out: Path, plan: ShardPlan) -> dict | None:
    """The shard's sidecar if the shard is complete (sidecar present, tar of the recorded size), else None."""
    try:
        record = json.loads(_sidecar_path(out, plan).read_text(encoding="utf-8"))
        return record if (out / plan.filename).stat().st_size == record["size"] else None
    except (OSError, ValueError, KeyError):
        return None


def _items_digest(source: Source, split: str) -> str:
    h = hashlib.sha256()
    for key, label in source.items(split):
        h.update(f"{key}\t{label}\n".encode("utf-8"))
    return h.hexdigest()


def _claim_folder(out: Path, record: dict) -> None:
    """Record the build in `.build/options.json`, or refuse if the folder holds another build."""
    path = out / BUILD_DIR / OPTIONS_NAME
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
    elif (out / INFO_NAME).is_file() or any(out.glob("*.tar")):
        raise BuildError(f"{out} already holds shards that this build did not start (no {BUILD_DIR}/{OPTIONS_NAME}); "
                         f"use another --out or empty it")
    else:
        previous = None
    if previous is not None and previous != record:
        raise BuildError(f"{out} already holds shards built differently ({_differences(previous, record)}); "
                         f"use another --out or empty it")
    (out / BUILD_DIR).mkdir(exist_ok=True)
    if previous is None:
        write_json(path, record)


def _differences(old: dict, new: dict) -> str:
    """What differs between two options.json records, e.g. "seed: 0 -> 1; train inputs: changed"."""
    def flat(record: dict) -> dict:
        return {**record.get("options", {}), "pillow": record.get("pillow"),
                **{f"{split} inputs": digest for split, digest in record.get("inputs", {}).items()}}

    a, b = flat(old), flat(new)
    return "; ".join(f"{k}: changed" if k.endswith(" inputs") else f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _remove_temp_files(out: Path) -> None:
    """Delete `.tmp-*` files a killed build left behind (atomic_write's temporary names)."""
    for folder in (out, out / BUILD_DIR):
        for tmp in folder.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)


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
          log: Callable[[str], None] | None = None) -> dict:
    """Build (or finish building) the shard folder `out` as `config` says; return the `_info.json` content.

    The source is opened, and every item listed, before anything is written, so a source that cannot
    be read leaves no trace. `workers` processes (default: all CPUs) decode and encode; `progress`
    shows a tqdm bar per split; `log` receives a few human-readable lines.
    """
    log = log or (lambda line: None)
    workers = workers or os.cpu_count() or 1
    source = open_source(config.source, config.splits, config.per_class)
    config = replace(config, source=source.identity)  # e.g. a local path, resolved
    flavour = pillow_flavour()
    plans = {split: plan_split(len(source.items(split)), split, config.seed, config.shard_size, config.limit)
             for split in config.splits}

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, {"options": config.to_json(), "pillow": flavour,
                        "inputs": {s: _items_digest(source, s) for s in config.splits}})
    _remove_temp_files(out)
    log(f"source {source.identity}: " + ", ".join(f"{s} {len(source.items(s))} inputs, {len(plans[s])} shards"
                                                  for s in config.splits) + f"; {flavour}; {workers} workers")

    records = {split: [_finished(out, plan) for plan in plans[split]] for split in config.splits}
    todo = [plan for split in config.splits for plan, rec in zip(plans[split], records[split]) if rec is None]
    if todo:
        job = _Job(source, config.quality)
        pool = (multiprocessing.get_context("fork").Pool(workers, _init_worker, (job,))
                if workers > 1 else None)
        try:
            for split in config.splits:
                _build_split(out, job, pool, split, plans[split], records[split], progress)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()

    summaries = {split: _split_info(split, records[split], len(source.classes)) for split in config.splits}
    if "train" in config.splits:
        sums = PixelSums()
        for record in records["train"]:
            sums.add(PixelSums.from_json(record["sums"]))
        if sums.num_pixels:
            write_json(out / STATS_NAME, sums.stats())
    info = {"name": source.name, "schema_version": SCHEMA_VERSION, "splits": summaries,
            "classes": [c.to_json() for c in source.classes], "options": config.to_json(), "pillow": flavour}
    write_json(out / INFO_NAME, info)  # last: its presence means the folder is complete
    return info


def _build_split(out: Path, job: _Job, pool, split: str, plans: list[ShardPlan], records: list[dict | None],
                 progress: bool) -> None:
    """Write the split's unfinished shards, filling in `records` (sidecars) as each one completes."""
    todo = [k for k, rec in enumerate(records) if rec is None]
    if not todo:
        return
    tasks = ((split, int(i)) for k in todo for i in plans[k].items)
    samples: Iterator[_Sample] = (pool.imap(_pool_task, tasks, chunksize=_CHUNKSIZE) if pool is not None
                                  else map(partial(_process_one, job), tasks))
    total = sum(len(p.items) for p in plans)
    done = total - sum(len(plans[k].items) for k in todo)
    with tqdm(total=total, initial=done, desc=split, unit="img", disable=not progress, smoothing=0.1) as bar:
        for k in todo:
            plan = plans[k]
            shard = (next(samples) for _ in range(len(plan.items)))
            record = _write_shard(out, plan, shard, lambda: bar.update(1))
            write_json(_sidecar_path(out, plan), record)  # after the tar is in place: marks it done
            records[k] = record


def build_shards(out: str | os.PathLike, source: str = "synthetic", splits: tuple[str, ...] = SPLITS,
                 limit: int | None = None, shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                 seed: int = 0, quality: int = 90, progress: bool = False,
                 per_class: int | Mapping[str, int] | None = None) -> dict:
    """`build` with keyword options (the tests' entry point); returns the `_info.json` content."""
    if isinstance(per_class, int):
        per_class = {split: per_class for split in splits}
    config = BuildConfig(source=source, splits=tuple(splits), limit=limit, shard_size=shard_size, seed=seed,
                         quality=quality, per_class=per_class)
    return build(out, config, workers=workers, progress=progress)
