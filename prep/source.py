"""What a source is to the build: splits of numbered rows in parts, and the rows it hands over, part by part.

Every split is a sequence of rows numbered 0..N-1, cut into parts that are read in order: one parquet
file (prep/parquet_source.py), or a block of listed items (prep/listed_source.py: an ILSVRC-2012 tree,
`synthetic`). A part's rows fall into units, the smallest pieces a trial (`--limit`) takes whole: a
parquet row group, one listed item. The build plans from the units' sizes alone, then asks the source
for the rows it keeps, part by part (`Source.reader`), and never asks which kind of source it has.
A source also gives a stable identity string, its class table and a digest of what it holds (recorded
with the build, so that a rerun refuses changed inputs). Which source `--source` names:
prep/open_source.py.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from prep.contract import ClassInfo
from prep.errors import SourceError

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class Part:
    """Consecutive rows of a split, read together: one parquet file, or a block of listed items."""

    name: str  # "data/train-00003-of-00024.parquet", or "items 256-511"
    units: tuple[int, ...]  # rows per unit (a parquet row group; one listed item), in row order
    size: int = 0  # bytes of the parquet file (0 for listed items)

    @property
    def num_rows(self) -> int:
        return sum(self.units)


class Row(NamedTuple):
    """One input as a source hands it to the build."""

    number: int  # its row in the split
    key: str  # the sample's key: letters, digits, "_" and "-" only (webdataset splits keys at dots)
    label: int  # class index into Source.classes (-1 with a skip)
    data: bytes | None  # the image's bytes; None: read where the row is processed (Source.read)
    skip: str | None = None  # the row cannot become a sample, and why


@dataclass(frozen=True)
class PartRequest:
    """What a build asks of its source: the rows it keeps of one part."""

    split: str
    part: int  # index into Source.parts(split)
    rows: np.ndarray  # (n,) int64 row numbers in the split, ascending, all in this part
    whole_split: bool  # every row of the split is kept (a full build, not a --limit trial)


@dataclass(frozen=True)
class Staging:
    """Where and how many whole source files may wait on disk to be read (a remote source downloads ahead)."""

    folder: Path  # empty, the build's own
    prefetch: int  # files on disk at once: the one being read and the next ones downloading
    keep: Path | None = None  # each file moves here once read, instead of being deleted


class SeenKeys(Protocol):
    """The keys a split's rows got so far (a set will do); a source whose keys may repeat adds each new one."""

    def __contains__(self, key: str) -> bool: ...

    def add(self, key: str) -> None: ...


class RowReader(ABC):
    """A source's rows for a list of requests, handed over in the list's order (a context manager)."""

    bytes_read: int = 0  # source bytes read so far (for the progress bar)

    @abstractmethod
    def rows(self, request: PartRequest, keys: SeenKeys) -> Iterator[Row]:
        """The requested rows, ascending; requests must be asked in the order the reader was made with."""

    def close(self) -> None:
        """Let go of what reading holds (downloads in flight, staged files)."""

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Source(ABC):
    """An opened source: what a build records about it, its splits' parts, and its rows."""

    def __init__(self, identity: str, name: str, classes: list[ClassInfo], input_dirs: tuple[Path, ...] = ()):
        self.identity = identity  # e.g. "ILSVRC/imagenet-1k", "synthetic", "parquet:/abs/folder", "folder:/abs/folder"
        self.name = name  # dataset name for _info.json
        self.classes = classes
        self.input_dirs = input_dirs  # local folders whose listings decide the inputs (a build must not write there)

    @abstractmethod
    def parts(self, split: str) -> list[Part]:
        """The split's parts, in row order."""

    @abstractmethod
    def digest(self) -> dict[str, str]:
        """Per split, a sha256 of what decides its rows (item keys and labels, or files and row groups)."""

    @abstractmethod
    def reader(self, requests: Sequence[PartRequest], staging: Staging) -> RowReader:
        """A reader of `requests`, in that order; `staging` is where whole files may wait to be read."""

    def read(self, split: str, row: int) -> bytes:
        """The bytes of a row handed over without them (`Row.data` None), in the process that handles it."""
        raise NotImplementedError(f"{type(self).__name__} hands over every row with its bytes")

    def num_rows(self, split: str) -> int:
        return sum(p.num_rows for p in self.parts(split))


def safe_key(text: str) -> str:
    """`text` with every character other than letters, digits, "_" and "-" replaced by "_"."""
    return _UNSAFE_KEY_CHARS.sub("_", text)


def qualified_key(path: PurePath) -> str:
    """The key of an input whose stem another input shares: its folder's name and its file name."""
    return safe_key(f"{path.parent.name}_{path.name}" if path.parent.name else path.name)


def require_splits(found: dict[str, int], splits: tuple[str, ...], where: str) -> None:
    """SourceError unless every split asked for is among `found` (split -> rows) and holds rows."""
    for split in splits:
        if split not in found:
            present = ",".join(found) or "none"
            raise SourceError(f"{where} has no {split} split (it has: {present}); choose others with --splits")
        if not found[split]:
            raise SourceError(f"{where}: the {split} split holds no images")
