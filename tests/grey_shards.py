"""Test shard folders whose pixels encode their labels: sample i of a split has label i, key
f"{split}_{i:05d}" and a flat grey 256x256 JPEG whose level encodes i, so a lost, repeated or
mismatched sample shows at once."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import torch
from torchcodec.encoders import JpegEncoder

from prep.contract import shard_name


def grey(i: int) -> int:
    """The grey level of sample i: distinct for neighbours, far from JPEG's rounding."""
    return 16 + (i * 37) % 224


def jpeg_of(i: int) -> bytes:
    return JpegEncoder(torch.full((3, 256, 256), grey(i), dtype=torch.uint8)).to_tensor(quality=90).numpy().tobytes()


def write_tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, label in samples:
            for ext, data in (("jpg", jpg), ("cls", str(label).encode()), ("json", json.dumps({"key": key}).encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def write_folder(folder: Path, train_lengths=(7, 3, 5, 6, 4), val_lengths=(4, 5, 2), jpeg=jpeg_of, num_classes: int | None = None) -> Path:
    """A contract shard folder: sample i of a split has label i, key f"{split}_{i:05d}" and JPEG jpeg(i).
    The class table has a class per label, or `num_classes` (fewer: labels beyond it lie outside the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, lengths in (("train", train_lengths), ("validation", val_lengths)):
        names, shards, first = [], [], 0
        for s, n in enumerate(lengths):
            name = shard_name(split, s)
            write_tar(folder / name, [(f"{split}_{i:05d}", jpeg(i), i) for i in range(first, first + n)])
            data = (folder / name).read_bytes()
            names.append(name)
            shards.append({"filename": name, "num_samples": n, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
            first += n
        splits[split] = {"name": split, "filenames": names, "shard_lengths": list(lengths), "num_samples": first,
                         "num_inputs": first, "shards": shards, "skipped": []}
    num_classes = num_classes or max(sum(train_lengths), sum(val_lengths))
    for entry in splits.values():
        entry["class_counts"] = [int(i < entry["num_samples"]) for i in range(num_classes)]  # one sample per label
    classes = [{"index": i, "wnid": f"syn{i:05d}", "name": f"class {i}"} for i in range(num_classes)]
    info = {"name": "test", "schema_version": 1, "splits": splits, "classes": classes, "options": {}, "pillow": "test"}
    (folder / "_info.json").write_text(json.dumps(info))
    stats = {"schema_version": 1, "split": "train", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
             "cov": [[0.0625, 0, 0], [0, 0.0625, 0], [0, 0, 0.0625]], "eigval": [0.0625, 0.0625, 0.0625],
             "eigvec": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "num_images": first, "num_pixels": first * 65536}
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


def check_pixels(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Each decoded image is the flat grey of its label (JPEG keeps a flat image within 1 level)."""
    expected = torch.tensor([grey(i) for i in labels.tolist()], dtype=torch.float32)
    assert images.shape == (len(labels), 3, 256, 256) and images.dtype == torch.uint8
    assert (images.float().amax(dim=(1, 2, 3)) - expected).abs().max() <= 1
    assert (images.float().amin(dim=(1, 2, 3)) - expected).abs().max() <= 1
