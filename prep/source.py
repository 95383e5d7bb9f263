"""Where `alexprep` reads images from: the Hub, a local parquet folder, an ILSVRC-2012 tree, or `synthetic`.

Every split is a sequence of rows numbered 0..N-1, cut into parts that are read whole or in units:
- parquet (local folder or Hub repo): one part per `data/{split}-*.parquet` file, files in name order,
  rows in file order; a unit is a row group. Row counts come from the parquet footers alone, so the
  build knows every row's place before it reads any image. Rows stream by as the files are read.
- listed sources (ILSVRC tree, synthetic): items sorted by key, parts of at least `LIST_PART_ROWS`
  items, one row per unit; a worker reads an item's bytes itself (`Source.read`).

A source gives a stable identity string, its class table, a digest of what it holds (recorded with the
build, so a resumed build refuses changed inputs) and per split its parts. Parquet rows are read with
pyarrow straight from the files: no `datasets` Arrow copy. `datasets` is used for one thing, reading
the ClassLabel names from the parquet schema metadata. The Hub side (listing, footers, downloads,
ranged reads) is prep/fetch.py; the token is handed to `huggingface_hub` and never printed or stored.
"""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Iterator, Mapping, NamedTuple

from prep.contract import SPLITS, ClassInfo, imagenet_classes

HUB_ID = "ILSVRC/imagenet-1k"
SYNTHETIC = "synthetic"
_FOOTER_THREADS = 8  # parquet footers read at once when a source is opened
# Listed items per part: a build over a tree or synthetic commits its progress after each part, at least
# every LIST_PART_ROWS items but at most LIST_PARTS times per split (each commit syncs every partial shard
# it touched: ImageNet's 1.28 M train files make parts of about 5,000, like one of its parquet files).
LIST_PART_ROWS = 256
LIST_PARTS = 256
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Split name -> folder names an ILSVRC-2012 style tree may use for it, in order of preference.
_TREE_FOLDERS = {"train": ("train",), "validation": ("validation", "val")}


class SourceError(Exception):
    """A source that cannot be opened or read as asked; the message says what to do."""


class Item(NamedTuple):
    key: str  # stable sample id: letters, digits, "_" and "-" only (webdataset splits keys at dots)
    label: int  # class index into Source.classes


class Row(NamedTuple):
    """One input as the build streams it: `data` None means a worker reads it (`Source.read`)."""

    key: str
    label: int
    data: bytes | None
    skip: str | None = None  # the row cannot become a sample, and why
    path: str | None = None  # parquet rows: the image path the key comes from (see distinct_key)


@dataclass(frozen=True)
class Part:
    """Consecutive rows of a split, read together: one parquet file, or a block of listed items."""

    name: str  # "data/train-00003-of-00024.parquet", or "items 256-511"
    units: tuple[int, ...]  # rows per unit (a parquet row group; one listed item), in row order
    size: int = 0  # bytes of the parquet file (0 for listed items)

    @property
    def num_rows(self) -> int:
        return sum(self.units)


@dataclass(frozen=True)
class Split:
    """One split: its parts in row order and, for listed sources, its items."""

    name: str
    parts: list[Part]
    items: list[Item] | None = None  # listed sources: row i is items[i]
    read_item: Callable[[int], bytes] | None = None  # listed sources: row -> raw bytes

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)


@dataclass(frozen=True)
class Source:
    """An opened source: what a build records about it, and its splits."""

    identity: str  # e.g. "ILSVRC/imagenet-1k", "synthetic", "parquet:/abs/folder", "folder:/abs/folder"
    name: str  # dataset name for _info.json
    classes: list[ClassInfo]
    splits: dict[str, Split]
    store: object | None = None  # prep.fetch store of a parquet source (local folder or Hub repo)
    input_dirs: tuple[Path, ...] = ()  # local folders whose listings decide the inputs (a build must not write there)

    def split(self, name: str) -> Split:
        return self.splits[name]

    def items(self, split: str) -> list[Item]:
        """A listed source's items, sorted by key."""
        return self.splits[split].items

    def read(self, split: str, row: int) -> bytes:
        """A listed source's raw bytes of row `row`."""
        return self.splits[split].read_item(row)

    def digest(self) -> dict[str, str]:
        """Per split, a sha256 of what decides the rows: item keys and labels, or files and row groups."""
        out = {}
        for name, split in self.splits.items():
            h = hashlib.sha256()
            if split.items is not None:
                for key, label in split.items:
                    h.update(f"{key}\t{label}\n".encode("utf-8"))
            else:
                h.update("\n".join(c.wnid for c in self.classes).encode("utf-8"))
                for part in split.parts:
                    h.update(f"\n{part.name}\t{part.size}\t{','.join(map(str, part.units))}".encode("utf-8"))
            out[name] = h.hexdigest()
        return out


