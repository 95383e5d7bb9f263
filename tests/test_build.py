"""The shard writer: plan, bytes, determinism across workers, resume (simulated and by real SIGKILL), skips."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_PER_CLASS, DEMO_SHARD_SIZE
from hubstub import make_imagenet_like_repo
from quirk_images import write_quirk_files

import prep.build
from prep import synthetic
from prep.build import BuildConfig, build, build_shards, plan_split
from prep.contract import FIELDS, INFO_NAME, SPLITS, STATS_NAME, imagenet_classes, read_info, shard_name
from prep.errors import BuildError, FetchError, SourceError
from prep.image import pillow_flavour, process
from prep.open_source import open_source
from prep.out_folder import BUILD_DIR, BuildRecord, claim
from prep.tar_format import tar_header
from prep.workers import MAX_WORKERS

SMALL = {"per_class": {"train": 6, "validation": 3}, "shard_size": 8}  # 60 + 30 inputs, 8 + 4 shards


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (a build's .build bookkeeping included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_plan_is_a_seeded_permutation_cut_into_shards():
    plan = plan_split(103, "train", seed=5, shard_size=25, limit=None)
    assert plan.num_shards == 5 and [plan.filename(k) for k in range(5)] == [shard_name("train", k) for k in range(5)]
    assert [len(plan.shard(k)) for k in range(5)] == [25, 25, 25, 25, 3]
    order = np.concatenate([plan.shard(k) for k in range(5)])
    assert order.tolist() == plan.rows.tolist()
    assert sorted(order.tolist()) == list(range(103)) and order.tolist() != list(range(103))
    assert plan.read.all()
    assert order.tolist() == plan_split(103, "train", 5, 25, None).rows.tolist()
    assert order.tolist() != plan_split(103, "validation", 5, 25, None).rows.tolist()
    assert order.tolist() != plan_split(103, "train", 6, 25, None).rows.tolist()


def test_limit_takes_whole_units_in_a_seeded_order():
    units = [10] * 12  # 120 rows in row groups of 10
    plan = plan_split(units, "train", seed=3, shard_size=8, limit=25)
    rows = plan.rows.tolist()
    assert len(rows) == 25 and len(set(rows)) == 25
    # Three row groups are read: two whole, the third cut short after its first 5 rows.
    assert plan.read.sum() == 3
    read = np.flatnonzero(plan.read)
    groups = {r // 10 for r in rows}
    assert groups == set(read.tolist())
    assert sorted(sum(r // 10 == g for r in rows) for g in groups) == [5, 10, 10]
    assert rows != sorted(rows)  # still permuted across the shards
    assert rows == plan_split(units, "train", 3, 8, 25).rows.tolist()
    assert plan_split(units, "train", 4, 8, 25).read.tolist() != plan.read.tolist()
    assert plan_split(units, "train", 3, 8, 500).read.all()  # a limit above the total keeps everything


@pytest.mark.parametrize("name", ["n01440764_10026.jpg", "k" * 96 + ".jpg", "k" * 120 + ".json", "caf\u00e9.cls"])
def test_tar_headers_are_tarfiles_own_bytes(name):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = 123457, 0, 0o644, tarfile.REGTYPE
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    assert tar_header(name, 123457) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_config_rejects_bad_options():
    for kwargs, message in [({"splits": ("train", "test")}, "splits must be among"), ({"splits": ()}, "splits must be"),
                            ({"quality": 0}, "quality must be an integer in 1..100"),
                            ({"shard_size": 0}, r"shard_size must be an integer in 1\.\.100000, got 0"),
                            ({"shard_size": 10**20}, rf"shard_size must be an integer in 1\.\.100000, got {10**20}"),
                            ({"limit": 0}, "limit must be"), ({"seed": -1}, "seed must be"),
                            ({"stats_every": 0}, "stats_every must be an integer >= 1"),
                            ({"per_class": {"test": 3}}, "per_class must map"),
                            ({"per_class": {"train": 10**20}},
                             rf"to counts in 1\.\.1000000, got \{{'train': {10**20}\}}")]:
        with pytest.raises(BuildError, match=message):
            BuildConfig(**kwargs)
    config = BuildConfig(splits=("validation", "train", "train"), per_class={"validation": 2, "train": 3})
    assert config.splits == SPLITS and list(config.per_class) == ["train", "validation"]


def test_shards_follow_the_seeded_plan_with_deterministic_headers(demo_shards):
    for split in SPLITS:
        items = synthetic.items(split, per_class=DEMO_PER_CLASS[split])
        plan = plan_split(len(items), split, seed=0, shard_size=DEMO_SHARD_SIZE, limit=None)
        names = [plan.filename(k) for k in range(plan.num_shards)]
        assert sorted(p.name for p in demo_shards.glob(f"{split}-*.tar")) == names
        for k, name in enumerate(names):
            members = read_tar(demo_shards / name)
            expected = [items[i] for i in plan.shard(k)]  # nothing is skipped in the synthetic set
            assert [m.name for m, _ in members] == [f"{key}.{ext}" for key, _ in expected for ext in FIELDS]
            for m, _ in members:
                header = (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type)
                assert header == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
            for n, (key, label) in enumerate(expected):
                (_, jpg), (_, cls), (_, meta) = members[3 * n: 3 * n + 3]
                assert cls == str(label).encode()
                meta = json.loads(meta)
                assert {k: meta[k] for k in ("key", "label", "wnid")} == {"key": key, "label": label,
                                                                         "wnid": f"syn{label:02d}"}
                assert jpg[:2] == b"\xff\xd8" and jpg[-2:] == b"\xff\xd9"
            if len(expected) >= 16:  # seeded order: every full shard mixes many classes
                assert len({label for _, label in expected}) >= 5
    # Spot-check the images themselves: the processed bytes of the source image, and its original size.
    members = read_tar(demo_shards / shard_name("train", 2))
    for n in (0, 13, 31):
        (_, jpg), _, (_, meta) = members[3 * n: 3 * n + 3]
        meta = json.loads(meta)
        processed = process(synthetic.image_bytes(meta["key"], meta["label"]))
        assert jpg == processed.jpeg and (meta["width"], meta["height"]) == (processed.width, processed.height)


def test_info_records_shards_classes_options_and_reconciles(demo_shards):
    info = read_info(demo_shards).to_json()
    assert info["name"] == "synthetic" and info["pillow"] == pillow_flavour()
    assert info["classes"] == [c.to_json() for c in synthetic.CLASSES]
    assert info["options"] == {"source": "synthetic", "splits": list(SPLITS), "limit": None,
                               "shard_size": DEMO_SHARD_SIZE, "seed": 0, "quality": 90, "per_class": DEMO_PER_CLASS,
                               "stats_every": None}
    for split, per_class in DEMO_PER_CLASS.items():
        entry = info["splits"][split]
        n = per_class * len(synthetic.CLASSES)
        assert entry["num_inputs"] == entry["num_samples"] + len(entry["skipped"]) == n
        assert entry["skipped"] == []
        assert sum(entry["shard_lengths"]) == n
        assert entry["shard_lengths"][:-1] == [DEMO_SHARD_SIZE] * (len(entry["filenames"]) - 1)
        for shard, name, length in zip(entry["shards"], entry["filenames"], entry["shard_lengths"]):
            data = (demo_shards / name).read_bytes()
            assert shard == {"filename": name, "num_samples": length, "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((demo_shards / STATS_NAME).read_text())["num_images"] == 300
    assert not list(demo_shards.rglob(".tmp-*"))


def test_same_bytes_whatever_the_worker_count(tmp_path):
    build_shards(tmp_path / "one", workers=1, **SMALL)
    build_shards(tmp_path / "three", workers=3, **SMALL)
    one = folder_bytes(tmp_path / "one")
    assert len([name for name in one if name.endswith(".tar")]) == 12
    assert one == folder_bytes(tmp_path / "three")


def test_seed_and_limit_choose_order_and_subset(tmp_path):
    base = build_shards(tmp_path / "seed0", workers=2, **SMALL)
    other = build_shards(tmp_path / "seed1", workers=2, seed=1, **SMALL)

    def keys(folder: Path, split: str) -> list[str]:
        names = sorted(folder.glob(f"{split}-*.tar"))
        return [m.name.split(".")[0] for name in names for m, _ in read_tar(name) if m.name.endswith(".jpg")]

    for split in SPLITS:
        assert sorted(keys(tmp_path / "seed0", split)) == sorted(keys(tmp_path / "seed1", split))
        assert keys(tmp_path / "seed0", split) != keys(tmp_path / "seed1", split)
    assert base["splits"]["train"]["shard_lengths"] == other["splits"]["train"]["shard_lengths"]

    # A listed source's units are single items: --limit keeps a seeded random subset, in its own order.
    limited = build_shards(tmp_path / "limit", workers=2, limit=11, **SMALL)
    again = build_shards(tmp_path / "limit-again", workers=1, limit=11, **SMALL)
    for split in SPLITS:
        assert limited["splits"][split]["num_inputs"] == 11
        subset = keys(tmp_path / "limit", split)
        assert len(set(subset)) == 11 and set(subset) < set(keys(tmp_path / "seed0", split))
        assert subset == keys(tmp_path / "limit-again", split)
    train = keys(tmp_path / "limit", "train")
    assert len({key.split("_")[0] for key in train}) >= 5  # classes mixed: a synthetic train key starts with its class
    assert limited["options"]["limit"] == 11 and limited == again


def test_a_finished_folder_holds_the_contract_alone_and_a_rerun_writes_nothing(tmp_path):
    out = tmp_path / "out"
    lines: list[str] = []
    first = build(out, BuildConfig(source="synthetic", **SMALL), workers=2, log=lines.append)
    assert first.wrote and first.info == read_info(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INFO_NAME, STATS_NAME] + [shard_name("train", k) for k in range(8)] + [shard_name("validation", k)
                                                                                 for k in range(4)])
    # _info.json records what decides the bytes, so that a rerun can tell it is the same build.
    assert first.info.inputs == open_source("synthetic", SPLITS, SMALL["per_class"]).digest()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    lines.clear()
    again = build(out, BuildConfig(source="synthetic", **SMALL), workers=2, log=lines.append)
    assert not again.wrote and again.info == first.info
    assert lines == [f"{out}: complete, as _info.json records this very build; nothing written "
                     f"(`alexprep verify {out}` checks every byte)"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_an_earlier_versions_finished_folder_is_complete_and_loses_its_bookkeeping(tmp_path):
    out = tmp_path / "out"
    info = build_shards(out, workers=1, **SMALL)
    # As the version before _info.json recorded the inputs left it: the record in .build/options.json.
    (out / BUILD_DIR).mkdir()
    (out / BUILD_DIR / "options.json").write_text(json.dumps({k: info[k] for k in ("options", "pillow", "inputs")}))
    (out / BUILD_DIR / "train-000000.json").write_text("{}")
    del info["inputs"]
    (out / INFO_NAME).write_text(json.dumps(info))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert not build(out, BuildConfig(source="synthetic", **SMALL), workers=1).wrote
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # .build/ gone, nothing else touched


@pytest.fixture
def stoppable_repo(tmp_path) -> tuple[Path, Path, bytes]:
    """A parquet folder of 3 train files (24 rows in row groups of 8), and its last file's path and bytes:
    with 3 inputs per shard, 10 of the 24 shards hold rows of the first two files and the last file's
    first row group only."""
    root = tmp_path / "repo"
    make_imagenet_like_repo(root, files={"train": 3, "validation": 1, "test": 0}, rows_per_file={"train": 24},
                            row_group_size=8)
    last = root / "data/train-00002-of-00003.parquet"
    return root, last, last.read_bytes()


def damage_row_group(path: Path, group: int) -> None:
    """Overwrite the page header of row group `group`'s images (the footer stays intact)."""
    data = bytearray(path.read_bytes())
    column = pq.read_metadata(path).row_group(group).column(0)
    start = min(column.data_page_offset, column.dictionary_page_offset or column.data_page_offset)
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def test_a_stopped_build_resumes_redoing_only_unfinished_shards(tmp_path, stoppable_repo):
    root, last, good = stoppable_repo
    options = {"source": str(root), "splits": ("train",), "shard_size": 3, "workers": 2}
    reference = tmp_path / "reference"
    build_shards(reference, **options)
    out = tmp_path / "out"
    damage_row_group(last, 1)
    with pytest.raises(FetchError, match=r"train-00002-of-00003.parquet: not a readable parquet file"):
        build_shards(out, **options)
    # Each shard was finished once its last row was processed, the 3 whose last rows are in the row group
    # read before the damaged one among them.
    finished = sorted(p.stem for p in (out / BUILD_DIR / "sidecars").glob("train-*.json"))
    assert len(finished) == 10 and not (out / INFO_NAME).exists()
    for name in finished:  # whatever is under a final name is complete
        assert (out / f"{name}.tar").read_bytes() == (reference / f"{name}.tar").read_bytes()
    # What a kill or a user can leave besides: a finished shard gone, one without its sidecar, one cut
    # short; temporaries of a shard and of _info.json on their way (ours), and a user's file (not ours).
    gone, unrecorded, cut, *untouched = finished
    (out / f"{gone}.tar").unlink()
    (out / BUILD_DIR / "sidecars" / f"{unrecorded}.json").unlink()
    with open(out / f"{cut}.tar", "r+b") as f:
        f.truncate(1000)
    (out / ".tmp-train-000020.tar.x1y2z3w4").write_bytes(b"partial")
    (out / f".tmp-{INFO_NAME}.x1y2z3w4").write_bytes(b"{")
    (out / ".tmp-draft.txt").write_text("the user's")
    mtimes = {name: (out / f"{name}.tar").stat().st_mtime_ns for name in untouched}
    time.sleep(0.01)  # a rewrite would show as a newer mtime

    last.write_bytes(good)
    build_shards(out, **options)
    assert (out / ".tmp-draft.txt").read_text() == "the user's"
    (out / ".tmp-draft.txt").unlink()
    assert folder_bytes(out) == folder_bytes(reference)
    assert {name: (out / f"{name}.tar").stat().st_mtime_ns for name in untouched} == mtimes


