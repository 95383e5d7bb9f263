"""Batched augmentation: pure tensor functions on uint8 (B, 3, H, W) batches, on the CPU or the GPU.

Training (the paper's): an independent random size x size crop and a horizontal flip with p=0.5 per
image, on the uint8 pixels; then PCA lighting (alpha ~ N(0, 0.1) per image, drawn once per image and
added to every pixel) and the model's input scaling (INPUT_SCALINGS), fused into one multiply-add.
Evaluation: the center crop, or the paper's ten crops, with the same input scaling. Why each model
gets which scaling, and the units of the lighting: docs/recipe.md.

Randomness comes only from the torch.Generator passed in; the random draws happen on the generator's
device (put it on the batch's device for speed, or on the CPU to get the same draws on any device)
and are consumed in a fixed order: crop rows, crop columns, flips, lighting alphas. Memory format is
kept: a channels_last batch gives channels_last views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prep.contract import PixelStats

# How pixels become model inputs, per architecture (train/model.py: INPUTS):
#   "subtract-mean": the paper's, raw 0-255 values minus the training set's per-channel mean;
#   "standardize":   (x / 255 - mean) / std per channel, unit variance (torchvision's convention).
INPUT_SCALINGS = ("subtract-mean", "standardize")


@dataclass
class StatsTensors:
    """The training split's pixel statistics (prep.contract.PixelStats, checked when read: finite, in
    the ranges pixels allow, so float32 stays finite) as float32 tensors on one device, on a 0..1 scale."""

    mean: torch.Tensor  # (3,) RGB
    std: torch.Tensor  # (3,)
    eigval: torch.Tensor  # (3,) eigenvalues of the RGB covariance, descending
    eigvec: torch.Tensor  # (3, 3) unit eigenvectors as columns: eigvec[:, j] belongs to eigval[j]

    @classmethod
    def of(cls, stats: PixelStats, device: torch.device | str = "cpu") -> StatsTensors:
        return cls(**{k: torch.tensor(getattr(stats, k), dtype=torch.float64).to(device, torch.float32)
                      for k in ("mean", "std", "eigval", "eigvec")})


def _check_batch(x: torch.Tensor, size: int) -> tuple[int, int, int]:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a uint8 (B, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} does not fit {h} x {w} images")
    return b, h, w


def random_crop_flip(x_u8: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) uint8: per image a crop at a uniform offset (rows
    0..H-size, columns 0..W-size, both inclusive), mirrored left-right with probability 0.5."""
    b, h, w = _check_batch(x_u8, size)
    gen_dev, dev = generator.device, x_u8.device
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=gen_dev).to(dev)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=gen_dev).to(dev)
    flip = (torch.rand(b, generator=generator, device=gen_dev) < 0.5).to(dev)
    # All windows as one strided view, no copy: windows[n, c, i, j] is the size x size window whose
    # top-left corner is (i, j). Indexing it with B-long index tensors gathers one window per image in
    # one kernel whose inner loop runs over contiguous columns; the mirror is an elementwise select
    # (no boolean masking, which would sync the GPU). The result keeps x_u8's memory format.
    windows = x_u8.unfold(2, size, 1).unfold(3, size, 1)  # (B, 3, H-size+1, W-size+1, size, size)
    out = windows[torch.arange(b, device=dev), :, top, left]  # (B, 3, size, size)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def lighting_alpha(batch: int, std: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(batch, 3) float32 PCA lighting coefficients, alpha ~ N(0, std), drawn on the generator's device."""
    alpha = torch.randn(batch, 3, generator=generator, device=generator.device) * std
    return alpha.to(device)


def lighting_offset(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor) -> torch.Tensor:
    """(B, 3) alphas -> (B, 3) RGB offsets, eigvec @ (alpha * eigval) for each image."""
    return (alpha * eigval) @ eigvec.T


def _to_inputs(x_u8: torch.Tensor, stats: StatsTensors, offset: torch.Tensor, scaling: str) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 model inputs x * scale + shift in one pass, for x / 255 + offset
    on the 0..1 scale (offset (3,) or (B, 3): the lighting). "standardize": (x / 255 + offset - mean)
    / std; "subtract-mean": 255 (x / 255 + offset - mean) = x + 255 (offset - mean), 0-255 units.
    addcmul reads the uint8 directly, so no float copy of the batch is made."""
    if scaling == "standardize":
        scale, shift = 1.0 / (255.0 * stats.std), (offset - stats.mean) / stats.std
    elif scaling == "subtract-mean":
        scale, shift = torch.ones_like(stats.std), 255.0 * (offset - stats.mean)
    else:
        raise ValueError(f"input scaling must be one of {', '.join(INPUT_SCALINGS)}, not {scaling!r}")
    return torch.addcmul(shift[..., None, None], x_u8, scale[:, None, None])  # shift (3 or B, 3, 1, 1), scale (3, 1, 1)


def train_views(
    x_u8: torch.Tensor, stats: StatsTensors, size: int = 224, *, scaling: str, generator: torch.Generator, lighting_std: float = 0.1
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) float32 training inputs: crop and flip, then PCA
    lighting on the 0..1 scale (each image's offset eigvec @ (alpha * eigval)) and the input
    `scaling`, fused into one multiply-add per pixel."""
    x = random_crop_flip(x_u8, size, generator)
    alpha = lighting_alpha(x.shape[0], lighting_std, generator, x.device)
    return _to_inputs(x, stats, lighting_offset(alpha, stats.eigval, stats.eigvec), scaling)


def eval_views(x_u8: torch.Tensor, stats: StatsTensors, size: int = 224, mode: str = "center", *, scaling: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (V, B, 3, size, size) float32 views in the input `scaling`.
    mode="center": V=1, the center crop. mode="ten": V=10, the paper's test views in this order:
    top-left, top-right, bottom-left, bottom-right, center, then the left-right mirror images of those
    five in the same order. The caller averages the softmax over V."""
    _, h, w = _check_batch(x_u8, size)
    top, left = (h - size) // 2, (w - size) // 2
    if mode == "center":
        origins = [(top, left)]
    elif mode == "ten":
        origins = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    else:
        raise ValueError(f"eval mode must be 'center' or 'ten', not {mode!r}")
    views = torch.stack([x_u8[:, :, t : t + size, l : l + size] for t, l in origins])  # (V, B, 3, size, size)
    if mode == "ten":
        views = torch.cat([views, views.flip(-1)])
    return _to_inputs(views, stats, torch.zeros_like(stats.mean), scaling)
