"""GPU micro-benchmark of the LRN: forward + backward of PaperLRN, nn.LocalResponseNorm and nothing at all.

On AlexNet's two LRN inputs, (B, 96, 55, 55) and (B, 256, 27, 27), in bfloat16 (float32 on the CPU, where
nn.LocalResponseNorm has no bfloat16 kernel) and channels_last, at batch 128 and 512, eager and torch.compile. First it checks PaperLRN against a float64 nn.LocalResponseNorm
on the device (bf16 and fp32, both layouts), then times with CUDA events after a warm-up.

    python benchmarks/gpu_lrn.py [--json lrn.json]
    python benchmarks/gpu_lrn.py --device cpu --quick       # sanity run on the CPU, small batch

Exit status 1 if the device check fails. Without CUDA (and without --device cpu) it prints why and exits 0.
"""

import argparse
import datetime
import statistics
import sys
import time

import torch
from torch import nn

from benchmarks.common import sync
from prep.contract import write_json
from train.lrn import PaperLRN, backend

PAPER = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
CHANNELS_HW = ((96, 55), (256, 27))  # (channels, height = width) at LRN1 and LRN2
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}  # forward relative, backward relative to max |dx|


def implementations() -> dict[str, nn.Module]:
    return {
        "none": nn.Identity(),
        "nn.LocalResponseNorm": nn.LocalResponseNorm(PAPER["size"], PAPER["alpha"] * PAPER["size"], PAPER["beta"], PAPER["k"]),
        "PaperLRN": PaperLRN(**PAPER),
    }


def relu_like(shape, dtype, device, generator, channels_last=True) -> torch.Tensor:
    """Half zeros, the rest of a scale where alpha * sum x^2 matters next to k (as after AlexNet's ReLUs)."""
    x = (torch.randn(shape, device=device, generator=generator) * 30).relu_().to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def check(device: str) -> list[dict]:
    """PaperLRN vs float64 nn.LocalResponseNorm on the device; one row per case with errors and pass/fail."""
    reference = implementations()["nn.LocalResponseNorm"]
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    # every case compiles two Triton kernels on first use, so float32 is checked in the model's layout only
    cases = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)]
    for channels, hw in CHANNELS_HW:
        for dtype, channels_last in cases:
            x = relu_like((4, channels, hw, hw), dtype, device, gen, channels_last).requires_grad_()
            g = torch.randn(x.shape, device=device, generator=gen).to(dtype)
            y = PaperLRN(**PAPER)(x)
            y.backward(g)
            x64 = x.detach().double().requires_grad_()
            y64 = reference(x64)
            y64.backward(g.double())
            fwd = ((y.double() - y64).abs() / (y64.abs() + 1e-3)).max().item()
            bwd = ((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max()).item()
            ok = fwd < TOLERANCE[dtype] and bwd < TOLERANCE[dtype] and y.stride() == x.stride() == x.grad.stride()
            rows.append(dict(channels=channels, dtype=str(dtype).removeprefix("torch."), channels_last=channels_last,
                             backend=backend(x), forward_rel_err=fwd, backward_rel_err=bwd, ok=ok))
    return rows


def time_ms(step, device: str, warmup: int, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean milliseconds per call of `step` over `iters` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            samples.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(samples)


def training_step(fn, x: torch.Tensor, g: torch.Tensor):
    """One forward and backward through `fn` at `x` with incoming gradient `g`."""
    def step():
        fn(x).backward(g)
        x.grad = None
    return step


def bench(device: str, dtype: torch.dtype, batches: list[int], modes: list[str], warmup: int, iters: int,
          repeats: int) -> list[dict]:
    gen = torch.Generator(device).manual_seed(1)
    rows = []
    for channels, hw in CHANNELS_HW:
        for name, module in implementations().items():
            for mode in modes:
                # one compiled function per layer shape; the batch is dynamic, so batch sizes share one compile
                fn = torch.compile(module, fullgraph=True) if mode == "compile" else module
                for batch in batches:
                    x = relu_like((batch, channels, hw, hw), dtype, device, gen).requires_grad_()
                    if mode == "compile":
                        torch._dynamo.mark_dynamic(x, 0)
                    g = torch.randn(x.shape, device=device, generator=gen).to(dtype)
                    g = g.contiguous(memory_format=torch.channels_last)
                    ms = time_ms(training_step(fn, x, g), device, warmup, iters, repeats)
                    # least traffic an LRN can have: forward reads x, writes y; backward reads g and x, writes dx
                    least_bytes = 5 * x.numel() * x.element_size()
                    rows.append(dict(impl=name, mode=mode, batch=batch, shape=list(x.shape), ms=ms,
                                     least_traffic_gb_per_s=None if name == "none" else least_bytes / ms / 1e6))
    return rows


def per_step(rows: list[dict]) -> list[dict]:
    """Both LRNs of one training step: milliseconds over doing nothing (to set against the paper model's
    whole step, timed by benchmarks/gpu_train.py)."""
    out = []
    for mode in sorted({r["mode"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            for impl in ("nn.LocalResponseNorm", "PaperLRN"):
                def total(name):
                    return sum(r["ms"] for r in rows if (r["impl"], r["mode"], r["batch"]) == (name, mode, batch))
                extra = total(impl) - total("none")
                out.append(dict(impl=impl, mode=mode, batch=batch, lrn_ms_per_step=extra))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--quick", action="store_true", help="batch 4, few iterations (a sanity run)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--json", help="also write the results here (JSON)")
    args = parser.parse_args()
    device = args.device
    t0 = time.perf_counter()
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_lrn: skipped, no CUDA device here (use --device cpu --quick for a sanity run)")
        return 0
    batches = [4] if args.quick else args.batches
    warmup, iters, repeats = (2, 2, 1) if args.quick else (3, 10, 3)
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    what = f"LRN forward+backward, {str(dtype).removeprefix('torch.')}, channels_last"
    print(f"# {what}, {card}, torch {torch.__version__}")

    checks = check(device)
    for c in checks:
        print(f"check C={c['channels']:3d} {c['dtype']:8s} {'channels_last' if c['channels_last'] else 'contiguous':13s} "
              f"{c['backend']:6s} fwd {c['forward_rel_err']:.1e} bwd {c['backward_rel_err']:.1e} "
              f"{'ok' if c['ok'] else 'FAIL'}")

    rows = bench(device, dtype, batches, modes, warmup, iters, repeats)
    print("\n| impl | mode | batch | shape | ms fwd+bwd | GB/s at least traffic |\n|---|---|---|---|---|---|")
    for r in rows:
        gbps = "-" if r["least_traffic_gb_per_s"] is None else f"{r['least_traffic_gb_per_s']:.1f}"
        print(f"| {r['impl']} | {r['mode']} | {r['batch']} | {tuple(r['shape'][1:])} | {r['ms']:.3f} | {gbps} |")
    steps = per_step(rows)
    print("\n| impl | mode | batch | both LRNs, ms per step |\n|---|---|---|---|")
    for s in steps:
        print(f"| {s['impl']} | {s['mode']} | {s['batch']} | {s['lrn_ms_per_step']:.2f} |")

    if args.json:
        write_json(args.json, dict(
            what=what, device=card, torch=torch.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            quick=args.quick, check=checks, results=rows, per_step=steps))
    failed = [c for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks ok, {time.perf_counter() - t0:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
