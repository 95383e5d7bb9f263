"""A local stand-in of the Hugging Face Hub for one gated dataset repo and any number of model repos, for
tests and benchmarks.

It speaks the HTTP endpoints the real `huggingface_hub` client (2.4) uses for a dataset repo, so code
under test runs the real client unchanged once `HF_ENDPOINT` points here:

- `GET /api/datasets/{repo}[/revision/{rev}]` (`dataset_info`, `repo_info`, `HfFileSystem`),
- `GET /api/datasets/{repo}/tree/{rev}[/{path}]` (`list_repo_tree`, `list_repo_files`; Link-header pages),
- `POST /api/datasets/{repo}/paths-info/{rev}` (`get_paths_info`, `HfFileSystem.info`),
- `GET /api/datasets/{repo}/auth-check` (`auth_check`),
- `HEAD` and `GET /datasets/{repo}/resolve/{rev}/{path}` (`hf_hub_download`, `HfFileSystem` reads), with
  single `Range: bytes=a-b` requests answered 206 and `Content-Range`.

As on the Hub, the repo's metadata (info, tree, paths-info) is public and its files are gated: a resolve
or auth-check without `Authorization: Bearer TOKEN` gets 401 `X-Error-Code: GatedRepo` (the client's
`GatedRepoError`), any other token 403 GatedRepo (a user who has not accepted the terms). An unknown repo
is 404 RepoNotFound, an unknown revision 404 RevisionNotFound, an unknown file 404 EntryNotFound. The
revision is `main` or the fixed fake commit `COMMIT`. `.parquet` files are served as LFS files (ETag =
sha256, `X-Linked-Etag`, `X-Linked-Size`), others as plain git files (ETag = git blob sha1); no
redirects and no Xet headers, so the client downloads over plain HTTP even with `hf_xet` installed.

Model repos (`hub.models`, a `ModelRepos`) are made and written through the endpoints that `create_repo`,
`create_branch` and `create_commit` use, and read like the dataset repo:

- `POST /api/repos/create` (the repo's URL; 409 if it exists, which `exist_ok=True` accepts),
- `POST /api/validate-yaml` (a README.md's metadata block must be a YAML mapping),
- `POST /api/models/{repo}/preupload/{rev}` (each file's upload mode, LFS by the .gitattributes patterns,
  size or binary content, and the `oid` of the file already there, by which the client leaves out
  unchanged files: pushing the same files again makes no commit),
- `POST /{repo}.git/info/lfs/objects/batch` (an upload href for each LFS object the server lacks) and
  `PUT /lfs-objects/{sha256}` (the content, checked against its sha256),
- `POST /api/models/{repo}/commit/{rev}` (NDJSON: header, `file`, `lfsFile`, `deletedFile`,
  `deletedFolder`; checked whole, then applied at once: all or nothing),
- `POST /api/models/{repo}/branch/{branch}`,
- `GET /api/models/{repo}[/revision/{rev}]`, `GET /api/models/{repo}/tree/{rev}[/{path}]`, and `HEAD`/`GET
  /{repo}/resolve/{rev}/{path}` (`hf_hub_download` of a model; `rev` a branch or a commit id).

Writes need `Authorization: Bearer WRITE_TOKEN` in the namespace `WRITE_USER`: without a token 401, with
an unknown one 401 "Invalid credentials in Authorization header", with the dataset's (read) token or
outside that namespace 403. Public model repos are read by anyone, private ones only with WRITE_TOKEN.
Uploads speak the LFS protocol, not Xet: the client must run with `HF_HUB_DISABLE_XET=1` (conftest sets it).
`hub.models.drop("lfs" | "commit")` makes the next upload or commit request end in a closed connection
(recorded with status 0), and `hub.models.commits(repo)` lists a branch's commits.

For benchmarks and failure tests it has a whole-server bandwidth limit (`bandwidth`, bytes/s of file
content), accounting (`sent[path]`, `total_sent`, `requests`) and fault injection, each for the next
`times` GETs of one file:
- `drop(path, after_bytes, times)`: send that many body bytes, then close the connection;
- `trickle(path, slow_bytes, every_s, times)`: send the first `slow_bytes` body bytes one at a time,
  `every_s` seconds apart (the rest at full speed);
- `rate_limit(path, retry_after, times)`: answer 429 with `Retry-After: retry_after`;
- `serve_instead(path, data, times)`: for the next `times` requests, HEAD or GET, the file is `data`
  (its bytes, size and hashes in the headers) while the listing still shows the repo's file, as a
  file that changed between listing and download.

How tests select it: `huggingface_hub` reads `HF_ENDPOINT` and `HF_HOME` when it is imported, so
tests/conftest.py binds the server's socket and sets `HF_ENDPOINT`, `HF_HOME` (a temporary folder: no
real token or cache is touched) and `HF_HUB_DISABLE_TELEMETRY` at import, before anything imports the
client; a session fixture starts serving, and the `hub` fixture gives each test a reset server over a
fresh repo with `HF_TOKEN` set. In-process tests are faster than a subprocess per test; a subprocess
(e.g. the `alexprep` CLI) inherits the same environment.

Standalone, for benchmarks (Ctrl-C stops it):
    python -m tests.hubstub --root DIR --port P [--bandwidth BYTES_PER_S] [--token T] [--repo-id ID]
with `--make-repo` to fill an empty DIR with `make_imagenet_like_repo` first.
"""

from __future__ import annotations

import argparse
import base64
import colorsys
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_REPO_ID = "ILSVRC/imagenet-1k"
DEFAULT_TOKEN = "hf_hubstub_test_token"  # a fake token, accepted only by this server
COMMIT = "feedc0de" * 5  # the fixed fake commit sha of every revision served
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
TREE_PAGE_SIZE = 1000  # entries per tree page, as the Hub pages them
_CHUNK = 64 * 1024  # bytes per socket write of a file body (smaller under a low bandwidth limit)


