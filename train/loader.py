"""Batches from a ShardStream to the training device: loader worker processes and the copy to the GPU.

torch's DataLoader hands every batch a worker makes to the main process through a fresh shared-memory
segment: the worker faults in new pages for the batch, copies it into a new segment, the main process
maps that segment, and on CUDA a pin-memory thread copies the batch once more into page-locked memory.
Here instead each worker owns `depth` slots of one shared mapping, made once per epoch before the
workers are forked, each slot big enough for one batch:

    worker w: [slot 0][slot 1][slot 2][slot 3]      B x 256 x 256 x 3 bytes each (or the batch's JPEGs)

A worker decodes a batch straight into a free slot and sends the slot's number and the labels through
its pipe; the main process yields a view of the slot and hands the slot back when the next batch is
asked for. With decode="gpu" a worker puts the batch's JPEG bytes in the slot instead, for decoding on
the device; with decode="both" it does that only for the batches it starts while the main process is
waiting for data (a byte in another shared page says so), and decodes the others itself: the CPU
workers decode all they can, and the device decodes what they cannot keep up with. No page is allocated, copied or mapped per batch, and nothing lives in /dev/shm (the
mapping is anonymous, so a killed run leaves nothing behind). On CUDA the mapping is page-locked once
(cudaHostRegister), so the copy to the GPU is a DMA straight out of the slot, on a side stream that
overlaps the previous step's compute.

Order: batch b comes from worker b % workers, as with DataLoader (ShardStream relies on it for exact
resumes); when a worker has no batches left (evaluation), the others go on in turn.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import signal
import time
import traceback
import warnings
from collections.abc import Iterator

import torch

from prep.contract import IMAGE_SIZE
from train.device_decode import make_decoder
from train.stream import ShardError, ShardStream, decode_batch, decode_error_reason, pack_batch

DEPTH = 4  # slots per worker: batches a worker may have decoded ahead, plus the one being filled
SLOT_IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * 3


class LoaderWorkerError(RuntimeError):
    """A loader worker died or failed with something other than a ShardError."""


def make_loader(stream: ShardStream, workers: int, device: torch.device, depth: int = DEPTH) -> WorkerLoader:
    """The stream's batches on the host, decoded by `workers` processes (0: in this one); the slots
    are page-locked when `device` is CUDA and the workers decode there (decode "cpu" or "both")."""
    return WorkerLoader(stream, workers, pin=device.type == "cuda" and stream.decode != "gpu", depth=depth)


class WorkerLoader:
    """Iterates a ShardStream's batches: (uint8 (B, 3, 256, 256) channels_last, int64 (B,)) decoded
    on the CPU, or (JPEG bytes end to end, byte lengths, labels, shard urls) for the device to decode:
    the first kind with decode="cpu", the second with "gpu", either with "both" (in this process:
    the first). With workers, a batch is a view of a slot that is reused once the next batch is asked
    for (`reuses_buffers`): copy out what must outlive that."""

    def __init__(self, stream: ShardStream, workers: int, *, pin: bool = False, depth: int = DEPTH):
        if depth < 1:
            raise ValueError("a loader worker needs at least one slot")
        self.stream, self.workers, self.pin, self.depth = stream, workers, pin, depth
        self.slot_bytes = stream.batch_size * SLOT_IMAGE_BYTES
        self.reuses_buffers = workers > 0

    def __iter__(self) -> Iterator[tuple]:
        if self.workers == 0:
            return iter(self.stream)
        return self._from_workers()

    def _from_workers(self) -> Iterator[tuple]:
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
            for process in processes:
                process.terminate()
            for process in processes:
                process.join()
            if pinned:
                torch.cuda.synchronize()  # no copy may still read a slot
                for ptr in pinned:
                    torch.cuda.cudart().cudaHostUnregister(ptr)

    def _batches(self, processes, conns, slots, waiting) -> Iterator[tuple]:
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
            kind, *payload = _receive(conns[w], processes[w], w)
            waiting[0] = 0
            if kind == "end":
                active.remove(w)
                continue
            slot, n, labels, packed = payload
            labels = torch.tensor(labels, dtype=torch.int64)
            held, turn = (w, slot), turn + 1
            if kind == "images":
                yield images[w][slot][:n], labels
            else:
                lengths, urls, spilled = packed
                data = torch.frombuffer(bytearray(spilled), dtype=torch.uint8) if spilled else slots[w][slot][: sum(lengths)]
                yield data, torch.tensor(lengths, dtype=torch.int64), labels, urls


def _receive(conn, process, w: int) -> tuple:
    """The next message of worker `w`; raises its ShardError, or LoaderWorkerError if it failed or died."""
    while not conn.poll(1.0):
        if not process.is_alive():
            break
    try:
        kind, *payload = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        raise LoaderWorkerError(f"loader worker {w} (pid {process.pid}) died (exit code {process.exitcode})") from None
    if kind == "shard_error":
        raise ShardError(payload[0])
    if kind == "failed":
        raise LoaderWorkerError(f"loader worker {w} failed:\n{payload[0]}")
    return (kind, *payload)


def _worker_main(loader: WorkerLoader, w: int, slots: torch.Tensor, waiting: mmap.mmap, pipes) -> None:
    """Worker `w`: decode its batches of the stream into its slots (or put their JPEG bytes there),
    telling the main process which."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the main process stops the workers
    for i, (main_end, worker_end) in enumerate(pipes):
        main_end.close()  # so that the main process's death shows as EOF here
        if i != w:
            worker_end.close()
    conn = pipes[w][1]
    torch.set_num_threads(1)
    stream, free = loader.stream, list(range(loader.depth))
    images = slots.view(loader.depth, -1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 1, 4, 2, 3)
    try:
        for batch in stream.raw_batches(w, loader.workers):
            if not free:
                free.append(conn.recv())  # the main process hands a slot back
            slot = free.pop(0)
            labels = [label for *_, label in batch]
            if stream.decode == "cpu" or (stream.decode == "both" and not waiting[0]):
                decode_batch(batch, out=images[slot])
                conn.send(("images", slot, len(batch), labels, None))
            else:
                conn.send(("jpegs", slot, len(batch), labels, _pack(batch, slots[slot])))
        conn.send(("end",))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the main process has gone or stopped early
    except ShardError as e:
        with contextlib.suppress(OSError):
            conn.send(("shard_error", str(e)))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("failed", traceback.format_exc()))


