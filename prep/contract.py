"""The shard-folder contract between `alexprep` (writer) and `alextrain` (reader).

Everything both programs must agree on lives here: file names, sample fields, the layout of
`_info.json` and `stats.json`, the class table, and the one way files are written (temporary name,
then rename). Light on purpose: only the standard library, so the trainer can import it without
pulling in `datasets` or Pillow.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

SCHEMA_VERSION = 1
INFO_NAME = "_info.json"
STATS_NAME = "stats.json"
SPLITS = ("train", "validation")
IMAGE_SIZE = 256  # every sample's `jpg` is IMAGE_SIZE x IMAGE_SIZE RGB
FIELDS = ("jpg", "cls", "json")  # the fields of every sample, besides __key__
_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


class ContractError(Exception):
    """A shard folder that does not hold what the contract promises; the message says what."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str

    def to_json(self) -> dict:
        return {"index": self.index, "wnid": self.wnid, "name": self.name}


def shard_name(split: str, index: int) -> str:
    """`train-000012.tar`: the file name of shard `index` of `split`."""
    return f"{split}-{index:06d}.tar"


def imagenet_classes() -> list[ClassInfo]:
    """The 1,000 ImageNet-1k classes in Hugging Face's label order (= sorted wnids)."""
    text = resources.files("prep").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return [ClassInfo(int(i), wnid, name) for i, wnid, name in rows]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`.

    A kill at any moment leaves either the old file or the complete new one under `path`,
    never a partial one. Temporary files start with `.tmp-` so they are easy to spot and clean.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            # mkstemp makes the file 0600; give it the mode a plain open() would have
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented, key-sorted JSON through `atomic_write` (same object, same bytes)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ContractError(f"{path}: no {what} here; build the folder with `alexprep build-shards --out {path.parent}`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ContractError(f"{path}: unreadable {what} ({e})") from e


def read_info(folder: str | os.PathLike) -> dict:
    """Load and check `_info.json`; raise ContractError with one clear line if it is wrong."""
    path = Path(folder) / INFO_NAME
    info = _read_json(path, INFO_NAME)
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ContractError(f"{path}: schema_version {version!r}, this program reads {SCHEMA_VERSION}")
    for split, entry in info.get("splits", {}).items():
        names, lengths = entry.get("filenames", []), entry.get("shard_lengths", [])
        if len(names) != len(lengths) or sum(lengths) != entry.get("num_samples"):
            raise ContractError(f"{path}: split {split!r} has inconsistent filenames/shard_lengths/num_samples")
    return info


def read_stats(folder: str | os.PathLike) -> dict:
    """Load and check `stats.json` (mean, std, eigval, eigvec on a 0..1 scale)."""
    path = Path(folder) / STATS_NAME
    stats = _read_json(path, STATS_NAME)
    for key, shape in (("mean", (3,)), ("std", (3,)), ("eigval", (3,)), ("eigvec", (3, 3)), ("cov", (3, 3))):
        value = stats.get(key)
        ok = isinstance(value, list) and len(value) == shape[0]
        if ok and len(shape) == 2:
            ok = all(isinstance(row, list) and len(row) == shape[1] for row in value)
        if not ok:
            raise ContractError(f"{path}: field {key!r} missing or not of shape {shape}")
    return stats


def classes_from_info(info: dict) -> list[ClassInfo]:
    """The class table recorded in `_info.json`, in index order."""
    return [ClassInfo(c["index"], c["wnid"], c["name"]) for c in info["classes"]]
