"""The shard-folder contract between `alexprep` (writer) and `alextrain` (reader).

Everything both programs must agree on lives here: file names, sample fields, how tar members group
into samples, the class table, and the one way files are written (temporary name, then rename).
`_info.json` and `stats.json` are parsed once, when read, into frozen objects (FolderInfo with its
SplitInfo, ShardRecord and SkippedInput; PixelStats), each checked field by field with one clear
line for what is wrong; their `to_json()` gives back the file's content, so the field names are
spelled here alone. Light on purpose: only the standard library, so the trainer can import it
without pulling in `datasets` or Pillow.
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
JPG, CLS, META = "jpg", "cls", "json"  # a sample's fields besides __key__: the image, its class index, its metadata
FIELDS = (JPG, CLS, META)  # in the order a sample's tar members are written
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012's train split (ImageNet-1k on the Hub: the same images)
_UMASK = os.umask(0)
os.umask(_UMASK)  # reading the umask means setting it; put it straight back


class ContractError(Exception):
    """A shard folder that does not hold what the contract promises; the message says what."""


@dataclass(frozen=True)
class ClassInfo:
    """One row of the class table: index = position of the wnid in sorted order (Hugging Face's label)."""

    index: int
    wnid: str
    name: str  # ImageNet's names list synonyms: "tench, Tinca tinca"

    def to_json(self) -> dict:
        return {"index": self.index, "wnid": self.wnid, "name": self.name}


def short_name(name: str) -> str:
    """A class name's first synonym ('tench, Tinca tinca' -> 'tench'): enough on a picture or a file name."""
    return name.split(",", 1)[0].strip()


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


def _json_object(data: bytes, source: str, what: str) -> dict:
    """The JSON object in `data` (the bytes of the file `what`, read from `source`)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise ContractError(f"{source}: unreadable {what} ({e})") from None
    if not isinstance(obj, dict):
        raise ContractError(f"{source}: {what} is not a JSON object")
    return obj


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ContractError(f"{path}: no {what} here; build the folder with `alexprep build-shards --out {path.parent}`")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ContractError(f"{path}: unreadable {what} ({e})") from None


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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(source: str, where: str, obj: dict, key: str, ok, what: str):
    """`obj[key]`; ContractError unless it exists and `ok(obj[key])`; the line names the file, the place and the field."""
    if key not in obj:
        raise ContractError(f"{source}: {where}: `{key}` missing ({what})")
    if not ok(obj[key]):
        raise ContractError(f"{source}: {where}: `{key}` is not {what}: {obj[key]!r:.80}")
    return obj[key]


# ---------------------------------------------------------------------------------------------------
# _info.json


@dataclass(frozen=True)
class ShardRecord:
    """A shard as `_info.json` records it: what `alexprep verify` checks the file against (the trainer
    checks `size` before it starts)."""

    filename: str
    num_samples: int
    sha256: str  # 64 lowercase hex digits
    size: int  # bytes

    def to_json(self) -> dict:
        return {"filename": self.filename, "num_samples": self.num_samples, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_json(cls, record: dict, source: str, where: str) -> ShardRecord:
        where = f"{where}, shard record {record['filename']}"
        return cls(record["filename"], *(_require(source, where, record, key, ok, what) for key, ok, what in (
            ("num_samples", _is_count, "a sample count"), ("sha256", _is_sha256, "64 lowercase hex digits"),
            ("size", _is_count, "a byte count"))))


@dataclass(frozen=True)
class SkippedInput:
    """An input the build could not turn into a sample, with its one-line reason ("truncated image", ...)."""

    key: str
    reason: str

    def to_json(self) -> dict:
        return {"key": self.key, "reason": self.reason}

    @classmethod
    def from_json(cls, item: dict, source: str, where: str) -> SkippedInput:
        return cls(*(_require(source, where, item, key, _is_text, "a string") for key in ("key", "reason")))


@dataclass(frozen=True)
class SplitInfo:
    """One split's entry of `_info.json`: timm's layout (name, filenames, shard_lengths, num_samples)
    and what this project adds (inputs read, shard records, skipped inputs, samples per class).
    `filenames` and `shards` are kept as written, so `alexprep verify` can say where they disagree."""

    name: str
    filenames: tuple[str, ...]
    shard_lengths: tuple[int, ...]  # samples per shard, in `filenames` order
    num_samples: int  # = sum(shard_lengths)
    num_inputs: int  # = num_samples + len(skipped) in a consistent folder (verify checks it)
    shards: tuple[ShardRecord, ...]
    skipped: tuple[SkippedInput, ...]
    class_counts: tuple[int, ...]  # samples per class index

    def to_json(self) -> dict:
        return {"name": self.name, "filenames": list(self.filenames), "shard_lengths": list(self.shard_lengths),
                "num_samples": self.num_samples, "num_inputs": self.num_inputs,
                "shards": [r.to_json() for r in self.shards], "skipped": [s.to_json() for s in self.skipped],
                "class_counts": list(self.class_counts)}

    @classmethod
    def from_json(cls, entry, source: str, split: str, num_classes: int) -> SplitInfo:
        """Check one split's entry: shard names that stay in the folder, lengths that add up, and every
        field a reader uses, with its type."""
        if not isinstance(entry, dict):
            raise ContractError(f"{source}: split {split!r} is not an object")
        names, lengths = entry.get("filenames"), entry.get("shard_lengths")
        if not isinstance(names, list) or not isinstance(lengths, list) or not all(_is_count(n) for n in lengths):
            raise ContractError(f"{source}: split {split!r} needs lists `filenames` and `shard_lengths` (sample counts)")
        records = entry.get("shards", [])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ContractError(f"{source}: split {split!r}: `shards` is not a list of objects")
        for name in names + [r.get("filename") for r in records]:
            if not is_shard_filename(name):
                raise ContractError(f"{source}: split {split!r} names shard {name!r}; a shard is a plain .tar file name in this folder")
        if len(names) != len(lengths) or sum(lengths) != entry.get("num_samples"):
            raise ContractError(f"{source}: split {split!r} has inconsistent filenames/shard_lengths/num_samples")
        where = f"split {split!r}"
        shards = tuple(ShardRecord.from_json(r, source, where) for r in records)
        num_inputs = _require(source, where, entry, "num_inputs", _is_count, "a count of inputs")
        skipped = _require(source, where, entry, "skipped", lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
                           "a list of objects {key, reason}")
        skipped = tuple(SkippedInput.from_json(item, source, f"{where}, skipped input {i}") for i, item in enumerate(skipped))
        counts = _require(source, where, entry, "class_counts",
                          lambda v: isinstance(v, list) and len(v) == num_classes and all(_is_count(n) for n in v),
                          f"a list of {num_classes} sample counts, one per class")
        return cls(entry.get("name", split), tuple(names), tuple(lengths), entry["num_samples"], num_inputs, shards, skipped,
                   tuple(counts))


def class_table(classes, source: str) -> tuple[ClassInfo, ...]:
    """A class table as written in `_info.json` (and copied into checkpoints and exported models): a
    non-empty list of {index, wnid, name}, index 0, 1, ... in order; ContractError naming `source`."""
    if not isinstance(classes, list) or not classes:
        raise ContractError(f"{source}: no class table (`classes`: a list of {{index, wnid, name}})")
    for i, c in enumerate(classes):
        ok = isinstance(c, dict) and c.get("index") == i and not isinstance(c.get("index"), bool)
        if not (ok and isinstance(c.get("wnid"), str) and isinstance(c.get("name"), str)):
            raise ContractError(f"{source}: class entry {i} is not {{\"index\": {i}, \"wnid\": ..., \"name\": ...}}: {str(c)[:80]}")
    return tuple(ClassInfo(c["index"], c["wnid"], c["name"]) for c in classes)


@dataclass(frozen=True)
class FolderInfo:
    """`_info.json`: the folder's name, its splits (in the file's order), its class table, the options
    it was built with (`prep.build.BuildConfig.to_json`, as recorded), the Pillow that encoded it and,
    per split, a digest of its inputs (`prep.source.Source.digest`: a rerun of the same build finds
    the folder complete)."""

    name: str | None
    splits: dict[str, SplitInfo]
    classes: tuple[ClassInfo, ...]
    options: dict
    pillow: str | None
    inputs: dict[str, str] | None = None  # split -> sha256; None in folders built before it was recorded
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        """The file's content: `write_json(folder / INFO_NAME, info.to_json())` writes it."""
        return {"name": self.name, "schema_version": self.schema_version,
                "splits": {name: split.to_json() for name, split in self.splits.items()},
                "classes": [c.to_json() for c in self.classes], "options": self.options, "pillow": self.pillow,
                **({"inputs": dict(self.inputs)} if self.inputs is not None else {})}

    @classmethod
    def from_json(cls, info: dict, source: str) -> FolderInfo:
        """Check `_info.json`'s content: schema version, the class table, the splits (`SplitInfo.from_json`),
        the options and the inputs' digests; ContractError with one line naming `source`, the place and the field."""
        version = info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ContractError(f"{source}: schema_version {version!r}, this program reads {SCHEMA_VERSION}")
        classes = class_table(info.get("classes"), source)
        splits = info.get("splits")
        if not isinstance(splits, dict):
            raise ContractError(f"{source}: `splits` {'missing' if splits is None else 'is not an object'}")
        splits = {name: SplitInfo.from_json(entry, source, name, len(classes)) for name, entry in splits.items()}
        options = info.get("options", {})
        if not isinstance(options, dict):
            raise ContractError(f"{source}: `options` is not an object: {options!r:.80}")
        inputs = info.get("inputs")
        if "inputs" in info and not (isinstance(inputs, dict) and all(
                isinstance(split, str) and _is_sha256(digest) for split, digest in inputs.items())):
            raise ContractError(f"{source}: `inputs` is not an object of split -> sha256 (64 lowercase hex digits): "
                                f"{inputs!r:.80}")
        return cls(info.get("name"), splits, classes, options, info.get("pillow"), inputs, version)


