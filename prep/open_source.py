"""What `--source` names, opened: the Hub, a local parquet folder, an ILSVRC-2012 tree, or `synthetic`.

Opening lists the inputs and reads what describes them (parquet footers, folder listings) and writes
nothing anywhere; anything that cannot be opened is one SourceError line saying what to do. The Hub
token is handed to `huggingface_hub` and never printed or stored (prep/fetch.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from prep.contract import SPLITS
from prep.errors import SourceError
from prep.fetch import HubStore, LocalStore
from prep.listed_source import SYNTHETIC, open_synthetic, open_tree
from prep.parquet_source import open_parquet
from prep.source import Source

HUB_ID = "ILSVRC/imagenet-1k"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def open_source(spec: str, splits: tuple[str, ...] = SPLITS, per_class: Mapping[str, int] | None = None) -> Source:
    """Open the source named by `spec` for `splits`; raise SourceError with one clear line if it cannot be.

    `spec`: "synthetic", a local folder (parquet files under data/, or an ILSVRC-2012 tree with
    train/ and val/ or validation/ class folders), or a Hub dataset id such as "ILSVRC/imagenet-1k".
    `per_class` (synthetic only): images per class for each split.
    """
    if per_class and spec != SYNTHETIC:
        raise SourceError(f"per-class counts apply only to the synthetic source, not to {spec!r}")
    if spec == SYNTHETIC:
        return open_synthetic(splits, per_class or {})
    path = Path(spec).expanduser()
    if path.is_dir():
        if sorted((path / "data").glob("*.parquet")):
            root = path.resolve()
            return open_parquet(LocalStore(root), f"parquet:{root}", root.name, splits, f"--source {root}",
                                (root / "data",))
        return open_tree(path.resolve(), splits)
    if path.exists():
        raise SourceError(f"--source {spec}: not a folder")
    if _HUB_ID_RE.match(spec) and not spec.startswith((".", "~")):
        return open_parquet(HubStore.open(spec), spec, spec.split("/")[-1], splits, spec)
    raise SourceError(f"--source {spec}: no such folder, and not 'synthetic' or a Hub dataset id like {HUB_ID}")
