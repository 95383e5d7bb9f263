"""Shards -> uint8 batches: the streaming input of alextrain.

The stages, each a small generator over the previous one, run inside each loader worker (train/loader.py):

    plan (which shards, which samples) -> read raw samples (webdataset's tar reader, gopen for URLs)
    -> shuffle buffer (raw bytes) -> raw batches -> skip the batches done before a resume -> decode

Every epoch's stream is a pure function of (seed, epoch, rank, world size, workers, batch size,
shuffle buffer): the shard order is shuffled with (seed, epoch), the shards (or, when there are fewer
shards than readers, the samples) are dealt out over all global readers (rank x worker) without
overlap, and each reader's shuffle buffer is seeded with (seed, epoch, rank, worker). A training epoch
has a fixed number of steps on every rank; readers cycle through their shards as often as needed so
none runs dry. Resuming at step s skips the first s batches before decoding, so it costs only reads.

Workers only read and decode (to uint8 (B, 3, 256, 256)); every per-pixel operation after that runs on
the training device (train/augment.py). With decode="gpu" the workers pass the JPEG bytes through and
`train.loader.DeviceLoader` decodes them in batches on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from prep.contract import IMAGE_SIZE, INFO_NAME, STATS_NAME, ClassInfo, ContractError, classes_from_info, read_info, read_stats


class ShardError(Exception):
    """A shard that cannot be read as the contract promises; the message starts with the shard's name."""


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers, e.g. (seed, epoch, rank, worker); stable across processes
    and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------------
# The shard folder (or URL prefix) and its two JSON files


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


def _fetch(url: str) -> bytes:
    """The bytes of a small file at an http(s) or pipe: URL."""
    if url.startswith("pipe:"):
        done = subprocess.run(url[len("pipe:") :], shell=True, capture_output=True, timeout=300)
        if done.returncode != 0:
            raise ContractError(f"{url}: exit status {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}")
        return done.stdout
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as e:
        raise ContractError(f"{url}: {e}") from e


@dataclass(frozen=True)
class Split:
    """One split's shards: their paths or URLs and how many samples each holds."""

    name: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class ShardFolder:
    """An opened shard folder: `_info.json`, `stats.json` and where the shards are."""

    location: str
    info: dict
    stats: dict

    @property
    def classes(self) -> list[ClassInfo]:
        return classes_from_info(self.info)

    def split(self, name: str) -> Split:
        entry = self.info["splits"][name]
        return Split(name, tuple(join(self.location, f) for f in entry["filenames"]), tuple(entry["shard_lengths"]))


