"""Pictures for people, the one way alexprep and alextrain draw them: a matplotlib Figure rendered
with Agg (whatever backend pyplot chose elsewhere), saved as a PNG through `atomic_write`.

matplotlib is an optional extra: it is imported only when a figure is made, and its absence is an
ImportError carrying the caller's install hint.
"""

from __future__ import annotations

import os
from pathlib import Path

from prep.contract import atomic_write

DPI = 100  # figure inches x DPI = PNG pixels
VIZ_INSTALL = "pip install 'alexnet-shards[viz]'"  # the optional extra that brings matplotlib
SPLIT_COLOURS = {"train": "#3b75af", "validation": "#e1812c", None: "#55a868"}  # None: any other split


def new_figure(hint: str, inches: tuple[float, float]):
    """A matplotlib Figure of `inches` (width, height) drawn with Agg; ImportError(hint) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(hint) from e
    fig = Figure(figsize=inches, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out: str | os.PathLike) -> None:
    """Write the figure as a PNG through a temporary name, creating the folder if need be."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})  # zlib level 6: 4x slower, 13% smaller
