"""The Hub build through the real `huggingface_hub` client against the local stand-in (tests/hubstub.py).

Bounded staging disk, nothing left behind, the same shards as a build from a local copy of the same
parquet files, trial builds that fetch little, and every failure as one line: no token, no access,
no such repo or split, the network dropping mid-file, a corrupt file; the token never shown or stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest

from prep import fetch
from prep.build import DOWNLOAD_DIR, BuildConfig, build, build_shards
from prep.contract import INFO_NAME
from prep.errors import BuildError, FetchError, SourceError
from prep.open_source import HUB_ID
from prep.out_folder import BUILD_DIR

ALEXPREP = str(Path(sys.executable).with_name("alexprep"))


def folder_bytes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (digests: a failing comparison stays readable)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shards_and_stats(folder: Path) -> dict[str, str]:
    """What must not depend on where the parquet came from: the tars, stats.json and (mid-build) the sidecars."""
    return {name: data for name, data in folder_bytes(folder).items()
            if name.endswith(".tar") or name == "stats.json"
            or re.fullmatch(rf"{BUILD_DIR}/sidecars/\w+-\d{{6}}\.json", name)}


class DiskSampler:
    """Samples the bytes under a folder every few milliseconds in a thread; `peak` is the largest seen."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for folder, _, names in os.walk(self.folder):
                for name in names:
                    try:
                        total += os.stat(os.path.join(folder, name)).st_size
                    except FileNotFoundError:
                        pass  # deleted between listing and stat
            self.peak = max(self.peak, total)
            time.sleep(0.002)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def local_reference(hub_repo, tmp_path_factory) -> Path:
    """Both splits built from a local copy of the stand-in repo's parquet files (2 workers)."""
    out = tmp_path_factory.mktemp("local") / "out"
    build_shards(out, source=str(hub_repo[0]), shard_size=100, workers=2)
    return out


