"""Top-5 predictions for the user's own pictures (any format Pillow opens: JPEG, PNG, ...).

Each picture is prepared the way alexprep prepares the shards (RGB, shorter side to 256 with Lanczos,
central 256 x 256 crop) and then evaluated like a validation image (the central crop, or ten crops).
The class names and pixel statistics come from the checkpoint, so no shard folder is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from prep.contract import IMAGE_SIZE
from train.augment import PixelStats, eval_views
from train.checkpoint import load_model
from train.dist import resolve_device
from train.evaluate import autocast


class ImageError(Exception):
    """A picture that cannot be read; the message names it."""


def load_image(path: str | Path, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (3, size, size): RGB, shorter side resized to `size` (Lanczos), central square crop."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@torch.no_grad()
def predict_images(
    model: nn.Module,
    paths: list[str | Path],
    stats: PixelStats,
    classes: list[str],
    device: torch.device,
    *,
    crop_size: int = 224,
    mode: str = "center",
    k: int = 5,
) -> list[list[tuple[str, float]]]:
    """For each picture, its k most probable classes as (name, probability), most probable first."""
    model.eval()
    images = torch.stack([load_image(p) for p in paths]).to(device)  # (N, 3, 256, 256)
    views = eval_views(images, stats, crop_size, mode)  # (V, N, 3, S, S)
    with autocast(device):
        logits = model(views.flatten(0, 1))  # (V * N, C)
    probs = F.softmax(logits.float().view(*views.shape[:2], -1), dim=-1).mean(dim=0)  # (N, C)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(classes[i], p) for p, i in zip(ps, idx)] for ps, idx in zip(top.values.tolist(), top.indices.tolist())]


def predict_files(path: str | Path, images: list[str | Path], *, mode: str = "center", device: str = "auto", k: int = 5) -> list[list[tuple[str, float]]]:
    """predict_images with the model, class names and statistics of checkpoint `path`."""
    dev = resolve_device(device)
    model, state = load_model(path, dev)
    stats = PixelStats.from_json(state["stats"], dev)
    names = [c["name"] for c in state["classes"]]
    return predict_images(model, images, stats, names, dev, crop_size=state["config"]["crop_size"], mode=mode, k=k)


def format_predictions(images: list[str | Path], predictions: list[list[tuple[str, float]]]) -> str:
    """One block per picture: its path, then one line per class, e.g. "  87.3%  red disc"."""
    return "\n".join(f"{image}\n" + "\n".join(f"  {p:6.1%}  {name}" for name, p in top) for image, top in zip(images, predictions))
