"""`alextrain report` (train/run_report.py) and `alextrain predict --sheet` (train/prediction_sheet.py) on a real run.

One short real training run per session (the trainer itself, on the demo shards: 2 epochs, then resumed
for a third) gives the metrics.jsonl, config.json and checkpoints every test here reads. The pictures
are checked as PNG files of an exact size, and for what they must show: each prediction sheet holds
every picture pixel for pixel and bars as long as the probabilities; the report's summary equals what
metrics.jsonl says.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from prep import synthetic
from train import checkpoint, loop
from train.cli import main
from train.config import TrainConfig
from train.predict import format_predictions, load_image, predict_files
from train.prediction_sheet import SHEET_HINT, predict_sheet, sheet_grid, sheet_size
from train.run_folder import REPORT as REPORT_NAME
from train.run_report import REPORT_HINT, ReportError, format_summary, render_report, run_summary

BATCH, STEPS, EPOCHS = 8, 2, 3  # per step, per epoch, in all (the last one after a resume)


@pytest.fixture(scope="session")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A real run folder: 2 epochs of 2 steps, then resumed for a third (read-only: copy to change)."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(shards=str(demo_shards), out=str(out), arch="alexnet-tv", crop_size=64, batch_size=BATCH,
                         epochs=EPOCHS - 1, steps_per_epoch=STEPS, log_every=1, workers=0, shuffle_buffer=32, device="cpu")
    loop.train(config)
    loop.train(checkpoint.config_for_resume(out, {"epochs": EPOCHS}))
    return out


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> list[Path]:
    """Five pictures a user might have: the synthetic source's JPEGs and PNGs, of several sizes and shapes."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for key, label in synthetic.items("validation", per_class=1)[:5]:
        data = synthetic.image_bytes(key, label)
        path = folder / (key + (".png" if data.startswith(b"\x89PNG") else ".jpg"))
        path.write_bytes(data)
        paths.append(path)
    return paths


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def png_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG's (H, W, 3) pixels, after checking it is a PNG of `size` (width, height) with content."""
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", size)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, lines, pictures: not blank
    return pixels


def has_colour(pixels: np.ndarray, hex_colour: str, at_least: int) -> bool:
    rgb = [int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)]
    return (np.abs(pixels - rgb).sum(axis=2) < 6).sum() >= at_least


# ---------------------------------------------------------------------------------------------
# report


@pytest.mark.slow
def test_report_of_a_real_run(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    summary = render_report(run)
    pixels = png_pixels(run / REPORT_NAME, (1500, 900))
    assert has_colour(pixels, "#3b75af", 500) and has_colour(pixels, "#e1812c", 200)  # train and validation curves
    assert not list(run.glob(".tmp-*"))  # written through a temporary name, nothing left behind

    # The summary against metrics.jsonl, read here independently.
    records = metrics(run)
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "train_step"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3] and len(steps) == EPOCHS * STEPS
    best = epochs[0]
    for r in epochs[1:]:
        best = r if r["val_top1_err"] < best["val_top1_err"] else best
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_val_top1_err"] == best["val_top1_err"] == epochs[-1]["best_top1_err"]  # the trainer's own best
    assert summary["best_val_top5_err"] == best["val_top5_err"]
    assert summary["lowest_val_top5_err"] == min(r["val_top5_err"] for r in epochs)
    assert (summary["last_epoch"], summary["last_train_loss"], summary["last_val_top1_err"], summary["last_val_top5_err"]) == (
        3, epochs[-1]["train_loss"], epochs[-1]["val_top1_err"], epochs[-1]["val_top5_err"])
    assert (summary["epochs_done"], summary["epochs"], summary["steps"], summary["resumes"]) == (3, 3, 6, 1)
    assert summary["images"] == EPOCHS * STEPS * BATCH == 48
    assert summary["train_seconds"] == pytest.approx(sum(r["epoch_time"] for r in epochs), rel=1e-9)
    assert summary["images_per_s"] == pytest.approx(48 / sum(r["epoch_time"] for r in epochs), rel=1e-9)
    waits = sum(r["data_wait"] * r["epoch_time"] for r in epochs)
    assert summary["data_wait"] == pytest.approx(waits / summary["train_seconds"], rel=1e-9)
    assert summary["plot"] == str(run / REPORT_NAME) and summary["arch"] == "alexnet-tv"

    text = format_summary(summary)
    assert text.splitlines()[0] == f"{run}: alexnet-tv, 3 of 3 epochs done, 6 steps, 48 training images, resumed 1x"
    assert text.splitlines()[1].startswith(
        f"best epoch {best['epoch']} (lowest validation top-1 error): top-1 error {best['val_top1_err']:.2%}, "
        f"top-5 error {best['val_top5_err']:.2%}")
    assert text.splitlines()[-1] == f"plots: {run / REPORT_NAME}"


