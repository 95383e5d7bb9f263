"""Shards -> batches of raw samples: the streaming input of alextrain.

The stages, each a small generator over the previous one, run inside each loader worker (train/loader.py):

    plan (which shards, which samples) -> read raw samples (tar members grouped by prep.contract's rule,
    labels checked against the class table) -> shuffle buffer (raw bytes) -> batches -> skip the batches
    done before a resume

Every epoch's stream is a pure function of (seed, epoch, rank, world size, workers, batch size,
shuffle buffer): the shard order is shuffled with (seed, epoch), the shards (or, when there are fewer
shards than readers, the samples) are dealt out over all global readers (rank x worker) without
overlap, and each reader's shuffle buffer is seeded with (seed, epoch, rank, worker). A training epoch
has a fixed number of steps on every rank; readers cycle through their shards as often as needed so
none runs dry. Resuming at step s skips the first s batches before decoding, so it costs only reads.

Shards at http(s) and `pipe:` URLs are read with a timeout on every read, a minimum throughput and a
bounded number of retries (`RemoteReads`), so a stalled or trickling server or a hanging command ends
in one error naming the URL.
Decoding the batches (on the CPU in the workers, or on the device) is the loader's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
import random
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import webdataset as wds

from prep.contract import INFO_NAME, STATS_NAME, ClassInfo, ContractError, classes_from_info, iter_samples, label_of, read_info, read_stats


class ShardError(Exception):
    """A shard that cannot be read as the contract promises; the message starts with the shard's name."""


class RemoteReadError(Exception):
    """A remote file that gave no data within the timeout, or failed, on every try; the message starts
    with its URL."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers, e.g. (seed, epoch, rank, worker); stable across processes
    and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------
# Reading files: local paths, http(s) and pipe: URLs


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://", "pipe:"))


def join(location: str, name: str) -> str:
    """The path or URL of file `name` under `location`. A URL prefix may hold `{}` where the name
    goes (`pipe:aws s3 cp s3://bucket/shards/{} -`); otherwise the name is appended after a '/'."""
    if "{}" in location:
        return location.replace("{}", name)
    if is_url(location):
        return location + name if location.endswith("/") else f"{location}/{name}"
    return str(Path(location) / name)


@dataclass(frozen=True)
class RemoteReads:
    """When reads of http(s) and pipe: URLs give up (a policy, not a measurement): every read waits at
    most `timeout` seconds for data, and data that comes slower than `min_rate` bytes/s over
    `rate_window` seconds spent waiting for it (a trickle, which no single read's timeout catches)
    counts as stalled too; a file that stalls, fails or ends early (an http connection closed before
    its Content-Length) is opened again where it stopped (an http Range request, or the pipe command
    run again with the bytes already read skipped), at most `retries` times, `backoff` seconds after
    the first failure and twice as long after each next one; then RemoteReadError names the URL."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    min_rate: float = 10_000.0  # bytes/s
    rate_window: float = 60.0  # seconds of waiting for data (time the reader spends elsewhere does not count)


class _Throughput:
    """The bytes a source gave and the seconds spent waiting for them; TimeoutError when a window of
    `rate_window` seconds brought less than `min_rate` bytes/s."""

    def __init__(self, remote: RemoteReads):
        self.remote, self.bytes, self.seconds = remote, 0, 0.0

    def add(self, n: int, seconds: float) -> None:
        self.bytes, self.seconds = self.bytes + n, self.seconds + seconds
        if self.seconds >= self.remote.rate_window:
            if self.bytes < self.remote.min_rate * self.seconds:
                raise TimeoutError(f"under {self.remote.min_rate / 1000:g} KB/s for {self.remote.rate_window:g} s")
            self.bytes, self.seconds = 0, 0.0


class _Pipe:
    """The standard output of a shell command, read with a timeout per read. The command runs in its
    own process group, so closing kills it and everything it started."""

    def __init__(self, command: str, timeout: float):
        self.timeout, self.stderr = timeout, tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True)

    def readinto(self, buffer) -> int:
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"no data for {self.timeout:g} s")
        data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        if not data:
            try:
                status = self.process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"output ended but the command did not exit within {self.timeout:g} s") from None
            if status != 0:
                self.stderr.seek(0)
                said = self.stderr.read().decode(errors="replace").strip().splitlines()
                raise OSError(f"exit status {status}" + (f": {said[-1][:200]}" if said else ""))
        return len(data)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


