"""Listed sources: an ILSVRC-2012 style folder tree, or the built-in `synthetic` set.

Each split is a list of items (key, label) sorted by key; one row per item, one item per unit, parts of
at least LIST_PART_ROWS items. A build commits its progress after each part (syncing every partial shard
the part touched), so parts are also at most LIST_PARTS per split: ImageNet's 1.28 M train files make
parts of about 5,000, like one of its parquet files. Rows are handed over without their bytes: the
worker that processes a row reads its file (`ListedSource.read`), so reading runs in parallel too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

from prep.contract import ClassInfo, imagenet_classes
from prep.errors import SourceError
from prep.source import (Part, PartRequest, Row, RowReader, SeenKeys, Source, Staging, qualified_key,
                         require_splits, safe_key)

SYNTHETIC = "synthetic"
LIST_PART_ROWS = 256
LIST_PARTS = 256
# Split name -> folder names an ILSVRC-2012 style tree may use for it, in order of preference.
_TREE_FOLDERS = {"train": ("train",), "validation": ("validation", "val")}


class Item(NamedTuple):
    key: str  # stable sample id: letters, digits, "_" and "-" only
    label: int  # class index into Source.classes


class ListedSplit(NamedTuple):
    items: list[Item]  # row i is items[i]
    read_item: Callable[[int], bytes]  # row -> raw bytes
    parts: list[Part]


class ListedSource(Source):
    """A source whose rows are listed items, read one by one where they are processed."""

    def __init__(self, identity: str, name: str, classes: list[ClassInfo], splits: dict[str, ListedSplit],
                 input_dirs: tuple[Path, ...] = ()):
        super().__init__(identity, name, classes, input_dirs)
        self.splits = splits

    def parts(self, split: str) -> list[Part]:
        return self.splits[split].parts

    def items(self, split: str) -> list[Item]:
        """The split's items, sorted by key."""
        return self.splits[split].items

    def digest(self) -> dict[str, str]:
        out = {}
        for name, split in self.splits.items():
            h = hashlib.sha256()
            for key, label in split.items:
                h.update(f"{key}\t{label}\n".encode("utf-8"))
            out[name] = h.hexdigest()
        return out

    def reader(self, requests: Sequence[PartRequest], staging: Staging) -> RowReader:
        return _ListedReader(self)

    def read(self, split: str, row: int) -> bytes:
        return self.splits[split].read_item(row)


class _ListedReader(RowReader):
    def __init__(self, source: ListedSource):
        self._source = source

    def rows(self, request: PartRequest, keys: SeenKeys) -> Iterator[Row]:
        """Listed keys are distinct already (sorted, made so at open): `keys` is left alone."""
        items = self._source.items(request.split)
        for r in request.rows.tolist():
            yield Row(r, items[r].key, items[r].label, None)


def _listed_split(items: list[Item], read_item: Callable[[int], bytes]) -> ListedSplit:
    per_part = max(LIST_PART_ROWS, -(-len(items) // LIST_PARTS))
    parts = [Part(f"items {start}-{min(start + per_part, len(items)) - 1}", (1,) * min(per_part, len(items) - start))
             for start in range(0, len(items), per_part)]
    return ListedSplit(items, read_item, parts)


def open_synthetic(splits: tuple[str, ...], per_class: Mapping[str, int]) -> ListedSource:
    """The built-in synthetic set (prep/synthetic.py), `per_class` images per class of each split (default its own)."""
    from prep import synthetic

    found = {}
    for split in splits:
        items = [Item(key, label) for key, label in synthetic.items(split, per_class=per_class.get(split))]
        found[split] = _listed_split(items, lambda i, items=items: synthetic.image_bytes(*items[i]))
    return ListedSource(SYNTHETIC, SYNTHETIC, list(synthetic.CLASSES), found)


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


def _classes_from_folders(names: list[str]) -> tuple[list[ClassInfo], dict[str, int]]:
    """ImageNet wnids get the canonical table; any other folder names get sorted-order indices."""
    canonical = imagenet_classes()
    by_wnid = {c.wnid: c.index for c in canonical}
    if all(name in by_wnid for name in names):
        return canonical, by_wnid
    classes = [ClassInfo(i, name, name) for i, name in enumerate(sorted(names))]
    return classes, {c.wnid: c.index for c in classes}


def open_tree(root: Path, splits: tuple[str, ...]) -> ListedSource:
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

    found = {}
    for split, dirs in class_dirs.items():
        if split not in splits:
            continue
        paths = [p for d in dirs for p in visible(d) if p.is_file()]
        labels = [index[p.parent.name] for p in paths]
        keys = [safe_key(p.stem) for p in paths]
        fallback = [qualified_key(p) for p in paths]
        items, order = _sorted_items(keys, fallback, labels, str(split_dirs[split]))
        ordered = [paths[i] for i in order]
        found[split] = _listed_split(items, lambda i, ordered=ordered: ordered[i].read_bytes())
    require_splits({split: len(s.items) for split, s in found.items()}, splits, f"--source {root}")
    return ListedSource(f"folder:{root}", root.name, classes, found, input_dirs=tuple(split_dirs.values()))
