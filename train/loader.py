"""Batches from a ShardStream to the training device: decoding, loader worker processes, and the copy to the GPU.

`DeviceLoader(stream, device, workers=...)` is the one road from a stream to (uint8 images, int64
labels) batches on the device, for training, evaluation and the benchmarks alike.

Two kinds of batch travel from the workers: an `ImageBatch` (decoded on the CPU with TorchCodec) or a
`JpegBatch` (the JPEG bytes, for the device to decode). Which the workers make is the decode policy
(`decode`): "cpu" always the first, "gpu" always the second, "both" the second only for the batches a
worker starts while the main process is waiting for data (a byte in another shared page says so).

Each worker owns `depth` slots of one anonymous shared mapping, made once per epoch before the workers
are forked (why not torch's DataLoader: docs/loader.md):

    worker w: [slot 0][slot 1][slot 2][slot 3]      B x 256 x 256 x 3 bytes each (or the batch's JPEGs)

A worker decodes a batch straight into a free slot (or puts its JPEG bytes there) and sends a small
message naming the slot; on CUDA the mapping is page-locked once, so the copy to the GPU is a DMA
straight out of the slot, on a side stream that overlaps the previous step's compute.

The slot rule: a batch from the workers is a view of a slot, and the slot is handed back to its
worker (to be filled again) when the next batch is asked for. So whoever asks for the next batch must
be done with the last one: `DeviceLoader` copies it out of the slot (on the CPU) or waits until the
device has read it (on CUDA) before it asks.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torchcodec.decoders import decode_jpeg

from prep.contract import IMAGE_SIZE
from prep.text import first_line
from train.config import ConfigError
from train.device_decode import DECODES, make_decoder
from train.stream import Sample, ShardError, ShardStream

DEPTH = 4  # slots per worker: batches a worker may have decoded ahead, plus the one being filled
STOP_GRACE = 1.0  # seconds workers get to end by themselves (EOF on their pipe) before SIGTERM
SLOT_IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


class LoaderWorkerError(RuntimeError):
    """A loader worker died, or failed with something other than a ShardError; one line."""


class ImageBatch(NamedTuple):
    """A batch decoded on the CPU."""

    images: torch.Tensor  # uint8 (B, 3, 256, 256) RGB, channels_last
    labels: torch.Tensor  # int64 (B,)


class JpegBatch(NamedTuple):
    """A batch for the device to decode."""

    data: torch.Tensor  # uint8: the B JPEG files end to end
    lengths: torch.Tensor  # int64 (B,): each file's bytes
    labels: torch.Tensor  # int64 (B,)
    urls: list[str]  # the shards the samples came from, for error messages


def decode_batch(batch: list[Sample], out: torch.Tensor | None = None) -> ImageBatch:
    """Decode raw samples on this CPU into out[:B] if given (a channels_last (N >= B, 3, 256, 256)
    uint8 buffer), else into a new tensor. Raises ShardError naming the shard and sample of a JPEG
    that does not decode or is not 256 x 256 RGB."""
    # channels_last: the decoder's result is an (H, W, 3) buffer viewed as (3, H, W), so copying it into
    # a channels_last batch is a straight memcpy (into NCHW it is a slow transpose); it is also the
    # layout the model takes on the GPU.
    if out is None:
        out = torch.empty(len(batch), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8, memory_format=torch.channels_last)
    images = out[: len(batch)]
    for i, sample in enumerate(batch):
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(sample.jpg), dtype=torch.uint8), mode="RGB")
        except RuntimeError as e:
            raise ShardError(f"{sample.url}: sample {sample.key}: JPEG does not decode ({decode_error_reason(e)})") from None
        if image.shape != images.shape[1:]:
            raise ShardError(f"{sample.url}: sample {sample.key}: image is {tuple(image.shape)}, expected (3, {IMAGE_SIZE}, {IMAGE_SIZE})")
        images[i] = image
    return ImageBatch(images, torch.tensor([s.label for s in batch], dtype=torch.int64))


def decode_error_reason(e: RuntimeError) -> str:
    """The decoder's own words from a TorchCodec or torchvision error ("decode_jpeg, FILE.cpp:171, Invalid JPEG...")."""
    return first_line(e).split(", ")[-1]


def pack_batch(batch: list[Sample]) -> JpegBatch:
    """Raw samples -> their JPEG bytes end to end, for decoding on the device."""
    data = torch.frombuffer(bytearray(b"".join(s.jpg for s in batch)), dtype=torch.uint8)
    lengths = torch.tensor([len(s.jpg) for s in batch], dtype=torch.int64)
    labels = torch.tensor([s.label for s in batch], dtype=torch.int64)
    return JpegBatch(data, lengths, labels, sorted({s.url for s in batch}))