class _Http:
    """The body of an http(s) GET from byte `offset` on, with a socket timeout per read."""

    def __init__(self, url: str, offset: int, timeout: float):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        self.timeout = timeout
        self.response = urllib.request.urlopen(request, timeout=timeout)
        self.skip = offset if offset and self.response.status != 206 else 0  # a server without ranges sends it all

    def readinto(self, buffer) -> int:
        # read1: what one receive brings, so that a trickle shows (readinto waits to fill the whole buffer).
        try:
            data = self.response.read1(len(buffer))
        except TimeoutError:
            raise TimeoutError(f"no data for {self.timeout:g} s") from None
        if not data and self.response.length:  # http.client ends the body quietly where the server closed early
            raise ConnectionError(f"connection closed {self.response.length} bytes before the end of the body")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()


class RemoteFile(io.RawIOBase):
    """A read-only file over an http(s) or pipe: URL that retries as `remote` says (see RemoteReads)."""

    def __init__(self, url: str, remote: RemoteReads):
        self.url, self.remote = url, remote
        self.offset, self.failures, self.source, self.throughput = 0, 0, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.source is None:
                    self.source, self.throughput = self._open(), _Throughput(self.remote)
                started = time.monotonic()
                n = self.source.readinto(buffer)
                self.throughput.add(n, time.monotonic() - started)
                self.offset += n
                return n
            except (OSError, HTTPException) as e:  # TimeoutError and urllib's errors are OSErrors
                self._drop_source()
                final = isinstance(e, urllib.error.HTTPError) and e.code < 500  # 404 stays 404
                if final or self.failures >= self.remote.retries:
                    tries = f" ({self.failures + 1} tries)" if self.failures else ""
                    raise RemoteReadError(f"{self.url}: {_reason(e)}{tries}") from None
                time.sleep(self.remote.backoff * 2**self.failures)
                self.failures += 1

    def _open(self):
        """The source from self.offset on."""
        if self.url.startswith("pipe:"):
            source = _Pipe(self.url[len("pipe:") :], self.remote.timeout)
            skip = self.offset
        else:
            source = _Http(self.url, self.offset, self.remote.timeout)
            skip = source.skip
        try:
            scratch = bytearray(1 << 16)
            while skip:
                n = source.readinto(memoryview(scratch)[: min(skip, len(scratch))])
                if n == 0:
                    raise OSError(f"ended at byte {self.offset - skip} of the {self.offset} read before")
                skip -= n
        except BaseException:
            source.close()
            raise
        return source

    def _drop_source(self) -> None:
        if self.source is not None:
            with contextlib.suppress(OSError):
                self.source.close()
            self.source = None

    def close(self) -> None:
        self._drop_source()
        super().close()


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return str(e) or type(e).__name__


def open_file(url: str, remote: RemoteReads) -> BinaryIO:
    """A local path or an http(s) / pipe: URL, opened for buffered reading."""
    if is_url(url):
        return io.BufferedReader(RemoteFile(url, remote), 1 << 20)
    return open(url, "rb")


def _fetch(url: str, remote: RemoteReads) -> bytes:
    """The bytes of a small file at an http(s) or pipe: URL."""
    try:
        with open_file(url, remote) as f:
            return f.read()
    except RemoteReadError as e:
        raise ContractError(str(e)) from None


@dataclass(frozen=True)
class Split:
    """One split's shards: their paths or URLs, how many samples each holds, the size of the class
    table their labels index, and how remote shards are read."""

    name: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int
    remote: RemoteReads = field(default_factory=RemoteReads)

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class ShardFolder:
    """An opened shard folder: `_info.json`, `stats.json` and where the shards are."""

    location: str
    info: dict
    stats: dict
    remote: RemoteReads = field(default_factory=RemoteReads)

    @property
    def classes(self) -> list[ClassInfo]:
        return classes_from_info(self.info)

    def split(self, name: str) -> Split:
        entry = self.info["splits"][name]
        return Split(name, tuple(join(self.location, f) for f in entry["filenames"]), tuple(entry["shard_lengths"]),
                     len(self.info["classes"]), self.remote)