@pytest.mark.slow
def test_summary_without_matplotlib(trained_run, pictures, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    summary = run_summary(trained_run)
    assert summary["images"] == 48 and "plot" not in summary
    assert format_summary(summary).count("\n") == 3  # run, best epoch, last epoch, time: no plots line
    with pytest.raises(ImportError) as e:
        render_report(trained_run, tmp_path / "r.png")
    assert str(e.value) == REPORT_HINT
    with pytest.raises(ImportError) as e:
        predict_sheet([[("red disc", 1.0)]], pictures[:1], tmp_path / "s.png")
    assert str(e.value) == SHEET_HINT
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_metrics_that_cannot_be_read(trained_run, tmp_path):
    with pytest.raises(ReportError, match=f"^{tmp_path / 'metrics.jsonl'}: no metrics here; is {tmp_path} a run folder"):
        run_summary(tmp_path)

    run = shutil.copytree(trained_run, tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    expected = run_summary(run)
    (run / "metrics.jsonl").write_text("".join(lines) + lines[-1][:25])  # a record half-written by a live run
    assert run_summary(run) == expected

    (run / "metrics.jsonl").write_text("".join(lines[:4]) + "{oops\n" + "".join(lines[4:]))
    with pytest.raises(ReportError, match=r"metrics.jsonl: line 5 is not a metrics record: '\{oops'$"):
        run_summary(run)

    (run / "metrics.jsonl").write_text(lines[0])  # the start record alone
    with pytest.raises(ReportError, match=r"metrics.jsonl: no training steps logged yet$"):
        render_report(run)
    assert not (run / REPORT_NAME).exists()


def test_a_torn_last_line_is_left_out_whatever_bytes_it_holds(tmp_path):
    """A killed run's last line may end anywhere, with any bytes the file system left (resume drops it
    too); a broken line that ends in a newline is still an error."""
    start = {"kind": "start", "global_step": 0, "steps_per_epoch": 2}
    step = {"kind": "train_step", "epoch": 1, "step": 1, "global_step": 1, "loss": 2.0, "lr": 0.01, "images": 8,
            "images_per_s": 4.0, "data_wait": 0.25}
    whole = (json.dumps(start) + "\n" + json.dumps(step) + "\n").encode()
    for torn in (b'{"kind": "train_st', b'{"kind": "tr\xff\xfe\x80', b"\x00" * 300):
        (tmp_path / "metrics.jsonl").write_bytes(whole + torn)
        summary = run_summary(tmp_path)
        assert (summary["steps"], summary["images"], summary["data_wait"]) == (1, 8, 0.25)
    (tmp_path / "metrics.jsonl").write_bytes(whole + b"\xff{oops\n" + json.dumps(step).encode() + b"\n")
    with pytest.raises(ReportError, match=r"metrics.jsonl: line 3 is not a metrics record: '\ufffd\{oops'$"):
        run_summary(tmp_path)


def test_a_record_without_the_fields_the_report_reads_is_one_line(tmp_path):
    """A hand-edited metrics.jsonl: a record of a kind the report reads that lacks a number it reads
    is an error naming the file and line, not a KeyError."""
    start = {"kind": "start", "global_step": 0, "steps_per_epoch": 2}
    step = {"kind": "train_step", "epoch": 1, "step": 1, "global_step": 1, "loss": 2.0, "lr": 0.01, "images": 8,
            "images_per_s": 4.0, "data_wait": 0.25}
    path = tmp_path / "metrics.jsonl"
    for record, missing in (({"kind": "train_step"}, "epoch, step, global_step, images, loss, lr, images_per_s, data_wait"),
                            ({**step, "images": "8"}, "images"), ({"kind": "start", "global_step": 0}, "steps_per_epoch")):
        path.write_text("".join(json.dumps(r) + "\n" for r in (start, step, record, step)))
        with pytest.raises(ReportError) as e:
            run_summary(tmp_path)
        assert str(e.value) == f"{path}: line 3: a {record['kind']} record without a number for {missing}"
    path.write_text("".join(json.dumps(r) + "\n" for r in (start, step, {"kind": "note", "text": "kinds the report does not read pass"})))
    assert run_summary(tmp_path)["steps"] == 1


@pytest.mark.slow
def test_summary_of_a_run_killed_in_its_first_epoch(trained_run, tmp_path):
    """Steps but no epoch record yet: the numbers so far, and no best epoch."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in (trained_run / "metrics.jsonl").read_text().splitlines()[:3]))
    summary = run_summary(run)
    assert (summary["steps"], summary["images"], summary["epochs_done"], summary["arch"]) == (2, 16, 0, None)
    assert summary["best_epoch"] is summary["last_epoch"] is None
    assert format_summary(summary).splitlines()[:2] == [
        f"{run}: unknown model, 0 epochs done, 2 steps, 16 training images", "best epoch: none yet (no validation evaluation)"]


# ---------------------------------------------------------------------------------------------
# predict --sheet


def test_sheet_layout():
    assert [sheet_grid(n) for n in range(1, 10)] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 3), (2, 3), (2, 4), (2, 4), (3, 3)]
    assert sheet_size(5, 5) == (960, 50 + 2 * 440) and sheet_size(1, 3) == (320, 50 + 388)


@pytest.mark.slow
def test_prediction_sheet(trained_run, pictures, tmp_path):
    predictions = predict_files(trained_run / "best.pt", pictures, device="cpu")
    out = tmp_path / "sheet.png"
    predict_sheet(predictions, pictures, out, title="top-5 predictions of best.pt")
    pixels = png_pixels(out, (960, 930))
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left
    for i, (path, top) in enumerate(zip(pictures, predictions)):
        row, col = divmod(i, 3)
        left, top_px = 320 * col, 50 + 440 * row  # the cell's top left corner
        # the picture as the model gets it, pixel for pixel, under its file name
        shown = pixels[top_px + 34 : top_px + 34 + 256, left + 32 : left + 32 + 256]
        assert np.array_equal(shown, load_image(path).permute(1, 2, 0).numpy())
        # the most probable class's bar: as long as its probability on a 296 px track
        band = pixels[top_px + 298 : top_px + 298 + 26, left + 12 : left + 308]
        bar = (np.abs(band - [0x8F, 0xB3, 0xD9]).sum(axis=2) < 6).sum(axis=1).max()
        assert abs(bar - top[0][1] * 296) <= 1.5, (path.name, bar, top[0])


@pytest.mark.slow
def test_sheet_of_one_picture_and_three_classes(trained_run, pictures, tmp_path):
    predictions = predict_files(trained_run / "best.pt", pictures[-1:], device="cpu", k=3)
    assert len(predictions[0]) == 3
    predict_sheet(predictions, pictures[-1:], tmp_path / "one.png")
    png_pixels(tmp_path / "one.png", (320, 438))
    with pytest.raises(ValueError, match="2 predictions for 1 pictures"):
        predict_sheet(predictions * 2, pictures[-1:], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# command line: `alextrain report` and `alextrain predict --sheet`


def alextrain(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_report_command(trained_run, tmp_path, monkeypatch):
    run = shutil.copytree(trained_run, tmp_path / "run")
    summary = run_summary(run)
    result = alextrain("report", str(run), "--no-plot")
    assert result.exit_code == 0 and result.stdout == format_summary(summary) + "\n"
    result = alextrain("report", str(run), "--no-plot", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == summary
    assert not (run / REPORT_NAME).exists()

    out = tmp_path / "plots" / "curves.png"  # a folder that does not exist yet
    result = alextrain("report", str(run), "--out", str(out))
    assert result.exit_code == 0 and result.stdout == format_summary({**summary, "plot": str(out)}) + "\n"
    png_pixels(out, (1500, 900))

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = alextrain("report", str(run))
    assert (result.exit_code, result.output) == (1, f"Error: {REPORT_HINT}\n")
    assert alextrain("report", str(run), "--no-plot").stdout == format_summary(summary) + "\n"
    result = alextrain("report", str(tmp_path))
    expected = f"Error: {tmp_path / 'metrics.jsonl'}: no metrics here; is {tmp_path} a run folder (alextrain --out)?\n"
    assert (result.exit_code, result.output) == (1, expected)


@pytest.mark.slow
def test_predict_command_with_a_sheet(trained_run, pictures, tmp_path, monkeypatch):
    best, images = str(trained_run / "best.pt"), [str(p) for p in pictures[:2]]
    out = tmp_path / "sheet.png"
    result = alextrain("predict", "--checkpoint", best, *images, "--sheet", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout == format_predictions(images, predict_files(best, images, device="cpu")) + "\n"
    assert result.stderr == f"wrote {out}\n"
    assert sheet_size(2, 5) == (640, 490)
    png_pixels(out, (640, 490))

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = alextrain("predict", "--checkpoint", best, *images, "--sheet", str(tmp_path / "no.png"), "--device", "cpu")
    assert (result.exit_code, result.output) == (1, f"Error: {SHEET_HINT}\n")
    assert not (tmp_path / "no.png").exists()
