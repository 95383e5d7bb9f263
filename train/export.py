"""`alextrain export`: a checkpoint as a self-contained model folder, to share on the Hub (`alextrain
push`) or to load with `train.pretrained.load_pretrained`:

    model.safetensors    the weights only (the model's state_dict, no optimizer state): safetensors alone reads them
    config.json          the arch; how to feed it (input scaling, mean and std, the PCA basis, image and crop
                         size); the class table; the recipe; the shard folder's identity; the evaluation;
                         the checkpoint it came from (its sha256, so a later push knows the export is current)
    README.md            the model card (train/modelcard.py)
    training_curves.png  the run's metrics.jsonl as `alextrain report` draws it (needs matplotlib)
    predictions.png      top-5 predictions for the first validation pictures (needs matplotlib; when evaluated)

The evaluation (the default) is `alextrain eval`'s ten-crop pass over the validation split, which
gives the centre-crop numbers too; with `evaluate=False` the numbers are the centre-crop ones the
training recorded for the checkpoint's epoch. The folder is written under a temporary name beside
OUT and then renamed, so OUT holds the old export or the whole new one, never half of one; OUT must
be new, empty, or an earlier export (anything else is refused, never deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from prep.contract import IMAGE_SIZE, INFO_NAME, ContractError, PixelStats, imagenet_classes, short_name, write_json
from train import checkpoint, hub
from train.augment import StatsTensors
from train.config import PAPER_BATCH
from train.evaluate import evaluate_checkpoint
from train.hub import Pushed
from train.metrics import read_metrics
from train.modelcard import CARD_NAME, CURVES_NAME, IMAGENET_ID, SHEET_NAME, write_card
from train.predict import predict_images
from train.prediction_sheet import predict_sheet
from train.pretrained import CONFIG_NAME, MODEL_FORMAT, MODEL_FORMAT_VERSION, WEIGHTS_NAME, load_pretrained
from train.remote import RemoteReadError, RemoteReads, join, read_bytes
from train.run_folder import METRICS, export_folder
from train.run_report import ReportError, render_report
from train.stream import open_shards, read_shard

EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, CURVES_NAME, SHEET_NAME)  # all an export may hold
SHEET_PICTURES = 8  # validation pictures on predictions.png: two rows of four


class ExportError(Exception):
    """A model folder that cannot be written where asked; one line."""


class Exported(NamedTuple):
    folder: Path
    notes: list[str]  # what was left out and why (no matplotlib, no metrics), for the user


class Published(NamedTuple):
    folder: Path  # the export that was pushed
    exported: bool  # False: the folder was an export already, or a current export of the checkpoint
    notes: list[str]
    pushed: Pushed


def read_export(folder: Path) -> dict | None:
    """config.json of the export in `folder`, or None if `folder` holds no export."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("format") == MODEL_FORMAT else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_current(folder: Path, checkpoint_path: Path) -> bool:
    """Whether `folder` holds a whole export of this very checkpoint file (by its sha256)."""
    config = read_export(folder)
    return (config is not None and all((folder / n).is_file() for n in (WEIGHTS_NAME, CARD_NAME))
            and config.get("checkpoint", {}).get("sha256") == sha256_file(checkpoint_path))