def open_shards(location: str, splits: tuple[str, ...] = ("train", "validation"), remote: RemoteReads = RemoteReads()) -> ShardFolder:
    """Read and check `_info.json` and `stats.json` of a local folder or a URL prefix; for a local
    folder also check that each shard of `splits` exists with the size `_info.json` records.
    Raises ContractError with one clear line."""
    if is_url(location):
        # Fetch the two small files into a temporary folder, so that the contract's own checks apply.
        with tempfile.TemporaryDirectory(prefix="alextrain-") as tmp:
            for name in (INFO_NAME, STATS_NAME):
                Path(tmp, name).write_bytes(_fetch(join(location, name), remote))
            try:
                info, stats = read_info(tmp), read_stats(tmp)
            except ContractError as e:
                raise ContractError(str(e).replace(tmp, location)) from None
    else:
        if not Path(location).is_dir():
            raise ContractError(f"{location}: no such shard folder; build one with `alexprep build-shards --out {location}`")
        info, stats = read_info(location), read_stats(location)
    folder = ShardFolder(location, info, stats, remote)
    for name in splits:
        entry = info["splits"].get(name)
        if not entry or not entry.get("num_samples"):
            raise ContractError(f"{join(location, INFO_NAME)}: no {name!r} samples")
        if not is_url(location):
            for shard in entry.get("shards", []):
                path = Path(location, shard["filename"])
                if not path.is_file():
                    raise ContractError(f"{path}: shard missing")
                if path.stat().st_size != shard["size"]:
                    raise ContractError(f"{path}: {path.stat().st_size} bytes, {INFO_NAME} says {shard['size']} (truncated or replaced shard)")
    return folder


# ---------------------------------------------------------------------------------------------------
# The plan: which reader reads what, in which order


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in this epoch's order: shuffled with (seed, epoch) for training, as is otherwise."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(seed_for(seed, epoch)).shuffle(order)
    return order


def reader_plan(order: list[int], reader: int, readers: int) -> tuple[list[int], int | None]:
    """What global reader `reader` of `readers` reads: (shard indices, sample stride). With at least
    as many shards as readers, every reader gets whole shards (order[reader::readers]) and keeps every
    sample (stride None). With fewer shards, every reader reads all shards and keeps sample i (counted
    over one pass) when i % readers == reader. Either way the readers' samples are disjoint and
    together are every sample once."""
    if len(order) >= readers:
        return order[reader::readers], None
    return list(order), readers


def worker_batches(steps: int, start: int, worker: int, workers: int) -> tuple[int, int]:
    """(skip, count) for worker `worker` of `workers` on a rank that takes batches start..steps-1.
    The worker reads the epoch's batches b with b % workers == worker (its j-th batch is batch
    j * workers + worker); it skips those before `start` and yields the rest up to `steps`."""
    skip = len(range(worker, start, workers))
    return skip, len(range(worker, steps, workers)) - skip


# ---------------------------------------------------------------------------------------------------
# The stages inside one reader


class Sample(NamedTuple):
    """One sample as read from its shard, not decoded yet."""

    url: str  # the shard's path or URL
    key: str
    jpg: bytes
    label: int