def check_host_memory(batch_size: int, workers: int, depth: int = DEPTH) -> None:
    """Raise ConfigError (one line) when the loader's batches would take more memory than this machine
    has available: `depth` slots of `batch_size` images per worker (one batch without workers). A
    mapping that large fails with ENOMEM, or is filled until the kernel kills the run."""
    needed = batch_size * SLOT_IMAGE_BYTES * (workers * depth if workers else 1)
    available = available_memory()
    if needed > available:
        slots = f"{workers} workers x {depth} batches" if workers else "one batch"
        raise ConfigError(f"batch_size {batch_size}: the loader's batches take {needed / 1e9:.1f} GB ({slots} of {batch_size} x "
                          f"{SLOT_IMAGE_BYTES:,} bytes), more than the {available / 1e9:.1f} GB of memory available here")


def available_memory() -> int:
    """Bytes of memory this process can still fill: the kernel's MemAvailable, or less where a cgroup
    (a container's limit) allows less; the physical memory where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # cgroup v2: memory.max is "max" or a number of bytes
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            available = min(available, int(limit) - int(used))
    except OSError:
        pass
    return available


def reader_of(worker: int, workers: int, stream: ShardStream) -> int:
    """The stream reader (`ShardStream.batches`) that loader worker `worker` of `workers` runs.

    The turn order, which exact resume depends on: the loader takes one batch from each worker in turn,
    worker 0 first, so its k-th batch is the next of worker k % workers; that worker runs reader
    (k + start) % workers, whose next batch is the epoch's batch start + k. So the k-th batch is the
    epoch's batch start + k, and which reader (shards, shuffle seed) a batch comes from does not depend
    on where the epoch was resumed. (An evaluation stream starts at 0: worker w runs reader w.)"""
    return (worker + stream.start) % workers


# Messages from a worker to the main process (the main process sends back only freed slot numbers).
class _Decoded(NamedTuple):
    slot: int
    labels: list[int]


class _Packed(NamedTuple):
    slot: int
    labels: list[int]
    lengths: list[int]
    urls: list[str]
    spilled: bytes | None  # the JPEG bytes when they did not fit the slot, else None


class _Finished(NamedTuple):
    pass


class _Failed(NamedTuple):
    message: str  # one line
    shard_error: bool  # a ShardError (bad data) rather than a bug or a crash


class WorkerLoader:
    """Iterates a ShardStream's batches as ImageBatch or JpegBatch (see the module docstring; with no
    workers, "both" decodes on the CPU). With workers, a batch is a view of a slot that is reused once
    the next batch is asked for (`reuses_buffers`): copy out what must outlive that."""

    def __init__(self, stream: ShardStream, workers: int, *, decode: str = "cpu", pin: bool = False, depth: int = DEPTH):
        if depth < 1:
            raise ValueError("a loader worker needs at least one slot")
        if decode not in DECODES:
            raise ValueError(f"unknown decode {decode!r}; one of {', '.join(DECODES)}")
        self.stream, self.workers, self.decode, self.pin, self.depth = stream, workers, decode, pin, depth
        self.slot_bytes = stream.batch_size * SLOT_IMAGE_BYTES
        self.reuses_buffers = workers > 0

    def __iter__(self) -> Iterator[ImageBatch | JpegBatch]:
        if self.workers == 0:
            to_batch = pack_batch if self.decode == "gpu" else decode_batch
            return (to_batch(batch) for batch in self.stream.batches())
        return self._from_workers()

    def _from_workers(self) -> Iterator[ImageBatch | JpegBatch]:
        context = multiprocessing.get_context("fork")  # workers inherit the stream and the mapping
        buffers = [mmap.mmap(-1, self.depth * self.slot_bytes) for _ in range(self.workers)]  # MAP_SHARED
        slots = [torch.frombuffer(b, dtype=torch.uint8).view(self.depth, self.slot_bytes) for b in buffers]
        waiting = mmap.mmap(-1, 1)  # waiting[0] == 1 while the main process waits for a batch
        waiting[0] = 1  # it does until the first batch comes
        pipes = [context.Pipe() for _ in range(self.workers)]  # (main's end, worker's end)
        processes, pinned = [], []
        try:
            for w in range(self.workers):
                process = context.Process(target=_worker_main, args=(self, w, slots[w], waiting, pipes), daemon=True,
                                          name=f"alextrain-loader-{w}")
                process.start()
                processes.append(process)
                pipes[w][1].close()  # the worker's end lives in the worker only, so its death shows as EOF here
            if self.pin:
                pinned = _page_lock(slots)  # while the workers start
            yield from self._batches(processes, [main_end for main_end, _ in pipes], slots, waiting)
        finally:
            for main_end, _ in pipes:
                main_end.close()  # a worker waiting for a slot sees EOF and ends
            deadline = time.monotonic() + STOP_GRACE
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in processes:
                if process.is_alive():  # stuck in a read (a stalled server, a hanging pipe: command)
                    process.terminate()
            for process in processes:
                process.join()
            if pinned:
                torch.cuda.synchronize()  # no copy may still read a slot
                for ptr in pinned:
                    torch.cuda.cudart().cudaHostUnregister(ptr)

    def _batches(self, processes, conns, slots, waiting) -> Iterator[ImageBatch | JpegBatch]:
        """The workers' batches, taken in turn (`reader_of`); when a worker has no batches left
        (evaluation), the others go on in turn. A batch's slot goes back to its worker when the next
        batch is asked for (the slot rule, module docstring)."""
        images = [s.view(self.depth, -1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 1, 4, 2, 3) for s in slots]  # channels_last
        active, turn, held = list(range(self.workers)), 0, None
        while active:
            w = active[turn % len(active)]
            if held is not None:
                with contextlib.suppress(OSError):  # a worker that has finished has closed its pipe
                    conns[held[0]].send(held[1])
                held = None
            if not conns[w].poll(0):
                waiting[0] = 1
            message = _receive(conns[w], processes[w], w)
            waiting[0] = 0
            if isinstance(message, _Finished):
                active.remove(w)
                continue
            labels = torch.tensor(message.labels, dtype=torch.int64)
            held, turn = (w, message.slot), turn + 1
            if isinstance(message, _Decoded):
                yield ImageBatch(images[w][message.slot][: len(labels)], labels)
            else:
                data = (torch.frombuffer(bytearray(message.spilled), dtype=torch.uint8) if message.spilled
                        else slots[w][message.slot][: sum(message.lengths)])
                yield JpegBatch(data, torch.tensor(message.lengths, dtype=torch.int64), labels, message.urls)


def _receive(conn, process, w: int) -> _Decoded | _Packed | _Finished:
    """The next message of worker `w`; raises its ShardError, or LoaderWorkerError if it failed or died."""
    while not conn.poll(1.0):
        if not process.is_alive():
            break
    try:
        message = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        raise LoaderWorkerError(f"loader worker {w} (pid {process.pid}) died (exit code {process.exitcode})") from None
    if isinstance(message, _Failed):
        raise (ShardError if message.shard_error else LoaderWorkerError)(message.message)
    return message


def _worker_main(loader: WorkerLoader, w: int, slots: torch.Tensor, waiting: mmap.mmap, pipes) -> None:
    """Worker `w`: decode its batches of the stream into its slots (or put their JPEG bytes there),
    telling the main process which."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the main process stops the workers
    signal.signal(signal.SIGTERM, _stop)  # ...with SIGTERM: unwind, so the open shard (a pipe: command too) is closed
    for i, (main_end, worker_end) in enumerate(pipes):
        main_end.close()  # so that the main process's death shows as EOF here
        if i != w:
            worker_end.close()
    conn = pipes[w][1]
    torch.set_num_threads(1)
    free = list(range(loader.depth))
    images = slots.view(loader.depth, -1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 1, 4, 2, 3)
    try:
        for batch in loader.stream.batches(reader_of(w, loader.workers, loader.stream), loader.workers):
            if not free:
                free.append(conn.recv())  # the main process hands a slot back
            slot = free.pop(0)
            labels = [s.label for s in batch]
            if loader.decode == "cpu" or (loader.decode == "both" and not waiting[0]):
                decode_batch(batch, out=images[slot])
                conn.send(_Decoded(slot, labels))
            else:
                conn.send(_Packed(slot, labels, *_pack(batch, slots[slot])))
        conn.send(_Finished())
    except (EOFError, BrokenPipeError, ConnectionResetError, SystemExit):
        pass  # the main process has gone or stopped early
    except ShardError as e:
        with contextlib.suppress(OSError):
            conn.send(_Failed(str(e), shard_error=True))
    except BaseException as e:
        # A bug: its traceback goes to this process's stderr (the terminal), the one-line summary to the main process.
        traceback.print_exc(file=sys.stderr)
        with contextlib.suppress(OSError):
            conn.send(_Failed(f"loader worker {w} failed: {type(e).__name__}: {first_line(e)} (traceback above)", shard_error=False))


