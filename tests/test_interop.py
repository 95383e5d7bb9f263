"""The shards read unchanged with webdataset, with Hugging Face `datasets`, and with `tar tf`."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import tarfile
import warnings

import datasets
import webdataset as wds
from PIL import Image

from prep.contract import FIELDS, SPLITS, read_info


def samples_by_tarfile(folder, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample in shard order, read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in read_info(folder).splits[split].filenames:
        with tarfile.open(folder / name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def test_webdataset_reads_every_sample_unchanged(demo_shards):
    for split in SPLITS:
        urls = [str(demo_shards / name) for name in read_info(demo_shards).splits[split].filenames]
        expected = samples_by_tarfile(demo_shards, split)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            got = [(s["__key__"], {ext: s[ext] for ext in FIELDS}) for s in dataset]
            dataset.close()
            # webdataset 1.0.2 never closes the shard files it opens; collect them here, inside this
            # block, so their ResourceWarnings are checked rather than raised in some later test.
            del dataset
            gc.collect()
        assert got == expected
        leaked = [str(w.message) for w in caught]
        assert all(issubclass(w.category, ResourceWarning) for w in caught), leaked
        assert all(any(url in message for url in urls) for message in leaked), leaked
        first = got[0][1]
        with Image.open(io.BytesIO(first["jpg"])) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))
        assert json.loads(first["json"])["label"] == int(first["cls"])


def test_hugging_face_datasets_reads_the_folder(demo_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    info = read_info(demo_shards)
    files = {split: [str(demo_shards / name) for name in info.splits[split].filenames] for split in SPLITS}
    loaded = datasets.load_dataset("webdataset", data_files=files)
    for split in SPLITS:
        ds = loaded[split]
        assert ds.num_rows == info.splits[split].num_samples
        assert set(ds.column_names) == {"__key__", "__url__", *FIELDS}
        expected = samples_by_tarfile(demo_shards, split)
        assert ds["__key__"] == [key for key, _ in expected]
        assert [int(c) for c in ds["cls"]] == [int(fields["cls"]) for _, fields in expected]
        row = ds[0]  # jpg decoded to a PIL image, json parsed
        assert row["jpg"].size == (256, 256) and row["json"]["key"] == row["__key__"]


def test_tar_lists_key_jpg_cls_json_per_sample(demo_shards):
    for split in SPLITS:
        for name in read_info(demo_shards).splits[split].filenames:
            listing = subprocess.run(["tar", "tf", str(demo_shards / name)], capture_output=True, text=True, check=True)
            names = listing.stdout.split()
            keys = [n.split(".")[0] for n in names[::3]]
            assert names == [f"{key}.{ext}" for key in keys for ext in FIELDS]
            assert len(set(keys)) == len(keys) and all("." not in key for key in keys)
