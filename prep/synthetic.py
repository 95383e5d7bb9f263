"""Generated images: the built-in demo set (`--source synthetic`) and photo-like test pictures.

The demo set has 10 classes; a class is a hue plus a pattern (red disc, orange checkerboard, ...),
both strong enough to survive random 224 crops, flips and PCA lighting, so a small CNN learns them
in about a hundred steps. Sizes (150..900 px, a few above 1000 px), aspect ratios (0.5..2) and
formats (mostly JPEG of varying quality, some PNG) vary like ImageNet's, so the whole prep path is
exercised. Every image is a pure function of its key and label: the generator is seeded from a
SHA-256 of the key (not Python's salted `hash()`), so the same key gives the same bytes in any
process on the same Pillow build.

`photo(rng, width, height)` makes photo-like pixels (shapes with soft edges over gradients, 1/f
texture, fine noise) for the resize-quality tests and the throughput benchmark, where flat colour
would make JPEG decoding and resizing unrealistically cheap.
"""

from __future__ import annotations

import colorsys
import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw

from prep.contract import SPLITS, ClassInfo

# (name, pattern); class i has hue i * 36 degrees, so neighbouring classes differ in hue and pattern.
_KINDS = (
    ("red disc", "disc"),
    ("orange checkerboard", "checker"),
    ("yellow-green horizontal stripes", "hstripes"),
    ("green vertical stripes", "vstripes"),
    ("spring-green rings", "rings"),
    ("cyan diagonal stripes", "diagonal"),
    ("azure dots", "dots"),
    ("blue cross", "cross"),
    ("purple square", "square"),
    ("pink triangle", "triangle"),
)
CLASSES: list[ClassInfo] = [ClassInfo(i, f"syn{i:02d}", name) for i, (name, _) in enumerate(_KINDS)]
DEFAULT_PER_CLASS = {"train": 100, "validation": 20}

_RENDER_SCALE = 4  # patterns are drawn at 1/4 size and upscaled: keeps generation at a few ms
_ID_SPACE = 1_000_000  # train keys take sparse ids from this range, like ImageNet's n01440764_10026
MAX_PER_CLASS = _ID_SPACE  # images per class at most: a class's train ids are drawn from _ID_SPACE without repeats


def _rng_for(key: str) -> np.random.Generator:
    """A generator that depends on `key` only (stable across processes and Python runs)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def items(split: str, seed: int = 0, per_class: int | None = None) -> list[tuple[str, int]]:
    """(key, label) pairs of `split`, sorted by key.

    Train keys name their class (`syn03_004217`, sparse ids drawn with `seed`); validation keys do
    not (`synval_00000042`, labels assigned by a seeded permutation), as in ImageNet.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    n = DEFAULT_PER_CLASS[split] if per_class is None else per_class
    if n < 0:
        raise ValueError(f"per_class must be >= 0, got {n}")
    rng = np.random.default_rng((seed, SPLITS.index(split)))
    if split == "train":
        pairs = [
            (f"{c.wnid}_{i:06d}", c.index)
            for c in CLASSES
            for i in rng.choice(_ID_SPACE, size=n, replace=False)
        ]
    else:
        labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), n))
        pairs = [(f"synval_{j + 1:08d}", int(label)) for j, label in enumerate(labels)]
    return sorted(pairs)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): longer side 300..900 px (1 in 20: 1000..1400), aspect ratio 0.5..2."""
    long = int(rng.integers(1000, 1401)) if rng.random() < 0.05 else int(rng.integers(300, 901))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
    if aspect >= 1:
        return long, max(150, round(long / aspect))
    return max(150, round(long * aspect)), long


def _mask(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w) float32 in 0..1: where the class colour goes. Lengths are in units of the shorter
    side, so after the resize to 256 every image of a class shows its pattern at a similar scale."""
    short = min(w, h)
    y = (np.arange(h, dtype=np.float32)[:, None] - h / 2) / short  # centred, shorter side = 1
    x = (np.arange(w, dtype=np.float32)[None, :] - w / 2) / short
    period = rng.uniform(1 / 8, 1 / 4)  # 4..8 repeats across the shorter side
    phase = rng.uniform(0, 1)
    cx, cy = rng.uniform(-0.1, 0.1, size=2)  # shapes sit near the centre, inside the centre crop
    r = rng.uniform(0.25, 0.4)  # shape half-size
    dx, dy = x - cx, y - cy

    def wave(t):  # stripes of period 1 with half duty cycle
        return ((t + phase) % 1.0) < 0.5

    if kind == "disc":
        m = dx**2 + dy**2 < r**2
    elif kind == "checker":
        m = wave(x / period) ^ wave(y / period)
    elif kind == "hstripes":
        m = wave(y / period)
    elif kind == "vstripes":
        m = wave(x / period)
    elif kind == "rings":
        m = wave(np.sqrt(dx**2 + dy**2) / period)
    elif kind == "diagonal":
        m = wave((x + y) / (period * 1.4))
    elif kind == "dots":
        fx, fy = (x / period + phase) % 1.0 - 0.5, (y / period + phase) % 1.0 - 0.5
        m = fx**2 + fy**2 < 0.35**2
    elif kind == "cross":
        m = ((np.abs(dx) < r / 3) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 3) & (np.abs(dx) < r))
    elif kind == "square":
        m = (np.abs(dx) < r) & (np.abs(dy) < r)
    else:  # triangle, apex up
        m = (dy < r * 0.8) & (dy > 1.7 * np.abs(dx) - r)
    return np.broadcast_to(m, (h, w)).astype(np.float32)  # stripes come out as (1, w) or (h, 1)


