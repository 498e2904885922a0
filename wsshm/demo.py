"""``make demo``: the paper's whole pipeline at a small size, end to end, then a report.

1. ``wsshm-shard demo`` writes the built-in data (matte, background, seg, eval-natural, eval-synthetic);
2. ``launch/pretrain_seg.py``, ``launch/train_teacher.py``, ``launch/train_student.py``: one CPU
   process, or ``deepspeed`` on all GPUs when there are any;
3. ``wsshm-eval`` scores teacher and student on both evaluation sets;
4. ``runs/demo/report.md`` gets the loss curves, the metrics tables, pictures, and whether the student
   beats the teacher on natural images (the question of the paper's Table 3).

    python -m wsshm.demo [--out runs/demo] [--data data/demo] [--scale 1.0]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from wsshm.atomic import write_text
from wsshm.image import write_png
from wsshm.train.launch import CPU_PROCESSES, CPU_THREADS, ROOT, run_logged, stage_command, training_env
from wsshm.train.options import STAGE_DEFAULTS

ARCH = "unet_r18_w0.25"
IMAGE_SIZE = 128  # demo images are 128 x 96; training crops 64, evaluation at the native size
CROP = 64
BATCH = 8
STEPS = {"pretrain": 1000, "teacher": 300, "student": 300}
MODELS = {"seg-only": "pretrain", "teacher": "teacher", "student": "student"}  # report name -> stage
DATA_COUNTS = dict(mattes=48, backgrounds=32, seg=160, eval_natural=20, eval_synthetic=20)


def stage_steps(scale: float) -> dict[str, int]:
    return {stage: max(10, int(n * scale)) for stage, n in STEPS.items()}


def weights(out: Path, stage: str) -> Path:
    """Where a stage of the demo leaves its final weights."""
    return out / stage / STAGE_DEFAULTS[stage].weights_name


def stage_commands(data: Path, out: Path, steps: dict[str, int], gpus: int) -> dict[str, list[str]]:
    common = ["--arch", ARCH, "--crop-sizes", str(CROP), "--batch-size", str(BATCH), "--num-workers", "1",
              "--log-every", "5", "--image-every", "50", "--save-every", "100"]
    args = {
        "pretrain": ["--seg", data / "seg", "--lr", "1e-3"],
        "teacher": ["--matte", data / "matte", "--background", data / "background", "--lr", "5e-4",
                    "--init", weights(out, "pretrain")],
        "student": ["--seg", data / "seg", "--lr", "5e-4", "--teacher", weights(out, "teacher"),
                    "--init", weights(out, "pretrain"), "--ema-momentum", "0.99"],
    }
    return {stage: stage_command(stage, ["--out", out / stage, "--steps", steps[stage],
                                         "--warmup-steps", max(1, steps[stage] // 20), *common, *args[stage]], gpus)
            for stage in STEPS}


def read_losses(csv_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    return np.array([int(r["step"]) for r in rows]), np.array([float(r["loss"]) for r in rows])


def loss_trend(csv_path: Path) -> dict:
    """Mean loss of the first and the last fifth of the logged steps, and whether it fell."""
    _, loss = read_losses(csv_path)
    k = max(1, len(loss) // 5)
    first, last = float(loss[:k].mean()), float(loss[-k:].mean())
    return {"first": first, "last": last, "falling": last < first, "change": (last - first) / first}


def loss_plot(curves: dict[str, Path], path: Path) -> None:
    """One panel per stage: logged loss against step (drawn with OpenCV, no plotting library)."""
    panels = []
    for name, csv_path in curves.items():
        steps, loss = read_losses(csv_path)
        h, w, pad = 200, 320, 30
        panel = np.full((h, w, 3), 255, np.uint8)
        lo, hi = float(loss.min()), float(loss.max()) or 1.0
        xs = pad + (steps - steps.min()) / max(1, steps.max() - steps.min()) * (w - 2 * pad)
        ys = h - pad - (loss - lo) / max(hi - lo, 1e-12) * (h - 2 * pad)
        cv2.polylines(panel, [np.stack([xs, ys], 1).astype(np.int32)], False, (200, 60, 30), 1, cv2.LINE_AA)
        cv2.rectangle(panel, (pad, pad), (w - pad, h - pad), (160, 160, 160), 1)
        cv2.putText(panel, f"{name}: loss {hi:.3f} .. {lo:.3f}", (pad, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        cv2.putText(panel, f"step {steps.max()}", (w - pad - 70, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        panels.append(panel)
    write_png(path, np.ascontiguousarray(np.concatenate(panels, axis=1)[..., ::-1]))  # drawn as BGR


def sample_sheet(teacher_w: Path, student_w: Path, data: Path, path: Path, short_side: int, count: int = 4) -> None:
    """Natural evaluation images: image | ground truth | teacher | student."""
    from wsshm.evaluate import _tile, load_eval_set
    from wsshm.inference import predict_mattes
    from wsshm.models import load_weights
    samples = load_eval_set(data)[:count]
    images = [s.image for s in samples]
    preds = [predict_mattes(load_weights(str(w)).eval(), images, short_side=short_side) for w in (teacher_w, student_w)]
    rows = [np.concatenate([_tile(s.image), _tile(s.alpha), _tile(t), _tile(u)], axis=1)
            for s, t, u in zip(samples, *preds)]
    write_png(path, np.concatenate(rows, axis=0))


# The paper's Table 3 on natural images, as (better model, worse model, metric key, words).
PAPER_ORDERINGS = (("student", "teacher", "mse", "the student beats the fine-tuned teacher on whole-image MSE"),
                   ("student", "seg-only", "mse_boundary", "the student beats the seg-only model on boundary MSE"),
                   ("teacher", "seg-only", "mse_boundary", "the teacher beats the seg-only model on boundary MSE"))


def orderings(means: dict[str, dict]) -> list[tuple[bool, str]]:
    """The paper's three orderings for ``means`` (model -> the ``mean`` of its ``metrics.json``)."""
    lines = []
    for better, worse, key, words in PAPER_ORDERINGS:
        a, b = means[better][key], means[worse][key]
        lines.append((a < b, f"{words}: {a:.3f} vs {b:.3f}"))
    return lines


