"""Reading files at http(s) and `pipe:` URLs: shards and the folder's two small files from anywhere.

`open_file` opens a local path or a URL for buffered reading. A URL is read through `RemoteFile`,
which puts a timeout on every read and a minimum throughput on the whole (prep.throughput), and
opens the source again where it stopped after a failure (an http Range request, or the pipe command
run again with the bytes already read skipped), a bounded number of times (`RemoteReads`); then one
RemoteReadError names the URL. `pipe:` runs its text as a shell command: trusted input only.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from prep.text import first_line
from prep.throughput import MinimumRate


class RemoteReadError(Exception):
    """A remote file that gave no data within the timeout, or failed, on every try; the message starts
    with its URL."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://", "pipe:"))


def join(location: str, name: str) -> str:
    """The path or URL of file `name` under `location`. A URL prefix may hold `{}` where the name
    goes (`pipe:aws s3 cp s3://bucket/shards/{} -`); otherwise the name is appended after a '/'."""
    if "{}" in location:
        return location.replace("{}", name)
    if is_url(location):
        return location + name if location.endswith("/") else f"{location}/{name}"
    return str(Path(location) / name)


@dataclass(frozen=True)
class RemoteReads:
    """When reads of http(s) and pipe: URLs give up (a policy, not a measurement): every read waits at
    most `timeout` seconds for data, and data that comes slower than `min_rate` bytes/s over
    `rate_window` seconds spent waiting for it (a trickle, which no single read's timeout catches)
    counts as stalled too; a file that stalls, fails or ends early (an http connection closed before
    its Content-Length) is opened again where it stopped, at most `retries` times, `backoff` seconds
    after the first failure and twice as long after each next one; then RemoteReadError names the URL."""

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    min_rate: float = 10_000.0  # bytes/s
    rate_window: float = 60.0  # seconds of waiting for data (time the reader spends elsewhere does not count)


class _Pipe:
    """The standard output of a shell command, read with a timeout per read. The command runs in its
    own process group, so closing kills it and everything it started."""

    def __init__(self, command: str, timeout: float):
        self.timeout, self.stderr = timeout, tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True)

    def readinto(self, buffer) -> int:
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"no data for {self.timeout:g} s")
        data = os.read(fd, len(buffer))
        buffer[: len(data)] = data
        if not data:
            try:
                status = self.process.wait(self.timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"output ended but the command did not exit within {self.timeout:g} s") from None
            if status != 0:
                self.stderr.seek(0)
                said = self.stderr.read().decode(errors="replace").strip().splitlines()
                raise OSError(f"exit status {status}" + (f": {said[-1][:200]}" if said else ""))
        return len(data)

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


class _Http:
    """The body of an http(s) GET from byte `offset` on, with a socket timeout per read."""

    def __init__(self, url: str, offset: int, timeout: float):
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        self.timeout = timeout
        self.response = urllib.request.urlopen(request, timeout=timeout)
        self.skip = offset if offset and self.response.status != 206 else 0  # a server without ranges sends it all

    def readinto(self, buffer) -> int:
        # read1: what one receive brings, so that a trickle shows (readinto waits to fill the whole buffer).
        try:
            data = self.response.read1(len(buffer))
        except TimeoutError:
            raise TimeoutError(f"no data for {self.timeout:g} s") from None
        if not data and self.response.length:  # http.client ends the body quietly where the server closed early
            raise ConnectionError(f"connection closed {self.response.length} bytes before the end of the body")
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.response.close()


class RemoteFile(io.RawIOBase):
    """A read-only file over an http(s) or pipe: URL that retries as `remote` says (see RemoteReads)."""

    def __init__(self, url: str, remote: RemoteReads):
        self.url, self.remote = url, remote
        self.offset, self.failures, self.source, self.rate = 0, 0, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.source is None:
                    self.source = self._open()
                    self.rate = MinimumRate(self.remote.min_rate, self.remote.rate_window)
                started = time.monotonic()
                n = self.source.readinto(buffer)
                self.rate.add(n, time.monotonic() - started)
                self.offset += n
                return n
            except (OSError, HTTPException) as e:  # TimeoutError (TooSlow too) and urllib's errors are OSErrors
                self._drop_source()
                final = isinstance(e, urllib.error.HTTPError) and e.code < 500  # 404 stays 404
                if final or self.failures >= self.remote.retries:
                    tries = f" ({self.failures + 1} tries)" if self.failures else ""
                    raise RemoteReadError(f"{self.url}: {_reason(e)}{tries}") from None
                time.sleep(self.remote.backoff * 2**self.failures)
                self.failures += 1

    def _open(self):
        """The source from self.offset on."""
        if self.url.startswith("pipe:"):
            source = _Pipe(self.url[len("pipe:") :], self.remote.timeout)
            skip = self.offset
        else:
            source = _Http(self.url, self.offset, self.remote.timeout)
            skip = source.skip
        try:
            scratch = bytearray(1 << 16)
            while skip:
                n = source.readinto(memoryview(scratch)[: min(skip, len(scratch))])
                if n == 0:
                    raise OSError(f"ended at byte {self.offset - skip} of the {self.offset} read before")
                skip -= n
        except BaseException:
            source.close()
            raise
        return source

    def _drop_source(self) -> None:
        if self.source is not None:
            with contextlib.suppress(OSError):
                self.source.close()
            self.source = None

    def close(self) -> None:
        self._drop_source()
        super().close()


def _reason(e: BaseException) -> str:
    """What went wrong, in the words of the failure under urllib's wrapping."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return first_line(e)


def open_file(url: str, remote: RemoteReads) -> BinaryIO:
    """A local path or an http(s) / pipe: URL, opened for buffered reading."""
    if is_url(url):
        return io.BufferedReader(RemoteFile(url, remote), 1 << 20)
    return open(url, "rb")


def read_bytes(url: str, remote: RemoteReads) -> bytes:
    """The bytes of a small file at a path or URL; RemoteReadError naming the URL."""
    with open_file(url, remote) as f:
        return f.read()
