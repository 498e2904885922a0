"""The fidelity study: the paper's Table 3 (seg-only vs fine-tuned teacher vs MLB student) and Table 5
(weak-strong augmentation x EMA), plus the candidates for the student's boundary fix, trained at a
small size through the project's own launch scripts, evaluated with ``wsshm-eval``, and reported.

    .venv/bin/python bench/bench_fidelity.py                     # builtin data, ~25 min on 2 busy CPU cores
    .venv/bin/python bench/bench_fidelity.py --quick             # smoke run, ~3.5 min
    .venv/bin/python bench/bench_fidelity.py --preset real       # real photos from ../shared/realdata
    .venv/bin/python bench/bench_fidelity.py --preset real --quick --limit 32

Writes under ``--out`` (default ``runs/fidelity``, ``runs/fidelity-real``, ``-quick`` added for
``--quick``): ``data/`` (shards),
``runs/<name>/`` (one training run each), ``eval/<model>/<set>/`` (the evaluator's outputs),
``logs/``, ``results.json``, ``report.md``, ``loss_curves.png`` and ``samples.png``. A run whose
final weights exist is reused, an interrupted one resumes from its checkpoint, so a killed study
continues where it stopped when started again with the same options.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

# Chosen before DeepSpeed is first imported (below), which otherwise warns that it guessed.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.device_count() else "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fidelity_data  # noqa: E402  (bench/ beside this file: data preparation)
import fidelity_report  # noqa: E402  (tables, checks, figures)
from wsshm.atomic import write_json  # noqa: E402
from wsshm.train.checkpoint import latest_tag  # noqa: E402
from wsshm.train.launch import ROOT, StepFailed, run_logged, stage_command, training_env  # noqa: E402
from wsshm.train.options import LAUNCH_SCRIPTS, STAGE_DEFAULTS  # noqa: E402

WEIGHTS = {stage: defaults.weights_name for stage, defaults in STAGE_DEFAULTS.items()}
# The student runs: Table 3's student and Table 5's row 1 are `default`; with the last two it makes
# the candidates for the student's boundary head (and the EMA scope before the fix).
STUDENT_RUNS = {
    "default": {"strong-view": "on", "ema": "on", "student-boundary": "off", "ema-scope": "trained"},
    "no-ema": {"strong-view": "on", "ema": "off", "student-boundary": "off", "ema-scope": "trained"},
    "weak-view": {"strong-view": "off", "ema": "on", "student-boundary": "off", "ema-scope": "trained"},
    "weak-view-no-ema": {"strong-view": "off", "ema": "off", "student-boundary": "off", "ema-scope": "trained"},
    "boundary-blend": {"strong-view": "on", "ema": "on", "student-boundary": "blend", "ema-scope": "trained"},
    "before-fix": {"strong-view": "on", "ema": "on", "student-boundary": "off", "ema-scope": "all"},
}
# Flags the student stage is gaining, with their announced defaults: where the script lacks one, a
# run that wants the default may go without it (the script then does what it always did, which the
# report says); a run that wants another value cannot run.
NEW_STUDENT_FLAGS = {"student-boundary": "off", "ema-scope": "trained", "strong-view": "on"}
QUICK_SCALE = 0.05
CHECKPOINT_EVERY = 100


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    crop_sizes: tuple[int, ...]
    batch: int
    steps: dict  # stage -> steps at --scale 1
    lrs: dict  # stage -> learning rate
    short_side: int  # evaluation's shorter side
    eval_sets: tuple[str, ...]
    natural_set: str  # whole-region checks and the EMA teachers' drift
    boundary_set: str  # boundary-region checks and the picture sheet (needs soft labels)
    students: tuple[str, ...]
    iou_sets: tuple[str, ...] = ()
    ema_momentum: float = 0.99
    # CPU ranks per run and threads per rank. One rank on one thread was the fastest on the shared
    # 2-core VM: 60 builtin stage-0 steps took 24-26 s, two gloo ranks 45-76 s, one rank on two threads
    # 43-216 s (OpenMP's threads wait for each other while another job holds a core); docs/benchmarks.md.
    processes: int = 1
    threads: int = 1

    def scaled_steps(self, scale: float) -> dict[str, int]:
        return {stage: max(10, round(n * scale)) for stage, n in self.steps.items()}


PRESETS = {
    # The demo's network and data with more steps: 18.9 min measured on the 2-core VM (0.20 / 0.24 /
    # 0.28-0.32 s per stage-0 / 1 / 2 step with start-up, 1.3 min of evaluation), room for a busier
    # machine within 45 min. 128 x 96 images, evaluated at their own size.
    "builtin": Preset("builtin", "unet_r18_w0.25", (64,), 8, {"pretrain": 1200, "teacher": 400, "student": 400},
                      {"pretrain": 1e-3, "teacher": 5e-4, "student": 5e-4}, 96, ("eval-natural", "eval-synthetic"),
                      "eval-natural", "eval-natural", tuple(STUDENT_RUNS)),
    # Photos with a 512 long side: the paper's real-time student network on 128 px crops, 1.5-3 s per
    # step on one thread of a busy 2-core VM: about 40 min with the evaluation.
    "real": Preset("real", "unet_r18_w0.5", (128,), 8, {"pretrain": 600, "teacher": 250, "student": 300},
                   {"pretrain": 1e-3, "teacher": 5e-4, "student": 5e-4}, 224, ("ccp-heldout", "rbg", "p3m-demo"),
                   "ccp-heldout", "p3m-demo", ("default",), iou_sets=("ccp-heldout", "rbg")),
}


@dataclass
class Run:
    name: str  # folder under OUT/runs, and the model's name in the tables
    stage: str
    args: list
    missing: list = field(default_factory=list)  # flags the script lacks that this run needs

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.name

    def weights(self, out: Path) -> Path:
        return self.folder(out) / WEIGHTS[self.stage]

    def ema_weights(self, out: Path) -> Path:
        return self.folder(out) / "teacher-ema.safetensors"


def student_flag_choices() -> dict[str, set[str]]:
    """The values ``launch/train_student.py --help`` offers for each of the new flags it has."""
    help_text = subprocess.run([sys.executable, str(ROOT / "launch" / LAUNCH_SCRIPTS["student"]), "--help"],
                               capture_output=True, text=True, cwd=ROOT, env=training_env(0)).stdout
    found = {flag: re.search(rf"--{flag} \{{([^}}]*)\}}", help_text) for flag in NEW_STUDENT_FLAGS}
    return {flag: set(match.group(1).split(",")) for flag, match in found.items() if match}


def plan_runs(preset: Preset, data: dict, out: Path, scale: float, supported: dict[str, set[str]]) -> list[Run]:
    steps = preset.scaled_steps(scale)

    def common(stage: str) -> list:
        return ["--steps", steps[stage], "--warmup-steps", max(1, steps[stage] // 20), "--lr", preset.lrs[stage],
                "--arch", preset.arch, "--crop-sizes", *preset.crop_sizes, "--batch-size", preset.batch,
                "--num-workers", 1, "--log-every", 5, "--image-every", CHECKPOINT_EVERY,
                "--save-every", CHECKPOINT_EVERY]
    seg_init = out / "runs" / "pretrain" / WEIGHTS["pretrain"]
    runs = [Run("pretrain", "pretrain", [*common("pretrain"), "--seg", data["seg"]]),
            Run("teacher", "teacher", [*common("teacher"), "--matte", data["matte"], "--background",
                                       data["background"], "--init", seg_init])]
    for name in preset.students:
        flags = STUDENT_RUNS[name]
        args = [*common("student"), "--seg", data["seg"], "--init", seg_init, "--teacher",
                out / "runs" / "teacher" / WEIGHTS["teacher"], "--ema", flags["ema"],
                "--ema-momentum", preset.ema_momentum]
        missing = []
        for flag, default in NEW_STUDENT_FLAGS.items():
            if flags[flag] in supported.get(flag, ()):
                args += [f"--{flag}", flags[flag]]
            elif flag in supported or flags[flag] != default:
                missing.append(f"--{flag} {flags[flag]}")
        runs.append(Run(f"student-{name}", "student", args, missing))
    return runs


def train(run: Run, out: Path, env: dict, gpus: int, processes: int, who: str = "bench_fidelity") -> float | None:
    """Train ``run`` unless its final weights exist (then ``None``); resume an interrupted one.
    Refuses a folder trained with other settings, so a quick run is never mistaken for a full one."""
    folder, args = run.folder(out), [str(a) for a in run.args]
    settings = {"args": args, "processes": processes, "gpus": gpus}
    record = folder / "study-settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        raise SystemExit(f"{who}: {folder} was trained with other settings ({record}); "
                         "use another --out or remove that folder")
    if run.weights(out).is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record, settings)
    resume = ["--resume"] if latest_tag(folder / "checkpoints") else []
    cmd = stage_command(run.stage, ["--out", folder, *args, *resume], gpus, processes)
    return run_logged(cmd, out / "logs" / f"{run.name}.log", env, who)


def evaluate(weights: Path, dataset: Path, target: Path, short_side: int, name: str,
             who: str = "bench_fidelity") -> dict:
    """``wsshm-eval`` (its ``main``, in this process: 30 evaluator start-ups would cost minutes);
    an evaluation newer than its weights is reused."""
    from wsshm.evaluate import main as evaluate_main
    metrics = target / "metrics.json"
    if not (metrics.is_file() and metrics.stat().st_mtime > weights.stat().st_mtime):
        argv = ["--weights", str(weights), "--data", str(dataset), "--out", str(target), "--name", name,
                "--short-side", str(short_side)]
        print("\n$ wsshm-eval " + " ".join(argv), flush=True)
        if evaluate_main(argv):
            raise SystemExit(f"{who}: evaluation of {weights} on {dataset} failed")
    return json.loads(metrics.read_text())


def models_of(runs: list[Run], out: Path) -> dict[str, Path]:
    """Every trained network to score: seg-only, teacher, each student and each student's EMA teacher."""
    names = {"pretrain": "seg-only", "teacher": "teacher"}
    models = {}
    for run in runs:
        if run.weights(out).is_file():
            models[names.get(run.name, run.name)] = run.weights(out)
        if run.ema_weights(out).is_file():
            models["ema-" + run.name.removeprefix("student-")] = run.ema_weights(out)
    return models


