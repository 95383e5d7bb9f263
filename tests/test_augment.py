"""Batched augmentation, checked exactly on images whose pixels encode their own coordinates."""

import numpy as np
import pytest
import torch

from prep.contract import ContractError, PixelStats
from prep.stats import PixelSums
from train.augment import StatsTensors, eval_views, lighting_alpha, lighting_offset, random_crop_flip, train_views


def photo_like_stats() -> dict:
    """stats.json as alexprep writes it (eigvec columns are vectors), of one seeded 256x256 picture
    whose channels share a grey level plus their own noise: like ImageNet's, a large first eigenvalue
    along about (1, 1, 1) / sqrt(3) and two small ones."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, (256, 256, 1)) + rng.integers(0, 56, (256, 256, 3))
    return PixelSums.of_image(pixels.astype(np.uint8)).stats().to_json()


STATS_JSON = photo_like_stats()


def tensors(stats: dict = STATS_JSON, device: str = "cpu") -> StatsTensors:
    return StatsTensors.of(PixelStats.from_json(stats, "stats"), device)


def pca_lighting(x, eigval, eigvec, std, generator):
    """Reference: the paper's PCA lighting on (B, 3, H, W) floats on the 0..1 scale, every pixel of
    image n shifted by eigvec @ (alpha_n * eigval), alpha_n ~ N(0, std); not clamped."""
    alpha = lighting_alpha(x.shape[0], std, generator, x.device)
    return x + lighting_offset(alpha, eigval, eigvec)[:, :, None, None]


def normalize(x, mean, std):
    """Reference: (..., 3, H, W) floats -> (x - mean) / std per channel."""
    return (x - mean[:, None, None]) / std[:, None, None]


def subtract_mean(x, mean):
    """Reference: the paper's inputs from (..., 3, H, W) floats on the 0..1 scale: 255 x - 255 mean."""
    return 255 * x - 255 * mean[:, None, None]


def coords(b, h, w):
    """uint8 (b, 3, h, w): channel 0 = row, channel 1 = column, channel 2 = image index (all < 256)."""
    assert max(b, h, w) <= 256
    x = torch.empty(b, 3, h, w, dtype=torch.uint8)
    x[:, 0] = torch.arange(h, dtype=torch.uint8)[:, None]
    x[:, 1] = torch.arange(w, dtype=torch.uint8)[None, :]
    x[:, 2] = torch.arange(b, dtype=torch.uint8)[:, None, None]
    return x


def decode_crops(out, size):
    """Check that every crop is a contiguous window of its own image, mirrored or not; return the
    (top, left, flipped) of each."""
    found = []
    ar = torch.arange(size)
    for n, crop in enumerate(out.long()):
        top, left_edge, right_edge = crop[0, 0, 0].item(), crop[1, 0, 0].item(), crop[1, 0, -1].item()
        flipped = left_edge > right_edge
        left = right_edge if flipped else left_edge
        cols = left + (ar.flip(0) if flipped else ar)
        assert torch.equal(crop[0], (top + ar)[:, None].expand(size, size)), n
        assert torch.equal(crop[1], cols[None, :].expand(size, size)), n
        assert torch.equal(crop[2], torch.full((size, size), n)), n
        found.append((top, left, flipped))
    return found


