"""prep/contract.py: `_info.json` and `stats.json` that do not hold what the contract promises are one
clear line (ContractError), never a traceback, and shard names never lead out of the folder. Each case
breaks one thing in a folder of real shards (tests/grey_shards.py)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from grey_shards import write_folder
from prep.cli import main as alexprep
from prep.contract import (INFO_NAME, STATS_NAME, ContractError, PixelStats, is_shard_filename, iter_samples, label_of, read_info,
                           read_stats, sample_key, write_json)
from prep.folder_report import verify_cmd
from prep.stats import PixelSums
from train.cli import main as alextrain
from train.stream import open_shards


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "shards")


def edit(folder: Path, name: str, change) -> None:
    obj = json.loads((folder / name).read_text())
    change(obj)
    (folder / name).write_text(json.dumps(obj))


INFO_CASES = {
    "no classes": (lambda i: i.pop("classes"), r"no class table \(`classes`: a list of \{index, wnid, name\}\)"),
    "empty classes": (lambda i: i.update(classes=[]), r"no class table .*"),
    "class without wnid": (lambda i: i["classes"][3].pop("wnid"), r"class entry 3 is not \{\"index\": 3, \"wnid\": \.\.\., \"name\": \.\.\.\}: .*"),
    "classes out of order": (lambda i: i["classes"].reverse(), r"class entry 0 is not .*"),
    "no splits": (lambda i: i.pop("splits"), r"`splits` missing"),
    "splits a list": (lambda i: i.update(splits=["train"]), r"`splits` is not an object"),
    "split a string": (lambda i: i["splits"].update(train="all of it"), r"split 'train' is not an object"),
    "lengths not counts": (lambda i: i["splits"]["train"].update(shard_lengths=["7", 3, 5, 6, 4]),
                           r"split 'train' needs lists `filenames` and `shard_lengths` \(sample counts\)"),
    "not an object": (lambda i: i.clear(), r"schema_version None, this program reads 1"),
    # hand-edited fields a reader takes: each with its type, one line where it is read
    "record without size": (lambda i: i["splits"]["train"]["shards"][1].pop("size"),
                            r"split 'train', shard record train-000001.tar: `size` missing \(a byte count\)"),
    "size a string": (lambda i: i["splits"]["train"]["shards"][1].update(size="2048"),
                      r"split 'train', shard record train-000001.tar: `size` is not a byte count: '2048'"),
    "sha256 a number": (lambda i: i["splits"]["validation"]["shards"][0].update(sha256=7),
                        r"split 'validation', shard record validation-000000.tar: `sha256` is not 64 lowercase hex digits: 7"),
    "record count null": (lambda i: i["splits"]["train"]["shards"][0].update(num_samples=None),
                          r"split 'train', shard record train-000000.tar: `num_samples` is not a sample count: None"),
    "no class_counts": (lambda i: i["splits"]["train"].pop("class_counts"),
                        r"split 'train': `class_counts` missing \(a list of 25 sample counts, one per class\)"),
    "class_counts short": (lambda i: i["splits"]["validation"]["class_counts"].pop(),
                           r"split 'validation': `class_counts` is not a list of 25 sample counts, one per class: \[1, .*\]"),
    "num_inputs a string": (lambda i: i["splits"]["train"].update(num_inputs="25"),
                            r"split 'train': `num_inputs` is not a count of inputs: '25'"),
    "skipped an object": (lambda i: i["splits"]["train"].update(skipped={"a": "b"}),
                          r"split 'train': `skipped` is not a list of objects \{key, reason\}: \{'a': 'b'\}"),
    "skip without reason": (lambda i: i["splits"]["train"].update(skipped=[{"key": "x", "reason": "empty file"}, {"key": "y"}]),
                            r"split 'train', skipped input 1: `reason` missing \(a string\)"),
    "options a list": (lambda i: i.update(options=["seed", 0]), r"`options` is not an object: \['seed', 0\]"),
    "inputs a short digest": (lambda i: i.update(inputs={"train": "12ab"}),
                              r"`inputs` is not an object of split -> sha256 \(64 lowercase hex digits\): \{'train': '12ab'\}"),
    "inputs a list": (lambda i: i.update(inputs=["train"]), r"`inputs` is not an object of split -> sha256 .*: \['train'\]"),
}


@pytest.mark.parametrize("case", INFO_CASES)
def test_a_broken_info_is_one_line(folder, case):
    change, message = INFO_CASES[case]
    edit(folder, "_info.json", change)
    with pytest.raises(ContractError, match=rf"^{folder / '_info.json'}: {message}$"):
        read_info(folder)
    with pytest.raises(ContractError, match=rf"^{folder / '_info.json'}: {message}$"):
        open_shards(str(folder))


@pytest.mark.parametrize("case", ["record without size", "size a string", "no class_counts"])
def test_hand_edited_info_is_one_line_in_every_command(folder, tmp_path, case):
    """A record without `size` was a KeyError in alextrain and `stats`, no `class_counts` one in `stats`,
    `size` as a string a ValueError in `verify` (the command meant for damaged folders): each is one
    line naming the file, the place and the field, in every command that reads the folder."""
    change, message = INFO_CASES[case]
    edit(folder, "_info.json", change)
    line = rf"Error: {re.escape(str(folder / '_info.json'))}: {message}\n"
    for cli, args in ((alexprep, ["stats", str(folder)]), (alexprep, ["stats", str(folder), "--plot", str(tmp_path / "x.png")]),
                      (alexprep, ["verify", str(folder)]), (alextrain, ["--shards", str(folder), "--out", str(tmp_path / "run")])):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and re.fullmatch(line, result.output), (args, result.output)


def test_info_that_is_not_an_object_is_one_line(folder):
    (folder / "_info.json").write_text("[1, 2]")
    with pytest.raises(ContractError, match=rf"^{folder / '_info.json'}: _info.json is not a JSON object$"):
        read_info(folder)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd.tar", "sub/train-000000.tar", ".hidden.tar", "..", "train-000000.tar\n",
                                  "train-000000", 7, None])
@pytest.mark.parametrize("where", ["filenames", "shards"])
def test_a_shard_name_that_is_not_a_plain_file_name_is_refused(tmp_path, folder, name, where):
    outside = tmp_path / "outside.tar"
    outside.write_bytes((folder / "train-000000.tar").read_bytes())  # a shard the folder must not reach

    def change(info):
        entry = info["splits"]["train"]
        if where == "filenames":
            entry["filenames"][0] = name
        else:
            entry["shards"][0]["filename"] = name

    edit(folder, "_info.json", change)
    message = f"{folder / '_info.json'}: split 'train' names shard {name!r}; a shard is a plain .tar file name in this folder"
    with pytest.raises(ContractError) as e:
        open_shards(str(folder))
    assert str(e.value) == message
    result = CliRunner().invoke(verify_cmd, [str(folder)])
    assert result.exit_code == 1 and result.output.startswith(f"Error: {folder / '_info.json'}: split 'train' names shard ")


def test_shard_file_names():
    assert all(is_shard_filename(n) for n in ("train-000000.tar", "validation-001281.tar", "a.b.tar", "_x.tar"))
    assert not any(is_shard_filename(n) for n in ("../a.tar", "a/b.tar", "/a.tar", ".a.tar", "a.tar/", "a.tgz", "a\\b.tar", ""))


STATS_CASES = {
    "std 0": (lambda s: s.update(std=[0.25, 0.0, 0.25]), r"std \[0.25, 0.0, 0.25\] has a channel without spread \(std must be above 0\)"),
    "std negative": (lambda s: s.update(std=[0.25, -0.1, 0.25]), r"std .* has a channel without spread .*"),
    "mean a string": (lambda s: s.update(mean=["0.5", 0.5, 0.5]), r"field 'mean' holds a value that is not a finite number: \['0.5', 0.5, 0.5\]"),
    "eigvec null": (lambda s: s["eigvec"][1].__setitem__(2, None), r"field 'eigvec' holds a value that is not a finite number: .*"),
    "cov true": (lambda s: s["cov"][0].__setitem__(0, True), r"field 'cov' holds a value that is not a finite number: .*"),
    "eigval shape": (lambda s: s.update(eigval=[1, 2]), r"field 'eigval' missing or not of shape \(3,\)"),
    # finite in float64, but not what pixels on a 0..1 scale can give (and not finite in float32)
    "std 1e300": (lambda s: s.update(std=[1e300, 0.25, 0.25]), r"field 'std' \[1e\+300, 0.25, 0.25\] out of range: .*"),
    "std 1e-300": (lambda s: s.update(std=[1e-300, 0.25, 0.25]),
                   r"field 'std' \[1e-300, 0.25, 0.25\] out of range: a std of 720896 pixels on the 0..1 scale lies in "
                   r"\[sqrt\(num_pixels - 1\) / \(255 x num_pixels\), 0.5\] = \[4.62e-06, 0.5\]"),
    "std above a half": (lambda s: s.update(std=[0.51, 0.25, 0.25]), r"field 'std' \[0.51, 0.25, 0.25\] out of range: .*"),
    "mean 1e300": (lambda s: s.update(mean=[1e300, 0.5, 0.5]),
                   r"field 'mean' \[1e\+300, 0.5, 0.5\] out of range: a mean of pixels on the 0..1 scale lies in \[0, 1\]"),
    "mean negative": (lambda s: s.update(mean=[0.5, -0.01, 0.5]), r"field 'mean' .* out of range: .*"),
    "eigval 1e30": (lambda s: s.update(eigval=[1e30, 0.0625, 0.0625]),
                    r"field 'eigval' \[1e\+30, 0.0625, 0.0625\] out of range: the covariance's eigenvalues lie in \[0, 0.75\], "
                    r"in descending order"),
    "eigval ascending": (lambda s: s.update(eigval=[0.01, 0.02, 0.03]), r"field 'eigval' .* out of range: .*"),
    "eigval negative": (lambda s: s.update(eigval=[0.0625, 0.0625, -0.001]), r"field 'eigval' .* out of range: .*"),
    "eigvec not unit": (lambda s: s["eigvec"][0].__setitem__(0, 1.001), r"field 'eigvec' \[\[1.001, 0, 0\], .*\] does not have orthonormal columns"),
    "eigvec not orthogonal": (lambda s: s["eigvec"][0].__setitem__(1, 0.001), r"field 'eigvec' .* does not have orthonormal columns"),
    "cov above std": (lambda s: s["cov"][0].__setitem__(1, 0.07),
                      r"field 'cov' .* does not agree with 'std' \[0.25, 0.25, 0.25\]: cov\[i\]\[i\] is std\[i\]\^2 and "
                      r"\|cov\[i\]\[j\]\| at most std\[i\] std\[j\]"),
    "cov not std squared": (lambda s: s["cov"][2].__setitem__(2, 0.06), r"field 'cov' .* does not agree with 'std' .*"),
    "pixels not per image": (lambda s: s.update(num_pixels=1000),
                             r"fields 'num_images' 11 and 'num_pixels' 1000: num_pixels must be num_images x 256 x 256, "
                             r"from at least one image, below 2\*\*53"),
    "pixels beyond 2**53": (lambda s: s.update(num_images=2**40, num_pixels=2**56), r"fields 'num_images' .*"),
    "no images": (lambda s: s.update(num_images=0, num_pixels=0), r"fields 'num_images' 0 .*"),
    "num_pixels missing": (lambda s: s.pop("num_pixels"), r"field 'num_pixels' missing or not a count: None"),
}


@pytest.mark.parametrize("case", STATS_CASES)
def test_broken_stats_are_one_line(folder, case):
    change, message = STATS_CASES[case]
    edit(folder, "stats.json", change)
    with pytest.raises(ContractError, match=rf"^{folder / 'stats.json'}: {message}$"):
        read_stats(folder)


@pytest.mark.parametrize("case", ["std 1e300", "std 1e-300", "mean 1e300", "eigval 1e30"])
def test_stats_float32_cannot_train_on_stop_alextrain_in_one_line(folder, tmp_path, case):
    """std 1e300 trained on all-zero inputs to a "done" run at chance; std 1e-300 and mean 1e300 ended
    in a misleading "try a lower --lr"; eigval 1e30 trained to garbage."""
    change, message = STATS_CASES[case]
    edit(folder, "stats.json", change)
    result = CliRunner().invoke(alextrain, ["--shards", str(folder), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and re.fullmatch(rf"Error: {re.escape(str(folder / 'stats.json'))}: {message}\n", result.output), result.output


def stats_of(sums: PixelSums) -> PixelStats:
    return PixelStats.from_json(sums.stats().to_json(), "stats")


def test_stats_at_the_edges_of_their_ranges_pass():
    """What pixels can give, at the bounds: rounding stays inside the check's margin."""
    grey = np.random.default_rng(0).integers(0, 256, (256, 256, 1), dtype=np.uint8).repeat(3, axis=2)
    low = stats_of(PixelSums.of_image(grey)).eigval  # one direction: two eigenvalues of rounding noise
    assert low[0] > 0.2 and abs(low[1]) < 1e-15 and abs(low[2]) < 1e-15
    halves = np.zeros((256, 256, 3), np.uint8)
    halves[:128] = 255
    assert stats_of(PixelSums.of_image(halves)).std == (0.5, 0.5, 0.5)  # Popoviciu's bound, reached
    n = 10**6 * 256 * 256  # a million images, all black but one pixel of level 1: the smallest spread there is
    lone = stats_of(PixelSums(10**6, n, [1, 1, 1], [[1, 1, 1]] * 3))
    assert lone.std[0] == pytest.approx(np.sqrt(n - 1) / (255 * n), rel=1e-12)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_stats_with_nan_or_inf_are_refused(folder, value):
    text = (folder / "stats.json").read_text().replace('"std": [0.25, 0.25, 0.25]', f'"std": [0.25, {value}, 0.25]')
    (folder / "stats.json").write_text(text)
    with pytest.raises(ContractError, match=r"field 'std' holds a value that is not a finite number"):
        read_stats(folder)


