"""Parquet files of a source, local or on the Hugging Face Hub: listing, footers, whole files, row groups.

Two stores with one interface (`Store`): `files(split)` -> [(path, size)] in name order,
`footer(path, size)` -> pyarrow FileMetaData, `parquet(path)` -> a pyarrow ParquetFile reading row
groups in place (local) or by exact ranged reads (Hub), `where(path)` for messages; the Hub's also
`download(path, folder)` of a whole file. The Hub is listed through `huggingface_hub`'s HfApi and read
through the client's own HTTP session, file URLs and headers (so redirects to a CDN and the token work
as in the client; the token comes from its usual places, `HF_TOKEN` or `hf auth login`, and is never
printed or stored). Our own transfer loop rather than `hf_hub_download` or `HfFileSystem`: those time
out per socket read only (a server trickling a byte every few seconds holds them for days), sleep out
whatever Retry-After a 429 names, and check no sha256. Every transfer is one ranged GET checked against
the listing (the file's size; a whole file also its LFS sha256 and the footer read when the source was
opened), given up below MIN_BYTES_PER_S over RATE_WINDOW_S spent waiting for data (prep.throughput, the
rule alextrain's remote reads follow too), and retried from where it stopped; an HTTP
429 waits at most RATE_LIMIT_MAX_WAIT_S and says so on stderr (the `prep.fetch` logger). Errors become
SourceError (nothing written yet) or FetchError (mid-build), each one line naming the repo or the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import struct
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from prep.errors import FetchError, SourceError
from prep.text import first_line
from prep.throughput import MinimumRate, TooSlow

# Failed attempts in a row before a transfer is given up with one line; an attempt that brought at
# least a rate window's worth of bytes (MIN_BYTES_PER_S x RATE_WINDOW_S) starts the count again.
DOWNLOAD_TRIES = 3
MIN_BYTES_PER_S = 10_000  # a transfer slower than this over RATE_WINDOW_S of waiting is given up (and retried)
RATE_WINDOW_S = 60.0  # seconds; also the longest wait for a connection, an answer or the next bytes
RATE_LIMIT_MAX_WAIT_S = 60.0  # the longest wait after an HTTP 429, whatever its Retry-After asks
RETRY_WAIT_S = 1.0  # seconds before the first retry, doubling up to 8x that
_FOOTER_TAIL = 8  # a parquet file ends with the footer length (uint32 LE) and b"PAR1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_log = logging.getLogger(__name__)  # Python's last-resort handler prints its warnings to stderr


def _metadata_from_footer(footer: bytes, where: str) -> pq.FileMetaData:
    """FileMetaData from the footer bytes alone (thrift + length + magic), without the file's data."""
    try:
        return pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{where}: not a readable parquet file ({first_line(e)})") from None


class Store(Protocol):
    """What a parquet source asks of the place its files are: listing, footers, row groups, a name for messages."""

    def files(self, split: str) -> list[tuple[str, int]]:
        """`data/{split}-*.parquet` as (path, bytes), in name order."""

    def footer(self, path: str, size: int) -> pq.FileMetaData:
        """The file's footer (kept for `parquet`); SourceError with one line if it is not a parquet file."""

    def parquet(self, path: str) -> pq.ParquetFile:
        """The file for reading row groups, its footer reused."""

    def where(self, path: str) -> str:
        """The file as messages name it."""


class LocalStore:
    """A folder with `data/{split}-*.parquet`, read in place."""

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
            raise SourceError(f"{self.root / path}: not a readable parquet file ({first_line(e)})") from None
        return self._footers[path]

    def parquet(self, path: str) -> pq.ParquetFile:
        """Row groups read in place (the footer read by footer() is reused)."""
        return pq.ParquetFile(self.root / path, metadata=self._footers[path])

    def where(self, path: str) -> str:
        return str(self.root / path)


class _Retry(Exception):
    """One failed attempt of a transfer that may go through when tried again; the message says why."""


class _RateLimited(_Retry):
    """HTTP 429; `retry_after`: the seconds the server asked for, None if it did not say."""

    def __init__(self, retry_after: float | None):
        super().__init__("the Hub is rate-limiting: HTTP 429" +
                         (f", Retry-After {retry_after:g} s" if retry_after is not None else ""))
        self.retry_after = retry_after


def row_groups(meta: pq.FileMetaData) -> tuple[int, ...]:
    """Rows per row group of a parquet file, from its footer."""
    return tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))