def test_crop_flip_windows_cover_every_offset():
    b, h, w, size = 256, 13, 11, 8  # 6 row offsets, 4 column offsets; 256 distinct image indices
    out = random_crop_flip(coords(b, h, w), size, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == (b, 3, size, size)
    found = decode_crops(out, size)
    # uniform over 0..H-size and 0..W-size, both ends included, and both flip outcomes
    assert {t for t, _, _ in found} == set(range(h - size + 1))
    assert {l for _, l, _ in found} == set(range(w - size + 1))
    flips = sum(f for _, _, f in found)
    assert 100 < flips < 156  # 128 expected, standard deviation 8


def test_crop_flip_full_size_images():
    out = random_crop_flip(coords(16, 256, 256), 224, torch.Generator().manual_seed(1))
    found = decode_crops(out, 224)
    assert all(0 <= t <= 32 and 0 <= l <= 32 for t, l, _ in found)
    assert {f for _, _, f in found} == {False, True}


def test_crop_flip_keeps_channels_last():
    x = coords(32, 20, 20)
    plain = random_crop_flip(x, 12, torch.Generator().manual_seed(2))
    last = random_crop_flip(x.contiguous(memory_format=torch.channels_last), 12, torch.Generator().manual_seed(2))
    assert plain.is_contiguous()
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, last)


def test_crop_flip_same_seed_same_output():
    x = torch.randint(0, 256, (64, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    first = random_crop_flip(x, 32, torch.Generator().manual_seed(7))
    assert torch.equal(first, random_crop_flip(x, 32, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, random_crop_flip(x, 32, torch.Generator().manual_seed(8)))


def test_crop_flip_rejects_bad_input():
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"crop size 33 does not fit 32 x 40 images"):
        random_crop_flip(coords(2, 32, 40), 33, g)
    with pytest.raises(ValueError, match=r"expected a uint8 \(B, 3, H, W\) batch, got torch.float32"):
        random_crop_flip(torch.zeros(2, 3, 32, 32), 16, g)


def test_stats_tensors_of_the_contracts_pixel_stats():
    s = tensors()
    assert s.eigvec.shape == (3, 3) and s.eigvec.dtype == torch.float32
    assert s.eigvec[0, 1].item() == pytest.approx(STATS_JSON["eigvec"][0][1])  # row 0, column 1: component 0 of vector 1
    assert s.eigval[0] > 10 * s.eigval[1] and s.eigvec[:, 0].tolist() == pytest.approx([3 ** -0.5] * 3, abs=0.01)
    with pytest.raises(ContractError, match=r"^pixel statistics: field 'eigval' missing or not of shape \(3,\)$"):
        PixelStats.from_json({k: v for k, v in STATS_JSON.items() if k != "eigval"}, "pixel statistics")
    with pytest.raises(ContractError, match=r"^pixel statistics: field 'std' missing or not of shape \(3,\)$"):
        PixelStats.from_json({**STATS_JSON, "std": [1.0, 2.0]}, "pixel statistics")


@pytest.mark.parametrize("key, value, message", [
    ("std", [0.229, 0.0, 0.225], "std [0.229, 0.0, 0.225] has a channel without spread (std must be above 0)"),
    ("std", [0.229, -0.1, 0.225], "std [0.229, -0.1, 0.225] has a channel without spread (std must be above 0)"),
    ("mean", [0.5, float("nan"), 0.4], "field 'mean' holds a value that is not a finite number: [0.5, nan, 0.4]"),
    ("eigval", [float("inf"), 0.1, 0.01], "field 'eigval' holds a value that is not a finite number: [inf, 0.1, 0.01]"),
    ("std", ["0.2", "x", "0.2"], "field 'std' holds a value that is not a finite number: ['0.2', 'x', '0.2']"),
    ("mean", "grey", "field 'mean' missing or not of shape (3,)"),
    ("eigvec", [[1, 0, 0], [0, 1], [0, 0, 1]], "field 'eigvec' missing or not of shape (3, 3)"),
])
def test_pixel_stats_refuses_values_that_cannot_scale_inputs(key, value, message):
    """std 0 would divide by zero, NaN or text would train on garbage: refused by the contract's
    check, one line naming the source and the field."""
    with pytest.raises(ContractError) as e:
        PixelStats.from_json({**STATS_JSON, key: value}, source="shards/stats.json")
    assert str(e.value) == f"shards/stats.json: {message}"


@pytest.mark.parametrize("key, value, field", [
    ("std", [1e300, 1e300, 1e300], "'std'"),  # finite in float64, inf in float32: all-zero inputs
    ("std", [1e-300, 0.2, 0.2], "'std'"),  # 0 in float32: inf inputs
    ("mean", [1e300, 0.4, 0.4], "'mean'"),
    ("eigval", [1e30, 0.01, 0.001], "'eigval'"),  # lighting offsets of 1e28
])
def test_pixel_stats_refuses_numbers_float32_cannot_train_on(key, value, field):
    """Each of these trained to a "done" run at chance, to a misleading "try a lower --lr", or to garbage."""
    with pytest.raises(ContractError, match=rf"^ckpt.pt: stats: field {field} "):
        PixelStats.from_json({**STATS_JSON, key: value}, source="ckpt.pt: stats")


def test_lighting_offset_is_the_formula():
    s = tensors()
    alpha = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0], [-0.3, 0.1, 0.2]])
    got = lighting_offset(alpha, s.eigval, s.eigvec)
    for n in range(3):
        for i in range(3):  # offset_i = sum_j eigvec[i][j] * alpha_j * eigval_j
            want = sum(STATS_JSON["eigvec"][i][j] * alpha[n, j].item() * STATS_JSON["eigval"][j] for j in range(3))
            assert got[n, i].item() == pytest.approx(want, abs=1e-7)


