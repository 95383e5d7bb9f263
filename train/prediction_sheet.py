"""The prediction sheet (`alextrain predict --sheet`, and an export's predictions.png): one cell per
picture, laid out like figure 4 of the AlexNet paper: the picture as the model saw it (the prepared
256 x 256 crop) under its file name, and a bar per top-k class with its probability.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from prep.contract import IMAGE_SIZE, short_name
from prep.figures import DPI, VIZ_INSTALL, new_figure, save_png
from prep.text import fit, fit_middle
from train.predict import load_image

SHEET_HINT = f"--sheet needs matplotlib: {VIZ_INSTALL}"

# In pixels: a title band, then one cell per picture, at most SHEET_MAX_COLS in a row. A cell, top to
# bottom: the file name, the 256 x 256 picture, a gap, one bar per class, a margin.
SHEET_TITLE_H = 50
SHEET_CELL_W, SHEET_NAME_H, SHEET_GAP, SHEET_BAR_H, SHEET_MARGIN = 320, 34, 8, 26, 12
SHEET_CELL_H0 = SHEET_NAME_H + IMAGE_SIZE + SHEET_GAP + SHEET_MARGIN  # cell height without its bars: 310
SHEET_MAX_COLS = 4
TRACK_COLOUR, TOP1_COLOUR, BAR_COLOUR = "#eeeeee", "#8fb3d9", "#c8d8ea"


def sheet_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of the sheet for n pictures: at most SHEET_MAX_COLS columns, rows as full as
    they can be (5 pictures: 2 rows of 3, not 4 + 1)."""
    rows = max(1, math.ceil(n / SHEET_MAX_COLS))
    return rows, max(1, math.ceil(n / rows))


def sheet_size(n: int, k: int) -> tuple[int, int]:
    """(width, height) in pixels of the sheet for n pictures with k classes each."""
    rows, cols = sheet_grid(n)
    return cols * SHEET_CELL_W, SHEET_TITLE_H + rows * (SHEET_CELL_H0 + SHEET_BAR_H * k)


def predict_sheet(
    results: list[list[tuple[str, float]]],
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Draw each picture of `paths` with a bar chart of its predictions to the PNG `out`.

    `results[i]` is picture i's classes as (name, probability), most probable first, as
    `train.predict.predict_images` returns them. Each picture is shown as the model gets it (RGB,
    shorter side 256, central 256 x 256 crop), one image pixel per PNG pixel. The PNG is
    `sheet_size(len(paths), k)` pixels, written through `atomic_write`. Raises ImportError(SHEET_HINT)
    without matplotlib, train.predict.ImageError for a picture that cannot be read.
    """
    if len(results) != len(paths) or not paths:
        raise ValueError(f"{len(results)} predictions for {len(paths)} pictures")
    k = max(len(top) for top in results)
    rows, cols = sheet_grid(len(paths))
    page_w, page_h = sheet_size(len(paths), k)
    cell_h = SHEET_CELL_H0 + SHEET_BAR_H * k
    fig = new_figure(SHEET_HINT, (page_w / DPI, page_h / DPI))
    title = fit_middle(title or f"top-{k} predictions", page_w // 10)  # 12 pt: at most about 10 px a character
    fig.text(0.5, 1 - SHEET_TITLE_H / 2 / page_h, title, ha="center", va="center", fontsize=12)

    def axes(left: int, top: int, width: int, height: int):
        """Axes `width` x `height` px whose top left corner is (left, top) px from the page's top left."""
        return fig.add_axes((left / page_w, 1 - (top + height) / page_h, width / page_w, height / page_h))

    for i, (path, top) in enumerate(zip(paths, results)):
        x0, y0 = (i % cols) * SHEET_CELL_W, SHEET_TITLE_H + (i // cols) * cell_h  # the cell's top left, px
        picture = axes(x0 + (SHEET_CELL_W - IMAGE_SIZE) // 2, y0 + SHEET_NAME_H, IMAGE_SIZE, IMAGE_SIZE)
        picture.imshow(load_image(path).permute(1, 2, 0).numpy(), interpolation="nearest")  # (256, 256, 3) uint8
        picture.set_axis_off()
        picture.set_title(fit_middle(Path(path).name, 38), fontsize=10, pad=6)

        # One bar per class over a grey track of the whole 0..100 % range, most probable at the top;
        # the name is written on the bar, the percentage at the right end of the track.
        bars = axes(x0 + SHEET_MARGIN, y0 + SHEET_NAME_H + IMAGE_SIZE + SHEET_GAP, SHEET_CELL_W - 2 * SHEET_MARGIN, SHEET_BAR_H * k)
        probs = [p for _, p in top] + [0.0] * (k - len(top))
        bars.barh(range(k), [1.0] * k, height=0.8, color=TRACK_COLOUR)
        bars.barh(range(k), probs, height=0.8, color=[TOP1_COLOUR] + [BAR_COLOUR] * (k - 1))
        for slot, (name, p) in enumerate(top):
            weight = "bold" if slot == 0 else "normal"
            bars.text(0.015, slot, fit(short_name(name), 34), va="center", ha="left", fontsize=9, fontweight=weight)
            bars.text(0.985, slot, f"{p:.1%}", va="center", ha="right", fontsize=9, fontweight=weight)
        bars.set_xlim(0, 1)
        bars.set_ylim(k - 0.5, -0.5)  # slot 0 at the top
        bars.set_axis_off()
    save_png(fig, out)
