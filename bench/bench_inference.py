"""Inference speed at 512x512 against the paper's Table 1, printed as a Markdown table.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_inference.py --quick
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_inference.py            # everything (long on 2 cores)
    .venv/bin/python bench/bench_inference.py --weights runs/demo/student.safetensors --models unet_r18_w0.5

Every row is the median over ``--repeats`` timed runs of images/s, and ``x eager`` is its ratio to
PyTorch eager fp32 (NCHW) of the same network and batch, measured in the same process. Reduced
precision rows also report their accuracy cost: the SPEC metrics of their mattes against the fp32
mattes of the same weights, on real photos through the test-time protocol (``--images``). Without
``--weights`` the networks are randomly initialised, which says how much the arithmetic changes, not
how a trained model's scores move.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsshm.export import calibration_inputs, export_onnx, quantize_int8  # noqa: E402
from wsshm.inference import predict_mattes  # noqa: E402
from wsshm.metrics import evaluate_pair  # noqa: E402
from wsshm.models import build_model, load_weights, split_output  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
PAPER = {"unet_r18_w0.5": (328.9, 43.7), "unet_r18": (222.2, 18.7), "unet_r101": (58.3, 5.0)}
ALL_BACKENDS = ("eager", "eager-cl", "eager-cl-bf16", "compile-cl", "compile-cl-bf16", "ort", "ort-int8")
LOW_PRECISION = ("eager-cl-bf16", "compile-cl-bf16", "ort-int8")
QUICK_BACKENDS = ("eager", "eager-cl", "eager-cl-bf16", "ort", "ort-int8")


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


class OrtModule(nn.Module):
    """An onnxruntime session behind ``forward(x) -> matte`` so ``predict_mattes`` can drive it."""

    def __init__(self, path: str, threads: int):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.contiguous().numpy()})[0])


class MatteOnly(nn.Module):
    """``forward(x) -> matte`` in fp32; with ``autocast`` the network runs under CPU autocast."""

    def __init__(self, model: nn.Module, autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.autocast, enabled=self.autocast is not None):
            return split_output(self.model(x))[0].float()


class ChannelsLastInput(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def build_backend(name: str, model: nn.Module, workdir: str, threads: int, calibration) -> nn.Module:
    """The network as ``forward(normalised NCHW fp32) -> matte`` for one backend."""
    if name == "eager":
        return MatteOnly(model)
    if name.startswith(("eager-cl", "compile-cl")):
        net: nn.Module = copy.deepcopy(model).to(memory_format=torch.channels_last)
        net = MatteOnly(net, torch.bfloat16 if name.endswith("bf16") else None)
        if name.startswith("compile"):
            # freezing folds BN into convs and lets oneDNN pre-pack the weights
            torch._inductor.config.freezing = True
            net = torch.compile(net)
        return ChannelsLastInput(net)
    fp32_path = os.path.join(workdir, f"{model.arch}.onnx")
    if not os.path.exists(fp32_path):
        export_onnx(model, fp32_path)
    if name == "ort":
        return OrtModule(fp32_path, threads)
    if name == "ort-int8":
        int8_path = os.path.join(workdir, f"{model.arch}.int8.onnx")
        if not os.path.exists(int8_path):
            quantize_int8(fp32_path, int8_path, calibration)
        return OrtModule(int8_path, threads)
    raise ValueError(f"unknown backend {name}")


def busy_cores(seconds: float = 5.0) -> float:
    """Cores kept busy by other processes over ``seconds`` (we sleep meanwhile), from /proc/stat."""
    def sample():
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)
    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)


def wait_for_quiet(max_busy: float, patience: float) -> float:
    """Wait (up to ``patience`` seconds) until other processes keep at most ``max_busy`` cores busy:
    the cores here are shared, and other people's jobs slow every backend, unevenly."""
    deadline = time.monotonic() + patience
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cores()
    if busy > max_busy:
        print(f"warning: {busy:.2f} cores busy with other work: timings will be low", file=sys.stderr)
    return busy


def timed_run(fn: nn.Module, x: torch.Tensor, min_seconds: float) -> tuple[float, float]:
    """Images per wall-clock second of back-to-back calls for at least ``min_seconds``, and images
    per CPU-second of this process (all its threads)."""
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        fn(x)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count * x.shape[0] / elapsed, count * x.shape[0] / (time.process_time() - cpu_start)


def interleaved_throughput(backends: dict[str, nn.Module], x: torch.Tensor, repeats: int,
                           min_seconds: float) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Median images/s and images per CPU-second per backend, and each one's first-call seconds
    (compilation, warm-up).

    The timed runs take turns (A B C A B C ...), so a change in the machine's load (shared here)
    hits every backend alike instead of whichever happened to run then."""
    first, runs, cpu_runs = {}, {name: [] for name in backends}, {name: [] for name in backends}
    with torch.inference_mode():
        for name, fn in backends.items():
            start = time.perf_counter()
            fn(x)
            first[name] = time.perf_counter() - start
            fn(x)
        for _ in range(repeats):
            for name, fn in backends.items():
                rate, cpu_rate = timed_run(fn, x, min_seconds)
                runs[name].append(rate)
                cpu_runs[name].append(cpu_rate)
    median = statistics.median
    return ({n: median(r) for n, r in runs.items()}, {n: median(r) for n, r in cpu_runs.items()}, first)


def accuracy_cost(backend: nn.Module, reference: list[np.ndarray], photos: list[np.ndarray]) -> dict[str, float]:
    """Mean SPEC metrics of the backend's mattes against the fp32 mattes (as ground truth)."""
    mattes = predict_mattes(backend, photos, device="cpu")
    scores = [evaluate_pair(m, r) for m, r in zip(mattes, reference)]
    worst = max(float(np.abs(m - r).max()) for m, r in zip(mattes, reference))
    return {"mse": statistics.mean(s["mse"] for s in scores), "sad": statistics.mean(s["sad"] for s in scores),
            "max": worst}