def test_pca_lighting_adds_one_offset_per_image():
    s = tensors()
    x = torch.rand(5, 3, 6, 7, generator=torch.Generator().manual_seed(4))
    got = pca_lighting(x, s.eigval, s.eigvec, 0.1, torch.Generator().manual_seed(9))
    alpha = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)) * 0.1
    offset = lighting_offset(alpha, s.eigval, s.eigvec)
    torch.testing.assert_close(got, x + offset[:, :, None, None], rtol=0, atol=1e-7)
    # not clamped: values may leave 0..1
    bright = pca_lighting(torch.ones(1000, 3, 1, 1), s.eigval, s.eigvec, 0.1, torch.Generator().manual_seed(0))
    assert bright.max() > 1.0


def test_pca_lighting_alpha_distribution():
    # Recover alpha from the offsets (eigvec is orthonormal): alpha_j = (eigvec^T offset)_j / eigval_j.
    s = tensors()
    n = 20000
    out = pca_lighting(torch.zeros(n, 3, 1, 1), s.eigval, s.eigvec, 0.1, torch.Generator().manual_seed(5))
    alpha = (out[:, :, 0, 0].double() @ s.eigvec.double()) / s.eigval.double()
    assert alpha.mean(0).abs().max() < 0.003  # 0.1 / sqrt(20000) = 0.0007 standard error
    assert (alpha.std(0) - 0.1).abs().max() < 0.003
    assert torch.corrcoef(alpha.T).sub(torch.eye(3, dtype=torch.float64)).abs().max() < 0.03


