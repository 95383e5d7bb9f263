"""Top-5 predictions for the user's own pictures (the formats alexprep takes: JPEG, PNG, GIF, BMP,
WebP, TIFF, PPM).

Each picture goes through alexprep's own image path (prep.image.process: the same formats, size limit,
mode conversion, resize to 256 x 256 and JPEG encoding) and its JPEG is decoded as the loader decodes
a shard's, so it reaches the model exactly as a shard image would; then it is evaluated like a
validation image (the center crop, or ten crops). The class names, pixel statistics and input scaling
come from the checkpoint (or the exported model), so no shard folder is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prep.image import SkipImage, process
from train.augment import StatsTensors, eval_views
from train.dist import resolve_device
from train.evaluate import autocast
from train.loader import decode_batch
from train.pretrained import ModelRef
from train.stream import Sample, ShardError


class ImageError(Exception):
    """A picture that cannot be read; the message names it."""


def load_image(path: str | Path) -> torch.Tensor:
    """uint8 (3, 256, 256): the picture as alexprep would store it in a shard, decoded as the loader
    decodes shard images."""
    path = Path(path)
    try:
        jpeg = process(path.read_bytes()).jpeg
        (image,) = decode_batch([Sample(str(path), path.name, jpeg, 0)]).images
    except (SkipImage, ShardError, OSError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    return image.contiguous()


@torch.no_grad()
def predict_images(
    model: nn.Module,
    paths: list[str | Path],
    stats: StatsTensors,
    classes: list[str],
    device: torch.device,
    *,
    scaling: str,
    crop_size: int = 224,
    mode: str = "center",
    k: int = 5,
) -> list[list[tuple[str, float]]]:
    """For each picture, its k most probable classes as (name, probability), most probable first."""
    model.eval()
    images = torch.stack([load_image(p) for p in paths]).to(device)  # (N, 3, 256, 256)
    views = eval_views(images, stats, crop_size, mode, scaling=scaling)  # (V, N, 3, S, S)
    with autocast(device):
        logits = model(views.flatten(0, 1))  # (V * N, C)
    probs = F.softmax(logits.float().view(*views.shape[:2], -1), dim=-1).mean(dim=0)  # (N, C)
    top = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(classes[i], p) for p, i in zip(ps, idx)] for ps, idx in zip(top.values.tolist(), top.indices.tolist())]


def predict_files(path: str | Path | ModelRef, images: list[str | Path], *, mode: str = "center", device: str = "auto", k: int = 5) -> list[list[tuple[str, float]]]:
    """predict_images with the model, class names and statistics of checkpoint `path` (or of an
    exported model: a ModelRef)."""
    ref = path if isinstance(path, ModelRef) else ModelRef(checkpoint=str(path))
    return ref.load(resolve_device(device)).predict(images, mode=mode, k=k)


def format_predictions(images: list[str | Path], predictions: list[list[tuple[str, float]]]) -> str:
    """One block per picture: its path, then one line per class, e.g. "  87.3%  red disc"."""
    return "\n".join(f"{image}\n" + "\n".join(f"  {p:6.1%}  {name}" for name, p in top) for image, top in zip(images, predictions))
