"""`alexprep` on the command line: build-shards, demo, the Hub's error paths, stats and verify."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from quirk_images import write_quirk_files

from prep.workers import MAX_WORKERS
from prep.cli import main
from prep.contract import INFO_NAME, STATS_NAME, read_info, read_stats
from prep.image import pillow_flavour
from prep.folder_report import format_report, shard_report

ALEXPREP = str(Path(sys.executable).with_name("alexprep"))  # the console script installed beside this Python
SMALL = ["--source", "synthetic", "--per-class", "train=4", "--per-class", "validation=2", "--shard-size", "15",
         "--workers", "2", "--no-progress"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def hub_env(tmp_path: Path, token: str | None = None, token_file: bool = False) -> dict[str, str]:
    """No Hugging Face settings of the caller's; an empty HF_HOME; offline, so nothing waits on the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    if token is not None and token_file:
        (tmp_path / "hf-home").mkdir()
        (tmp_path / "hf-home" / "token").write_text(token)
    elif token is not None:
        env["HF_TOKEN"] = token
    return env


def test_hub_without_a_token_is_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "shards"
    result = subprocess.run([ALEXPREP, "build-shards", "--out", str(out)], env=hub_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: no Hugging Face token for the gated dataset ILSVRC/imagenet-1k: accept the "
                           "terms at https://huggingface.co/datasets/ILSVRC/imagenet-1k, then run `hf auth login` "
                           "or set HF_TOKEN")
    assert "or pass a local --source" in line
    assert not out.exists()


