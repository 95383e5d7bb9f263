"""Pictures for people: `alextrain predict --sheet` and `alextrain report`.

`predict_sheet` draws one cell per picture, laid out like figure 4 of the AlexNet paper: the picture as
the model saw it (the prepared 256 x 256 crop) under its file name, and a bar per top-k class with its
probability. `render_report` draws a run folder's metrics.jsonl (written by train/loop.py) as one page
of six panels: loss, top-1 and top-5 error, learning rate, images/s and the share of time spent
waiting for data, all against epochs. `run_summary` and `format_summary` give the same run in a few
lines of text and need no matplotlib, which is an optional extra (imported only when drawing).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from prep.contract import IMAGE_SIZE, atomic_write
from train.loop import CONFIG, METRICS, MetricsError, read_metrics
from train.predict import load_image

REPORT_NAME = "report.png"
INSTALL = "pip install 'alexnet-shards[viz]'"
SHEET_HINT = f"--sheet needs matplotlib: {INSTALL}"
REPORT_HINT = f"the report's plots need matplotlib: {INSTALL} (or --no-plot for the text summary alone)"

PLOT_DPI = 100
# Prediction sheet, in pixels: a title band, then one cell per picture, at most SHEET_MAX_COLS in a
# row. A cell, top to bottom: the file name, the 256 x 256 picture, a gap, one bar per class, a margin.
SHEET_TITLE_H = 50
SHEET_CELL_W, SHEET_NAME_H, SHEET_GAP, SHEET_BAR_H, SHEET_MARGIN = 320, 34, 8, 26, 12
SHEET_CELL_H0 = SHEET_NAME_H + IMAGE_SIZE + SHEET_GAP + SHEET_MARGIN  # cell height without its bars: 310
SHEET_MAX_COLS = 4
TRACK_COLOUR, TOP1_COLOUR, BAR_COLOUR = "#eeeeee", "#8fb3d9", "#c8d8ea"
# Report: one page of 2 x 3 panels.
REPORT_INCHES = (15.0, 9.0)  # 1500 x 900 px
TRAIN_COLOUR, VAL_COLOUR = "#3b75af", "#e1812c"  # the colours `alexprep stats --plot` gives the two splits


# The records the report reads, and the fields it reads from each (validation numbers are optional).
REPORT_FIELDS = {
    "start": ("global_step", "steps_per_epoch"),
    "train_step": ("epoch", "step", "global_step", "images", "loss", "lr", "images_per_s", "data_wait"),
    "epoch": ("epoch", "train_loss", "train_top1_err", "train_top5_err", "images_per_s", "data_wait"),
}


class ReportError(Exception):
    """A run folder without readable metrics; the message names the file and why."""


def _figure(hint: str, inches: tuple[float, float]):
    """A matplotlib Figure drawn with Agg whatever pyplot's backend; ImportError(hint) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(hint) from e
    fig = Figure(figsize=inches, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out: str | os.PathLike) -> None:
    """Write the figure as a PNG through a temporary name, creating the folder if need be."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=PLOT_DPI, pil_kwargs={"compress_level": 1})  # zlib level 6: several times slower


def _fit(text: str, width: int) -> str:
    """`text` cut to at most `width` characters, the cut marked with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit_middle(text: str, width: int) -> str:
    """`text` cut in the middle to at most `width` characters, so a file name keeps its end."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _short_name(name: str) -> str:
    """ImageNet names list synonyms ('tench, Tinca tinca'); the first one is enough on a picture."""
    return name.split(",", 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# predict --sheet


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
    fig = _figure(SHEET_HINT, (page_w / PLOT_DPI, page_h / PLOT_DPI))
    title = _fit_middle(title or f"top-{k} predictions", page_w // 10)  # 12 pt: at most about 10 px a character
    fig.text(0.5, 1 - SHEET_TITLE_H / 2 / page_h, title, ha="center", va="center", fontsize=12)

    def axes(left: int, top: int, width: int, height: int):
        """Axes `width` x `height` px whose top left corner is (left, top) px from the page's top left."""
        return fig.add_axes((left / page_w, 1 - (top + height) / page_h, width / page_w, height / page_h))

    for i, (path, top) in enumerate(zip(paths, results)):
        x0, y0 = (i % cols) * SHEET_CELL_W, SHEET_TITLE_H + (i // cols) * cell_h  # the cell's top left, px
        picture = axes(x0 + (SHEET_CELL_W - IMAGE_SIZE) // 2, y0 + SHEET_NAME_H, IMAGE_SIZE, IMAGE_SIZE)
        picture.imshow(load_image(path).permute(1, 2, 0).numpy(), interpolation="nearest")  # (256, 256, 3) uint8
        picture.set_axis_off()
        picture.set_title(_fit_middle(Path(path).name, 38), fontsize=10, pad=6)

        # One bar per class over a grey track of the whole 0..100 % range, most probable at the top;
        # the name is written on the bar, the percentage at the right end of the track.
        bars = axes(x0 + SHEET_MARGIN, y0 + SHEET_NAME_H + IMAGE_SIZE + SHEET_GAP, SHEET_CELL_W - 2 * SHEET_MARGIN, SHEET_BAR_H * k)
        probs = [p for _, p in top] + [0.0] * (k - len(top))
        bars.barh(range(k), [1.0] * k, height=0.8, color=TRACK_COLOUR)
        bars.barh(range(k), probs, height=0.8, color=[TOP1_COLOUR] + [BAR_COLOUR] * (k - 1))
        for slot, (name, p) in enumerate(top):
            weight = "bold" if slot == 0 else "normal"
            bars.text(0.015, slot, _fit(_short_name(name), 34), va="center", ha="left", fontsize=9, fontweight=weight)
            bars.text(0.985, slot, f"{p:.1%}", va="center", ha="right", fontsize=9, fontweight=weight)
        bars.set_xlim(0, 1)
        bars.set_ylim(k - 0.5, -0.5)  # slot 0 at the top
        bars.set_axis_off()
    _save(fig, out)


# ---------------------------------------------------------------------------------------------
# report: reading the run


def read_run(run_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """The records of RUN_DIR/metrics.jsonl in order (`train.loop.read_metrics`), and RUN_DIR/config.json ({}
    where missing). A missing file, a file without training steps, or an unreadable config.json
    raises ReportError."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS
    if not path.is_file():
        raise ReportError(f"{path}: no metrics here; is {run_dir} a run folder (alextrain --out)?")
    try:
        records = [r for r in read_metrics(path, REPORT_FIELDS) if r["kind"] in REPORT_FIELDS]
    except MetricsError as e:
        raise ReportError(str(e)) from None
    if not any(r["kind"] == "train_step" for r in records):
        raise ReportError(f"{path}: no training steps logged yet")
    config_path, config = run_dir / CONFIG, {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ReportError(f"{config_path}: unreadable ({e})") from None
    return records, config


def _kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def summarize(records: list[dict], config: dict, run_dir: str | os.PathLike = "") -> dict:
    """The run in numbers (JSON-ready): progress, time and speed over all logged steps, the last
    epoch, and the best epoch = the lowest validation top-1 error (the first, on a tie, as the
    trainer's best.pt). Errors are fractions, times seconds; None where there is no such epoch."""
    steps, epochs = _kind(records, "train_step"), _kind(records, "epoch")
    evaluated = [r for r in epochs if "val_top1_err" in r]
    seconds = [r["images"] / r["images_per_s"] for r in steps]  # each log interval's length
    images, total = sum(r["images"] for r in steps), sum(seconds)
    best = min(evaluated, key=lambda r: r["val_top1_err"], default=None)  # min keeps the first of equals
    best5 = min(evaluated, key=lambda r: r["val_top5_err"], default=None)
    last = epochs[-1] if epochs else None
    return {
        "run": str(run_dir),
        "arch": config.get("arch"),
        "epochs_done": len(epochs),
        "epochs": config.get("epochs"),
        "steps": steps[-1]["global_step"],
        "resumes": sum(1 for r in _kind(records, "start") if r["global_step"] > 0),
        "images": images,
        "train_seconds": total,
        "images_per_s": images / total,
        "data_wait": sum(r["data_wait"] * s for r, s in zip(steps, seconds)) / total,
        "last_epoch": _field(last, "epoch"),
        "last_train_loss": _field(last, "train_loss"),
        "last_val_top1_err": _field(last, "val_top1_err"),
        "last_val_top5_err": _field(last, "val_top5_err"),
        "best_epoch": _field(best, "epoch"),
        "best_val_top1_err": _field(best, "val_top1_err"),
        "best_val_top5_err": _field(best, "val_top5_err"),
        "lowest_val_top5_err": _field(best5, "val_top5_err"),
        "lowest_val_top5_epoch": _field(best5, "epoch"),
    }


def _field(record: dict | None, key: str):
    """record[key], or None where there is no such record or field (an epoch without evaluation)."""
    return None if record is None else record.get(key)


def run_summary(run_dir: str | os.PathLike) -> dict:
    """`summarize` of the run in RUN_DIR (no matplotlib needed)."""
    records, config = read_run(run_dir)
    return summarize(records, config, run_dir)


def _duration(seconds: float) -> str:
    """4.2 -> '4.2 s', 125 -> '2 min 05 s', 7384 -> '2 h 03 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_summary(summary: dict) -> str:
    """A few lines of text for people: progress, best epoch, last epoch, time and speed."""
    s = summary
    planned = f" of {s['epochs']}" if s["epochs"] else ""
    resumed = f", resumed {s['resumes']}x" if s["resumes"] else ""
    lines = [f"{s['run']}: {s['arch'] or 'unknown model'}, {s['epochs_done']}{planned} epochs done, "
             f"{s['steps']:,} steps, {s['images']:,} training images{resumed}"]
    if s["best_epoch"] is None:
        lines.append("best epoch: none yet (no validation evaluation)")
    else:
        lines.append(f"best epoch {s['best_epoch']} (lowest validation top-1 error): top-1 error {s['best_val_top1_err']:.2%}, "
                     f"top-5 error {s['best_val_top5_err']:.2%}")
        if s["lowest_val_top5_epoch"] != s["best_epoch"]:
            lines[-1] += f"; lowest top-5 error {s['lowest_val_top5_err']:.2%} in epoch {s['lowest_val_top5_epoch']}"
    if s["last_epoch"] is not None:
        line = f"last epoch {s['last_epoch']}: train loss {s['last_train_loss']:.3f}"
        if s["last_val_top1_err"] is not None:
            line += f", validation top-1 / top-5 error {s['last_val_top1_err']:.2%} / {s['last_val_top5_err']:.2%}"
        lines.append(line)
    lines.append(f"training time {_duration(s['train_seconds'])} (steps only, evaluation not counted): "
                 f"{s['images_per_s']:,.1f} images/s, {s['data_wait']:.1%} of it waiting for data")
    if s.get("plot"):
        lines.append(f"plots: {s['plot']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report: the plots


def _headline(summary: dict) -> str:
    """The summary in one line, for the top of the report."""
    s, parts = summary, []
    if s["best_epoch"] is not None:
        parts.append(f"best epoch {s['best_epoch']}: validation top-1 error {s['best_val_top1_err']:.2%}, "
                     f"top-5 {s['best_val_top5_err']:.2%}")
    if s["last_epoch"] is not None:
        parts.append(f"last epoch {s['last_epoch']}: train loss {s['last_train_loss']:.3f}")
    parts.append(f"{s['steps']:,} steps, {s['images']:,} images in {_duration(s['train_seconds'])} of training steps")
    return "   |   ".join(parts)


def _step_positions(records: list[dict]) -> list[float]:
    """Each train_step record's place in epochs (2.5 = half-way through the third epoch), with the
    steps per epoch of the run (or resumed run) that logged it."""
    xs, per_epoch = [], 1
    for r in records:
        if r["kind"] == "start":
            per_epoch = r["steps_per_epoch"]
        elif r["kind"] == "train_step":
            xs.append(r["epoch"] - 1 + r["step"] / per_epoch)
    return xs


def _style(ax, title: str, ylabel: str, last_x: float, legend: bool = True) -> None:
    """Title, labels, grid and legend; the x axis from 0 to `last_x` epochs (at least one), whole epochs ticked."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1.02 * max(1.0, last_x))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    if legend:
        ax.legend(fontsize=8, loc="best")


def _plot_error(ax, epochs: list[dict], k: int, best: dict | None, last_x: float) -> None:
    """Train and validation top-k error per epoch, in %, the best epoch's validation point ringed."""
    if not epochs:
        ax.text(0.5, 0.5, "no epoch finished yet", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_ylim(0, 103)
        _style(ax, f"top-{k} error", "error (%)", last_x, legend=False)
        return
    x = [r["epoch"] for r in epochs]
    ax.plot(x, [100 * r[f"train_top{k}_err"] for r in epochs], "o-", color=TRAIN_COLOUR, ms=4, label="train (augmented crops)")
    val = [r for r in epochs if f"val_top{k}_err" in r]
    ax.plot([r["epoch"] for r in val], [100 * r[f"val_top{k}_err"] for r in val], "s-", color=VAL_COLOUR, ms=4,
            label="validation (centre crop)")
    if best is not None:
        ax.plot(best["epoch"], 100 * best[f"val_top{k}_err"], "o", ms=12, mfc="none", mec="black",
                label=f"best epoch {best['epoch']}: {best[f'val_top{k}_err']:.1%}")
    highest = max([100 * r[f"train_top{k}_err"] for r in epochs] + [100 * r[f"val_top{k}_err"] for r in val], default=100)
    ax.set_ylim(0, min(100, 1.1 * highest) + 3)  # room for the markers above the highest point
    _style(ax, f"top-{k} error", "error (%)", last_x)


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """Plot the run in RUN_DIR to `out` (default RUN_DIR/report.png, REPORT_INCHES x PLOT_DPI =
    1500 x 900 px, written through `atomic_write`) and return its `summarize` dict with "plot" = the
    PNG's path. Panels, all against epochs: loss (each log interval and each epoch, train and
    validation), top-1 and top-5 error per epoch, learning rate, images/s and data-wait share.
    Raises ReportError for a folder without metrics, ImportError(REPORT_HINT) without matplotlib."""
    records, config = read_run(run_dir)
    summary = summarize(records, config, run_dir)
    out = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    fig = _figure(REPORT_HINT, REPORT_INCHES)

    steps, epochs = _kind(records, "train_step"), _kind(records, "epoch")
    xs, ex = _step_positions(records), [r["epoch"] for r in epochs]
    last_x = max(xs + ex)
    evaluated = [r for r in epochs if "val_top1_err" in r]
    best = next((r for r in evaluated if r["epoch"] == summary["best_epoch"]), None)

    head = f"{summary['run']} - {summary['arch'] or 'unknown model'}"
    if config:
        head += (f", batch {config['batch_size']} per rank, lr {config['lr']:g} ({config['schedule']}), "
                 f"{summary['epochs_done']} of {config['epochs']} epochs")
    fig.suptitle(head, fontsize=13, y=0.975)
    fig.text(0.5, 0.93, _headline(summary), ha="center", fontsize=10, color="#444444")
    grid = fig.add_gridspec(2, 3, left=0.06, right=0.985, top=0.87, bottom=0.07, wspace=0.22, hspace=0.35)
    loss, top1, top5, lr, speed, wait = (fig.add_subplot(grid[i, j]) for i in range(2) for j in range(3))

    resumed = [r["global_step"] / r["steps_per_epoch"] for r in _kind(records, "start") if r["global_step"] > 0]
    for ax in (loss, lr, speed, wait):  # where a resumed run picked up
        for i, x in enumerate(resumed):
            ax.axvline(x, color="grey", ls=":", lw=1, label="resumed" if i == 0 else None)

    loss.plot(xs, [r["loss"] for r in steps], "-", color=TRAIN_COLOUR, alpha=0.35, lw=1, label="train, each log interval")
    if epochs:
        loss.plot(ex, [r["train_loss"] for r in epochs], "o-", color=TRAIN_COLOUR, ms=4, label="train, epoch mean")
    if evaluated:
        loss.plot([r["epoch"] for r in evaluated], [r["val_loss"] for r in evaluated], "s-", color=VAL_COLOUR, ms=4, label="validation")
    _style(loss, "loss", "cross-entropy (nats)", last_x)

    _plot_error(top1, epochs, 1, best, last_x)
    _plot_error(top5, epochs, 5, best, last_x)

    # A record's lr is that of its interval's last step: drawn as a step over the interval it closes.
    lr.step([0.0] + xs, [steps[0]["lr"]] + [r["lr"] for r in steps], where="pre", color=TRAIN_COLOUR, lw=1.5)
    rates = [r["lr"] for r in steps if r["lr"] > 0]
    # The tenfold drops of a plateau or step schedule read best on a log scale, a cosine's curve on a linear one.
    if config.get("schedule") != "cosine" and rates and max(rates) / min(rates) > 20:
        lr.set_yscale("log")
    else:
        lr.set_ylim(0, 1.15 * max(r["lr"] for r in steps))
    _style(lr, "learning rate", "learning rate", last_x, legend=False)

    speed.plot(xs, [r["images_per_s"] for r in steps], "-", color=TRAIN_COLOUR, alpha=0.35, lw=1, label="each log interval")
    if epochs:
        speed.plot(ex, [r["images_per_s"] for r in epochs], "o-", color=TRAIN_COLOUR, ms=4, label="epoch")
    speed.set_ylim(bottom=0)
    _style(speed, f"training speed (mean {summary['images_per_s']:,.1f} images/s)", "images/s, all ranks", last_x)

    wait.plot(xs, [100 * r["data_wait"] for r in steps], "-", color=TRAIN_COLOUR, alpha=0.35, lw=1, label="each log interval")
    if epochs:
        wait.plot(ex, [100 * r["data_wait"] for r in epochs], "o-", color=TRAIN_COLOUR, ms=4, label="epoch")
    wait.set_ylim(0, min(100, max(10, 1.15 * max(100 * r["data_wait"] for r in steps))))
    _style(wait, f"waiting for data (mean {summary['data_wait']:.1%} of step time)", "share of step time (%)", last_x)

    _save(fig, out)
    return {**summary, "plot": str(out)}
