"""Text for people in one line: an exception's first line, a string cut to a width.

Standard library only and importing nothing of the project, so every module of prep/ and train/
(and the benchmarks) can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Iterator


def first_line(e: BaseException, secret: str | None = None) -> str:
    """The first line of `e`'s message, or its type's name where it has none (a 0-byte checkpoint's
    unpickling error, a bare TimeoutError); `secret` (a token) replaced by *** wherever it occurs."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line.replace(secret, "***") if secret else line


def causes(e: BaseException | None) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from or while handling, outermost first."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def fit(text: str, width: int) -> str:
    """`text` cut to at most `width` characters, the cut marked with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def fit_middle(text: str, width: int) -> str:
    """`text` cut in the middle to at most `width` characters, so a file name keeps its end."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]
