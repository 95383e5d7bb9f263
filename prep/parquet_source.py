"""The parquet source: `data/{split}-*.parquet` of a local folder or a Hub repo, read straight with pyarrow.

One part per file (files in name order, rows in file order), one unit per row group. Row counts come
from the footers alone, read when the source is opened, so a build knows every row's place before it
reads an image; no `datasets` Arrow copy is ever made (`datasets` reads only the ClassLabel names from
the schema metadata). Where the rows come from (prep/fetch.py's stores):
- a local folder, or a `--limit` trial from the Hub: row groups read in place, or by exact ranged reads;
- a full build from the Hub: whole files downloaded into the staging folder, `Staging.prefetch` at most
  on disk at once (the next ones download in threads while the current one is read), each checked
  against the listing and deleted (or moved to `Staging.keep`) once read.
A row group that cannot be fetched or read, or holds other rows than its footer said, stops the build
with one line naming the file (FetchError). Keys are the image paths' stems, made distinct
(`distinct_key`) where files share a stem.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prep.contract import ClassInfo, imagenet_classes
from prep.errors import FetchError, SourceError
from prep.fetch import HubStore, Store, row_groups
from prep.source import (Part, PartRequest, Row, RowReader, SeenKeys, Source, Staging, qualified_key,
                         require_splits, safe_key)
from prep.text import first_line

_FOOTER_THREADS = 8  # parquet footers read at once when a source is opened


class ParquetRow(NamedTuple):
    """One row of a parquet table as stored; `key` is not yet made distinct."""

    key: str
    label: int
    data: bytes | None
    skip: str | None = None  # the row cannot become a sample, and why
    path: str | None = None  # image.path, which the key comes from (see distinct_key)


class ParquetSource(Source):
    """Parquet files of one store, described from their footers."""

    def __init__(self, store: Store, identity: str, name: str, classes: list[ClassInfo], parts: dict[str, list[Part]],
                 input_dirs: tuple[Path, ...] = ()):
        super().__init__(identity, name, classes, input_dirs)
        self.store = store
        self._parts = parts

    def parts(self, split: str) -> list[Part]:
        return self._parts[split]

    def digest(self) -> dict[str, str]:
        out = {}
        for split, parts in self._parts.items():
            h = hashlib.sha256()
            h.update("\n".join(c.wnid for c in self.classes).encode("utf-8"))
            for part in parts:
                h.update(f"\n{part.name}\t{part.size}\t{','.join(map(str, part.units))}".encode("utf-8"))
            out[split] = h.hexdigest()
        return out

    def reader(self, requests: Sequence[PartRequest], staging: Staging) -> RowReader:
        return _ParquetReader(self, requests, staging)


def open_parquet(store: Store, identity: str, name: str, splits: tuple[str, ...], where: str,
                 input_dirs: tuple[Path, ...] = ()) -> ParquetSource:
    """The `data/{split}-*.parquet` files of `store`, described from their footers; SourceError in one line."""
    names = None
    found = {}
    for split in splits:
        files = store.files(split)
        if not files:
            raise SourceError(f"{where}: no data/{split}-*.parquet files; choose others with --splits")
        parts = []
        with ThreadPoolExecutor(_FOOTER_THREADS) as pool:  # footers are small reads: many at once
            footers = list(pool.map(lambda f: store.footer(*f), files))
        for (path, size), meta in zip(files, footers):
            file_names = _label_names(meta.schema.to_arrow_schema(), f"{where}: {path}")
            if names is not None and file_names != names:
                raise SourceError(f"{where}: {path} has other class names than {files[0][0]}")
            names = file_names
            parts.append(Part(path, row_groups(meta), size))
        found[split] = parts
    if not names:
        raise SourceError(f"{where}: the 'label' ClassLabel has no class names; a source needs at least one class")
    canonical = imagenet_classes()
    classes = canonical if _is_imagenet(names, canonical) else [ClassInfo(i, n, n) for i, n in enumerate(names)]
    require_splits({split: sum(p.num_rows for p in parts) for split, parts in found.items()}, splits, where)
    return ParquetSource(store, identity, name, classes, found, input_dirs)


def _is_imagenet(names: list[str], canonical: list[ClassInfo]) -> bool:
    """ClassLabel names that are ImageNet-1k's: its wnids, or its names in index order.

    ImageNet repeats one name ("crane", bird and machine) and ClassLabel refuses duplicates, so a
    copy that renamed one or two repeats still counts: at least 990 of the 1,000 names must agree.
    """
    if len(names) != len(canonical):
        return False
    return names == [c.wnid for c in canonical] or sum(a == c.name for a, c in zip(names, canonical)) >= 990


def _label_names(schema, where: str) -> list[str]:
    """The ClassLabel names of a parquet file's `label` column, from the `datasets` schema metadata."""
    import datasets

    try:
        features = datasets.Features.from_arrow_schema(schema)
    except (TypeError, ValueError, KeyError) as e:
        raise SourceError(f"{where}: unreadable column description ({e})") from None
    if not (isinstance(features.get("image"), datasets.Image) and isinstance(features.get("label"), datasets.ClassLabel)):
        raise SourceError(f"{where} needs an Image 'image' column and a ClassLabel 'label' column")
    return list(features["label"].names)


