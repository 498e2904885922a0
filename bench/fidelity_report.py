"""The fidelity study's measurements beyond ``wsshm-eval`` (mask IoU, the EMA teacher's boundary
drift), its figures (matplotlib) and ``report.md``: the paper's Table 3 and Table 5 beside ours, the
boundary-fix candidates, and automatic checks of the paper's three orderings."""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wsshm.atomic import atomic_path, write_json, write_text
from wsshm.demo import PAPER_ORDERINGS
from wsshm.models import split_output
from wsshm.pseudo_label import agreement

# The paper's numbers (P3M validation set, seg 10K + matte 200; MSE x1e3, whole and boundary region).
PAPER_TABLE3 = {"seg-only": (6.676, 48.088), "teacher": (6.991, 32.553), "student": (4.391, 28.776)}
TABLE3_ROWS = {"seg-only": "seg-only (stage 0)", "teacher": "teacher fine-tuned (stage 1)",
               "student-default": "student, MLB (stage 2)"}
# Table 5: (weak-strong augmentation, EMA update) -> paper numbers, and the run that has that setting.
PAPER_TABLE5 = {(True, True): (4.391, 28.776), (True, False): (4.419, 28.793),
                (False, True): (4.437, 28.804), (False, False): (4.472, 28.815)}
TABLE5_RUNS = {(True, True): "default", (True, False): "no-ema", (False, True): "weak-view",
               (False, False): "weak-view-no-ema"}
CANDIDATES = ("default", "boundary-blend", "before-fix")


class Timings:
    """Seconds per part of the study, kept in ``OUT/timings.json``: a rerun that reuses a run still
    reports what training it took."""

    def __init__(self, path: Path):
        self.path = path
        self.saved = json.loads(path.read_text()) if path.is_file() else {}
        self.reused: set[str] = set()

    def add(self, name: str, seconds: float | None, steps: int | None) -> None:
        if seconds is None:
            self.reused.add(name)
        else:
            self.saved[name] = {"seconds": round(seconds, 1), "steps": steps}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.saved)


# ---------------------------------------------------------------------------- measurements
class BoundaryHead(nn.Module):
    """A network's boundary map as if it were its matte, so ``wsshm.inference`` runs it through the
    same test-time protocol (resize, predict, resize back)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return split_output(self.net(x))[1]


@functools.lru_cache(maxsize=2)
def eval_set(dataset: str):
    from wsshm.evaluate import load_eval_set
    return load_eval_set(dataset)


def predict(weights: Path, dataset: Path, short_side: int, head: str = "matte", count: int | None = None) -> list:
    """``head`` (matte or boundary) of the network in ``weights`` on the first ``count`` (default:
    all) images of ``dataset``, each at its image's size."""
    from wsshm.inference import predict_mattes
    from wsshm.models import load_weights
    net = load_weights(str(weights)).eval()
    net = BoundaryHead(net) if head == "boundary" else net
    return predict_mattes(net, [s.image for s in eval_set(str(dataset))[:count]], short_side=short_side)


def mask_ious(weights: Path, dataset: Path, short_side: int) -> dict[str, float]:
    """Each image's IoU of ``prediction > 0.5`` and ``label > 0.5`` (both empty: 1), by sample key."""
    return {sample.key: agreement(pred > 0.5, sample.alpha > 0.5)
            for sample, pred in zip(eval_set(str(dataset)), predict(weights, dataset, short_side))}


def mask_iou(weights: Path, dataset: Path, short_side: int) -> float:
    """The mean of :func:`mask_ious` over the images."""
    return float(np.mean(list(mask_ious(weights, dataset, short_side).values())))


@functools.lru_cache(maxsize=2)  # the stage-1 teacher's, compared with every EMA teacher's
def _boundary_pixels(weights: Path, dataset: Path, short_side: int) -> np.ndarray:
    return np.concatenate([a.ravel() > 0.5 for a in predict(weights, dataset, short_side, "boundary")])


def boundary_drift(ema_weights: Path, teacher_weights: Path, dataset: Path, short_side: int) -> dict:
    """How far an EMA teacher's boundary moved from the stage-1 teacher's: IoU of their ``At > 0.5``
    over all pixels of ``dataset``, and the share of pixels each marks as boundary."""
    ema = _boundary_pixels(ema_weights, dataset, short_side)
    base = _boundary_pixels(teacher_weights, dataset, short_side)
    union = np.logical_or(ema, base).sum()
    return {"iou": float(np.logical_and(ema, base).sum() / union) if union else 1.0,
            "share_ema": float(ema.mean()), "share_teacher": float(base.mean())}


