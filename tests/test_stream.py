"""The streaming input: shard plans, exact coverage per epoch, resume positions, errors, URL prefixes.

Shards here are written by `grey_shards.write_folder`: real tar files of real 256x256 JPEGs where
sample i has label i and a flat grey level that encodes i, so a lost, repeated or mismatched sample
shows at once.
"""

import contextlib
import functools
import hashlib
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from grey_shards import check_pixels, jpeg_of, write_folder, write_tar
from prep.contract import ContractError
from train.loader import DeviceLoader
from train.remote import RemoteReads, join
from train.stream import ShardError, ShardStream, epoch_order, open_shards, read_shard, reader_batches, reader_plan

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("shards"))


def collect(stream: ShardStream, workers: int, decode: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DeviceLoader(stream, CPU, workers=workers, decode=decode))


def test_read_shard_yields_raw_samples_in_file_order(folder):
    split = open_shards(str(folder)).split("train")
    samples = list(read_shard(split.urls[1], 3, split.num_classes))
    assert [(key, label) for _, key, _, label in samples] == [("train_00007", 7), ("train_00008", 8), ("train_00009", 9)]
    assert samples[0][2] == jpeg_of(7) and samples[0][0] == str(folder / "train-000001.tar")


def test_reader_plan_deals_shards_or_samples_without_overlap():
    order = [4, 0, 3, 1, 2]
    assert [reader_plan(order, r, 2) for r in range(2)] == [([4, 3, 2], None), ([0, 1], None)]
    assert reader_plan(order, 5, 6) == ([4, 0, 3, 1, 2], 6)
    assert epoch_order(5, seed=1, epoch=0, shuffle=True) == epoch_order(5, seed=1, epoch=0, shuffle=True)
    assert sorted(epoch_order(50, seed=1, epoch=3, shuffle=True)) == list(range(50))
    assert epoch_order(50, seed=1, epoch=3, shuffle=True) != epoch_order(50, seed=1, epoch=4, shuffle=True)
    assert epoch_order(5, seed=1, epoch=3, shuffle=False) == [0, 1, 2, 3, 4]


