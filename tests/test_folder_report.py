"""`alexprep stats` / `alexprep verify` (prep/folder_report.py) on real tar shards.

The happy path runs on the session's `demo_shards` (a real synthetic build). A small hand-written
folder (`make_folder`) follows the contract exactly and adds what a synthetic build lacks (skipped
inputs, an empty class); broken copies of it carry one kind of damage each.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import DEMO_PER_CLASS, DEMO_SHARD_SIZE
from prep.cli import main
from prep.contract import INFO_NAME, SCHEMA_VERSION, STATS_NAME, ClassInfo, atomic_write, read_stats, shard_name, write_json
from prep.folder_report import (
    MAX_SAMPLE_PROBLEMS,
    VIZ_HINT,
    format_report,
    plot_shards,
    shard_report,
    stats_cmd,
    verify_cmd,
    verify_folder,
)

CLASSES = [ClassInfo(0, "syn00", "red square"), ClassInfo(1, "syn01", "green, circle"), ClassInfo(2, "syn02", "blue stripes")]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
# labels of the samples, shard by shard: train counts per class 4/3/2, validation 0/2/1
LAYOUT = {"train": [[0, 1, 2, 0, 1], [2, 0, 1, 0]], "validation": [[1, 2, 1]]}
SKIPPED = [
    {"key": "bad0", "reason": "truncated: image file is truncated (12 bytes not processed)"},
    {"key": "bad1", "reason": "not an image: cannot identify image file"},
    {"key": "bad2", "reason": "truncated: premature end of data"},
]
STATS = {
    "schema_version": SCHEMA_VERSION, "split": "train", "pixels": "before JPEG encoding", "scale": "0..1",
    "num_images": 9, "num_pixels": 9 * 256 * 256,
    "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.24, 0.26],
    "cov": [[0.0625, 0.01, 0.0], [0.01, 0.0576, 0.0], [0.0, 0.0, 0.0676]],
    "eigval": [0.07, 0.06, 0.05], "eigvec": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
}


def jpeg(colour, size: int = 256, **save) -> bytes:
    """A JPEG of one colour with a white bar, so the contact sheet is not a flat colour."""
    im = Image.new("RGB", (size, size), colour)
    im.paste((255, 255, 255), (size // 4, size // 2, 3 * size // 4, size // 2 + size // 8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def sample(key: str, label: int, size: int = 256) -> tuple[str, dict[str, bytes]]:
    meta = {"key": key, "label": label, "wnid": CLASSES[label].wnid, "width": 300 + label, "height": 200}
    return key, {"jpg": jpeg(COLOURS[label], size), "cls": str(label).encode(), "json": json.dumps(meta).encode()}


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> dict:
    """Write a webdataset-style tar (`key.field` members, a sample's members together); return its record."""
    with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for field, data in fields.items():
                member = tarfile.TarInfo(f"{key}.{field}")
                member.size, member.mtime, member.mode = len(data), 0, 0o444
                tar.addfile(member, io.BytesIO(data))
    data = path.read_bytes()
    return {"filename": path.name, "num_samples": len(samples), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def make_folder(root: Path, layout: dict[str, list[list[int]]] = LAYOUT, jpgs: dict[str, bytes] | None = None) -> Path:
    """The folder `layout` describes (labels of the samples, shard by shard), with `_info.json` and
    `stats.json`, as `alexprep build-shards` writes it; `jpgs` replaces the `jpg` of samples by key."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shards in layout.items():
        records, counts = [], [0] * len(CLASSES)
        for i, labels in enumerate(shards):
            samples = [sample(f"{split}_{i}_{j:03d}", label) for j, label in enumerate(labels)]
            for key, fields in samples:
                fields["jpg"] = (jpgs or {}).get(key, fields["jpg"])
            records.append(write_tar(root / shard_name(split, i), samples))
            for label in labels:
                counts[label] += 1
        skipped = SKIPPED if split == "train" else []
        num = sum(r["num_samples"] for r in records)
        splits[split] = {
            "name": split, "filenames": [r["filename"] for r in records], "shard_lengths": [r["num_samples"] for r in records],
            "num_samples": num, "num_inputs": num + len(skipped), "shards": records, "skipped": skipped,
            "class_counts": counts,
        }
    info = {
        "name": "synthetic", "schema_version": SCHEMA_VERSION, "splits": splits,
        "classes": [c.to_json() for c in CLASSES],
        "options": {"source": "synthetic", "seed": 0, "shard_size": 5, "quality": 90, "limit": None},
        "pillow": "Pillow 12.0.0",
    }
    write_json(root / INFO_NAME, info)
    write_json(root / STATS_NAME, STATS)
    return root


def edit_info(folder: Path, change) -> None:
    info = json.loads((folder / INFO_NAME).read_text())
    change(info)
    write_json(folder / INFO_NAME, info)


def replace_shard(folder: Path, split: str, index: int, samples) -> None:
    """Rewrite one shard and record its new sha256/size in `_info.json` (shard_lengths left alone)."""
    record = write_tar(folder / shard_name(split, index), samples)
    record["num_samples"] = json.loads((folder / INFO_NAME).read_text())["splits"][split]["shards"][index]["num_samples"]
    edit_info(folder, lambda info: info["splits"][split]["shards"].__setitem__(index, record))


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "shards")


# ---------------------------------------------------------------------------------------------
# stats


def test_report_of_the_demo_build(demo_shards):
    report = shard_report(demo_shards)
    assert list(report["splits"]) == ["train", "validation"]
    assert (report["num_classes"], report["options"]["shard_size"]) == (10, DEMO_SHARD_SIZE)
    assert report["pillow"].split()[0] in ("Pillow", "pillow-simd")
    for split, per_class in DEMO_PER_CLASS.items():
        r = report["splits"][split]
        samples = 10 * per_class  # the synthetic source has no undecodable inputs
        assert (r["samples"], r["inputs"], r["num_skipped"], r["skipped"]) == (samples, samples, 0, {})
        assert r["shards"] == math.ceil(samples / DEMO_SHARD_SIZE) == len(list(demo_shards.glob(f"{split}-*.tar")))
        assert r["bytes"] == sum(p.stat().st_size for p in demo_shards.glob(f"{split}-*.tar"))
        assert r["class_counts"] == [per_class] * 10
        assert r["class_balance"] == {"min": per_class, "median": per_class, "max": per_class, "empty": 0}
    assert report["stats"] == read_stats(demo_shards).to_json()
    assert report["stats"]["num_images"] == 10 * DEMO_PER_CLASS["train"]


def test_stats_cli_table_and_json_round_trip(demo_shards):
    runner = CliRunner()
    table = runner.invoke(main, ["stats", str(demo_shards)])
    assert table.exit_code == 0, table.output
    assert table.output == format_report(shard_report(demo_shards)) + "\n"
    as_json = runner.invoke(main, ["stats", str(demo_shards), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == shard_report(demo_shards)


def test_report_numbers_are_what_was_written(tmp_path):
    folder = make_folder(tmp_path / "shards")
    report = shard_report(folder)
    train, val = report["splits"]["train"], report["splits"]["validation"]
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.tar")}
    assert list(report["splits"]) == ["train", "validation"]
    assert (report["name"], report["num_classes"], report["pillow"]) == ("synthetic", 3, "Pillow 12.0.0")
    assert report["options"]["shard_size"] == 5
    assert (train["samples"], train["inputs"], train["shards"], train["num_skipped"]) == (9, 12, 2, 3)
    assert train["bytes"] == sizes["train-000000.tar"] + sizes["train-000001.tar"]
    assert train["skipped"] == {"truncated": 2, "not an image": 1}
    assert train["class_counts"] == [4, 3, 2]
    assert train["class_balance"] == {"min": 2, "median": 3, "max": 4, "empty": 0}
    assert (val["samples"], val["inputs"], val["shards"], val["bytes"]) == (3, 3, 1, sizes["validation-000000.tar"])
    assert val["skipped"] == {}
    assert val["class_counts"] == [0, 2, 1]
    assert val["class_balance"] == {"min": 0, "median": 1, "max": 2, "empty": 1}
    assert report["stats"] == STATS


def test_even_median_keeps_its_half(tmp_path):
    folder = make_folder(tmp_path / "shards")
    edit_info(folder, lambda info: info["splits"]["train"].__setitem__("class_counts", [1, 2, 5, 6]))
    edit_info(folder, lambda info: info["splits"]["validation"]["class_counts"].append(0))
    edit_info(folder, lambda info: info["classes"].append({"index": 3, "wnid": "syn03", "name": "grey"}))
    assert shard_report(folder)["splits"]["train"]["class_balance"] == {"min": 1, "median": 3.5, "max": 6, "empty": 0}


def test_format_report_table(folder):
    lines = format_report(shard_report(folder)).splitlines()
    train_bytes = sum(p.stat().st_size for p in folder.glob("train-*.tar"))
    assert lines[0] == f"{folder}  (synthetic, schema 1, 3 classes)"
    assert lines[1] == "built with Pillow 12.0.0: limit=None quality=90 seed=0 shard_size=5 source=synthetic"
    row = next(line for line in lines if line.startswith("train "))
    assert row.split() == ["train", "9", "12", "3", "2", f"{train_bytes / 1000:.1f}", "kB", "2", "/", "3", "/", "4"]
    val = next(line for line in lines if line.startswith("validation"))
    assert val.split()[:5] == ["validation", "3", "3", "0", "1"]
    assert val.endswith("0 / 1 / 2  (1 classes empty)")
    assert "  train             2  truncated" in lines and "  train             1  not an image" in lines
    assert "mean         0.50000   0.45000   0.40000" in lines
    assert "eigval       0.07000   0.06000   0.05000" in lines
    assert "  G          0.00000   1.00000   0.00000" in lines
    assert len({len(lines[3]), len(lines[4])}) == 1  # header underlined to its width


def test_format_report_without_stats(folder):
    (folder / STATS_NAME).unlink()
    report = shard_report(folder)
    assert report["stats"] is None
    assert format_report(report).splitlines()[-1] == "no stats.json (it comes from the train split)"


def test_stats_default_folder_is_shards(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    result = CliRunner().invoke(stats_cmd, ["--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["folder"] == "shards"


@pytest.mark.parametrize("command", [stats_cmd, verify_cmd], ids=["stats", "verify"])
def test_missing_folder_or_info_is_one_clear_line(tmp_path, command):
    for target in (tmp_path / "nowhere", tmp_path):
        result = CliRunner().invoke(command, [str(target)])
        assert result.exit_code == 1
        assert result.output == (
            f"Error: {target / INFO_NAME}: no _info.json here; build the folder with `alexprep build-shards --out {target}`\n"
        )


# ---------------------------------------------------------------------------------------------
# stats --plot


def assert_png(path: Path, size=(1200, 1200)) -> None:
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", size)
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # not blank: text, bars and photos


def test_plot_of_the_demo_build(demo_shards, tmp_path):
    out = tmp_path / "look.png"
    result = CliRunner().invoke(main, ["stats", str(demo_shards), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["look.png"]  # no temporary file left


def test_plot_histogram_for_many_classes_and_the_sample_colours(folder, tmp_path):
    many = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(100)]
    counts = [700 + (i * 37) % 600 for i in range(100)]
    edit_info(folder, lambda info: info.update(classes=many))
    edit_info(folder, lambda info: info["splits"]["train"].__setitem__("class_counts", counts))
    edit_info(folder, lambda info: info["splits"]["validation"].__setitem__("class_counts", [50] * 100))
    plot_shards(folder, tmp_path / "many.png")
    assert_png(tmp_path / "many.png")
    pixels = np.asarray(Image.open(tmp_path / "many.png").convert("RGB")).astype(int)
    for colour in COLOURS:  # each class's sample colour shows in the contact sheet
        assert (np.abs(pixels - colour).sum(axis=2) < 30).sum() > 1000


def test_plot_without_matplotlib_says_how_to_get_it(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    result = CliRunner().invoke(stats_cmd, [str(folder), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.output == f"Error: {VIZ_HINT}\n"
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# verify


def test_verify_the_demo_build(demo_shards):
    assert verify_folder(demo_shards) == []
    shards = sum(math.ceil(10 * n / DEMO_SHARD_SIZE) for n in DEMO_PER_CLASS.values())
    samples = sum(10 * n for n in DEMO_PER_CLASS.values())
    result = CliRunner().invoke(main, ["verify", str(demo_shards)])
    assert (result.exit_code, result.output) == (0, f"verified {shards} shards, {samples} samples: ok\n")


def test_verify_good_hand_made_folder(folder):
    assert verify_folder(folder) == []


def flip_padding_byte(folder: Path) -> None:
    path = folder / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the end-of-archive padding: same samples, different bytes
    path.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    """Cut the shard 100 bytes into its second sample's JPEG."""
    path = folder / "train-000001.tar"
    data = path.read_bytes()
    second_jpeg = data.index(b"\xff\xd8\xff", data.index(b"\xff\xd8\xff") + 1)
    path.write_bytes(data[: second_jpeg + 100])


def small_image(folder: Path) -> None:
    samples = [sample(f"train_0_{j:03d}", label) for j, label in enumerate(LAYOUT["train"][0])]
    samples[2] = sample("train_0_002", 2, size=128)
    replace_shard(folder, "train", 0, samples)


def drop_last_sample(folder: Path) -> None:
    samples = [sample(f"train_1_{j:03d}", label) for j, label in enumerate(LAYOUT["train"][1])]
    replace_shard(folder, "train", 1, samples[:-1])


def bad_fields(folder: Path) -> None:
    samples = [sample(f"validation_0_{j:03d}", label) for j, label in enumerate(LAYOUT["validation"][0])]
    del samples[0][1]["json"]
    samples[1][1]["cls"] = b"7"
    samples[2][1]["cls"] = b"2"  # json still says label 1
    replace_shard(folder, "validation", 0, samples)


def not_baseline(folder: Path) -> None:
    samples = [sample(f"validation_0_{j:03d}", label) for j, label in enumerate(LAYOUT["validation"][0])]
    samples[0][1]["jpg"] = jpeg(COLOURS[1], progressive=True)
    buf = io.BytesIO()
    Image.new("RGB", (256, 256)).save(buf, "PNG")
    samples[1][1]["jpg"] = buf.getvalue()
    samples[2][1]["jpg"] = samples[2][1]["jpg"][:400]
    replace_shard(folder, "validation", 0, samples)


CORRUPTIONS = {
    "flipped-byte": (flip_padding_byte, ["train-000001.tar: sha256 "]),
    "truncated": (truncate, ["train-000001.tar: size ", "train-000001.tar: unreadable tar after 1 samples (unexpected end of data)", "train-000001.tar: 1 samples, _info.json says 4"]),
    "deleted": (lambda f: (f / "validation-000000.tar").unlink(), ["validation-000000.tar: missing (listed in _info.json)"]),
    "small-image": (small_image, ["train-000000.tar: sample train_0_002: jpg is JPEG RGB 128x128, expected JPEG RGB 256x256"]),
    "count": (drop_last_sample, ["train-000001.tar: 3 samples, _info.json says 4"]),
    "stray": (lambda f: shutil.copy(f / "train-000000.tar", f / "train-000002.tar"), ["train-000002.tar: stray shard, not listed in _info.json"]),
    "fields": (bad_fields, [
        "validation-000000.tar: sample validation_0_000: missing json",
        "validation-000000.tar: sample validation_0_001: cls b'7' is not a class index below 3",
        "validation-000000.tar: sample validation_0_002: json says label 1 wnid 'syn01', cls says 2 (syn02)",
    ]),
    "not-baseline": (not_baseline, [
        "validation-000000.tar: sample validation_0_000: jpg is progressive, expected baseline",
        "validation-000000.tar: sample validation_0_001: jpg does not decode (not a JPEG)",
        "validation-000000.tar: sample validation_0_002: jpg does not decode (",
    ]),
    "inputs": (lambda f: edit_info(f, lambda i: i["splits"]["train"].update(num_inputs=13)), ["train: 13 inputs, but 9 written + 3 skipped"]),
    "no-record": (lambda f: edit_info(f, lambda i: i["splits"]["train"]["shards"].pop(1)), ["train-000001.tar: no sha256/size record in _info.json"]),
    "stats": (lambda f: (f / STATS_NAME).unlink(), [f"{STATS_NAME}: no {STATS_NAME} here"]),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_verify_names_each_bad_shard(folder, name):
    damage, expected = CORRUPTIONS[name]
    damage(folder)
    problems = verify_folder(folder)
    # each expected line is a prefix of the problem at the same place, and there are no others
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start.replace(f"{STATS_NAME}:", f"{folder / STATS_NAME}:")), problems
    result = CliRunner().invoke(verify_cmd, [str(folder)])
    assert result.exit_code == 1
    plural = "s" * (len(expected) != 1)
    assert result.output == "".join(p + "\n" for p in problems) + f"verified 3 shards, 12 samples: {len(problems)} problem{plural}\n"


def test_verify_sha_line_gives_both_hashes(folder):
    flip_padding_byte(folder)
    path = folder / "train-000001.tar"
    recorded = json.loads((folder / INFO_NAME).read_text())["splits"]["train"]["shards"][1]["sha256"]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert verify_folder(folder) == [f"train-000001.tar: sha256 {actual}, _info.json says {recorded}"]


def test_verify_caps_sample_lines_per_shard(folder):
    samples = [sample(f"train_0_{j:03d}", j % 3, size=64) for j in range(MAX_SAMPLE_PROBLEMS + 3)]
    replace_shard(folder, "train", 0, samples)
    problems = verify_folder(folder)
    assert len(problems) == MAX_SAMPLE_PROBLEMS + 2
    assert all(p.endswith("jpg is JPEG RGB 64x64, expected JPEG RGB 256x256") for p in problems[:MAX_SAMPLE_PROBLEMS])
    assert problems[-2:] == [
        f"train-000000.tar: 3 more samples with problems (first {MAX_SAMPLE_PROBLEMS} shown)",
        f"train-000000.tar: {MAX_SAMPLE_PROBLEMS + 3} samples, _info.json says 5",
    ]


def test_verify_inconsistent_info_is_one_clear_line(folder):
    edit_info(folder, lambda info: info["splits"]["train"].update(num_samples=10))
    result = CliRunner().invoke(verify_cmd, [str(folder)])
    assert (result.exit_code, result.output) == (
        1, f"Error: {folder / INFO_NAME}: split 'train' has inconsistent filenames/shard_lengths/num_samples\n"
    )


def test_verify_in_processes_finds_the_same(folder):
    truncate(folder)
    small_image(folder)
    assert verify_folder(folder, workers=2) == verify_folder(folder, workers=1)
    assert len(verify_folder(folder, workers=2)) == 4


def test_verify_refuses_stats_with_std_0(folder):
    edit_stats = {**STATS, "std": [0.25, 0.0, 0.26]}
    write_json(folder / STATS_NAME, edit_stats)
    result = CliRunner().invoke(verify_cmd, [str(folder)])
    assert (result.exit_code, result.output.splitlines()) == (1, [
        f"{folder / STATS_NAME}: std [0.25, 0.0, 0.26] has a channel without spread (std must be above 0)",
        "verified 3 shards, 12 samples: 1 problem",
    ])


# ---------------------------------------------------------------------------------------------
# Shard bytes reach the JPEG decoder only

# A format Pillow here writes and reads back, with a mode it writes, for each but JPEG (and MPO, a JPEG).
OTHER_FORMATS = {"BMP": "RGB", "DDS": "RGB", "DIB": "RGB", "EPS": "RGB", "GIF": "RGB", "ICO": "RGB", "IM": "RGB",
                 "MSP": "1", "PCX": "RGB", "PNG": "RGB", "PPM": "RGB", "QOI": "RGB", "SGI": "RGB", "SPIDER": "RGB",
                 "TGA": "RGB", "TIFF": "RGB", "WEBP": "RGB", "XBM": "1"}


def other_format(fmt: str) -> bytes:
    """A 16 x 16 picture as a `fmt` file."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).convert(OTHER_FORMATS[fmt]).save(buf, fmt)
    return buf.getvalue()


def folder_of_other_formats(root: Path) -> tuple[Path, list[str]]:
    """A folder whose train samples hold one non-JPEG file each as `jpg` (shards of 8, so the contact
    sheet draws them all and verify lists each); returns it and verify's expected lines."""
    keys = {f"train_{i // 8}_{i % 8:03d}": fmt for i, fmt in enumerate(OTHER_FORMATS)}
    labels = [i % len(CLASSES) for i in range(len(keys))]
    layout = {"train": [labels[k : k + 8] for k in range(0, len(labels), 8)], "validation": LAYOUT["validation"]}
    folder = make_folder(root, layout, {key: other_format(fmt) for key, fmt in keys.items()})
    return folder, [f"train-{int(key.split('_')[1]):06d}.tar: sample {key}: jpg does not decode (not a JPEG)" for key in keys]


def test_no_decoder_but_jpeg_reaches_shard_bytes(tmp_path, monkeypatch):
    """An EPS (which Pillow hands to Ghostscript), a PNG, a TIFF, ... as a sample's jpg: verify says it is
    not a JPEG and the contact sheet leaves its tile empty, and no other format's reader even looks at it."""
    Image.init()  # every plugin registered, then each opener but JPEG's instrumented
    reached = []

    def watch(fmt, fn):
        return lambda *args, **kwargs: reached.append(fmt) or fn(*args, **kwargs)

    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt != "JPEG":
            monkeypatch.setitem(Image.OPEN, fmt, (watch(fmt, factory), accept and watch(fmt, accept)))
    folder, expected = folder_of_other_formats(tmp_path / "shards")
    assert verify_folder(folder) == expected
    plot_shards(folder, tmp_path / "look.png")
    assert reached == []
    assert_png(tmp_path / "look.png")  # opens the PNG with every reader in reach: the watch sees it
    assert "PNG" in reached


def test_verify_and_plot_never_run_ghostscript(tmp_path):
    """A jpg member replaced by an EPS file (sha256 and size fixed in _info.json) made `verify` and
    `stats --plot` run `gs` on it. A `gs` first on PATH that leaves a mark shows whether one runs."""
    bin_dir, mark = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    folder = make_folder(tmp_path / "shards", jpgs={"train_0_001": other_format("EPS")})
    alexprep = str(Path(sys.executable).with_name("alexprep"))
    verify = subprocess.run([alexprep, "verify", str(folder), "--workers", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert not mark.exists()
    assert (verify.returncode, verify.stdout.splitlines()) == (1, [
        "train-000000.tar: sample train_0_001: jpg does not decode (not a JPEG)", "verified 3 shards, 12 samples: 1 problem"])
    plot = subprocess.run([alexprep, "stats", str(folder), "--plot", str(tmp_path / "look.png")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert not mark.exists()
    assert plot.returncode == 0, plot.stderr
    # The mark works: Pillow left to pick the reader itself runs this `gs` on the same file.
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(other_format("EPS"))
    subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.open({str(eps)!r}).load()"], env=env, capture_output=True, timeout=60)
    assert mark.exists()
