"""`alextrain`: train (the default command), `eval`, `predict`, `report`, `export` and `push`. Parses
options and calls; the work is in train/loop.py, train/evaluate.py, train/predict.py (and
train/prediction_sheet.py), train/run_report.py, train/export.py and train/hub.py. Training options are
generated from TrainConfig's fields, so their help and defaults are the ones in train/config.py."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import click
from click.core import ParameterSource

from prep.contract import ContractError
from train import checkpoint, dist, loop
from train.checkpoint import CheckpointError
from train.config import DEVICES, ConfigError, TrainConfig
from train.evaluate import evaluate_checkpoint
from train.export import EXPORT_FILES, ExportError, export, publish
from train.hub import HubError
from train.loader import LoaderWorkerError
from train.metrics import MetricsError, NonFiniteLoss
from train.predict import ImageError, format_predictions, predict_files
from train.prediction_sheet import predict_sheet
from train.pretrained import ModelError, ModelRef
from train.run_folder import BEST, LAST, METRICS, RunFolderError
from train.run_report import ReportError, format_summary, render_report, run_summary
from train.stream import ShardError

# Errors that mean bad input, not a bug: one line, exit status 1.
USER_ERRORS = (ConfigError, ContractError, ShardError, CheckpointError, ImageError, LoaderWorkerError, RunFolderError,
               NonFiniteLoss, MetricsError, dist.MainRankFailed, ModelError, HubError, ExportError)


def train_options(command):
    """Add one option per TrainConfig field: `--batch-size INTEGER` for `batch_size`, and so on."""
    hints = typing.get_type_hints(TrainConfig)
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag, kind = "--" + f.name.replace("_", "-"), typing.get_args(hints[f.name]) or (hints[f.name],)
        kind = next(k for k in kind if k is not type(None))  # `int | None` -> int
        if kind is bool:
            flags, click_type = [f"{flag}/--no-{flag[2:]}"], None
        else:
            flags, click_type = [flag], click.Choice(f.metadata["choices"]) if "choices" in f.metadata else kind
        command = click.option(*flags, f.name, type=click_type, default=f.default, show_default=f.default is not None,
                               help=f.metadata["help"])(command)
    return command


def run_training(ctx: click.Context, options: dict) -> None:
    # With --resume the run's saved configuration applies; options given here override it.
    given = {name: value for name, value in options.items() if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    try:
        if options["resume"]:
            config = checkpoint.config_for_resume(options["resume"], given)
        elif not options["shards"]:
            raise click.UsageError("give --shards DIR (or --resume RUN to continue a run)", ctx)
        else:
            config = TrainConfig(**options)
        record = loop.train(config)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    if record:
        click.echo(f"done: {config.out} ({LAST}, {BEST}, {METRICS})", err=True)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@train_options
@click.pass_context
def main(ctx: click.Context, **options) -> None:
    """Train AlexNet on alexprep's shards (this is the default command: `alextrain --shards DIR`),
    evaluate a checkpoint (`alextrain eval`), classify pictures (`alextrain predict`), plot a run
    (`alextrain report`), or share a model (`alextrain export`, `alextrain push`).

    Several GPUs or machines: `torchrun --nproc_per_node N -m train.cli --shards DIR ...`."""
    if ctx.invoked_subcommand is None:
        run_training(ctx, options)
    elif any(ctx.get_parameter_source(name) is not ParameterSource.DEFAULT for name in options):
        raise click.UsageError(f"training options go after the command name, or drop `{ctx.invoked_subcommand}`", ctx)


@main.command("train")
@train_options
@click.pass_context
def train_cmd(ctx: click.Context, **options) -> None:
    """Train AlexNet on alexprep's shards (the same as `alextrain` without a command)."""
    run_training(ctx, options)


def model_options(command):
    """--checkpoint, or --model with an optional --revision: which trained model a command uses."""
    command = click.option("--revision", default=None, help="with --model USER/NAME: a branch, tag or commit of the repo  [default: main]")(command)
    command = click.option("--model", "model", default=None, metavar="USER/NAME|DIR",
                           help="an exported model instead: a Hub model repo (downloaded into the Hugging Face cache), "
                                "or a folder written by `alextrain export`; only its config.json and model.safetensors are read")(command)
    return click.option("--checkpoint", "path", type=click.Path(dir_okay=True), help="checkpoint file, or a run folder (its last.pt)")(command)


def model_ref(path: str | None, model: str | None, revision: str | None) -> ModelRef:
    if (path is None) == (model is None):
        raise click.UsageError("give --checkpoint PATH or --model USER/NAME|DIR (one of the two)")
    if revision is not None and model is None:
        raise click.UsageError("--revision goes with --model (a Hub repo)")
    return ModelRef(checkpoint=path) if path is not None else ModelRef(model=model, revision=revision)


@main.command("eval")
@model_options
@click.option("--shards", default=None, help="shard folder or URL prefix  [default: the one the checkpoint was trained on]")
@click.option("--ten-crop/--center", default=True,
              help="the center crop and the paper's ten crops (softmax averaged) in one pass, or the center crop alone  [default: ten-crop]")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="images per batch (x10 views with --ten-crop)")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="loader worker processes that read and decode the shards (0 = in the main process)  "
                   "[default: this machine's cores shared among its ranks, less one each]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="'auto' = cuda if available")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a sentence")