def test_reader_batches_split_a_rank_steps_among_readers():
    # 10 steps over 3 readers: reader 0 has batches 0, 3, 6, 9; reader 1 1, 4, 7; reader 2 2, 5, 8.
    assert [reader_batches(10, 0, r, 3) for r in range(3)] == [(0, 4), (0, 3), (0, 3)]
    # Resumed after 4 steps: batches 4..9 remain (reader 0: 6, 9; reader 1: 4, 7; reader 2: 5, 8).
    assert [reader_batches(10, 4, r, 3) for r in range(3)] == [(2, 2), (1, 2), (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_validation_sees_every_sample_exactly_once(folder, world_size, workers):
    split = open_shards(str(folder)).split("validation")  # 3 shards: 11 samples
    labels = []
    for rank in range(world_size):
        stream = ShardStream(split, 4, train=False, rank=rank, world_size=world_size)
        for images, batch_labels in collect(stream, workers):
            check_pixels(images, batch_labels)
            labels += batch_labels.tolist()
    assert sorted(labels) == list(range(11))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epoch_has_fixed_steps_and_disjoint_ranks(folder, workers):
    split = open_shards(str(folder)).split("train")  # 5 shards: 25 samples
    seen = []
    for rank in range(2):
        stream = ShardStream(split, 3, train=True, seed=7, epoch=1, steps=4, rank=rank, world_size=2, shuffle_buffer=8)
        batches = collect(stream, workers)
        assert [len(labels) for _, labels in batches] == [3, 3, 3, 3]
        for images, labels in batches:
            check_pixels(images, labels)
        seen.append({label for _, labels in batches for label in labels.tolist()})
    assert not seen[0] & seen[1]


def test_training_stream_depends_only_on_seed_and_epoch(folder):
    split = open_shards(str(folder)).split("train")

    def labels(epoch, workers, seed=7):
        stream = ShardStream(split, 5, train=True, seed=seed, epoch=epoch, steps=5, shuffle_buffer=10)
        return [b.tolist() for _, b in collect(stream, workers)]

    first = labels(0, 0)
    assert labels(0, 0) == first
    assert sorted(sum(first, [])) == list(range(25))  # 1 reader, 25 samples, 25 per epoch: each once
    assert labels(1, 0) != first and labels(0, 0, seed=8) != first


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [1, 2, 5])
def test_resume_at_a_step_gives_the_rest_of_the_epoch(folder, workers, start):
    split = open_shards(str(folder)).split("train")
    kwargs = dict(train=True, seed=3, epoch=2, steps=7, shuffle_buffer=6)
    full = collect(ShardStream(split, 4, **kwargs), workers)
    rest = collect(ShardStream(split, 4, start=start, **kwargs), workers)
    assert len(full) == 7 and len(rest) == 7 - start
    for (a, la), (b, lb) in zip(full[start:], rest):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_decode_on_device_equals_decode_in_workers(folder):
    split = open_shards(str(folder)).split("validation")
    cpu = collect(ShardStream(split, 4, train=False), 0)
    device = collect(ShardStream(split, 4, train=False), 0, decode="gpu")
    assert len(cpu) == len(device) == 3
    for (a, la), (b, lb) in zip(cpu, device):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_missing_folder_missing_stats_and_truncated_shard_are_one_line_errors(tmp_path):
    with pytest.raises(ContractError, match="no such shard folder"):
        open_shards(str(tmp_path / "nowhere"))
    folder = write_folder(tmp_path / "a")
    (folder / "stats.json").unlink()
    with pytest.raises(ContractError, match=r"stats\.json: no stats\.json here"):
        open_shards(str(folder))
    folder = write_folder(tmp_path / "b")
    data = (folder / "train-000002.tar").read_bytes()
    (folder / "train-000002.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match=r"train-000002\.tar: \d+ bytes, _info\.json says \d+"):
        open_shards(str(folder))
    (folder / "train-000002.tar").unlink()
    with pytest.raises(ContractError, match=r"train-000002\.tar: shard missing"):
        open_shards(str(folder))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "damage, error",
    [
        ("header", r"1 samples, _info\.json says 6 \(truncated or corrupt shard\)"),
        ("jpeg", r"sample train_000(1[5-9]|20): JPEG does not decode \(.+\)"),
        ("garbage", r"unreadable shard \(.+\)"),
    ],
)
def test_corrupt_shard_fails_with_its_name(tmp_path, workers, damage, error):
    """Same-size damage passes the folder check; reading must fail naming the shard, not hang."""
    folder = write_folder(tmp_path)
    path = folder / "train-000003.tar"  # samples 15..20
    data = bytearray(path.read_bytes())
    if damage == "header":
        data[512 * 7 : 512 * 7 + 100] = b"\xff" * 100  # inside the tar header of the second sample's jpg
    elif damage == "jpeg":
        jpg = data.index(b"\xff\xd8\xff")
        data[jpg + 200 : jpg + 700] = b"\x00" * 500  # the first JPEG's tables and scan
    else:
        data[:] = bytes(range(256)) * (len(data) // 256)
    path.write_bytes(bytes(data))
    split = open_shards(str(folder)).split("train")
    stream = ShardStream(split, 5, train=True, seed=0, epoch=0, steps=5, shuffle_buffer=4)
    with pytest.raises(ShardError, match=rf"^{path}: {error}$"):
        collect(stream, workers)


def test_pipe_url_prefix_reads_like_the_folder(folder):
    location = f"pipe:cat {folder}/{{}}"
    shards = open_shards(location)
    assert shards.info.to_json() == json.loads((folder / "_info.json").read_text())
    assert join(location, "train-000000.tar") == f"pipe:cat {folder}/train-000000.tar"
    local = collect(ShardStream(open_shards(str(folder)).split("validation"), 4, train=False), 0)
    remote = collect(ShardStream(shards.split("validation"), 4, train=False), 0)
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(local, remote))
    with pytest.raises(ContractError, match=r"exit status 1: .*No such file or directory \(2 tries\)$"):
        open_shards(f"pipe:cat {folder}/missing/{{}}", remote=RemoteReads(retries=1, backoff=0))


def test_http_url_prefix_reads_like_the_folder(folder):
    with serving(QuietHandler, folder) as location:
        shards = open_shards(location)
        batches = collect(ShardStream(shards.split("validation"), 4, train=False), 0)
        assert sorted(sum((b.tolist() for _, b in batches), [])) == list(range(11))
        with pytest.raises(ContractError, match="404"):
            open_shards(location + "missing/")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@contextlib.contextmanager
def serving(handler_class, folder: Path):
    """A local http server of `folder` through `handler_class`; yields its URL prefix. Its handler
    threads are joined on the way out, so release any that wait first."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_class, directory=str(folder))) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join()


# ---------------------------------------------------------------------------------------------------
# Remote shards that stall: a timeout on every read, a bounded retry, then one line naming the URL

FAST = RemoteReads(timeout=0.3, retries=1, backoff=0)
PATIENT = RemoteReads(timeout=1.0, retries=3, backoff=0)  # for reads that must succeed on a busy machine


def labels_of(batches) -> list[int]:
    return sorted(sum((labels.tolist() for _, labels in batches), []))


def serve_script(tmp_path: Path, folder: Path, stall: str) -> str:
    """A pipe: location whose command serves `folder`'s files, and for a .tar writes 3,000 bytes and
    then sleeps: every time (stall="always") or only the first time for each shard ("once"). The
    sleeping process writes its pid to pids.txt."""
    script = tmp_path / "serve.sh"
    script.write_text(f"""case "$1" in
  *.tar) if [ {stall} = always ] || [ ! -e "{tmp_path}/$1.seen" ]; then
           touch "{tmp_path}/$1.seen"; head -c 3000 "{folder}/$1"; echo $$ >> "{tmp_path}/pids.txt"; exec sleep 60
         fi ;;
