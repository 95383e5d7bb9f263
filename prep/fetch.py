"""Parquet files of a source, local or on the Hugging Face Hub: listing, footers, whole files, row groups.

Two stores with one interface: `files(split)` -> [(path, size)] in name order, `footer(path, size)`
-> pyarrow FileMetaData, `parquet(path)` -> a pyarrow ParquetFile reading row groups in
place (local) or by exact ranged reads (Hub), and, for the Hub, `download(path, folder)` of a whole
file. The Hub goes through `huggingface_hub` only: its listing, `HfFileSystem` ranged reads and
`hf_hub_download` (which resumes a dropped transfer a few times by itself); the token comes from its
usual places (`HF_TOKEN`, `hf auth login`) and is never printed or stored. Errors become SourceError
(nothing written yet) or FetchError (mid-build), each one line naming the repo or the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prep.source import SourceError

DOWNLOAD_TRIES = 3  # attempts per file (footer or whole file); huggingface_hub resumes a download itself too
_FOOTER_TAIL = 8  # a parquet file ends with the footer length (uint32 LE) and b"PAR1"


class FetchError(Exception):
    """A source file that could not be fetched or read mid-build; one line naming it."""


def _metadata_from_footer(footer: bytes, where: str) -> pq.FileMetaData:
    """FileMetaData from the footer bytes alone (thrift + length + magic), without the file's data."""
    try:
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{where}: not a readable parquet file ({_first_line(e)})") from None


def _first_line(e: BaseException, secret: str | None = None) -> str:
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.replace(secret, "***") if secret else line


class LocalStore:
    """A folder with `data/{split}-*.parquet`, read in place."""

    remote = False

    def __init__(self, root: Path):
        self.root = root
        self._footers: dict[str, pq.FileMetaData] = {}

    def files(self, split: str) -> list[tuple[str, int]]:
        paths = sorted((self.root / "data").glob(f"{split}-*.parquet"))
        return [(str(p.relative_to(self.root)), p.stat().st_size) for p in paths]

    def footer(self, path: str, size: int) -> pq.FileMetaData:
        try:
            self._footers[path] = pq.read_metadata(self.root / path)
        except (pa.ArrowException, OSError) as e:
            raise SourceError(f"{self.root / path}: not a readable parquet file ({_first_line(e)})") from None
        return self._footers[path]

    def parquet(self, path: str) -> pq.ParquetFile:
        """Row groups read in place (the footer read by footer() is reused)."""
        return pq.ParquetFile(self.root / path, metadata=self._footers[path])

    def where(self, path: str) -> str:
        return str(self.root / path)

    def network_error(self, e: BaseException) -> bool:
        return False


