"""The minimum-throughput rule of remote reads: a transfer whose data comes, but slower than
`min_rate` bytes/s over a window of `window` seconds, counts as stalled, though no single read
waited long enough to time out (a trickle of a byte every few seconds would otherwise hold a read
for days).

One rule for alextrain's remote shards (train/remote.py) and alexprep's Hub transfers (prep/fetch.py).
Both count only the seconds spent waiting for data: time the reader spends elsewhere (decoding a batch,
writing what came to disk) is no fault of the transfer.
"""

from __future__ import annotations

import math


class TooSlow(TimeoutError):
    """A window of a transfer brought too few bytes; the message says the rule it broke."""


class MinimumRate:
    """Bytes a transfer gave and the seconds they took, checked window by window: TooSlow when a
    window of `window` seconds brought fewer than `min_rate` x `window` bytes, or fewer than all that
    remained of a transfer of known length (`remaining` bytes at the start; None: unknown)."""

    def __init__(self, min_rate: float, window: float, remaining: int | None = None):
        self.min_rate, self.window = min_rate, window
        self.remaining = math.inf if remaining is None else remaining
        self.bytes, self.seconds = 0, 0.0

    def add(self, n: int, seconds: float) -> None:
        """`n` more bytes came in `seconds` more seconds."""
        self.bytes, self.seconds = self.bytes + n, self.seconds + seconds
        if self.seconds < self.window:
            return
        if self.bytes < min(self.min_rate * self.seconds, self.remaining):
            raise TooSlow(f"under {self.min_rate / 1000:g} KB/s for {self.window:g} s")
        self.remaining -= self.bytes
        self.bytes, self.seconds = 0, 0.0