def read_shard(url: str, expected: int, num_classes: int, remote: RemoteReads = RemoteReads()) -> Iterator[Sample]:
    """The samples of one shard, in file order, as raw bytes. Raises ShardError naming the shard if it
    cannot be opened, read or parsed, if a sample lacks `jpg` or `cls` or its `cls` is not a class index
    below `num_classes`, or if it holds another number of samples than `_info.json` says (a damaged tar
    header ends a streamed tar early without an error)."""
    count = 0
    try:
        stream = open_file(url, remote)
    except OSError as e:
        raise ShardError(f"{url}: cannot open ({e})") from None
    try:
        for key, fields in iter_samples(stream):
            if "jpg" not in fields or "cls" not in fields:
                raise ShardError(f"{url}: sample {key} lacks {'jpg' if 'jpg' not in fields else 'cls'}")
            label = label_of(fields["cls"], num_classes)
            if label is None:
                raise ShardError(f"{url}: sample {key}: cls {fields['cls'][:20]!r} is not a class index below {num_classes}")
            count += 1
            yield Sample(url, key, fields["jpg"], label)
    except ShardError:
        raise
    except RemoteReadError as e:
        raise ShardError(str(e)) from None
    except Exception as e:  # tarfile.ReadError, OSError...
        raise ShardError(f"{url}: unreadable shard ({str(e) or type(e).__name__})") from None
    finally:
        with contextlib.suppress(OSError, RemoteReadError):
            stream.close()
    if count != expected:
        raise ShardError(f"{url}: {count} samples, {INFO_NAME} says {expected} (truncated or corrupt shard)")


def read_samples(
    split: Split, shards: list[int], stride: int | None, reader: int, *, cycle: bool, rng: random.Random | None = None, buffer: int = 1
) -> Iterator[Sample]:
    """The reader's raw samples: one pass over its shards in order, keeping every `stride`-th sample
    if strided; with `rng`, each pass goes through a shuffle buffer of `buffer` samples (drained at
    the end of the pass, so a pass holds each of the reader's samples once); with `cycle`, pass after
    pass for ever (training), else one pass."""
    while True:
        one_pass = (
            sample
            for n, sample in enumerate(s for i in shards for s in read_shard(split.urls[i], split.lengths[i], split.num_classes, split.remote))
            if stride is None or n % stride == reader
        )
        if rng is not None:
            one_pass = wds.shuffle(bufsize=buffer, initial=buffer, rng=rng)(one_pass)
        produced = 0
        for sample in one_pass:
            produced += 1
            yield sample
        if not cycle:
            return
        if produced == 0:
            raise ShardError(f"{split.name}: reader {reader} got no samples from {', '.join(split.urls[i] for i in shards)}")


def batched(samples: Iterator[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Lists of batch_size samples; the last one may be shorter."""
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


class ShardStream:
    """One epoch of one split on one rank, as batches of raw samples; `train.loader.make_loader` reads
    and decodes them in worker processes.

    train=True: shards shuffled with (seed, epoch), a shuffle buffer, exactly `steps` batches of
    `batch_size` on this rank, of which the first `start` are skipped (resume). train=False: every
    sample of the split exactly once over all ranks and workers, in file order, the last batch of
    each worker possibly partial.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        steps: int | None = None,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ):
        if train and steps is None:
            raise ValueError("a training stream needs its number of steps")
        self.split, self.batch_size, self.train = split, batch_size, train
        self.seed, self.epoch, self.steps, self.start = seed, epoch, steps, start
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer

    def raw_batches(self, turn: int = 0, turns: int = 1) -> Iterator[list[Sample]]:
        """The batches the loader takes at turn `turn` of `turns` (train/loader.py takes the epoch's
        batches from its workers in turn). Training: the epoch's batches start + turn, start + turn +
        turns, ...; they are read by reader (turn + start) % turns, so which reader reads which shards
        (and with which shuffle seed) does not depend on where the epoch was resumed. Evaluation: the
        batches of reader `turn`."""
        worker = (turn + self.start) % turns if self.train else turn
        reader, readers = self.rank * turns + worker, self.world_size * turns
        order = epoch_order(len(self.split.urls), self.seed, self.epoch, shuffle=self.train)
        shards, stride = reader_plan(order, reader, readers)
        if self.train:
            rng = random.Random(seed_for(self.seed, self.epoch, self.rank, worker))
            samples = read_samples(self.split, shards, stride, reader, cycle=True, rng=rng, buffer=self.shuffle_buffer)
            skip, count = worker_batches(self.steps, self.start, worker, turns)
            batches = itertools.islice(batched(samples, self.batch_size), skip, skip + count)
        else:
            samples = read_samples(self.split, shards, stride, reader, cycle=False)
            batches = batched(samples, self.batch_size)
        # Closing the reader closes the shard it is in, also when the consumer stops early.
        with contextlib.closing(samples):
            yield from batches