def open_source(spec: str, splits: tuple[str, ...] = SPLITS, per_class: Mapping[str, int] | None = None) -> Source:
    """Open the source named by `spec` for `splits`; raise SourceError with one clear line if it cannot be.

    `spec`: "synthetic", a local folder (parquet files under data/, or an ILSVRC-2012 tree with
    train/ and val/ or validation/ class folders), or a Hub dataset id such as "ILSVRC/imagenet-1k".
    `per_class` (synthetic only): images per class for each split. Nothing is written anywhere.
    """
    if per_class and spec != SYNTHETIC:
        raise SourceError(f"per-class counts apply only to the synthetic source, not to {spec!r}")
    if spec == SYNTHETIC:
        return _open_synthetic(splits, per_class or {})
    path = Path(spec).expanduser()
    if path.is_dir():
        if sorted((path / "data").glob("*.parquet")):
            from prep.fetch import LocalStore

            root = path.resolve()
            return _open_parquet(LocalStore(root), f"parquet:{root}", root.name, splits, f"--source {root}",
                                 (root / "data",))
        return _open_tree(path.resolve(), splits)
    if path.exists():
        raise SourceError(f"--source {spec}: not a folder")
    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "~")):
        from prep.fetch import HubStore

        return _open_parquet(HubStore.open(spec), spec, spec.split("/")[-1], splits, spec)
    raise SourceError(f"--source {spec}: no such folder, and not 'synthetic' or a Hub dataset id like {HUB_ID}")


def safe_key(text: str) -> str:
    """`text` with every character other than letters, digits, "_" and "-" replaced by "_"."""
    return _UNSAFE_KEY_CHARS.sub("_", text)


def _qualified_key(path: PurePath) -> str:
    """The key of an input whose stem another input shares: its folder's name and its file name."""
    return safe_key(f"{path.parent.name}_{path.name}" if path.parent.name else path.name)


def distinct_key(row: Row, number: int, seen: set[str]) -> str:
    """A key for parquet `row` (row `number` of its split) that no earlier input in `seen` has; added to `seen`.

    Its own key where that is new, so an input that collides with none keeps the key it always had;
    else qualified as the folder-tree source qualifies colliding names (`class217/image_0001.jpg` ->
    `class217_image_0001_jpg`), then by the row number until new. It depends only on the keys before
    it, which a build journals, so a resumed build gives every row the same key.
    """
    key = row.key
    if key in seen:
        key = _qualified_key(PurePath(row.path)) if row.path else key
        while key in seen:
            key = f"{key}_{number}"
    seen.add(key)
    return key


def _sorted_items(keys: list[str], fallback: list[str], labels: list[int], where: str) -> tuple[list[Item], list[int]]:
    """Items sorted by key and, for each, its position in the input lists.

    `keys` are used when they are all non-empty and distinct, else `fallback` (always distinct).
    """
    if not all(keys) or len(set(keys)) != len(keys):
        keys = fallback
        if len(set(keys)) != len(keys):
            raise SourceError(f"{where}: two inputs map to the same sample key; rename one of them")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [Item(keys[i], labels[i]) for i in order], order