def eval_cmd(path, model, revision, shards, ten_crop, batch_size, workers, device, as_json) -> None:
    """Top-1 and top-5 error of a checkpoint (or an exported model) on the validation split: center crop, and ten crops."""
    ref = model_ref(path, model, revision)
    try:
        result = evaluate_checkpoint(ref, shards, mode="ten" if ten_crop else "center", batch_size=batch_size, workers=workers, device=device)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    if not dist.launched_as_main():
        return
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        head = f"{result['shards']} validation, {result['samples']} images"
        center = (result["center_top1_err"], result["center_top5_err"]) if ten_crop else (result["top1_err"], result["top5_err"])
        click.echo(f"{head}, center crop: top-1 error {center[0]:.2%}, top-5 error {center[1]:.2%}")
        if ten_crop:
            click.echo(f"{head}, ten crops: top-1 error {result['top1_err']:.2%}, top-5 error {result['top5_err']:.2%}")


@main.command("predict")
@model_options
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--ten-crop/--center", default=False, help="average the softmax over ten crops, or use the center crop  [default: center]")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="how many classes to show per image")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="'auto' = cuda if available")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also draw each IMAGE with a bar chart of its classes to this PNG (needs matplotlib)")
def predict_cmd(path, model, revision, images, ten_crop, top, device, sheet) -> None:
    """The most probable classes, with probabilities, of each IMAGE (JPEG, PNG, ...)."""
    ref = model_ref(path, model, revision)
    try:
        predictions = predict_files(ref, list(images), mode="ten" if ten_crop else "center", device=device, k=top)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    if sheet is not None:
        try:
            predict_sheet(predictions, list(images), sheet, title=f"top-{top} predictions of {ref}")
        except (ImportError, OSError) as e:  # no matplotlib, or the PNG cannot be written
            raise click.ClickException(str(e)) from None
    click.echo(format_predictions(images, predictions))
    if sheet is not None:
        click.echo(f"wrote {sheet}", err=True)


@main.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="the PNG to write  [default: RUN_DIR/report.png]")
@click.option("--plot/--no-plot", default=True, help="draw the plots (needs matplotlib), or only print the summary  [default: plot]")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object instead of text")
def report_cmd(run_dir, out, plot, as_json) -> None:
    """Summarise the run in RUN_DIR (best epoch, errors, time, speed) and plot its metrics.jsonl: loss,
    top-1 and top-5 error, learning rate, images/s and data-wait share, to RUN_DIR/report.png."""
    try:
        summary = render_report(run_dir, out) if plot else run_summary(run_dir)
    except (ReportError, ImportError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(summary, sort_keys=True) if as_json else format_summary(summary))


def export_options(command):
    """How `export` (and `push`, when it exports) evaluates the checkpoint."""
    options = [
        click.option("--shards", default=None, help="shard folder to evaluate on and take example pictures from  "
                                                    "[default: the one the checkpoint was trained on]"),
        click.option("--evaluate/--no-evaluate", default=True,
                     help="evaluate on the validation split (center crop and ten crops) and draw predictions.png, or "
                          "take the center-crop numbers the training recorded for the checkpoint's epoch  [default: evaluate]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="images per evaluation batch (x10 views)"),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="loader worker processes for the evaluation  [default: this machine's cores, less one]"),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="'auto' = cuda if available"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("export")
@click.argument("source", metavar="RUN_OR_CHECKPOINT", type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the model folder to write: new, empty, or an earlier export  [default: RUN/model-last for RUN/last.pt]")
@export_options
def export_cmd(source, out, **options) -> None:
    """Write a self-contained model folder from a checkpoint (a run folder: its last.pt): model.safetensors
    (the weights only), config.json (arch, input scaling, classes, recipe, data, evaluation), a model
    card README.md, and the training curves and a top-5 prediction sheet as pictures."""
    try:
        done = export(source, out, **options)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    files = [name for name in EXPORT_FILES if (done.folder / name).is_file()]
    click.echo(f"exported {done.folder}: {', '.join(files)}")


@main.command("push")
@click.argument("source", metavar="RUN_OR_DIR", type=click.Path(exists=True))
@click.option("--repo", required=True, metavar="USER/NAME", help="the Hugging Face model repo (created if missing)")
@click.option("--private", is_flag=True, help="create the repo private (an existing repo keeps its visibility)")
@click.option("--revision", default=None, metavar="BRANCH", help="commit to this branch, made from main if missing  [default: main]")
@export_options
def push_cmd(source, repo, private, revision, **options) -> None:
    """Upload a model to a Hugging Face model repo in one commit: an export folder, or a checkpoint or
    run folder (exported first into RUN/model-last unless that holds its current export). Files that
    did not change are not sent again; pushing the same model twice makes no second commit. The token
    comes from `hf auth login` or HF_TOKEN and is never printed or stored."""
    try:
        done = publish(source, repo, private=private, revision=revision, **options)
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None
    for note in done.notes:
        click.echo(f"note: {note}", err=True)
    if done.exported:
        click.echo(f"exported {done.folder}", err=True)
    branch = revision or "main"
    if done.pushed.changed:
        click.echo(f"pushed {done.folder} to {done.pushed.url} ({branch}, commit {done.pushed.commit[:12]})")
    else:
        click.echo(f"{done.pushed.url} ({branch}) already holds {done.folder}: nothing to commit")


if __name__ == "__main__":
    main()
