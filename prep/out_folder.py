"""The output folder: this build's or refused, locked while it is built, and left holding the contract alone.

A folder is taken (`claim`) if it is new or empty, or if `.build/options.json` records this very build
(one this command started and a kill stopped); it is complete if its `_info.json` records this very
build (a BuildRecord: options, Pillow build and a digest of the inputs): then nothing is written (a
`.build/` left beside it goes). Anything else is refused in one line and left untouched. While a build
runs it holds an exclusive lock on `.build/lock`, so a second build of the same folder is refused. Everything under `.build/` is the build's own
bookkeeping; once `_info.json` is written, `.build/` goes (`Claim.done`), and the folder holds the shards,
`_info.json` and `stats.json` only. A build deletes nothing else but its own temporaries (`.tmp-NAME.*`
of the files it writes, prep.contract.atomic_write) and leaves every other file alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prep.contract import INFO_NAME, ContractError, FolderInfo, read_info, write_json
from prep.errors import BuildError

BUILD_DIR = ".build"  # a running build's bookkeeping; everything in it is the build's own
OPTIONS_NAME = "options.json"  # .build/options.json: the record of the build this folder is for
LOCK_NAME = "lock"
_KEEP = (".gitkeep",)  # files a fresh --out may already hold (the repo's shards/ has one)
_TEMPORARY = re.compile(r"\.tmp-(.+)\.[a-z0-9_]{8}")  # prep.contract.atomic_write's temporary of a file (mkstemp)


@dataclass(frozen=True)
class BuildRecord:
    """What decides a build's bytes: in `.build/options.json` while the folder is built, in `_info.json`
    (FolderInfo's fields of the same names) once it is complete."""

    options: dict  # prep.build.BuildConfig.to_json()
    pillow: str | None  # prep.image.pillow_flavour()
    inputs: dict[str, str] | None  # prep.source.Source.digest(); None where an earlier version did not record it

    def to_json(self) -> dict:
        return {"options": self.options, "pillow": self.pillow, "inputs": self.inputs}

    @classmethod
    def of(cls, info: FolderInfo) -> BuildRecord:
        return cls(info.options, info.pillow, info.inputs)

    @classmethod
    def read(cls, path: Path) -> BuildRecord:
        """The record in `.build/options.json`; BuildError if it is unreadable."""
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            record = cls(obj.get("options", {}), obj.get("pillow"), obj.get("inputs"))
            _differences(record, record)  # its shape: options and inputs are objects
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise BuildError(f"{path}: unreadable build record ({type(e).__name__}); this folder cannot be "
                             f"resumed: use another --out") from None
        return record


class Claim:
    """A folder this process builds, its lock held until `release`."""

    def __init__(self, out: Path, lock: int):
        self.out, self._lock = out, lock
        self.work = out / BUILD_DIR

    def remove_temporaries(self, names: Iterable[str]) -> None:
        """Delete what a killed run left of the files `names` (in the folder) on their way to their names."""
        names = set(names)
        for p in self.out.iterdir():
            m = _TEMPORARY.fullmatch(p.name)
            if m is not None and m[1] in names and p.is_file():
                p.unlink()

    def done(self) -> None:
        """The build is complete (`_info.json` written): its bookkeeping goes."""
        shutil.rmtree(self.work)

    def release(self) -> None:
        os.close(self._lock)


def claim(out: Path, record: BuildRecord) -> Claim | None:
    """Take `out` for the build `record` says (None: it is complete already); BuildError in one line if
    it is not this build's folder or another build holds it."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: not a folder")
    work = out / BUILD_DIR
    if (out / INFO_NAME).is_file():
        _check_complete(out, record)
        if work.is_dir():  # left by a kill after _info.json was written, or by an earlier version
            lock = _lock(out)
            shutil.rmtree(work)
            os.close(lock)
        return None
    options = work / OPTIONS_NAME
    if out.is_dir() and not options.is_file():
        # Not (yet) ours: only an empty folder, or one a killed build left with nothing but its lock
        # (and perhaps the temporary of options.json).
        foreign = [p.name for p in out.iterdir() if p.name not in (BUILD_DIR, *_KEEP)]
        if work.is_dir():
            foreign += [f"{BUILD_DIR}/{p.name}" for p in work.iterdir()
                        if p.name != LOCK_NAME and not p.name.startswith(f".tmp-{OPTIONS_NAME}.")]
        if foreign:
            raise BuildError(f"--out {out} holds files that no alexprep build made here (e.g. {sorted(foreign)[0]}); "
                             f"use an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        if options.is_file():
            previous = BuildRecord.read(options)
            if previous != record:
                raise BuildError(f"--out {out} already holds shards built differently "
                                 f"({_differences(previous, record)}); use another --out or empty it")
        else:
            write_json(options, record.to_json())
    except BaseException:
        os.close(lock)
        raise
    return Claim(out, lock)


def _lock(out: Path) -> int:
    """The exclusive lock on `.build/lock`, as a file descriptor; BuildError if another build holds it."""
    path = out / BUILD_DIR / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BuildError(f"--out {out}: another build is writing this folder (it holds {BUILD_DIR}/{LOCK_NAME}); "
                         f"wait for it to end, or use another --out") from None
    try:
        same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:  # the build that held it finished and removed .build/ meanwhile
        same = False
    if not same:
        os.close(fd)
        raise BuildError(f"--out {out}: another build finished this folder meanwhile; run the same command again")
    return fd


def _check_complete(out: Path, record: BuildRecord) -> None:
    """`out`'s `_info.json` must record this build (an earlier version recorded it in `.build/options.json`)."""
    try:
        recorded = BuildRecord.of(read_info(out))
    except ContractError as e:
        raise BuildError(f"{e}; this folder cannot be resumed: use another --out") from None
    if recorded.inputs is None and (out / BUILD_DIR / OPTIONS_NAME).is_file():
        recorded = BuildRecord.read(out / BUILD_DIR / OPTIONS_NAME)
    if recorded != record:
        raise BuildError(f"--out {out} already holds shards built differently ({_differences(recorded, record)}); "
                         f"use another --out or empty it")


def _differences(old: BuildRecord, new: BuildRecord) -> str:
    """What differs between two build records, e.g. "seed: 0 -> 1; train inputs: changed"."""
    def flat(record: BuildRecord) -> dict:
        return {**record.options, "pillow": record.pillow,
                **{f"{split} inputs": digest for split, digest in (record.inputs or {}).items()}}

    def shown(record: dict, k: str) -> str:
        return repr(record[k]) if k in record else "not recorded"  # e.g. an option newer than the folder

    a, b = flat(old), flat(new)
    return "; ".join(f"{k}: {'changed' if k in a else 'not recorded'}" if k.endswith(" inputs")
                     else f"{k}: {shown(a, k)} -> {shown(b, k)}"
                     for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k] != b[k])


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, links and `..` followed (neither need exist yet)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
