"""`alexprep`: build 256 px WebDataset shards (+ RGB statistics) from ImageNet-1k or another source.

Commands: `build-shards`, `demo` (the built-in synthetic set, then its report), `stats`, `verify`.
The CLI only parses options into a BuildConfig and calls prep.build; errors become one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from prep.build import DEFAULT_PREFETCH, DEFAULT_SHARD_SIZE, BuildConfig, build
from prep.contract import IMAGENET_TRAIN_IMAGES, SPLITS
from prep.errors import BuildError, FetchError, SourceError
from prep.folder_report import format_report, shard_report, stats_cmd, verify_cmd
from prep.listed_source import SYNTHETIC
from prep.open_source import HUB_ID
from prep.stats import MAX_EVERY, MIN_SAMPLE, sample_every
from prep.workers import MAX_WORKERS

DEMO_OUT = "shards/demo"
DEMO_SHARD_SIZE = 250  # the demo's 1,000 train images -> 4 shards, 200 validation images -> 1


@click.group()
def main() -> None:
    """ImageNet-1k -> 256 px WebDataset tar shards with their RGB statistics."""


def _parse_splits(values: tuple[str, ...]) -> tuple[str, ...]:
    """`--splits train,validation` or `--splits train --splits validation` -> ("train", "validation")."""
    splits = [s.strip() for value in values for s in value.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise click.BadParameter(f"{unknown[0]!r} is not one of {', '.join(SPLITS)}", param_hint="--splits")
    return tuple(splits) or SPLITS


def _parse_per_class(values: tuple[str, ...], splits: tuple[str, ...]) -> dict[str, int] | None:
    """`--per-class 30` (every split) or `--per-class train=30 --per-class validation=10`."""
    if not values:
        return None
    counts = {}
    for value in values:
        split, _, n = value.rpartition("=")
        try:
            count = int(n)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected N or SPLIT=N", param_hint="--per-class") from None
        for s in ((split,) if split else splits):
            counts[s] = count
    return counts


def _run(out: Path, config: BuildConfig, workers: int, progress: bool, prefetch: int = DEFAULT_PREFETCH,
         keep_download: Path | None = None) -> None:
    """Build, print the reconciliation line per split, turn expected failures into one error line."""
    try:
        built = build(out, config, workers=workers, progress=progress, log=click.echo, prefetch=prefetch,
                      keep_download=keep_download)
    except (BuildError, SourceError, FetchError) as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:  # a full disk, a file size limit, a read-only or unwritable --out
        where = f"{e.filename}: " if e.filename else ""
        raise click.ClickException(f"cannot write the build in {out}: {where}{e.strerror or e}; finished shards "
                                   f"are kept: fix that, then rerun the same command") from e
    for split, entry in built.info.splits.items():
        click.echo(f"{split}: {entry.num_inputs} inputs = {entry.num_samples} written + {len(entry.skipped)} skipped")
    if built.wrote:
        click.echo(f"wrote {out}")


_workers_option = click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=os.cpu_count() or 1,
                               show_default=True, help=f"Processes decoding and encoding images and finishing shards "
                                                       f"(at most {MAX_WORKERS}: 4 per core).")
_progress_option = click.option("--progress/--no-progress", default=True, help="Show a progress bar per split.")


@main.command("build-shards")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="shards", show_default=True,
              help="Output folder; rerun the same command to finish an interrupted build.")
@click.option("--source", default=HUB_ID, show_default=True,
              help=f"A Hub dataset id, a local folder (data/*.parquet, or train/ and val/ class folders), "
                   f"or '{SYNTHETIC}'.")
@click.option("--splits", multiple=True, help="Comma-separated or repeated; default: train,validation.")
@click.option("--limit", type=click.IntRange(min=1),
              help="At most N inputs per split, for trials: whole parquet row groups (or single items) in a "
                   "seeded random order, so a Hub trial fetches little more than it keeps.")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Inputs per shard.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sample order.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality.")
@click.option("--per-class", multiple=True,
              help=f"{SYNTHETIC} source only: images per class, N or SPLIT=N (repeatable).")
@click.option("--stats-every", type=click.IntRange(min=1),
              help="Pixel statistics from every K-th train image in written order (a seeded random sample); "
                   f"default: every image up to {2 * MIN_SAMPLE:,}, else at least {MIN_SAMPLE:,} images, K at most "
                   f"{MAX_EVERY} (ImageNet: {sample_every(IMAGENET_TRAIN_IMAGES)}). 1: exact over every image.")
@click.option("--prefetch", type=click.IntRange(min=1), default=DEFAULT_PREFETCH, show_default=True,
              help="Hub builds: parquet files on disk at once (the one being read and the next ones downloading).")
@click.option("--keep-download", type=click.Path(file_okay=False, path_type=Path),
              help="Hub builds: move each parquet file here after use (a local copy for --source) "
                   "instead of deleting it.")
@_workers_option
@_progress_option
def build_shards_cmd(out: Path, source: str, splits: tuple[str, ...], limit: int | None, shard_size: int, seed: int,
                     quality: int, per_class: tuple[str, ...], stats_every: int | None, prefetch: int,
                     keep_download: Path | None, workers: int, progress: bool) -> None:
    """Build the shard folder OUT (train/validation tar shards, _info.json, stats.json)."""
    split_names = _parse_splits(splits)
    try:
        config = BuildConfig(source=source, splits=split_names, limit=limit, shard_size=shard_size, seed=seed,
                             quality=quality, per_class=_parse_per_class(per_class, split_names),
                             stats_every=stats_every)
    except BuildError as e:
        raise click.UsageError(str(e)) from e
    _run(out, config, workers, progress, prefetch, keep_download)


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEMO_OUT, show_default=True)
@_workers_option
@_progress_option
def demo_cmd(out: Path, workers: int, progress: bool) -> None:
    """Build the built-in synthetic demo set (10 classes) into OUT and print its report."""
    _run(out, BuildConfig(source=SYNTHETIC, shard_size=DEMO_SHARD_SIZE), workers, progress)
    click.echo(format_report(shard_report(out)))


main.add_command(stats_cmd)
main.add_command(verify_cmd)
