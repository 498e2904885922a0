"""Starting training stages as child processes, as a user would from the shell.

Shared by ``make demo`` (``wsshm/demo.py``) and the fidelity study (``bench/bench_fidelity.py``): the
command that launches a stage (``deepspeed`` on several processes, or one plain process), the
environment it needs without a GPU, and running a command with its output both on the console and
in a log file.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from wsshm.atomic import open_no_follow
from wsshm.train.options import LAUNCH_SCRIPTS, ROOT

# Without a GPU: one process on one thread trains the small networks of the demo and the study
# fastest on a small, shared CPU (docs/benchmarks.md): OpenMP's threads wait for each other whenever
# another job holds a core, and gloo ranks add their all-reduce.
CPU_PROCESSES = 1
CPU_THREADS = 1


class StepFailed(SystemExit):
    """A launched step exited non-zero; the message names its log. A ``SystemExit`` so that a
    command-line tool stops with one line, while a caller that wants to go on can catch it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_env(gpus: int, threads: int = CPU_THREADS) -> dict:
    """The environment for the children: unbuffered output, and without a GPU DeepSpeed's CPU
    accelerator (a value already set by the caller wins) and ``threads`` torch threads per process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("DS_ACCELERATOR", "cuda" if gpus else "cpu")
    if not gpus:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def stage_command(stage: str, args: list, gpus: int, processes: int | None = None) -> list[str]:
    """The command line of one stage (``pretrain``, ``teacher`` or ``student``) with its ``args``.

    With GPUs, ``deepspeed`` on all of them. Without, ``processes`` CPU ranks (default
    ``CPU_PROCESSES``) over gloo; ``processes=1`` runs the script as a plain process without the
    launcher (the engine sets up a world of one), which saves the launcher's start-up.
    """
    script = str(ROOT / "launch" / LAUNCH_SCRIPTS[stage])
    processes = processes or (None if gpus else CPU_PROCESSES)
    if not gpus and processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port())]
        if not gpus:
            launcher += ["--num_gpus", str(processes)]
    return launcher + [script] + [str(a) for a in args]


def run_logged(cmd: list[str], log: Path, env: dict, who: str = "wsshm", echo: bool = True) -> float:
    """Run ``cmd`` from the repository root with its output in ``log`` (and on the console when
    ``echo``); returns the seconds it took. Raises ``StepFailed`` when it exits non-zero."""
    print("\n$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open_no_follow(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True)
        for line in proc.stdout:
            handle.write(line)
            if echo and not line.startswith("[20"):  # DeepSpeed's timestamped INFO lines stay in the log only
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code:
        raise StepFailed(f"{who}: step failed (exit {code}); see {log}")
    return time.perf_counter() - start
