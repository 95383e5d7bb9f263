"""A trained model ready to use, from a checkpoint or from an exported model folder or Hub repo.

An exported model (train/export.py writes it) is a folder, or a Hugging Face model repo holding the
same files, of which only two are read: `config.json` (what the model is and how to feed it) and
`model.safetensors` (its weights). Nothing is unpickled: a repo offering only a pickle (`.bin`, `.pt`)
is refused, as are a config naming an unknown arch and weights whose names or shapes do not fit it,
each in one line. `load_pretrained` is the one call for Python users; `ModelRef` names either kind of
model for `alextrain eval` and `alextrain predict`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prep.contract import IMAGE_SIZE, ContractError, PixelStats, class_table
from prep.text import first_line
from train import checkpoint
from train.augment import INPUT_SCALINGS, StatsTensors, eval_views
from train.model import ARCHS, build_model

MODEL_FORMAT = "alexnet-shards model"  # config.json's "format": the mark of an exported model
MODEL_FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelError(Exception):
    """An exported model that is missing, unreadable or does not fit its own description; one line."""


@dataclass(frozen=True)
class Pretrained:
    """A trained model in eval mode with what it needs to be fed as it was trained."""

    model: nn.Module  # eval mode, on `device`
    classes: list[dict]  # [{"index", "wnid", "name"}], index = the model's output position
    stats: StatsTensors  # the training split's pixel statistics, on `device`
    scaling: str  # train/augment.py: INPUT_SCALINGS
    crop_size: int  # side of the centre crop (and of the ten crops) it is evaluated on, in pixels
    epoch: int  # epochs of training behind these weights
    shards: str | None  # the shard folder it was trained on as recorded, or where to evaluate it (`ModelRef.load`)
    origin: dict  # what it was loaded from: {"checkpoint": PATH} or {"model": NAME, "revision": REV}
    device: torch.device

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def preprocess(self, images: torch.Tensor, mode: str = "center") -> torch.Tensor:
        """uint8 (B, 3, 256, 256) pictures (as `train.predict.load_image` gives them) -> (V, B, 3, S, S)
        model inputs: the centre crop (V=1) or the paper's ten crops (V=10), scaled as in training."""
        return eval_views(images.to(self.device), self.stats, self.crop_size, mode, scaling=self.scaling)

    def predict(self, images: list[str | Path], *, mode: str = "center", k: int = 5) -> list[list[tuple[str, float]]]:
        """For each picture file, its k most probable classes as (name, probability)."""
        from train.predict import predict_images  # predict imports evaluate, which imports this module

        return predict_images(self.model, images, self.stats, self.names, self.device, scaling=self.scaling,
                              crop_size=self.crop_size, mode=mode, k=k)


@dataclass(frozen=True)
class ModelRef:
    """Which trained model a command means: a checkpoint (file or run folder), or an exported model
    (a folder, or a Hub repo USER/NAME at `revision`)."""

    checkpoint: str | None = None
    model: str | None = None
    revision: str | None = None

    def load(self, device: torch.device, for_eval: bool = False, shards: str | None = None) -> Pretrained:
        """The model on `device`. `for_eval`: its `shards` become the folder to evaluate on, `shards` if
        given, else the recorded one, refused if that is a `pipe:` command (a file is data: nothing in it
        may become a shell command); for a checkpoint, before anything is built."""
        if self.checkpoint is not None:
            return from_checkpoint(self.checkpoint, device, for_eval, shards)
        trained = load_pretrained(self.model, revision=self.revision, device=device)
        if not for_eval:
            return trained
        return dataclasses.replace(trained, shards=shards or checkpoint.trusted_shards(self.model, trained.shards))

    def __str__(self) -> str:
        return self.checkpoint if self.checkpoint is not None else self.model


def from_checkpoint(path: str | Path, device: torch.device, for_eval: bool = False, shards: str | None = None) -> Pretrained:
    """The trained model of a checkpoint file or run folder (its last.pt); `for_eval` as in ModelRef.load."""
    state = checkpoint.load(path, map_location=device)
    location = state["config"]["shards"]
    if for_eval:
        location = shards or checkpoint.trusted_shards(checkpoint.resolve(path), location)
    model = checkpoint.model_from(state, path, device)
    stats = StatsTensors.of(PixelStats.from_json(state["stats"], f"{path}: stats"), device)
    return Pretrained(model, state["classes"], stats, state["inputs"], state["config"]["crop_size"],
                      state["epoch"], location, {"checkpoint": str(path)}, device)