def measure(preset: Preset, runs: list[Run], data: dict, out: Path) -> dict:
    """Metrics of every model on every set, IoU where asked, the EMA teachers' boundary drift and
    the students' last logged teacher share."""
    models = models_of(runs, out)
    results = {"metrics": {}, "iou": {}, "drift": {}, "teacher_share": {}}
    for model, weights in models.items():
        for dataset in preset.eval_sets:
            results["metrics"].setdefault(model, {})[dataset] = evaluate(
                weights, data[dataset], out / "eval" / model / dataset, preset.short_side, model)["mean"]
        for dataset in preset.iou_sets:
            results["iou"].setdefault(model, {})[dataset] = fidelity_report.mask_iou(
                weights, data[dataset], preset.short_side)
    teacher = models.get("teacher")
    for model, weights in models.items():
        if model.startswith("ema-") and teacher:
            results["drift"][model] = fidelity_report.boundary_drift(
                weights, teacher, data[preset.natural_set], preset.short_side)
    for run in runs:
        if run.stage == "student" and (run.folder(out) / "loss.csv").is_file():
            results["teacher_share"][run.name] = fidelity_report.last_logged(run.folder(out) / "loss.csv",
                                                                             "teacher_share")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/bench_fidelity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="builtin")
    parser.add_argument("--out", default=None,
                        help="study folder (default: runs/fidelity[-real][-quick] in the repository)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: every step count x{QUICK_SCALE}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--processes", type=int, default=None,
                        help="CPU ranks per training run (default: the preset's, 1; ignored on GPUs)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process, OMP_NUM_THREADS (default: the preset's, 1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="real preset: convert at most N images per set (quick default 32)")
    parser.add_argument("--realdata", default=str(ROOT.parent / "shared" / "realdata"),
                        help="the real-photo data kit (real preset)")
    return parser


def notes_on_flags(runs: list[Run], supported: dict[str, set[str]]) -> list[str]:
    """What the report must say when the student script lacks some of the study's flags."""
    notes = [f"`{run.name}` was not run: `launch/train_student.py` lacks `{'`, `'.join(run.missing)}`."
             for run in runs if run.missing]
    absent = [f"--{flag}" for flag in NEW_STUDENT_FLAGS if flag not in supported]
    if absent:
        notes.append(f"`launch/train_student.py` lacks {', '.join(absent)}: the other student runs went without "
                     "them, i.e. with the script's behaviour before that change.")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    preset = replace(preset, processes=args.processes or preset.processes, threads=args.threads or preset.threads)
    scale = args.scale * (QUICK_SCALE if args.quick else 1.0)
    default_out = "fidelity" + ("" if preset.name == "builtin" else f"-{preset.name}") + ("-quick" if args.quick else "")
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / default_out
    gpus = torch.cuda.device_count()
    env = training_env(gpus, preset.threads)
    torch.set_num_threads(preset.threads)  # this process evaluates
    started = time.perf_counter()
    timings = fidelity_report.Timings(out / "timings.json")
    if preset.name == "real":
        limit = args.limit or (32 if args.quick else None)
        data, seconds = fidelity_data.prepare_real(Path(args.realdata), out, env, limit)
    else:
        data, seconds = fidelity_data.prepare_builtin(out, env)
    timings.add("data", seconds, steps=None)
    supported = student_flag_choices()
    runs = plan_runs(preset, data, out, scale, supported)
    notes = notes_on_flags(runs, supported)
    for note in notes:
        print(f"bench_fidelity: warning: {note}", file=sys.stderr)
    for run in runs:
        if not run.missing:
            timings.add(run.name, train(run, out, env, gpus, preset.processes),
                        steps=int(run.args[run.args.index("--steps") + 1]))
    start = time.perf_counter()
    results = measure(preset, runs, data, out)
    timings.add("evaluation", time.perf_counter() - start, steps=None)
    report = fidelity_report.write_report(out, preset, runs, results, timings, data, notes,
                                          wall=time.perf_counter() - started, gpus=gpus, scale=scale)
    print(f"\n{report}:\n\n{report.read_text()}")
    skipped = [run.name for run in runs if run.missing]
    if skipped:
        print(f"bench_fidelity: error: {', '.join(skipped)} could not run (see the notes above)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as failure:
        sys.exit(str(failure))