class Request(NamedTuple):
    """One request as the server saw it. `file` is the repo path of a resolve request, else None."""

    method: str
    path: str  # the URL path, percent-decoded, without the query
    file: str | None
    range: str | None  # the Range header as sent
    status: int


@dataclass(frozen=True)
class _Entry:
    """A file of the repo: size, sha256 (LFS oid, ETag of LFS files) and git blob sha1 (tree oid)."""

    size: int
    sha256: str
    oid: str
    lfs_pointer_size: int | None  # None: a plain git file

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs_pointer_size is not None else self.oid


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: Path) -> _Entry:
    return _entry_of(path.read_bytes(), lfs=path.suffix == ".parquet")


def _entry_of(data: bytes, lfs: bool) -> _Entry:
    sha256 = hashlib.sha256(data).hexdigest()
    if not lfs:
        return _Entry(len(data), sha256, _git_blob_sha1(data), None)
    return _lfs_entry(sha256, len(data))


class _HubError(Exception):
    """An error answer: status, the Hub's `X-Error-Code` and message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Pacer:
    """Whole-server bandwidth limit: each chunk reserves the next free slot of `n / rate` seconds."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self._lock = threading.Lock()
        self._next = 0.0  # time.monotonic() at which the link is free again

    def wait(self, n: int) -> None:
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(now, self._next) + n / rate
            until = self._next
        time.sleep(max(0.0, until - now))


