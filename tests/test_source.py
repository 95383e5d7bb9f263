"""Sources: synthetic, a local parquet folder (pyarrow straight from the files), an ILSVRC-style tree.

The Hub source's error paths (no token, no network) are tested on the real `alexprep` command in
test_cli_prep.py, where the Hugging Face environment can be set before the libraries load.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import numpy as np

from prep import synthetic
from prep.build import build_shards
from prep.contract import imagenet_classes
from prep.errors import FetchError, SourceError
from prep.listed_source import Item
from prep.open_source import open_source
from prep.parquet_source import distinct_key, parquet_rows
from prep.source import PartRequest, Staging, safe_key

CANONICAL = imagenet_classes()


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """Where `datasets` would write an Arrow cache (the old build did); the build must leave it absent."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def write_parquet(root: Path, split: str, rows: list[tuple[str | None, bytes, int]], names: list[str]) -> None:
    """rows of (image path or None, image bytes, label) -> root/data/{split}-00000-of-00001.parquet, as on the Hub."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": path} for path, data, _ in rows], "label": [label for *_, label in rows]},
        features=features)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


def read_all(source, split: str) -> list[tuple[str, int, bytes]]:
    """(key, label, bytes) of every row of a parquet source, as it hands them to a build: part by part, in row order."""
    requests, first = [], 0
    for i, part in enumerate(source.parts(split)):
        requests.append(PartRequest(split, i, np.arange(first, first + part.num_rows), whole_split=True))
        first += part.num_rows
    out, keys = [], set()
    with source.reader(requests, Staging(Path("/nonexistent"), prefetch=1)) as reader:
        for request in requests:
            rows = list(reader.rows(request, keys))
            assert [r.number for r in rows] == request.rows.tolist()
            out += [(r.key, r.label, r.data) for r in rows]
    return out


def read_items(source, split: str) -> dict[str, tuple[int, bytes]]:
    """A listed source's items by key: (label, bytes)."""
    return {item.key: (item.label, source.read(split, i)) for i, item in enumerate(source.items(split))}


def test_safe_key_keeps_ids_and_replaces_dots_and_slashes():
    assert safe_key("n01440764_10026") == "n01440764_10026"
    assert safe_key("ILSVRC2012_val_00000001") == "ILSVRC2012_val_00000001"
    assert safe_key("img.001/a b") == "img_001_a_b"


def test_synthetic_source_lists_and_reads_the_generator():
    source = open_source("synthetic", ("train", "validation"), {"train": 3})
    assert source.identity == "synthetic"
    assert source.classes == synthetic.CLASSES
    train = source.items("train")
    assert train == [Item(k, label) for k, label in synthetic.items("train", per_class=3)]
    assert len(train) == 30 and train == sorted(train)
    assert len(source.items("validation")) == 10 * synthetic.DEFAULT_PER_CLASS["validation"]
    assert source.read("train", 7) == synthetic.image_bytes(*train[7])


def test_per_class_is_refused_for_other_sources(tmp_path):
    with pytest.raises(SourceError, match="only to the synthetic source"):
        open_source(str(tmp_path), ("train",), {"train": 3})


def test_parquet_folder_read_directly_from_its_footers_and_row_groups(tmp_path, hf_cache):
    names = ["cat", "dog", "owl"]
    train = [("n9_3.JPEG", jpeg((200, 0, 0)), 2), ("a/b/n9_1.JPEG", jpeg((0, 200, 0)), 0),
             ("img.with.dots.png", jpeg((0, 0, 200)), 1), (None, jpeg((9, 9, 9)), 1)]
    validation = [("v_2.JPEG", jpeg((1, 2, 3)), 0), ("v_1.JPEG", jpeg((4, 5, 6)), 2)]
    write_parquet(tmp_path, "train", train, names)
    write_parquet(tmp_path, "validation", validation, names)

    source = open_source(str(tmp_path))
    assert source.identity == f"parquet:{tmp_path.resolve()}"
    assert [(c.index, c.wnid, c.name) for c in source.classes] == [(0, "cat", "cat"), (1, "dog", "dog"),
                                                                   (2, "owl", "owl")]
    [part] = source.parts("train")
    assert (part.name, part.units) == ("data/train-00000-of-00001.parquet", (4,))
    assert part.size == (tmp_path / part.name).stat().st_size
    # Keys: the stem of image.path (dots made safe), or split + row number where the path is missing;
    # rows in file order, each with the exact bytes stored in it.
    assert read_all(source, "train") == [("n9_3", 2, train[0][1]), ("n9_1", 0, train[1][1]),
                                         ("img_with_dots", 1, train[2][1]), ("train_00000003", 1, train[3][1])]
    assert read_all(source, "validation") == [("v_2", 0, validation[0][1]), ("v_1", 2, validation[1][1])]
    build_shards(tmp_path / "out", source=str(tmp_path), shard_size=3, workers=1)
    assert not hf_cache.exists()  # no Arrow copy anywhere: the parquet files are read in place