def test_normalize_exact():
    x = torch.tensor([0.75, 0.5, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    got = normalize(x, torch.tensor([0.5, 0.25, 0.5]), torch.tensor([0.25, 0.125, 0.5]))
    assert torch.equal(got, torch.tensor([1.0, 2.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2))


def test_train_views_is_crop_lighting_normalize():
    s = tensors()
    x = torch.randint(0, 256, (8, 3, 40, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    got = train_views(x, s, 32, scaling="standardize", generator=torch.Generator().manual_seed(11), lighting_std=0.1)
    g = torch.Generator().manual_seed(11)
    crops = random_crop_flip(x, 32, g).float() / 255
    lit = pca_lighting(crops, s.eigval, s.eigvec, 0.1, g)
    assert got.dtype == torch.float32 and got.shape == (8, 3, 32, 32)
    torch.testing.assert_close(got, normalize(lit, s.mean, s.std), rtol=0, atol=1e-5)
    last = train_views(
        x.contiguous(memory_format=torch.channels_last), s, 32, scaling="standardize", generator=torch.Generator().manual_seed(11)
    )
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, got, rtol=0, atol=0)
    # The paper's inputs: the same crops and lighting offsets in 0-255 units, minus the mean.
    paper = train_views(x, s, 32, scaling="subtract-mean", generator=torch.Generator().manual_seed(11), lighting_std=0.1)
    torch.testing.assert_close(paper, subtract_mean(lit, s.mean), rtol=0, atol=1e-3)


def test_subtract_mean_is_raw_pixels_minus_the_mean():
    """The paper's scaling keeps 0-255 units: a pixel of value v becomes v - 255 mean, exactly."""
    s = tensors({**STATS_JSON, "mean": [0.5, 0.25, 1.0]})
    x = torch.tensor([0, 100, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    (view,) = eval_views(x, s, 4, scaling="subtract-mean")
    assert torch.equal(view, torch.tensor([-127.5, 36.25, 0.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="input scaling must be one of subtract-mean, standardize, not 'unit'"):
        eval_views(x, s, 4, scaling="unit")


def test_eval_views_are_the_hand_cut_crops():
    s = tensors()
    # odd margins (7 and 11) pin the center's rounding: offsets 3 and 5
    x = torch.randint(0, 256, (4, 3, 31, 35), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    size = 24

    def norm(crop):
        return normalize(crop.float() / 255, s.mean, s.std)

    def paper(crop):
        return subtract_mean(crop.float() / 255, s.mean)

    corners = [
        x[:, :, :24, :24],  # top-left
        x[:, :, :24, 11:],  # top-right
        x[:, :, 7:, :24],  # bottom-left
        x[:, :, 7:, 11:],  # bottom-right
        x[:, :, 3:27, 5:29],  # center
    ]
    ten = eval_views(x, s, size, mode="ten", scaling="standardize")
    paper_ten = eval_views(x, s, size, mode="ten", scaling="subtract-mean")
    assert ten.shape == (10, 4, 3, size, size) and ten.dtype == torch.float32
    for v, crop in enumerate(corners):
        torch.testing.assert_close(ten[v], norm(crop), rtol=0, atol=1e-5)
        torch.testing.assert_close(ten[v + 5], norm(crop.flip(-1)), rtol=0, atol=1e-5)
        torch.testing.assert_close(paper_ten[v], paper(crop), rtol=0, atol=1e-4)
        torch.testing.assert_close(paper_ten[v + 5], paper(crop.flip(-1)), rtol=0, atol=1e-4)
    center = eval_views(x, s, size, mode="center", scaling="standardize")
    assert center.shape == (1, 4, 3, size, size)
    torch.testing.assert_close(center[0], norm(corners[4]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode must be 'center' or 'ten', not 'five'"):
        eval_views(x, s, size, mode="five", scaling="standardize")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views():
    s = tensors(device="cuda")
    x = torch.randint(0, 256, (64, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    xc = x.cuda().contiguous(memory_format=torch.channels_last)
    # draws on a CUDA generator: shapes, dtypes and devices
    out = train_views(xc, s, scaling="subtract-mean", generator=torch.Generator("cuda").manual_seed(0))
    assert out.shape == (64, 3, 224, 224) and out.dtype == torch.float32 and out.is_cuda
    assert out.is_contiguous(memory_format=torch.channels_last)
    # draws on a CPU generator are the same on any device, so the GPU result must match the CPU one
    for scaling, atol in (("standardize", 1e-5), ("subtract-mean", 1e-3)):
        got = train_views(xc, s, scaling=scaling, generator=torch.Generator().manual_seed(1))
        want = train_views(x, tensors(), scaling=scaling, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=atol)
        views = eval_views(xc, s, mode="ten", scaling=scaling)
        assert views.shape == (10, 64, 3, 224, 224) and views.is_cuda
        torch.testing.assert_close(views.cpu(), eval_views(x, tensors(), mode="ten", scaling=scaling))
