"""Pixel statistics: exact integer sums, the float64 finish, and agreement with numpy on real shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_PER_CLASS, DEMO_SHARD_SIZE
from PIL import Image

from prep.build import build_shards
from prep.contract import read_stats
from prep.image import jpeg_sums, process
from prep.stats import PixelSums, sample_every
from prep.synthetic import photo


def correlated_images(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8 with correlated, unequal-variance channels, like photos."""
    base = rng.normal(0, 1, (n, size, size, 3)) @ np.array([[50, 40, 30], [0, 25, -20], [0, 0, 8]])
    return np.clip(base + [120, 110, 100], 0, 255).astype(np.uint8)


def sums_of(images) -> PixelSums:
    total = PixelSums()
    for im in images:
        total.add(PixelSums.of_image(im))
    return total


def test_sums_are_exact_and_independent_of_order():
    images = correlated_images(np.random.default_rng(0), 6)
    x = images.reshape(-1, 3).astype(np.int64)
    total = sums_of(images)
    assert (total.num_images, total.num_pixels) == (6, 6 * 32 * 32)
    assert total.sum == x.sum(axis=0).tolist() and total.prod == (x.T @ x).tolist()
    assert sums_of(images[::-1]) == total
    assert PixelSums.from_json(json.loads(json.dumps(total.to_json()))) == total


def test_full_size_white_image_sums_exactly():
    white = PixelSums.of_image(np.full((256, 256, 3), 255, np.uint8))
    assert white.sum == [255 * 65536] * 3 and white.prod == [[255 * 255 * 65536] * 3] * 3


def test_stats_match_numpy_and_the_sign_convention():
    images = correlated_images(np.random.default_rng(1), 4)
    stats = sums_of(images).stats()
    x = images.reshape(-1, 3).astype(np.float64) / 255
    cov = np.cov(x.T, bias=True)  # population covariance, as in stats.json
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.cov, cov, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.std, x.std(axis=0), rtol=0, atol=1e-9)
    eigval, eigvec = np.array(stats.eigval), np.array(stats.eigvec)
    assert eigval[0] > eigval[1] > eigval[2] > 0
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-12)  # unit, orthogonal columns
    np.testing.assert_allclose(cov @ eigvec, eigvec * eigval, atol=1e-12)  # column j belongs to eigval[j]
    for j in range(3):
        column = eigvec[:, j]
        assert column[np.abs(column).argmax()] > 0
    assert (stats.num_images, stats.num_pixels, stats.scale) == (4, 4096, "0..1")
    assert stats.pixels == "after JPEG encoding (the shards' images decoded)"


def test_grey_images_have_one_principal_direction():
    grey = np.repeat(correlated_images(np.random.default_rng(2), 3)[..., :1], 3, axis=3)
    stats = sums_of(grey).stats()
    np.testing.assert_allclose(np.array(stats.eigvec)[:, 0], np.full(3, 3 ** -0.5), atol=1e-9)
    assert stats.eigval[0] == pytest.approx(3 * stats.std[0] ** 2, rel=1e-9)
    assert max(abs(v) for v in stats.eigval[1:]) < 1e-12


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no training pixels"):
        PixelSums().stats()
    with pytest.raises(ValueError, match=r"expected \(H, W, 3\) uint8 pixels"):
        PixelSums.of_image(np.zeros((4, 4), np.uint8))


def test_jpeg_sums_are_of_the_decoded_pixels():
    image = correlated_images(np.random.default_rng(4), 1)[0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=75)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        decoded = np.asarray(im)
    assert not np.array_equal(decoded, image)  # JPEG changed the pixels; the sums follow the decoded ones
    assert jpeg_sums(buf.getvalue()) == PixelSums.of_image(decoded)


def test_sums_of_odd_sizes_and_of_grey_and_cmyk_jpegs():
    image = correlated_images(np.random.default_rng(5), 1, size=37)[0]  # 1369 pixels: a partial chunk
    x = image.reshape(-1, 3).astype(np.int64)
    assert PixelSums.of_image(image) == PixelSums(1, 37 * 37, x.sum(axis=0).tolist(), (x.T @ x).tolist())
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(image).convert(mode).save(buf, format="JPEG", quality=90)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            decoded = np.asarray(im.convert("RGB"))
        assert jpeg_sums(buf.getvalue()) == PixelSums.of_image(decoded), mode


def test_process_sums_are_those_of_its_jpeg_decoded():
    buf = io.BytesIO()
    Image.fromarray(photo(np.random.default_rng(6), 500, 375)).save(buf, format="JPEG", quality=90)
    p = process(buf.getvalue(), sums=True)
    with Image.open(io.BytesIO(p.jpeg)) as im:
        assert p.sums == PixelSums.of_image(np.asarray(im))
    assert p.sums.num_pixels == 256 * 256 and process(buf.getvalue()).sums is None


