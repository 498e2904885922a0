"""``wsshm-sweep run`` trains and scores the grid (or one shard of it); ``wsshm-sweep report`` merges
whatever cells are done into Table 7 and Figures 6-9. See docs/sweep.md.

    wsshm-sweep run --seg S --matte M --background B --eval natural=E1 --eval synthetic=E2 \\
        --num-seg 0 2000 5000 --num-matte 0 50 200 --out runs/sweep [--shard K/N] -- --arch unet_r18
    wsshm-sweep report --out runs/sweep
"""
from __future__ import annotations

import argparse
import re
import shlex
import signal
import sys
from pathlib import Path

from wsshm.sweep.plan import parse_shard, plan_jobs, shard_jobs

# What the sweep sets per stage; passing it through would break the grid's rules.
OWNED_OPTIONS = ("--out", "--seg", "--matte", "--background", "--num-seg", "--num-matte", "--init", "--teacher",
                 "--resume", "--local_rank")
SWEEP_FILE = "sweep.json"
EVAL_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class InputError(Exception):
    """Bad input: one line naming the option or file; exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsshm-sweep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and evaluate the grid's cells (options after -- go to every stage)")
    run.add_argument("--seg", required=True, help="seg shard folder (stage 0 and the student)")
    run.add_argument("--matte", required=True, help="matte shard folder (the teacher)")
    run.add_argument("--background", required=True, help="background shard folder (the teacher's composites)")
    run.add_argument("--eval", action="append", required=True, metavar="NAME=FOLDER",
                     help="an evaluation set (eval shard folder or images/ + alphas/); repeat for several")
    run.add_argument("--num-seg", type=int, nargs="+", required=True, help="segmentation subset sizes (0: none)")
    run.add_argument("--num-matte", type=int, nargs="+", required=True, help="matte subset sizes (0: none)")
    run.add_argument("--out", required=True, help="the sweep folder")
    for kind in ("pretrain", "teacher", "student"):
        run.add_argument(f"--{kind}-args", default="", metavar="'OPTIONS'",
                         help=f"training options for the {kind} stages only, one quoted string "
                              f"(e.g. --{kind}-args='--steps 1000 --lr 1e-3')")
    run.add_argument("--short-side", type=int, default=None, help="wsshm-eval's test-time shorter side (default 512)")
    run.add_argument("--shard", default="1/1", help="K/N: run the jobs with index %% N == K-1 (default: all)")
    run.add_argument("--wait-minutes", type=float, default=24 * 60,
                     help="how long a cell waits for a stage-0 model another shard trains (default one day)")
    run.add_argument("--processes", type=int, default=None,
                     help="CPU processes per stage without a GPU (default: wsshm.train.launch.CPU_PROCESSES)")
    report = commands.add_parser("report", help="Table 7 (Markdown, CSV), cells.json and figures of what is done")
    report.add_argument("--out", required=True, help="the sweep folder")
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Everything after the first ``--`` is for the training stages."""
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1:]
    return argv, []


def check_train_args(args: list[str], where: str) -> None:
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in OWNED_OPTIONS:
            raise InputError(f"{where}: {name} is set by the sweep for each cell; leave it out")