def image_bytes(key: str, label: int) -> bytes:
    """The encoded image of (`key`, `label`): JPEG (quality 75..95) or, for some small ones, PNG."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(CLASSES) - 1}")
    rng = _rng_for(key)
    w, h = _size(rng)
    lw, lh = max(8, w // _RENDER_SCALE), max(8, h // _RENDER_SCALE)
    m = _mask(_KINDS[label][1], rng, lw, lh)[..., None]  # (lh, lw, 1)
    hue = (label / len(CLASSES) + rng.uniform(-0.03, 0.03)) % 1.0  # +-11 degrees, neighbours 36 apart
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)), np.float32)
    # A greyish background of any hue and brightness: it must not tell the class.
    bg_hsv = rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.15, 0.85)
    bg = np.array(colorsys.hsv_to_rgb(*bg_hsv), np.float32)
    pixels = 255 * (bg * (1 - m) + fg * m) + rng.normal(0, 10, (lh, lw, 3)).astype(np.float32)
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    # PNG costs about 20x a JPEG to write, so only small images (1 in 10 of those) become PNGs.
    if rng.random() < 1 / 10 and w * h <= 300_000:
        im.save(buf, format="PNG", compress_level=1)
    else:
        im.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 photo-like pixels: soft-edged shapes over a gradient, 1/f texture.

    Encoded as JPEG quality 90 a 500x375 picture is about 50 KB and 2400x1800 about 1.2 MB (ImageNet's
    average is about 110 KB at about 400x350), so decode and resize costs are realistic, if anything
    on the cheap side for decoding.
    """
    # The scene is drawn at half resolution; the bicubic upscale gives the soft edges of a real lens.
    hw, hh = max(1, width // 2), max(1, height // 2)
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, hh, dtype=np.float32)[:, None]
    sky = (top * (1 - t) + bottom * t).astype(np.uint8)  # (hh, 3): a vertical gradient
    im = Image.fromarray(np.repeat(sky[:, None, :], hw, axis=1))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(5, 15))):
        cx, cy = rng.uniform(0, hw), rng.uniform(0, hh)
        r = rng.uniform(0.03, 0.3) * min(hw, hh)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=colour)
    scene = np.asarray(im.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    # Luminance texture with a 1/f-like spectrum: noise added at every octave, coarse to fine
    # (each step doubles the resolution and scales the new noise by 0.8), down to single pixels.
    tex = rng.standard_normal((max(2, height // 128), max(2, width // 128)), dtype=np.float32) * 20
    amp = 20.0
    while tex.shape != (height, width):
        nh = height if tex.shape[0] * 4 > height else tex.shape[0] * 2
        nw = width if tex.shape[1] * 4 > width else tex.shape[1] * 2
        amp *= 0.8
        up = Image.fromarray(tex, "F").resize((nw, nh), Image.Resampling.BICUBIC)
        tex = np.asarray(up) + rng.standard_normal((nh, nw), dtype=np.float32) * amp
    return np.clip(scene + tex.astype(np.int16)[..., None], 0, 255).astype(np.uint8)