def load_pretrained(name: str | Path, *, revision: str | None = None, device: str | torch.device = "cpu") -> Pretrained:
    """The exported model `name`, in eval mode on `device`, with its preprocessing: a local folder
    (written by `alextrain export`) if there is one at that path, else a Hub model repo USER/NAME
    fetched at `revision` (default: main) into the Hugging Face cache. Raises ModelError (what was
    found does not fit) or train.hub.HubError (the Hub could not be asked), each in one line."""
    device = torch.device(device)
    folder = Path(name)
    if folder.is_dir():
        if revision is not None:
            raise ModelError(f"{name}: a local folder has no revisions; --revision is for Hub repos")
        weights_path, where = folder / WEIGHTS_NAME, str(folder)
        for path in (folder / CONFIG_NAME, weights_path):
            if not path.is_file():
                raise ModelError(f"{where}: no {path.name} here; is it a folder written by `alextrain export`?")
        config, stats = read_config(folder / CONFIG_NAME, where)
    elif _REPO_ID.fullmatch(str(name)):
        from train import hub

        where = f"{name}@{revision}" if revision else str(name)
        commit, files = hub.repo_files(str(name), revision)
        for needed in (WEIGHTS_NAME, CONFIG_NAME):
            if needed not in files:
                pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
                held = f" (it holds {', '.join(pickles)}: pickled weights are never loaded, only {WEIGHTS_NAME})" if pickles else ""
                raise ModelError(f"{where}: no {needed} in this repo{held}")
        # An unknown arch (or any config that does not fit) is refused before the weights are downloaded.
        config, stats = read_config(hub.download(str(name), CONFIG_NAME, commit), where)
        weights_path = hub.download(str(name), WEIGHTS_NAME, commit)
    else:
        raise ModelError(f"{name}: no such model folder, and not a Hub repo id USER/NAME")
    model = load_weights(config, weights_path, where).to(device).eval()
    origin = {"model": str(name), "revision": revision}
    return Pretrained(model, config["classes"], StatsTensors.of(stats, device), config["inputs"]["scaling"],
                      config["inputs"]["crop_size"], config["checkpoint"]["epoch"], config["dataset"].get("location"), origin, device)


def read_config(path: Path, where: str) -> tuple[dict, PixelStats]:
    """config.json of an exported model, checked for what loading and feeding the model need (its
    class table and pixel statistics by the shard contract's own rules), and its pixel statistics."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: unreadable {CONFIG_NAME} ({e})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise ModelError(f"{where}: {CONFIG_NAME} does not describe an alexnet-shards model (no \"format\": \"{MODEL_FORMAT}\")")
    if config.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelError(f"{where}: model format version {config.get('format_version')!r}; this alextrain reads {MODEL_FORMAT_VERSION}")
    if config.get("arch") not in ARCHS:
        raise ModelError(f"{where}: unknown arch {config.get('arch')!r} in {CONFIG_NAME}; this alextrain builds {', '.join(ARCHS)}")
    try:
        class_table(config.get("classes"), where)
    except ContractError:
        raise ModelError(f"{where}: {CONFIG_NAME} lacks a class table (index 0, 1, ... with a wnid and a name each)") from None
    inputs = config.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("scaling") not in INPUT_SCALINGS:
        raise ModelError(f"{where}: {CONFIG_NAME} inputs lack a scaling, one of {', '.join(INPUT_SCALINGS)}")
    crop = inputs.get("crop_size")
    if not isinstance(crop, int) or not 0 < crop <= IMAGE_SIZE:
        raise ModelError(f"{where}: {CONFIG_NAME} inputs crop_size must be in 1..{IMAGE_SIZE}, not {crop!r}")
    if not isinstance(config.get("checkpoint"), dict) or not isinstance(config["checkpoint"].get("epoch"), int):
        raise ModelError(f"{where}: {CONFIG_NAME} lacks the checkpoint's epoch")
    if not isinstance(config.get("dataset"), dict):
        raise ModelError(f"{where}: {CONFIG_NAME} lacks its dataset record")
    try:
        return config, PixelStats.from_json(inputs, f"{where}: {CONFIG_NAME} inputs")
    except ContractError as e:
        raise ModelError(str(e)) from None


def load_weights(config: dict, path: Path, where: str) -> nn.Module:
    """A model of config's arch and class count with the weights of the safetensors file `path`. The
    file's header (tensor names and shapes) is checked against the model before any tensor is read."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    model = build_model(config["arch"], num_classes=len(config["classes"]))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    describe = f"{config['arch']} with {len(config['classes'])} classes"
    try:
        with safe_open(path, framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            parts = [f"{len(missing)} missing ({_some(missing)})"] if missing else []
            parts += [f"{len(unexpected)} unexpected ({_some(unexpected)})"] if unexpected else []
            raise ModelError(f"{where}: {WEIGHTS_NAME} does not fit {describe}: tensors {' and '.join(parts)}")
        for key, shape in expected.items():
            if found[key] != shape:
                raise ModelError(f"{where}: {WEIGHTS_NAME} does not fit {describe}: {key} has shape {list(found[key])}, "
                                 f"the model's is {list(shape)}")
        weights = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{where}: {WEIGHTS_NAME} is not a readable safetensors file ({first_line(e)})") from None
    model.load_state_dict(weights)  # names and shapes were checked: this only copies (and casts) values
    return model


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