class HubStore:
    """A Hub dataset repo at one commit: the files listed once, read through `huggingface_hub`."""

    remote = True

    def __init__(self, repo_id: str, revision: str, files: list[tuple[str, int]], token: str):
        from huggingface_hub import HfFileSystem

        self.repo_id, self.revision, self._files, self._token = repo_id, revision, files, token
        self._fs = HfFileSystem(token=token)
        self._footers: dict[str, pq.FileMetaData] = {}

    @classmethod
    def open(cls, repo_id: str) -> HubStore:
        """Find the token, check access and list `data/` at the repo's current commit."""
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.utils import disable_progress_bars, logging

        terms = (f"accept the terms at https://huggingface.co/datasets/{repo_id}, then run `hf auth login` or set "
                 f"HF_TOKEN; or pass a local --source (a folder of its parquet files or an ILSVRC-2012 tree)")
        token = huggingface_hub.get_token()
        if token is None:
            raise SourceError(f"no Hugging Face token for the gated dataset {repo_id}: {terms}")
        disable_progress_bars()  # ours shows images/s and MB/s; one bar per downloaded file would bury it
        logging.set_verbosity_error()  # its retry warnings; a failure that remains is our one line
        api = HfApi(token=token)
        try:
            revision = api.dataset_info(repo_id).sha
            tree = api.list_repo_tree(repo_id, path_in_repo="data", recursive=True, repo_type="dataset",
                                      revision=revision)
            files = sorted((f.path, f.size) for f in tree if f.path.endswith(".parquet") and hasattr(f, "size"))
        except Exception as e:  # network, auth and gating errors have no common base below Exception
            raise SourceError(hub_error(e, repo_id, token, terms)) from None
        return cls(repo_id, revision, files, token)

    def files(self, split: str) -> list[tuple[str, int]]:
        return [(p, s) for p, s in self._files if p.startswith(f"data/{split}-")]

    def _open(self, path: str):
        # cache_type "none": every read is one ranged GET of exactly the bytes asked for.
        return self._fs.open(f"datasets/{self.repo_id}@{self.revision}/{path}", "rb", cache_type="none")

    def footer(self, path: str, size: int) -> pq.FileMetaData:
        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                return self._footer(path, size)
            except SourceError:
                raise
            except Exception as e:  # a dropped connection: try again, a bounded number of times
                if attempt == DOWNLOAD_TRIES:
                    raise SourceError(hub_error(e, self.repo_id, self._token, f"reading {path}")) from None

    def _footer(self, path: str, size: int) -> pq.FileMetaData:
        with self._open(path) as f:
            f.seek(size - _FOOTER_TAIL)
            tail = f.read(_FOOTER_TAIL)
            length = struct.unpack("<I", tail[:4])[0] if tail[4:] == b"PAR1" else -1
            if not 0 < length <= size - 2 * _FOOTER_TAIL:
                raise SourceError(f"{self.where(path)}: not a readable parquet file (no parquet footer)")
            f.seek(size - _FOOTER_TAIL - length)
            footer = f.read(length) + tail
        self._footers[path] = _metadata_from_footer(footer, self.where(path))
        return self._footers[path]

    def parquet(self, path: str) -> pq.ParquetFile:
        """Row groups by ranged reads (the footer read by footer() is reused, not fetched again)."""
        return pq.ParquetFile(self._open(path), metadata=self._footers[path])

    def download(self, path: str, folder: Path) -> Path:
        """The whole file into `folder` (huggingface_hub's local-dir layout); bounded retries."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                return Path(hf_hub_download(self.repo_id, path, repo_type="dataset", revision=self.revision,
                                            local_dir=folder, token=self._token))
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    raise FetchError(hub_error(e, self.repo_id, self._token, f"downloading {path}")) from None
                error = e
            except Exception as e:  # dropped connections, timeouts: the client's own retries ran out
                error = e
        raise FetchError(f"downloading {self.where(path)} failed {DOWNLOAD_TRIES} times "
                         f"({type(error).__name__}: {_first_line(error, self._token)}); "
                         f"run the same command again to continue")

    def where(self, path: str) -> str:
        return f"{self.repo_id}/{path}"

    def network_error(self, e: BaseException) -> bool:
        """Whether a failed ranged read is the network's doing (else the file's: not readable parquet)."""
        from huggingface_hub.errors import HfHubHTTPError

        return (isinstance(e, (HfHubHTTPError, ConnectionError, TimeoutError))
                or type(e).__module__.split(".")[0] in ("httpx", "httpcore"))


def hub_error(e: BaseException, repo_id: str, token: str, doing: str) -> str:
    """One line for a `huggingface_hub` error, without the token."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        from huggingface_hub.errors import RemoteEntryNotFoundError as EntryNotFound
    except ImportError:  # huggingface_hub < 1.0
        from huggingface_hub.errors import EntryNotFoundError as EntryNotFound

    status = e.response.status_code if isinstance(e, HfHubHTTPError) and e.response is not None else None
    if isinstance(e, GatedRepoError) or status == 403:
        return (f"no access to the gated dataset {repo_id} with this token (HTTP {status}): accept its terms at "
                f"https://huggingface.co/datasets/{repo_id} with the account the token belongs to")
    if isinstance(e, RepositoryNotFoundError):
        return (f"{repo_id}: no such dataset on the Hugging Face Hub, or this token cannot see it "
                f"(HTTP {status}); check the name")
    if isinstance(e, EntryNotFound):
        return f"{repo_id}: {doing}: the file is not there (HTTP {status})"
    return (f"cannot load {repo_id} from the Hugging Face Hub ({type(e).__name__}: {_first_line(e, token)}): "
            f"check the network and your access; {doing}")
