"""One image in, one 256x256 baseline JPEG out: the per-image stage of `alexprep`.

`process(data)` decodes any image Pillow can identify among the formats ImageNet-like sources hold
(decided by content, never by file name), converts it to RGB, scales its shorter side to `size` with
a Lanczos filter, takes the central `size` x `size` crop (the AlexNet paper's preprocessing) and
encodes it as a baseline JPEG. Inputs that cannot be decoded raise `SkipImage` with a one-line reason
that the shard builder records.

Speed without changing the result (>= 40 dB PSNR against a full decode + Lanczos resize of the whole
image, see tests/test_image.py):
- JPEG draft mode: libjpeg scales large images by 1/2, 1/4 or 1/8 inside the inverse DCT, which is
  several times cheaper than decoding every pixel. We draft only down to >= 2x the target on the
  shorter side; drafting all the way to `size` loses detail (about 37 dB).
- Only the crop region is resampled (`Image.resize(box=...)`), with exactly the sample positions a
  whole-image resize followed by a crop would use, so the two agree pixel for pixel.

The reference geometry: shorter side -> `size`, longer side -> round(long * size / short), then a
crop at offset floor((resized - size) / 2) on each axis.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import PIL
from PIL import Image

from prep.stats import PixelSums

# Pillow's own default warning size (1024**3 // 4 // 3 pixels). ImageNet's largest image is about
# 12 MP, so anything above this is a hostile or broken header, not a photo. We check it ourselves so
# the limit holds whatever a caller did to Image.MAX_IMAGE_PIXELS.
MAX_PIXELS = 89_478_485

# The formats we accept, identified by content. Restricting Image.open keeps odd plugins (EPS runs
# Ghostscript) away from untrusted bytes. The JPEG opener also yields "MPO" (a JPEG with a
# multi-picture header, as some cameras write); both take draft mode. Shard bytes are JPEG only
# (`open_jpeg`).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

# What Pillow's readers raise on bad bytes, and so what becomes a skip with its reason: OSError
# (broken or truncated data), SyntaxError and ValueError (malformed headers and chunks), EOFError
# (data that ends early), struct.error and zlib.error (the plugins' own parsing), and TypeError and
# OverflowError (a TIFF tag of another type or size than the reader expects: a rational, a float or
# bytes where an offset belongs, an offset beyond C's range; found by the fuzz test in
# tests/test_image.py). Caught only around Pillow's calls on the bytes, so an error of our own code
# still shows as the bug it is.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, TypeError, OverflowError)

WHITE = (255, 255, 255)
SUBSAMPLING = "4:2:0"  # chroma halved both ways: Pillow's default below quality 100, stated explicitly


class SkipImage(Exception):
    """An input that cannot become a training image (or shard bytes that are not a usable JPEG);
    `str(e)` is the one-line reason."""


@dataclass(frozen=True)
class Resized:
    image: Image.Image  # size x size RGB: the pixels `process` encodes
    width: int  # original size, before any scaling
    height: int
    mode: str  # original PIL mode, e.g. "CMYK"
    format: str  # format detected from the content, e.g. "PNG"


@dataclass(frozen=True)
class Processed:
    jpeg: bytes  # baseline JPEG, size x size RGB
    width: int  # original size, before any scaling
    height: int
    mode: str  # original PIL mode, e.g. "CMYK"
    format: str  # format detected from the content, e.g. "PNG"
    sums: PixelSums | None = None  # of `jpeg`'s decoded pixels, when process(..., sums=True)


def pillow_flavour() -> str:
    """Which PIL is imported: "pillow-simd 12.1.1.post0" or "Pillow 13.0.0".

    pillow-simd installs the same `PIL` module as Pillow, and pip keeps both dists' metadata when it
    is overlaid, so the module's version decides: it matches the pillow-simd dist (".postN") only
    when pillow-simd's files are the ones on disk.
    """
    try:
        simd = importlib.metadata.version("pillow-simd")
    except importlib.metadata.PackageNotFoundError:
        simd = None
    if simd is not None and simd == PIL.__version__:
        return f"pillow-simd {PIL.__version__}"
    return f"Pillow {PIL.__version__}"


@contextlib.contextmanager
def _decoding(what: str, truncated: bool = False) -> Iterator[None]:
    """Around Pillow's calls on untrusted bytes: what a reader raises on bad bytes (DECODE_ERRORS, a
    bomb) becomes SkipImage with a one-line reason, `what: the reader's words`; with `truncated`, an
    OSError about truncation is "truncated image" (what decoding pixels says of a file cut short)."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise SkipImage(f"decompression bomb: {e}") from None
    except DECODE_ERRORS as e:
        if truncated and isinstance(e, OSError) and "truncated" in str(e):
            raise SkipImage("truncated image") from None
        raise SkipImage(f"{what}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _open(data: bytes, formats: tuple[str, ...] = FORMATS, unknown: str = "not an image: unidentified format",
          broken: str = "not an image") -> Image.Image:
    """Identify the image among `formats` and read its header (no pixels yet); bombs and empty sizes
    are refused. The reason is `unknown` where the content is none of `formats`, `broken: ...` where
    its header does not parse."""
    if not data:
        raise SkipImage("empty file")
    with _decoding(broken), warnings.catch_warnings():
        # Pillow warns between 1x and 2x its limit and raises above; we apply our own limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError:
            raise SkipImage(unknown) from None
    # Pillow itself refuses zero-sized headers ("not identified"), so they arrive here as `unknown`.
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise SkipImage(f"decompression bomb: {w}x{h} = {w * h} pixels > {MAX_PIXELS}")
    return im


