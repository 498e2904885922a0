"""Loader throughput and the fused op against its PyTorch reference; prints Markdown tables.

    .venv/bin/python bench/bench_loaders.py            # full: batch 16, 512 crops
    .venv/bin/python bench/bench_loaders.py --quick    # a smoke run (batch 4, 128 crops)

1. The fused op (torch.ops.wsshm.fused_prepare) vs fused_prepare_reference (plain torch ops) on a batch of
   random uint8 crops, per form; median of --repeats; on a GPU also GB/s against a device copy.
2. Images/s of the DALI pipeline, the PyTorch loader (csrc op) and the PyTorch loader with the
   reference op, on demo shards, in one run on one machine (teacher and student forms): the loaders
   take --rounds interleaved turns, the ratio is the median of the per-round ratios, and the CPU time
   per image (process and workers) is printed beside it, which a shared machine's load moves less.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsshm.data import build_loader  # noqa: E402
from wsshm.data.prepare import fused_prepare, fused_prepare_reference  # noqa: E402


def median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_op(batch: int, size: int, repeats: int, device: torch.device) -> list[str]:
    g = torch.Generator().manual_seed(0)
    u8 = lambda *s: torch.randint(1, 256, s, dtype=torch.uint8, generator=g).to(device)  # noqa: E731
    image, alpha, bg = u8(batch, size, size, 3), u8(batch, size, size), u8(batch, size, size, 3)
    jitter = torch.tensor([[1.2, 0.8, 1.3, 0.05]] * batch, device=device)
    forms = {"pretrain": ((image,), {}), "teacher": ((image, alpha, bg), {}), "student": ((image,), {"jitter": jitter})}
    rows = ["| form | reference ms | csrc ms | speed-up | csrc GB/s | copy GB/s |", "|---|---|---|---|---|---|"]
    for form, (args, kw) in forms.items():
        ref = median_time(lambda: fused_prepare_reference(*args, **kw), repeats, device)
        fused = median_time(lambda: fused_prepare(*args, **kw), repeats, device)
        gbs = copy_gbs = "-"
        if device.type == "cuda":
            outputs = fused_prepare(*args, **kw)
            moved = sum(t.numel() * t.element_size() for t in (*args, *kw.values()))
            moved += sum(o.numel() * o.element_size() for o in outputs if o is not None)
            gbs = f"{moved / fused / 1e9:.0f}"
            src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_gbs = f"{2 * src.numel() / median_time(lambda: dst.copy_(src), repeats, device) / 1e9:.0f}"
        rows.append(f"| {form} | {ref * 1e3:.1f} | {fused * 1e3:.1f} | {ref / fused:.2f}x | {gbs} | {copy_gbs} |")
    return rows


def cpu_seconds() -> float:
    """CPU time of this process (all its threads: DALI's) and of its live children (DataLoader workers)."""
    import multiprocessing
    times = os.times()
    total = times.user + times.system
    tick = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except OSError:
            pass
    return total


def bench_loaders(folders: dict, batch: int, size: int, batches: int, workers: int, device: torch.device,
                  rounds: int) -> list[str]:
    """Loaders take turns, a fresh one per round (order reversed every other round), so a change in
    the machine's load hits each alike; the ratio is taken per round, then the median. CPU time per
    image (process + workers) is the load-independent cost."""
    variants = [("DALI pipeline", "dali", fused_prepare), ("PyTorch loader (csrc op)", "torch", fused_prepare),
                ("PyTorch loader (plain torch ops)", "torch", fused_prepare_reference)]
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        print("nvidia-dali is not installed here: no DALI rows", file=sys.stderr)
        variants = variants[1:]
    base = "PyTorch loader (csrc op)"
    rows = ["| loader | form | images/s (median) | vs PyTorch loader (csrc): median of rounds | range | "
            "CPU ms per image |", "|---|---|---|---|---|---|"]
    for form in ("teacher", "student"):
        rates = {name: [] for name, _, _ in variants}
        cpu_ms = {name: [] for name, _, _ in variants}
        for r in range(rounds):
            for name, backend, prepare in variants if r % 2 == 0 else variants[::-1]:
                loader = build_loader(form, seg=folders["seg"], matte=folders["matte"],
                                      background=folders["background"], batch_size=batch, crop_sizes=size,
                                      backend=backend, num_workers=workers, device=device)
                loader.prepare = prepare  # the last step: the fused op or its plain-torch reference
                for _ in range(2):  # warm-up: workers / pipeline start
                    next(loader)
                t, c = time.perf_counter(), cpu_seconds()
                for _ in range(batches):
                    b = next(loader)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates[name].append(batches * batch / (time.perf_counter() - t))
                cpu_ms[name].append((cpu_seconds() - c) / (batches * batch) * 1e3)
                del b, loader
        for name in rates:
            ratios = [v / w for v, w in zip(rates[name], rates[base])]
            rows.append(f"| {name} | {form} | {statistics.median(rates[name]):.1f} | "
                        f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x | "
                        f"{statistics.median(cpu_ms[name]):.1f} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for CI and smoke tests")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512, help="crop size")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, default=8, help="timed loader batches per round")
    ap.add_argument("--rounds", type=int, default=4, help="turns each loader takes (interleaved)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    ap.add_argument("--data", help="folder for the demo shards (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats, args.batches, args.rounds = 4, 128, 3, 2, 1
    device = torch.device(args.device)
    from wsshm.shards.demo_data import generate

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", load average {os.getloadavg()[0]:.2f}")
    print(f"\n### fused op, batch {args.batch} crops at {args.size} (median of {args.repeats})\n")
    print("\n".join(bench_op(args.batch, args.size, args.repeats, device)))
    with tempfile.TemporaryDirectory() as tmp:
        image_size = max(160, int(args.size * 1.25))
        folders = generate(args.data or tmp, size=image_size, mattes=24, backgrounds=24, seg=48, eval_natural=1,
                           eval_synthetic=1)
        print(f"\n### loaders, batch {args.batch} crops at {args.size}, {args.rounds} rounds of {args.batches} "
              f"batches, {args.workers} workers/threads, demo shards of {int(image_size * 0.75)}x{image_size} "
              f"images, load average {os.getloadavg()[0]:.2f}\n")
        print("\n".join(bench_loaders(folders, args.batch, args.size, args.batches, args.workers, device,
                                       args.rounds)))
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
