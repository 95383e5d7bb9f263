"""prep/image.py: every quirk converts or skips as declared, the output is exactly the paper's crop
as a deterministic baseline JPEG, and draft-mode speed-ups stay >= 40 dB from the full reference."""

from __future__ import annotations

import importlib.metadata
import io
import random
import struct
import warnings
import zlib

import numpy as np
import PIL
import pytest
from PIL import Image, ImageFile, JpegImagePlugin
from quirk_images import HEIGHT, HOLE, WIDTH, encode, jpeg_with_size, malformed_tiffs, scene, write_quirk_files

from prep.image import MAX_PIXELS, SkipImage, open_jpeg, pillow_flavour, process, resize_crop
from prep.synthetic import photo

# What each convertible quirk must be detected as: (format from the content, original mode).
DETECTED = {
    "rgb": ("JPEG", "RGB"),
    "cmyk": ("JPEG", "CMYK"),
    "gray": ("JPEG", "L"),
    "png": ("PNG", "RGB"),
    "palette": ("PNG", "P"),
    "palette_transparent": ("PNG", "P"),
    "rgba": ("PNG", "RGBA"),
    "la": ("PNG", "LA"),
    "gray16": ("PNG", "I;16"),
    "gif": ("GIF", "P"),
    "progressive": ("JPEG", "RGB"),
    "exif_icc": ("JPEG", "RGB"),
    "tiny": ("JPEG", "RGB"),
}
SKIPPED = ("truncated", "truncated_png", "garbage", "html", "empty", "bomb", "bomb_jpeg")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def reference(data: bytes, size: int = 256) -> np.ndarray:
    """The slow, obvious pipeline: full decode, RGB, Lanczos on the whole image, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    rw, rh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    left, top = (rw - size) // 2, (rh - size) // 2
    resized = rgb.resize((rw, rh), Image.Resampling.LANCZOS)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def pixels(data: bytes, size: int = 256) -> np.ndarray:
    """(size, size, 3) uint8: the pixels `process` encodes."""
    return np.asarray(resize_crop(data, size).image)


def check_output(p, data: bytes, size: int = 256, quality: int = 90) -> None:
    """`p.jpeg` is a size x size RGB baseline 4:2:0 JPEG without metadata, made from `pixels(data)`."""
    assert pixels(data, size).shape == (size, size, 3) and pixels(data, size).dtype == np.uint8
    with Image.open(io.BytesIO(p.jpeg)) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (size, size))
        assert "progressive" not in im.info and "progression" not in im.info
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
        assert not {"exif", "icc_profile", "comment"} & set(im.info)
    # Exactly the returned pixels, encoded with the documented settings.
    again = encode(Image.fromarray(pixels(data, size)), "JPEG", quality=quality, subsampling="4:2:0")
    assert p.jpeg == again


@pytest.fixture(scope="module")
def quirks(tmp_path_factory) -> dict[str, tuple[bytes, str | None]]:
    """{quirk: (file bytes, expected skip reason or None)} from the shared quirk writer."""
    folder = tmp_path_factory.mktemp("quirks") / "n01440764"
    expected = write_quirk_files(folder)
    prefix = f"{folder.name}_"
    assert all(name.startswith(prefix) and name.endswith(".JPEG") for name in expected)
    return {name[len(prefix) : -len(".JPEG")]: ((folder / name).read_bytes(), r) for name, r in expected.items()}


def test_every_quirk_converts_or_skips_as_declared(quirks):
    assert set(quirks) == set(DETECTED) | set(SKIPPED)
    for quirk, (data, reason) in quirks.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning (or anything else) leaks
            if reason is None:
                p = process(data)
                assert (p.format, p.mode) == DETECTED[quirk], quirk
                assert (p.width, p.height) == ((1, 1) if quirk == "tiny" else (WIDTH, HEIGHT)), quirk
                check_output(p, data)
            else:
                assert quirk in SKIPPED
                with pytest.raises(SkipImage, match=reason):
                    process(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files were refused, not patched over


def test_skip_reasons_are_one_clear_line(quirks):
    reasons = {}
    for quirk in SKIPPED:
        with pytest.raises(SkipImage) as e:
            process(quirks[quirk][0])
        reasons[quirk] = str(e.value)
    assert reasons["truncated"] == reasons["truncated_png"] == "truncated image"
    assert reasons["garbage"] == reasons["html"] == "not an image: unidentified format"
    assert reasons["empty"] == "empty file"
    assert reasons["bomb_jpeg"] == f"decompression bomb: 10000x9000 = 90000000 pixels > {MAX_PIXELS}"
    assert reasons["bomb"].startswith("decompression bomb: ") and "400000000 pixels" in reasons["bomb"]
    assert all("\n" not in r for r in reasons.values())


def _out_xy(x: float, y: float) -> tuple[int, int]:
    """Output pixel (row, col) of source point (x, y) of the quirk scene (160x120 -> 341x256, crop)."""
    scale = 256 / HEIGHT
    return int(y * scale), int(x * scale) - (round(WIDTH * scale) - 256) // 2


def test_quirks_keep_their_colours(quirks):
    out = {q: pixels(data) for q, (data, reason) in quirks.items() if reason is None}
    lossless = reference(encode(Image.fromarray(scene()), "PNG"))
    assert psnr(out["png"], lossless) > 70  # same pixels up to the crop-region resampling
    for q in ("rgb", "cmyk", "progressive", "exif_icc"):
        assert psnr(out[q], lossless) > 30, q  # JPEG q90 of the scene's hard edges; naive CMYK round trip
    for q in ("palette", "gif"):
        assert psnr(out[q], lossless) > 25, q  # 64-colour palette
    # EXIF orientation is not applied and metadata does not change pixels.
    assert np.array_equal(out["exif_icc"], out["rgb"])
    # 16-bit grey keeps its high byte (a plain convert() would clip to white).
    gray8 = pixels(encode(Image.fromarray(scene()).convert("L"), "PNG"))
    assert np.array_equal(out["gray16"], gray8)
    for q in ("gray", "gray16", "la"):
        assert np.array_equal(out[q][..., 0], out[q][..., 1]) and np.array_equal(out[q][..., 0], out[q][..., 2]), q
    # Alpha is composited on white; the opaque rest is untouched.
    hole = _out_xy((HOLE[0] + HOLE[2]) / 2, (HOLE[1] + HOLE[3]) / 2)
    for q in ("rgba", "la", "palette_transparent"):
        assert out[q][hole].min() >= 250, q
    assert out["palette"][hole].max() <= 40  # the same block without transparency is black
    assert np.array_equal(out["rgba"][200:], out["png"][200:])
    assert out["tiny"].reshape(-1, 3).tolist() == [[10, 200, 30]] * 256 * 256


@pytest.mark.parametrize("w, h, left, top", [(600, 256, 172, 0), (256, 700, 0, 222), (256, 256, 0, 0)])
def test_crop_is_the_exact_centre(w, h, left, top):
    # Shorter side already 256: the output must be the centre crop itself, pixel for pixel.
    a = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(pixels(encode(Image.fromarray(a), "PNG")), a[top : top + 256, left : left + 256])


def test_same_input_same_bytes(quirks):
    data = quirks["rgb"][0]
    first = process(data)
    assert process(data).jpeg == first.jpeg
    low = process(data, quality=75)
    assert low.jpeg != first.jpeg
    check_output(first, data)
    check_output(low, data, quality=75)
    check_output(process(data, size=64), data, size=64)
    assert psnr(pixels(data, 64), reference(data, size=64)) > 40


def _photo_jpeg(w: int, h: int) -> bytes:
    return encode(Image.fromarray(photo(np.random.default_rng(w + 7 * h), w, h)), "JPEG", quality=90)


@pytest.fixture
def draft_scales(monkeypatch) -> list[int]:
    """Records the DCT scale of every JPEG draft() call (1 = not drafted)."""
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        w = self.size[0]
        result = original(self, mode, size)
        scales.append(1 if result is None else round(w / self.size[0]))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return scales


@pytest.mark.parametrize("w, h", [(500, 375), (375, 500), (500, 333), (640, 480)])
def test_imagenet_sized_photos_match_full_lanczos(w, h, draft_scales):
    data = _photo_jpeg(w, h)
    p = process(data)
    assert psnr(pixels(data), reference(data)) >= 40
    assert draft_scales == []  # shorter side < 512: never drafted
    # The stored JPEG decodes close to the pixels it was encoded from.
    with Image.open(io.BytesIO(p.jpeg)) as im:
        assert psnr(np.asarray(im), pixels(data)) > 33


@pytest.mark.slow
@pytest.mark.parametrize("w, h, scale", [(1100, 1000, 1), (2400, 1800, 2), (1536, 2600, 2), (4200, 2800, 4)])
def test_large_photos_draft_and_stay_within_40db(w, h, scale, draft_scales):
    data = _photo_jpeg(w, h)
    p = process(data)
    assert draft_scales == ([] if scale == 1 else [scale])
    assert (p.width, p.height) == (w, h)
    assert psnr(pixels(data), reference(data)) >= 40


def test_pixel_limit_is_ours_not_pillows(quirks, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller switched Pillow's check off
    with pytest.raises(SkipImage, match="decompression bomb"):
        process(quirks["bomb_jpeg"][0])
    # Just under the limit is a legal size. libjpeg fills the missing scan with grey (the scan
    # ends with a proper EOI marker, so Pillow does not call it truncated); drafting by 8 keeps
    # this cheap.
    assert 9_459 * 9_459 <= MAX_PIXELS
    p = process(jpeg_with_size(quirks["rgb"][0], 9_459, 9_459))
    assert (p.width, p.height) == (9_459, 9_459)


def test_pillow_flavour_names_the_imported_pil():
    flavour = pillow_flavour()
    assert flavour in (f"pillow-simd {PIL.__version__}", f"Pillow {PIL.__version__}")
    # pillow-simd's versions carry a ".postN" suffix; Pillow's releases never do.
    assert flavour.startswith("pillow-simd") == (".post" in PIL.__version__)
    if flavour.startswith("pillow-simd"):
        assert importlib.metadata.version("pillow-simd") == PIL.__version__


# ---------------------------------------------------------------------------------------------
# Bad bytes: a skip with its reason, never another exception


def test_tiffs_whose_reader_raises_type_or_overflow_errors_are_skips():
    """A TIFF tag of another type than its reader expects raised TypeError / OverflowError out of
    process() and stopped the build at every rerun."""
    for name, data in malformed_tiffs().items():
        with pytest.raises(SkipImage, match="^unreadable image: "):
            process(data)


def fuzz_seeds() -> dict[str, bytes]:
    """Small JPEG, PNG and TIFF files of the kinds sources hold: what the fuzz test mutates."""
    pic = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    grey16 = pic.convert("L").convert("I;16")
    return {
        "jpeg": encode(pic, "JPEG", quality=75), "jpeg_progressive": encode(pic, "JPEG", progressive=True),
        "jpeg_cmyk": encode(pic.convert("CMYK"), "JPEG"),
        "png": encode(pic, "PNG"), "png_palette": encode(pic.convert("P"), "PNG"), "png_16": encode(grey16, "PNG"),
        "tiff": encode(pic, "TIFF"), "tiff_grey_dpi": encode(pic.convert("L"), "TIFF", dpi=(72.5, 72.5)),
        "tiff_cmyk": encode(pic.convert("CMYK"), "TIFF"), "tiff_1": encode(pic.convert("1"), "TIFF"),
        "tiff_16": encode(grey16, "TIFF"),
    }


INTERESTING = [0, 1, 2, 3, 5, 7, 12, 16, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


def _tiff_entries(d: bytearray) -> list[int]:
    """Byte offsets of the IFD entries (tag, type, count, value) of a little-endian TIFF, as far as they lie in `d`."""
    try:
        ifd = struct.unpack_from("<I", d, 4)[0]
        return [e for e in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", d, ifd)[0], 12) if e + 12 <= len(d)]
    except struct.error:
        return []


def _png_chunks(d: bytearray) -> list[tuple[int, int]]:
    """(offset, payload length) of each whole PNG chunk in `d`."""
    chunks, i = [], 8
    while i + 12 <= len(d) and i + 12 + (n := struct.unpack_from(">I", d, i)[0]) <= len(d):
        chunks.append((i, n))
        i += 12 + n
    return chunks


def mutate(r: random.Random, kind: str, data: bytes) -> bytes:
    """1-3 mutations: a TIFF entry's type, count or value; a byte of a PNG chunk with its CRC made
    right again (so the reader goes past the check); or, for any file, a byte set, bytes inserted or
    deleted, or the end cut, mostly in the first 700 bytes where the headers are."""
    d = bytearray(data)
    for _ in range(r.randint(1, 3)):
        tiff, png = (_tiff_entries(d) if kind.startswith("tiff") else []), (_png_chunks(d) if kind.startswith("png") else [])
        if (tiff or png) and r.random() < 0.7:
            if tiff:
                e = r.choice(tiff)
                field = r.choice([(e + 2, "<H", r.choice([1, 2, 3, 4, 5, 7, 10, 11, 12, 16, 99])), (e + 4, "<I", None), (e + 8, "<I", None)])
                struct.pack_into(field[1], d, field[0], field[2] if field[2] is not None else r.choice(INTERESTING + [r.getrandbits(32)]))
            else:
                i, n = r.choice(png)
                if n:
                    d[i + 8 + r.randrange(n)] = r.choice([0, 1, 2, 3, 4, 6, 8, 16, 0x7F, 0x80, 0xFF, r.randrange(256)])
                struct.pack_into(">I", d, i + 8 + n, zlib.crc32(bytes(d[i + 4 : i + 8 + n])))
            continue
        i = r.randrange(min(len(d), 700)) if r.random() < 0.8 else r.randrange(len(d))
        op = r.random()
        if op < 0.6:
            d[i] = r.choice([0, 1, 0x7F, 0x80, 0xFF, r.randrange(256)])
        elif op < 0.8:
            d[i:i] = r.randbytes(r.randint(1, 4))
        elif op < 0.9:
            del d[i : i + r.randint(1, 4)]
        else:
            d = d[: max(1, i)]
    return bytes(d)


def test_fuzzed_images_process_or_skip_with_a_reason():
    """3,000 mutated JPEG, PNG and TIFF files (fixed seed) through the build's `process` and the
    shard readers' `open_jpeg`: each returns, or raises SkipImage with a one-line reason; no other
    exception gets out (found this way: TypeError and OverflowError from TIFF tags)."""
    seeds, r = fuzz_seeds(), random.Random(20)
    outcomes = {"processed": 0, "skipped": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about some broken files; the outcome is what counts here
        for k in range(3000):
            kind = list(seeds)[k % len(seeds)]
            data = mutate(r, kind, seeds[kind])
            for read in (process, open_jpeg):
                try:
                    read(data)
                    outcomes["processed"] += 1
                except SkipImage as e:
                    assert str(e) and "\n" not in str(e), (kind, k)
                    outcomes["skipped"] += 1
    assert outcomes["processed"] > 1000 and outcomes["skipped"] > 1000  # the mutations reach past the headers
