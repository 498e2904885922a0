"""What bf16 BatchNorm statistics cost a trained network in evaluation mode (issue 14, item 3).

    python bench/bn_statistics.py --weights runs/demo/student/student.safetensors \
        --data data/demo/eval-natural data/demo/eval-synthetic

An eval-mode network normalises every activation with BatchNorm's running mean and variance.
DeepSpeed's bf16 engine mode keeps them in bf16; wsshm trains bf16 under autocast and keeps them in
fp32 (docs/training.md). This scores the same weights twice on each
``--data`` folder with ``wsshm.evaluate`` (the SPEC's test-time protocol and metrics, the network in
fp32): the statistics as stored, and rounded to bf16 (``running_mean/var.bfloat16().float()``), and
prints a Markdown table: set | metric | fp32 stats | bf16-rounded stats | difference (bf16 - fp32).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from wsshm.evaluate import COLUMNS, EvalDataError, evaluate_model, load_eval_set
from wsshm.inference import SHORT_SIDE, default_device
from wsshm.models import load_weights


def round_statistics_to_bf16(model: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose BatchNorm running statistics are rounded to bf16 (stored as fp32),
    and how much they moved: ``{"tensors", "values", "changed", "max_rel"}``."""
    rounded = copy.deepcopy(model)
    moved = {"tensors": 0, "values": 0, "changed": 0, "max_rel": 0.0}
    with torch.no_grad():
        for module in rounded.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.running_mean is None:
                continue
            for stat in (module.running_mean, module.running_var):
                before = stat.detach().float().clone()
                stat.copy_(before.bfloat16().float())
                moved["tensors"] += 1
                moved["values"] += before.numel()
                moved["changed"] += int((stat != before).sum())
                rel = ((stat - before).abs() / before.abs().clamp_min(1e-12)).max().item()
                moved["max_rel"] = max(moved["max_rel"], rel)
    return rounded, moved


def _value(x) -> str:
    return "n/a" if x is None or x != x else f"{x:.4f}"


def _difference(a, b) -> str:
    if a is None or b is None or a != a or b != b:
        return "n/a"
    rel = f" ({100 * (b - a) / abs(a):+.3g}%)" if a else ""
    return f"{b - a:+.3g}{rel}"


def markdown(rows: list[tuple[str, str, float, float]]) -> str:
    lines = ["| set | metric | fp32 stats | bf16-rounded stats | difference |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {metric} | {_value(a)} | {_value(b)} | {_difference(a, b)} |"
              for name, metric, a, b in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="trained weights (.safetensors)")
    parser.add_argument("--data", required=True, nargs="+", help="eval shard folders (or images/ + alphas/)")
    parser.add_argument("--limit", type=int, default=None, help="a deterministic subset of N images per set")
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    try:
        model = load_weights(args.weights, map_location="cpu").float()
        sets = {Path(folder).name: load_eval_set(folder, limit=args.limit) for folder in args.data}
    except (EvalDataError, ValueError, OSError) as error:
        print(f"bn_statistics: error: {error}", file=sys.stderr)
        return 2
    device = default_device(args.device)
    rounded, moved = round_statistics_to_bf16(model)
    models = {"fp32": model.to(device).eval(), "bf16": rounded.to(device).eval()}
    rows = []
    for name, samples in sets.items():
        means = {kind: evaluate_model(net, samples, short_side=args.short_side, device=device, worst=0,
                                      progress=False)["mean"] for kind, net in models.items()}
        rows += [(f"{name} ({len(samples)})", label, means["fp32"].get(key), means["bf16"].get(key))
                 for key, label in COLUMNS.items()]
    print(f"weights: {args.weights} (arch {getattr(model, 'arch', '?')}); device {device}; "
          f"{moved['tensors']} statistics tensors, {moved['changed']} of {moved['values']} values changed by the "
          f"bf16 rounding (at most {moved['max_rel']:.2%} relative)\n")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