def test_parquet_source_builds_the_same_shards_in_forked_workers(tmp_path, hf_cache):
    rows = [(f"n9_{i}.JPEG", jpeg((40 * i, 255 - 40 * i, 90), (300 + 10 * i, 200)), i % 2) for i in range(6)]
    write_parquet(tmp_path / "src", "train", rows, ["even", "odd"])
    one = build_shards(tmp_path / "one", source=str(tmp_path / "src"), splits=("train",), shard_size=4, workers=1)
    two = build_shards(tmp_path / "two", source=str(tmp_path / "src"), splits=("train",), shard_size=4, workers=2)
    assert one["splits"]["train"]["shard_lengths"] == [4, 2]
    assert one["options"]["source"] == f"parquet:{(tmp_path / 'src').resolve()}"
    assert one == two
    for name in one["splits"]["train"]["filenames"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def shard_labels(out: Path, split: str) -> dict[str, int]:
    """key -> class index of every sample in a built folder's shards of `split`."""
    labels = {}
    for name in sorted(out.glob(f"{split}-*.tar")):
        with tarfile.open(name) as tar:
            labels.update({m.name[:-4]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")})
    return labels


def test_parquet_keys_sharing_a_stem_are_qualified_bad_labels_and_missing_bytes_are_skips(tmp_path, hf_cache):
    rows = [("x/a.JPEG", jpeg((1, 1, 1)), 0), ("y/a.JPEG", jpeg((2, 2, 2)), 1), ("b.JPEG", jpeg((3, 3, 3)), 1)]
    write_parquet(tmp_path / "src", "train", rows, ["p", "q"])
    info = build_shards(tmp_path / "out", source=str(tmp_path / "src"), splits=("train",), shard_size=8, workers=1)
    entry = info["splits"]["train"]
    assert (entry["num_inputs"], entry["num_samples"], entry["skipped"]) == (3, 3, [])
    assert shard_labels(tmp_path / "out", "train") == {"a": 0, "y_a_JPEG": 1, "b": 1}
    assert [r.skip for r in parquet_rows(pa.table({
        "image": [{"bytes": None, "path": "c.JPEG"}, {"bytes": jpeg((1, 1, 1)), "path": "d.JPEG"}],
        "label": [0, -1]}), "train", 0, 1)] == ["no image bytes in the row", "label -1 is not a class index"]


def test_distinct_key_keeps_new_keys_and_qualifies_repeats_until_new():
    seen: set[str] = set()
    rows = [("a", "x/a.jpg"), ("a", "y/a.jpg"), ("a", "y/a.jpg"), ("a", "a.jpg"), ("train_00000004", None),
            ("train_00000004", None)]
    assert [distinct_key(key, path, n, seen) for n, (key, path) in enumerate(rows)] == [
        "a", "y_a_jpg", "y_a_jpg_2", "a_jpg", "train_00000004", "train_00000004_5"]


def test_caltech_style_names_are_all_written_and_keep_their_keys_across_a_resume(tmp_path, hf_cache):
    # 4 class folders with the same file names (class0/image_0001.jpg, class1/image_0001.jpg, ...), one parquet
    # file per class in row groups of 2: 16 distinct images, 4 distinct stems.
    src, names = tmp_path / "src", [f"class{c}" for c in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    for c in range(4):
        images = [{"bytes": jpeg((60 * c, 50 * i, 90)), "path": f"class{c}/image_{i:04d}.jpg"} for i in range(1, 5)]
        (src / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": images, "label": pa.array([c] * 4, pa.int64())},
                                schema=features.arrow_schema), src / f"data/train-{c:05d}-of-00004.parquet",
                       row_group_size=2)
    reference = build_shards(tmp_path / "ref", source=str(src), splits=("train",), shard_size=5, workers=1)
    entry = reference["splits"]["train"]
    assert (entry["num_inputs"], entry["num_samples"], entry["skipped"]) == (16, 16, [])
    # The first input with a stem keeps it as its key (as before); later ones name their folder and file.
    assert shard_labels(tmp_path / "ref", "train") == {
        **{f"image_{i:04d}": 0 for i in range(1, 5)},
        **{f"class{c}_image_{i:04d}_jpg": c for c in range(1, 4) for i in range(1, 5)}}

    # Stopped by an unreadable file (class2's), then rerun once it is fixed: class2's keys are made
    # distinct from the keys of the files read before the stop, which the build journaled.
    path = src / "data/train-00002-of-00004.parquet"
    good = path.read_bytes()
    column = pq.read_metadata(path).row_group(1).column(0)
    start = min(column.data_page_offset, column.dictionary_page_offset or column.data_page_offset)
    path.write_bytes(good[:start] + b"\xff" * 16 + good[start + 16:])
    with pytest.raises(FetchError, match="train-00002-of-00004.parquet: not a readable parquet file"):
        build_shards(tmp_path / "out", source=str(src), splits=("train",), shard_size=5, workers=1)
    path.write_bytes(good)
    assert build_shards(tmp_path / "out", source=str(src), splits=("train",), shard_size=5, workers=1) == reference
    for name in entry["filenames"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_parquet_without_class_names_is_refused_at_open(tmp_path, hf_cache):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[])})
    (tmp_path / "src" / "data").mkdir(parents=True)
    table = pa.table({"image": [{"bytes": jpeg((1, 2, 3)), "path": "a.jpg"}], "label": pa.array([0], pa.int64())},
                     schema=features.arrow_schema)
    pq.write_table(table, tmp_path / "src/data/train-00000-of-00001.parquet")
    with pytest.raises(SourceError, match=r"^--source .*src: the 'label' ClassLabel has no class names; a source "
                                          r"needs at least one class$"):
        build_shards(tmp_path / "out", source=str(tmp_path / "src"), splits=("train",))
    assert not (tmp_path / "out").exists()


def imagenet_label_names() -> list[str]:
    """ImageNet's 1,000 names as a ClassLabel accepts them: its repeated name made unique."""
    names, seen = [], set()
    for c in CANONICAL:
        names.append(c.name if c.name not in seen else f"{c.name} ({c.wnid})")
        seen.add(c.name)
    return names


@pytest.mark.parametrize("names", [imagenet_label_names(), [c.wnid for c in CANONICAL]], ids=["names", "wnids"])
def test_parquet_with_imagenet_classes_gets_the_canonical_table(tmp_path, hf_cache, names):
    assert sum(a != c.name for a, c in zip(imagenet_label_names(), CANONICAL)) == 1  # "crane" twice
    rows = [("n01443537_1.JPEG", jpeg((1, 1, 1)), 1), ("n01440764_7.JPEG", jpeg((2, 2, 2)), 517)]
    write_parquet(tmp_path, "train", rows, names)
    source = open_source(str(tmp_path), ("train",))
    assert source.classes == CANONICAL
    assert [(key, label) for key, label, _ in read_all(source, "train")] == [("n01443537_1", 1), ("n01440764_7", 517)]


def test_parquet_with_other_1000_names_keeps_them(tmp_path, hf_cache):
    names = [f"class {i}" for i in range(1000)]
    write_parquet(tmp_path, "train", [("a.JPEG", jpeg((1, 1, 1)), 999)], names)
    source = open_source(str(tmp_path), ("train",))
    assert [(c.index, c.wnid, c.name) for c in source.classes[-2:]] == [(998, "class 998", "class 998"),
                                                                       (999, "class 999", "class 999")]


def test_parquet_missing_split_and_corrupt_file_are_one_line_errors(tmp_path, hf_cache):
    write_parquet(tmp_path / "a", "train", [("k.JPEG", jpeg((1, 1, 1)), 0)], ["x"])
    with pytest.raises(SourceError, match=r"no data/validation-\*\.parquet files; choose others with --splits"):
        open_source(str(tmp_path / "a"))
    (tmp_path / "b" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match=r"train-00000-of-00001.parquet: not a readable parquet file"):
        open_source(str(tmp_path / "b"), ("train",))


def test_parquet_without_image_and_classlabel_columns_is_refused(tmp_path, hf_cache):
    ds = datasets.Dataset.from_dict({"img": [{"bytes": jpeg((1, 1, 1)), "path": "a.JPEG"}], "label": [0]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["x"])}))
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(SourceError, match="needs an Image 'image' column and a ClassLabel 'label' column"):
        open_source(str(tmp_path), ("train",))


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("val_folder", ["val", "validation"])
def test_ilsvrc_tree_with_wnid_folders_gets_canonical_indices(tmp_path, val_folder):
    files = {"train/n01443537/n01443537_2.JPEG": jpeg((1, 0, 0)), "train/n01443537/n01443537_10.JPEG": jpeg((2, 0, 0)),
             "train/n01440764/n01440764_5.JPEG": jpeg((3, 0, 0)), "train/n01440764/.DS_Store": b"hidden",
             f"{val_folder}/n01440764/ILSVRC2012_val_00000002.JPEG": jpeg((4, 0, 0)),
             f"{val_folder}/n01530575/ILSVRC2012_val_00000001.JPEG": jpeg((5, 0, 0))}
    write_tree(tmp_path, files)
    source = open_source(str(tmp_path))
    assert source.identity == f"folder:{tmp_path.resolve()}" and source.name == tmp_path.name
    assert source.classes == CANONICAL  # n01440764 = 0 tench, n01443537 = 1 goldfish, n01530575 = 10
    assert read_items(source, "train") == {"n01440764_5": (0, files["train/n01440764/n01440764_5.JPEG"]),
                                         "n01443537_10": (1, files["train/n01443537/n01443537_10.JPEG"]),
                                         "n01443537_2": (1, files["train/n01443537/n01443537_2.JPEG"])}
    assert [i.key for i in source.items("train")] == ["n01440764_5", "n01443537_10", "n01443537_2"]
    assert read_items(source, "validation") == {
        "ILSVRC2012_val_00000001": (10, files[f"{val_folder}/n01530575/ILSVRC2012_val_00000001.JPEG"]),
        "ILSVRC2012_val_00000002": (0, files[f"{val_folder}/n01440764/ILSVRC2012_val_00000002.JPEG"])}


