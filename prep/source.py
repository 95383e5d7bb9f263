"""Where `alexprep` reads images from: the Hub, a local parquet folder, an ILSVRC-2012 tree, or `synthetic`.

A source gives a stable identity string (recorded with the build options), its class table, and per
split a list of items sorted by key plus random access to each item's raw encoded bytes. Sorting by
key makes the item list, and so the shard plan built from it, independent of the order files or rows
were stored in. Sources are opened in the parent process and inherited by forked workers (Arrow
tables are memory-mapped, folder sources hold paths), so reading is fork-safe.

This is the only module that imports `datasets` and `huggingface_hub`, and only when a Hub or parquet
source is opened. The Hub token is handed to those libraries and never printed or stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Callable, Mapping, NamedTuple

from prep.contract import SPLITS, ClassInfo, imagenet_classes

HUB_ID = "ILSVRC/imagenet-1k"
SYNTHETIC = "synthetic"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Split name -> folder names an ILSVRC-2012 style tree may use for it, in order of preference.
_TREE_FOLDERS = {"train": ("train",), "validation": ("validation", "val")}


class SourceError(Exception):
    """A source that cannot be opened or read as asked; the message says what to do."""


class Item(NamedTuple):
    key: str  # stable sample id: letters, digits, "_" and "-" only (webdataset splits keys at dots)
    label: int  # class index into Source.classes


@dataclass(frozen=True)
class SplitReader:
    """One split of a source: `items` sorted by key, and `read(i)` -> raw bytes of `items[i]`."""

    items: list[Item]
    read: Callable[[int], bytes]


@dataclass(frozen=True)
class Source:
    """An opened source: what a build records about it, and its splits."""

    identity: str  # e.g. "ILSVRC/imagenet-1k", "synthetic", "parquet:/abs/folder", "folder:/abs/folder"
    name: str  # dataset name for _info.json
    classes: list[ClassInfo]
    splits: dict[str, SplitReader]

    def items(self, split: str) -> list[Item]:
        return self.splits[split].items

    def read(self, split: str, index: int) -> bytes:
        return self.splits[split].read(index)


def open_source(spec: str, splits: tuple[str, ...] = SPLITS, per_class: Mapping[str, int] | None = None) -> Source:
    """Open the source named by `spec` for `splits`; raise SourceError with one clear line if it cannot be.

    `spec`: "synthetic", a local folder (parquet files under data/, or an ILSVRC-2012 tree with
    train/ and val/ or validation/ class folders), or a Hub dataset id such as "ILSVRC/imagenet-1k".
    `per_class` (synthetic only): images per class for each split.
    """
    if per_class and spec != SYNTHETIC:
        raise SourceError(f"per-class counts apply only to the synthetic source, not to {spec!r}")
    if spec == SYNTHETIC:
        return _open_synthetic(splits, per_class or {})
    path = Path(spec).expanduser()
    if path.is_dir():
        if sorted((path / "data").glob("*.parquet")):
            return _open_parquet(path.resolve(), splits)
        return _open_tree(path.resolve(), splits)
    if path.exists():
        raise SourceError(f"--source {spec}: not a folder")
    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "~")):
        return _open_hub(spec, splits)
    raise SourceError(f"--source {spec}: no such folder, and not 'synthetic' or a Hub dataset id like {HUB_ID}")


def safe_key(text: str) -> str:
    """`text` with every character other than letters, digits, "_" and "-" replaced by "_"."""
    return _UNSAFE_KEY_CHARS.sub("_", text)


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


def _require(found: dict[str, SplitReader], splits: tuple[str, ...], where: str) -> None:
    for split in splits:
        if split not in found:
            present = ",".join(found) or "none"
            raise SourceError(f"{where} has no {split} split (it has: {present}); choose others with --splits")
        if not found[split].items:
            raise SourceError(f"{where}: the {split} split holds no images")


def _open_synthetic(splits: tuple[str, ...], per_class: Mapping[str, int]) -> Source:
    from prep import synthetic

    readers = {}
    for split in splits:
        items = [Item(key, label) for key, label in synthetic.items(split, per_class=per_class.get(split))]
        readers[split] = SplitReader(items, lambda i, items=items: synthetic.image_bytes(*items[i]))
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
        fallback = [safe_key(f"{p.parent.name}_{p.name}") for p in paths]
        items, order = _sorted_items(keys, fallback, labels, str(split_dirs[split]))
        ordered = [paths[i] for i in order]
        readers[split] = SplitReader(items, lambda i, ordered=ordered: ordered[i].read_bytes())
    _require(readers, splits, f"--source {root}")
    return Source(f"folder:{root}", root.name, classes, readers)


def _arrow_split(ds, split: str, num_classes: int, where: str) -> SplitReader:
    """A `datasets.Dataset` with columns image {bytes, path} and label -> SplitReader over raw bytes.

    Reads its memory-mapped Arrow table directly: the stored bytes, with no decoding by `datasets`.
    """
    column = ds.data.column("image")  # a pyarrow ChunkedArray of struct<bytes, path>
    # Only the path child of the struct column is read here, not the image bytes.
    paths = [p for chunk in column.chunks for p in chunk.field("path").to_pylist()]
    labels = ds.data.column("label").to_pylist()
    bad = next((i for i, label in enumerate(labels) if label is None or not 0 <= label < num_classes), None)
    if bad is not None:
        raise SourceError(f"{where}: row {bad} of the {split} split has label {labels[bad]!r}, not a class index")
    keys = [safe_key(PurePath(p).stem) if p else f"{split}_{i:08d}" for i, p in enumerate(paths)]
    items, rows = _sorted_items(keys, [f"{split}_{i:08d}" for i in range(len(paths))], labels, where)

    def read(i: int) -> bytes:
        image = column[rows[i]].as_py()
        if image["bytes"] is not None:
            return image["bytes"]
        # A row may point at a file instead of embedding it; a missing file reads as empty (skipped).
        path = Path(image["path"] or "")
        return path.read_bytes() if path.is_file() else b""

    return SplitReader(items, read)


def _is_imagenet(names: list[str], canonical: list[ClassInfo]) -> bool:
    """ClassLabel names that are ImageNet-1k's: its wnids, or its names in index order.

    ImageNet repeats one name ("crane", bird and machine) and ClassLabel refuses duplicates, so a
    copy that renamed one or two repeats still counts: at least 990 of the 1,000 names must agree.
    """
    if len(names) != len(canonical):
        return False
    return names == [c.wnid for c in canonical] or sum(a == c.name for a, c in zip(names, canonical)) >= 990


def _arrow_source(identity: str, name: str, dsets: Mapping, splits: tuple[str, ...], where: str) -> Source:
    """Source over `datasets` splits; ImageNet-1k's ClassLabel (see _is_imagenet) gets the canonical table."""
    import datasets

    names = None
    for split in splits:
        if split not in dsets:
            continue
        ds = dsets[split]
        if not (isinstance(ds.features.get("image"), datasets.Image)
                and isinstance(ds.features.get("label"), datasets.ClassLabel)):
            raise SourceError(f"{where}: the {split} split needs an Image 'image' column and a ClassLabel "
                              f"'label' column")
        if names is not None and ds.features["label"].names != names:
            raise SourceError(f"{where}: the splits have different class names")
        names = ds.features["label"].names
    canonical = imagenet_classes()
    if names is not None and _is_imagenet(names, canonical):
        classes = canonical
    else:
        classes = [ClassInfo(i, name, name) for i, name in enumerate(names or [])]
    readers = {split: _arrow_split(dsets[split], split, len(classes), where) for split in splits if split in dsets}
    _require(readers, splits, where)
    return Source(identity, name, classes, readers)


