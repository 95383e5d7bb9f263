"""Batches of JPEG bytes -> uint8 images on the training device (for decode "gpu" and "both").

Two decoders, picked by name (`--gpu-decoder`):
  - torchvision: `torchvision.io.decode_jpeg(list, device=...)`, nvJPEG; the Huffman decoding runs on
    the host, in the calling thread. torchvision 0.29 deprecates it in favour of TorchCodec, whose
    CUDA path has not been measured on a GPU here yet (docs/benchmarks.md), so it stays for now and
    its DeprecationWarning is silenced in this one call.
  - nvimgcodec: NVIDIA's nvImageCodec, an optional extra (pip install 'alexnet-shards[nvimgcodec]').
    On CUDA it prefers the GPU's hardware JPEG decoders (the NVJPG engines of A100, H100 and later),
    then nvJPEG on the GPU; on a CPU device it uses its libjpeg-turbo backend, which is how the tests
    check it against torchvision's decoder here.
Either returns a (B, 3, 256, 256) uint8 batch on the device, or raises RuntimeError for a JPEG that
does not decode.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

DECODES = ("cpu", "gpu", "both")  # where a batch's JPEGs are decoded: the loader's policy (train/loader.py)
GPU_DECODERS = ("torchvision", "nvimgcodec")


class DecoderUnavailable(Exception):
    """The chosen decoder cannot run here (a package that is not installed)."""


def make_decoder(name: str, device: torch.device):
    """The decoder called `name` for `device`: a callable from a list of 1-D uint8 CPU tensors (one
    JPEG each) to a uint8 (B, 3, H, W) batch on `device`."""
    if name == "torchvision":
        return TorchvisionDecoder(device)
    if name == "nvimgcodec":
        return NvImageCodecDecoder(device)
    raise ValueError(f"unknown GPU decoder {name!r}; one of {', '.join(GPU_DECODERS)}")


class TorchvisionDecoder:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, jpegs: list[torch.Tensor]) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")
            return torch.stack(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))


def import_nvimgcodec():
    """nvidia.nvimgcodec, or DecoderUnavailable with how to install it."""
    try:
        # At import its extensions print an error for each optional codec library that is not
        # installed (nvJPEG2000, nvTIFF); JPEG needs neither, so that noise is dropped.
        with _stderr_to_devnull():
            import nvidia.nvimgcodec as nvimgcodec
    except ImportError as e:
        raise DecoderUnavailable(f"--gpu-decoder nvimgcodec: nvImageCodec is not installed ({e}); "
                                 "pip install 'alexnet-shards[nvimgcodec]'") from None
    return nvimgcodec


@contextlib.contextmanager
def _stderr_to_devnull():
    """Point file descriptor 2 at /dev/null for the duration (C++ libraries write there directly)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class NvImageCodecDecoder:
    def __init__(self, device: torch.device):
        nvimgcodec = import_nvimgcodec()
        self.nvimgcodec, self.device = nvimgcodec, device
        if device.type == "cuda":
            kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
            device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            kinds, device_id = (nvimgcodec.BackendKind.CPU_ONLY,), nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
        self.decoder = nvimgcodec.Decoder(device_id=device_id, backends=[nvimgcodec.Backend(kind) for kind in kinds])
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                              allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.I_RGB)
        self.in_use = None  # (CUDA event, images): the last batch's buffers, alive until the copy out of them is done

    def __call__(self, jpegs: list[torch.Tensor]) -> torch.Tensor:
        streams = [self.nvimgcodec.CodeStream(jpeg.numpy()) for jpeg in jpegs]
        if self.device.type != "cuda":
            images = self._decoded(self.decoder.decode(streams, params=self.params))
            return torch.stack([torch.from_numpy(np.asarray(image)) for image in images]).permute(0, 3, 1, 2)
        # Decoded on the current stream, so the copy below is ordered after it. The copy only reads
        # the decoder's buffers once the device gets to it: they must outlive this call.
        stream = torch.cuda.current_stream(self.device)
        images = self._decoded(self.decoder.decode(streams, params=self.params, cuda_stream=stream.cuda_stream))
        batch = torch.stack([torch.as_tensor(image, device=self.device) for image in images])  # (B, H, W, 3)
        if self.in_use is not None:
            self.in_use[0].synchronize()
        self.in_use = (stream.record_event(), images)
        return batch.permute(0, 3, 1, 2)  # (B, 3, H, W), channels_last in memory

    @staticmethod
    def _decoded(images: list) -> list:
        failed = sum(image is None for image in images)
        if failed:
            raise RuntimeError(f"nvImageCodec could not decode {failed} of {len(images)} JPEGs")
        return images
