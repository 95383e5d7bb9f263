"""The loader's worker processes and their ring of shared batch slots (train/loader.py): exact batches
through reused slots, JPEG bytes for decoding on the device, and failures that end in one error, not a
hang or a leftover process. Real forked workers on real tar shards of grey JPEGs (tests/grey_shards.py)."""

import io
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grey_shards import check_pixels, jpeg_of, write_folder
from prep.synthetic import photo
from train import loader as loader_module
from train.loader import DeviceLoader, ImageBatch, JpegBatch, LoaderWorkerError, WorkerLoader, decode_batch, pack_batch, reader_of
from train.stream import Sample, ShardStream, open_shards

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("shards"))


def train_stream(folder: Path, steps: int = 9, **kwargs) -> ShardStream:
    split = open_shards(str(folder)).split("train")  # 5 shards: 25 samples
    return ShardStream(split, 3, train=True, seed=5, epoch=1, steps=steps, shuffle_buffer=6, **kwargs)


def loader_children() -> list[int]:
    """Pids of this process's children that are still running (not zombies): its loader workers."""
    tasks = Path(f"/proc/{os.getpid()}/task").iterdir()
    return [int(pid) for task in tasks for pid in (task / "children").read_text().split() if running(int(pid))]


def in_turn(stream: ShardStream, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches `workers` workers make, decoded in this process, taken in turn."""
    per_worker = [[decode_batch(b) for b in stream.batches(reader_of(w, workers, stream), workers)] for w in range(workers)]
    return [batch for turn in itertools.zip_longest(*per_worker) for batch in turn if batch is not None]


def test_workers_decode_with_torchcodec_exactly_as_pil_and_without_deprecated_apis(folder):
    """The CPU decode (TorchCodec; torchvision's is deprecated) gives libjpeg-turbo's pixels, as PIL does."""
    rng, jpegs = np.random.default_rng(3), [jpeg_of(5)]
    for _ in range(3):  # photo-like q90 JPEGs with 4:2:0 chroma, as the shards hold
        out = io.BytesIO()
        Image.fromarray(photo(rng, 256, 256)).save(out, format="JPEG", quality=90)
        jpegs.append(out.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = decode_batch([Sample("shard", f"k{i}", jpg, i) for i, jpg in enumerate(jpegs)])
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.tolist() == [0, 1, 2, 3]
    for image, jpg in zip(images, jpegs):
        with Image.open(io.BytesIO(jpg)) as im:
            assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.array(im.convert("RGB"))))


@pytest.mark.parametrize("workers, depth", [(1, 1), (2, 2), (3, 1)])
def test_workers_give_the_in_process_batches_through_reused_slots(folder, workers, depth):
    expected = in_turn(train_stream(folder), workers)
    loader = WorkerLoader(train_stream(folder), workers, depth=depth)
    assert loader.reuses_buffers
    got, addresses = [], set()
    for images, labels in loader:
        assert images.is_contiguous(memory_format=torch.channels_last)
        addresses.add(images.data_ptr())
        got.append((images.clone(), labels))
    assert len(got) == len(expected) == 9
    for (a, la), (b, lb) in zip(expected, got):
        check_pixels(b, lb)
        assert torch.equal(la, lb) and torch.equal(a, b)
    # 9 batches went through at most workers x depth slots, so slots were refilled.
    assert len(addresses) <= workers * depth < 9


def test_the_slot_rule_a_workers_batch_lives_until_the_next_is_asked_for(folder):
    """A batch from the workers is a view of its slot; asking for the next batch hands the slot back, and
    the worker fills it again (one worker, one slot: the very same memory). So the device loader copies
    a batch out (on the CPU) before it asks for the next one, and what it gave stays intact."""
    batches = iter(WorkerLoader(train_stream(folder), 1, depth=1))
    first = next(batches)
    kept = first.images.clone()
    second = next(batches)
    assert first.images.data_ptr() == second.images.data_ptr() and torch.equal(first.images, second.images)
    assert not torch.equal(kept, second.images)
    batches.close()


def test_device_loader_on_the_cpu_copies_batches_out_of_the_slots(folder):
    batches = list(DeviceLoader(train_stream(folder), CPU, workers=2, depth=1))
    expected = in_turn(train_stream(folder), 2)
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(batches, expected))
    assert len({images.data_ptr() for images, _ in batches}) == 9


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_says_what_it_is(folder, workers):
    """Decoded on the CPU or JPEG bytes for the device: two named kinds, whatever the transport."""
    images, labels = batch = next(iter(WorkerLoader(train_stream(folder), workers)))
    assert type(batch) is ImageBatch and images.shape == (3, 3, 256, 256) and labels.dtype == torch.int64
    packed = next(iter(WorkerLoader(train_stream(folder), workers, decode="gpu")))
    assert type(packed) is JpegBatch and packed.lengths.sum() == packed.data.numel() and packed.labels.shape == (3,)
    assert all(url.startswith(str(folder)) and url.endswith(".tar") for url in packed.urls)
    with pytest.raises(ValueError, match="unknown decode 'fpga'; one of cpu, gpu, both"):
        WorkerLoader(train_stream(folder), workers, decode="fpga")


def oversized_jpeg(i: int) -> bytes:
    """The grey JPEG of sample i with four 64 KB application segments after its start marker: a valid
    JPEG larger than its 196,608 bytes of pixels."""
    jpg = jpeg_of(i)
    padding = b"".join(b"\xff\xe5" + (65000).to_bytes(2, "big") + bytes([i]) * 64998 for _ in range(4))
    return jpg[:2] + padding + jpg[2:]


def test_jpeg_bytes_for_the_device_go_through_slots_or_spill_when_larger(tmp_path):
    # Validation shard 0 holds samples 0..2, oversized; shard 1 samples 3..5. Two workers, one shard each.
    folder = write_folder(tmp_path, train_lengths=(4, 4), val_lengths=(3, 3), jpeg=lambda i: oversized_jpeg(i) if i < 3 else jpeg_of(i))
    split = open_shards(str(folder)).split("validation")
    stream = ShardStream(split, 3, train=False)
    raw = [pack_batch(b) for b in stream.batches(0, 2)] + [pack_batch(b) for b in stream.batches(1, 2)]
    got = [(data.clone(), lengths, labels, urls) for data, lengths, labels, urls in WorkerLoader(stream, 2, decode="gpu")]
    assert len(got) == len(raw) == 2
    for (a, la, ca, ua), (b, lb, cb, ub) in zip(raw, got):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ca, cb) and ua == ub
    assert got[0][1].sum() > 3 * 256 * 256 * 3  # the first batch did not fit its slot
    decoded = list(DeviceLoader(stream, CPU, workers=2, decode="gpu"))
    for images, labels in decoded:
        check_pixels(images, labels)
    assert sorted(sum((labels.tolist() for _, labels in decoded), [])) == [0, 1, 2, 3, 4, 5]


def test_both_leaves_to_the_device_only_the_batches_started_while_training_waits(folder):
    # Training steps of 0.2 s: once started, the workers are ahead, so no batch they start finds the
    # main process waiting, and they decode every one. Worker 0's first batch starts while the main
    # process waits for it: its JPEG bytes go to the device.
    loader = DeviceLoader(train_stream(folder, steps=10), CPU, workers=2, decode="both", depth=2)
    got, on_device = [], []
    for images, labels in loader:
        on_device.append(loader.decoded_here - sum(on_device))
        got.append((images, labels))
        time.sleep(0.2)
    assert on_device[0] == 1 and on_device[-4:] == [0, 0, 0, 0]
    expected = in_turn(train_stream(folder, steps=10), 2)
    assert len(got) == len(expected) == 10
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(expected, got))


def test_a_killed_worker_is_an_error_naming_it(folder):
    batches = iter(WorkerLoader(train_stream(folder, steps=40), 2, depth=1))
    next(batches)
    victim = loader_children()[1]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(LoaderWorkerError, match=rf"^loader worker 1 \(pid {victim}\) died \(exit code -9\)$"):
        for _ in batches:
            pass
    assert loader_children() == []


def test_a_failing_worker_is_one_line_and_its_traceback_goes_to_stderr(folder, monkeypatch, capfd):
    def broken(batch, out=None):
        raise ValueError("no decoder today\nsecond line")

    monkeypatch.setattr(loader_module, "decode_batch", broken)  # the forked workers inherit it
    with pytest.raises(LoaderWorkerError) as e:
        list(WorkerLoader(train_stream(folder), 2))
    assert str(e.value) == "loader worker 0 failed: ValueError: no decoder today (traceback above)"
    assert capfd.readouterr().err.startswith("Traceback (most recent call last):\n")
    assert loader_children() == []


def test_stopping_early_stops_the_workers(folder):
    batches = iter(WorkerLoader(train_stream(folder, steps=40), 2))
    next(batches)
    assert len(loader_children()) == 2
    batches.close()
    assert loader_children() == []


def test_workers_end_when_the_main_process_is_killed(folder):
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from train.loader import WorkerLoader
        from train.stream import ShardStream, open_shards
        split = open_shards({str(folder)!r}).split("train")
        batches = iter(WorkerLoader(ShardStream(split, 3, train=True, steps=40), 2, depth=1))
        next(batches)
        children = [c for t in os.listdir("/proc/self/task") for c in open(f"/proc/self/task/{{t}}/children").read().split()]
        print(" ".join(children), flush=True)
        time.sleep(60)
    """)
    main = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in main.stdout.readline().split()]
        assert len(workers) == 2
        main.kill()
        main.wait()
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in workers)
    finally:
        main.kill()
        main.stdout.close()


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_device_loader_locks_pages_only_when_workers_decode_for_cuda(folder):
    cuda = torch.device("cuda")
    assert DeviceLoader(train_stream(folder), cuda, workers=2).loader.pin
    assert DeviceLoader(train_stream(folder), cuda, workers=2, decode="both").loader.pin
    assert not DeviceLoader(train_stream(folder), cuda, workers=2, decode="gpu").loader.pin
    assert not DeviceLoader(train_stream(folder), CPU, workers=2).loader.pin
    with pytest.raises(ValueError, match="at least one slot"):
        WorkerLoader(train_stream(folder), 2, depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_come_from_page_locked_slots_and_equal_the_cpu_ones(folder):
    cuda = torch.device("cuda")
    for images, _ in DeviceLoader(train_stream(folder), cuda, workers=2).loader:
        assert images.is_pinned()
        break
    got = list(DeviceLoader(train_stream(folder), cuda, workers=2))
    expected = in_turn(train_stream(folder), 2)
    assert len(got) == len(expected) == 9
    for (a, la), (b, lb) in zip(expected, got):
        assert b.is_cuda and b.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a, b.cpu()) and torch.equal(la, lb.cpu())
