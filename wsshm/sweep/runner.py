"""Running a shard's jobs: each stage through the launch scripts a hand-run training uses
(``wsshm.train.launch``, as ``make demo`` does), each cell's model through ``wsshm-eval``.

A stage whose final weights exist is reused; one killed mid-way continues with ``--resume`` when one
of its checkpoints opens (else it starts again); an evaluation is redone when its ``metrics.json`` is older than the
weights it scored (the stage was trained again).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from wsshm.train.checkpoint import resume_tag
from wsshm.train.launch import run_logged, stage_command
from wsshm.train.options import STAGE_DEFAULTS
from wsshm.sweep.plan import Job, Stage, shard_of

POLL_S = 30  # how often a shard looks for a stage-0 model another shard trains


class WaitTimeout(Exception):
    """A stage-0 model of another shard did not appear in time; the CLI prints it and exits with 3."""


def say(text: str) -> None:
    print(f"[wsshm-sweep {time.strftime('%H:%M:%S')}] {text}", flush=True)


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Progress:
    """Counts what is left of this shard and estimates its time: the seconds per training step of the
    stages finished so far, times the steps of the stages left (evaluations take seconds: not counted)."""

    def __init__(self, jobs: list[Job], evals_per_cell: int, steps: dict[str, int]):
        self.steps = steps
        self.left = {"pretrain": 0, "teacher": 0, "student": 0, "eval": 0}
        for job in jobs:
            for stage in job.stages:
                self.left[stage.kind] += not stage.weights.is_file()
            self.left["eval"] += evals_per_cell if job.evaluate else 0
        self.seconds = self.steps_done = 0.0

    def done(self, kind: str, seconds: float | None) -> None:
        self.left[kind] -= 1
        if seconds is not None and kind != "eval":
            self.seconds += seconds
            self.steps_done += self.steps[kind]

    def estimate(self) -> str:
        stages = sum(n for kind, n in self.left.items() if kind != "eval")
        if not stages:
            return "no stage left"
        if not self.steps_done:
            return f"{stages} stage(s) left, no estimate before the first one finishes"
        steps_left = sum(n * self.steps[kind] for kind, n in self.left.items() if kind != "eval")
        return f"{stages} stage(s) left, about {minutes(steps_left * self.seconds / self.steps_done)}"


def stage_steps(train_args: list[str], kind: str) -> int:
    """The ``--steps`` a stage gets (the last one given wins, as in argparse), else the paper's."""
    steps = STAGE_DEFAULTS[kind].steps
    for i, arg in enumerate(train_args):
        if arg == "--steps" and i + 1 < len(train_args) and train_args[i + 1].isdigit():
            steps = int(train_args[i + 1])
        elif arg.startswith("--steps=") and arg[8:].isdigit():
            steps = int(arg[8:])
    return max(1, steps)


def wait_for(path: Path, job: Job, owner: int, shards: int, wait_minutes: float) -> None:
    """Wait for a stage-0 model that another shard trains; ``WaitTimeout`` after ``wait_minutes``."""
    if path.is_file():
        return
    say(f"{job.name}: waiting up to {wait_minutes:g} min for {path} (job {job.needs_job}, shard {owner}/{shards})")
    deadline = time.monotonic() + wait_minutes * 60
    while not path.is_file():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{job.name} needs {path}, which shard {owner}/{shards} trains; "
                              f"run that shard first, or wait longer (--wait-minutes)")
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def run_stage(stage: Stage, job: Job, ctx, progress: Progress) -> None:
    if stage.weights.is_file():
        say(f"{job.name}: {stage.kind} reused ({stage.weights})")
        return
    checkpoints = stage.folder / "checkpoints"
    # the trainer itself checks every rank's files and passes over a broken newest checkpoint; with
    # none that opens at all, --resume would only fail, so the stage starts again
    tag, skipped = resume_tag(checkpoints) if checkpoints.is_dir() else (None, [])
    if tag is None and skipped:
        say(f"{job.name}: {stage.kind}: no usable checkpoint ({skipped[0]}); starting it again")
    resume = tag is not None
    args = ["--out", stage.folder, *stage.data_args, *ctx.train_args(stage.kind)] + (["--resume"] if resume else [])
    cmd = stage_command(stage.kind, args, ctx.gpus, ctx.processes)
    say(f"{job.name}: {stage.kind} started{' (resuming from its checkpoint)' if resume else ''}")
    seconds = run_logged(cmd, ctx.out / "logs" / f"{job.name}-{stage.kind}.log", ctx.env, "wsshm-sweep", echo=False)
    progress.done(stage.kind, seconds)
    say(f"{job.name}: {stage.kind} finished in {minutes(seconds)}; {progress.estimate()}")


def run_eval(job: Job, name: str, folder: str, ctx, progress: Progress) -> None:
    """Score the cell's model with ``wsshm-eval`` (its protocol, metrics and files) in a child process,
    as ``make demo`` does: the sweep itself never holds a GPU that the next stage needs."""
    target = ctx.out / "eval" / job.name / name
    metrics = target / "metrics.json"
    if metrics.is_file() and metrics.stat().st_mtime >= job.model.stat().st_mtime:
        progress.done("eval", None)
        return
    cmd = [sys.executable, "-m", "wsshm.evaluate", "--weights", str(job.model), "--data", folder,
           "--out", str(target), "--name", job.name, "--short-side", str(ctx.short_side)]
    seconds = run_logged(cmd, ctx.out / "logs" / f"{job.name}-eval-{name}.log", ctx.env, "wsshm-sweep", echo=False)
    progress.done("eval", seconds)
    say(f"{job.name}: evaluated on {name} in {minutes(seconds)}")


def run_jobs(jobs: list[Job], all_jobs: list[Job], shard: tuple[int, int], ctx) -> None:
    k, n = shard
    steps = {kind: stage_steps(ctx.train_args(kind), kind) for kind in ("pretrain", "teacher", "student")}
    progress = Progress(jobs, len(ctx.eval_sets), steps)
    say(f"shard {k}/{n}: {len(jobs)} of {len(all_jobs)} job(s); {progress.estimate()}")
    for job in jobs:
        if ctx.stop_requested:
            return
        if job.needs_job is not None:
            needed = all_jobs[job.needs_job]
            wait_for(needed.stages[0].weights, job, shard_of(needed.index, n), n, ctx.wait_minutes)
        for stage in job.stages:
            if ctx.stop_requested:
                return
            run_stage(stage, job, ctx, progress)
        if job.evaluate:
            for name, folder in ctx.eval_sets.items():
                run_eval(job, name, folder, ctx, progress)
    say(f"shard {k}/{n}: done")