esac
exec cat "{folder}/$1"
""")
    return f"pipe:sh {script} {{}}"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pipe_command_that_hangs_is_one_error_naming_it(folder, tmp_path, workers):
    location = serve_script(tmp_path, folder, "always")
    split = open_shards(location, remote=FAST).split("validation")
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"^pipe:sh \S+serve.sh validation-00000[01].tar: no data for 0.3 s \(2 tries\)$"):
        collect(ShardStream(split, 4, train=False), workers)
    assert time.monotonic() - t0 < 10
    pids = [int(pid) for pid in (tmp_path / "pids.txt").read_text().split()]
    deadline = time.monotonic() + 5  # SIGKILLed, a process takes a moment to end
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pids) >= 2 and not any(alive(pid) for pid in pids)  # each hanging command was killed, with its children


def test_a_pipe_command_that_hangs_once_is_run_again_from_where_it_stopped(folder, tmp_path):
    location = serve_script(tmp_path, folder, "once")
    batches = collect(ShardStream(open_shards(location, remote=PATIENT).split("validation"), 4, train=False), 0)
    for images, labels in batches:
        check_pixels(images, labels)
    assert labels_of(batches) == list(range(11))
    assert len((tmp_path / "pids.txt").read_text().split()) == 3  # each of the 3 shards stalled once


class StallingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; a .tar gets its headers and half its body, then nothing until `release` is
    set: on every request (`stall_always`) or on the first request for each path."""

    stall_always, release, seen = True, threading.Event(), set()

    def do_GET(self):
        path = Path(self.directory, self.path.lstrip("/"))
        if path.suffix != ".tar" or not (self.stall_always or self.path not in self.seen):
            return super().do_GET()
        self.seen.add(self.path)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.release.wait(30)

    def log_message(self, format, *args):
        pass


@pytest.mark.parametrize("stall_always", [True, False])
def test_an_http_server_that_stalls_mid_body(folder, stall_always):
    handler_class = type("Handler", (StallingHandler,), {"stall_always": stall_always, "release": threading.Event(), "seen": set()})
    with serving(handler_class, folder) as location:
        try:
            stream = ShardStream(open_shards(location, remote=FAST if stall_always else PATIENT).split("validation"), 4, train=False)
            if stall_always:
                with pytest.raises(ShardError, match=rf"^{location}validation-000000.tar: no data for 0.3 s \(2 tries\)$"):
                    collect(stream, 0)
            else:  # the second try is answered in full (this server ignores Range): the bytes read before are skipped
                assert labels_of(collect(stream, 0)) == list(range(11))
        finally:
            handler_class.release.set()