def open_jpeg(data: bytes) -> Image.Image:
    """Decode shard bytes as a JPEG with Pillow's JPEG reader alone, whatever the bytes are: no other
    decoder can be reached from a shard (EPS would run Ghostscript, and every other plugin is code
    that shard bytes have no business reaching). Returns the loaded image (format "JPEG" or "MPO");
    raises SkipImage: "not a JPEG", or what the decoder said."""
    im = _open(data, ("JPEG",), unknown="not a JPEG", broken="unreadable JPEG")
    try:
        with _decoding("unreadable JPEG", truncated=True):
            im.load()
    except SkipImage:
        im.close()
        raise
    return im


def jpeg_sums(jpeg: bytes) -> PixelSums:
    """The pixel sums of a JPEG's decoded RGB pixels (the pixels a reader of the shards sees)."""
    with open_jpeg(jpeg) as im:
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        # One contiguous plane per channel straight from Pillow: no (H, W, 3) transpose.
        return PixelSums.of_planes(np.stack([np.asarray(band) for band in rgb.split()]))


def _reference_box(w: int, h: int, size: int) -> tuple[float, float, float, float]:
    """The source region (in original pixels) that becomes the size x size centre crop."""
    short = min(w, h)
    rw, rh = (size, round(h * size / w)) if w == short else (round(w * size / h), size)
    left, top = (rw - size) // 2, (rh - size) // 2
    # Multiply before dividing: an edge that is the image's own edge comes out exactly w or h.
    return (left * w / rw, top * h / rh, (left + size) * w / rw, (top + size) * h / rh)


def _draft_scale(w: int, h: int, size: int) -> int:
    """Largest DCT scale (1, 2, 4, 8) that keeps the shorter side >= 2 * size."""
    short = min(w, h)
    for scale in (8, 4, 2):
        if short >= 2 * size * scale:
            return scale
    return 1


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    """Decoded image -> "RGB" or "L" (grey stays one channel until after the resize: 3x less work)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG). Pillow's convert() clips at 255 instead of scaling, which would turn a
        # normal 16-bit photo white; keep the high byte. "I" is how older Pillows open the same files.
        a = np.asarray(im).astype(np.int64) >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite on white rather than dropping alpha: transparent pixels often hold arbitrary
        # (commonly black) colour, and a white page is how a viewer shows such an image.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    try:
        # CMYK (Adobe-inverted JPEGs are handled by Pillow's decoder), P, 1, YCbCr, ...: a plain
        # conversion, no ICC colour management, as ImageNet tooling has always done.
        return im.convert("RGB")
    except ValueError as e:
        raise SkipImage(f"unsupported mode {mode}: {e}") from None


def resize_crop(data: bytes, size: int = 256) -> Resized:
    """Decode `data`, scale the shorter side to `size` (Lanczos) and take the centre crop, in RGB.

    EXIF orientation is NOT applied: ImageNet's labels, boxes and every published pipeline use the
    stored pixel order. Multi-frame images (GIF, APNG) use their first frame.
    """
    with _open(data) as im:
        w, h = im.size
        mode, fmt = im.mode, im.format
        scale = _draft_scale(w, h, size)
        if scale > 1 and fmt in ("JPEG", "MPO"):
            # draft() returns the decoded region in drafted pixels: (0, 0, w / scale, h / scale).
            drafted = im.draft(im.mode, (w // scale, h // scale))
            scale = 1 if drafted is None else round(w / drafted[1][2])
        else:
            scale = 1
        with _decoding("unreadable image", truncated=True):
            im.load()
        img = _to_rgb_or_l(im)
        box = tuple(c / scale for c in _reference_box(w, h, size))
        out = img.resize((size, size), Image.Resampling.LANCZOS, box=box)
    if out.mode == "L":
        out = out.convert("RGB")
    # resize() copies the source's info (EXIF, ICC profile, JPEG comment); the JPEG writer would
    # carry the comment over. Clear it so the output depends on the pixels alone.
    out.info = {}
    return Resized(out, w, h, mode, fmt)


def process(data: bytes, size: int = 256, quality: int = 90, sums: bool = False) -> Processed:
    """`resize_crop`, then encode a baseline JPEG; with `sums`, also the JPEG's decoded pixel sums.

    The same bytes in give the same bytes out (with the same Pillow build). The sums are of the JPEG
    decoded again, the pixels a reader of the shards sees (why not the pixels before encoding:
    prep/stats.py).
    """
    r = resize_crop(data, size)
    buf = io.BytesIO()
    r.image.save(buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING, optimize=False, progressive=False)
    jpeg = buf.getvalue()
    return Processed(jpeg, r.width, r.height, r.mode, r.format, jpeg_sums(jpeg) if sums else None)