def parquet_rows(table, split: str, first_row: int, num_classes: int) -> Iterator[ParquetRow]:
    """Rows of a pyarrow table with columns image {bytes, path} and label; `first_row`: row number of its first row.

    The key is the safe stem of image.path, or `{split}_{row:08d}` where the path is missing (a build
    makes keys that collide distinct with `distinct_key`). A row without embedded bytes is skipped: a
    path alone would point at a file on somebody else's disk.
    """
    image = table.column("image").combine_chunks()
    datas = image.field("bytes").to_pylist()
    paths = image.field("path").to_pylist()
    labels = table.column("label").to_pylist()
    for i, (data, path, label) in enumerate(zip(datas, paths, labels)):
        row = first_row + i
        key = safe_key(PurePath(path).stem) if path else ""
        key = key or f"{split}_{row:08d}"
        if label is None or not 0 <= label < num_classes:
            yield ParquetRow(key, -1, None, f"label {label!r} is not a class index", path)
        elif not data:
            yield ParquetRow(key, label, None, "no image bytes in the row", path)
        else:
            yield ParquetRow(key, label, data, None, path)


def distinct_key(key: str, path: str | None, number: int, seen: SeenKeys) -> str:
    """A key for a row (`key`, from image `path`; row `number` of its split) that no earlier row in `seen` has;
    added to `seen`.

    Its own key where that is new, so a row that collides with none keeps the key it always had; else
    qualified as the folder-tree source qualifies colliding names (`class217/image_0001.jpg` ->
    `class217_image_0001_jpg`), then by the row number until new. It depends only on the keys before it,
    which a build journals, so a resumed build gives every row the same key.
    """
    if key in seen:
        key = qualified_key(PurePath(path)) if path else key
        while key in seen:
            key = f"{key}_{number}"
    seen.add(key)
    return key


