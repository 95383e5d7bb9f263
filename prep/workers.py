"""A build's worker processes: rows in, samples out (processed images as tar members), in order; and any
other job the build hands them (finishing shards).

The pool is forked after the source is opened, so every worker inherits it and nothing of it is
pickled: a listed source's workers read their rows' files themselves. Rows travel in chunks of
CHUNK; `Workers.ordered` keeps a window of chunks in flight and hands the results back in the order
the chunks went in, so nothing downstream depends on the number of workers. With one worker
everything runs in the calling process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, Protocol, TypeVar

from prep.contract import CLS, FIELDS, IMAGE_SIZE, JPG, META
from prep.image import SkipImage, process
from prep.source import Source
from prep.stats import PixelSums
from prep.tar_format import sample_members

CHUNK = 8  # rows per worker task: amortises IPC without starving workers at the end of a split
MAX_WORKERS = 4 * (os.cpu_count() or 1)  # alexprep's processes (build, verify): more than 4 per core only add memory
T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M")


@dataclass(frozen=True)
class Task:
    """One row for a worker: its bytes, or None (the worker reads them from the source)."""

    row: int
    key: str
    label: int
    data: bytes | None
    skip: str | None
    sums: bool  # in the statistics sample: the worker also sums the written JPEG's decoded pixels


@dataclass(frozen=True)
class Chunk:
    """Rows of one split to process together."""

    split: str
    tasks: list[Task]


@dataclass(frozen=True)
class Sample:
    """What a worker makes of one row: its tar members, or the reason it was skipped."""

    row: int
    key: str
    label: int
    members: bytes = b""  # the sample's tar members (headers, payloads, padding), contract.FIELDS order
    sums: PixelSums | None = None  # train images in the statistics sample only
    skipped: str | None = None


@dataclass(frozen=True)
class Processed:
    """A chunk's samples, in its rows' order."""

    samples: list[Sample]


@dataclass(frozen=True)
class _Job:
    """What every worker needs; pool workers inherit it through fork."""

    source: Source
    quality: int


_JOB: _Job | None = None  # this process's job, set once by _init in each worker (or in the parent, single-process)


def _init(job: _Job, pool_worker: bool = True) -> None:
    global _JOB
    _JOB = job
    if pool_worker:
        # Ctrl-C reaches the whole process group; the parent handles it (and stops the pool), so the
        # workers need not each print a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_chunk(chunk: Chunk) -> Processed:
    return Processed([_process_one(_JOB, chunk.split, t) for t in chunk.tasks])


def _process_one(job: _Job, split: str, task: Task) -> Sample:
    """Read (rows handed over without bytes) and process one row -> Sample."""
    if task.skip is not None:
        return Sample(task.row, task.key, task.label, skipped=task.skip)
    try:
        data = task.data if task.data is not None else job.source.read(split, task.row)
        p = process(data, size=IMAGE_SIZE, quality=job.quality, sums=task.sums)
    except SkipImage as e:
        return Sample(task.row, task.key, task.label, skipped=str(e))
    except OSError as e:  # a file the source lists but cannot read
        return Sample(task.row, task.key, task.label, skipped=f"unreadable input: {type(e).__name__}: {e}")
    cls = job.source.classes[task.label]
    meta = {"key": task.key, "label": task.label, "wnid": cls.wnid, "width": p.width, "height": p.height,
            "mode": p.mode, "format": p.format}
    payloads = {JPG: p.jpeg, CLS: str(task.label).encode("ascii"),
                META: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")}
    return Sample(task.row, task.key, task.label, sample_members(task.key, [(f, payloads[f]) for f in FIELDS]),
                  p.sums)


class Pending(Protocol[T]):
    """A job's result to come (a pool's AsyncResult, or _Done)."""

    def ready(self) -> bool: ...

    def get(self) -> T: ...


class _Done(Generic[T]):
    """A job run in this process, with AsyncResult's `ready` and `get`."""

    def __init__(self, value: T):
        self._value = value

    def ready(self) -> bool:
        return True

    def get(self) -> T:
        return self._value


class Workers:
    """`n` forked processes (n > 1) or this process (n == 1), working for one build."""

    def __init__(self, source: Source, quality: int, n: int):
        job = _Job(source, quality)
        self.n = n
        self._pool = None
        if n > 1:
            self._pool = multiprocessing.get_context("fork").Pool(n, _init, (job,))
        else:
            _init(job, pool_worker=False)

    def submit(self, fn: Callable[[T], R], arg: T) -> Pending[R]:
        """Run `fn(arg)` in a worker (a module-level function; `arg` is pickled); the result's `get()` waits
        for it and raises what it raised."""
        return self._pool.apply_async(fn, (arg,)) if self._pool is not None else _Done(fn(arg))

    def ordered(self, messages: Iterator[Chunk | M], window: int) -> Iterator[Processed | M]:
        """Each Chunk of `messages` processed (at most `window` in flight), any other message passed on,
        all in the order they came."""
        if self._pool is None:
            for m in messages:
                yield _process_chunk(m) if isinstance(m, Chunk) else m
            return
        pending: deque = deque()
        try:
            for m in messages:
                pending.append(self._pool.apply_async(_process_chunk, (m,)) if isinstance(m, Chunk) else _Done(m))
                while len(pending) > window:
                    yield pending.popleft().get()
        except Exception:
            # Reading failed (a file that cannot be fetched or read): first hand over what was read before
            # it, so the parts read in full are committed and a rerun continues after them.
            while pending:
                yield pending.popleft().get()
            raise
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        """Stop the workers (whatever they were doing: results not taken are dropped)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