def _stop(signum, frame) -> None:
    # Once: a second SIGTERM while the first unwinds (closing a shard or a generator) would print an
    # "Exception ignored" traceback instead of ending quietly.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(0)


def _pack(batch: list[Sample], slot: torch.Tensor) -> tuple[list[int], list[str], bytes | None]:
    """The batch's JPEGs end to end in `slot` for decoding on the device: (byte lengths, shard urls,
    None); if they do not fit (JPEGs larger than their raw pixels), (lengths, urls, the bytes)."""
    packed = pack_batch(batch)
    if packed.data.numel() > slot.numel():
        return packed.lengths.tolist(), packed.urls, packed.data.numpy().tobytes()
    slot[: packed.data.numel()].copy_(packed.data)
    return packed.lengths.tolist(), packed.urls, None


def _page_lock(slots: list[torch.Tensor]) -> list[int]:
    """Register the slots with CUDA as page-locked memory; returns the registered pointers. If CUDA
    refuses, warns and returns what it locked: copies from the others are then synchronous."""
    pinned = []
    for s in slots:
        error = int(torch.cuda.cudart().cudaHostRegister(s.data_ptr(), s.numel(), 0))
        if error:
            warnings.warn(f"cudaHostRegister failed (cudaError {error}): loader batches are copied to the GPU from pageable memory", stacklevel=3)
            break
        pinned.append(s.data_ptr())
    return pinned