def test_other_tree_gets_sorted_folder_indices_and_unique_keys(tmp_path):
    write_tree(tmp_path, {"train/dog/001.jpg": jpeg((1, 0, 0)), "train/cat/001.jpg": jpeg((2, 0, 0)),
                          "train/cat/002.png": jpeg((3, 0, 0)), "val/emu/x.jpg": jpeg((4, 0, 0))})
    source = open_source(str(tmp_path))
    # Classes come from every split's folders, so a train-only build numbers them the same way.
    assert [(c.index, c.wnid) for c in source.classes] == [(0, "cat"), (1, "dog"), (2, "emu")]
    # Two files named 001 in different class folders: every key of the split names its folder and file.
    assert [(i.key, i.label) for i in source.items("train")] == [("cat_001_jpg", 0), ("cat_002_png", 0),
                                                                 ("dog_001_jpg", 1)]
    assert open_source(str(tmp_path), ("validation",)).items("validation") == [Item("x", 2)]


def test_tree_errors_are_one_clear_line(tmp_path):
    write_tree(tmp_path / "a", {"train/cat/1.jpg": jpeg((1, 1, 1))})
    with pytest.raises(SourceError, match="has no validation split .*--splits"):
        open_source(str(tmp_path / "a"))
    write_tree(tmp_path / "b", {"train/cat/1.jpg": jpeg((1, 1, 1)), "train/loose.jpg": b"x"})
    with pytest.raises(SourceError, match="files outside class folders"):
        open_source(str(tmp_path / "b"), ("train",))
    (tmp_path / "c").mkdir()
    with pytest.raises(SourceError, match="neither data/\\*.parquet nor train/"):
        open_source(str(tmp_path / "c"))
    with pytest.raises(SourceError, match="no such folder"):
        open_source(str(tmp_path / "missing"))
    write_tree(tmp_path / "d", {"train/cat/.hidden": b"x"})
    with pytest.raises(SourceError, match="the train split holds no images"):
        open_source(str(tmp_path / "d"), ("train",))


def test_listed_sources_are_read_in_parts_of_at_least_256_and_at_most_256_parts():
    small = open_source("synthetic", ("train",), {"train": 30}).parts("train")
    assert [p.num_rows for p in small] == [256, 44] and small[1].name == "items 256-299"
    large = open_source("synthetic", ("train",), {"train": 10_000})
    parts = large.parts("train")
    assert len(parts) == 256 and {p.num_rows for p in parts[:-1]} == {391} and large.num_rows("train") == 100_000
