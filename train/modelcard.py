"""The model card: an exported model folder's README.md, rendered from its config.json alone.

The Hub's YAML metadata block (library, tags, datasets, metrics and a `model-index` with the
evaluation, written by `huggingface_hub.ModelCardData`; the license is left to the user as a
commented placeholder), then in prose and tables: what the model is, how it was trained, its results
next to the paper's and torchvision's, how to load it, and the pictures the folder holds. Rendering
is deterministic (the same config, files and repo id give the same bytes), so pushing an unchanged
export again changes nothing on the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from prep.contract import atomic_write
from train.pretrained import CONFIG_NAME, WEIGHTS_NAME

CARD_NAME, CURVES_NAME, SHEET_NAME = "README.md", "training_curves.png", "predictions.png"
IMAGENET_ID = "ILSVRC/imagenet-1k"
PLACEHOLDER_REPO = "USER/NAME"  # in the loading example until the card is rendered for a repo (push)

# Reference results on ILSVRC-2012 validation (50,000 images), as error rates.
PAPER = ("AlexNet paper, one CNN (Krizhevsky et al. 2012, table 2)", "ten crops", 0.407, 0.182)
TORCHVISION = ("torchvision `alexnet` (IMAGENET1K_V1: 56.5% / 79.1% accuracy)", "centre crop", 1 - 0.56522, 1 - 0.79066)

ARCH_TEXT = {
    "alexnet": "the network of the AlexNet paper as published: five convolutions (96-256-384-384-256, the "
               "paper's two-GPU connectivity as groups=2), local response normalisation after the first two, "
               "overlapping 3/2 max-pooling, three fully connected layers (4096, 4096, classes) with dropout 0.5",
    "alexnet-tv": "torchvision's single-tower AlexNet variant (\"one weird trick\": 64-192-384-256-256 "
                  "convolutions, no LRN); its state dict loads unchanged into `torchvision.models.alexnet()`",
    "alexnet-bn": "the paper's layout (96-256-384-384-256 convolutions with groups) with BatchNorm after every "
                  "convolution instead of local response normalisation",
}
SCALING_TEXT = {
    "subtract-mean": "0-255 pixel values minus the training set's per-channel mean, `255 * (x - mean)` for x on the "
                     "0..1 scale (the paper's only preprocessing)",
    "standardize": "`(x - mean) / std` per channel, for x on the 0..1 scale",
}


def write_card(folder: Path, repo_id: str | None = None) -> None:
    """(Re)write folder/README.md from folder/config.json and the pictures the folder holds."""
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    pictures = [name for name in (CURVES_NAME, SHEET_NAME) if (folder / name).is_file()]
    with atomic_write(folder / CARD_NAME, "w") as f:
        f.write(render(config, pictures, repo_id))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def metadata(config: dict) -> str:
    """The YAML metadata block's content (without the --- lines)."""
    from huggingface_hub import EvalResult, ModelCardData

    ev, ds = config["evaluation"], config["dataset"]
    results = []
    for view, numbers in (("centre crop", ev.get("center_crop")), ("ten crops", ev.get("ten_crops"))):
        for k in (1, 5) if numbers else ():
            results.append(EvalResult(
                task_type="image-classification", task_name="Image Classification",
                dataset_type=ds.get("hub_id") or ds.get("name") or "unknown", dataset_name=ds.get("name") or "unknown",
                dataset_split=ev["split"], metric_type="accuracy", metric_name=f"top-{k} accuracy, {view}",
                metric_value=round(1 - numbers[f"top{k}_err"], 6)))
    data = ModelCardData(
        library_name="pytorch", pipeline_tag="image-classification",
        tags=["image-classification", "alexnet", config["arch"], "alexnet-shards", "safetensors"],
        datasets=[ds["hub_id"]] if ds.get("hub_id") else None, metrics=["accuracy"],
        model_name=f"{config['arch']} ({ds.get('name') or 'unknown data'})", eval_results=results or None)
    placeholder = "# license: choose one before publishing (https://huggingface.co/docs/hub/repositories-licenses)\n"
    if ds.get("hub_id") == IMAGENET_ID:
        placeholder += "# ImageNet's terms of access allow non-commercial research and educational use only.\n"
    return data.to_yaml() + "\n" + placeholder


