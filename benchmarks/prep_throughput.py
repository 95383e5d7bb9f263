"""Prep throughput: images/s of alexprep's per-image stage against a plain Pillow script.

Generates photo-like JPEGs once into a temporary folder (ImageNet-sized, about 500x375, plus a
fraction above 2000 px), then times, in the same run and on the same files:
  (a) the plain script everyone writes first: open, convert("RGB"), Lanczos resize of the whole image
      to shorter side 256, centre crop, save JPEG q90 (one image at a time, one process);
  (b) decode alone (open + load), the floor for any pipeline that decodes every pixel;
  (c) `prep.image.process` in this process (per-core speed);
  (d) `prep.image.process` in a multiprocessing pool of 1 and of 2 worker processes (scaling).
Then the whole build against the minimal script, on `--build-images` ImageNet-sized photos laid out
as an ILSVRC folder tree (issue 9's measure):
  (e) the minimal one-at-a-time script: open, convert("RGB"), bicubic shorter side 256, centre crop,
      JPEG q90, append to a tar (and the same with Lanczos, the filter alexprep uses);
  (f) `prep.build.build_shards(source=<tree>, splits=("train",), workers=1)`: everything the build does
      for a train image (statistics, shard tar, resume records, _info.json), in this process. A split
      this small takes its statistics from every image; (f8) is the same build with the statistics
      sample of ImageNet's 1.28 M train images, every 8th image (`stats_every=8`), so it costs per
      image what a full ImageNet build does;
and reports (f8)'s and (f)'s images per CPU-second over (e)'s. Last, the pixel statistics two ways, on
those photos and on the synthetic train set: of the written JPEGs decoded again (what the build does)
and of the pixels before encoding (no decode): CPU cost, and how far apart the two results are; and the
standard error that ImageNet's 1-in-8 sample would have with these images' spread.
Each measurement is the best of `--repeat` passes, the methods taking turns so that background
load hits them alike; (a) to (c), (e) and (f) count CPU seconds of the one process, (d) wall seconds.
With `--plain-python`, (a) also runs under another interpreter (say, a virtual environment with stock
Pillow) on the same files.

    .venv/bin/python benchmarks/prep_throughput.py --images 200 --json /tmp/prep_throughput.json

This file's top level needs only the standard library and PIL, so `--naive-only` runs under any
interpreter that has Pillow.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

SIZE, QUALITY = 256, 90  # alexprep's image size and default JPEG quality (prep.contract, prep.build)


def naive(path: Path) -> bytes:
    """The plain one-image-at-a-time script: whole-image decode and resize, then crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    rw, rh = (SIZE, round(h * SIZE / w)) if w <= h else (round(w * SIZE / h), SIZE)
    im = im.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - SIZE) // 2, (rh - SIZE) // 2
    im = im.crop((left, top, left + SIZE, top + SIZE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def minimal_to_tar(paths: list[Path], tar_path: Path, resample: int) -> None:
    """The minimal build: each image opened, converted, resized, cropped, encoded and appended to a tar."""
    with tarfile.open(tar_path, "w") as tar:
        for path in paths:
            im = Image.open(path).convert("RGB")
            w, h = im.size
            rw, rh = (SIZE, round(h * SIZE / w)) if w <= h else (round(w * SIZE / h), SIZE)
            im = im.resize((rw, rh), resample)
            left, top = (rw - SIZE) // 2, (rh - SIZE) // 2
            buf = io.BytesIO()
            im.crop((left, top, left + SIZE, top + SIZE)).save(buf, format="JPEG", quality=QUALITY)
            info = tarfile.TarInfo(f"{path.stem}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)


def decode_only(path: Path) -> None:
    with Image.open(path) as im:
        im.load()


def ours(path: Path) -> int:
    from prep.image import process

    return len(process(path.read_bytes(), SIZE, QUALITY).jpeg)


def time_each(fn, paths: list[Path]) -> list[float]:
    """CPU seconds of this process per image, in order. CPU time, not wall time: the per-core speed
    then holds even while other programs share the machine (the pool runs are wall time)."""
    out = []
    for p in paths:
        t = time.process_time()
        fn(p)
        out.append(time.process_time() - t)
    return out


def naive_only(folder: Path, repeat: int) -> None:
    """Entry point for --plain-python: time (a) here and print JSON per-image seconds of the best pass."""
    import PIL

    paths = sorted(folder.glob("*.jpg"))
    best = min((time_each(naive, paths) for _ in range(repeat)), key=sum)
    print(json.dumps({"pil": PIL.__version__, "seconds": dict(zip((p.name for p in paths), best))}))


# ---- everything below runs in the main interpreter (numpy, prep) ----


def make_images(folder: Path, n: int, large_fraction: float, seed: int, workers: int) -> list[Path]:
    """Write n photo-like q90 JPEGs: ImageNet-like sizes, and about `large_fraction` of 2000..3200 px."""
    import numpy as np

    from benchmarks.common import PHOTO_SIZES, write_photos

    rng = np.random.default_rng(seed)
    specs, n_large = [], round(n * large_fraction)
    for i in range(n):
        if i < n_large:
            long = int(rng.integers(2000, 3201))
            short = int(long * rng.uniform(0.66, 0.8))
            wh = (long, short) if rng.random() < 0.7 else (short, long)
        else:
            wh = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
        name = f"{'large' if i < n_large else 'small'}_{i:05d}.jpg"
        specs.append((folder / name, wh, seed * 1_000_003 + i))
    write_photos(specs, workers)
    return sorted(p for p, _, _ in specs)


def _ready(_: int) -> int:
    import prep.image  # noqa: F401  (imported before the clock starts)

    return os.getpid()


def pool_seconds(paths: list[Path], workers: int, repeat: int) -> float:
    """Best wall time of `repeat` passes over `paths` through a pool of `workers` processes."""
    with Pool(workers) as pool:
        pool.map(_ready, range(workers * 4))  # workers started and warm before timing
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in pool.imap_unordered(ours, paths, chunksize=4):
                pass
            best = min(best, time.perf_counter() - t)
    return best


def build_vs_minimal(root: Path, n: int, seed: int, workers: int, repeat: int) -> dict:
    """CPU seconds per image of (e), (f) and (f8) on the same `n` ImageNet-sized photos (best of `repeat`)."""
    from prep.build import build_shards
    from prep.contract import IMAGENET_TRAIN_IMAGES
    from prep.stats import sample_every

    tree = root / "tree"
    (root / "flat").mkdir(parents=True)
    made = make_images(root / "flat", n, 0.0, seed, workers)
    paths = []
    for i, path in enumerate(made):  # an ILSVRC-style tree of 10 classes, as `--source DIR` reads it
        wnid = f"n{i % 10:08d}"
        (tree / "train" / wnid).mkdir(parents=True, exist_ok=True)
        paths.append(path.rename(tree / "train" / wnid / f"{wnid}_{i}.JPEG"))
    paths.sort()
    out, tar_path = root / "shards", root / "minimal.tar"

    def build(stats_every: int | None = None) -> None:
        shutil.rmtree(out, ignore_errors=True)
        build_shards(out, source=str(tree), splits=("train",), workers=1, stats_every=stats_every)

    methods = {
        "minimal_bicubic": lambda: minimal_to_tar(paths, tar_path, Image.BICUBIC),
        "minimal_lanczos": lambda: minimal_to_tar(paths, tar_path, Image.LANCZOS),
        "build": build,
        "build_sampled": lambda: build(sample_every(IMAGENET_TRAIN_IMAGES)),
    }
    best = {name: float("inf") for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            t = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t)
    return {name: seconds / n for name, seconds in best.items()}


def stats_options(datas: list[bytes], repeat: int) -> dict:
    """Pixel statistics two ways on the same images: of the written JPEG decoded again (what the build
    does) and of the pixels before encoding (no decode); CPU ms per image and how far apart they are.
    And the standard error of ImageNet's statistics sample (every 8th of 1,281,167 train images, simple
    random sampling without replacement) if its images spread as these do: of the mean, from the
    spread of the images' own means; of the std and the eigenvalues, linearised (var = E[x^2] - mean^2,
    eigval_k = v_k' (E[x x'] - mean mean') v_k with v_k fixed)."""
    import numpy as np

    from prep.contract import IMAGENET_TRAIN_IMAGES
    from prep.image import jpeg_sums, process, resize_crop
    from prep.stats import PixelSums, sample_every

    outs = [(np.asarray(resize_crop(d).image), process(d).jpeg) for d in datas]
    ways = {"decoded": lambda o: jpeg_sums(o[1]), "before_encoding": lambda o: PixelSums.of_image(o[0])}
    result = {}
    for name, fn in ways.items():
        best, total = float("inf"), PixelSums()
        for _ in range(repeat):
            t = time.process_time()
            for o in outs:
                fn(o)
            best = min(best, time.process_time() - t)
        for o in outs:
            total.add(fn(o))
        result[name] = {"ms_per_image": 1e3 * best / len(outs), "stats": total.stats().to_json()}
    ref, other = result["decoded"]["stats"], result["before_encoding"]["stats"]
    result["deviation"] = {
        "mean": max(abs(a - b) for a, b in zip(other["mean"], ref["mean"])),
        "std": max(abs(a - b) for a, b in zip(other["std"], ref["std"])),
        "cov": max(abs(a - b) for ra, rb in zip(other["cov"], ref["cov"]) for a, b in zip(ra, rb)),
        "eigval_rel": max(abs(a - b) / b for a, b in zip(other["eigval"], ref["eigval"])),
    }
    decoded = [np.asarray(Image.open(io.BytesIO(o[1])).convert("RGB")).reshape(-1, 3) / 255 for o in outs]
    m1 = np.array([x.mean(axis=0) for x in decoded])  # (images, 3): each image's channel means
    outer = np.array([x.T @ x / len(x) for x in decoded])  # (images, 3, 3): each image's E[x x']
    m2 = np.diagonal(outer, axis1=1, axis2=2)
    mean, std = np.array(ref["mean"]), np.array(ref["std"])
    vec, val = np.array(ref["eigvec"]), np.array(ref["eigval"])
    eig_terms = np.einsum("ik,nij,jk->nk", vec, outer, vec) - 2 * (mean @ vec) * (m1 @ vec)  # (images, 3)
    sample = -(-IMAGENET_TRAIN_IMAGES // sample_every(IMAGENET_TRAIN_IMAGES))
    factor = np.sqrt((1 - sample / IMAGENET_TRAIN_IMAGES) / sample)
    result["imagenet_sample"] = {
        "images": sample,
        "spread_of_image_means": float(m1.std(axis=0, ddof=1).max()),
        "se_mean": float((m1.std(axis=0, ddof=1) * factor).max()),
        "se_std": float(((m2 - 2 * mean * m1).std(axis=0, ddof=1) * factor / (2 * std)).max()),
        "se_eigval_rel": float((eig_terms.std(axis=0, ddof=1) * factor / val).max()),
    }
    return result


def measure(args: argparse.Namespace, cores: int) -> dict:
    """Every measurement of the module docstring, on images generated into a temporary folder."""
    from prep import synthetic

    with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
        t = time.perf_counter()
        paths = make_images(Path(tmp), args.images, args.large_fraction, args.seed, cores)
        gen_s = time.perf_counter() - t
        large = [p.name.startswith("large") for p in paths]
        data_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} images ({sum(large)} above 2000 px, {data_mb:.1f} MB) generated in {gen_s:.1f} s",
              file=sys.stderr)

        serial = {"naive": naive, "decode": decode_only, "ours": ours}
        for fn in serial.values():
            fn(paths[0])  # imports and first-call costs out of the timing
        passes = {name: [] for name in serial}
        for _ in range(args.repeat):
            for name, fn in serial.items():
                passes[name].append(time_each(fn, paths))
        best = {name: min(runs, key=sum) for name, runs in passes.items()}
        plain_pillow = None
        if args.plain_python:
            out = subprocess.run(
                [args.plain_python, __file__, "--naive-only", tmp, "--repeat", str(args.repeat)],
                capture_output=True, text=True, check=True,
            )
            plain = json.loads(out.stdout)
            best["naive_plain"] = [plain["seconds"][p.name] for p in paths]
            plain_pillow = plain["pil"]
        pools = {n: pool_seconds(paths, n, args.repeat) for n in sorted({1, min(2, cores)})}
        build = build_vs_minimal(Path(tmp) / "build", args.build_images, args.seed + 1, cores, args.repeat)
        stats_sets = {
            "photos": [p.read_bytes() for p in sorted((Path(tmp) / "build" / "tree").rglob("*.JPEG"))],
            "synthetic": [synthetic.image_bytes(k, c) for k, c in synthetic.items("train", args.seed, per_class=30)],
        }
        stats = {name: {**stats_options(datas, args.repeat), "images": len(datas)} for name, datas in stats_sets.items()}
    return {"large": large, "data_mb": data_mb, "best": best, "plain_pillow": plain_pillow, "pools": pools,
            "build_per_image": build, "stats": stats}


def per_core_results(m: dict) -> dict:
    """Images/s of (a) to (d), their ratio to (a), and ms per image of the ImageNet-sized and the large ones."""
    large, n = m["large"], len(m["large"])

    def row(per_image: list[float]) -> dict:
        small = [s for s, big in zip(per_image, large) if not big]
        big = [s for s, is_big in zip(per_image, large) if is_big]
        return {
            "images_per_s": n / sum(per_image),
            "ms_imagenet_sized": 1e3 * sum(small) / max(1, len(small)),
            "ms_large": 1e3 * sum(big) / max(1, len(big)),
        }

    results = {name: row(times) for name, times in m["best"].items()}
    for workers, seconds in m["pools"].items():
        results[f"ours_pool{workers}"] = {"images_per_s": n / seconds}
    base = results["naive"]["images_per_s"]
    for r in results.values():
        r["x_naive"] = r["images_per_s"] / base
    if "naive_plain" in results:
        for r in results.values():
            r["x_naive_plain"] = r["images_per_s"] / results["naive_plain"]["images_per_s"]
    return results


def per_core_table(results: dict, pillow: str, plain_pillow: str | None) -> str:
    labels = {
        "naive": f"(a) plain script: open, convert, Lanczos resize, crop, save ({pillow}); CPU time",
        "naive_plain": f"(a') the same plain script under stock Pillow {plain_pillow}; CPU time",
        "decode": "(b) decode only: open + load; CPU time",
        "ours": "(c) alexprep `process()`, one process (per core); CPU time",
        "ours_pool1": "(d) alexprep `process()`, pool of 1 worker process; wall time",
        "ours_pool2": "(d) alexprep `process()`, pool of 2 worker processes; wall time",
    }
    plain_col = "naive_plain" in results
    head = "| what | images/s | x (a) |" + (" x (a') |" if plain_col else "")
    head += " ms/img ImageNet-sized | ms/img large |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name in ("naive", "naive_plain", "decode", "ours", "ours_pool1", "ours_pool2"):
        if name not in results:
            continue
        r = results[name]
        cells = [labels[name], f"{r['images_per_s']:.0f}", f"{r['x_naive']:.2f}"]
        if plain_col:
            cells.append(f"{r['x_naive_plain']:.2f}")
        cells += [f"{r['ms_imagenet_sized']:.2f}", f"{r['ms_large']:.1f}"] if "ms_large" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


BUILD_LABELS = {
    "minimal_bicubic": "(e) minimal script: open, convert, bicubic 256, crop, JPEG q90, append to tar",
    "minimal_lanczos": "(e') the same with Lanczos (alexprep's filter)",
    "build": "(f) build_shards(workers=1), train split: statistics of every image, shard tar, records, _info.json",
    "build_sampled": "(f8) the same with ImageNet's statistics sample, every 8th image (stats_every=8)",
}


def build_results(per_image: dict) -> dict:
    """(e), (f) and (f8) in ms per image and images per CPU-second, and (f8)'s and (f)'s ratios to (e)."""
    build = {name: {"ms_per_image": 1e3 * sec, "images_per_cpu_s": 1 / sec} for name, sec in per_image.items()}
    build["ratio"] = per_image["minimal_bicubic"] / per_image["build_sampled"]
    build["ratio_lanczos"] = per_image["minimal_lanczos"] / per_image["build_sampled"]
    build["ratio_every_image"] = per_image["minimal_bicubic"] / per_image["build"]
    return build


def print_stats(stats: dict) -> None:
    from prep.contract import IMAGENET_TRAIN_IMAGES

    print("\npixel statistics of the written JPEGs decoded again (the build) vs of the pixels before encoding:")
    for name, r in stats.items():
        d = r["deviation"]
        print(f"  {name} ({r['images']} images): decoded {r['decoded']['ms_per_image']:.2f} ms/img, "
              f"before encoding {r['before_encoding']['ms_per_image']:.2f} ms/img; apart by mean {d['mean']:.1e}, "
              f"std {d['std']:.1e}, cov {d['cov']:.1e}, eigenvalues {100 * d['eigval_rel']:.1f}%")
    for name, r in stats.items():
        e = r["imagenet_sample"]
        print(f"  ImageNet's sample ({e['images']:,} of {IMAGENET_TRAIN_IMAGES:,}) with the spread of {name} (image means "
              f"spread {e['spread_of_image_means']:.3f}): standard error of the mean {e['se_mean']:.1e}, "
              f"of the std {e['se_std']:.1e}, of the eigenvalues {100 * e['se_eigval_rel']:.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="how many test images (default 200)")
    ap.add_argument("--large-fraction", type=float, default=0.1, help="share above 2000 px (default 0.1)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per method; the best counts (default 3)")
    ap.add_argument("--build-images", type=int, default=400,
                    help="ImageNet-sized photos for the build vs minimal script comparison (default 400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--plain-python", help="another interpreter to run (a) under too, e.g. stock Pillow's")
    ap.add_argument("--naive-only", type=Path, help=argparse.SUPPRESS)  # used through --plain-python
    args = ap.parse_args()
    if args.naive_only:
        naive_only(args.naive_only, args.repeat)
        return
    from benchmarks.common import machine
    from prep.contract import write_json

    info = machine()
    m = measure(args, info["cores"])
    if m["plain_pillow"]:
        info["plain_pillow"] = m["plain_pillow"]
    results = per_core_results(m)
    table = per_core_table(results, info["pillow"], m["plain_pillow"])
    n, large = len(m["large"]), sum(m["large"])
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['pillow']} "
        f"(libjpeg-turbo {info['libjpeg_turbo']}), {info['date']}, load average before {info['load_average']:.2f}"
    )
    print(f"images: {n} photo-like JPEG q90, {large} of them 2000..3200 px, {m['data_mb']:.1f} MB; "
          f"best of {args.repeat} passes\n")
    print(table)
    if 2 in m["pools"]:
        print(f"\nscaling 1 -> 2 workers: {m['pools'][1] / m['pools'][2]:.2f}x")
    build = build_results(m["build_per_image"])
    build_table = "\n".join(["| what | images per CPU-second | ms/img |", "| --- | --- | --- |"] + [
        f"| {label} | {build[name]['images_per_cpu_s']:.0f} | {build[name]['ms_per_image']:.2f} |"
        for name, label in BUILD_LABELS.items()])
    print(f"\nbuild vs minimal script: {args.build_images} ImageNet-sized photo-like JPEG q90 as an ILSVRC "
          f"tree; CPU time, best of {args.repeat}\n")
    print(build_table)
    print(f"\nbuild-shards --workers 1 as on ImageNet (f8) / minimal script (bicubic), images per CPU-second: "
          f"{build['ratio']:.2f}x (against the Lanczos variant: {build['ratio_lanczos']:.2f}x; with the statistics "
          f"of every image (f): {build['ratio_every_image']:.2f}x)")
    print_stats(m["stats"])
    if args.json:
        images = {"count": n, "large": large, "megabytes": m["data_mb"], "repeat": args.repeat,
                  "build_images": args.build_images}
        write_json(args.json, {"machine": info, "images": images, "results": results, "table": table, "build": build,
                               "build_table": build_table, "stats_options": m["stats"]})


if __name__ == "__main__":
    main()
