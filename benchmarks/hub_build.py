"""Hub build: download and processing overlap, so a build takes about max(download, CPU), not their sum.

One run, on one imagenet-1k-shaped parquet repo (tests/hubstub.py's generator) served by the local Hub
stand-in with a bandwidth limit (`python -m tests.hubstub --bandwidth`), the real `huggingface_hub`
client and the real `alexprep` command, each step in its own process:
  1. CPU only: `alexprep build-shards` from a local copy of the parquet files (no network);
  2. download only: `huggingface_hub.snapshot_download` of the train and validation files;
  3. the Hub build: `alexprep build-shards` from the stand-in (downloads `--prefetch` files ahead).
Unless `--bandwidth` is given, the limit is set so that the download takes about as long as step 1,
where overlap matters most (the sum would be twice either). Wall seconds; the shards of 1 and 3 are
checked to be byte-identical.

    .venv/bin/python -m benchmarks.hub_build --json /tmp/hub_build.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ALEXPREP, folder_digests, hub_env, machine, stand_in_hub


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {result.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-rows", type=int, default=96, help="rows per train file (24 files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prefetch", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, help="bytes/s; default: repo bytes / CPU-only seconds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    from tests.hubstub import make_imagenet_like_repo

    with tempfile.TemporaryDirectory(prefix="hub-build-bench-") as tmp:
        tmp = Path(tmp)
        summary = make_imagenet_like_repo(tmp / "repo", rows_per_file={"train": args.train_rows})
        needed = [f for f in summary.files if f.split in ("train", "validation")]
        size = sum(f.bytes for f in needed)
        rows = sum(f.rows for f in needed)
        env = hub_env(tmp / "hf-home")
        build = ["build-shards", "--shard-size", "100", "--workers", str(args.workers), "--no-progress"]
        cpu = timed([ALEXPREP, *build, "--out", str(tmp / "local"), "--source", str(tmp / "repo")], env)
        bandwidth = args.bandwidth or size / cpu

        with stand_in_hub(tmp / "repo", bandwidth) as endpoint:
            env["HF_ENDPOINT"] = endpoint
            download = timed([sys.executable, "-c", "import sys, huggingface_hub as h; h.snapshot_download("
                              "'ILSVRC/imagenet-1k', repo_type='dataset', local_dir=sys.argv[1], "
                              "allow_patterns=['data/train-*', 'data/validation-*'])", str(tmp / "download")], env)
            hub = timed([ALEXPREP, *build, "--out", str(tmp / "hub"), "--prefetch", str(args.prefetch)], env)
        same = folder_digests(tmp / "hub") == folder_digests(tmp / "local")

    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "parquet_bytes": size, "images": rows, "bandwidth_bytes_per_s": round(bandwidth),
        "workers": args.workers, "prefetch": args.prefetch,
        "cpu_only_s": round(cpu, 2), "download_only_s": round(download, 2), "hub_build_s": round(hub, 2),
        "hub_over_max": round(hub / max(cpu, download), 2), "hub_over_sum": round(hub / (cpu + download), 2),
        "shards_identical": same,
    }
    print(f"{rows} images, {size / 1e6:.1f} MB of parquet (train + validation), {bandwidth / 1e6:.2f} MB/s limit, "
          f"{args.workers} workers, prefetch {args.prefetch}")
    print("| what | seconds |\n| --- | --- |")
    print(f"| CPU only: build from a local copy of the parquet files | {cpu:.2f} |")
    print(f"| download only: snapshot_download of the same files | {download:.2f} |")
    print(f"| Hub build (download and processing overlapped) | {hub:.2f} |")
    print(f"| Hub build / max(download, CPU) | {results['hub_over_max']:.2f} |")
    print(f"| Hub build / (download + CPU) | {results['hub_over_sum']:.2f} |")
    print(f"shards and stats.json identical to the local build's: {same}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