def export(path: str | Path, out: str | Path | None = None, *, shards: str | None = None, evaluate: bool = True,
           batch_size: int = 128, workers: int | None = None, device: str = "auto") -> Exported:
    """Export the checkpoint `path` (a file, or a run folder's last.pt) to the model folder `out`
    (default: `run_folder.export_folder`). Raises ExportError, or the checkpoint's and shard folder's own errors."""
    ckpt = checkpoint.resolve(path)
    out = Path(out) if out is not None else export_folder(ckpt)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or read_export(out) is not None)):
        raise ExportError(f"{out}: exists and is not an earlier export; give --out a new or empty folder")
    state = checkpoint.load(ckpt)
    model = checkpoint.model_from(state, ckpt, torch.device("cpu"))
    notes: list[str] = []
    if evaluate:
        result = evaluate_checkpoint(str(ckpt), shards, mode="ten", batch_size=batch_size, workers=workers, device=device)
        location = result["shards"]
        evaluation = {"split": "validation", "images": result["samples"], "measured_by": "`alextrain export` (its ten-crop pass)",
                      "center_crop": {"top1_err": result["center_top1_err"], "top5_err": result["center_top5_err"]},
                      "ten_crops": {"top1_err": result["top1_err"], "top5_err": result["top5_err"]}}
    else:
        location = shards or checkpoint.trusted_shards(ckpt, state["config"]["shards"])
        evaluation = _recorded_evaluation(ckpt.parent, state["epoch"])
    dataset = _dataset(location, notes)
    if evaluation["images"] is None and dataset.get("num_samples"):
        evaluation["images"] = dataset["num_samples"].get("validation")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = _temporary_folder(out)
    try:
        _write_weights(model, tmp / WEIGHTS_NAME)
        if evaluate:
            evaluation["examples"] = _examples(model, state, location, tmp / SHEET_NAME, notes)
        write_json(tmp / CONFIG_NAME, _config(state, ckpt, model, dataset, evaluation))
        try:
            render_report(ckpt.parent, tmp / CURVES_NAME)
        except (ReportError, ImportError) as e:
            notes.append(f"no {CURVES_NAME}: {e}")
        write_card(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out, notes)