def plan(args, trained_arch: str | None) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(network, batch, backends)`` groups; each group is timed interleaved."""
    if args.quick:
        if trained_arch:
            return [(trained_arch, 1, QUICK_BACKENDS)]
        return [("unet_r18_w0.5", 1, QUICK_BACKENDS), ("unet_r18", 1, ("eager", "eager-cl-bf16"))]
    models = [trained_arch] if trained_arch else args.models
    return [(m, b, tuple(args.backends)) for m in models for b in args.batches]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only what fits in about 2 minutes on 2 cores")
    parser.add_argument("--models", nargs="+", default=list(PAPER))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per timed run")
    parser.add_argument("--max-busy", type=float, default=None,
                        help="before each network/batch group wait until other processes keep at most this "
                             "many cores busy (e.g. 0.2; default: measure once, do not wait)")
    parser.add_argument("--patience", type=float, default=900, help="longest wait for --max-busy, seconds")
    parser.add_argument("--weights", help="trained weights (their arch replaces --models)")
    parser.add_argument("--eval-data", default=str(REALDATA / "p3m-demo"),
                        help="evaluation set for the accuracy cost: an eval shard folder (wsshm-shard demo's "
                             "eval-natural) or a folder with images/ and alphas/")
    parser.add_argument("--accuracy-images", type=int, default=8)
    parser.add_argument("--calibration", default=str(REALDATA / "ccp" / "images"),
                        help="photos for int8 calibration (kept apart from the evaluation set)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.min_seconds = min(args.repeats, 3), min(args.min_seconds, 0.5)
        args.accuracy_images = min(args.accuracy_images, 4)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    photos = []
    if Path(args.eval_data).is_dir():
        from wsshm.evaluate import load_eval_set
        photos = [sample.image for sample in load_eval_set(args.eval_data, limit=args.accuracy_images)]
    try:
        calibration = calibration_inputs(args.calibration, limit=4)
    except ValueError as error:
        print(f"no int8 calibration: {error}", file=sys.stderr)
        calibration = []
    trained = load_weights(args.weights).eval() if args.weights else None
    rows, models, loads = [], {}, []
    with tempfile.TemporaryDirectory() as workdir:
        for arch, batch, backend_names in plan(args, trained.arch if trained is not None else None):
            if arch not in models:
                models[arch] = trained if trained is not None else build_model(arch).eval()
            model = models[arch]
            if "ort-int8" in backend_names and not calibration:
                print(f"skipping ort-int8: no calibration photos in {args.calibration}", file=sys.stderr)
                backend_names = tuple(b for b in backend_names if b != "ort-int8")
            backends = {name: build_backend(name, model, workdir, args.threads, calibration).eval()
                        for name in backend_names}
            x = torch.randn(batch, 3, args.size, args.size)
            loads.append(wait_for_quiet(args.max_busy, args.patience) if args.max_busy is not None
                         else busy_cores(2.0))
            rates, cpu_rates, first = interleaved_throughput(backends, x, args.repeats, args.min_seconds)
            reference = None
            for name in backend_names:
                cost = ""
                if name in LOW_PRECISION and photos:
                    if reference is None:
                        reference = predict_mattes(MatteOnly(model), photos, device="cpu")
                    c = accuracy_cost(backends[name], reference, photos)
                    cost = f"MSE {c['mse']:.3g}, SAD {c['sad']:.3g}, max {c['max']:.3g}"
                ratio = rates[name] / rates["eager"] if "eager" in rates else float("nan")
                rows.append((arch, batch, name, rates[name], ratio, cpu_rates[name], first[name], cost))
                print(f"{arch} b{batch} {name}: {rates[name]:.2f} img/s ({ratio:.2f}x eager), first call "
                      f"{first[name]:.1f}s {cost}", file=sys.stderr, flush=True)

    print(f"\nCPU: {cpu_name()}, {args.threads} threads (torch intra-op and onnxruntime intra-op), "
          f"{args.size}x{args.size}, torch {torch.__version__}, median of {args.repeats} runs of "
          f">= {args.min_seconds}s; cores busy with other work just before each group {', '.join(f'{v:.2f}' for v in loads)}\n")
    print("| network | batch | backend | images/s | x eager fp32 | images per CPU-s x threads | "
          "paper CPU / GPU images/s | first call s | accuracy cost vs fp32 (mean MSE, SAD; max abs) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, batch, backend_name, rate, ratio, cpu_rate, first, cost in rows:
        gpu, cpu = PAPER.get(arch, ("-", "-"))
        print(f"| {arch} | {batch} | {backend_name} | {rate:.2f} | {ratio:.2f} | {cpu_rate * args.threads:.2f} | "
              f"{cpu} / {gpu} | {first:.1f} | {cost or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
