"""GPU inference speed at 512x512 against the paper's GPU column (V100, ONNX runtime), as a table.

    python bench/bench_inference_gpu.py            # the paper's three networks, batch 1 and 16
    python bench/bench_inference_gpu.py --quick    # what bench/gpu_check.sh runs

bench_inference.py measures the CPU deployment paths (onnxruntime, int8); this file measures the GPU
ones: PyTorch eager fp32 (the baseline of the ``x eager`` column), channels-last bf16 (weights cast once),
the same replayed as a CUDA graph (no launch gaps: batch 1 is launch-bound), and ``torch.compile`` of
it in ``reduce-overhead`` mode (inductor's kernels, replayed as CUDA graphs; ``--quick`` compiles the
first network only, compiling takes about a minute per shape). Each figure is the median over ``--repeats`` CUDA-event timings of
``--iters`` back-to-back calls on random inputs, after warm-up. ``max |bf16 - fp32|`` is the largest
change of the matte that reduced precision makes on the same random input.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_inference import PAPER  # noqa: E402  (the paper's Table 1: GPU, CPU images/s)
from wsshm.models import build_model, split_output  # noqa: E402

BACKENDS = ("eager", "eager-cl-bf16", "graph-cl-bf16", "compile-cl-bf16")


class Matte(nn.Module):
    """``forward(x) -> matte`` in fp32 for fp32 input; the network may run channels-last in bf16
    (its weights cast once, not per call as autocast would: at batch 1 the casts are many launches)."""

    def __init__(self, model: nn.Module, channels_last: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.channels_last, self.dtype = channels_last, dtype
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model if dtype == torch.float32 and not channels_last else \
            copy.deepcopy(model).to(dtype=dtype, memory_format=fmt)

    def forward(self, x):
        x = x.to(self.dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return split_output(self.model(x))[0].float()


class GraphReplay(nn.Module):
    """The module captured once as a CUDA graph for a fixed input shape, replayed per call."""

    def __init__(self, module: nn.Module, example: torch.Tensor):
        super().__init__()
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm-up outside the graph: cuDNN picks its algorithms here
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_out = module(self.static_in)

    def forward(self, x):
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


def build_backend(name: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    if name == "eager":
        return Matte(model, channels_last=False)
    net = Matte(model, channels_last=True, dtype=torch.bfloat16)
    if name == "eager-cl-bf16":
        return net
    if name == "graph-cl-bf16":
        return GraphReplay(net, example)
    if name == "compile-cl-bf16":
        return torch.compile(net, mode="reduce-overhead", dynamic=False)
    raise ValueError(f"unknown backend {name}")


def images_per_second(fn: nn.Module, x: torch.Tensor, iters: int, repeats: int) -> float:
    rates = []
    with torch.inference_mode():
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(x)
            end.record()
            end.synchronize()
            rates.append(iters * x.shape[0] / (start.elapsed_time(end) / 1e3))
    return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="unet_r18_w0.5 and unet_r18, fewer timings")
    parser.add_argument("--models", nargs="+", default=list(PAPER))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=50, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_inference_gpu.py needs a CUDA device; bench_inference.py measures the CPU paths",
              file=sys.stderr)
        return 2
    if args.quick:
        args.models = [m for m in args.models if m != "unet_r101"]
        args.iters, args.repeats = min(args.iters, 20), min(args.repeats, 5)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    rows = []
    for arch in args.models:
        model = build_model(arch).cuda().eval()
        for batch in sorted(args.batches, reverse=True):  # throughput first, in case time runs out
            x = torch.randn(batch, 3, args.size, args.size, device="cuda")
            with torch.inference_mode():
                fp32 = Matte(model, channels_last=False)(x)
            rates = {}
            for name in args.backends:
                if name.startswith("compile") and args.quick and arch != args.models[0]:
                    continue
                start = time.perf_counter()
                fn = build_backend(name, model, x)
                with torch.inference_mode():
                    for _ in range(3):
                        out = fn(x)
                torch.cuda.synchronize()
                setup_s = time.perf_counter() - start
                diff = (out - fp32).abs().max().item()
                rates[name] = images_per_second(fn, x, args.iters, args.repeats)
                ratio = rates[name] / rates["eager"] if "eager" in rates else float("nan")
                rows.append((arch, batch, name, rates[name], ratio, setup_s, diff))
                print(f"{arch} b{batch} {name}: {rates[name]:.1f} img/s ({ratio:.2f}x eager), setup "
                      f"{setup_s:.1f}s, max |diff| {diff:.2e}", file=sys.stderr, flush=True)
                del fn
    print(f"\n{card}, torch {torch.__version__}, {args.size}x{args.size}, random weights and inputs, median of "
          f"{args.repeats} CUDA-event timings of {args.iters} calls\n")
    print("| network | batch | backend | images/s | x eager fp32 | x paper GPU (V100) | setup s | "
          "max abs diff vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch, batch, name, rate, ratio, setup_s, diff in rows:
        vs_paper = f"{rate / PAPER[arch][0]:.2f}" if arch in PAPER else "-"
        print(f"| {arch} | {batch} | {name} | {rate:.1f} | {ratio:.2f} | {vs_paper} | {setup_s:.1f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