def finishing_pid(job):
    """prep.build.finish_shard, noting the process it runs in (a module-level function: pool workers find it)."""
    with open(job.shard.parent.parent / "finishing-pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    return FINISH_SHARD(job)


FINISH_SHARD = prep.build.finish_shard


@pytest.mark.parametrize("workers", [1, 3])
def test_shards_are_finished_by_the_workers(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(prep.build, "finish_shard", finishing_pid)
    out = tmp_path / "out"
    build_shards(out, workers=workers, **SMALL)
    pids = (tmp_path / "finishing-pids").read_text().split()
    assert len(pids) == 12  # 8 train + 4 validation shards
    assert (set(pids) == {str(os.getpid())}) == (workers == 1)  # in the pool's processes, else in this one
    assert len(read_info(out).splits["train"].filenames) == 8


def test_refuses_a_folder_built_with_other_options_or_by_someone_else(tmp_path):
    out = tmp_path / "out"
    build_shards(out, workers=2, **SMALL)
    before = folder_bytes(out)
    with pytest.raises(BuildError, match=r"already holds shards built differently \(quality: 90 -> 80; seed: 0 -> 1\)"):
        build_shards(out, workers=2, seed=1, quality=80, **SMALL)
    with pytest.raises(BuildError, match=r"per_class: \{'train': 6, 'validation': 3\} -> \{'train': 6\}"):
        build_shards(out, workers=2, splits=("train",), shard_size=8, per_class={"train": 6})
    assert folder_bytes(out) == before
    # A folder an earlier version built, before an option existed (its statistics were every image's).
    info = json.loads((out / INFO_NAME).read_text())
    del info["options"]["stats_every"]
    (out / INFO_NAME).write_text(json.dumps(info))
    with pytest.raises(BuildError, match=r"built differently \(stats_every: not recorded -> None\); use another"):
        build_shards(out, workers=2, **SMALL)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-000000.tar").write_bytes(b"")
    with pytest.raises(BuildError, match="holds files that no alexprep build made here"):
        build_shards(foreign, workers=1, **SMALL)


def test_more_workers_than_4_per_core_is_one_line_and_forks_nothing(tmp_path):
    with pytest.raises(BuildError, match=rf"^workers must be in 1\.\.{MAX_WORKERS} \(4 per core\), got {10**20}$"):
        build_shards(tmp_path / "out", workers=10**20, **SMALL)
    assert not (tmp_path / "out").exists() and multiprocessing.active_children() == []


def test_source_error_writes_nothing(tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        build_shards(tmp_path / "out", source=str(tmp_path / "missing"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [".build", ".build/download", ".", "sub/dir"])
def test_keep_download_inside_the_output_folder_is_refused(tmp_path, keep):
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=rf"^--keep-download {out / keep}: inside --out {out}, which holds only the "
                                         rf"shards, _info.json, stats.json and the build's own .build/; choose a "
                                         rf"folder outside it$"):
        build_shards(out, keep_download=out / keep, workers=1, **SMALL)
    assert not out.exists()


@pytest.mark.parametrize("inside", ["train", "train/n01440764/shards", "val/x"])
def test_out_where_the_source_lists_its_inputs_is_refused(tmp_path, inside):
    root = tmp_path / "ilsvrc"
    write_quirk_files(root / "train" / "n01440764")
    write_quirk_files(root / "val" / "n01443537")
    before = folder_bytes(root)
    folder = root / inside.split("/")[0]
    with pytest.raises(BuildError, match=rf"^--out {root / inside}: inside {folder}, where the source's inputs are "
                                         r"listed; choose a folder outside it$"):
        build_shards(root / inside, source=str(root), workers=1)
    assert folder_bytes(root) == before and not (root / inside / BUILD_DIR).exists()


def test_quirks_are_converted_or_skipped_with_their_reason(tmp_path):
    root = tmp_path / "ilsvrc"
    expected = {"train": write_quirk_files(root / "train" / "n01440764"),
                "validation": write_quirk_files(root / "val" / "n01443537")}
    info = build_shards(tmp_path / "out", source=str(root), shard_size=7, workers=2)
    assert info["classes"] == [c.to_json() for c in imagenet_classes()]
    for split, files in expected.items():
        entry = info["splits"][split]
        skipped = {s["key"]: s["reason"] for s in entry["skipped"]}
        must_skip = {Path(name).stem: reason for name, reason in files.items() if reason is not None}
        assert sorted(skipped) == sorted(must_skip)
        for key, reason in must_skip.items():
            assert reason in skipped[key], (key, skipped[key])
        assert entry["num_inputs"] == len(files) == entry["num_samples"] + len(skipped)
        written = {}
        for name in entry["filenames"]:
            members = read_tar(tmp_path / "out" / name)
            written.update({m.name[:-5]: json.loads(data) for m, data in members if m.name.endswith(".json")})
        assert sorted(written) == sorted(Path(n).stem for n, reason in files.items() if reason is None)
        folder = "n01440764" if split == "train" else "n01443537"
        assert written[f"{folder}_cmyk"]["mode"] == "CMYK" and written[f"{folder}_png"]["format"] == "PNG"
        assert {m["label"] for m in written.values()} == {0 if split == "train" else 1}
    stats = json.loads((tmp_path / "out" / STATS_NAME).read_text())
    assert stats["num_images"] == info["splits"]["train"]["num_samples"]


ALEXPREP = str(Path(sys.executable).with_name("alexprep"))  # the console script installed beside this Python
# 300 train rows: two parts of a listed source (LIST_PART_ROWS = 256), so a kill can fall between commits.
KILL_ARGS = ["--source", "synthetic", "--per-class", "train=30", "--per-class", "validation=4", "--shard-size", "8",
             "--workers", "2", "--no-progress"]


def alexprep(*args: str, **kwargs) -> subprocess.Popen:
    """The real `alexprep` program in its own process group (so a kill reaches its workers too)."""
    return subprocess.Popen([ALEXPREP, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, **kwargs)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the build ended before the kill: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "the build made no progress"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_the_same_bytes(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run([ALEXPREP, "build-shards", "--out", str(reference), *KILL_ARGS],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    expected = folder_bytes(reference)
    tars = {name: data for name, data in expected.items() if name.endswith(".tar")}
    assert len(tars) == 43  # 38 train + 5 validation shards

    for moment, ready in [("very early", lambda out: (out / BUILD_DIR / "options.json").exists()),
                          ("after a commit", lambda out: (out / BUILD_DIR / "train.journal.json").exists()),
                          ("mid-build", lambda out: len(list((out / BUILD_DIR / "sidecars").glob("train-*.json"))) >= 5)]:
        out = tmp_path / moment.replace(" ", "-")
        kill_when(alexprep("build-shards", "--out", str(out), *KILL_ARGS), lambda: ready(out))
        # No partial file under a final name: every shard already there is complete and final.
        present = {p.name: p.read_bytes() for p in out.glob("*.tar")}
        assert all(tars[name] == data for name, data in present.items()), moment
        assert not (out / INFO_NAME).exists()
        rerun = alexprep("build-shards", "--out", str(out), *KILL_ARGS)
        assert rerun.wait(timeout=120) == 0, rerun.stderr.read().decode()
        rerun.stderr.close()
        assert folder_bytes(out) == expected, moment


@pytest.mark.parametrize("name, is_dir", [(".tmp-draft.txt", False), (STATS_NAME, False), (".tmp-cache", True),
                                          ("notes.txt", False)])
def test_a_non_empty_folder_that_is_not_a_build_is_refused_untouched(tmp_path, name, is_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if is_dir else (out / name).write_text("the user's")
    before = folder_bytes(out)
    with pytest.raises(BuildError, match=rf"--out {out} holds files that no alexprep build made here \(e.g. {name}\); "
                                         r"use an empty or new folder"):
        build_shards(out, workers=1, **SMALL)
    assert folder_bytes(out) == before and sorted(p.name for p in out.iterdir()) == [name]


def test_the_build_removes_only_its_own_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".gitkeep").write_bytes(b"")  # the repo's shards/ folder holds one: still an empty folder
    build_shards(out, workers=1, **SMALL)
    reference = folder_bytes(out)
    assert ".gitkeep" in reference and not any(name.startswith(BUILD_DIR) for name in reference)
    # A user's files put into a finished build, one named like a temporary of ours: the rerun finds the
    # build complete and leaves every file alone, whatever its name.
    (out / ".tmp-draft.txt").write_text("draft")
    (out / ".tmp-cache").mkdir()
    (out / ".tmp-cache" / "x").write_text("cached")
    (out / ".tmp-train-000002.tar.abcd1234").write_text("mine")
    build_shards(out, workers=1, **SMALL)
    after = folder_bytes(out)
    assert after.pop(".tmp-draft.txt") == b"draft" and after.pop(".tmp-cache/x") == b"cached"
    assert after.pop(".tmp-train-000002.tar.abcd1234") == b"mine"
    assert after == reference


def test_a_second_build_of_a_held_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    config = BuildConfig(source="synthetic", **SMALL)
    record = BuildRecord(config.to_json(), pillow_flavour(), open_source("synthetic", SPLITS, SMALL["per_class"]).digest())
    held = claim(out, record)  # what a running build of the same command holds
    before = folder_bytes(out)
    with pytest.raises(BuildError, match=rf"--out {out}: another build is writing this folder \(it holds "
                                         r"\.build/lock\); wait for it to end, or use another --out"):
        build(out, config, workers=1)
    assert folder_bytes(out) == before
    held.release()
    assert build(out, config, workers=1).wrote  # released: the same build goes ahead


def test_a_corrupt_build_record_is_one_line(tmp_path):
    started = tmp_path / "started"  # a folder a build started
    (started / BUILD_DIR).mkdir(parents=True)
    (started / BUILD_DIR / "options.json").write_text('{"options": ')
    with pytest.raises(BuildError, match=r"options.json: unreadable build record \(JSONDecodeError\); this folder "
                                         r"cannot be resumed: use another --out"):
        build_shards(started, workers=1, **SMALL)
    (started / BUILD_DIR / "options.json").write_text('["not", "a", "record"]')
    with pytest.raises(BuildError, match=r"unreadable build record \(AttributeError\)"):
        build_shards(started, workers=1, **SMALL)
    finished = tmp_path / "finished"  # a finished one
    build_shards(finished, workers=1, **SMALL)
    (finished / INFO_NAME).write_text('{"options": ')
    with pytest.raises(BuildError, match=rf"^{finished / INFO_NAME}: unreadable _info.json \(Expecting value: line 1 "
                                         r"column 13 \(char 12\)\); this folder cannot be resumed: use another --out$"):
        build_shards(finished, workers=1, **SMALL)