def open_shards(location: str, splits: tuple[str, ...] = ("train", "validation")) -> ShardFolder:
    """Read and check `_info.json` and `stats.json` of a local folder or a URL prefix; for a local
    folder also check that each shard of `splits` exists with the size `_info.json` records.
    Raises ContractError with one clear line."""
    if is_url(location):
        # Fetch the two small files into a temporary folder, so that the contract's own checks apply.
        with tempfile.TemporaryDirectory(prefix="alextrain-") as tmp:
            for name in (INFO_NAME, STATS_NAME):
                Path(tmp, name).write_bytes(_fetch(join(location, name)))
            try:
                info, stats = read_info(tmp), read_stats(tmp)
            except ContractError as e:
                raise ContractError(str(e).replace(tmp, location)) from None
    else:
        if not Path(location).is_dir():
            raise ContractError(f"{location}: no such shard folder; build one with `alexprep build-shards --out {location}`")
        info, stats = read_info(location), read_stats(location)
    folder = ShardFolder(location, info, stats)
    for name in splits:
        entry = info.get("splits", {}).get(name)
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
    The loader takes batch b from worker b % workers; the worker's j-th batch is batch
    j * workers + worker. It skips the batches before `start` and yields the rest up to `steps`."""
    skip = len(range(worker, start, workers))
    return skip, len(range(worker, steps, workers)) - skip


# ---------------------------------------------------------------------------------------------------
# The stages inside one reader


RawSample = tuple[str, str, bytes, int]  # (shard url, key, JPEG bytes, label)


def read_shard(url: str, expected: int) -> Iterator[RawSample]:
    """The samples of one shard, in file order, as raw bytes. Raises ShardError naming the shard if it
    cannot be opened or parsed, if a sample lacks `jpg` or `cls`, or if it holds another number of
    samples than `_info.json` says (a damaged tar header ends a streamed tar early without an error)."""
    count = 0
    try:
        stream = wds.gopen(url, "rb")
    except OSError as e:
        raise ShardError(f"{url}: cannot open ({e})") from None
    try:
        key, fields = None, {}
        # One sample = consecutive tar members with the same key (no dots in keys, by the contract).
        for member in itertools.chain(tar_file_iterator(stream), [None]):
            member_key, ext = base_plus_ext(member["fname"]) if member else (None, None)
            if member_key != key and key is not None:
                if "jpg" not in fields or "cls" not in fields:
                    raise ShardError(f"{url}: sample {key} lacks {'jpg' if 'jpg' not in fields else 'cls'}")
                count += 1
                yield url, key, fields["jpg"], int(fields["cls"])
                fields = {}
            if member is not None:
                key = member_key
                fields[ext] = member["data"]
    except ShardError:
        raise
    except Exception as e:  # tarfile.ReadError, OSError from a pipe, ValueError from a bad `cls`...
        reason = str(e.args[0]).split(" @ ")[0] if e.args else type(e).__name__
        raise ShardError(f"{url}: unreadable shard ({reason})") from None
    finally:
        # A pipe may report a failed exit status when closed early; a short read is caught below.
        with contextlib.suppress(OSError):
            stream.close()
    if count != expected:
        raise ShardError(f"{url}: {count} samples, {INFO_NAME} says {expected} (truncated or corrupt shard)")


def read_samples(
    split: Split, shards: list[int], stride: int | None, reader: int, *, cycle: bool, rng: random.Random | None = None, buffer: int = 1
) -> Iterator[RawSample]:
    """The reader's raw samples: one pass over its shards in order, keeping every `stride`-th sample
    if strided; with `rng`, each pass goes through a shuffle buffer of `buffer` samples (drained at
    the end of the pass, so a pass holds each of the reader's samples once); with `cycle`, pass after
    pass for ever (training), else one pass."""
    while True:
        one_pass = (
            sample
            for n, sample in enumerate(s for i in shards for s in read_shard(split.urls[i], split.lengths[i]))
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


def raw_batches(samples: Iterator[RawSample], batch_size: int) -> Iterator[list[RawSample]]:
    """Lists of batch_size samples; the last one may be shorter."""
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def decode_batch(batch: list[RawSample], out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw samples -> (uint8 (B, 3, 256, 256) RGB, int64 (B,) labels), decoded on this CPU into
    out[:B] if given (a channels_last (N >= B, 3, 256, 256) buffer), else into a new tensor."""
    # channels_last: decode_jpeg's result is an (H, W, 3) buffer viewed as (3, H, W), so copying it into
    # a channels_last batch is a straight memcpy (into NCHW it is a slow transpose); it is also the
    # layout the model takes on the GPU.
    if out is None:
        out = torch.empty(len(batch), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8, memory_format=torch.channels_last)
    images = out[: len(batch)]
    for i, (url, key, jpg, _) in enumerate(batch):
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise ShardError(f"{url}: sample {key}: JPEG does not decode ({decode_error_reason(e)})") from None
        if image.shape != images.shape[1:]:
            raise ShardError(f"{url}: sample {key}: image is {tuple(image.shape)}, expected (3, {IMAGE_SIZE}, {IMAGE_SIZE})")
        images[i] = image
    return images, torch.tensor([label for *_, label in batch], dtype=torch.int64)


def decode_error_reason(e: RuntimeError) -> str:
    """The decoder's own words from a torchvision error ("decode_jpeg, FILE.cpp:171, Invalid JPEG...")."""
    return str(e).splitlines()[0].split(", ")[-1]


def pack_batch(batch: list[RawSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Raw samples -> (uint8 all JPEG bytes end to end, int64 (B,) byte lengths, int64 (B,) labels,
    shard urls) for decoding on the device."""
    data = torch.frombuffer(bytearray(b"".join(jpg for _, _, jpg, _ in batch)), dtype=torch.uint8)
    lengths = torch.tensor([len(jpg) for _, _, jpg, _ in batch], dtype=torch.int64)
    labels = torch.tensor([label for *_, label in batch], dtype=torch.int64)
    return data, lengths, labels, sorted({url for url, *_ in batch})


class ShardStream(IterableDataset):
    """One epoch of one split on one rank, as batches; give it to `train.loader.make_loader`.

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
        decode: str = "cpu",
    ):
        if train and steps is None:
            raise ValueError("a training stream needs its number of steps")
        self.split, self.batch_size, self.train = split, batch_size, train
        self.seed, self.epoch, self.steps, self.start = seed, epoch, steps, start
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.decode = shuffle_buffer, decode

    def raw_batches(self, worker: int = 0, workers: int = 1) -> Iterator[list[RawSample]]:
        """The raw batches of loader worker `worker` of `workers` on this rank. A loader takes batch b
        from worker b % workers (while every worker still has batches), which is the epoch's order."""
        if self.train:
            # The loader asks worker 0 first; after a resume at `start` that must be the worker that
            # owns batch `start`, so worker ids rotate by `start`.
            worker = (worker + self.start) % workers
        reader, readers = self.rank * workers + worker, self.world_size * workers
        order = epoch_order(len(self.split.urls), self.seed, self.epoch, shuffle=self.train)
        shards, stride = reader_plan(order, reader, readers)
        if self.train:
            rng = random.Random(seed_for(self.seed, self.epoch, self.rank, worker))
            samples = read_samples(self.split, shards, stride, reader, cycle=True, rng=rng, buffer=self.shuffle_buffer)
            skip, count = worker_batches(self.steps, self.start, worker, workers)
            batches = itertools.islice(raw_batches(samples, self.batch_size), skip, skip + count)
        else:
            samples = read_samples(self.split, shards, stride, reader, cycle=False)
            batches = raw_batches(samples, self.batch_size)
        # Closing the reader closes the shard it is in, also when the consumer stops early.
        with contextlib.closing(samples):
            yield from batches

    def __iter__(self):
        """Batches, in this process or (as an IterableDataset) in a torch DataLoader's workers: decoded,
        or packed for decoding on the device with decode="gpu"."""
        info = get_worker_info()
        to_tensors = pack_batch if self.decode == "gpu" else decode_batch
        for batch in self.raw_batches(*((info.id, info.num_workers) if info is not None else (0, 1))):
            yield to_tensors(batch)