@pytest.mark.parametrize("token_file", [False, True], ids=["HF_TOKEN", "token-file"])
def test_hub_unreachable_is_one_clear_error_and_never_shows_the_token(tmp_path, token_file):
    token = "hf_" + "Secret7" * 5
    out = tmp_path / "shards"
    result = subprocess.run([ALEXPREP, "build-shards", "--out", str(out)], env=hub_env(tmp_path, token, token_file),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    # The token was found (not the no-token error) and handed to the Hub libraries, which could not connect.
    assert line.startswith("Error: cannot load ILSVRC/imagenet-1k from the Hugging Face Hub (")
    assert "check the network" in line and "hf auth login" in line and "--source" in line
    assert token not in result.stdout + result.stderr
    assert not out.exists()
    for path in tmp_path.rglob("*"):  # nor in any file the libraries wrote (the token file aside)
        if path.is_file() and path != tmp_path / "hf-home" / "token":
            assert token.encode() not in path.read_bytes(), path


def test_build_shards_writes_the_folder_and_reconciles(tmp_path):
    code, output = run("build-shards", "--out", str(tmp_path / "a"), "--splits", "train,validation", *SMALL)
    assert code == 0, output
    assert pillow_flavour() in output
    assert "train: 40 inputs = 40 written + 0 skipped" in output
    assert "validation: 20 inputs = 20 written + 0 skipped" in output
    info = read_info(tmp_path / "a")
    assert info.splits["train"].filenames == ("train-000000.tar", "train-000001.tar", "train-000002.tar")
    assert info.options["per_class"] == {"train": 4, "validation": 2}
    # Repeated --splits is the same build: a rerun into the same folder is accepted and changes nothing.
    before = (tmp_path / "a" / INFO_NAME).read_bytes()
    code, output = run("build-shards", "--out", str(tmp_path / "a"), "--splits", "validation", "--splits", "train",
                       *SMALL)
    assert code == 0, output
    assert (tmp_path / "a" / INFO_NAME).read_bytes() == before

    code, output = run("build-shards", "--out", str(tmp_path / "b"), "--splits", "validation", *SMALL[:2],
                       "--per-class", "3", "--no-progress", "--limit", "7")
    assert code == 0, output
    assert "validation: 7 inputs = 7 written + 0 skipped" in output and "train:" not in output
    assert not (tmp_path / "b" / STATS_NAME).exists()  # statistics come from the train split only


def test_stats_every_samples_the_statistics_and_stats_says_so(tmp_path):
    code, output = run("build-shards", "--out", str(tmp_path / "a"), *SMALL, "--stats-every", "4")
    assert code == 0, output
    assert "; pixel statistics from a seeded sample, 1 in 4 train images" in output
    stats = read_stats(tmp_path / "a")
    assert (stats.sample_every, stats.num_images) == (4, 10)  # 40 train images: places 0, 4, ..., 36
    code, output = run("stats", str(tmp_path / "a"))
    assert code == 0, output
    assert "pixel statistics of train: 10 images (a seeded sample, 1 in 4), 655,360 pixels," in output


def test_build_shards_reports_skipped_inputs(tmp_path):
    files = write_quirk_files(tmp_path / "src" / "train" / "n01440764")
    skipped = sum(reason is not None for reason in files.values())
    code, output = run("build-shards", "--out", str(tmp_path / "out"), "--source", str(tmp_path / "src"),
                       "--splits", "train", "--workers", "2", "--no-progress")
    assert code == 0, output
    assert f"train: {len(files)} inputs = {len(files) - skipped} written + {skipped} skipped" in output


@pytest.mark.parametrize("args, message", [
    (["--splits", "train,test"], "'test' is not one of train, validation"),
    (["--per-class", "many"], "'many': expected N or SPLIT=N"),
    (["--per-class", "test=3"], "per_class must map splits among train, validation"),
    (["--quality", "101"], "101 is not in the range 1<=x<=100"),
    (["--stats-every", "0"], "0 is not in the range x>=1"),
    (["--per-class", "99999999999999999999"], "per_class must map splits among train, validation to counts in "
                                              "1..1000000, got {'train': 99999999999999999999, 'validation': "),
    (["--shard-size", "99999999999999999999"], "shard_size must be an integer in 1..100000, got 99999999999999999999"),
    (["--workers", "99999999999999999999"], f"99999999999999999999 is not in the range 1<=x<={MAX_WORKERS}"),
])
def test_bad_options_are_usage_errors(tmp_path, args, message):
    code, output = run("build-shards", "--out", str(tmp_path / "out"), "--source", "synthetic", *args)
    assert code == 2 and message in output, output
    assert not (tmp_path / "out").exists()


def test_expected_failures_are_one_error_line(tmp_path):
    code, output = run("build-shards", "--out", str(tmp_path / "a"), *SMALL)
    assert code == 0, output
    code, output = run("build-shards", "--out", str(tmp_path / "a"), *SMALL, "--seed", "2")
    assert code == 1 and output.startswith("Error: ")
    assert "already holds shards built differently (seed: 0 -> 2)" in output
    code, output = run("build-shards", "--out", str(tmp_path / "b"), "--source", str(tmp_path), "--per-class", "3")
    assert code == 1 and output == "Error: per-class counts apply only to the synthetic source, not to " \
                                   f"{str(tmp_path)!r}\n"


def test_stats_and_verify_are_registered(demo_shards):
    assert {"build-shards", "demo", "stats", "verify"} <= set(main.commands)
    code, output = run("verify", str(demo_shards), "--workers", "1")
    assert code == 0 and "ok" in output.splitlines()[-1], output
    code, output = run("stats", str(demo_shards))
    assert code == 0, output


def test_verify_workers_are_bounded_as_the_builds_are(demo_shards):
    # --workers 99999999999999999999 started a pool without limit
    code, output = run("verify", str(demo_shards), "--workers", "99999999999999999999")
    assert code == 2 and f"Invalid value for '--workers': 99999999999999999999 is not in the range 1<=x<={MAX_WORKERS}" in output


@pytest.mark.slow
def test_demo_builds_the_synthetic_set_and_prints_its_report(tmp_path):
    result = subprocess.run([ALEXPREP, "demo", "--out", str(tmp_path / "demo"), "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "train: 1000 inputs = 1000 written + 0 skipped" in result.stdout
    assert "validation: 200 inputs = 200 written + 0 skipped" in result.stdout
    info = read_info(tmp_path / "demo")
    assert len(info.splits["train"].filenames) == 4 and len(info.classes) == 10
    assert result.stdout.endswith(format_report(shard_report(tmp_path / "demo")) + "\n")


def _limit_file_size(limit: int):
    """For a subprocess: files may grow to `limit` bytes, then writes fail with EFBIG (SIGXFSZ ignored)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A small tmpfs mounted at `folder` (root only; skips the test elsewhere)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to mount a small or read-only file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: cannot write the build in ") and "Traceback" not in result.stderr, line
    for part in parts:
        assert part in line, line


def test_a_file_size_limit_is_one_line_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "out"
    args = [ALEXPREP, "build-shards", "--out", str(out), *SMALL]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(40_000))
    assert_one_line_error(result, "File too large", "rerun the same command")
    assert not (out / INFO_NAME).exists()
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 40 inputs = 40 written + 0 skipped" in done.stdout


def test_a_full_disk_is_one_line(tmp_path):
    with tmpfs(tmp_path / "small", "size=300k") as small:
        result = subprocess.run([ALEXPREP, "build-shards", "--out", str(small / "out"), *SMALL],
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, "No space left on device")


def test_a_read_only_out_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=100k") as ro:
        result = subprocess.run([ALEXPREP, "build-shards", "--out", str(ro / "out"), *SMALL],
                                capture_output=True, text=True, timeout=120)
        assert_one_line_error(result, "Read-only file system")