def _pack(batch, slot: torch.Tensor) -> tuple[list[int], list[str], bytes | None]:
    """The batch's JPEGs end to end in `slot` for decoding on the device: (byte lengths, shard urls,
    None); if they do not fit (JPEGs larger than their raw pixels), (lengths, urls, the bytes)."""
    data, lengths, _, urls = pack_batch(batch)
    if data.numel() > slot.numel():
        return lengths.tolist(), urls, data.numpy().tobytes()
    slot[: data.numel()].copy_(data)
    return lengths.tolist(), urls, None


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
    """Iterates a loader and yields (uint8 (B, 3, 256, 256), int64 (B,)) batches on `device`,
    decoding there, with `gpu_decoder` (train/device_decode.py), the batches that come as JPEG bytes.
    `wait` accumulates the seconds spent blocked on the loader (the data-wait share's numerator);
    `reset_wait()` returns and zeroes it. `decoded_here` counts the batches decoded on the device.

    On CUDA the copy runs on a side stream, so it overlaps the step the caller has just queued; the
    compute stream waits for it before the batch is used. The loader's slot is handed back only
    once the copy (or the decode) has read it."""

    def __init__(self, loader: WorkerLoader, device: torch.device, gpu_decoder: str = "torchvision"):
        self.loader, self.device = loader, device
        self.wait, self.decoded_here = 0.0, 0
        decode = loader.stream.decode
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and decode != "gpu" else None
        self.decoder = make_decoder(gpu_decoder, device) if decode != "cpu" else None

    def reset_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait

    def __iter__(self):
        t0 = time.perf_counter()
        batches = iter(self.loader)  # starts the workers: part of the wait
        read = None  # CUDA event: the last batch's host memory has been read
        while True:
            if read is not None:
                read.synchronize()
            batch = next(batches, None)
            self.wait += time.perf_counter() - t0
            if batch is None:
                return
            images, labels, read = self.to_device(batch)
            yield images, labels
            t0 = time.perf_counter()

    def to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        """(images, labels, an event recorded once `batch` has been read, or None on the CPU)."""
        if len(batch) == 2:  # decoded on the CPU
            images, labels = batch
            if self.device.type != "cuda":
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