class _ParquetReader(RowReader):
    """Rows of the requested parts: whole files staged ahead for a full split from the Hub, else row groups."""

    def __init__(self, source: ParquetSource, requests: Sequence[PartRequest], staging: Staging):
        self._source = source
        self._starts = {}  # split -> first row of each part
        for split in {r.split for r in requests}:
            rows = [p.num_rows for p in source.parts(split)]
            self._starts[split] = np.cumsum(rows) - rows
        store = source.store
        whole = [source.parts(r.split)[r.part].name for r in requests if r.whole_split]
        self._downloads = None
        if isinstance(store, HubStore) and whole:  # whole files are worth downloading ahead only from afar
            staging.folder.mkdir(exist_ok=True)
            self._downloads = _Downloads(store, whole, staging)

    def rows(self, request: PartRequest, keys: SeenKeys) -> Iterator[Row]:
        source, store = self._source, self._source.store
        part = source.parts(request.split)[request.part]
        where = store.where(part.name)
        first = int(self._starts[request.split][request.part])
        wanted = np.zeros(part.num_rows, bool)
        wanted[request.rows - first] = True
        unit_first = np.cumsum(part.units) - part.units
        staged = self._downloads.take() if self._downloads is not None and request.whole_split else None
        pf = _parquet_file(staged[1], where) if staged is not None else store.parquet(part.name)
        try:
            for u, n in enumerate(part.units):
                if not wanted[unit_first[u]:unit_first[u] + n].any():
                    continue
                table = _read_group(pf, u, n, where)
                if staged is None:
                    meta = pf.metadata.row_group(u)
                    self.bytes_read += sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
                start = first + int(unit_first[u])
                for i, row in enumerate(parquet_rows(table, request.split, start, len(source.classes))):
                    if wanted[start + i - first]:
                        key = distinct_key(row.key, row.path, start + i, keys)
                        yield Row(start + i, key, row.label, row.data, row.skip)
        finally:
            pf.close()
        if staged is not None:
            self.bytes_read += part.size
            self._downloads.release(*staged, part.name)


def _read_group(pf: pq.ParquetFile, group: int, rows: int, where: str) -> pa.Table:
    """Row group `group` (of `rows` rows, as the footer read at open says) of parquet file `where` as a
    table; FetchError (one line naming the file) if it cannot be fetched or read, or holds other rows."""
    try:
        table = pf.read_row_group(group, columns=["image", "label"])
    except FetchError:  # the network's doing (prep.fetch retried it already)
        raise
    except Exception as e:
        raise FetchError(f"{where}: not a readable parquet file ({first_line(e)}); the build stopped "
                         f"(finished shards are complete)") from None
    if table.num_rows != rows:
        raise FetchError(f"{where}: row group {group} holds {table.num_rows} rows where the footer read when the "
                         f"build started says {rows}; the build stopped (finished shards are complete)")
    return table


def _parquet_file(path: Path, where: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FetchError(f"{where}: not a readable parquet file ({first_line(e)}); the build stopped "
                         f"(finished shards are complete)") from None


class _Downloads:
    """Whole Hub files, downloaded in daemon threads at most `staging.prefetch` at a time, taken in order.

    File n is downloaded into `staging.folder/NNNNN/` (its own folder: a file that appears twice in a
    list cannot collide with itself)."""

    def __init__(self, store: HubStore, paths: list[str], staging: Staging):
        self._store, self._staging = store, staging
        self._todo = deque(enumerate(paths))
        self._running: deque = deque()

    def _top_up(self) -> None:
        while self._todo and len(self._running) < self._staging.prefetch:
            n, path = self._todo.popleft()
            result: dict = {}
            folder = self._staging.folder / f"{n:05d}"

            def fetch(path=path, folder=folder, result=result):
                try:
                    result["path"] = self._store.download(path, folder)
                except BaseException as e:  # handed to the reading thread by take()
                    result["error"] = e

            thread = threading.Thread(target=fetch, daemon=True)
            thread.start()
            self._running.append((folder, thread, result))

    def take(self) -> tuple[Path, Path]:
        """(the next file's staging folder, the downloaded file); call release() once it is read."""
        self._top_up()
        folder, thread, result = self._running[0]
        thread.join()
        if "error" in result:
            raise result["error"]
        return folder, result["path"]

    def release(self, folder: Path, path: Path, name: str) -> None:
        self._running.popleft()
        if self._staging.keep is not None:
            (self._staging.keep / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, self._staging.keep / name)
        shutil.rmtree(folder)
        self._top_up()
