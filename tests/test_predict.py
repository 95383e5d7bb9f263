"""predict prepares a picture exactly as alexprep prepares a shard image: the same formats, limits,
conversions, resize and JPEG round trip, then the loader's decode."""

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchcodec.decoders import decode_jpeg

from prep.build import build_shards
from quirk_images import malformed_tiffs, write_quirk_files
from train.predict import ImageError, load_image


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An ILSVRC-style folder of quirky pictures and the shards alexprep builds from it:
    (pictures by key, {key: shard JPEG bytes}, {key: skip reason})."""
    root = tmp_path_factory.mktemp("tree")
    pictures = {}
    for split, wnid in (("train", "n01440764"), ("val", "n01443537")):
        folder = root / split / wnid
        write_quirk_files(folder)
        for name, data in malformed_tiffs().items():  # TIFFs named .JPEG whose reader raises odd errors
            (folder / f"{wnid}_{name}.JPEG").write_bytes(data)
        pictures.update({p.stem: p for p in folder.iterdir()})
    out = tmp_path_factory.mktemp("shards")
    info = build_shards(out, source=str(root), shard_size=50, workers=1)
    jpegs, skipped = {}, {}
    for entry in info["splits"].values():
        skipped.update({s["key"]: s["reason"] for s in entry["skipped"]})
        for name in entry["filenames"]:
            with tarfile.open(out / name) as tar:
                jpegs.update({m.name[:-4]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")})
    return pictures, jpegs, skipped


def test_predict_sees_exactly_the_shard_image(built):
    pictures, jpegs, _ = built
    assert {key.split("_", 1)[1] for key in jpegs} >= {"gray16", "rgba", "la", "cmyk", "palette_transparent", "png", "rgb"}
    for key, data in jpegs.items():
        shard_image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")  # (3, 256, 256)
        assert torch.equal(load_image(pictures[key]), shard_image), key
    # A 16-bit grey PNG keeps its mid-grey level (a plain 8-bit conversion clips it to white), and a
    # transparent block is composited on white as alexprep does, not dropped to black.
    gray16 = load_image(pictures["n01440764_gray16"]).float()
    assert 100 < gray16.mean() < 160
    rgba = load_image(pictures["n01440764_rgba"])
    assert (rgba[:, 20, 120] > 240).all()  # inside the transparent block: white


def test_a_malformed_image_is_a_recorded_skip_in_the_build(built):
    """A TIFF whose reader raises TypeError or OverflowError once stopped the whole build (and predict)
    with a traceback; the build records it with its reason and goes on (predict: the next test)."""
    _, jpegs, skipped = built
    for wnid in ("n01440764", "n01443537"):
        for name in malformed_tiffs():
            assert skipped[f"{wnid}_{name}"].startswith("unreadable image: ")  # then the reader's words
        assert f"{wnid}_rgb" in jpegs  # the rest of its folder is written


def test_predict_refuses_what_alexprep_skips(built, tmp_path):
    pictures, _, skipped = built
    for key, reason in skipped.items():
        with pytest.raises(ImageError) as e:
            load_image(pictures[key])
        assert str(e.value) == f"{pictures[key]}: cannot read image ({reason})"
    assert any(r.startswith("decompression bomb") for r in skipped.values())
    # EPS would go to Ghostscript through Pillow's plugin: not a format alexprep reads.
    eps = tmp_path / "drawing.eps"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(eps, format="EPS")
    with pytest.raises(ImageError, match=r"drawing.eps: cannot read image \(not an image: unidentified format\)"):
        load_image(eps)