def verdict(means: dict[str, dict]) -> str:
    """Markdown: whether each of the paper's orderings holds on these numbers."""
    checks = orderings(means)
    held = sum(ok for ok, _ in checks)
    head = f"**On the natural evaluation set {held} of the paper's 3 orderings hold:**"
    return "\n".join([head, ""] + [f"- {'yes' if ok else '**no**'}: {line}" for ok, line in checks])


def write_report(out: Path, steps: dict, timings: dict, commands: dict, results: dict, short_side: int,
                 device: str) -> Path:
    from wsshm.evaluate import markdown_table
    trends = {stage: loss_trend(out / stage / "loss.csv") for stage in STEPS}
    lines = ["# wsshm demo report", "",
             f"Machine: {device}; Python {platform.python_version()}, torch {torch.__version__}. "
             f"Total time {sum(timings.values()) / 60:.1f} min.", "",
             "Data: the built-in procedural demo set (`wsshm-shard demo`): " +
             ", ".join(f"{k.replace('_', '-')} {v}" for k, v in DATA_COUNTS.items()) +
             f"; images {IMAGE_SIZE} x {IMAGE_SIZE * 3 // 4}.", "",
             "## Training", "",
             f"Network `{ARCH}` for all stages, global batch {BATCH}, {CROP} px crops, Adam + warm-up + cosine "
             "(DeepSpeed), learning rates raised from the paper's for the short schedule.", "",
             "| stage | steps | time | loss, first fifth | loss, last fifth | falling |", "| --- | --- | --- | --- | --- | --- |"]
    for stage, trend in trends.items():
        lines.append(f"| {stage} | {steps[stage]} | {timings[stage]:.0f} s | {trend['first']:.4f} | "
                     f"{trend['last']:.4f} | {'yes' if trend['falling'] else '**no**'} ({trend['change'] * 100:+.0f}%) |")
    lines += ["", "![loss curves](loss_curves.png)", "",
              "## Evaluation", "",
              f"Test-time protocol of SPEC section 4 with the shorter side at {short_side} px (the demo "
              "images' own size, so that the scale matches training; the paper uses 512 for full-size photos). "
              "MSE x1e3, SAD /1e3, as in the paper's tables.", ""]
    for dataset in ("eval-natural", "eval-synthetic"):
        lines += [f"### {dataset}", "", markdown_table({who: results[(who, dataset)] for who in MODELS})]
    lines += [verdict({who: results[(who, "eval-natural")]["mean"] for who in MODELS}), "",
              "The paper's Table 3: the seg-only model (stage 0) is robust on natural images but coarse at the "
              "boundary, the teacher fine-tuned on composites has the better boundary, and the student trained "
              "with MLB beats both. A tiny network and a few minutes of training make this demo a check that the "
              "pipeline works; `bench/bench_fidelity.py` is the study (docs/benchmarks.md).", "",
              "Natural evaluation images: image | ground truth | teacher | student", "", "![samples](samples.png)", "",
              "Worst student predictions on natural images (image | ground truth | prediction | error):", "",
              "![worst](eval/student/eval-natural/worst.png)", "",
              "## Commands", "", "```"]
    lines += [" ".join(cmd) for cmd in commands.values()]
    lines += ["```", "", "Logs: `logs/`; TensorBoard: `tensorboard --logdir " + str(out) + "`.", ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsshm.demo", description="the whole pipeline, small")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    args = parser.parse_args(argv)
    out, data = (ROOT / args.out).resolve(), (ROOT / args.data).resolve()
    gpus = torch.cuda.device_count()
    env = training_env(gpus)
    device = (torch.cuda.get_device_name(0) + f" x{gpus}") if gpus else \
        f"CPU, {os.cpu_count()} cores, {CPU_PROCESSES} process x {CPU_THREADS} thread"
    timings: dict[str, float] = {}
    counts = [f"--{k.replace('_', '-')}={v}" for k, v in DATA_COUNTS.items()]
    timings["data"] = run_logged([sys.executable, "-m", "wsshm.shards.cli", "demo", "--out", str(data),
                                  "--size", str(IMAGE_SIZE), *counts], out / "logs" / "data.log", env, "demo")
    steps = stage_steps(args.scale)
    commands = stage_commands(data, out, steps, gpus)
    for stage, cmd in commands.items():
        timings[stage] = run_logged(cmd, out / "logs" / f"{stage}.log", env, "demo")
    short_side = IMAGE_SIZE * 3 // 4
    results = {}
    start = time.perf_counter()
    for who, stage in MODELS.items():
        for dataset in ("eval-natural", "eval-synthetic"):
            target = out / "eval" / who / dataset
            run_logged([sys.executable, "-m", "wsshm.evaluate", "--weights", str(weights(out, stage)),
                        "--data", str(data / dataset), "--out", str(target), "--name", who,
                        "--short-side", str(short_side)], out / "logs" / f"eval-{who}-{dataset}.log", env, "demo")
            results[(who, dataset)] = json.loads((target / "metrics.json").read_text())
    sample_sheet(weights(out, "teacher"), weights(out, "student"),
                 data / "eval-natural", out / "samples.png", short_side)
    timings["evaluation"] = time.perf_counter() - start
    loss_plot({stage: out / stage / "loss.csv" for stage in STEPS}, out / "loss_curves.png")
    report = write_report(out, steps, timings, commands, results, short_side, device)
    print(f"\n{report}:\n")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
