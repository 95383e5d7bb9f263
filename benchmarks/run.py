"""The benchmark suite in one command: runs the sections this machine can run, prints one markdown table
and writes JSON (machine, date, versions, command line, every section's full results).

Sections, each also a script of its own (`python -m benchmarks.MODULE --help`):
  prep    prep_throughput  alexprep's per-image stage against a plain Pillow script, per core (CPU)
  loader  cpu_loader       our shard loader against ImageFolder + DataLoader and decode alone, per core;
                           the loader's memory over 3 epochs (CPU)
  gpu     gpu_train        model-only, loader-only and end-to-end training images/s per arch, batch size,
                           eager or compiled, CPU or GPU decode (CUDA)
  lrn     gpu_lrn          PaperLRN against nn.LocalResponseNorm, forward + backward (CUDA)

    .venv/bin/python -m benchmarks.run --json benchmarks/out/bench.json   # CPU sections; all where CUDA is
    python3 -m benchmarks.run --gpu --json $OUT/bench.json                 # the CUDA sections only
    .venv/bin/python -m benchmarks.run --quick --device cpu --sections prep loader gpu lrn   # every path, tiny

Run it from the repository root. Each section runs in its own process and writes its own JSON beside
--json (bench.gpu.json, ...), so what a section measured is kept when a later one fails or the run is
cut short; the combined JSON is rewritten after every section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT, machine
from prep.contract import write_json


@dataclass(frozen=True)
class Section:
    module: str  # benchmarks.MODULE
    cuda: bool  # needs a GPU (or --device cpu for a sanity run)
    title: str


SECTIONS = {
    "prep": Section("prep_throughput", False, "prep throughput per core"),
    "loader": Section("cpu_loader", False, "CPU loader per core"),
    "gpu": Section("gpu_train", True, "GPU training speed"),
    "lrn": Section("gpu_lrn", True, "LRN forward + backward"),
}


def section_args(name: str, args: argparse.Namespace) -> list[str]:
    """The command-line options `benchmarks.run` passes on to a section."""
    if name == "prep":
        return ["--images", "24", "--build-images", "40", "--repeat", "1"] if args.quick else []
    if name == "loader":
        return ["--quick"] if args.quick else []
    extra = ["--device", args.device] + (["--quick"] if args.quick else [])
    if name == "gpu" and args.time_limit is not None:
        extra += ["--time-limit", str(args.time_limit)]
    return extra


# ---------------------------------------------------------------------------------------------------
# Rows of the one table: (section, what, value, ratio, against)


def _num(value, unit: str, spec: str = ",.0f") -> str:
    return f"{format(value, spec)} {unit}".strip()


def prep_rows(r: dict) -> list[tuple]:
    labels = {"naive": "plain Pillow script (open, convert, Lanczos resize, crop, save), 1 process",
              "naive_plain": "the plain script under stock Pillow, 1 process",
              "decode": "decode alone (open + load), 1 process",
              "ours": "alexprep process(), 1 process",
              "ours_pool1": "alexprep process(), pool of 1",
              "ours_pool2": "alexprep process(), pool of 2"}
    names = [n for n in labels if n in r["results"]] + sorted(set(r["results"]) - set(labels))
    rows = [("prep", labels.get(name, name), _num(r["results"][name]["images_per_s"], "img/s"),
             f"{r['results'][name]['x_naive']:.2f}x", "plain script") for name in names]
    b = r["build"]
    rows.append(("prep", "build_shards --workers 1 as on ImageNet (statistics of 1 in 8) vs minimal script + tar "
                 "(bicubic)", _num(b["build_sampled"]["images_per_cpu_s"], "img/CPU-s"), f"{b['ratio']:.2f}x",
                 "minimal script"))
    rows.append(("prep", "the same with the statistics of every image (train splits up to 200,000)",
                 _num(b["build"]["images_per_cpu_s"], "img/CPU-s"), f"{b['ratio_every_image']:.2f}x",
                 "minimal script"))
    return rows


def loader_rows(r: dict) -> list[tuple]:
    from benchmarks.cpu_loader import label, ordered

    rows = []
    base = {name[len("imagefolder_w"):]: v["images_per_cpu_s"] for name, v in r["results"].items() if name.startswith("imagefolder_w")}
    for name in ordered(r["results"]):
        v, ratio, against = r["results"][name], "", ""
        if "x_imagefolder_per_core" in v:
            ratio = f"{v['x_imagefolder_per_core']:.2f}x"
            against = f"ImageFolder, same workers ({base[name.rsplit('_w', 1)[1]]:,.0f} img/CPU-s)"
        rows.append(("loader", label(name), _num(v["images_per_cpu_s"], "img/CPU-s"), ratio, against))
    growth = r["memory"]["growth"]
    if growth:
        rows.append(("loader", f"memory growth over {len(r['memory']['epochs'])} epochs, {r['memory']['workers']} workers: "
                     "main RSS / peak anonymous PSS of main + workers", f"{growth['main_rss_kib']:+.1%} / {growth['peak_anon_pss_kib']:+.1%}",
                     "", "epoch 1"))
    return rows


def _on_device(row: dict) -> str:
    return f", {row['decoded_on_device']:.0%} decoded on the device" if row["decode"].startswith("both") else ""


def gpu_rows(r: dict) -> list[tuple]:
    rows = []
    alone = {(m["arch"], m["batch"], m["mode"]): m for m in r["model_only"]}
    for m in r["loader_only"]:
        value = _num(m["images_per_s"], "img/s") + _on_device(m) if "images_per_s" in m else m.get("error", "")
        rows.append(("gpu", f"loader-only, batch {m['batch']}, {m['decode']} decode, {m['workers']} workers, {m['transport']}", value, "", ""))
    for e in r["end_to_end"]:
        m = alone.get((e["arch"], e["batch"], e["mode"]), {})
        what = f"{e['arch']}, batch {e['batch']}, {e['mode']}, {e['decode']} decode: end-to-end"
        if "images_per_s" in e:
            value = _num(e["images_per_s"], "img/s") + f", data wait {e['data_wait']:.0%}" + _on_device(e)
            rows.append(("gpu", what, value, f"{e['x_model_only']:.2f}x", f"model-only {m['images_per_s']:,.0f} img/s"))
        else:
            rows.append(("gpu", what, e.get("error", ""), "", ""))
    for m in r["model_only"]:
        if "error" in m:
            rows.append(("gpu", f"{m['arch']}, batch {m['batch']}, {m['mode']}: model-only", m["error"], "", ""))
    for s in r["skipped"]:
        rows.append(("gpu", f"{s['kind']} {' '.join(f'{k}={v}' for k, v in s.items() if k != 'kind')}", "skipped (time limit)", "", ""))
    return rows


def lrn_rows(r: dict) -> list[tuple]:
    ok = sum(c["ok"] for c in r["check"])
    rows = [("lrn", "PaperLRN against float64 nn.LocalResponseNorm, forward and backward", f"{ok}/{len(r['check'])} checks ok", "", "")]
    for s in r["per_step"]:
        rows.append(("lrn", f"{s['impl']}, {s['mode']}, batch {s['batch']}: both LRNs of a step", _num(s["lrn_ms_per_step"], "ms", ".2f"), "", ""))
    return rows


ROWS = {"prep": prep_rows, "loader": loader_rows, "gpu": gpu_rows, "lrn": lrn_rows}


def markdown(rows: list[tuple]) -> str:
    lines = ["| section | what | value | ratio | against |", "| --- | --- | --- | --- | --- |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS),
                        help="which to run (default: prep and loader, plus gpu and lrn when CUDA is available)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA sections only (gpu, lrn)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device of the gpu and lrn sections (cpu: a sanity run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes in every section: checks that every path runs")
    parser.add_argument("--time-limit", type=float, help="gpu section: seconds after its shards are built, then it skips the rest")
    parser.add_argument("--json", type=Path, help="write the combined results here, and each section's beside it")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if args.sections:
        names = args.sections
    elif args.gpu:
        names = ["gpu", "lrn"]
    else:
        names = ["prep", "loader"] + (["gpu", "lrn"] if cuda else [])
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"machine": machine(), "date": started.isoformat(timespec="seconds"),
              "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.run", *sys.argv[1:]]),
              "sections": {}, "failed": [], "table": ""}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"machine: {json.dumps(report['machine'])}", flush=True)
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in names:
            section = SECTIONS[name]
            out = args.json.with_name(f"{args.json.stem}.{name}.json") if args.json else Path(tmp, f"{name}.json")
            out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", f"benchmarks.{section.module}", *section_args(name, args), "--json", str(out)]
            print(f"\n## {name}: {section.title}\n$ {shlex.join(cmd)}", flush=True)
            t = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            seconds = time.perf_counter() - t
            if out.exists():
                result = json.loads(out.read_text())
                report["sections"][name] = {"returncode": rc, "seconds": seconds, "json": str(out), "result": result}
                try:
                    rows += ROWS[name](result)
                except (KeyError, TypeError, ValueError) as e:  # a section's JSON changed shape: keep its own table
                    rows.append((name, f"(could not summarise: {type(e).__name__} {e}; see its JSON)", "", "", ""))
            else:
                report["sections"][name] = {"returncode": rc, "seconds": seconds}
                why = "no CUDA device here" if section.cuda and args.device == "cuda" and not cuda else "no results; see its output"
                rows.append((name, f"(section did not run: {why})", "", "", ""))
            if rc != 0:
                failed.append(name)
                rows.append((name, f"(exit status {rc})", "", "", ""))
            report["failed"], report["table"] = failed, markdown(rows)
            if args.json:
                write_json(args.json, report)

    print(f"\n# Benchmarks, {report['date']}\n{report['machine']['cpu']}, {report['machine']['cores']} cores"
          + (f"; {report['machine']['gpu']}" if report["machine"]["gpu"] else "")
          + f"; torch {report['machine']['torch']}, Pillow {report['machine']['pillow']}\n")
    print(report["table"])
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
