"""The shard-folder contract between `alexprep` (writer) and `alextrain` (reader).

Everything both programs must agree on lives here: file names, sample fields, how tar members
group into samples, the layout of `_info.json` and `stats.json`, the class table, and the one way
files are written (temporary name, then rename). Light on purpose: only the standard library, so the trainer can import it without
pulling in `datasets` or Pillow.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tarfile
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
PIXEL_MAX = 255  # uint8 pixels; stats.json's 0..1 scale is k / PIXEL_MAX
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
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ContractError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: {what} is not a JSON object")
    return obj


def is_shard_filename(name) -> bool:
    """Whether `name` is a plain `.tar` file name that stays inside its folder: no folder part, no
    leading dot, only letters, digits, '_', '-' and '.' (so no `../`, no absolute path)."""
    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tar", name) is not None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_text(value) -> bool:
    return isinstance(value, str)


def _require(path: Path, where: str, obj: dict, key: str, ok, what: str) -> None:
    """ContractError unless `obj[key]` exists and `ok(obj[key])`; the line names the file, the place and the field."""
    if key not in obj:
        raise ContractError(f"{path}: {where}: `{key}` missing ({what})")
    if not ok(obj[key]):
        raise ContractError(f"{path}: {where}: `{key}` is not {what}: {obj[key]!r:.80}")


# What readers take from a shard record (verify: sha256, size, num_samples; the trainer: size) and
# from a skipped input (stats: reason): each field with its type.
_RECORD_FIELDS = (("num_samples", _is_count, "a sample count"), ("sha256", _is_sha256, "64 lowercase hex digits"),
                  ("size", _is_count, "a byte count"))
_SKIPPED_FIELDS = (("key", _is_text, "a string"), ("reason", _is_text, "a string"))


def _check_split(path: Path, split: str, entry, num_classes: int) -> None:
    """One split's entry of `_info.json`: shard names that stay in the folder, lengths that add up,
    and every field a reader uses, with its type."""
    if not isinstance(entry, dict):
        raise ContractError(f"{path}: split {split!r} is not an object")
    names, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(names, list) or not isinstance(lengths, list) or not all(_is_count(n) for n in lengths):
        raise ContractError(f"{path}: split {split!r} needs lists `filenames` and `shard_lengths` (sample counts)")
    records = entry.get("shards", [])
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ContractError(f"{path}: split {split!r}: `shards` is not a list of objects")
    for name in names + [r.get("filename") for r in records]:
        if not is_shard_filename(name):
            raise ContractError(f"{path}: split {split!r} names shard {name!r}; a shard is a plain .tar file name in this folder")
    if len(names) != len(lengths) or sum(lengths) != entry.get("num_samples"):
        raise ContractError(f"{path}: split {split!r} has inconsistent filenames/shard_lengths/num_samples")
    for record in records:
        for key, ok, what in _RECORD_FIELDS:
            _require(path, f"split {split!r}, shard record {record['filename']}", record, key, ok, what)
    where = f"split {split!r}"
    _require(path, where, entry, "num_inputs", _is_count, "a count of inputs")
    _require(path, where, entry, "skipped", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
             "a list of objects {key, reason}")
    for i, item in enumerate(entry["skipped"]):
        for key, ok, what in _SKIPPED_FIELDS:
            _require(path, f"{where}, skipped input {i}", item, key, ok, what)
    _require(path, where, entry, "class_counts", lambda v: isinstance(v, list) and len(v) == num_classes and all(_is_count(n) for n in v),
             f"a list of {num_classes} sample counts, one per class")


def _check_classes(path: Path, classes) -> None:
    if not isinstance(classes, list) or not classes:
        raise ContractError(f"{path}: no class table (`classes`: a list of {{index, wnid, name}})")
    for i, c in enumerate(classes):
        ok = isinstance(c, dict) and c.get("index") == i and not isinstance(c.get("index"), bool)
        if not (ok and isinstance(c.get("wnid"), str) and isinstance(c.get("name"), str)):
            raise ContractError(f"{path}: class entry {i} is not {{\"index\": {i}, \"wnid\": ..., \"name\": ...}}: {str(c)[:80]}")


def read_info(folder: str | os.PathLike) -> dict:
    """Load and check `_info.json`: schema version, the class table, splits (shard names that are plain
    file names in the folder, lengths that add up) and every field a reader takes from them, with its
    type (shard records, skipped inputs, class counts); raise ContractError with one clear line."""
    path = Path(folder) / INFO_NAME
    info = _read_json(path, INFO_NAME)
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ContractError(f"{path}: schema_version {version!r}, this program reads {SCHEMA_VERSION}")
    _check_classes(path, info.get("classes"))
    splits = info.get("splits")
    if not isinstance(splits, dict):
        raise ContractError(f"{path}: `splits` {'missing' if splits is None else 'is not an object'}")
    for split, entry in splits.items():
        _check_split(path, split, entry, len(info["classes"]))
    if not isinstance(info.get("options", {}), dict):
        raise ContractError(f"{path}: `options` is not an object: {info['options']!r:.80}")
    return info


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# stats.json's numbers come from 256 x 256 pixels on a 0..1 scale (k / 255, k = 0..255), so each has a
# range it cannot leave; exactly, with n = num_pixels:
#   mean in [0, 1];
#   std in [sqrt(n - 1) / (255 n), 1/2]: a variance of values in [0, 1] is at most 1/4 (Popoviciu);
#     (255 n)^2 var = n sum(k^2) - (sum k)^2 = the sum over pairs of pixels of (k_i - k_j)^2, and where
#     not every k is the same at least n - 1 pairs differ;
#   cov[i][i] = std[i]^2 and |cov[i][j]| <= std[i] std[j] (Cauchy-Schwarz);
#   eigval descending, in [0, 3/4] (the covariance is positive semi-definite and its largest
#     eigenvalue at most its trace); eigvec's columns orthonormal;
#   num_pixels = num_images x 256 x 256, below 2**53 (where float64 still counts exactly).
# So float32 training stays finite: 1 / std <= 255 sqrt(n) < 2.5e10, and the mean is at most 1.
# stats.py's float64 arithmetic and LAPACK's eigh round at about 1e-15 relative to these numbers
# (to the largest eigenvalue, for the eigenvalues and eigenvectors); _ROUNDING leaves a wide margin.
_ROUNDING = 1e-9
_MAX_NUM_PIXELS = 2**53


def _stats_ranges(source: str, stats: dict) -> None:
    """The exact ranges above, for shape-checked finite stats; ContractError naming the field."""
    mean, std, cov, eigval, eigvec = (stats[k] for k in ("mean", "std", "cov", "eigval", "eigvec"))
    images, pixels = stats["num_images"], stats["num_pixels"]
    if not (images >= 1 and pixels == images * IMAGE_SIZE * IMAGE_SIZE and pixels < _MAX_NUM_PIXELS):
        raise ContractError(f"{source}: fields 'num_images' {images} and 'num_pixels' {pixels}: num_pixels must be "
                            f"num_images x {IMAGE_SIZE} x {IMAGE_SIZE}, from at least one image, below 2**53")
    if not all(0 <= m <= 1 for m in mean):
        raise ContractError(f"{source}: field 'mean' {mean} out of range: a mean of pixels on the 0..1 scale lies in [0, 1]")
    if not all(s > 0 for s in std):
        raise ContractError(f"{source}: std {std} has a channel without spread (std must be above 0)")
    low = math.sqrt(pixels - 1) / (PIXEL_MAX * pixels) * (1 - _ROUNDING)
    if not all(low <= s <= 0.5 * (1 + _ROUNDING) for s in std):
        raise ContractError(f"{source}: field 'std' {std} out of range: a std of {pixels} pixels on the 0..1 scale "
                            f"lies in [sqrt(num_pixels - 1) / (255 x num_pixels), 0.5] = [{low:.3g}, 0.5]")
    for i in range(3):
        if abs(cov[i][i] - std[i] ** 2) > std[i] ** 2 * _ROUNDING or any(
                abs(cov[i][j]) > std[i] * std[j] * (1 + _ROUNDING) for j in range(3)):
            raise ContractError(f"{source}: field 'cov' {cov} does not agree with 'std' {std}: cov[i][i] is std[i]^2 "
                                f"and |cov[i][j]| at most std[i] std[j]")
    slack = eigval[0] * _ROUNDING
    if not (0.75 * (1 + _ROUNDING) >= eigval[0] >= eigval[1] >= eigval[2] >= -slack):
        raise ContractError(f"{source}: field 'eigval' {eigval} out of range: the covariance's eigenvalues lie in "
                            f"[0, 0.75], in descending order")
    for i in range(3):
        for j in range(3):
            dot = sum(eigvec[k][i] * eigvec[k][j] for k in range(3))  # column i . column j
            if abs(dot - (i == j)) > _ROUNDING:
                raise ContractError(f"{source}: field 'eigvec' {eigvec} does not have orthonormal columns")


def check_stats(stats, source: str) -> dict:
    """Check the content of a `stats.json` (mean, std, cov, eigval, eigvec on a 0..1 scale, image and
    pixel counts): every field present with its shape, a finite number, within the range pixels allow
    (comment above). `source` names it in the error: the file, or a checkpoint's copy. Returns `stats`;
    raises ContractError with one clear line naming the field."""
    if not isinstance(stats, dict):
        raise ContractError(f"{source}: {STATS_NAME} is not a JSON object")
    for key, shape in (("mean", (3,)), ("std", (3,)), ("eigval", (3,)), ("eigvec", (3, 3)), ("cov", (3, 3))):
        value = stats.get(key)
        ok = isinstance(value, list) and len(value) == shape[0]
        if ok and len(shape) == 2:
            ok = all(isinstance(row, list) and len(row) == shape[1] for row in value)
        if not ok:
            raise ContractError(f"{source}: field {key!r} missing or not of shape {shape}")
        numbers = value if len(shape) == 1 else [v for row in value for v in row]
        if not all(_is_number(v) for v in numbers):
            raise ContractError(f"{source}: field {key!r} holds a value that is not a finite number: {value}")
    for key in ("num_images", "num_pixels"):
        if not _is_count(stats.get(key)):
            raise ContractError(f"{source}: field {key!r} missing or not a count: {stats.get(key)!r:.80}")
    _stats_ranges(source, stats)
    return stats


def read_stats(folder: str | os.PathLike) -> dict:
    """Load `stats.json` and `check_stats` it; ContractError with one clear line."""
    path = Path(folder) / STATS_NAME
    return check_stats(_read_json(path, STATS_NAME), str(path))


def sample_key(member_name: str) -> tuple[str, str]:
    """A tar member's (sample key, field): `sub/n01440764_10026.jpg` -> (`sub/n01440764_10026`, `jpg`).
    The key ends at the first dot of the base name, as in webdataset (so keys hold no dots)."""
    folder, _, base = member_name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def iter_samples(fileobj) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {field: bytes})` for each sample of an uncompressed tar read as a stream: the one rule
    for grouping members into samples, for `alexprep verify` and the trainer alike. A sample is a
    run of consecutive regular-file members with the same `sample_key`. Raises tarfile.TarError (or
    OSError) where the tar is unreadable; a damaged header mid-archive ends the stream early, which
    shows as fewer samples than `shard_lengths` says."""
    key, fields = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, field = sample_key(member.name)
            if member_key != key and key is not None:
                yield key, fields
                fields = {}
            key = member_key
            fields[field] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


def label_of(cls: bytes, num_classes: int) -> int | None:
    """A sample's class index from its `cls` field (ASCII digits), or None where it is not an index
    of the class table (not digits, or not below num_classes)."""
    return int(cls) if cls.isascii() and cls.isdigit() and int(cls) < num_classes else None


def classes_from_info(info: dict) -> list[ClassInfo]:
    """The class table recorded in `_info.json`, in index order."""
    return [ClassInfo(c["index"], c["wnid"], c["name"]) for c in info["classes"]]