def _remove_stale(out: Path) -> None:
    """Delete what an export killed half-way left beside `out`: our own `.tmp-{name}.*` folders only."""
    for stale in out.parent.glob(f".tmp-{out.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _temporary_folder(out: Path) -> Path:
    """A new `.tmp-{name}.XXXXXXXX` folder beside `out`, with the umask's permissions (not mkdtemp's 0700:
    it becomes the export)."""
    while True:
        tmp = out.parent / f".tmp-{out.name}.{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            tmp.mkdir()
            return tmp


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` under the name `out`, replacing an earlier export there."""
    if out.exists():
        old = _temporary_folder(out)
        os.replace(out, old / "old")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _write_weights(model: torch.nn.Module, path: Path) -> None:
    """The state_dict of `model` (built on the CPU, so contiguous whatever memory format the run
    trained in) as safetensors."""
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it 0600; the folder is for sharing, like the rest of it


def _recorded_evaluation(run_dir: Path, epoch: int) -> dict:
    """The centre-crop validation numbers the training logged for `epoch`, if the run folder has them."""
    records = read_metrics(run_dir / METRICS) if (run_dir / METRICS).is_file() else []
    done = next((r for r in records if r["kind"] == "epoch" and r["epoch"] == epoch and "val_top1_err" in r), None)
    numbers = None if done is None else {"top1_err": done["val_top1_err"], "top5_err": done["val_top5_err"]}
    return {"split": "validation", "images": None, "center_crop": numbers, "ten_crops": None,
            "measured_by": f"the training run's evaluation after epoch {epoch} (centre crop only)"
            if numbers else f"nothing: the run recorded no evaluation after epoch {epoch}"}


def _info_sha256(location: str) -> str:
    """sha256 of the shard folder's `_info.json` as stored (the folder's identity)."""
    return hashlib.sha256(read_bytes(join(location, INFO_NAME), RemoteReads())).hexdigest()


def _dataset(location: str | None, notes: list[str]) -> dict:
    """The shard folder's identity: where it was, its name, how it was built, its `_info.json`'s
    sha256, its sizes, and the Hub dataset it is (ImageNet-1k when its class table is the canonical one)."""
    if location is None:
        notes.append("the checkpoint names no shard folder: the export records no dataset identity")
        return {"location": None}
    try:
        folder = open_shards(location, splits=())
        info_sha256 = _info_sha256(location)
    except (ContractError, RemoteReadError, OSError) as e:
        notes.append(f"the shard folder could not be read ({e}): the export records only its location")
        return {"location": location}
    info, wnids = folder.info, [c.wnid for c in folder.classes]
    return {"location": location, "name": info.name, "source": info.options.get("source"),
            "build_options": info.options, "info_sha256": info_sha256,
            "num_samples": {name: split.num_samples for name, split in info.splits.items()},
            "hub_id": IMAGENET_ID if wnids == [c.wnid for c in imagenet_classes()] else None}


def _examples(model: torch.nn.Module, state: dict, location: str, sheet: Path, notes: list[str]) -> list[dict]:
    """The first SHEET_PICTURES validation pictures with their true class and top 5 (centre crop, as
    `alextrain predict` gives them), drawn to `sheet`."""
    split = open_shards(location, splits=("validation",)).split("validation")
    samples = itertools.islice((s for url, n in zip(split.urls, split.lengths)
                                for s in read_shard(url, n, split.num_classes, split.remote)), SHEET_PICTURES)
    names = [c["name"] for c in state["classes"]]
    with tempfile.TemporaryDirectory(prefix="alextrain-export-") as tmp:
        keys, labels, paths = [], [], []
        for i, sample in enumerate(samples):
            keys.append(sample.key)
            labels.append(names[sample.label])
            # The sheet shows each file's name; a key or class name read from a shard never becomes a path.
            name = f"{sample.key} ({short_name(names[sample.label])})"
            paths.append(Path(tmp, str(i), re.sub(r"[^\w ()-]+", "_", name) + ".jpg"))
            paths[-1].parent.mkdir()
            paths[-1].write_bytes(sample.jpg)
        stats = StatsTensors.of(PixelStats.from_json(state["stats"], "checkpoint stats"))
        top5 = predict_images(model, paths, stats, names, torch.device("cpu"), scaling=state["inputs"],
                              crop_size=state["config"]["crop_size"])
        try:
            predict_sheet(top5, paths, sheet, title=f"top-5 predictions, first {len(paths)} validation pictures")
        except ImportError as e:
            notes.append(f"no {SHEET_NAME}: {e}")
    return [{"key": k, "label": label, "top5": [[n, round(p, 6)] for n, p in t]} for k, label, t in zip(keys, labels, top5)]


def _config(state: dict, ckpt: Path, model: torch.nn.Module, dataset: dict, evaluation: dict) -> dict:
    """config.json: everything about the model but its weights."""
    cfg, stats = state["config"], state["stats"]
    global_batch = cfg["batch_size"] * state["world_size"]
    base_lr = cfg["lr"] * (global_batch / PAPER_BATCH if cfg["lr_scaling"] == "linear" else 1.0)
    return {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
        "arch": cfg["arch"], "num_classes": len(state["classes"]),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "inputs": {"image_size": IMAGE_SIZE, "crop_size": cfg["crop_size"], "scaling": state["inputs"],
                   "value_scale": "0..1 (pixel / 255); mean, std and the PCA basis are on this scale",
                   **stats,  # stats.json as the run read it: mean, std, cov, eigval, eigvec, image and pixel counts
                   "pictures": f"shorter side scaled to {IMAGE_SIZE} (Lanczos), central {IMAGE_SIZE} x {IMAGE_SIZE} crop, "
                               "JPEG, decoded to RGB (alexprep's own path: train.predict.load_image)"},
        "classes": state["classes"],
        "training": {"epochs_done": state["epoch"], "global_step": state["global_step"], "world_size": state["world_size"],
                     "global_batch": global_batch, "base_lr": base_lr,
                     "config": {k: v for k, v in cfg.items() if k not in ("shards", "out", "resume")}},
        "dataset": dataset,
        "evaluation": evaluation,
        "checkpoint": {"file": ckpt.name, "sha256": sha256_file(ckpt), "epoch": state["epoch"],
                       "global_step": state["global_step"], "best_top1_err": state["best_top1_err"]},
    }


def publish(source: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None, **options) -> Published:
    """Push a model to the Hub model repo `repo_id` in one commit: `source` is an export folder, or a
    checkpoint or run folder, exported first (with `options`, as `export` takes them) unless its
    default export folder already holds this checkpoint's export. The card is rendered for `repo_id`,
    and the folder must load as `load_pretrained` loads it before anything is sent."""
    folder, exported, notes = Path(source), False, []
    if read_export(folder) is None:
        ckpt = checkpoint.resolve(folder)
        folder = export_folder(ckpt)
        if not is_current(folder, ckpt):
            folder, notes = export(ckpt, folder, **options)
            exported = True
    load_pretrained(folder)
    write_card(folder, repo_id)
    config = read_export(folder)
    files = [name for name in EXPORT_FILES if (folder / name).is_file()]
    message = f"alextrain push: {config['arch']} after epoch {config['checkpoint']['epoch']} ({config['dataset'].get('name')})"
    pushed = hub.push_folder(folder, files, EXPORT_FILES, repo_id, message=message, private=private, revision=revision)
    return Published(folder, exported, notes, pushed)

