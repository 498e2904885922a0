"""``make demo``: the paper's whole pipeline at a small size, end to end, then a report.

1. ``wsshm-shard demo`` writes the built-in data (matte, background, seg, eval-natural, eval-synthetic);
2. ``deepspeed launch/pretrain_seg.py``, ``launch/train_teacher.py``, ``launch/train_student.py`` on 2
   CPU processes (all GPUs when there are any);
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
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCH = "unet_r18_w0.25"
IMAGE_SIZE = 128  # demo images are 128 x 96; training crops 64, evaluation at the native size
CROP = 64
BATCH = 8
STEPS = {"pretrain": 300, "teacher": 200, "student": 200}
LAUNCH = {"pretrain": "pretrain_seg.py", "teacher": "train_teacher.py", "student": "train_student.py"}
DATA_COUNTS = dict(mattes=48, backgrounds=32, seg=160, eval_natural=20, eval_synthetic=20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log: Path, env: dict) -> float:
    """Run a step with its output both on the console and in ``log``; stop the demo on failure."""
    print("\n$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
        for line in proc.stdout:
            handle.write(line)
            if not line.startswith("[20"):  # DeepSpeed's timestamped INFO lines stay in the log only
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code:
        raise SystemExit(f"demo: step failed (exit {code}); see {log}")
    return time.perf_counter() - start


def stage_steps(scale: float) -> dict[str, int]:
    return {stage: max(10, int(n * scale)) for stage, n in STEPS.items()}


def stage_commands(data: Path, out: Path, steps: dict[str, int], gpus: int) -> dict[str, list[str]]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port())]
    if gpus == 0:
        launcher += ["--num_gpus", "2"]
    common = ["--arch", ARCH, "--crop-sizes", str(CROP), "--batch-size", str(BATCH), "--num-workers", "1",
              "--log-every", "5", "--image-every", "50", "--save-every", "100"]
    args = {
        "pretrain": ["--seg", data / "seg", "--lr", "1e-3"],
        "teacher": ["--matte", data / "matte", "--background", data / "background", "--lr", "5e-4",
                    "--init", out / "pretrain" / "pretrain.safetensors"],
        "student": ["--seg", data / "seg", "--lr", "5e-4", "--teacher", out / "teacher" / "teacher.safetensors",
                    "--init", out / "pretrain" / "pretrain.safetensors", "--ema-momentum", "0.99"],
    }
    return {stage: launcher + [str(ROOT / "launch" / LAUNCH[stage]), "--out", str(out / stage),
                               "--steps", str(steps[stage]), "--warmup-steps", str(max(1, steps[stage] // 20))]
            + common + [str(a) for a in args[stage]] for stage in STEPS}


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
    cv2.imwrite(str(path), np.concatenate(panels, axis=1))


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
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def verdict(teacher: dict, student: dict) -> str:
    t, s = teacher["mean"], student["mean"]
    better = s["mse"] < t["mse"]
    words = "beats" if better else "does not beat"
    change = (s["mse"] - t["mse"]) / t["mse"] * 100 if t["mse"] else float("nan")
    line = (f"**On the natural evaluation set the student {words} the teacher**: whole-image MSE "
            f"{s['mse']:.3f} vs {t['mse']:.3f} ({change:+.1f}%), boundary MSE {s['mse_boundary']:.3f} vs "
            f"{t['mse_boundary']:.3f}, SAD {s['sad']:.3f} vs {t['sad']:.3f}.")
    return line


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
        lines += [f"### {dataset}", "", markdown_table({f"{who}": results[(who, dataset)] for who in ("teacher", "student")})]
    lines += [verdict(results[("teacher", "eval-natural")], results[("student", "eval-natural")]), "",
              "The paper (Table 3) expects the student, trained on natural images with MLB labels, to beat the "
              "synthetic-only teacher on natural images. Tiny networks, a few hundred CPU steps and procedural "
              "data make this demo a check that the pipeline works, not a reproduction of the paper's numbers.", "",
              "Natural evaluation images: image | ground truth | teacher | student", "", "![samples](samples.png)", "",
              "Worst student predictions on natural images (image | ground truth | prediction | error):", "",
              "![worst](eval/student/eval-natural/worst.png)", "",
              "## Commands", "", "```"]
    lines += [" ".join(cmd) for cmd in commands.values()]
    lines += ["```", "", "Logs: `logs/`; TensorBoard: `tensorboard --logdir " + str(out) + "`.", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsshm.demo", description="the whole pipeline, small")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    args = parser.parse_args(argv)
    out, data = (ROOT / args.out).resolve(), (ROOT / args.data).resolve()
    gpus = torch.cuda.device_count()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("DS_ACCELERATOR", "cuda" if gpus else "cpu")
    env.setdefault("TRITON_INTERPRET", "0" if gpus else "1")
    device = (torch.cuda.get_device_name(0) + f" x{gpus}") if gpus else f"CPU, {os.cpu_count()} cores, 2 processes"
    timings: dict[str, float] = {}
    counts = [f"--{k.replace('_', '-')}={v}" for k, v in DATA_COUNTS.items()]
    timings["data"] = _run([sys.executable, "-m", "wsshm.shards.cli", "demo", "--out", str(data),
                            "--size", str(IMAGE_SIZE), *counts], out / "logs" / "data.log", env)
    steps = stage_steps(args.scale)
    commands = stage_commands(data, out, steps, gpus)
    for stage, cmd in commands.items():
        timings[stage] = _run(cmd, out / "logs" / f"{stage}.log", env)
    short_side = IMAGE_SIZE * 3 // 4
    results = {}
    start = time.perf_counter()
    for who in ("teacher", "student"):
        for dataset in ("eval-natural", "eval-synthetic"):
            target = out / "eval" / who / dataset
            _run([sys.executable, "-m", "wsshm.evaluate", "--weights", str(out / who / f"{who}.safetensors"),
                  "--data", str(data / dataset), "--out", str(target), "--name", who,
                  "--short-side", str(short_side)], out / "logs" / f"eval-{who}-{dataset}.log", env)
            results[(who, dataset)] = json.loads((target / "metrics.json").read_text())
    sample_sheet(out / "teacher" / "teacher.safetensors", out / "student" / "student.safetensors",
                 data / "eval-natural", out / "samples.png", short_side)
    timings["evaluation"] = time.perf_counter() - start
    loss_plot({stage: out / stage / "loss.csv" for stage in STEPS}, out / "loss_curves.png")
    report = write_report(out, steps, timings, commands, results, short_side, device)
    print(f"\n{report}:\n")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