def tar_of(names: list[str]) -> io.BytesIO:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            member = tarfile.TarInfo(name)
            member.size = len(name)
            tar.addfile(member, io.BytesIO(name.encode()))
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    data.seek(0)
    return data


def test_one_rule_groups_members_into_samples():
    assert sample_key("sub/n01440764_10026.jpg") == ("sub/n01440764_10026", "jpg")
    assert sample_key("img.001.jpg") == ("img", "001.jpg")  # a dot ends the key, as in webdataset
    samples = list(iter_samples(tar_of(["a.jpg", "a.cls", "b.jpg", "a.json", "x/b.cls"])))
    assert samples == [("a", {"jpg": b"a.jpg", "cls": b"a.cls"}), ("b", {"jpg": b"b.jpg"}), ("a", {"json": b"a.json"}),
                       ("x/b", {"cls": b"x/b.cls"})]  # consecutive members only; the folder member is not a sample


def test_labels_are_ascii_indices_below_the_class_count():
    assert [label_of(b, 10) for b in (b"0", b"9", b"10", b"-1", b"3.0", b"", b" 3", "٣".encode())] == [0, 9, None, None, None, None, None, None]


@pytest.mark.parametrize("name, read", [(INFO_NAME, read_info), (STATS_NAME, read_stats)])
def test_what_is_read_writes_back_byte_for_byte(demo_shards, tmp_path, name, read):
    """`_info.json` and `stats.json` of a build, parsed into the contract's objects and written with
    their `to_json()` through `write_json` (as the build writes them), are the same bytes: a writer can
    use the objects without changing a byte of the folder (tests/test_pinned_shards.py)."""
    write_json(tmp_path / name, read(demo_shards).to_json())
    assert (tmp_path / name).read_bytes() == (demo_shards / name).read_bytes()