class DeviceLoader:
    """A stream's batches on `device` as (uint8 (B, 3, 256, 256), int64 (B,)): read by `workers`
    processes (0: in this one) and decoded as the policy `decode` says (DECODES; "gpu" and "both"
    decode on the device with `gpu_decoder`, train/device_decode.py). `wait` accumulates the seconds
    spent blocked on the workers (the data-wait share's numerator); `reset_wait()` returns and zeroes
    it. `decoded_here` counts the batches decoded on the device.

    On CUDA the workers' slots are page-locked (when they decode) and the copy runs on a side stream,
    so it overlaps the step the caller has just queued; the compute stream waits for it before the
    batch is used. The slot rule (module docstring) holds because a batch is copied out of its slot,
    or the device has read it, before the next one is asked for."""

    def __init__(self, stream: ShardStream, device: torch.device, *, workers: int, decode: str = "cpu",
                 gpu_decoder: str = "torchvision", depth: int = DEPTH):
        self.loader = WorkerLoader(stream, workers, decode=decode, pin=device.type == "cuda" and decode != "gpu", depth=depth)
        self.device, self.wait, self.decoded_here = device, 0.0, 0
        self.decoder = make_decoder(gpu_decoder, device) if decode != "cpu" else None
        self.copy_stream = None  # made when iterating: building a loader needs no CUDA

    def reset_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait

    def __iter__(self):
        if self.device.type == "cuda" and self.loader.decode != "gpu" and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(self.device)
        t0 = time.perf_counter()
        batches = iter(self.loader)  # starts the workers: part of the wait
        read = None  # CUDA event: the last batch's host memory has been read
        while True:
            if read is not None:
                read.synchronize()  # the slot rule: the device has read the last batch's slot
            batch = next(batches, None)
            self.wait += time.perf_counter() - t0
            if batch is None:
                return
            images, labels, read = self.to_device(batch)
            yield images, labels
            t0 = time.perf_counter()

    def to_device(self, batch: ImageBatch | JpegBatch) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """(images, labels, an event recorded once `batch` has been read, or None on the CPU)."""
        if isinstance(batch, ImageBatch):
            images, labels = batch
            if self.device.type != "cuda":  # the slot rule: a copy outlives the slot
                return (images.clone() if self.loader.reuses_buffers else images), labels, None
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                read = torch.cuda.Event()
                read.record()
            compute.wait_event(read)
            images.record_stream(compute)  # made on the copy stream, used on the compute stream
            labels.record_stream(compute)
            return images, labels, read
        data, lengths, labels, urls = batch
        self.decoded_here += 1
        try:
            # The decoder takes the bytes on the CPU and decodes the whole batch in one call on the device.
            images = self.decoder(list(torch.split(data, lengths.tolist())))
        except RuntimeError as e:
            raise ShardError(f"{', '.join(urls)}: a JPEG does not decode ({decode_error_reason(e)})") from None
        read = torch.cuda.Event() if self.device.type == "cuda" else None
        if read is not None:
            read.record()
        return images, labels.to(self.device, non_blocking=True), read