def _open_parquet(root: Path, splits: tuple[str, ...]) -> Source:
    """`data/{split}-*.parquet` as written by the Hub's parquet conversion, read with `datasets`."""
    import datasets

    files = {split: [str(p) for p in sorted((root / "data").glob(f"{split}-*.parquet"))] for split in splits}
    missing = [split for split, found in files.items() if not found]
    if missing:
        raise SourceError(f"--source {root}: no data/{missing[0]}-*.parquet files; choose others with --splits")
    dsets = datasets.load_dataset("parquet", data_files=files)
    return _arrow_source(f"parquet:{root}", root.name, dsets, splits, f"--source {root}")


def _open_hub(repo_id: str, splits: tuple[str, ...]) -> Source:
    """The gated Hub dataset through `datasets.load_dataset`, with the token from the usual places."""
    import datasets
    import huggingface_hub

    terms = (f"accept the terms at https://huggingface.co/datasets/{repo_id}, then run `hf auth login` or set "
             f"HF_TOKEN; or pass a local --source (a folder of its parquet files or an ILSVRC-2012 tree)")
    token = huggingface_hub.get_token()
    if token is None:
        raise SourceError(f"no Hugging Face token for the gated dataset {repo_id}: {terms}")
    try:
        if not huggingface_hub.constants.HF_HUB_OFFLINE:
            # A quick access check first: load_dataset itself retries for ~25 s before it gives up.
            huggingface_hub.auth_check(repo_id, repo_type="dataset", token=token)
        # Only the splits asked for (the Hub's layout is data/{split}-*.parquet): not the 13 GB test split.
        dsets = datasets.load_dataset(repo_id, data_files={s: f"data/{s}-*.parquet" for s in splits}, token=token)
    except Exception as e:  # network, auth and gating errors come from three libraries with no common base
        first_line = (str(e).strip().splitlines() or [""])[0].replace(token, "***")
        raise SourceError(f"cannot load {repo_id} from the Hugging Face Hub ({type(e).__name__}: {first_line}): "
                          f"check the network and your access; {terms}") from None
    return _arrow_source(repo_id, repo_id.split("/")[-1], dsets, splits, repo_id)