class HubStore:
    """A Hub dataset repo at one commit: the files listed once, read by checked, paced ranged GETs."""

    def __init__(self, repo_id: str, revision: str, files: list[tuple[str, int, str | None]], token: str):
        """`files`: (path, size, LFS sha256 or None) as listed."""
        self.repo_id, self.revision, self._token = repo_id, revision, token
        self._files = [(p, s) for p, s, _ in files]
        self._listed = {p: (s, sha) for p, s, sha in files}
        self._footers: dict[str, pq.FileMetaData] = {}

    @classmethod
    def open(cls, repo_id: str) -> HubStore:
        """Find the token, check access and list `data/` at the repo's current commit."""
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.utils import logging as hf_logging

        terms = (f"accept the terms at https://huggingface.co/datasets/{repo_id}, then run `hf auth login` or set "
                 f"HF_TOKEN; or pass a local --source (a folder of its parquet files or an ILSVRC-2012 tree)")
        token = huggingface_hub.get_token()
        if token is None:
            raise SourceError(f"no Hugging Face token for the gated dataset {repo_id}: {terms}")
        hf_logging.set_verbosity_error()  # the listing's retry warnings; a failure that remains is our one line
        api = HfApi(token=token)
        try:
            revision = api.dataset_info(repo_id).sha
            tree = api.list_repo_tree(repo_id, path_in_repo="data", recursive=True, repo_type="dataset",
                                      revision=revision)
            files = sorted((f.path, f.size, f.lfs.sha256 if getattr(f, "lfs", None) else None)
                           for f in tree if f.path.endswith(".parquet") and hasattr(f, "size"))
        except Exception as e:  # network, auth and gating errors have no common base below Exception
            raise SourceError(hub_error(e, repo_id, token, terms)) from None
        return cls(repo_id, revision, files, token)

    def files(self, split: str) -> list[tuple[str, int]]:
        return [(p, s) for p, s in self._files if p.startswith(f"data/{split}-")]

    def footer(self, path: str, size: int) -> pq.FileMetaData:
        if size < 2 * _FOOTER_TAIL:
            raise SourceError(f"{self.where(path)}: not a readable parquet file (no parquet footer)")
        try:
            tail = self._read(path, size - _FOOTER_TAIL, size, "reading")
            length = struct.unpack("<I", tail[:4])[0] if tail[4:] == b"PAR1" else -1
            if not 0 < length <= size - 2 * _FOOTER_TAIL:
                raise SourceError(f"{self.where(path)}: not a readable parquet file (no parquet footer)")
            footer = self._read(path, size - _FOOTER_TAIL - length, size - _FOOTER_TAIL, "reading") + tail
        except FetchError as e:  # nothing is written yet: a source that cannot be opened
            raise SourceError(str(e)) from None
        self._footers[path] = _metadata_from_footer(footer, self.where(path))
        return self._footers[path]

    def parquet(self, path: str) -> pq.ParquetFile:
        """Row groups by ranged reads (the footer read by footer() is reused, not fetched again)."""
        return pq.ParquetFile(_RangedFile(self, path, self._listed[path][0]), metadata=self._footers[path])

    def download(self, path: str, folder: Path) -> Path:
        """The whole file as `folder/path`, handed over only once it matches the listing (size, LFS sha256)
        and the footer read when the source was opened (row groups and their rows); else fetched again."""
        size, sha256 = self._listed[path]
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".incomplete")
        for _ in range(DOWNLOAD_TRIES):
            digest = hashlib.sha256()
            with open(partial, "wb") as f:
                def write(chunk: bytes) -> None:
                    f.write(chunk)
                    digest.update(chunk)

                self._transfer(path, 0, size, write, "downloading")
            problem = self._mismatch(path, partial, sha256, digest.hexdigest())
            if problem is None:
                os.replace(partial, target)
                return target
        raise FetchError(f"downloading {self.where(path)} failed {DOWNLOAD_TRIES} times ({problem}); "
                         f"run the same command again to continue")

    def _mismatch(self, path: str, local: Path, sha256: str | None, digest: str) -> str | None:
        """How a downloaded file differs from what the listing and the footer read at open say, or None."""
        if sha256 is not None and digest != sha256:
            return f"the bytes served have sha256 {digest[:16]}..., the listing says {sha256[:16]}..."
        try:
            meta = pq.read_metadata(local)
        except (pa.ArrowException, OSError) as e:
            return f"not a readable parquet file: {first_line(e)}"
        if path in self._footers and row_groups(meta) != row_groups(self._footers[path]):
            return (f"its row groups hold {sum(row_groups(meta))} rows in {meta.num_row_groups}, its footer read "
                    f"when the build started said {self._footers[path].num_rows} in "
                    f"{self._footers[path].num_row_groups}")
        return None

    def _read(self, path: str, start: int, end: int, doing: str) -> bytes:
        """Bytes [start, end) of `path`."""
        out = bytearray()
        self._transfer(path, start, end, out.extend, doing)
        return bytes(out)

    def _transfer(self, path: str, start: int, end: int, write: Callable[[bytes], None], doing: str) -> None:
        """Bytes [start, end) of `path` to `write`, in order: ranged GETs, each attempt going on from where
        the last one stopped; FetchError (one line) once DOWNLOAD_TRIES attempts in a row failed."""
        from huggingface_hub.errors import HfHubHTTPError

        pos, failures, backoff = start, 0, RETRY_WAIT_S
        while pos < end:
            began = pos
            try:
                rate = MinimumRate(MIN_BYTES_PER_S, RATE_WINDOW_S, remaining=end - pos)
                with contextlib.closing(self._get(path, pos, end)) as chunks:
                    asked = time.monotonic()
                    for chunk in chunks:
                        waited = time.monotonic() - asked  # writing the chunk is not waiting for data
                        write(chunk)
                        pos += len(chunk)
                        rate.add(len(chunk), waited)
                        asked = time.monotonic()
            except HfHubHTTPError as e:  # the client's answer to a 4xx: no access, no such file
                raise FetchError(hub_error(e, self.repo_id, self._token, f"{doing} {path}")) from None
            except (_Retry, TooSlow) as e:
                failures = 1 if pos - began >= MIN_BYTES_PER_S * RATE_WINDOW_S else failures + 1
                if failures >= DOWNLOAD_TRIES:
                    raise FetchError(f"{doing} {self.where(path)} failed {failures} times ({e}); "
                                     f"run the same command again to continue") from None
                wait = backoff
                if isinstance(e, _RateLimited):
                    wait = min(e.retry_after if e.retry_after is not None else backoff, RATE_LIMIT_MAX_WAIT_S)
                    _log.warning(f"{e}; waiting {wait:g} s before {doing} {self.where(path)} again")
                time.sleep(wait)
                backoff = min(2 * backoff, 8 * RETRY_WAIT_S)

    def _get(self, path: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes [start, end) of `path` as they arrive, from one ranged GET through the client's session;
        _Retry where another attempt may help, the client's HfHubHTTPError for any other 4xx."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.repo_id, path, repo_type="dataset", revision=self.revision)
        headers = build_hf_headers(token=self._token, headers={"Range": f"bytes={start}-{end - 1}",
                                                               "Accept-Encoding": "identity"})
        got = 0
        try:
            with get_session().stream("GET", url, headers=headers, timeout=RATE_WINDOW_S,
                                      follow_redirects=True) as response:
                self._check_answer(response, path, start, end)
                for chunk in response.iter_raw():
                    got += len(chunk)
                    if got > end - start:
                        raise _Retry(f"more than the {end - start:,} bytes asked for came")
                    yield chunk
            if got < end - start:
                raise _Retry(f"the answer ended after {got:,} of {end - start:,} bytes")
        except (_Retry, HfHubHTTPError):
            raise
        except Exception as e:  # whatever the session's transport raises: refused, reset, cut short, timed out
            raise _Retry(f"{type(e).__name__}: {first_line(e, self._token)}") from None

    def _check_answer(self, response, path: str, start: int, end: int) -> None:
        """A 206 for exactly [start, end) of a file of the listed size (or a 200 of the whole file), else raise."""
        from huggingface_hub.utils import hf_raise_for_status

        size, status = self._listed[path][0], response.status_code
        if status == 429:
            after = response.headers.get("Retry-After", "").strip()
            raise _RateLimited(float(after) if after.isdigit() else None)
        if status == 408 or status >= 500:
            raise _Retry(f"HTTP {status}")
        if status == 416:
            raise _Retry(f"HTTP 416: the file is shorter than the {size:,} bytes listed")
        hf_raise_for_status(response)
        if status == 206:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if m is None or int(m[3]) != size:
                total = f"{int(m[3]):,} bytes" if m else "of unknown size"
                raise _Retry(f"the file served is {total}, the listing says {size:,}")
            if (int(m[1]), int(m[2])) != (start, end - 1):
                raise _Retry(f"bytes {m[1]}-{m[2]} came where {start}-{end - 1} were asked for")
        elif status == 200 and (start, end) == (0, size):
            length = response.headers.get("Content-Length")
            if length is not None and int(length) != size:
                raise _Retry(f"the file served is {int(length):,} bytes, the listing says {size:,}")
        else:
            raise _Retry(f"HTTP {status} to a request for bytes {start}-{end - 1}")

    def where(self, path: str) -> str:
        return f"{self.repo_id}/{path}"


class _RangedFile(io.RawIOBase):
    """A Hub file for pyarrow: each read is one checked ranged transfer of exactly the bytes asked for
    (pyarrow asks for whole column chunks, so a row group costs one request per column)."""

    def __init__(self, store: HubStore, path: str, size: int):
        super().__init__()
        self._store, self._path, self._size, self._pos = store, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        data = self._store._read(self._path, self._pos, end, "reading")
        self._pos = end
        return data


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
    return (f"cannot load {repo_id} from the Hugging Face Hub ({type(e).__name__}: {first_line(e, token)}): "
            f"check the network and your access; {doing}")
