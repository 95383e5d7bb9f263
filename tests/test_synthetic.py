"""prep/synthetic.py: the demo set is deterministic, balanced, varied in size and format, and its
class is readable from the pixels."""

from __future__ import annotations

import collections
import colorsys
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prep.image import process
from prep.synthetic import CLASSES, image_bytes, items, photo


def test_classes_are_ten_named_pseudo_wnids():
    assert [c.index for c in CLASSES] == list(range(10))
    assert [c.wnid for c in CLASSES] == [f"syn{i:02d}" for i in range(10)]
    assert len({c.name for c in CLASSES}) == 10 and all(c.name for c in CLASSES)


def test_items_counts_keys_and_labels():
    train, val = items("train"), items("validation")
    assert len(train) == 1000 and len(val) == 200
    for pairs, per_class in ((train, 100), (val, 20)):
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert all("." not in k for k in keys)
        assert collections.Counter(label for _, label in pairs) == {c: per_class for c in range(10)}
    assert all(k.startswith(CLASSES[label].wnid + "_") and len(k) == 12 for k, label in train)
    assert [k for k, _ in val] == [f"synval_{i:08d}" for i in range(1, 201)]
    assert len(items("train", per_class=3)) == 30 and len(items("validation", per_class=0)) == 0


def test_items_are_seeded():
    assert items("train", seed=5) == items("train", seed=5)
    assert items("validation", seed=5) == items("validation", seed=5)
    assert {k for k, _ in items("train", seed=5)} != {k for k, _ in items("train", seed=6)}
    assert [label for _, label in items("validation", seed=5)] != [label for _, label in items("validation", seed=6)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        items("test")
    with pytest.raises(ValueError, match="per_class"):
        items("train", per_class=-1)
    with pytest.raises(ValueError, match="label 10 out of range"):
        image_bytes("syn00_000001", 10)


def test_image_bytes_are_a_function_of_key_and_label():
    key, label = items("train")[0]
    data = image_bytes(key, label)
    assert image_bytes(key, label) == data
    assert image_bytes(key, (label + 1) % 10) != data
    assert image_bytes(items("train")[1][0], label) != data
    # A fresh interpreter with another hash seed makes the same bytes (no salted hash()).
    code = f"import sys, prep.synthetic as s; sys.stdout.buffer.write(s.image_bytes({key!r}, {label}))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env).stdout
    assert out == data


@pytest.fixture(scope="module")
def sample() -> list[tuple[int, Image.Image, bytes]]:
    """(label, opened image, bytes) for 20 train images per class."""
    out = []
    for key, label in items("train", per_class=20):
        data = image_bytes(key, label)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            out.append((label, im, data))
    return out


def test_sizes_aspects_and_formats_vary(sample):
    sizes = [im.size for _, im, _ in sample]
    assert all(150 <= min(s) and max(s) <= 1400 for s in sizes)
    assert 1 <= sum(max(s) > 1000 for s in sizes) <= 20  # a few large ones (1 in 20 expected)
    aspects = [w / h for w, h in sizes]
    assert 0.49 <= min(aspects) < 0.6 and 1.7 < max(aspects) <= 2.01
    assert min(min(s) for s in sizes) < 200 and max(max(s) for s in sizes if max(s) <= 1000) > 800
    formats = collections.Counter(im.format for _, im, _ in sample)
    assert set(formats) == {"JPEG", "PNG"} and 3 <= formats["PNG"] <= 30
    assert {im.mode for _, im, _ in sample} == {"RGB"}


def _dominant_hue(pixels: np.ndarray) -> float:
    """Hue (0..1) of the average of the strongly coloured pixels (chroma above half the maximum)."""
    rgb = pixels.reshape(-1, 3).astype(np.float32) / 255
    chroma = rgb.max(1) - rgb.min(1)
    top = rgb[chroma >= chroma.max() / 2].mean(0)
    return colorsys.rgb_to_hsv(*top)[0]


def test_class_is_readable_from_the_pixels(sample):
    # A nearest-hue rule on the 256x256 crops (what the trainer sees) must name every class: the
    # label is in the pixels, strongly.
    half = sample[::2]  # 10 per class
    hits = 0
    for label, _, data in half:
        hue = _dominant_hue(np.asarray(Image.open(io.BytesIO(process(data).jpeg)).convert("RGB")))
        guess = min(range(10), key=lambda c: min(abs(hue - c / 10), 1 - abs(hue - c / 10)))
        hits += guess == label
    assert hits == len(half)


def test_photo_is_deterministic_textured_pixels():
    a = photo(np.random.default_rng(3), 500, 375)
    assert a.shape == (375, 500, 3) and a.dtype == np.uint8
    assert np.array_equal(a, photo(np.random.default_rng(3), 500, 375))
    assert not np.array_equal(a, photo(np.random.default_rng(4), 500, 375))
    # Texture at the pixel scale: neighbouring pixels differ, as in a photo (not flat colour).
    assert np.abs(np.diff(a.astype(np.int16), axis=1)).mean() > 2
    assert a.std() > 30