def render(config: dict, pictures: list[str], repo_id: str | None = None) -> str:
    """The whole README.md."""
    arch, inputs, tr, ds, ev, ck = (config[k] for k in ("arch", "inputs", "training", "dataset", "evaluation", "checkpoint"))
    cfg = tr["config"]
    repo = repo_id or PLACEHOLDER_REPO
    classes = len(config["classes"])
    imagenet = ds.get("hub_id") == IMAGENET_ID
    lines = ["---", metadata(config).rstrip("\n"), "---", "",
             f"# {arch} trained with alexnet-shards on {ds.get('name') or 'an unnamed shard folder'}", "",
             f"An AlexNet trained from scratch with alexnet-shards (shards written by `alexprep`, trained by "
             f"`alextrain`): {ARCH_TEXT[arch]}. {config['num_parameters']:,} parameters, {classes:,} classes. "
             f"It takes {inputs['crop_size']} x {inputs['crop_size']} crops of 256 x 256 pictures; its weights are "
             f"in `{WEIGHTS_NAME}`, and everything needed to use it or repeat its training is in `{CONFIG_NAME}`.", ""]

    images = f"{ev['images']:,}" if ev.get("images") else "-"
    lines += ["## Results", "",
              f"The {ev['split']} split of the shard folder, {images} images, measured by {ev['measured_by']}. "
              f"Errors, lower is better:", "",
              "| model | test views | images | top-1 error | top-5 error |", "| --- | --- | --- | --- | --- |"]
    for view, key in (("centre crop", "center_crop"), ("ten crops, softmax averaged", "ten_crops")):
        if ev.get(key):
            lines.append(f"| this model | {view} | {images} | {_pct(ev[key]['top1_err'])} | {_pct(ev[key]['top5_err'])} |")
    for name, view, top1, top5 in (PAPER, TORCHVISION):
        lines.append(f"| {name} | {view} | 50,000 | {_pct(top1)} | {_pct(top5)} |")
    lines.append("")
    if not imagenet:
        lines += [f"The two reference rows are ImageNet-1k's 1,000 classes ({IMAGENET_ID} validation); this model "
                  f"was trained and evaluated on {classes:,} classes of other data, so they show the scale of the "
                  f"task, not a comparison.", ""]

    lines += ["## Training", "",
              f"Data: the shard folder `{ds.get('name')}` built by `alexprep build-shards` from `{ds.get('source')}`"
              + (f" ({', '.join(f'{n:,} {s}' for s, n in ds['num_samples'].items())} images)" if ds.get("num_samples") else "")
              + (f", `_info.json` sha256 `{ds['info_sha256']}`" if ds.get("info_sha256") else "") + "; "
              f"every picture's shorter side scaled to 256 (Lanczos), centre 256 x 256 crop, JPEG. The build "
              f"options and the class table are in `{CONFIG_NAME}`.", "",
              "| setting | value |", "| --- | --- |",
              f"| architecture | `{arch}` |",
              f"| epochs | {tr['epochs_done']} done of {cfg['epochs']} planned ({tr['global_step']:,} steps) |",
              f"| batch | {cfg['batch_size']} per rank x {tr['world_size']} rank(s) = {tr['global_batch']} |",
              f"| optimizer | SGD, momentum {cfg['momentum']}, weight decay {cfg['weight_decay']} |",
              f"| learning rate | {tr['base_lr']:g} ({cfg['schedule']} schedule"
              + (f", patience {cfg['patience']}" if cfg["schedule"] == "plateau" else "")
              + (f", every {cfg['step_epochs']} epochs" if cfg["schedule"] == "step" else "")
              + (f", warm-up {cfg['warmup_epochs']:g} epochs" if cfg.get("warmup_epochs") else "") + ") |",
              f"| augmentation | random {cfg['crop_size']} px crops, horizontal flips, PCA lighting (std {cfg['lighting_std']}) |",
              f"| inputs | {SCALING_TEXT[inputs['scaling']]} |",
              f"| seed | {cfg['seed']} |",
              f"| checkpoint | `{ck['file']}` after epoch {ck['epoch']}, sha256 `{ck['sha256']}` |", ""]
    if CURVES_NAME in pictures:
        lines += [f"![training curves: loss, top-1 and top-5 error, learning rate, speed]({CURVES_NAME})", ""]

    if SHEET_NAME in pictures:
        lines += ["## Predictions", "",
                  f"The first {len(ev['examples'])} pictures of the {ev['split']} split, centre crop, top 5:", "",
                  f"![top-5 predictions]({SHEET_NAME})", "", "| picture | true class | top-1 prediction |", "| --- | --- | --- |"]
        lines += [f"| {e['key']} | {e['label']} | {e['top5'][0][0]} ({e['top5'][0][1]:.1%}) |" for e in ev["examples"]]
        lines.append("")

    lines += ["## How to use", "",
              "With alexnet-shards installed (its `train` package; it reads only `config.json` and "
              "`model.safetensors`, never a pickle):", "", "```python",
              "from train.pretrained import load_pretrained",
              f'model = load_pretrained("{repo}")  # eval mode, with its preprocessing',
              'print(model.predict(["cat.jpg"]))  # [[(class name, probability), ...]], top 5', "```", "",
              f"Or `alextrain predict --model {repo} cat.jpg` and `alextrain eval --model {repo} --shards DIR`. "
              f"To feed it yourself: scale the picture's shorter side to 256, take the centre 256 x 256, then "
              f"the centre {inputs['crop_size']} x {inputs['crop_size']} crop; inputs are "
              f"{SCALING_TEXT[inputs['scaling']]}, with mean {_triple(inputs['mean'])} and std {_triple(inputs['std'])} "
              f"(RGB, from the training pictures); output position i is class i of `{CONFIG_NAME}`'s `classes`.", ""]
    if arch == "alexnet-tv":
        lines += ["With torchvision alone:", "", "```python",
                  "import torchvision, huggingface_hub, safetensors.torch",
                  f"model = torchvision.models.alexnet(num_classes={classes}).eval()",
                  f'model.load_state_dict(safetensors.torch.load_file(huggingface_hub.hf_hub_download("{repo}", "{WEIGHTS_NAME}")))',
                  "```", ""]

    lines += ["## License", "",
              "Not chosen yet: add a `license:` line to the metadata block above. "
              + ("ImageNet-1k's terms of access allow non-commercial research and educational use only; "
                 "choose a license that respects them." if imagenet else "Respect the terms of the training data."), ""]
    return "\n".join(lines)


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