def sweep_options(args, train_args: list[str]) -> dict:
    """The options that define the sweep's results, as recorded in sweep.json; checks them."""
    from wsshm.shards import ShardFolderError, check_folder
    if min(args.num_seg + args.num_matte) < 0:
        raise InputError("--num-seg/--num-matte: counts must be 0 or more")
    num_seg, num_matte = sorted(set(args.num_seg)), sorted(set(args.num_matte))
    if num_seg == [0] and num_matte == [0]:
        raise InputError("--num-seg/--num-matte: the grid has no cell to train besides (0, 0)")
    for option, kind, counts in (("--seg", "seg", num_seg), ("--matte", "matte", num_matte),
                                 ("--background", "background", [])):
        try:
            check_folder(getattr(args, kind), kind, max(counts) or None if counts else None)
        except ShardFolderError as error:
            raise InputError(f"{option} {error}") from None
    evals = {}
    for spec in args.eval:
        name, sep, folder = spec.partition("=")
        if not sep or not EVAL_NAME.fullmatch(name) or not folder:
            raise InputError(f"--eval {spec}: expected NAME=FOLDER with NAME of letters, digits, '_', '-', '.'")
        if name in evals:
            raise InputError(f"--eval {spec}: the name {name} is given twice")
        if not Path(folder).is_dir():
            raise InputError(f"--eval {spec}: {folder}: no such folder")
        evals[name] = str(Path(folder).resolve())
    check_train_args(train_args, "options after --")
    stage_args = {}
    for kind in ("pretrain", "teacher", "student"):
        try:
            stage_args[kind] = shlex.split(getattr(args, f"{kind}_args"))
        except ValueError as error:
            raise InputError(f"--{kind}-args: {error}") from None
        check_train_args(stage_args[kind], f"--{kind}-args")
    return {"version": 1, "seg": str(Path(args.seg).resolve()), "matte": str(Path(args.matte).resolve()),
            "background": str(Path(args.background).resolve()), "eval": evals, "num_seg": num_seg,
            "num_matte": num_matte, "train_args": train_args, "stage_args": stage_args,
            "short_side": args.short_side}


def record_options(out: Path, options: dict) -> None:
    """Write sweep.json, or refuse a rerun whose options differ from the recorded ones."""
    import json
    from wsshm.atomic import write_json
    path = out / SWEEP_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: unreadable ({error}); is --out a sweep folder?") from None
        changed = [key for key in options if recorded.get(key) != options[key]]
        if changed:
            key = changed[0]
            raise InputError(f"{path}: this sweep was started with other options ({key}: {recorded.get(key)!r}, "
                             f"now {options[key]!r}); use another --out, or the same options")
        return
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, options, indent=2)


class Context:
    """What every stage and evaluation of this run shares."""

    def __init__(self, out: Path, options: dict, args):
        import torch
        from wsshm.inference import SHORT_SIDE
        from wsshm.train.launch import training_env
        self.out = out
        self.gpus = torch.cuda.device_count()
        self.env = training_env(self.gpus)
        self.processes = args.processes
        self.eval_sets = options["eval"]
        self.short_side = options["short_side"] or SHORT_SIDE
        self.stop_requested = False  # set on SIGTERM: no further stage starts
        self.wait_minutes = args.wait_minutes
        self.options = options

    def train_args(self, kind: str) -> list[str]:
        return [*self.options["train_args"], *self.options["stage_args"][kind]]


def run(args, train_args: list[str]) -> int:
    from wsshm.sweep.report import write_report
    from wsshm.sweep.runner import WaitTimeout, run_jobs
    try:
        shard = parse_shard(args.shard)
    except ValueError as error:
        raise InputError(str(error)) from None
    if args.processes is not None and args.processes < 1:
        raise InputError(f"--processes {args.processes}: must be 1 or more")
    out = Path(args.out).resolve()
    options = sweep_options(args, train_args)
    record_options(out, options)
    data = {key: options[key] for key in ("seg", "matte", "background")}
    all_jobs = plan_jobs(out, data, options["num_seg"], options["num_matte"])
    from wsshm.train.launch import StepFailed
    ctx = Context(out, options, args)

    def stop(signum, frame):
        # A scheduler's SIGTERM reaches the running stage too (same process group). Keep reading its
        # output until it has saved and exited (closing the pipe would break it mid-save), then stop.
        ctx.stop_requested = True

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run_jobs(shard_jobs(all_jobs, *shard), all_jobs, shard, ctx)
    except WaitTimeout as error:
        print(f"wsshm-sweep: error: {error}", file=sys.stderr)
        return 3
    except StepFailed:
        if not ctx.stop_requested:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        write_report(out)  # whatever is done so far, also after a failed stage
    if ctx.stop_requested:
        print("wsshm-sweep: SIGTERM: stopped after the running stage saved; rerun the same command to resume",
              file=sys.stderr, flush=True)
        return 143
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, train_args = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from wsshm.sweep.report import write_report
            if train_args:
                raise InputError("report: takes no training options")
            written = write_report(Path(args.out).resolve())
            print("\n".join(str(p) for p in written))
            return 0
        return run(args, train_args)
    except InputError as error:
        print(f"wsshm-sweep: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