@pytest.fixture(scope="module")
def validation_reference(hub_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-validation") / "out"
    build_shards(out, source=str(hub_repo[0]), splits=("validation",), shard_size=50, workers=2)
    return out


def hub_validation(out: Path, **kwargs) -> dict:
    return build_shards(out, source=HUB_ID, splits=("validation",), shard_size=50, workers=2, **kwargs)


@pytest.mark.slow
def test_hub_build_equals_the_local_copy_with_bounded_disk_and_nothing_left(hub, hub_repo, local_reference,
                                                                           tmp_path):
    root, summary = hub_repo
    assert len(summary.files) == 36
    out = tmp_path / "out"
    with DiskSampler(out / BUILD_DIR / DOWNLOAD_DIR) as staging:
        info = build_shards(out, source=HUB_ID, shard_size=100, workers=1, prefetch=3)
    # At most 3 parquet files on disk at once (the largest file of the repo is its train files').
    largest = max(f.bytes for f in summary.files)
    assert 0 < staging.peak <= 3 * largest <= 0.5 * summary.total_bytes, (staging.peak, summary.total_bytes)
    # Nothing of the dataset is left: no staging folder, no Hub cache, no partial shards, no bookkeeping.
    assert not (out / BUILD_DIR).exists()
    assert not (Path(os.environ["HF_HOME"]) / "hub").exists()
    assert not list(out.rglob("*.parquet"))
    # Only the files the build needs were fetched: train and validation whole (plus their footers), no test.
    fetched = {f.path for f in summary.files if hub.sent.get(f.path)}
    assert fetched == {f.path for f in summary.files if f.split != "test"}
    assert shards_and_stats(out) == shards_and_stats(local_reference)
    local = json.loads((local_reference / INFO_NAME).read_text())
    assert info["options"].pop("source") == HUB_ID and local["options"].pop("source").startswith("parquet:")
    assert info.pop("name") == "imagenet-1k" and local.pop("name") == root.name  # the folder's name
    assert info == local
    # The repo's train files are sorted by class; every shard mixes them all.
    for name in info["splits"]["train"]["filenames"]:
        with tarfile.open(out / name) as tar:
            labels = [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
        assert len(set(labels)) == len(summary.class_names), name


def test_a_trial_fetches_only_the_row_groups_it_keeps(hub, hub_repo, tmp_path):
    root, summary = hub_repo
    with DiskSampler(tmp_path / "out" / BUILD_DIR / DOWNLOAD_DIR) as staging:
        info = build_shards(tmp_path / "out", source=HUB_ID, limit=100, shard_size=50, workers=2)
    assert [info["splits"][s]["num_inputs"] for s in ("train", "validation")] == [100, 100]
    # Only ranged reads of footers and row groups, never a whole file: nothing staged on disk, nothing cached.
    whole = {f"bytes=0-{f.bytes - 1}" for f in summary.files}
    assert all(r.range is not None and r.range not in whole
               for r in hub.requests if r.file is not None and r.method == "GET")
    assert staging.peak == 0
    assert hub.total_sent <= 0.3 * summary.total_bytes, (hub.total_sent, summary.total_bytes)
    # At most about 2x the bytes of the images it keeps, plus one footer per file of the splits.
    image_bytes, footers = {}, 0
    for f in summary.files:
        if f.split != "test":
            table = pq.read_table(root / f.path, columns=["image"]).column("image").combine_chunks()
            image_bytes.update({Path(p).stem: len(b) for p, b in zip(table.field("path").to_pylist(),
                                                                        table.field("bytes").to_pylist())})
            footers += 8 + int.from_bytes((root / f.path).read_bytes()[-8:-4], "little")
    kept = sum(image_bytes[key] for key in shard_keys(tmp_path / "out", info))
    assert hub.total_sent - footers <= 2 * kept, (hub.total_sent, footers, kept)
    # Whole row groups of 12 class-sorted rows: the trial covers fewer classes than a row-by-row sample would.
    counts = info["splits"]["train"]["class_counts"]
    assert sum(counts) == 100 and sum(n > 0 for n in counts) == 6  # of 10; row by row would give all 10


def shard_keys(out: Path, info: dict) -> list[str]:
    keys = []
    for entry in info["splits"].values():
        for name in entry["filenames"]:
            with tarfile.open(out / name) as tar:
                keys += [m.name[:-4] for m in tar if m.name.endswith(".jpg")]
    return keys


def test_no_token_is_one_line_and_writes_nothing(hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(SourceError, match=rf"^no Hugging Face token for the gated dataset {HUB_ID}: accept the terms"):
        hub_validation(tmp_path / "out")
    assert not (tmp_path / "out").exists() and hub.requests == []


def test_no_access_and_no_such_repo_are_one_line(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_accepted_one")
    with pytest.raises(SourceError, match=rf"^no access to the gated dataset {HUB_ID} with this token \(HTTP 403\)"):
        hub_validation(tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    with pytest.raises(SourceError, match=r"^someone/else: no such dataset on the Hugging Face Hub, or this token "
                                          r"cannot see it \(HTTP 404\)"):
        build_shards(tmp_path / "out", source="someone/else", splits=("validation",))
    assert not (tmp_path / "out").exists()


def test_a_repo_without_the_split_is_one_line(hub, tmp_path):
    only_test = tmp_path / "repo"
    (only_test / "data").mkdir(parents=True)
    for f in hub.files():
        if "/test-" in f:
            shutil.copy(hub.root / f, only_test / f)
    hub.root = only_test
    with pytest.raises(SourceError, match=rf"^{HUB_ID}: no data/validation-\*\.parquet files; choose others"):
        hub_validation(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_download_dropped_once_is_resumed(hub, validation_reference, tmp_path):
    # The footer's two small reads are not cut, the download is, once: huggingface_hub resumes it.
    hub.drop("data/validation-00002-of-00008.parquet", after_bytes=50_000, times=3)
    hub_validation(tmp_path / "out")
    assert shards_and_stats(tmp_path / "out") == shards_and_stats(validation_reference)


@pytest.mark.slow
def test_a_download_dropping_every_time_is_named_and_the_rerun_continues(hub, validation_reference, tmp_path):
    path = "data/validation-00005-of-00008.parquet"
    out = tmp_path / "out"

    def drop_once_downloads_start() -> None:
        # After the footers are read (so only downloads are cut) and before file 5's turn (prefetch 3):
        # no byte gets through, so the client's own retries and then ours run out.
        while not (out / BUILD_DIR / DOWNLOAD_DIR).exists():
            time.sleep(0.001)
        hub.drop(path, after_bytes=0, times=1000)

    dropper = threading.Thread(target=drop_once_downloads_start, daemon=True)
    dropper.start()
    with pytest.raises(FetchError, match=rf"^downloading {HUB_ID}/{path} failed 3 times \(.*\); run the same "
                                         r"command again to continue$"):
        hub_validation(out)
    dropper.join()
    # Shards finished before the failure are complete; the rerun continues from the last commit.
    for name, data in shards_and_stats(out).items():
        assert shards_and_stats(validation_reference)[name] == data
    journal = json.loads((out / BUILD_DIR / "validation.journal.json").read_text())
    assert journal["parts_done"] == 5  # files 0 to 4 were read before file 5 failed
    hub.reset()
    hub_validation(out)
    assert shards_and_stats(out) == shards_and_stats(validation_reference)
    refetched = {p for p, n in hub.sent.items() if n > 50_000}
    assert refetched == {f"data/validation-0000{i}-of-00008.parquet" for i in (5, 6, 7)}


def test_a_corrupt_parquet_file_stops_the_build_naming_it(hub, hub_repo, validation_reference, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(hub_repo[0], repo)
    path = "data/validation-00003-of-00008.parquet"
    data = bytearray((repo / path).read_bytes())
    meta = pq.read_metadata(repo / path)
    column = meta.row_group(1).column(0)
    start = min(column.data_page_offset, column.dictionary_page_offset or column.data_page_offset)
    data[start:start + 16] = b"\xff" * 16  # the page header of row group 1's images; the footer is intact
    (repo / path).write_bytes(bytes(data))
    hub.root = repo
    out = tmp_path / "out"
    with pytest.raises(FetchError, match=rf"^{HUB_ID}/{path}: not a readable parquet file \(.*\); the build stopped"):
        hub_validation(out)
    assert not (out / INFO_NAME).exists()
    for name, data in shards_and_stats(out).items():  # whatever is under a final name is right
        assert shards_and_stats(validation_reference)[name] == data


def cli_env(hub, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env["HF_HOME"] = str(home)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def test_the_token_never_appears_in_output_or_files(hub, tmp_path):
    token = "hf_" + "Distinctive9" * 3
    hub.token = token
    home = tmp_path / "home"
    runs = [subprocess.run([ALEXPREP, "build-shards", "--out", str(tmp_path / name), "--splits", "validation",
                            "--limit", "30", "--shard-size", "20", "--workers", "2", *extra],
                           env=cli_env(hub, home, tok), capture_output=True, text=True, timeout=120)
            for name, tok, extra in [("ok", token, ["--progress"]), ("wrong", token[:-1] + "X", [])]]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[1].returncode == 1 and "no access to the gated dataset" in runs[1].stderr
    for run in runs:
        assert token not in run.stdout + run.stderr and token[:-1] not in run.stdout + run.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in written)
    for p in written:
        assert token[:-1].encode() not in p.read_bytes(), p


@pytest.mark.slow
def test_sigkill_mid_download_then_rerun_gives_the_same_bytes(hub, validation_reference, tmp_path):
    hub.bandwidth = 400_000  # bytes/s: the validation files take about 2 s to download
    out = tmp_path / "out"
    args = [ALEXPREP, "build-shards", "--out", str(out), "--splits", "validation", "--shard-size", "50",
            "--workers", "2", "--no-progress"]
    env = cli_env(hub, tmp_path / "home", hub.token)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    staging = out / BUILD_DIR / DOWNLOAD_DIR
    deadline = time.monotonic() + 60
    while not (staging.exists() and any(p.name.endswith(".incomplete") for p in staging.rglob("*"))):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / INFO_NAME).exists()
    hub.bandwidth = None
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert shards_and_stats(out) == shards_and_stats(validation_reference)
    assert not staging.exists()


def test_keep_download_moves_the_files_into_a_local_copy(hub, hub_repo, validation_reference, tmp_path):
    keep = tmp_path / "copy"
    hub_validation(tmp_path / "out", keep_download=keep)
    kept = sorted(str(p.relative_to(keep)) for p in keep.rglob("*.parquet"))
    assert kept == sorted(f.path for f in hub_repo[1].files if f.split == "validation")
    assert all((keep / p).read_bytes() == (hub_repo[0] / p).read_bytes() for p in kept)
    with pytest.raises(BuildError, match="prefetch must be >= 1"):
        hub_validation(tmp_path / "other", prefetch=0)


def test_a_file_gone_from_the_repo_is_one_line(hub, hub_repo, tmp_path):
    from prep.fetch import HubStore

    repo = tmp_path / "repo"
    shutil.copytree(hub_repo[0], repo)
    hub.root = repo
    store = HubStore.open(HUB_ID)
    (repo / "data/validation-00001-of-00008.parquet").unlink()  # listed a moment ago, gone now
    with pytest.raises(FetchError, match=rf"^{HUB_ID}: downloading data/validation-00001-of-00008.parquet: the file "
                                         r"is not there \(HTTP 404\)$"):
        store.download("data/validation-00001-of-00008.parquet", tmp_path / "staging")


# --- a Hub that misbehaves: other bytes than listed, trickles, rate limits, drops during ranged reads ---------------

VAL2 = "data/validation-00002-of-00008.parquet"
VALIDATION = [f"data/validation-{i:05d}-of-00008.parquet" for i in range(8)]


@pytest.fixture
def quick_retries(monkeypatch):
    """prep.fetch's rules at test scale: too slow is under 5,000 bytes/s over 1 s of waiting, retries 10 ms apart."""
    monkeypatch.setattr(fetch, "MIN_BYTES_PER_S", 5_000)
    monkeypatch.setattr(fetch, "RATE_WINDOW_S", 1.0)
    monkeypatch.setattr(fetch, "RETRY_WAIT_S", 0.01)


@pytest.fixture(scope="module")
def trial_reference(hub_repo, tmp_path_factory) -> Path:
    """A `--limit 40` trial of the validation split, built from a local copy of the stand-in repo."""
    out = tmp_path_factory.mktemp("local-trial") / "out"
    build_shards(out, source=str(hub_repo[0]), splits=("validation",), limit=40, shard_size=15, workers=2)
    return out


def hub_validation_armed(out: Path, arm: Callable[[], None], limit: int | None = None) -> dict:
    """A validation build from the Hub (as hub_validation, or the trial of `trial_reference` with `limit`) that
    runs `arm` once the source is opened (files listed, footers read), before any row is fetched."""
    config = BuildConfig(source=HUB_ID, splits=("validation",), limit=limit, shard_size=50 if limit is None else 15)

    def log(line: str) -> None:
        if line.startswith("source "):  # the first line, logged once the source is open
            arm()

    return build(out, config, workers=2, log=log)


def within(seconds: float, call: Callable[[], object]) -> object:
    """`call()`'s result, or a failed test if it is still running after `seconds` (a hang, not a slow run)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_another_files_bytes_served_twice_are_fetched_again(hub, hub_repo, validation_reference, quick_retries,
                                                            tmp_path):
    # The file changed between listing and download (other rows, other size) and back again.
    other = (hub_repo[0] / "data/validation-00003-of-00008.parquet").read_bytes()
    out = tmp_path / "out"
    hub_validation_armed(out, lambda: hub.serve_instead(VAL2, other, times=2))
    assert shards_and_stats(out) == shards_and_stats(validation_reference)
    size = (hub_repo[0] / VAL2).stat().st_size
    whole = [r for r in hub.requests if r.file == VAL2 and r.range == f"bytes=0-{size - 1}"]
    assert len(whole) == 3  # two wrong answers, then the file


@pytest.mark.parametrize("limit, wrong", [(None, "same size"), (None, "longer"), (40, "longer")],
                         ids=["download-same-size", "download-longer", "trial-longer"])
def test_bytes_other_than_listed_stop_the_build_in_one_line_and_the_rerun_finishes(
        hub, hub_repo, validation_reference, trial_reference, quick_retries, tmp_path, limit, wrong):
    root = hub_repo[0]
    if wrong == "same size":  # 16 bytes changed in the middle: only the sha256 tells
        data = bytearray((root / VAL2).read_bytes())
        data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
        faults = {VAL2: bytes(data)}
    else:  # a longer file (a train file) in place of the last validation file, or of every one in a trial
        longer = (root / "data/train-00000-of-00024.parquet").read_bytes()
        faults = {path: longer for path in (VALIDATION[-1:] if limit is None else VALIDATION)}
    out = tmp_path / "out"

    def arm() -> None:
        for path, data in faults.items():
            hub.serve_instead(path, data, times=1000)

    doing = "downloading" if limit is None else "reading"
    why = (r"the bytes served have sha256 [0-9a-f]{16}\.\.\., the listing says [0-9a-f]{16}\.\.\."
           if wrong == "same size" else r"the file served is [\d,]+ bytes, the listing says [\d,]+")
    with pytest.raises(FetchError, match=rf"^{doing} {HUB_ID}/data/validation-\d{{5}}-of-00008\.parquet failed 3 "
                                         rf"times \({why}\); run the same command again to continue$"):
        hub_validation_armed(out, arm, limit)
    reference = validation_reference if limit is None else trial_reference
    for name, digest in shards_and_stats(out).items():  # whatever is under a final name is right
        assert shards_and_stats(reference)[name] == digest
    hub.reset()
    hub_validation_armed(out, lambda: None, limit)
    assert shards_and_stats(out) == shards_and_stats(reference)


@pytest.mark.parametrize("where", ["footer", "download", "trial"])
def test_a_trickling_hub_is_given_up_in_one_line_naming_the_file(hub, validation_reference, quick_retries, tmp_path,
                                                                 where):
    # 300 bytes at 50 bytes/s, then the rest at full speed: each try is too slow (under 5,000 bytes/s over 1 s).
    paths = VALIDATION if where == "trial" else [VAL2]

    def arm() -> None:
        for path in paths:
            hub.trickle(path, slow_bytes=300, every_s=0.02, times=1000)

    out = tmp_path / "out"
    doing = "downloading" if where == "download" else "reading"
    message = (rf"^{doing} {HUB_ID}/data/validation-\d{{5}}-of-00008\.parquet failed 3 times \(under 5 KB/s for 1 s\); "
               r"run the same command again to continue$")
    if where == "footer":  # at open: nothing written
        arm()
        with pytest.raises(SourceError, match=message.replace(r"\d{5}", "00002")):
            hub_validation(out)
        assert not out.exists()
        return
    with pytest.raises(FetchError, match=message):
        hub_validation_armed(out, arm, limit=40 if where == "trial" else None)
    if where == "download":
        hub.reset()
        hub_validation(out)
        assert shards_and_stats(out) == shards_and_stats(validation_reference)


@pytest.mark.parametrize("where", ["footer", "download"])
def test_a_rate_limit_waits_at_most_the_cap_and_says_so(hub, validation_reference, monkeypatch, caplog, tmp_path,
                                                         where):
    monkeypatch.setattr(fetch, "RATE_LIMIT_MAX_WAIT_S", 0.05)
    out = tmp_path / "out"
    if where == "footer":
        hub.rate_limit(VAL2, retry_after=3600, times=2)
        within(120, lambda: hub_validation(out))
    else:
        within(120, lambda: hub_validation_armed(out, lambda: hub.rate_limit(VAL2, retry_after=3600, times=2)))
    assert shards_and_stats(out) == shards_and_stats(validation_reference)
    doing = "reading" if where == "footer" else "downloading"
    said = [r.getMessage() for r in caplog.records if r.name == "prep.fetch"]
    assert said == [f"the Hub is rate-limiting: HTTP 429, Retry-After 3600 s; waiting 0.05 s before {doing} "
                    f"{HUB_ID}/{VAL2} again"] * 2


def test_a_rate_limit_is_said_on_stderr(hub, tmp_path):
    hub.rate_limit(VAL2, retry_after=1)
    run = subprocess.run([ALEXPREP, "build-shards", "--out", str(tmp_path / "out"), "--splits", "validation",
                          "--limit", "30", "--shard-size", "20", "--workers", "1", "--no-progress"],
                         env=cli_env(hub, tmp_path / "home", hub.token), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr == (f"the Hub is rate-limiting: HTTP 429, Retry-After 1 s; waiting 1 s before reading "
                          f"{HUB_ID}/{VAL2} again\n")


def test_network_errors_in_a_trials_ranged_reads_are_named_so(hub, trial_reference, quick_retries, tmp_path):
    def arm() -> None:
        for path in VALIDATION:
            hub.drop(path, after_bytes=0, times=1000)

    out = tmp_path / "out"
    with pytest.raises(FetchError, match=rf"^reading {HUB_ID}/data/validation-\d{{5}}-of-00008\.parquet failed 3 "
                                         r"times \(\w+: .+\); run the same command again to continue$"):
        hub_validation_armed(out, arm, limit=40)
    hub.reset()
    hub_validation_armed(out, lambda: None, limit=40)
    assert shards_and_stats(out) == shards_and_stats(trial_reference)