class FaultyHandler(QuietHandler):
    """Serves the folder, honouring Range requests (206); a .tar's first request (or every one, with
    `always`) meets the `fault`: "close" sends all headers but only half the body, then closes the
    connection cleanly (a FIN, no reset); "trickle" sends the body TRICKLE bytes every TRICKLE_EVERY
    seconds. Records each .tar request as (path, its Range header or None) in `requests`."""

    fault, always, seen, requests = "close", False, set(), []

    def do_GET(self):
        path = Path(self.directory, self.path.lstrip("/"))
        if path.suffix != ".tar":
            return super().do_GET()
        asked = self.headers.get("Range")
        self.requests.append((self.path, asked))
        data = path.read_bytes()
        start = int(asked.removeprefix("bytes=").removesuffix("-")) if asked else 0
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body, faulty = data[start:], self.always or self.path not in self.seen
        self.seen.add(self.path)
        if not faulty:
            self.wfile.write(body)
        elif self.fault == "close":
            self.wfile.write(body[: len(body) // 2])  # then the handler returns: HTTP/1.0 closes the connection
        else:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                for i in range(0, len(body), TRICKLE):
                    self.wfile.write(body[i : i + TRICKLE])
                    time.sleep(TRICKLE_EVERY)


TRICKLE, TRICKLE_EVERY = 200, 0.05  # 4 KB/s at most
# Under 20 KB/s over 0.5 s of waiting is too slow; no single read waits 1 s (a trickle passes that).
SLOW = RemoteReads(timeout=1.0, retries=1, backoff=0, min_rate=20_000, rate_window=0.5)


def faulty(fault: str, always: bool) -> type[FaultyHandler]:
    return type("Handler", (FaultyHandler,), {"fault": fault, "always": always, "seen": set(), "requests": []})


def test_an_http_connection_closed_early_is_read_on_from_where_it_stopped(folder):
    """A server that closes the connection cleanly before the Content-Length is met: the read goes on
    with a Range request from the first byte it lacks, like after a reset."""
    handler_class = faulty("close", always=False)
    with serving(handler_class, folder) as location:
        batches = collect(ShardStream(open_shards(location, remote=FAST).split("validation"), 4, train=False), 0)
    for images, labels in batches:
        check_pixels(images, labels)
    assert labels_of(batches) == list(range(11))
    names = [f"validation-00000{i}.tar" for i in range(3)]
    assert handler_class.requests == [(f"/{name}", asked) for name in names
                                      for asked in (None, f"bytes={(folder / name).stat().st_size // 2}-")]


def test_an_http_connection_always_closed_early_is_one_error_naming_it(folder):
    handler_class = faulty("close", always=True)
    size = (folder / "validation-000000.tar").stat().st_size
    rest = size - size // 2  # what the second try asks for, of which it gets half
    with serving(handler_class, folder) as location:
        with pytest.raises(ShardError, match=rf"^{location}validation-000000.tar: connection closed {rest - rest // 2} bytes "
                                             r"before the end of the body \(2 tries\)$"):
            collect(ShardStream(open_shards(location, remote=FAST).split("validation"), 4, train=False), 0)


@pytest.mark.parametrize("always", [True, False])
def test_an_http_server_that_trickles(folder, always):
    """Data that comes, but slower than RemoteReads.min_rate, counts as a stall: once, the read goes on
    where it stopped (a Range request); always, one error names the shard after the retries."""
    handler_class = faulty("trickle", always)
    with serving(handler_class, folder) as location:
        stream = ShardStream(open_shards(location, remote=SLOW).split("validation"), 4, train=False)
        if always:
            with pytest.raises(ShardError, match=rf"^{location}validation-000000.tar: under 20 KB/s for 0.5 s \(2 tries\)$"):
                collect(stream, 0)
        else:
            batches = collect(stream, 0)
            for images, labels in batches:
                check_pixels(images, labels)
            assert labels_of(batches) == list(range(11))
            for i in range(3):
                name = f"validation-00000{i}.tar"
                first, second = [asked for path, asked in handler_class.requests if path == f"/{name}"]
                assert first is None and 0 < int(second.removeprefix("bytes=").removesuffix("-")) < (folder / name).stat().st_size


# ---------------------------------------------------------------------------------------------------
# Labels outside the class table


def rewrite_shard(folder: Path, name: str, samples: list[tuple[str, bytes, int | str]]) -> None:
    """Replace shard `name` with `samples` (key, jpg, cls), keeping _info.json's size and sha256 true."""
    write_tar(folder / name, samples)
    info = json.loads((folder / "_info.json").read_text())
    data = (folder / name).read_bytes()
    for entry in info["splits"].values():
        for shard in entry["shards"]:
            if shard["filename"] == name:
                shard.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cls", ["57", "-1", "3.0", ""])
def test_a_label_outside_the_class_table_names_its_shard_and_sample(tmp_path, workers, cls):
    folder = write_folder(tmp_path, num_classes=10)
    # validation-000001.tar holds samples 4..8; the second gets the bad cls
    rewrite_shard(folder, "validation-000001.tar", [(f"validation_{i:05d}", jpeg_of(i), cls if i == 5 else i) for i in range(4, 9)])
    stream = ShardStream(open_shards(str(folder)).split("validation"), 4, train=False)
    path = folder / "validation-000001.tar"
    with pytest.raises(ShardError, match=rf"^{path}: sample validation_00005: cls b'{cls}' is not a class index below 10$"):
        collect(stream, workers)


def test_labels_up_to_the_last_class_pass(tmp_path):
    folder = write_folder(tmp_path, num_classes=11)  # validation labels 0..10
    assert labels_of(collect(ShardStream(open_shards(str(folder)).split("validation"), 4, train=False), 2)) == list(range(11))
