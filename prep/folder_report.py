"""`alexprep stats` and `alexprep verify`: look at a finished shard folder, and check it.

`shard_report` summarises a folder from its `_info.json` and `stats.json` (samples, shards, bytes,
skipped inputs by reason, class balance, pixel statistics); `format_report` renders it as a
fixed-width table and `plot_shards` as a picture (class balance + a contact sheet of samples).
`verify_folder` re-reads every shard once, hashing and parsing it in the same pass, and lists every
way the folder departs from the contract in prep/contract.py.

Shards are read with `prep.contract.iter_samples`, the one rule for grouping tar members into samples,
and their images with `prep.image.open_jpeg`, which lets no decoder but the JPEG one near shard bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import click
import numpy as np
from tqdm import tqdm

from prep.contract import (
    CLS,
    FIELDS,
    IMAGE_SIZE,
    INFO_NAME,
    JPG,
    META,
    SPLITS,
    STATS_NAME,
    ContractError,
    FolderInfo,
    ShardRecord,
    SplitInfo,
    iter_samples,
    label_of,
    read_info,
    read_stats,
    short_name,
)
from prep.figures import SPLIT_COLOURS, VIZ_INSTALL, new_figure, save_png
from prep.image import SkipImage, open_jpeg
from prep.text import fit
from prep.workers import MAX_WORKERS

VIZ_HINT = f"--plot needs matplotlib: {VIZ_INSTALL}"
MAX_SAMPLE_PROBLEMS = 10  # per shard; a systematically broken shard would otherwise print every sample
PLOT_INCHES = (12.0, 12.0)  # (width, height): the PNG is 1200 x 1200 px
SHEET_ROWS, SHEET_COLS = 4, 6
BAR_CHART_MAX_CLASSES = 40  # up to this many classes one bar per class; above, a histogram of counts


# ---------------------------------------------------------------------------------------------
# Reading shards


class _HashingReader:
    """A read-only file wrapper that feeds every byte read through sha256: hash and parse in one pass."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever tarfile left unread: end-of-archive padding, or the rest after an error."""
        while self.read(1 << 20):
            pass


# ---------------------------------------------------------------------------------------------
# stats


def _median(counts: list[int]) -> int | float:
    """The median, as an int where it is one (so JSON shows 100, not 100.0)."""
    m = statistics.median(counts) if counts else 0
    return int(m) if float(m).is_integer() else m


def _split_report(split: SplitInfo) -> dict:
    skipped: dict[str, int] = {}
    for item in split.skipped:
        reason = item.reason.split(":", 1)[0].strip()  # "truncated: 12 bytes missing" -> "truncated"
        skipped[reason] = skipped.get(reason, 0) + 1
    counts = list(split.class_counts)
    return {
        "samples": split.num_samples,
        "inputs": split.num_inputs,
        "shards": len(split.filenames),
        "bytes": sum(s.size for s in split.shards),
        "skipped": dict(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))),
        "num_skipped": len(split.skipped),
        "class_counts": counts,
        "class_balance": {
            "min": min(counts, default=0),
            "median": _median(counts),
            "max": max(counts, default=0),
            "empty": sum(1 for n in counts if n == 0),
        },
    }


def _ordered_splits(info: FolderInfo) -> list[str]:
    """The folder's splits, the contract's ones first in their usual order."""
    names = list(info.splits)
    return [s for s in SPLITS if s in names] + sorted(s for s in names if s not in SPLITS)


def shard_report(folder: str | os.PathLike) -> dict:
    """Summarise a shard folder as a JSON-ready dict.

    Per split: samples, inputs, shards, bytes (from `_info.json`), skipped inputs counted by reason
    (the part of the reason before ':'), samples per class and their min/median/max. Plus the
    build's options and Pillow flavour, and `stats.json` as written (None where there is none).
    Raises ContractError when `_info.json` is missing or malformed.
    """
    folder = Path(folder)
    info = read_info(folder)
    stats = read_stats(folder).to_json() if (folder / STATS_NAME).is_file() else None
    return {
        "folder": str(folder),
        "name": info.name,
        "schema_version": info.schema_version,
        "num_classes": len(info.classes),
        "pillow": info.pillow,
        "options": info.options,
        "splits": {s: _split_report(info.splits[s]) for s in _ordered_splits(info)},
        "stats": stats,
    }


