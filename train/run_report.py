"""`alextrain report`: a run folder's metrics.jsonl (train/metrics.py) as a few lines of text
(`run_summary`, `format_summary`; no matplotlib needed) and as one page of six panels against epochs
(`render_report`): loss, top-1 and top-5 error, learning rate, images/s and the share of time spent
waiting for data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prep.figures import SPLIT_COLOURS, VIZ_INSTALL, new_figure, save_png
from train.metrics import MetricsError, read_metrics
from train.run_folder import CONFIG, METRICS, REPORT

REPORT_HINT = f"the report's plots need matplotlib: {VIZ_INSTALL} (or --no-plot for the text summary alone)"
REPORT_INCHES = (15.0, 9.0)  # 1500 x 900 px: one page of 2 x 3 panels
TRAIN_COLOUR, VAL_COLOUR = SPLIT_COLOURS["train"], SPLIT_COLOURS["validation"]  # as `alexprep stats --plot` draws the splits

# The records the report reads, and the fields it reads from each (validation numbers are optional).
REPORT_FIELDS = {
    "start": ("global_step", "steps_per_epoch"),
    "train_step": ("epoch", "step", "global_step", "images", "loss", "lr", "images_per_s", "data_wait"),
    "epoch": ("epoch", "train_loss", "train_top1_err", "train_top5_err", "images_per_s", "data_wait"),
}


class ReportError(Exception):
    """A run folder without readable metrics; the message names the file and why."""




def read_run(run_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """The records of RUN_DIR/metrics.jsonl in order (`train.metrics.read_metrics`), and RUN_DIR/config.json ({}
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
    """Plot the run in RUN_DIR to `out` (default RUN_DIR/report.png, REPORT_INCHES at 100 dpi =
    1500 x 900 px, written through `atomic_write`) and return its `summarize` dict with "plot" = the
    PNG's path. Panels, all against epochs: loss (each log interval and each epoch, train and
    validation), top-1 and top-5 error per epoch, learning rate, images/s and data-wait share.
    Raises ReportError for a folder without metrics, ImportError(REPORT_HINT) without matplotlib."""
    records, config = read_run(run_dir)
    summary = summarize(records, config, run_dir)
    out = Path(out) if out is not None else Path(run_dir) / REPORT
    fig = new_figure(REPORT_HINT, REPORT_INCHES)

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

    save_png(fig, out)
    return {**summary, "plot": str(out)}