def read_curve(csv_path: Path, column: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """Logged ``column`` against step; a step logged twice (a resumed run) keeps its last value."""
    values = {}
    with open(csv_path) as handle:
        for row in csv.DictReader(handle):
            if row.get(column) not in (None, ""):
                values[int(row["step"])] = float(row[column])
    steps = np.array(sorted(values), dtype=np.int64)
    return steps, np.array([values[s] for s in steps], dtype=np.float64)


def last_logged(csv_path: Path, column: str) -> float | None:
    steps, values = read_curve(csv_path, column)
    return float(values[-1]) if len(values) else None


# ---------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_figure(curves: dict[str, Path], path: Path) -> None:
    """Panels: stage 0, stage 1, every student's loss together, and the students' teacher share
    when ``loss.csv`` has it. Thin: as logged; thick: running mean over 5 logged steps."""
    plt = _pyplot()
    students = {name: p for name, p in curves.items() if name.startswith("student-")}
    shares = {name: read_curve(p, "teacher_share") for name, p in students.items()}
    shares = {name: curve for name, curve in shares.items() if len(curve[0])}
    panels = [("stage 0: seg-only", {k: v for k, v in curves.items() if k == "pretrain"}, "loss"),
              ("stage 1: teacher", {k: v for k, v in curves.items() if k == "teacher"}, "loss"),
              ("stage 2: students", students, "loss")] + ([("students: teacher share", students, "teacher_share")]
                                                           if shares else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, runs, column) in zip(axes[0], panels):
        for name, csv_path in runs.items():
            steps, values = read_curve(csv_path, column)
            if not len(steps):
                continue
            smooth = np.convolve(values, np.ones(5) / 5, mode="valid") if len(values) >= 5 else values
            line, = ax.plot(steps[len(steps) - len(smooth):], smooth, lw=1.6, label=name.removeprefix("student-"))
            ax.plot(steps, values, lw=0.5, alpha=0.35, color=line.get_color())
        ax.set(title=title, xlabel="step", ylabel=column)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def sample_sheet(weights: dict[str, Path], dataset: Path, path: Path, short_side: int, count: int = 4) -> None:
    """Rows: the first ``count`` images of ``dataset``. Columns: image, truth, seg-only, teacher, the
    blended MLB label (the stage-1 teacher's matte and boundary with ``S = truth > 0.5`` standing in
    for the segmentation label), student."""
    from wsshm.losses import mlb_blend
    plt = _pyplot()
    samples = eval_set(str(dataset))[:count]
    mattes = {name: predict(w, dataset, short_side, count=count) for name, w in weights.items()}
    boundaries = predict(weights["teacher"], dataset, short_side, "boundary", count=count)
    columns = ["image", "truth", "seg-only", "teacher", "blended label", "student"]
    aspect = float(np.mean([s.image.shape[0] / s.image.shape[1] for s in samples]))  # cells shaped like the images
    fig, axes = plt.subplots(len(samples), len(columns), squeeze=False,
                             figsize=(1.9 * len(columns), (1.9 * aspect + 0.25) * len(samples)))
    for row, sample in enumerate(samples):
        S = torch.from_numpy((sample.alpha > 0.5).astype(np.float32))
        label = mlb_blend(torch.from_numpy(mattes["teacher"][row]), torch.from_numpy(boundaries[row]), S).numpy()
        pictures = [sample.image, sample.alpha, mattes["seg-only"][row], mattes["teacher"][row], label,
                    mattes["student"][row]]
        for ax, picture, title in zip(axes[row], pictures, columns):
            ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------- tables
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _columns(preset, results: dict) -> list[tuple[str, str, str]]:
    """(set, key, title) per column: whole MSE everywhere, boundary MSE where the labels are soft
    (some model has a boundary score there), IoU where the preset asks for it."""
    columns = []
    for dataset in preset.eval_sets:
        columns.append((dataset, "mse", f"{dataset} MSE"))
        if any(not math.isnan(m.get(dataset, {}).get("mse_boundary", math.nan)) for m in results["metrics"].values()):
            columns.append((dataset, "mse_boundary", f"{dataset} MSE (boundary)"))
        if dataset in preset.iou_sets:
            columns.append((dataset, "iou", f"{dataset} IoU"))
    return columns


def _cells(model: str, columns, results: dict) -> list[str]:
    cells = []
    for dataset, key, _ in columns:
        source = results["iou"] if key == "iou" else results["metrics"]
        value = source.get(model, {}).get(dataset)
        cells.append(_fmt(value if key == "iou" else (value or {}).get(key)))
    return cells


def _value(results: dict, model: str, dataset: str, key: str) -> float:
    return results["metrics"].get(model, {}).get(dataset, {}).get(key, math.nan)


def checks(preset, results: dict) -> list[tuple[bool, str]]:
    """The paper's three orderings (``wsshm.demo.PAPER_ORDERINGS``): whole-image MSE on the natural
    set, boundary MSE on the set with soft labels."""
    names = {"student": "student-default", "teacher": "teacher", "seg-only": "seg-only"}
    lines = []
    for better, worse, key, words in PAPER_ORDERINGS:
        dataset = preset.natural_set if key == "mse" else preset.boundary_set
        a, b = _value(results, names[better], dataset, key), _value(results, names[worse], dataset, key)
        lines.append((a < b, f"{words} on {dataset}: {_fmt(a)} vs {_fmt(b)}"))
    return lines


def _header(preset, timings: Timings, wall: float, gpus: int, scale: float, notes: list[str]) -> list[str]:
    device = f"{torch.cuda.get_device_name(0)} x{gpus}" if gpus else \
        f"CPU, {os.cpu_count()} cores; training runs on {preset.processes} process(es) of {preset.threads} thread(s)"
    steps = preset.scaled_steps(scale)
    lines = [f"# Fidelity study: the paper's Table 3 and Table 5 (preset `{preset.name}`)", "",
             f"Machine: {device}; Python {platform.python_version()}, torch {torch.__version__}. "
             f"Wall time of this invocation {wall / 60:.1f} min; recorded time of all parts "
             f"{sum(t['seconds'] for t in timings.saved.values()) / 60:.1f} min.", "",
             f"Training: `{preset.arch}` in every stage, global batch {preset.batch}, crops "
             f"{', '.join(map(str, preset.crop_sizes))} px, steps {steps['pretrain']} / {steps['teacher']} / "
             f"{steps['student']} (stage 0 / 1 / each student; scale {scale:g}), lr {preset.lrs['pretrain']:g} / "
             f"{preset.lrs['teacher']:g} / {preset.lrs['student']:g}, EMA momentum {preset.ema_momentum}. "
             f"Evaluation: SPEC section 4 at shorter side {preset.short_side}; MSE x1e3. The paper: P3M validation "
             "set, seg 10K + matte 200, UNet-R101, 512-768 px crops, 200K / 10K / 20K steps: compare orderings, "
             "not values.", ""]
    return lines + [f"**Note:** {note}" for note in notes] + ([""] if notes else [])


def _table3(preset, results: dict, columns) -> list[str]:
    rows = [[TABLE3_ROWS[m], *_cells(m, columns, results), *map(_fmt, PAPER_TABLE3[m.removesuffix("-default")])]
            for m in TABLE3_ROWS]
    lines = ["## Table 3: effect of Matte Label Blending", ""]
    lines += _table(["model", *[c[2] for c in columns], "paper MSE", "paper MSE (boundary)"], rows)
    verdicts = checks(preset, results)
    lines += ["Checks of the paper's orderings:", ""]
    lines += [f"- **{'PASS' if ok else 'FAIL'}** {text}" for ok, text in verdicts] + [""]
    pseudo = " (p3m-demo and rbg are scored against pseudo labels)" if preset.name == "real" else ""
    lines += [f"**Verdict:** {sum(ok for ok, _ in verdicts)} of the 3 orderings of the paper's Table 3 hold at "
              f"this size{pseudo}.", ""]
    return lines


def _table5(results: dict, columns) -> list[str]:
    rows = [["yes" if aug else "no", "yes" if ema else "no", name, *_cells(f"student-{name}", columns, results),
             *map(_fmt, PAPER_TABLE5[(aug, ema)])] for (aug, ema), name in TABLE5_RUNS.items()]
    return ["## Table 5: weak-strong augmentation and EMA update", ""] + _table(
        ["weak-strong aug", "EMA", "run", *[c[2] for c in columns], "paper MSE", "paper MSE (boundary)"], rows)


def _candidates(preset, results: dict) -> list[str]:
    whole, boundary = preset.natural_set, preset.boundary_set
    names = [n for n in CANDIDATES if n in preset.students]
    rows = []
    for name in names:
        drift = results["drift"].get(f"ema-{name}", {})
        rows.append([name, *(_fmt(_value(results, model, dataset, key)) for model in (f"student-{name}", f"ema-{name}")
                             for dataset, key in ((whole, "mse"), (boundary, "mse_boundary"))),
                     _fmt(drift.get("iou")), _fmt(drift.get("share_ema")), _fmt(drift.get("share_teacher")),
                     _fmt(results["teacher_share"].get(f"student-{name}"))])
    header = ["run", f"student MSE ({whole})", f"student MSE boundary ({boundary})", f"EMA teacher MSE ({whole})",
              f"EMA teacher MSE boundary ({boundary})", f"IoU of At>0.5, EMA vs stage-1 teacher ({whole})",
              "At>0.5 share, EMA", "At>0.5 share, stage 1", "last teacher_share"]
    drift = ("The drift columns compare each EMA teacher's boundary map with the stage-1 teacher's it started "
             "from; `teacher_share` is the share of pixels where the blend took the teacher's matte.")
    if len(names) == 1:
        return ["## The EMA teacher's boundary drift", "", drift, ""] + _table(header, rows)
    return ["## Candidates for the student's boundary head", "",
            "`default`: the student's boundary head is not trained and the EMA averages only what the student "
            "trains, so the teacher keeps its boundary head; `boundary-blend`: the student's head starts as the "
            "teacher's and learns the blended label's 0.05-0.95 band, and the EMA averages it in; `before-fix`: "
            "not trained, EMA of every parameter (the old behaviour). " + drift, ""] + _table(header, rows)


def _times(timings: Timings) -> list[str]:
    rows = [[name, t["steps"] or "", f"{t['seconds']:.0f}", _fmt(t["seconds"] / t["steps"], 2) if t["steps"] else "",
             "reused" if name in timings.reused else "ran"] for name, t in timings.saved.items()]
    return ["## Times", ""] + _table(["part", "steps", "seconds", "s / step (with start-up)", "this invocation"], rows)


def write_report(out: Path, preset, runs: list, results: dict, timings: Timings, data: dict,
                 notes: list[str], wall: float, gpus: int, scale: float) -> Path:
    """``results.json``, ``loss_curves.png``, ``samples.png`` and ``report.md``; returns the report's path."""
    write_json(out / "results.json", results)
    trained = {run.name: run for run in runs if run.weights(out).is_file()}
    loss_figure({name: run.folder(out) / "loss.csv" for name, run in trained.items()}, out / "loss_curves.png")
    sheet = {"seg-only": "pretrain", "teacher": "teacher", "student": "student-default"}
    if all(name in trained for name in sheet.values()):
        sample_sheet({k: trained[v].weights(out) for k, v in sheet.items()}, data[preset.boundary_set],
                     out / "samples.png", preset.short_side)
    columns = _columns(preset, results)
    lines = _header(preset, timings, wall, gpus, scale, notes) + _table3(preset, results, columns)
    if len(preset.students) > 1:
        lines += _table5(results, columns)
    lines += _candidates(preset, results)
    lines += ["## Every model on every set", ""]
    lines += _table(["model", *[c[2] for c in columns]], [[m, *_cells(m, columns, results)] for m in results["metrics"]])
    lines += ["![loss curves](loss_curves.png)", "", "Natural images: image | truth | seg-only | teacher | blended "
              "label (stage-1 teacher's matte and boundary, S = truth > 0.5) | student", "", "![samples](samples.png)", ""]
    lines += _times(timings)
    lines += ["Runs: `runs/<name>/` (loss.csv, tb/, run.json), logs: `logs/`, evaluations: `eval/<model>/<set>/`, "
              "every number: `results.json`.", ""]
    report = out / "report.md"
    write_text(report, "\n".join(lines))
    return report