def _listed_split(name: str, items: list[Item], read_item: Callable[[int], bytes]) -> Split:
    per_part = max(LIST_PART_ROWS, -(-len(items) // LIST_PARTS))
    parts = [Part(f"items {start}-{min(start + per_part, len(items)) - 1}", (1,) * min(per_part, len(items) - start))
             for start in range(0, len(items), per_part)]
    return Split(name, parts, items, read_item)


def _require(found: dict[str, Split], splits: tuple[str, ...], where: str) -> None:
    for split in splits:
        if split not in found:
            present = ",".join(found) or "none"
            raise SourceError(f"{where} has no {split} split (it has: {present}); choose others with --splits")
        if not found[split].num_rows:
            raise SourceError(f"{where}: the {split} split holds no images")


def _open_synthetic(splits: tuple[str, ...], per_class: Mapping[str, int]) -> Source:
    from prep import synthetic

    readers = {}
    for split in splits:
        items = [Item(key, label) for key, label in synthetic.items(split, per_class=per_class.get(split))]
        readers[split] = _listed_split(split, items, lambda i, items=items: synthetic.image_bytes(*items[i]))
    return Source(SYNTHETIC, SYNTHETIC, list(synthetic.CLASSES), readers)


def _classes_from_folders(names: list[str]) -> tuple[list[ClassInfo], dict[str, int]]:
    """ImageNet wnids get the canonical table; any other folder names get sorted-order indices."""
    canonical = imagenet_classes()
    by_wnid = {c.wnid: c.index for c in canonical}
    if all(name in by_wnid for name in names):
        return canonical, by_wnid
    classes = [ClassInfo(i, name, name) for i, name in enumerate(sorted(names))]
    return classes, {c.wnid: c.index for c in classes}


def _open_tree(root: Path, splits: tuple[str, ...]) -> Source:
    """`train/<class>/*` and `val/<class>/*` (or `validation/<class>/*`); every visible file is an input."""
    split_dirs = {}  # every split the tree has, so class indices do not depend on --splits
    for split, folders in _TREE_FOLDERS.items():
        found = [root / f for f in folders if (root / f).is_dir()]
        if found:
            split_dirs[split] = found[0]
    if not split_dirs:
        raise SourceError(f"--source {root}: neither data/*.parquet nor train/, val/ or validation/ "
                          f"class folders found")

    def visible(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))

    class_dirs = {split: [d for d in visible(folder) if d.is_dir()] for split, folder in split_dirs.items()}
    for split, folder in split_dirs.items():
        loose = [p.name for p in visible(folder) if p.is_file()]
        if loose:
            raise SourceError(f"{folder}: files outside class folders (e.g. {loose[0]}); "
                              f"expected {folder.name}/<class>/<image>")
    classes, index = _classes_from_folders(sorted({d.name for dirs in class_dirs.values() for d in dirs}))

    readers = {}
    for split, dirs in class_dirs.items():
        if split not in splits:
            continue
        paths = [p for d in dirs for p in visible(d) if p.is_file()]
        labels = [index[p.parent.name] for p in paths]
        keys = [safe_key(p.stem) for p in paths]
        fallback = [_qualified_key(p) for p in paths]
        items, order = _sorted_items(keys, fallback, labels, str(split_dirs[split]))
        ordered = [paths[i] for i in order]
        readers[split] = _listed_split(split, items, lambda i, ordered=ordered: ordered[i].read_bytes())
    _require(readers, splits, f"--source {root}")
    return Source(f"folder:{root}", root.name, classes, readers, input_dirs=tuple(split_dirs.values()))


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


def _open_parquet(store, identity: str, name: str, splits: tuple[str, ...], where: str,
                  input_dirs: tuple[Path, ...] = ()) -> Source:
    """`data/{split}-*.parquet` files of `store` (prep.fetch), described from their footers alone."""
    from prep.fetch import row_groups

    names = None
    readers = {}
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
        readers[split] = Split(split, parts)
    if not names:
        raise SourceError(f"{where}: the 'label' ClassLabel has no class names; a source needs at least one class")
    canonical = imagenet_classes()
    if _is_imagenet(names, canonical):
        classes = canonical
    else:
        classes = [ClassInfo(i, n, n) for i, n in enumerate(names)]
    _require(readers, splits, where)
    return Source(identity, name, classes, readers, store, input_dirs)


def parquet_rows(table, split: str, first_row: int, num_classes: int) -> Iterator[Row]:
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
            yield Row(key, -1, None, f"label {label!r} is not a class index", path)
        elif not data:
            yield Row(key, label, None, "no image bytes in the row", path)
        else:
            yield Row(key, label, data, None, path)
