"""Files with ImageNet's known quirks (and worse), for the image and source tests.

Every file is named like an ImageNet training image, `<folder name>_<quirk>.JPEG`, whatever its
real content: the pipeline must detect formats by content, as it must for ILSVRC-2012's one PNG
named `n02105855_2933.JPEG`. All files are small and written in milliseconds; the decompression
bombs are headers that declare a huge size over almost no data.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

WIDTH, HEIGHT = 160, 120  # the clean picture every convertible quirk is made from
# A black block that the alpha quirks make fully transparent; (left, top, right, bottom) in source
# pixels. It lies inside the 256x256 centre crop (source columns 20..140 of 160).
HOLE = (60, 0, 100, 40)


def scene() -> np.ndarray:
    """(HEIGHT, WIDTH, 3) uint8: colour gradients, a disc and a black block (HOLE); deterministic."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    r = 255 * x / (WIDTH - 1)
    g = 255 * y / (HEIGHT - 1)
    b = np.where((x - 100) ** 2 + (y - 60) ** 2 < 30**2, 230.0, 60.0)
    img = np.stack([r, g, b], -1)
    left, top, right, bottom = HOLE
    img[top:bottom, left:right] = 0
    return img.astype(np.uint8)


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG header declaring width x height RGB pixels, followed by a few bytes of image data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a baseline JPEG) with the size in its SOF0 header replaced; the scan stays small."""
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def malformed_tiffs() -> dict[str, bytes]:
    """The quirk scene as an uncompressed TIFF whose StripOffsets entry (tag 273) claims another field
    type, as a fuzzer found them: "rational_offset" (type 5, RATIONAL: Pillow's reader gets a fraction
    where an offset belongs, a TypeError) and "long8_offset" (type 16, LONG8: an 8-byte offset of 2**63,
    an OverflowError)."""
    data = encode(Image.fromarray(scene()), "TIFF")  # little-endian ("II"): IFD offset at byte 4
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = [ifd + 2 + 12 * k for k in range(struct.unpack_from("<H", data, ifd)[0])]  # tag, type, count, value
    entry = next(e for e in entries if struct.unpack_from("<H", data, e)[0] == 273)
    pixels = struct.unpack_from("<I", data, entry + 8)[0]  # one strip: the offset of the pixel data
    rational, long8 = bytearray(data), bytearray(data)
    struct.pack_into("<H", rational, entry + 2, 5)  # the 8 bytes at `pixels` read as a fraction
    struct.pack_into("<H", long8, entry + 2, 16)  # an 8-byte value no longer fits the entry: read at `pixels`
    struct.pack_into("<Q", long8, pixels, 2**63)
    return {"rational_offset": bytes(rational), "long8_offset": bytes(long8)}


def write_quirk_files(folder: Path) -> dict[str, str | None]:
    """Write one file per quirk into `folder`; return {filename: None if it must convert, else a
    substring of the reason it must be skipped with}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(scene())
    alpha = Image.new("L", rgb.size, 255)
    alpha.paste(0, HOLE)
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    gray16 = Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257)  # full 16-bit range, "I;16"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display; must NOT be applied
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    clean = encode(rgb, "JPEG", quality=90)
    png = encode(rgb, "PNG")

    cases: dict[str, tuple[bytes, str | None]] = {
        "rgb": (clean, None),
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG", quality=90), None),
        "gray": (encode(rgb.convert("L"), "JPEG", quality=90), None),
        "png": (png, None),
        "palette": (encode(palette, "PNG"), None),
        "palette_transparent": (encode(palette, "PNG", transparency=int(palette.getpixel(HOLE[:2]))), None),
        "rgba": (encode(rgba, "PNG"), None),
        "la": (encode(la, "PNG"), None),
        "gray16": (encode(gray16, "PNG"), None),
        "gif": (encode(palette, "GIF"), None),
        "progressive": (encode(rgb, "JPEG", quality=90, progressive=True), None),
        "exif_icc": (encode(rgb, "JPEG", quality=90, exif=exif.tobytes(), icc_profile=srgb, comment=b"x"), None),
        "tiny": (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "JPEG", quality=90), None),
        "truncated": (clean[: len(clean) // 2], "truncated"),
        "truncated_png": (png[: len(png) // 2], "truncated"),
        "garbage": (np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not an image"),
        "html": (b"<!DOCTYPE html><html><body>Flickr: photo unavailable</body></html>", "not an image"),
        "empty": (b"", "empty file"),
        "bomb": (png_bomb(20_000, 20_000), "decompression bomb"),  # 400 MP: Pillow's own error
        "bomb_jpeg": (jpeg_with_size(clean, 10_000, 9_000), "decompression bomb"),  # 90 MP: our limit
    }
    expected = {}
    for quirk, (data, reason) in cases.items():
        name = f"{folder.name}_{quirk}.JPEG"
        (folder / name).write_bytes(data)
        expected[name] = reason
    return expected