def _human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"


def format_report(report: dict) -> str:
    """Render `shard_report`'s dict as a fixed-width text table."""
    lines = [f"{report['folder']}  ({report['name']}, schema {report['schema_version']}, {report['num_classes']:,} classes)"]
    options = " ".join(f"{k}={v}" for k, v in sorted(report["options"].items()))
    lines.append(f"built with {report['pillow'] or 'unknown Pillow'}: {options}")
    lines.append("")
    header = f"{'split':<12}{'samples':>11}{'inputs':>11}{'skipped':>9}{'shards':>8}{'size':>11}   samples per class min / median / max"
    lines += [header, "-" * len(header)]
    for split, r in report["splits"].items():
        b = r["class_balance"]
        balance = f"{b['min']:,} / {b['median']:,} / {b['max']:,}"
        if b["empty"]:
            balance += f"  ({b['empty']:,} classes empty)"
        lines.append(
            f"{split:<12}{r['samples']:>11,}{r['inputs']:>11,}{r['num_skipped']:>9,}{r['shards']:>8,}"
            f"{_human_bytes(r['bytes']):>11}   {balance}"
        )
    skipped = [(split, reason, n) for split, r in report["splits"].items() for reason, n in r["skipped"].items()]
    if skipped:
        lines += ["", "skipped inputs by reason"]
        lines += [f"  {split:<12}{n:>7,}  {reason}" for split, reason, n in skipped]
    lines.append("")
    stats = report["stats"]
    if stats is None:
        lines.append(f"no {STATS_NAME} (it comes from the train split)")
        return "\n".join(lines)
    every = stats.get("sample_every", 1)
    sample = "" if every == 1 else f" (a seeded sample, 1 in {every})"
    lines.append(
        f"pixel statistics of {stats.get('split', 'train')}: {stats.get('num_images', 0):,} images{sample}, "
        f"{stats.get('num_pixels', 0):,} pixels, {stats.get('pixels', '')}, scale {stats.get('scale', '0..1')}"
    )
    lines.append(f"{'':<10}{'R':>10}{'G':>10}{'B':>10}")
    for name in ("mean", "std", "eigval"):
        lines.append(f"{name:<10}" + "".join(f"{v:>10.5f}" for v in stats[name]))
    lines.append("eigvec    (one eigenvector per column, same order as eigval)")
    for channel, row in zip("RGB", stats["eigvec"]):
        lines.append(f"  {channel:<8}" + "".join(f"{v:>10.5f}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# stats --plot


def _sheet_samples(folder: Path, filenames: list[str], n: int, num_classes: int) -> list[tuple[bytes, int | None]]:
    """(jpg, class index) of the first samples of the first shards: up to SHEET_COLS shards, an equal share of `n` from each."""
    shards = filenames[:SHEET_COLS]
    per_shard = math.ceil(n / max(len(shards), 1))
    picked: list[tuple[bytes, int | None]] = []
    for name in shards:
        with open(folder / name, "rb") as f:
            for i, (_, fields) in enumerate(iter_samples(f)):
                if i == per_shard or len(picked) == n:
                    break
                if JPG in fields:
                    picked.append((fields[JPG], label_of(fields.get(CLS, b""), num_classes)))
    return picked


def _plot_balance(ax, split: str, r: dict, names: list[str]) -> None:
    """One split's class balance: a labelled bar per class when few, else a histogram of samples per class."""
    from matplotlib.ticker import MaxNLocator

    counts, b = r["class_counts"], r["class_balance"]
    colour = SPLIT_COLOURS.get(split, SPLIT_COLOURS[None])
    if len(counts) <= BAR_CHART_MAX_CLASSES:
        bars = ax.bar(range(len(counts)), counts, color=colour)
        if len(counts) <= 12:
            ax.bar_label(bars, fontsize=8)
            ax.margins(y=0.08)  # room for the labels above the tallest bar
        many = len(counts) > 6
        ax.set_xticks(range(len(counts)), names, rotation=35 if many else 0, ha="right" if many else "center", fontsize=8)
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        # integer-aligned bins of at least one sample, at most 50 of them; a few samples of margin so
        # that a perfectly balanced split (every class the same count) shows as one narrow bar
        step = max(1, math.ceil((b["max"] - b["min"] + 1) / 50))
        edges = [b["min"] - 0.5 + step * i for i in range(math.ceil((b["max"] - b["min"] + 1) / step) + 1)]
        ax.hist(counts, bins=edges, color=colour)
        margin = max(5, step)
        ax.set_xlim(b["min"] - margin, b["max"] + margin)
        ax.set_xlabel("samples per class")
        ax.set_ylabel("classes")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{split}: samples per class (min {b['min']:,}, median {b['median']:,}, max {b['max']:,})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' * (n != 1)}"


def plot_shards(folder: str | os.PathLike, out: str | os.PathLike, report: dict | None = None) -> None:
    """Draw the class balance of every split and a contact sheet of training samples to a PNG.

    The PNG is PLOT_INCHES x 100 dpi (1200 x 1200 pixels), written through `atomic_write`.
    Raises ImportError with an install hint when matplotlib is missing.
    """
    fig = new_figure(VIZ_HINT, PLOT_INCHES)
    folder = Path(folder)
    report = report if report is not None else shard_report(folder)
    info = read_info(folder)
    names = [fit(short_name(c.name), 26) for c in info.classes]

    # A fixed layout (fractions of the figure) rather than constrained layout: the page is always the
    # same, and rendering takes half the time.
    splits = report["splits"]
    total = ", ".join(f"{s} {_plural(r['samples'], 'sample')} in {_plural(r['shards'], 'shard')}" for s, r in splits.items())
    fig.suptitle(f"{report['folder']} - {report['num_classes']:,} classes - {total}", fontsize=13, y=0.985)
    top = fig.add_gridspec(1, max(len(splits), 1), left=0.06, right=0.98, top=0.93, bottom=0.74, wspace=0.15)
    for k, (split, r) in enumerate(splits.items()):
        _plot_balance(fig.add_subplot(top[0, k]), split, r, names)

    sheet_split = next((s for s in splits if splits[s]["samples"]), None)
    samples = []
    if sheet_split is not None:
        samples = _sheet_samples(folder, info.splits[sheet_split].filenames, SHEET_ROWS * SHEET_COLS, len(names))
        fig.text(0.5, 0.645, f"first samples of the first {sheet_split} shards", ha="center", fontsize=11)
    sheet = fig.add_gridspec(SHEET_ROWS, SHEET_COLS, left=0.01, right=0.99, top=0.615, bottom=0.005, wspace=0.05, hspace=0.12)
    for i, ax in enumerate(sheet.subplots().flat):
        ax.set_axis_off()
        if i < len(samples):
            jpg, label = samples[i]
            title = f"{label}: {names[label]}" if label is not None else "no valid cls"
            try:
                with open_jpeg(jpg) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
            except SkipImage:
                title = "jpg does not decode"  # an empty tile that says so; `verify` gives the reason
            ax.set_title(title, fontsize=9)

    save_png(fig, out)


# ---------------------------------------------------------------------------------------------
# verify


def _check_sample(key: str, fields: dict[str, bytes], wnids: list[str]) -> list[str]:
    """What is wrong with one sample (empty list = nothing)."""
    problems = []
    missing = [f for f in FIELDS if f not in fields]
    if missing:
        problems.append(f"sample {key}: missing {', '.join(missing)}")
    if JPG in fields:
        try:
            with open_jpeg(fields[JPG]) as im:  # every scan decoded: truncated data only fails there
                fmt, mode, size, progressive = im.format, im.mode, im.size, im.info.get("progressive")
        except SkipImage as e:
            problems.append(f"sample {key}: jpg does not decode ({e})")
        else:
            if (fmt, mode, size) != ("JPEG", "RGB", (IMAGE_SIZE, IMAGE_SIZE)):
                problems.append(f"sample {key}: jpg is {fmt} {mode} {size[0]}x{size[1]}, expected JPEG RGB {IMAGE_SIZE}x{IMAGE_SIZE}")
            elif progressive:
                problems.append(f"sample {key}: jpg is progressive, expected baseline")
    label = label_of(fields.get(CLS, b""), len(wnids))
    if CLS in fields and label is None:
        problems.append(f"sample {key}: cls {fields[CLS][:20]!r} is not a class index below {len(wnids)}")
    if META in fields:
        try:
            meta = json.loads(fields[META])
        except ValueError as e:
            problems.append(f"sample {key}: json does not parse ({e})")
        else:
            if not isinstance(meta, dict):
                problems.append(f"sample {key}: json is not an object")
            elif label is not None and (meta.get("label"), meta.get("wnid")) != (label, wnids[label]):
                problems.append(
                    f"sample {key}: json says label {meta.get('label')!r} wnid {meta.get('wnid')!r}, "
                    f"cls says {label} ({wnids[label]})"
                )
    return problems


def _check_shard(path: Path, expected: ShardRecord, wnids: list[str]) -> list[str]:
    """Problems with one shard file (lines without the shard's name; empty = all good): against its
    `_info.json` record. The file is read once: the tar parser reads through a hashing wrapper.
    """
    problems: list[str] = []
    sample_problems = samples = 0
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        try:
            for key, fields in iter_samples(reader):
                samples += 1
                found = _check_sample(key, fields, wnids)
                if found and sample_problems < MAX_SAMPLE_PROBLEMS:
                    problems += found
                sample_problems += bool(found)
        except (tarfile.TarError, OSError) as e:
            problems.append(f"unreadable tar after {samples} samples ({e})")
        reader.drain()
    if sample_problems > MAX_SAMPLE_PROBLEMS:
        problems.append(f"{sample_problems - MAX_SAMPLE_PROBLEMS} more samples with problems (first {MAX_SAMPLE_PROBLEMS} shown)")
    if reader.size != expected.size:
        problems.insert(0, f"size {reader.size:,} bytes, {INFO_NAME} says {expected.size:,}")
    elif reader.sha256.hexdigest() != expected.sha256:
        # a size mismatch already implies this one; say it only where the size agrees
        problems.insert(0, f"sha256 {reader.sha256.hexdigest()}, {INFO_NAME} says {expected.sha256}")
    if samples != expected.num_samples:
        problems.append(f"{samples:,} samples, {INFO_NAME} says {expected.num_samples:,}")
    return problems


def _map(fn, workers: int, *iterables) -> Iterator:
    """`map`, in `workers` processes when workers > 1 (results in order)."""
    if workers <= 1:
        yield from map(fn, *iterables)
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from pool.map(fn, *iterables)


def verify_folder(folder: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[str]:
    """Check a shard folder against its `_info.json`; return one line per problem (empty = all good).

    Checks: each listed shard exists with the recorded size and sha256 and holds the recorded number
    of samples; each sample has jpg/cls/json, its jpg decodes to a baseline 256x256 RGB JPEG, its cls
    is a class index and its json agrees with it; inputs = written + skipped per split; `stats.json`
    is readable; no `.tar` lies in the folder unlisted. Each line starts with the file it is about.
    (`read_info` has already checked that shard_lengths add up to num_samples, so matching per-shard
    counts mean matching totals.) `workers` > 1 checks shards in that many processes.
    Raises ContractError when `_info.json` itself is missing or malformed.
    """
    folder = Path(folder)
    info = read_info(folder)
    wnids = [c.wnid for c in info.classes]
    problems: list[str] = []
    jobs: list[tuple[str, Path, ShardRecord]] = []  # (shard name, path, what _info.json expects of it)
    listed: set[str] = set()
    for name in _ordered_splits(info):
        split = info.splits[name]
        records = {r.filename: r for r in split.shards}
        written, skipped = split.num_samples, len(split.skipped)
        if split.num_inputs != written + skipped:
            problems.append(f"{name}: {split.num_inputs:,} inputs, but {written:,} written + {skipped:,} skipped")
        for filename in sorted(set(records) - set(split.filenames)):
            problems.append(f"{filename}: has a sha256/size record in {INFO_NAME} but is not in {name}'s filenames")
        for filename, length in zip(split.filenames, split.shard_lengths):
            listed.add(filename)
            record = records.get(filename)
            if record is None:
                problems.append(f"{filename}: no sha256/size record in {INFO_NAME}")
            elif record.num_samples != length:
                problems.append(f"{filename}: {INFO_NAME} records {record.num_samples:,} samples, shard_lengths says {length:,}")
            elif not (folder / filename).is_file():
                problems.append(f"{filename}: missing (listed in {INFO_NAME})")
            else:
                jobs.append((filename, folder / filename, record))
    for path in sorted(folder.glob("*.tar")):
        if path.name not in listed:
            problems.append(f"{path.name}: stray shard, not listed in {INFO_NAME}")
    # build-shards writes stats.json from the train split's pixels, so only where there are some
    if ("train" in info.splits and info.splits["train"].num_samples) or (folder / STATS_NAME).exists():
        try:
            read_stats(folder)
        except ContractError as e:
            problems.append(str(e))

    names, paths, expected = zip(*jobs) if jobs else ((), (), ())
    results = _map(_check_shard, min(workers, len(jobs)), paths, expected, [wnids] * len(jobs))
    for name, found in zip(names, tqdm(results, total=len(jobs), unit="shard", desc="verify", disable=not progress)):
        problems += [f"{name}: {p}" for p in found]
    return problems


# ---------------------------------------------------------------------------------------------
# Commands


@click.command("stats")
@click.argument("folder", default="shards", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Also draw class balance and sample images to this PNG.")
def stats_cmd(folder: Path, as_json: bool, plot: Path | None) -> None:
    """Summarise the shard folder FOLDER: samples, shards, skipped inputs, class balance, RGB stats."""
    try:
        report = shard_report(folder)
        if plot is not None:
            plot_shards(folder, plot, report)
    except (ContractError, ImportError, OSError, tarfile.TarError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if plot is not None:
        click.echo(f"wrote {plot}", err=True)


@click.command("verify")
@click.argument("folder", default="shards", type=click.Path(path_type=Path))
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=os.cpu_count() or 1, show_default=True,
              help=f"Processes checking shards in parallel (at most {MAX_WORKERS}: 4 per core).")
@click.pass_context
def verify_cmd(ctx: click.Context, folder: Path, workers: int) -> None:
    """Check every shard of FOLDER against its _info.json: hashes, sizes, counts, every image."""
    try:
        problems = verify_folder(folder, workers=workers, progress=sys.stderr.isatty())
    except ContractError as e:
        raise click.ClickException(str(e)) from e
    splits = read_info(folder).splits.values()
    shards = sum(len(s.filenames) for s in splits)
    samples = sum(s.num_samples for s in splits)
    for line in problems:
        click.echo(line)
    verdict = "ok" if not problems else _plural(len(problems), "problem")
    click.echo(f"verified {shards:,} shards, {samples:,} samples: {verdict}")
    if problems:
        ctx.exit(1)