class HubStub:
    """The server. `with HubStub(root) as hub:` serves `root` at `hub.url` until the block ends.

    `root` is the repo's folder (its files, recursively, are the repo's files; may be set later while
    serving); `token` the one accepted token; `bandwidth` bytes/s of file content for the whole server
    (None: unlimited). `port=0` picks a free port; the socket is bound at construction, so `url` is
    known before `start()`.
    """

    def __init__(self, root: str | Path | None = None, *, repo_id: str = DEFAULT_REPO_ID,
                 token: str = DEFAULT_TOKEN, bandwidth: float | None = None, host: str = "127.0.0.1",
                 port: int = 0):
        self.root = None if root is None else Path(root)
        self.repo_id = repo_id
        self.token = token
        self.page_size = TREE_PAGE_SIZE
        self._pacer = _Pacer(bandwidth)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int, int], _Entry] = {}  # (path, size, mtime_ns) -> entry
        self._faults: dict[tuple[str, str], list] = {}  # (fault, repo path) -> [its argument, times left]
        self.sent: dict[str, int] = {}
        self.requests: list[Request] = []
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.write_token = WRITE_TOKEN
        self.models = ModelRepos()

    # --- life cycle ---------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The value for HF_ENDPOINT."""
        return f"http://{self._server.server_address[0]}:{self.port}"

    def start(self) -> HubStub:
        if self._thread is not None:
            raise RuntimeError("the server is already serving")
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubstub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and every open connection."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            _close_quietly(conn)
        self._server.server_close()
        self.models.reset()

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- knobs and accounting -----------------------------------------------------------------------

    @property
    def bandwidth(self) -> float | None:
        """Bytes of file content per second, whole server; None: unlimited. Settable while serving."""
        return self._pacer.rate

    @bandwidth.setter
    def bandwidth(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {rate}")
        self._pacer.rate = rate

    @property
    def total_sent(self) -> int:
        """Bytes of file content sent, all files."""
        with self._lock:
            return sum(self.sent.values())

    def reset(self) -> None:
        """Forget accounting and pending faults; no bandwidth limit; the default page size; no model repos."""
        with self._lock:
            self.sent = {}
            self.requests = []
            self._faults = {}
        self.bandwidth = None
        self.page_size = TREE_PAGE_SIZE
        self.models.reset()

    # --- faults: each for the next `times` GETs of one repo file ------------------------------------

    def drop(self, path: str, after_bytes: int, times: int = 1) -> None:
        """The next `times` GETs of repo file `path` send `after_bytes` body bytes, then close the connection."""
        if after_bytes < 0:
            raise ValueError(f"need after_bytes >= 0, got {after_bytes}")
        self._arm("drop", path, after_bytes, times)

    def trickle(self, path: str, slow_bytes: int, every_s: float, times: int = 1) -> None:
        """The next `times` GETs of `path` send their first `slow_bytes` body bytes one every `every_s` seconds."""
        if slow_bytes < 1 or every_s <= 0:
            raise ValueError(f"need slow_bytes >= 1 and every_s > 0, got {slow_bytes}, {every_s}")
        self._arm("trickle", path, (slow_bytes, every_s), times)

    def rate_limit(self, path: str, retry_after: int, times: int = 1) -> None:
        """The next `times` GETs of `path` are answered 429 Too Many Requests with `Retry-After: retry_after`."""
        self._arm("rate_limit", path, retry_after, times)

    def serve_instead(self, path: str, data: bytes, times: int = 1) -> None:
        """The next `times` requests (HEAD or GET) of `path` find `data` there (bytes, size, hashes); the
        listing still shows the repo's file."""
        self._arm("serve_instead", path, bytes(data), times)

    def _arm(self, fault: str, path: str, argument, times: int) -> None:
        if times < 1:
            raise ValueError(f"need times >= 1, got {times}")
        with self._lock:
            self._faults[(fault, path)] = [argument, times]

    def _take(self, fault: str, path: str):
        """The argument of a pending `fault` of `path` (one use of it), or None."""
        with self._lock:
            pending = self._faults.get((fault, path))
            if pending is None:
                return None
            pending[1] -= 1
            if pending[1] == 0:
                del self._faults[(fault, path)]
            return pending[0]

    # --- the repo -----------------------------------------------------------------------------------

    def files(self) -> dict[str, _Entry]:
        """The repo's files now: repo path -> entry (hashes cached by path, size and mtime)."""
        if self.root is None:
            return {}
        found = {}
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(self.root).as_posix()
            st = path.stat()
            key = (rel, st.st_size, st.st_mtime_ns)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _entry(path)
            found[rel] = entry
        return found

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n


def _close_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


def _file_json(path: str, e: _Entry, expand: bool) -> dict:
    out = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
    if e.lfs_pointer_size is not None:
        out["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.lfs_pointer_size}
    if expand:
        out["lastCommit"] = {"id": COMMIT, "title": "Upload dataset", "date": LAST_MODIFIED}
    return out


def _dir_json(path: str, expand: bool) -> dict:
    out = {"type": "directory", "oid": _git_blob_sha1(path.encode()), "size": 0, "path": path}
    if expand:
        out["lastCommit"] = {"id": COMMIT, "title": "Upload dataset", "date": LAST_MODIFIED}
    return out


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> (start, end exclusive); 416 if not satisfiable."""
    unit, _, spec = header.partition("=")
    first, sep, last = spec.strip().partition("-")
    try:
        if unit.strip() != "bytes" or not sep or "," in spec:
            raise ValueError
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start = int(first)
            end = size if last == "" else min(size, int(last) + 1)
    except ValueError:
        start = end = -1
    if not 0 <= start < min(end, size):
        raise _HubError(416, None, f"Range {header!r} not satisfiable for size {size}",
                        {"Content-Range": f"bytes */{size}"})
    return start, end


def _file_head(entry: _Entry, commit_oid: str, range_header: str | None) -> tuple[int, dict, int, int]:
    """The status, headers and body span [start, end) of the answer to a resolve request for `entry`."""
    headers = {"X-Repo-Commit": commit_oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    if entry.lfs_pointer_size is not None:
        headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
    start, end, status = 0, entry.size, 200
    if range_header is not None:
        start, end = _parse_range(range_header, entry.size)
        status, headers["Content-Range"] = 206, f"bytes {start}-{end - 1}/{entry.size}"
    headers["Content-Length"] = str(end - start)
    return status, headers, start, end


# --- model repos: the write side (create_repo, create_branch, create_commit) and hf_hub_download of a model ---------

WRITE_USER = "alexuser"  # the namespace WRITE_TOKEN may create model repos in
WRITE_TOKEN = "hf_hubstub_write_token"  # a fake token with write access, accepted only by this server
# A new model repo's first commit holds the .gitattributes the Hub writes; its patterns make a file LFS.
LFS_PATTERNS = ("*.bin", "*.ckpt", "*.h5", "*.npy", "*.npz", "*.onnx", "*.pkl", "*.pt", "*.pth", "*.safetensors",
                "*.tar", "*.zip")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_MIN_SIZE = 10 * 1024 * 1024  # bytes: a larger file is LFS whatever its name, as on the Hub
UPLOAD_STEPS = ("lfs", "commit")  # the upload requests `ModelRepos.drop` can cut


class ModelCommit(NamedTuple):
    """One commit of a model repo: its 40-hex id, its title and the files it holds."""

    oid: str
    title: str
    files: dict[str, _Blob]


class _Blob(NamedTuple):
    """A committed file: its entry (sizes, hashes, LFS or not) and its content in the object store."""

    entry: _Entry
    content: Path


@dataclass
class _ModelRepo:
    private: bool
    branches: dict[str, list[ModelCommit]]  # branch -> its commits, oldest first


def _lfs_entry(sha256: str, size: int) -> _Entry:
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return _Entry(size, sha256, _git_blob_sha1(pointer), len(pointer))


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    """"lfs" or "regular", as the Hub's preupload decides: by the .gitattributes patterns and by size;
    binary content (a NUL byte in the first 512 bytes) goes to LFS too."""
    name = path.rsplit("/", 1)[-1]
    lfs = any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS) or size >= LFS_MIN_SIZE or b"\0" in sample
    return "lfs" if lfs else "regular"


class ModelRepos:
    """The stand-in's model repos, made and written only through the API, as on the Hub.

    File contents live in a temporary object store, one file per sha256 (LFS uploads are streamed to
    disk). A commit is checked whole before it is applied under the lock: all of it or nothing.
    `drop(step)` makes the next LFS upload (after half its body) or commit request (after its body,
    before anything is applied) end in a closed connection: a network drop mid-push.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._repos: dict[str, _ModelRepo] = {}
        self._store: Path | None = None
        self._drops: dict[str, int] = {}
        self.uploaded: list[str] = []  # the sha256 of every LFS object received whole, in order

    def reset(self) -> None:
        """No repos, no stored contents, no pending drops."""
        with self._lock:
            self._repos, self._drops, self.uploaded = {}, {}, []
            store, self._store = self._store, None
        if store is not None:
            shutil.rmtree(store, ignore_errors=True)

    def drop(self, step: str, times: int = 1) -> None:
        """The next `times` requests of upload step `step` ("lfs" or "commit") end in a closed connection."""
        if step not in UPLOAD_STEPS or times < 1:
            raise ValueError(f"step must be one of {UPLOAD_STEPS} and times >= 1, got {step!r}, {times}")
        with self._lock:
            self._drops[step] = times

    def commits(self, repo_id: str, branch: str = "main") -> list[ModelCommit]:
        """The branch's commits, oldest first (the repo's creation is the first)."""
        with self._lock:
            return list(self._repos[repo_id].branches[branch])

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """A file's content at a revision (a branch or a commit id)."""
        return self.commit_at(repo_id, revision).files[path].content.read_bytes()

    def commit_at(self, repo_id: str, revision: str) -> ModelCommit:
        """The commit a branch name or commit id stands for; 404 RepoNotFound or RevisionNotFound if none."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                raise _HubError(404, "RepoNotFound", "Repository not found")
            if revision in repo.branches:
                return repo.branches[revision][-1]
            found = [c for commits in repo.branches.values() for c in commits if c.oid == revision]
        if not found:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found[0]

    def private(self, repo_id: str) -> bool | None:
        """Whether the repo is private; None if there is no such repo."""
        with self._lock:
            repo = self._repos.get(repo_id)
            return None if repo is None else repo.private

    def take_drop(self, step: str) -> bool:
        with self._lock:
            left = self._drops.get(step, 0)
            if left:
                self._drops[step] = left - 1
            return left > 0

    def _objects(self) -> Path:
        with self._lock:
            if self._store is None:
                self._store = Path(tempfile.mkdtemp(prefix="hubstub-objects-"))
            return self._store

    def store(self, chunks, sha256: str | None = None) -> tuple[str, int, Path]:
        """Write byte chunks to the object store: (sha256, size, path). Content that does not hash to a
        given `sha256` is refused (400) and nothing is kept."""
        objects, h, size = self._objects(), hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=objects, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if sha256 is not None and h.hexdigest() != sha256:
                raise _HubError(400, None, f"the uploaded content's sha256 is {h.hexdigest()}, not {sha256}")
            path = objects / h.hexdigest()
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return h.hexdigest(), size, path

    def stored(self, sha256: str) -> Path | None:
        """The stored content of this sha256, if the store has it."""
        path = self._objects() / sha256
        return path if re.fullmatch(r"[0-9a-f]{64}", sha256) and path.is_file() else None

    def create(self, repo_id: str, private: bool) -> bool:
        """Make the repo, its first commit holding .gitattributes; False if it exists already."""
        sha256, size, path = self.store([GITATTRIBUTES])
        files = {".gitattributes": _Blob(_Entry(size, sha256, _git_blob_sha1(GITATTRIBUTES), None), path)}
        with self._lock:
            if repo_id in self._repos:
                return False
            self._repos[repo_id] = _ModelRepo(private, {"main": [_new_commit("", "initial commit", files)]})
        return True

    def branch(self, repo_id: str, branch: str, start: str) -> bool:
        """Make `branch` point at the commit `start` stands for; False if it exists already."""
        commit = self.commit_at(repo_id, start)
        with self._lock:
            branches = self._repos[repo_id].branches
            if branch in branches:
                return False
            branches[branch] = [commit]
        return True

    def commit(self, repo_id: str, branch: str, header: dict, operations: list[dict]) -> ModelCommit:
        """Apply one commit (the NDJSON items after its header) to `branch`, whole or not at all."""
        head = self.commit_at(repo_id, branch)
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for op in operations:
            key, value = op.get("key"), op.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not path.strip("/") or path.startswith("/") or ".." in path.split("/"):
                raise _HubError(400, None, f"invalid path in the commit: {path!r}")
            if key == "file":
                data = base64.b64decode(value.get("content", ""), validate=True)
                sha256, size, stored = self.store([data])
                files[path] = _Blob(_Entry(size, sha256, _git_blob_sha1(data), None), stored)
            elif key == "lfsFile":
                stored = self.stored(str(value.get("oid")))
                if stored is None or value.get("size", stored.stat().st_size) != stored.stat().st_size:
                    raise _HubError(400, None, f"{path}: its LFS object {value.get('oid')} was never uploaded")
                files[path] = _Blob(_lfs_entry(value["oid"], stored.stat().st_size), stored)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HubError(404, "EntryNotFound", f"{path}: A file with this name doesn't exist")
            elif key == "deletedFolder":
                for name in [f for f in files if f.startswith(path.rstrip("/") + "/")]:
                    del files[name]
            else:
                raise _HubError(400, None, f"unknown commit operation {key!r}")
        commit = _new_commit(head.oid, str(header.get("summary") or ""), files)
        with self._lock:
            commits = self._repos[repo_id].branches.get(branch)
            if commits is None or commits[-1].oid != head.oid:
                raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
            commits.append(commit)
        return commit


def _new_commit(parent: str, title: str, files: dict[str, _Blob]) -> ModelCommit:
    listing = "".join(f"{path}\t{blob.entry.oid}\n" for path, blob in sorted(files.items()))
    oid = hashlib.sha1(f"{parent}\n{title}\n{time.time_ns()}\n{listing}".encode()).hexdigest()
    return ModelCommit(oid, title, files)


def _front_matter(text: str):
    """The YAML metadata block of a README.md (None if it has none), parsed; ValueError if unreadable."""
    import yaml

    if not text.startswith("---\n"):
        return None
    block, sep, _ = text[4:].partition("\n---\n")
    if not sep:
        raise ValueError("the metadata block has no closing '---' line")
    try:
        return yaml.safe_load(block)
    except yaml.YAMLError as e:
        raise ValueError(f"the metadata block is not YAML ({str(e).splitlines()[0]})") from None


class _ModelEndpoints:
    """The handler's model-repo endpoints (mixed into _Handler; `hub.models` holds the repos)."""

    @staticmethod
    def is_model_request(parts: list[str]) -> bool:
        return (parts[:2] in (["api", "repos"], ["api", "models"]) or parts == ["api", "validate-yaml"]
                or (len(parts) >= 2 and parts[1].endswith(".git"))
                or (len(parts) >= 5 and parts[2] == "resolve" and parts[0] not in ("datasets", "spaces")))

    def do_PUT(self) -> None:
        """An LFS upload to the href the batch endpoint gave: /lfs-objects/{sha256}."""
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/")[1:]]
        self._url_path, self._file = unquote(urlsplit(self.path).path), None
        try:
            if len(parts) != 2 or parts[0] != "lfs-objects":
                raise _HubError(404, None, "Not Found")
            self._receive_object(parts[1])
        except _HubError as e:
            self.close_connection = True  # the rest of an unread body would be taken for the next request
            self._error("PUT", e)

    def _receive_object(self, sha256: str) -> None:
        models = self.hub.models
        length = int(self.headers.get("Content-Length") or -1)
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        if length < 0 and not chunked:
            raise _HubError(411, None, "Length Required")
        body = self._chunked_body() if chunked else self._body(length)
        if models.take_drop("lfs"):  # half the body, then the connection goes away; nothing is kept
            for _ in zip(range(max(1, length // 2 // _CHUNK)), body):
                pass
            self._record_drop("PUT")
            return
        models.store(body, sha256)
        models.uploaded.append(sha256)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _body(self, length: int):
        while length > 0:
            chunk = self.rfile.read(min(_CHUNK, length))
            if not chunk:
                raise _HubError(400, None, "the upload ended early")
            length -= len(chunk)
            yield chunk

    def _chunked_body(self):
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()  # the empty line after the last chunk (no trailers are sent)
                return
            yield from self._body(size)
            self.rfile.readline()  # the CRLF after each chunk

    def _record_drop(self, method: str) -> None:
        """Close the connection without an answer; recorded as a request with status 0."""
        self.hub.requests.append(Request(method, self._url_path, None, None, 0))
        self.close_connection = True
        _close_quietly(self.connection)

    def _models_api(self, method, parts, query, body) -> None:
        models = self.hub.models
        if parts == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if parts == ["api", "validate-yaml"] and method == "POST":
            try:
                meta = _front_matter(json.loads(body).get("content", ""))
                if meta is not None and not isinstance(meta, dict):
                    raise ValueError("the metadata block is not a mapping")
            except ValueError as e:
                return self._json(method, {"errors": [{"message": str(e)}], "warnings": []}, status=400)
            return self._json(method, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest or rest[0] == "revision":
                self._check_model_read(repo_id)
                commit = models.commit_at(repo_id, rest[1] if len(rest) > 1 else "main")
                return self._json(method, self._model_info(repo_id, commit, "blobs" in query))
            if rest[0] == "tree" and len(rest) >= 2:
                self._check_model_read(repo_id)
                files = {p: b.entry for p, b in models.commit_at(repo_id, rest[1]).files.items()}
                return self._tree(method, files, "/".join(rest[2:]).strip("/"), query)
            if rest[0] == "preupload" and len(rest) == 2 and method == "POST":
                self._check_write(repo_id)
                return self._json(method, self._preupload(repo_id, rest[1], json.loads(body)))
            if rest[0] == "branch" and len(rest) == 2 and method == "POST":
                self._check_write(repo_id)
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                if not models.branch(repo_id, rest[1], start):
                    raise _HubError(409, None, f"Reference already exists: {rest[1]}")
                return self._json(method, {})
            if rest[0] == "commit" and len(rest) == 2 and method == "POST":
                self._check_write(repo_id)
                return self._commit(method, repo_id, rest[1], body)
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo_id = f"{parts[0]}/{parts[1][:-len('.git')]}"
            self._check_write(repo_id)
            return self._lfs_batch(method, json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self._file = "/".join(parts[4:])
            return self._resolve_model(method, "/".join(parts[:2]), parts[3], self._file)
        raise _HubError(404, None, "Not Found")

    # --- who may do what: public repos are read by anyone, private ones and every write need WRITE_TOKEN

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        if auth not in (f"Bearer {self.hub.token}", f"Bearer {self.hub.write_token}"):
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return auth[len("Bearer "):]

    def _check_model_read(self, repo_id: str) -> None:
        private = self.hub.models.private(repo_id)
        if private is None or (private and self._token() != self.hub.write_token):
            status = 401 if self.headers.get("Authorization") is None else 404
            raise _HubError(status, "RepoNotFound", "Repository not found")

    def _check_write(self, repo_id: str, creating: bool = False) -> None:
        token = self._token()
        if token is None:
            raise _HubError(401, None, "Invalid username or password.")
        namespace = repo_id.split("/")[0]
        if token != self.hub.write_token or namespace != WRITE_USER:
            if creating:
                raise _HubError(403, None, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
            raise _HubError(403, None, f"You don't have the rights to write to {repo_id}: a token with write access "
                                       f"to it is needed")
        if not creating and self.hub.models.private(repo_id) is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")

    # --- answers

    def _create_repo(self, payload: dict) -> None:
        if payload.get("type", "model") != "model":
            raise _HubError(400, None, "this stand-in makes model repos only")
        repo_id = f"{payload.get('organization') or WRITE_USER}/{payload.get('name')}"
        self._check_write(repo_id, creating=True)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.hub.url}/{repo_id}"
        if not self.hub.models.create(repo_id, private):  # the Hub's 409 carries the URL, which exist_ok=True returns
            message = "You already created this model repo"
            return self._json("POST", {"error": message, "url": url}, {"X-Error-Message": message}, status=409)
        self._json("POST", {"url": url, "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, commit: ModelCommit, blobs: bool) -> dict:
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.entry.size, blobId=blob.entry.oid)
                if blob.entry.lfs_pointer_size is not None:
                    sibling["lfs"] = {"size": blob.entry.size, "sha256": blob.entry.sha256,
                                      "pointerSize": blob.entry.lfs_pointer_size}
            siblings.append(sibling)
        return {"_id": commit.oid[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                "sha": commit.oid, "lastModified": LAST_MODIFIED, "createdAt": LAST_MODIFIED,
                "private": self.hub.models.private(repo_id), "gated": False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings}

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> dict:
        files = self.hub.models.commit_at(repo_id, revision).files
        answers = []
        for f in payload.get("files", []):
            mode = _upload_mode(f["path"], f["size"], base64.b64decode(f.get("sample", "")))
            answer = {"path": f["path"], "uploadMode": mode, "shouldIgnore": False}
            if f["path"] in files:  # the client leaves out a file whose content this oid already is
                entry = files[f["path"]].entry
                answer["oid"] = entry.sha256 if entry.lfs_pointer_size is not None else entry.oid
            answers.append(answer)
        return {"files": answers, "commitOid": self.hub.models.commit_at(repo_id, revision).oid}

    def _lfs_batch(self, method: str, payload: dict) -> None:
        if payload.get("operation") != "upload":
            raise _HubError(400, None, "this stand-in takes LFS uploads only")
        objects = []
        for obj in payload.get("objects", []):
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if self.hub.models.stored(obj["oid"]) is None:  # no actions: the Hub has this content already
                answer["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-objects/{obj['oid']}"}}
            objects.append(answer)
        self._json(method, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _commit(self, method: str, repo_id: str, branch: str, body: bytes) -> None:
        if self.hub.models.take_drop("commit"):  # the whole request came, then the connection went away
            return self._record_drop(method)
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, None, "the commit is not NDJSON") from None
        if not items or items[0].get("key") != "header":
            raise _HubError(400, None, "a commit starts with its header")
        commit = self.hub.models.commit(repo_id, branch, items[0].get("value") or {}, items[1:])
        self._json(method, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                            "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}"})

    def _resolve_model(self, method: str, repo_id: str, revision: str, path: str) -> None:
        self._check_model_read(repo_id)
        commit = self.hub.models.commit_at(repo_id, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
        status, headers, start, end = _file_head(blob.entry, commit.oid, self.headers.get("Range"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "GET":
            with open(blob.content, "rb") as f:
                f.seek(start)
                while start < end and (data := f.read(min(_CHUNK, end - start))):
                    self.wfile.write(data)
                    start += len(data)



class _Handler(_ModelEndpoints, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60  # seconds an idle keep-alive connection is kept

    server_version = "hubstub"

    @property
    def hub(self) -> HubStub:
        return self.server.hub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the connection was dropped on purpose or by the peer

    def log_message(self, format, *args) -> None:
        pass  # quiet: tests read `requests` instead

    def send_response(self, code: int, message: str | None = None) -> None:
        # Recorded before the client can see the answer, so a test reads every request its call made.
        request = Request(self.command, getattr(self, "_url_path", self.path), getattr(self, "_file", None),
                          self.headers.get("Range") if self.headers else None, code)
        self.hub.requests.append(request)
        super().send_response(code, message)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    # --- routing ------------------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._url_path, self._file = unquote(split.path), None
        try:
            if parts == ["api", "agent-harnesses"]:  # the client's agent registry, fetched once a day
                self._json(method, {"standardEnvVars": [], "harnesses": {}})
            elif self.is_model_request(parts):
                self._models_api(method, parts, query, body)
            elif parts[:1] == ["api"] and len(parts) >= 4:
                self._api(method, parts[1], "/".join(parts[2:4]), parts[4:], query, body)
            elif len(parts) >= 5 and parts[3] == "resolve":
                self._file = "/".join(parts[5:])
                self._resolve(method, parts[0], "/".join(parts[1:3]), parts[4], self._file)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as e:
            self._error(method, e)

    def _check_repo(self, kind: str, repo_id: str, revision: str | None) -> dict[str, _Entry]:
        if kind != "datasets" or repo_id != self.hub.repo_id or self.hub.root is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if revision is not None and revision not in ("main", COMMIT):
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self.hub.files()

    def _check_access(self) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            raise _HubError(401, "GatedRepo", f"Access to dataset {self.hub.repo_id} is restricted. You must have "
                                              "access to it and be authenticated to access it. Please log in.")
        if auth != f"Bearer {self.hub.token}":
            raise _HubError(403, "GatedRepo", f"Access to dataset {self.hub.repo_id} is restricted and you are "
                                              "not in the authorized list.")

    def _api(self, method, kind, repo_id, rest, query, body) -> None:
        if not rest or rest[0] == "revision":
            files = self._check_repo(kind, repo_id, rest[1] if len(rest) > 1 else "main")
            return self._json(method, self._info(files, "blobs" in query))
        if rest[0] == "auth-check":
            self._check_repo(kind, repo_id, None)
            self._check_access()
            return self._json(method, {})
        if rest[0] == "tree" and len(rest) >= 2:
            files = self._check_repo(kind, repo_id, rest[1])
            return self._tree(method, files, "/".join(rest[2:]).strip("/"), query)
        if rest[0] == "paths-info" and len(rest) == 2 and method == "POST":
            files = self._check_repo(kind, repo_id, rest[1])
            form = parse_qs(body.decode())
            expand = form.get("expand", ["False"])[0].lower() == "true"
            return self._json(method, self._paths_info(files, form.get("paths", []), expand))
        raise _HubError(404, None, "Not Found")

    # --- the API's answers --------------------------------------------------------------------------

    def _info(self, files: dict[str, _Entry], blobs: bool) -> dict:
        siblings = []
        for path, e in files.items():
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=e.size, blobId=e.oid)
                if e.lfs_pointer_size is not None:
                    sibling["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.lfs_pointer_size}
            siblings.append(sibling)
        namespace = self.hub.repo_id.split("/")[0]
        return {"_id": COMMIT[:24], "id": self.hub.repo_id, "author": namespace, "sha": COMMIT,
                "lastModified": LAST_MODIFIED, "createdAt": LAST_MODIFIED, "private": False, "gated": "auto",
                "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
                "usedStorage": sum(e.size for e in files.values())}

    def _tree(self, method, files: dict[str, _Entry], base: str, query) -> None:
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        expand = query.get("expand", ["False"])[0].lower() == "true"
        prefix = f"{base}/" if base else ""
        if base and base in files:
            raise _HubError(400, None, f"{base} is a file, not a folder")
        entries, dirs = [], set()
        for path, e in files.items():
            if not path.startswith(prefix):
                continue
            rel_parts = path[len(prefix):].split("/")
            for depth in range(1, len(rel_parts) if recursive else min(2, len(rel_parts))):
                dirs.add(prefix + "/".join(rel_parts[:depth]))
            if recursive or len(rel_parts) == 1:
                entries.append(_file_json(path, e, expand))
        if base and not entries and not dirs:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist on \"main\"")
        entries = sorted([_dir_json(d, expand) for d in dirs] + entries, key=lambda x: x["path"])
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(entries):
            params = f"recursive={recursive}&expand={expand}&cursor={start + self.hub.page_size}"
            headers["Link"] = f'<{self.hub.url}{quote(urlsplit(self.path).path)}?{params}>; rel="next"'
        return self._json(method, page, headers)

    def _paths_info(self, files: dict[str, _Entry], paths: list[str], expand: bool) -> list[dict]:
        out = []
        for path in (p.strip("/") for p in paths):
            if path in files:
                out.append(_file_json(path, files[path], expand))
            elif any(f.startswith(path + "/") for f in files):
                out.append(_dir_json(path, expand))
        return out

    # --- file content -------------------------------------------------------------------------------

    def _resolve(self, method, kind, repo_id, revision, path) -> None:
        files = self._check_repo(kind, repo_id, revision)
        self._check_access()
        entry = files.get(path)
        if entry is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"")
        retry_after = self.hub._take("rate_limit", path) if method == "GET" else None
        if retry_after is not None:
            raise _HubError(429, None, "Too Many Requests", {"Retry-After": str(retry_after)})
        content = self.hub._take("serve_instead", path)
        if content is not None:
            entry = _entry_of(content, entry.lfs_pointer_size is not None)
        status, headers, start, end = _file_head(entry, COMMIT, self.headers.get("Range"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method == "GET":
            self._send_file(path, start, end, content)

    def _send_file(self, path: str, start: int, end: int, content: bytes | None = None) -> None:
        """Body bytes [start, end) of repo file `path` (or of `content` served in its place), paced and
        counted; a pending drop cuts it short, a pending trickle slows its start."""
        hub = self.hub
        cut = hub._take("drop", path)
        slow_bytes, every_s = hub._take("trickle", path) or (0, 0.0)
        stop = end if cut is None else min(end, start + cut)
        chunk = _CHUNK if not hub.bandwidth else max(1024, min(_CHUNK, int(hub.bandwidth / 20)))
        with (open(hub.root / path, "rb") if content is None else io.BytesIO(content)) as f:
            f.seek(start)
            pos = start
            while pos < stop:
                slow = pos - start < slow_bytes
                if slow:
                    time.sleep(every_s)
                data = f.read(1 if slow else min(chunk, stop - pos))
                hub._pacer.wait(len(data))
                hub._count(path, len(data))  # before the client can have it: a test sees every byte it got
                try:
                    self.wfile.write(data)
                except OSError:  # the client went away
                    hub._count(path, -len(data))
                    self.close_connection = True
                    return
                pos += len(data)
        if cut is not None and stop < end:
            self.close_connection = True
            _close_quietly(self.connection)

    # --- answers ------------------------------------------------------------------------------------

    def _json(self, method: str, payload, headers: dict | None = None, status: int = 200) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _error(self, method: str, e: _HubError) -> None:
        data = json.dumps({"error": e.message}).encode()
        self.send_response(e.status)
        if e.code is not None:
            self.send_header("X-Error-Code", e.code)
        self.send_header("X-Error-Message", e.message)
        if e.code == "EntryNotFound":
            self.send_header("X-Repo-Commit", COMMIT)
        for name, value in e.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


# --- a repo shaped like ILSVRC/imagenet-1k --------------------------------------------------------------

CLASS_NAMES = ("red disc", "orange checkerboard", "yellow-green stripes", "green bars", "spring-green rings",
               "cyan diagonals", "azure dots", "blue cross", "purple square", "pink triangle")
DEFAULT_FILES = {"train": 24, "validation": 8, "test": 4}
# Rows per file: enough that `--limit 100` of train and validation is a small part of the repo (1,408 rows,
# about 7 MB); pyarrow's first footer read takes the last 64 KiB of a file, so files are larger than that.
DEFAULT_ROWS = {"train": 48, "validation": 24, "test": 16}


class RepoFile(NamedTuple):
    path: str  # repo path, e.g. data/train-00003-of-00024.parquet
    split: str
    rows: int
    row_groups: int
    bytes: int


class RepoSummary(NamedTuple):
    files: list[RepoFile]  # sorted by path
    total_bytes: int
    class_names: list[str]

    def file(self, path: str) -> RepoFile:
        return next(f for f in self.files if f.path == path)

    def split_rows(self, split: str) -> int:
        return sum(f.rows for f in self.files if f.split == split)


def label_colour(label: int, num_classes: int = len(CLASS_NAMES)) -> tuple[int, int, int]:
    """The RGB fill of images of class `label`: hues evenly spaced, full saturation and value."""
    r, g, b = colorsys.hsv_to_rgb(label / num_classes, 1.0, 1.0)
    return round(255 * r), round(255 * g), round(255 * b)


def label_from_pixels(pixels, num_classes: int = len(CLASS_NAMES)) -> int:
    """The class whose `label_colour` is nearest to the mean colour of `pixels` ((h, w, 3) uint8)."""
    import numpy as np

    mean = np.asarray(pixels, np.float64).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.sum((mean - label_colour(c, num_classes)) ** 2) for c in range(num_classes)]))


def _jpeg(rng, label: int, num_classes: int) -> tuple[bytes, int, int]:
    """A small JPEG (sides 64..256 px) of the label's colour plus noise (about 5 KB at quality 80..95)."""
    import numpy as np
    from PIL import Image

    w, h = (int(v) for v in rng.integers(64, 257, size=2))
    base = np.array(label_colour(max(label, 0), num_classes), np.int16)
    pixels = np.clip(base + rng.integers(-12, 13, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue(), w, h


def make_imagenet_like_repo(folder: str | Path, *, files: dict[str, int] | None = None,
                            rows_per_file: dict[str, int] | None = None, row_group_size: int = 12,
                            num_classes: int = len(CLASS_NAMES), seed: int = 0, split_rows: dict[str, int] | None = None,
                            class_names: list[str] | None = None, shuffled_train: bool = False) -> RepoSummary:
    """Write parquet files laid out like ILSVRC/imagenet-1k under `folder`/data and summarise them.

    `data/{split}-{i:05d}-of-{n:05d}.parquet`, 36 files by default (24 train, 8 validation, 4 test; see
    DEFAULT_ROWS) in row groups of `row_group_size` rows;
    columns `image` = struct{bytes, path} and `label` = int64, with the `huggingface` schema metadata of
    `datasets.Features({"image": Image(), "label": ClassLabel(names)})`. Train rows are sorted by class
    within and across files (as if built class by class), validation labels are shuffled, test labels
    are -1. Each image's pixels are its class's `label_colour`; paths look like ImageNet's
    (`n90000003_10026.JPEG`, `ILSVRC2012_val_00000001.JPEG`, `ILSVRC2012_test_00000001.JPEG`).
    At ImageNet's shape (benchmarks/imagenet_rehearsal.py): `split_rows` gives a split's rows in all,
    spread over its files as evenly as they go (the first files one row more), `class_names` the
    ClassLabel names (ImageNet's 1,000 wnids; train paths then start with them), `shuffled_train` puts the
    train rows in random class order.
    """
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {**DEFAULT_FILES, **(files or {})}
    rows_per_file = {**DEFAULT_ROWS, **(rows_per_file or {})}
    if class_names is None and num_classes > len(CLASS_NAMES):
        raise ValueError(f"at most {len(CLASS_NAMES)} classes, got {num_classes}")
    names = list(class_names) if class_names is not None else list(CLASS_NAMES[:num_classes])
    num_classes = len(names)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    schema = features.arrow_schema
    rng = np.random.default_rng(seed)
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    summary = []
    for split, n_files in files.items():
        if split_rows is not None and split in split_rows:
            total = split_rows[split]
            counts = [total // n_files + (i < total % n_files) for i in range(n_files)]
        else:
            counts = [rows_per_file[split]] * n_files
            total = sum(counts)
        if split == "train":
            labels = np.arange(total) % num_classes
            labels = rng.permutation(labels) if shuffled_train else np.sort(labels)  # class by class
            ids = rng.choice(max(100_000, 2 * total), size=total, replace=False)
            prefixes = names if class_names is not None else [f"n{90_000_000 + c:08d}" for c in range(num_classes)]
            paths = [f"{prefixes[int(c)]}_{int(i)}.JPEG" for c, i in zip(labels, ids)]
        elif split == "validation":
            labels = rng.permutation(np.arange(total) % num_classes)
            paths = [f"ILSVRC2012_val_{j + 1:08d}.JPEG" for j in range(total)]
        else:
            labels = np.full(total, -1)
            paths = [f"ILSVRC2012_test_{j + 1:08d}.JPEG" for j in range(total)]
        starts = np.cumsum(counts) - counts
        for i in range(n_files):
            sl = slice(int(starts[i]), int(starts[i]) + counts[i])
            images = [{"bytes": _jpeg(rng, int(c), num_classes)[0], "path": p}
                      for c, p in zip(labels[sl], paths[sl])]
            table = pa.table({"image": images, "label": pa.array(labels[sl], pa.int64())}, schema=schema)
            rel = f"data/{split}-{i:05d}-of-{n_files:05d}.parquet"
            path = Path(folder) / rel
            pq.write_table(table, path, row_group_size=row_group_size)
            summary.append(RepoFile(rel, split, table.num_rows, pq.read_metadata(path).num_row_groups,
                                    path.stat().st_size))
    summary.sort(key=lambda f: f.path)  # as the Hub lists them
    return RepoSummary(summary, sum(f.bytes for f in summary), names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.hubstub", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="the repo's folder")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s of file content, whole server")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the one accepted token")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID)
    parser.add_argument("--make-repo", action="store_true", help="first write make_imagenet_like_repo into --root")
    args = parser.parse_args(argv)
    if args.make_repo:
        s = make_imagenet_like_repo(args.root)
        print(f"made {len(s.files)} files, {s.total_bytes} bytes in {args.root}", flush=True)
    hub = HubStub(args.root, repo_id=args.repo_id, token=args.token, bandwidth=args.bandwidth, port=args.port)
    print(f"serving {args.repo_id} from {args.root}: HF_ENDPOINT={hub.url}", flush=True)
    with hub:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
