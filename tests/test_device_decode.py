"""The decoders of JPEG batches for the device (train/device_decode.py): torchvision's and nvImageCodec's
give the same pixels as the workers' decoder, in the batch layout the model takes, and a JPEG that does
not decode is an error naming its shard. On the CPU nvImageCodec runs its libjpeg-turbo backend; the
CUDA test (hardware or GPU decoding) skips without a GPU."""

import sys

import numpy as np
import pytest
import torch
from torchcodec.encoders import JpegEncoder

from grey_shards import check_pixels, write_folder
from prep.synthetic import photo
from train.device_decode import DecoderUnavailable, import_nvimgcodec, make_decoder
from train.loader import DeviceLoader, decode_batch
from train.stream import Sample, ShardError, ShardStream, open_shards

CPU = torch.device("cpu")


def nvimgcodec_or_skip():
    try:
        import_nvimgcodec()
    except DecoderUnavailable as e:
        pytest.skip(str(e))


def photo_jpegs(n: int) -> list[torch.Tensor]:
    """n photo-like 256x256 q90 JPEGs (4:2:0 chroma, as the shards hold), as 1-D uint8 tensors."""
    rng = np.random.default_rng(7)
    return [JpegEncoder(torch.from_numpy(photo(rng, 256, 256)).permute(2, 0, 1).contiguous()).to_tensor(quality=90) for _ in range(n)]


def reference(jpegs: list[torch.Tensor]) -> torch.Tensor:
    """The workers' decode of the same JPEGs."""
    images, _ = decode_batch([Sample("shard", f"k{i}", j.numpy().tobytes(), 0) for i, j in enumerate(jpegs)])
    return images


@pytest.mark.parametrize("name", ["torchvision", "nvimgcodec"])
def test_device_decoders_give_the_workers_pixels_in_the_batch_layout(name):
    if name == "nvimgcodec":
        nvimgcodec_or_skip()
    jpegs = photo_jpegs(5)
    decode = make_decoder(name, CPU)
    for _ in range(2):  # a decoder serves batch after batch
        images = decode(jpegs)
        assert images.shape == (5, 3, 256, 256) and images.dtype == torch.uint8
        assert torch.equal(images, reference(jpegs))
    assert decode(jpegs[:2]).shape == (2, 3, 256, 256)  # a short last batch


def test_nvimgcodec_batches_through_the_loader_and_a_bad_jpeg_names_its_shard(tmp_path):
    nvimgcodec_or_skip()
    folder = write_folder(tmp_path)
    split = open_shards(str(folder)).split("validation")
    got = list(DeviceLoader(ShardStream(split, 4, train=False), CPU, workers=2, decode="gpu", gpu_decoder="nvimgcodec"))
    for images, labels in got:
        check_pixels(images, labels)
    assert sorted(sum((labels.tolist() for _, labels in got), [])) == list(range(11))

    path = folder / "validation-000001.tar"  # samples 4..8
    data = bytearray(path.read_bytes())
    jpg = data.index(b"\xff\xd8\xff")
    data[jpg + 2 : jpg + 700] = b"\x00" * 698
    path.write_bytes(bytes(data))
    stream = ShardStream(open_shards(str(folder)).split("validation"), 4, train=False)
    with pytest.raises(ShardError, match=rf"^{path}: a JPEG does not decode \(nvImageCodec could not decode 1 of 4 JPEGs\)$"):
        list(DeviceLoader(stream, CPU, workers=0, decode="gpu", gpu_decoder="nvimgcodec"))


def test_a_missing_or_unknown_decoder_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as if not installed
    with pytest.raises(DecoderUnavailable, match=r"^--gpu-decoder nvimgcodec: nvImageCodec is not installed .*'alexnet-shards\[nvimgcodec\]'$"):
        make_decoder("nvimgcodec", CPU)
    with pytest.raises(ValueError, match="unknown GPU decoder 'nvjpeg'"):
        make_decoder("nvjpeg", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["torchvision", "nvimgcodec"])
def test_cuda_decoders_come_close_to_the_workers_pixels(name):
    if name == "nvimgcodec":
        nvimgcodec_or_skip()
    jpegs = photo_jpegs(8)
    decode = make_decoder(name, torch.device("cuda"))
    for _ in range(3):
        images = decode(jpegs)
        assert images.is_cuda and images.shape == (8, 3, 256, 256) and images.dtype == torch.uint8
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two.
        assert (images.cpu().float() - reference(jpegs).float()).abs().mean() < 1.0
