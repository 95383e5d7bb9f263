"""Shards -> batches of raw samples: the streaming input of alextrain.

The stages, each a small generator over the previous one, run inside each loader worker (train/loader.py):

    plan (which shards, which samples) -> read raw samples (tar members grouped by prep.contract's rule,
    labels checked against the class table) -> shuffle buffer (raw bytes) -> batches -> skip the batches
    done before a resume

Every epoch's stream is a pure function of (seed, epoch, rank, world size, readers, batch size,
shuffle buffer): the shard order is shuffled with (seed, epoch), the shards (or, when there are fewer
shards than readers, the samples) are dealt out over all global readers (rank x reader) without
overlap, and each reader's shuffle buffer is seeded with (seed, epoch, rank, reader). A training
epoch has a fixed number of steps on every rank; readers cycle through their shards as often as
needed so none runs dry. Resuming at step s skips the first s batches before decoding, so it costs
only reads. Shards may lie at http(s) and `pipe:` URLs (train/remote.py); decoding the batches is the
loader's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import webdataset as wds

from prep.contract import (CLS, INFO_NAME, JPG, STATS_NAME, ClassInfo, ContractError, FolderInfo, PixelStats, iter_samples, label_of,
                           parse_info, parse_stats, read_info, read_stats)
from prep.text import first_line
from train.remote import RemoteReadError, RemoteReads, is_url, join, open_file, read_bytes


class ShardError(Exception):
    """A shard that cannot be read as the contract promises; the message starts with the shard's name."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers, e.g. (seed, epoch, rank, reader); stable across processes
    and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class SplitShards:
    """One split's shards as the stream reads them: their paths or URLs, how many samples each holds,
    the size of the class table their labels index, and how remote shards are read."""

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
    """An opened shard folder: its `_info.json` and `stats.json`, and where the shards are."""

    location: str
    info: FolderInfo
    stats: PixelStats
    remote: RemoteReads = field(default_factory=RemoteReads)

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return self.info.classes

    def split(self, name: str) -> SplitShards:
        split = self.info.splits[name]
        return SplitShards(name, tuple(join(self.location, f) for f in split.filenames), split.shard_lengths,
                           len(self.info.classes), self.remote)


def open_shards(location: str, splits: tuple[str, ...] = ("train", "validation"), remote: RemoteReads = RemoteReads()) -> ShardFolder:
    """Read and check `_info.json` and `stats.json` of a local folder or a URL prefix; for a local
    folder also check that each shard of `splits` exists with the size `_info.json` records.
    Raises ContractError with one clear line."""
    if is_url(location):
        try:
            files = [(join(location, name), read_bytes(join(location, name), remote)) for name in (INFO_NAME, STATS_NAME)]
        except RemoteReadError as e:
            raise ContractError(str(e)) from None
        (info_url, info), (stats_url, stats) = files
        info, stats = parse_info(info, info_url), parse_stats(stats, stats_url)
    else:
        if not Path(location).is_dir():
            raise ContractError(f"{location}: no such shard folder; build one with `alexprep build-shards --out {location}`")
        info, stats = read_info(location), read_stats(location)
    for name in splits:
        split = info.splits.get(name)
        if not split or not split.num_samples:
            raise ContractError(f"{join(location, INFO_NAME)}: no {name!r} samples")
        if not is_url(location):
            for shard in split.shards:
                path = Path(location, shard.filename)
                if not path.is_file():
                    raise ContractError(f"{path}: shard missing")
                if path.stat().st_size != shard.size:
                    raise ContractError(f"{path}: {path.stat().st_size} bytes, {INFO_NAME} says {shard.size} (truncated or replaced shard)")
    return ShardFolder(location, info, stats, remote)


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


def reader_batches(steps: int, start: int, reader: int, readers: int) -> tuple[int, int]:
    """(skip, count) for reader `reader` of a rank's `readers` when the rank takes batches start..steps-1.
    The reader makes the epoch's batches b with b % readers == reader (its j-th batch is batch
    j * readers + reader); it skips those before `start` and yields the rest up to `steps`."""
    skip = len(range(reader, start, readers))
    return skip, len(range(reader, steps, readers)) - skip


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
            if JPG not in fields or CLS not in fields:
                raise ShardError(f"{url}: sample {key} lacks {JPG if JPG not in fields else CLS}")
            label = label_of(fields[CLS], num_classes)
            if label is None:
                raise ShardError(f"{url}: sample {key}: cls {fields[CLS][:20]!r} is not a class index below {num_classes}")
            count += 1
            yield Sample(url, key, fields[JPG], label)
    except ShardError:
        raise
    except RemoteReadError as e:
        raise ShardError(str(e)) from None
    except Exception as e:  # tarfile.ReadError, OSError...
        raise ShardError(f"{url}: unreadable shard ({first_line(e)})") from None
    finally:
        with contextlib.suppress(OSError, RemoteReadError):
            stream.close()
    if count != expected:
        raise ShardError(f"{url}: {count} samples, {INFO_NAME} says {expected} (truncated or corrupt shard)")


def read_samples(
    split: SplitShards, shards: list[int], stride: int | None, reader: int, *, cycle: bool, rng: random.Random | None = None, buffer: int = 1
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
    """One epoch of one split on one rank, as batches of raw samples, made by `readers` readers that
    split the rank's share between them (train/loader.py runs each in a worker process and decodes).

    train=True: shards shuffled with (seed, epoch), a shuffle buffer, exactly `steps` batches of
    `batch_size` on this rank, of which the first `start` are skipped (resume). train=False: every
    sample of the split exactly once over all ranks and readers, in file order, the last batch of
    each reader possibly partial.
    """

    def __init__(
        self,
        split: SplitShards,
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

    def batches(self, reader: int = 0, readers: int = 1) -> Iterator[list[Sample]]:
        """The batches of reader `reader` of this rank's `readers`. Which shards (or samples) a reader
        reads, and its shuffle seed, depend on (rank, reader) and not on `start`. Training: the
        epoch's batches b >= start with b % readers == reader, in order (so reader start % readers has
        batch `start`). Evaluation: the reader's share of the split, in file order."""
        global_reader, global_readers = self.rank * readers + reader, self.world_size * readers
        order = epoch_order(len(self.split.urls), self.seed, self.epoch, shuffle=self.train)
        shards, stride = reader_plan(order, global_reader, global_readers)
        if self.train:
            rng = random.Random(seed_for(self.seed, self.epoch, self.rank, reader))
            samples = read_samples(self.split, shards, stride, global_reader, cycle=True, rng=rng, buffer=self.shuffle_buffer)
            skip, count = reader_batches(self.steps, self.start, reader, readers)
            batches = itertools.islice(batched(samples, self.batch_size), skip, skip + count)
        else:
            samples = read_samples(self.split, shards, stride, global_reader, cycle=False)
            batches = batched(samples, self.batch_size)
        # Closing the reader closes the shard it is in, also when the consumer stops early.
        with contextlib.closing(samples):
            yield from batches