def parse_info(data: bytes, source: str) -> FolderInfo:
    """`_info.json`'s bytes (read from `source`, a path or URL), parsed and checked (`FolderInfo.from_json`)."""
    return FolderInfo.from_json(_json_object(data, source, INFO_NAME), source)


def read_info(folder: str | os.PathLike) -> FolderInfo:
    """Load and check `_info.json`; ContractError with one clear line."""
    path = Path(folder) / INFO_NAME
    return parse_info(_read_bytes(path, INFO_NAME), str(path))


# ---------------------------------------------------------------------------------------------------
# stats.json

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
_SHAPES = (("mean", (3,)), ("std", (3,)), ("eigval", (3,)), ("eigvec", (3, 3)), ("cov", (3, 3)))
_DESCRIPTION = ("schema_version", "split", "pixels", "scale", "sample_every")  # recorded by the build, read by people


@dataclass(frozen=True)
class PixelStats:
    """`stats.json`: the training split's pixel statistics on a 0..1 scale, in RGB order, with the
    counts they come from and (as the build records them) how they were taken. Numbers are kept as
    written (a JSON 1 stays an int), so `to_json()` gives the file's content back."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cov: tuple[tuple[float, float, float], ...]  # (3, 3)
    eigval: tuple[float, float, float]  # eigenvalues of cov, descending
    eigvec: tuple[tuple[float, float, float], ...]  # (3, 3) rows; column j is the unit eigenvector of eigval[j]
    num_images: int
    num_pixels: int  # num_images x 256 x 256
    schema_version: int | None = None
    split: str | None = None  # "train"
    pixels: str | None = None  # which pixels: "after JPEG encoding (the shards' images decoded)"
    scale: str | None = None  # "0..1"
    sample_every: int | None = None  # every k-th train image in written order (prep/stats.py)

    def to_json(self) -> dict:
        """The file's content (the descriptive fields only where recorded)."""
        numbers = {"mean": list(self.mean), "std": list(self.std), "cov": [list(r) for r in self.cov],
                   "eigval": list(self.eigval), "eigvec": [list(r) for r in self.eigvec],
                   "num_images": self.num_images, "num_pixels": self.num_pixels}
        return {**numbers, **{k: getattr(self, k) for k in _DESCRIPTION if getattr(self, k) is not None}}

    @classmethod
    def from_json(cls, stats, source: str) -> PixelStats:
        """Check the content of a `stats.json` (or a record that holds its fields, such as a checkpoint's
        or an exported model's copy; other keys are left alone): every number present with its shape,
        finite, within the range pixels allow (comment above). `source` names it in the error:
        ContractError with one clear line naming the field."""
        if not isinstance(stats, dict):
            raise ContractError(f"{source}: {STATS_NAME} is not a JSON object")
        for key, shape in _SHAPES:
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
        parsed = cls(tuple(stats["mean"]), tuple(stats["std"]), tuple(map(tuple, stats["cov"])), tuple(stats["eigval"]),
                     tuple(map(tuple, stats["eigvec"])), stats["num_images"], stats["num_pixels"],
                     **{k: stats[k] for k in _DESCRIPTION if k in stats})
        parsed._check_ranges(source)
        return parsed

    def _check_ranges(self, source: str) -> None:
        """The exact ranges above; ContractError naming the field."""
        mean, std, cov, eigval, eigvec = (list(self.mean), list(self.std), [list(r) for r in self.cov], list(self.eigval),
                                          [list(r) for r in self.eigvec])  # shown as written in stats.json
        images, pixels = self.num_images, self.num_pixels
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


def parse_stats(data: bytes, source: str) -> PixelStats:
    """`stats.json`'s bytes (read from `source`, a path or URL), parsed and checked (`PixelStats.from_json`)."""
    return PixelStats.from_json(_json_object(data, source, STATS_NAME), source)


def read_stats(folder: str | os.PathLike) -> PixelStats:
    """Load and check `stats.json`; ContractError with one clear line."""
    path = Path(folder) / STATS_NAME
    return parse_stats(_read_bytes(path, STATS_NAME), str(path))


# ---------------------------------------------------------------------------------------------------
# Samples


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
