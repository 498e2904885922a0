"""The grid's jobs, their folders and their order; which shard runs which job.

The paper's rules per cell (#seg S, #matte M): M = 0 is the seg-only model (stage 0 alone); S = 0 is
a teacher trained on the M matte labels without pre-training; otherwise stage 0 on S, the teacher from
that stage-0 model, and the student from the stage-0 model with that teacher. The stage-0 model of S
is trained once and shared by every cell of that row.

A job is one cell (its stages in order, then its evaluation). The stage-0 jobs come first, so that
sharding by job index (``index % N == K - 1``) never leaves a shard waiting on a job of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wsshm.train.options import STAGE_DEFAULTS


@dataclass(frozen=True)
class Stage:
    kind: str          # pretrain, teacher or student: the launch script
    folder: Path       # the run folder (--out of the stage)
    data_args: tuple   # data, subset size, --init / --teacher: what the sweep owns
    needs: tuple = ()  # weights files that must exist before it starts

    @property
    def weights(self) -> Path:
        return self.folder / STAGE_DEFAULTS[self.kind].weights_name


@dataclass
class Job:
    index: int
    seg: int
    matte: int
    stages: list[Stage]
    evaluate: bool = True  # False: a stage-0 model whose (S, 0) cell is not in the grid
    needs_job: int | None = None  # the stage-0 job this cell starts from
    name: str = field(init=False)

    def __post_init__(self):
        self.name = cell_name(self.seg, self.matte)

    @property
    def model(self) -> Path:
        """The weights this cell is scored with."""
        return self.stages[-1].weights


def cell_name(seg: int, matte: int) -> str:
    return f"seg{seg}-matte{matte}"


def model_kind(seg: int, matte: int) -> str:
    return "seg-only" if matte == 0 else "teacher" if seg == 0 else "student"


def stage0_folder(out: Path, seg: int) -> Path:
    return out / "stage0" / f"seg{seg}"


def plan_jobs(out: Path, data: dict, num_seg: list[int], num_matte: list[int]) -> list[Job]:
    """Every job of the grid in run order; ``data`` holds the folders ``seg``, ``matte``, ``background``."""
    seg_data = lambda s: ("--seg", data["seg"], "--num-seg", s)
    matte_data = lambda m: ("--matte", data["matte"], "--background", data["background"], "--num-matte", m)
    jobs: list[Job] = []
    stage0_job = {}
    for s in sorted(x for x in num_seg if x > 0):
        stage0_job[s] = len(jobs)
        jobs.append(Job(len(jobs), s, 0, [Stage("pretrain", stage0_folder(out, s), seg_data(s))],
                        evaluate=0 in num_matte))
    for s in sorted(num_seg):
        for m in sorted(x for x in num_matte if x > 0):
            cell = out / "cells" / cell_name(s, m)
            if s == 0:
                stages = [Stage("teacher", cell / "teacher", matte_data(m))]
            else:
                stage0 = jobs[stage0_job[s]].stages[0].weights
                teacher = Stage("teacher", cell / "teacher", (*matte_data(m), "--init", stage0), needs=(stage0,))
                student = Stage("student", cell / "student",
                                (*seg_data(s), "--init", stage0, "--teacher", teacher.weights), needs=(stage0,))
                stages = [teacher, student]
            jobs.append(Job(len(jobs), s, m, stages, needs_job=stage0_job.get(s)))
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 1 <= K <= N; ``ValueError`` otherwise."""
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise ValueError(f"--shard {text}: expected K/N with 1 <= K <= N, e.g. 1/4")
    return int(k), int(n)


def shard_of(job_index: int, shards: int) -> int:
    """The shard (1-based) that runs a job."""
    return job_index % shards + 1


def shard_jobs(jobs: list[Job], k: int, n: int) -> list[Job]:
    return [job for job in jobs if shard_of(job.index, n) == k]