def decoded_train_images(folder: Path, names: list[str]) -> list[np.ndarray]:
    """(256, 256, 3) uint8 pixels of every train sample in the shards `names`, decoded with Pillow."""
    images = []
    for name in names:
        with tarfile.open(folder / name) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        images.append(np.asarray(im.convert("RGB")))
    return images


def test_stats_are_those_of_every_shard_image_exactly(demo_shards):
    names = sorted(p.name for p in demo_shards.glob("train-*.tar"))
    # The shards' sums, added up from each shard's entries by the worker that finished it.
    assert read_stats(demo_shards) == sums_of(decoded_train_images(demo_shards, names)).stats()


def test_stats_agree_with_numpy_over_the_decoded_shards(demo_shards):
    stats = read_stats(demo_shards).to_json()
    names = sorted(p.name for p in demo_shards.glob("train-*.tar"))
    # numpy in float64, accumulated image by image (all 20M pixels at once would take 0.5 GB).
    n, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for image in decoded_train_images(demo_shards, names):
        x = image.reshape(-1, 3).astype(np.float64) / 255
        n, total, outer = n + len(x), total + x.sum(axis=0), outer + x.T @ x
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    assert (stats["num_images"], stats["num_pixels"]) == (DEMO_PER_CLASS["train"] * 10, n)
    # The issue asks for 1e-3 (mean, std, cov), 2% (eigenvalues) and eigenvectors up to sign; the sums
    # are exact, so only float64 rounding separates the two computations.
    np.testing.assert_allclose(stats["mean"], mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["std"], np.sqrt(np.diag(cov)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats["cov"], cov, rtol=0, atol=1e-9)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    np.testing.assert_allclose(stats["eigval"], eigval, rtol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(np.array(stats["eigvec"]) * eigvec, axis=0)), 1, atol=1e-6)


def test_the_sampling_step_keeps_splits_up_to_200k_exact_and_imagenet_at_one_in_eight():
    steps = [sample_every(n) for n in (0, 1, 199_999, 200_000, 350_000, 799_999, 800_000, 1_281_167, 10**9)]
    assert steps == [1, 1, 1, 2, 3, 7, 8, 8, 8]
    assert min(n // sample_every(n) for n in range(200_000, 2_000_000, 997)) >= 100_000


@pytest.fixture(scope="module")
def sampled_shards(tmp_path_factory) -> Path:
    """The demo's train split built again with statistics from every 3rd image."""
    out = tmp_path_factory.mktemp("sampled_shards")
    build_shards(out, source="synthetic", splits=("train",), per_class=DEMO_PER_CLASS["train"],
                 shard_size=DEMO_SHARD_SIZE, workers=2, stats_every=3)
    return out


def test_sampled_statistics_are_exact_over_every_kth_written_image(demo_shards, sampled_shards):
    names = sorted(p.name for p in demo_shards.glob("train-*.tar"))
    # The sample changes only the statistics: the shards are the demo build's, byte for byte.
    assert names == sorted(p.name for p in sampled_shards.glob("train-*.tar"))
    for name in names:
        assert (sampled_shards / name).read_bytes() == (demo_shards / name).read_bytes(), name
    images = decoded_train_images(demo_shards, names)  # in written order (the demo build skips nothing)
    assert len(images) == 300
    stats = read_stats(sampled_shards)
    assert stats == sums_of(images[::3]).stats(every=3)
    assert (stats.sample_every, stats.num_images, stats.num_pixels) == (3, 100, 100 * 256 * 256)
    assert read_stats(demo_shards).sample_every == 1  # a split under 200,000 images: every image

    # Against every image: the sample's mean pixel and mean channel products lie within 4 standard errors
    # of simple random sampling without replacement, from the spread of the images' own values.
    moments = np.stack([np.concatenate([x.mean(axis=0), (x[:, :, None] * x[:, None, :]).mean(axis=0).ravel()])
                        for x in (image.reshape(-1, 3).astype(np.float64) / 255 for image in images)])
    n, total = 100, len(moments)
    error = np.abs(moments[::3].mean(axis=0) - moments.mean(axis=0))
    standard_error = moments.std(axis=0, ddof=1) * np.sqrt((1 - n / total) / n)
    assert np.all(error <= 4 * standard_error), (error / standard_error).round(2)
    np.testing.assert_allclose(stats.mean, moments[::3, :3].mean(axis=0), rtol=0, atol=1e-12)
