"""What bf16 BatchNorm statistics cost a trained network in evaluation mode (issue 14, item 3).

    python bench/bn_statistics.py --weights runs/demo/student/student.safetensors \
        --data data/demo/eval-natural data/demo/eval-synthetic [--track data/demo/seg]

An eval-mode network normalises every activation with BatchNorm's running mean and variance.
DeepSpeed's bf16 engine mode keeps them in bf16; wsshm trains bf16 under autocast and keeps them in
fp32 (docs/training.md). This scores the same weights on each ``--data`` folder with
``wsshm.evaluate`` (the SPEC's test-time protocol and metrics, the network in fp32) under several
sets of statistics:

* ``stored``: as training left them (fp32);
* ``rounded once to bf16``: the stored ones, rounded once;
* with ``--track SEG``, statistics re-estimated at the same weights from ``--batches`` training
  batches (the pre-training loader on ``SEG``: augmented crops), after a reset:
  ``fp32 running`` (the momentum update in fp32, what wsshm keeps), ``bf16 running`` (the same update
  stored in bf16 after every batch, what DeepSpeed's bf16 mode keeps: an update smaller than half a
  bf16 step is lost) and ``fp32 recomputed`` (the plain average over all batches, momentum None).

The running statistics forget with a time constant of 1/momentum = 10 batches, so those of the
final weights over the last batches are what a run ends with; ``fp32 running`` against ``stored``
shows how close that comes. Prints Markdown tables: the statistics' drift against ``fp32 running``,
then set | metric | one column per set of statistics, with the difference to the first in %.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from wsshm.evaluate import COLUMNS, EvalDataError, evaluate_model, load_eval_set
from wsshm.inference import SHORT_SIDE, default_device
from wsshm.models import load_weights


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def statistics(model: nn.Module) -> torch.Tensor:
    """Every running mean and variance of ``model``, flattened, fp32."""
    return torch.cat([torch.cat([m.running_mean.float(), m.running_var.float()]) for m in batch_norms(model)])


def _store_in_bf16(module, *hook_args) -> None:
    """Keep only what a bf16 buffer can hold of ``module``'s statistics; as a forward hook, after
    BatchNorm's own update (fp32 arithmetic)."""
    with torch.no_grad():
        for stat in (module.running_mean, module.running_var):
            stat.copy_(stat.bfloat16().float())


def round_statistics_to_bf16(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are rounded to bf16 (stored as fp32)."""
    rounded = copy.deepcopy(model)
    for module in batch_norms(rounded):
        _store_in_bf16(module)
    return rounded


def track_statistics(model: nn.Module, batches: list[torch.Tensor], kind: str) -> nn.Module:
    """A copy of ``model`` whose statistics are re-estimated from ``batches`` (inputs of the
    network) in training mode at fixed weights. ``kind``: "fp32 running", "bf16 running" or
    "fp32 recomputed" (module docstring)."""
    tracked = copy.deepcopy(model)
    hooks = []
    for module in batch_norms(tracked):
        module.reset_running_stats()
        if kind == "fp32 recomputed":
            module.momentum = None  # a cumulative moving average: the plain mean over the batches
        elif kind == "bf16 running":  # the reset values, 0 and 1, are bf16 values already
            hooks.append(module.register_forward_hook(_store_in_bf16))
    tracked.train()
    with torch.no_grad():
        for x in batches:
            tracked(x)
    for hook in hooks:
        hook.remove()
    return tracked.eval()


def training_batches(seg: str, n: int, batch_size: int, crop: int, seed: int) -> list[torch.Tensor]:
    from wsshm.data import build_loader
    loader = build_loader("pretrain", seg=seg, batch_size=batch_size, crop_sizes=(crop,), seed=seed, num_workers=0)
    try:
        return [next(loader)["image"] for _ in tqdm(range(n), desc="training batches", disable=None)]
    finally:
        loader.close()


def drift(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """(share of values that differ, median and max relative difference) of ``other`` vs ``reference``."""
    rel = (other - reference).abs() / reference.abs().clamp_min(1e-6)
    return float((other != reference).float().mean()), float(rel.median()), float(rel.max())


def markdown(kinds: list[str], rows: list[tuple[str, str, list[float]]]) -> str:
    lines = ["| set | metric | " + " | ".join(kinds) + " |", "| --- | --- |" + " ---: |" * len(kinds)]
    for name, metric, values in rows:
        base = values[0]
        cells = [f"{values[0]:.3f}"] + [f"{v:.3f} ({100 * (v - base) / abs(base):+.2f}%)" if base else f"{v:.3f}"
                                        for v in values[1:]]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="trained weights (.safetensors)")
    parser.add_argument("--data", required=True, nargs="+", help="eval shard folders (or images/ + alphas/)")
    parser.add_argument("--track", default=None, help="a seg shard folder: re-estimate the statistics from it")
    parser.add_argument("--batches", type=int, default=200, help="training batches for --track")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size for --track (training's)")
    parser.add_argument("--crop", type=int, default=64, help="crop side for --track (training's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="a deterministic subset of N images per set")
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    try:
        model = load_weights(args.weights, map_location="cpu").float()
        sets = {Path(folder).name: load_eval_set(folder, limit=args.limit) for folder in args.data}
        batches = (training_batches(args.track, args.batches, args.batch_size, args.crop, args.seed)
                   if args.track else [])
    except (EvalDataError, ValueError, OSError) as error:
        print(f"bn_statistics: error: {error}", file=sys.stderr)
        return 2
    device = default_device(args.device)
    models = {"stored": model.eval(), "rounded once to bf16": round_statistics_to_bf16(model).eval()}
    for kind in ("fp32 running", "bf16 running", "fp32 recomputed") if batches else ():
        models[kind] = track_statistics(model, batches, kind)
    print(f"weights: {args.weights} (arch {getattr(model, 'arch', '?')}); device {device}; "
          f"{len(batch_norms(model))} BatchNorm layers, {statistics(model).numel()} statistics"
          + (f"; re-estimated from {len(batches)} batches of {args.batch_size} crops of {args.crop} px of "
             f"{args.track}" if batches else "") + "\n")
    reference = "fp32 running" if batches else "stored"
    print(f"| statistics | share changed vs {reference} | median relative change | max relative change |")
    print("| --- | ---: | ---: | ---: |")
    for kind, net in models.items():
        if kind != reference:
            changed, median, largest = drift(statistics(models[reference]), statistics(net))
            print(f"| {kind} | {changed:.1%} | {median:.3%} | {largest:.2%} |")
    print()
    rows = []
    for name, samples in sets.items():
        means = {kind: evaluate_model(net.to(device), samples, short_side=args.short_side, device=device,
                                      worst=0, progress=False)["mean"] for kind, net in models.items()}
        rows += [(f"{name} ({len(samples)})", label, [means[kind].get(key, float("nan")) for kind in models])
                 for key, label in COLUMNS.items() if key in ("mse", "mse_boundary", "sad", "grad")]
    print(markdown(list(models), rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
