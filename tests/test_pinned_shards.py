"""Pinned shard bytes (issue 16 item 5): what `alexprep build-shards` writes, byte for byte.

The sha256 of every file of a few fixed builds (each shard, `_info.json`, `stats.json`), taken from
main at 1362294 (2026-12-05), before prep/ was reorganised: the synthetic source with 1, 2 and 3
workers; a small parquet repo read from a local folder and through the stand-in Hub with 1 and 2
workers; each also with `--limit` and `--stats-every`. A change that alters these bytes on purpose
updates the digests here and says why in its commit. Changed since: `_info.json` records the inputs
digest (`inputs`, the per-split sha256 that `.build/options.json` held), nothing else in it.

What depends on the machine or the folder, not on the code, is left out:
- the source folder's absolute path in `_info.json` (`options.source`) reads SOURCE;
- `stats.json`'s eigenvalues and eigenvectors are rounded to 12 decimals: numpy's LAPACK (OpenBLAS)
  picks its kernels by CPU, and its AVX-512 ones (SkylakeX, chosen on Intel Xeons; this AMD EPYC gets
  Haswell's) change their last bits, by up to 8e-16 here (each pinned value is over 1e-14 from a
  rounding boundary); everything else in it comes from exact integer sums;
- the Pillow build: pillow-simd and stock Pillow have their own resize code and JPEG library, so the
  digests are those of one build (PINNED_PILLOW, the one scripts/setup.sh installs and CI uses), and
  the tests skip, saying why, under any other.
Checked not to change the digests (this machine, 2026-12-06): the worker count, libjpeg-turbo's SIMD
(JSIMD_FORCENONE=1, JSIMD_FORCESSE2=1), numpy without its AVX-512 or AVX2 loops
(NPY_DISABLE_CPU_FEATURES), OpenBLAS's other kernels (OPENBLAS_CORETYPE from Prescott to Zen, and
SkylakeX once rounded), glibc told to hide AVX-512 (GLIBC_TUNABLES).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubstub import make_imagenet_like_repo
from PIL import features

from prep.cli import main
from prep.contract import INFO_NAME, STATS_NAME
from prep.image import pillow_flavour

PINNED_PILLOW = "pillow-simd 12.1.1.post0, libjpeg-turbo 2.1.5"


def pillow_build() -> str:
    """The Pillow build the shard bytes depend on: flavour and version, and its JPEG library."""
    return f"{pillow_flavour()}, libjpeg-turbo {features.version_feature('libjpeg_turbo')}"


pinned_pillow = pytest.mark.skipif(pillow_build() != PINNED_PILLOW, reason=(
    f"shard bytes pinned under {PINNED_PILLOW} (what scripts/setup.sh installs); this is {pillow_build()}"))
pytestmark = [pinned_pillow, pytest.mark.slow]  # 15 builds, about 12 s of CPU

# 10 classes x 30 train / 10 validation images, 32 per shard: 10 + 4 shards, the last of each split
# ragged (12 and 4 samples). The same build as conftest's `demo_shards` (its shards feed tests/test_pinned_run.py).
SYNTHETIC = ["--source", "synthetic", "--per-class", "train=30", "--per-class", "validation=10", "--shard-size", "32"]
# The parquet repo below: 3 train files of 24 class-sorted rows, 2 validation files of 12, 1 test file
# of 4 (not built), in row groups of 8 rows; 20 per shard: 4 + 2 shards, ragged (12 and 4 samples).
PARQUET = ["--shard-size", "20"]
# A trial: 50 of the 300 synthetic inputs of train (single items), 22 of the 72 parquet ones (two whole row
# groups and part of a third) and of the 24 of validation; statistics from every 3rd train image.
SYNTHETIC_LIMITED = SYNTHETIC + ["--limit", "50", "--stats-every", "3"]
PARQUET_LIMITED = PARQUET + ["--limit", "22", "--stats-every", "3"]

# File name -> sha256, from main at 1362294 under PINNED_PILLOW (`_info.json`: with its `inputs` record).
PINNED_SYNTHETIC = {
    "_info.json": "8706a2d898c8c282a6b1cb2f62ec63e0d6573ff63d225a1b8350d867f21dc59d",
    "stats.json": "fd153920f7945e64a9c4d16aa2785104096293fe114ac32de16410ef0fefcca4",
    "train-000000.tar": "2adac8053acc88f8bee92e336d8597374af9a7acd91646f15f16f27c0e28083a",
    "train-000001.tar": "e025f446abb0639e86af787dafa1aefe7cd30c64963b8d3bd1a3ec52cfaac9e6",
    "train-000002.tar": "702aef63019146f700a1d7aa6095dcf161213350c1f79f8524ec9ee6efea2a49",
    "train-000003.tar": "3ccff3890874cd36283958a9e0e1d8871de5d7b647a3b3157f9a3e01996012e6",
    "train-000004.tar": "f88b86111de072febccb8d31330b0c14f05572f168c03a3980252fab3ca41ac6",
    "train-000005.tar": "64a1617a10bdaef605936bfa5e6faea4c4e68524147d0493db6b9f3d15768895",
    "train-000006.tar": "ba1b40e20e6df3a71203e06845ac0651b22164d9ccfe23b1ec43ebac7214876d",
    "train-000007.tar": "baf8ab3a28b904e1624a867d273a8abbc11b8d184a2c0ebb43db3c4fe3ea42cb",
    "train-000008.tar": "0fe7df9f955dd2b94fdfa0fa87eb58d5d7c23f33eda28d7d25d213851aef197a",
    "train-000009.tar": "0bce4a464cabb1ba7e6a14a13f922e1c6a1639e8bcc7d8dcfc6c4665ad859099",
    "validation-000000.tar": "f4431a07c6054a53c62a207bc548e6eb8fce787b5fc3b6a1ecaebe831b78b0e7",
    "validation-000001.tar": "3415a98515c7ea665402de4102d055a5d65c23a93d5236d31f9aee76e9793b75",
    "validation-000002.tar": "260b0bd9d777e912ef572dc8b8236b1b7d85f8000fea4ed78e1c5744e41faa4e",
    "validation-000003.tar": "ec57e0ad47c14caf41591a3fe140b739ffabe375d89e4ba425e362877ab6906f",
}
PINNED_SYNTHETIC_LIMITED = {
    "_info.json": "9272a6dacd609f5b580a8745497576991319cf37dee516cf334fc07fa35ce7be",
    "stats.json": "ae4041ebfca039f1ac31774bc5210dde3cec28659f85906f6c7d4ff75f056d7f",
    "train-000000.tar": "cd3e0ef564ec2d204be84d6601bb80d21961c163b97b5f2c7104ef033bfb02ff",
    "train-000001.tar": "6c84018ba283d139bb71dc611d4df31a04f43611ec6da3d0edeba8c46005a9fe",
    "validation-000000.tar": "f4f0e07a8333304dcf5180e9c296151f391a4c8b8731fa000a4f0d71acf04330",
    "validation-000001.tar": "46bec6160dfd63a281376a5a150d47b46d212c22d59b4076d51ecea0662a1d4a",
}
PINNED_PARQUET = {  # the local folder (`options.source` "parquet:SOURCE")
    "_info.json": "f746e42ff594fbdf3fceb4e7d2b969e07afff57e587aa1808482e7b0d92b01e8",
    "stats.json": "c96270cffc3e55dcaa896235f695c79ccc8b079498751b1addbd0d640549fabd",
    "train-000000.tar": "1d537967ca8175dd1a7e4899fb143330e8701c4b5864f8f3c5691b67ee106a8e",
    "train-000001.tar": "cb5acd37987a4995dac1dd98f8b3cd33b18f0f0f8801a2721ee919071221ec6d",
    "train-000002.tar": "a56358f14ac3a49c9e9479aa546f7d115d50ebb5b6bb71aa19400d6f93eab2a6",
    "train-000003.tar": "d39d1304233c908e74cbe6f0b1bf495f29435f12a293ce72b0dc3888b62448a7",
    "validation-000000.tar": "257f0c63ea872822a46fc31bbe37381a8fdca1b1c5321039672cf3084c3e179e",
    "validation-000001.tar": "22bc21018c1eb6fdb2d60d11a538d9ef37ea04d442dffaa91b2768efc3e4d6b3",
}
PINNED_PARQUET_LIMITED = {
    "_info.json": "0de236e7f133017e52c13d233b0d8a90e4f9b2f7bbf856414b20f7e659b51f87",
    "stats.json": "b68995b61cd07455c42854b2b65fff0e1c3d119a40d2665cbcd091dba1e27f88",
    "train-000000.tar": "5bb5a08cf1499f8b6d63815e428ee8bfeba90daab671f9dfbc9762d86a54fd6b",
    "train-000001.tar": "e3cd9f2e4299a267df96bdedf358b6f2fd9572bda0014a74c8bfab911c2a353b",
    "validation-000000.tar": "22805de31e611e6aa679e195b69dd4897afac1ebf9963ab12d4e5eece7180374",
    "validation-000001.tar": "0253f7eb68f03dca5468e4340e227b430252e958f5fea9154a0e42c29a492dc1",
}
# Through the Hub the shards and statistics are the same; `_info.json` names the Hub repo instead.
PINNED_HUB = {**PINNED_PARQUET, INFO_NAME: "31741d9dded9e2027b2289c01aad008fe865c1e0f5c48506027dc17b71613017"}
PINNED_HUB_LIMITED = {**PINNED_PARQUET_LIMITED,
                      INFO_NAME: "0c11f1fdedac96ed0664a1100580e1e62a6e0e95afbc088817225c081d28eb69"}


def _rounded_eigen(stats: str) -> str:
    """stats.json's text with the numbers of "eigval" and "eigvec" rounded to 12 decimals."""
    def round_numbers(block: re.Match) -> str:
        return re.sub(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", lambda number: repr(round(float(number[0]), 12)), block[0])
    return re.sub(r'"eig(?:val|vec)": [^"]*', round_numbers, stats)  # an array of numbers, up to the next key


def folder_digests(folder: Path, source: Path | None = None) -> dict[str, str]:
    """sha256 of each file at the top of a shard folder by name, less what is not the code's (module docstring)."""
    digests = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        if path.name == INFO_NAME and source is not None:
            data = data.replace(json.dumps(str(source))[1:-1].encode(), b"SOURCE")
        elif path.name == STATS_NAME:
            data = _rounded_eigen(data.decode()).encode()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests


def build(out: Path, args: list[str], workers: int) -> None:
    result = CliRunner().invoke(main, ["build-shards", "--out", str(out), *args, "--workers", str(workers),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def parquet_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pinned") / "imagenet-1k"  # its name is the shard folder's `name`
    make_imagenet_like_repo(root, files={"train": 3, "validation": 2, "test": 1},
                            rows_per_file={"train": 24, "validation": 12, "test": 4}, row_group_size=8)
    return root


@pytest.mark.parametrize("args, pinned", [(SYNTHETIC, PINNED_SYNTHETIC),
                                          (SYNTHETIC_LIMITED, PINNED_SYNTHETIC_LIMITED)], ids=["all", "limit"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_synthetic_build_is_pinned(tmp_path, args, pinned, workers):
    build(tmp_path / "out", args, workers)
    assert folder_digests(tmp_path / "out") == pinned


def test_demo_shards_fixture_is_the_pinned_synthetic_build(demo_shards):
    """conftest's `demo_shards` (built by prep.build.build_shards) is the pinned run's input (test_pinned_run.py)."""
    assert folder_digests(demo_shards) == PINNED_SYNTHETIC


@pytest.mark.parametrize("args, pinned", [(PARQUET, PINNED_PARQUET), (PARQUET_LIMITED, PINNED_PARQUET_LIMITED)],
                         ids=["all", "limit"])
@pytest.mark.parametrize("workers", [1, 2])
def test_local_parquet_build_is_pinned(tmp_path, parquet_repo, args, pinned, workers):
    build(tmp_path / "out", ["--source", str(parquet_repo), *args], workers)
    assert folder_digests(tmp_path / "out", source=parquet_repo) == pinned


@pytest.mark.parametrize("args, pinned", [(PARQUET, PINNED_HUB), (PARQUET_LIMITED, PINNED_HUB_LIMITED)],
                         ids=["all", "limit"])
@pytest.mark.parametrize("workers", [1, 2])
def test_hub_build_is_pinned(tmp_path, hub, parquet_repo, args, pinned, workers):
    hub.root = parquet_repo
    build(tmp_path / "out", args, workers)  # the default --source: ILSVRC/imagenet-1k, here the stand-in Hub
    assert folder_digests(tmp_path / "out") == pinned
