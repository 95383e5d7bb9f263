"""The run folder (`--out`): the names of what alextrain writes there, and who may write it.

    config.json     the run's TrainConfig (train/config.py), rewritten at every start
    metrics.jsonl   one JSON record per line (train/metrics.py)
    last.pt         the latest checkpoint (train/checkpoint.py); best.pt a second name of the best epoch's
    .lock           held (a POSIX lock) by the one alextrain writing the folder
    report.png      `alextrain report`'s default picture; model-last/ `alextrain export`'s default folder

Every file is written under a temporary `.tmp-` name and renamed; a failed write is one line
(`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

CONFIG, METRICS, LAST, BEST, LOCK, REPORT = "config.json", "metrics.jsonl", "last.pt", "best.pt", ".lock", "report.png"


class RunFolderError(Exception):
    """The run folder holds another run, or cannot be written; the message says which."""


def export_folder(checkpoint: Path) -> Path:
    """Where `alextrain export` and `push` put a checkpoint's export: RUN/model-last for RUN/last.pt."""
    return checkpoint.parent / f"model-{checkpoint.stem}"


def lock(out: Path) -> int:
    """Make the run folder `out` if need be and lock it: an exclusive POSIX lock on OUT/.lock, which
    is this process's alone (the loader's forked workers do not inherit it) and ends with it, killed
    or not. Returns the lock file's descriptor (closing it releases the lock). RunFolderError when
    another process holds it."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderError(f"{out}: another alextrain is writing this run folder (it holds {out / LOCK}); "
                                     "wait for it to end, or use another --out") from None
            raise
    return fd


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temporary files that a killed save or link left in the run folder `out` (atomic_write's
    `.tmp-last.pt.XXXXXXXX`, up to a whole checkpoint each, and a link's `.tmp-best.pt.link`); only
    those names, only regular files. Returns what was removed."""
    stale = [p for name in (LAST, BEST) for p in Path(out).glob(f".tmp-{name}.*") if p.is_file() and not p.is_symlink()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def writing(out: Path):
    """Turn a failed write into the run folder (full disk, read-only folder, a file in the way) into
    one line."""
    try:
        yield
    except OSError as e:
        name = e.filename or out
        raise RunFolderError(f"{name}: cannot write ({e.strerror or e})") from None
