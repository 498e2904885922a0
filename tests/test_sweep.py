"""``wsshm-sweep`` on the demo data with tiny settings: the grid's plan and shards, the CLI's refusals,
and one real 2 x 2 sweep split over two shards, reported half-done, then resumed after losing a stage."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsshm.sweep.cli import main
from wsshm.sweep.plan import parse_shard, plan_jobs, shard_jobs

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--arch", "unet_r18_w0.25", "--crop-sizes", "32", "--batch-size", "2", "--num-workers", "0", "--steps", "2",
         "--save-every", "1", "--log-every", "1", "--image-every", "0", "--check-shards", "off"]
DATA = {"seg": "/d/seg", "matte": "/d/matte", "background": "/d/background"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from wsshm.shards.demo_data import generate
    root = tmp_path_factory.mktemp("sweep-data")
    generate(root, size=64, mattes=6, backgrounds=4, seg=12, eval_natural=2, eval_synthetic=2)
    return root


def sweep_args(data: Path, out: Path, seg=("0", "8"), matte=("0", "4"), *extra) -> list[str]:
    return ["run", "--seg", str(data / "seg"), "--matte", str(data / "matte"), "--background",
            str(data / "background"), "--eval", f"natural={data / 'eval-natural'}",
            "--eval", f"synthetic={data / 'eval-synthetic'}", "--num-seg", *seg, "--num-matte", *matte,
            "--out", str(out), "--short-side", "48", *extra, "--", *TRAIN]


# ----------------------------------------------------------------------------- the plan, no training
def test_the_grid_follows_the_papers_rules():
    jobs = plan_jobs(Path("/o"), DATA, [0, 40, 160], [0, 12, 48])
    cells = {(j.seg, j.matte): [s.kind for s in j.stages] for j in jobs}
    assert (0, 0) not in cells and len(cells) == 8
    assert cells[(40, 0)] == ["pretrain"] and cells[(0, 12)] == ["teacher"] and cells[(160, 48)] == ["teacher", "student"]
    pretrains = [s.folder for j in jobs for s in j.stages if s.kind == "pretrain"]
    assert len(pretrains) == len(set(pretrains)) == 2  # one stage-0 run per seg count, shared
    cell = next(j for j in jobs if (j.seg, j.matte) == (40, 12))
    teacher, student = cell.stages
    stage0 = Path("/o/stage0/seg40/pretrain.safetensors")
    assert teacher.data_args[teacher.data_args.index("--init") + 1] == stage0
    assert teacher.data_args[teacher.data_args.index("--num-matte") + 1] == 12
    assert student.data_args[student.data_args.index("--init") + 1] == stage0
    assert student.data_args[student.data_args.index("--teacher") + 1] == teacher.weights
    assert student.data_args[student.data_args.index("--num-seg") + 1] == 40
    scratch = next(j for j in jobs if (j.seg, j.matte) == (0, 48)).stages[0]
    assert "--init" not in scratch.data_args  # the teacher without pre-training
    # without #matte 0 the stage-0 models are still trained, but no cell scores them
    assert [j.evaluate for j in plan_jobs(Path("/o"), DATA, [0, 40], [12])] == [False, True, True]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_cover_every_job_once_and_stage0_comes_first(n):
    jobs = plan_jobs(Path("/o"), DATA, [0, 40, 160, 640], [0, 12, 48])
    indices = sorted(j.index for k in range(1, n + 1) for j in shard_jobs(jobs, k, n))
    assert indices == list(range(len(jobs)))
    # a shard never waits on itself: every stage-0 job is ahead of every cell that needs it
    assert all(j.needs_job is None or j.needs_job < j.index for j in jobs)


def test_shard_option_is_checked():
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/2", "3/2", "2", "a/b", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_the_estimate_uses_the_time_per_step_so_far(tmp_path):
    from wsshm.sweep.runner import Progress, stage_steps
    assert stage_steps(["--steps", "5", "--lr", "1", "--steps=7"], "teacher") == 7
    assert stage_steps(["--lr", "1"], "student") == 20_000  # the paper's
    steps = {"pretrain": 100, "teacher": 20, "student": 30}
    progress = Progress(plan_jobs(tmp_path, DATA, [0, 40], [0, 12]), evals_per_cell=2, steps=steps)
    assert progress.left == {"pretrain": 1, "teacher": 2, "student": 1, "eval": 6}
    assert "no estimate" in progress.estimate()
    progress.done("pretrain", 200.0)  # 2 s per step
    assert progress.estimate() == "3 stage(s) left, about 2.3 min"  # (20 + 20 + 30) steps
    progress.done("teacher", 40.0)
    progress.done("eval", 5.0)
    assert progress.estimate() == "2 stage(s) left, about 100 s"


def test_a_cell_waits_for_the_stage0_model_of_another_shard(tmp_path, monkeypatch, capsys):
    import threading
    from wsshm.sweep import runner
    monkeypatch.setattr(runner, "POLL_S", 0.05)
    job = plan_jobs(tmp_path, DATA, [40], [12])[1]
    weights = tmp_path / "stage0" / "seg40" / "pretrain.safetensors"
    threading.Timer(0.3, lambda: (weights.parent.mkdir(parents=True), weights.write_bytes(b"w"))).start()
    runner.wait_for(weights, job, owner=1, shards=2, wait_minutes=1)  # returns once the file is there
    assert "seg40-matte12: waiting up to 1 min for" in capsys.readouterr().out
    weights.unlink()
    with pytest.raises(runner.WaitTimeout, match="which shard 1/2 trains"):
        runner.wait_for(weights, job, owner=1, shards=2, wait_minutes=0.002)


# ----------------------------------------------------------------------------- refusals, no training
def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("change, words", [
    (lambda a: [x.replace("eval-natural", "nothing-here") for x in a], "--eval natural="),
    (lambda a: [x.replace("background", "nowhere") if x.endswith("/background") else x for x in a], "--background"),
    (lambda a: a[:a.index("--num-seg") + 1] + ["0", "99"] + a[a.index("--num-matte"):], "--seg"),
    (lambda a: a + ["--num-seg", "3"], "options after --: --num-seg is set by the sweep"),
    (lambda a: a[:1] + ["--teacher-args=--init x.safetensors"] + a[1:], "--teacher-args: --init"),
    (lambda a: a[:1] + ["--shard", "3/2"] + a[1:], "--shard 3/2"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(data, tmp_path, capsys, change, words):
    out = tmp_path / "sweep"
    assert main(change(sweep_args(data, out))) == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


def test_report_of_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "no sweep.json" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_cell_waiting_on_another_shard_fails_clearly_and_changed_options_are_refused(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    # 2 x 2 grid: job 0 = stage 0 of #seg 8 (shard 1/3), job 1 = (0, 4), job 2 = (8, 4) needs job 0
    assert main(sweep_args(data, out, ("0", "8"), ("0", "4"), "--shard", "3/3", "--wait-minutes", "0")) == 3
    line = one_error_line(capsys)
    assert "seg8-matte4 needs" in line and "stage0/seg8/pretrain.safetensors" in line and "shard 1/3" in line
    assert not (out / "cells").exists()  # nothing trained
    assert (out / "report" / "table7.md").is_file()  # the report of what is done: nothing yet
    assert main(sweep_args(data, out, ("0", "8"), ("0", "4", "5"), "--shard", "3/3")) == 2
    line = one_error_line(capsys)
    assert "sweep.json: this sweep was started with other options (num_matte: [0, 4], now [0, 4, 5])" in line


# ----------------------------------------------------------------------------- one real sweep
def sweep(args: list[str]) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "wsshm.sweep.cli", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def stage_commands(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("$ ") and "/launch/" in line]


def started(output: str) -> list[str]:
    return re.findall(r"\] (seg\d+-matte\d+: \w+) started", output)


def read_table(out: Path) -> dict:
    with open(out / "report" / "table7.csv") as handle:
        return {(r["#seg"], r["#matte"]): r for r in csv.DictReader(handle)}


@pytest.mark.xdist_group("ds")
def test_a_2x2_sweep_over_two_shards_reports_blanks_then_resumes(data, tmp_path, one_run_at_a_time):
    out = tmp_path / "sweep"
    with one_run_at_a_time():
        second = sweep(sweep_args(data, out, ("0", "8"), ("0", "4"), "--shard", "2/2"))
        assert started(second) == ["seg0-matte4: teacher"]  # job 1 only: the teacher without pre-training
        table = read_table(out)
        assert set(table) == {("0", "4"), ("8", "0"), ("8", "4")}  # (0, 0) is not trained
        assert table[("0", "4")]["natural MSE"] and table[("0", "4")]["synthetic SAD (boundary)"]
        assert table[("8", "0")]["natural MSE"] == "" and table[("8", "4")]["synthetic MSE"] == ""  # blanks
        assert "1 of 3 cells done" in (out / "report" / "table7.md").read_text()

        first = sweep(sweep_args(data, out, ("0", "8"), ("0", "4"), "--shard", "1/2"))
        assert started(first) == ["seg8-matte0: pretrain", "seg8-matte4: teacher", "seg8-matte4: student"]
        stage0 = str(out / "stage0" / "seg8" / "pretrain.safetensors")
        commands = stage_commands(first)
        assert f"--init {stage0}" in commands[1] and "--num-matte 4" in commands[1]  # teacher from stage 0
        assert f"--init {stage0}" in commands[2] and "--num-seg 8" in commands[2]  # student from it too
        assert "stage(s) left, about" in first and re.search(r"student finished in \d+ s", first)
        assert all(all(row.values()) for row in read_table(out).values())  # every cell scored
        for name in ("natural", "synthetic"):
            assert (out / "eval" / "seg8-matte4" / name / "metrics.json").is_file()
            assert (out / "report" / f"figure-{name}.png").stat().st_size > 1000
        assert [p.name for p in (out / "stage0").iterdir()] == ["seg8"]

        # lost after its last checkpoint (killed before the export): the rerun resumes that stage only
        student = out / "cells" / "seg8-matte4" / "student"
        (student / "student.safetensors").unlink()
        metrics = out / "eval" / "seg8-matte4" / "natural" / "metrics.json"
        before = metrics.stat().st_mtime
        again = sweep(sweep_args(data, out))
        assert started(again) == ["seg8-matte4: student"] and "(resuming from its checkpoint)" in again
        assert stage_commands(again)[0].endswith(" --resume")
        assert again.count(" reused (") == 3 and (student / "student.safetensors").is_file()
        assert metrics.stat().st_mtime > before  # the new weights were scored again
        assert not list(out.rglob("*.tmp"))  # nothing half-written left

        # and with no checkpoint that opens (every file truncated), the stage starts again
        (student / "student.safetensors").unlink()
        for state in (student / "checkpoints").rglob("*.pt"):
            state.write_bytes(state.read_bytes()[:100])
        fresh = sweep(sweep_args(data, out))
        assert "seg8-matte4: student: no usable checkpoint (" in fresh and "starting it again" in fresh
        assert not stage_commands(fresh)[0].endswith(" --resume") and (student / "student.safetensors").is_file()


@pytest.mark.xdist_group("ds")
def test_sigterm_to_the_sweeps_group_lets_the_stage_save_and_stops_with_143(data, tmp_path, one_run_at_a_time):
    """A scheduler's SIGTERM reaches the sweep and its running stage: the sweep must keep reading the
    stage's output until it has saved (a closed pipe would break it mid-save), then stop."""
    import signal
    import time
    out = tmp_path / "sweep"
    args = sweep_args(data, out, ("8",), ("0",))
    args[args.index("--steps") + 1] = "100000"  # a stage that only the signal ends
    with one_run_at_a_time():
        proc = subprocess.Popen([sys.executable, "-m", "wsshm.sweep.cli", *args], cwd=ROOT,
                                env={**os.environ, "DS_ACCELERATOR": "cpu"}, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log = out / "stage0" / "seg8" / "loss.csv"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                log.exists() and len(log.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-3000:]
    assert "rerun the same command to resume" in output
    stage_log = (out / "logs" / "seg8-matte0-pretrain.log").read_text()
    assert "SIGTERM: saved step" in stage_log and "Traceback" not in stage_log, stage_log[-3000:]
    assert (out / "stage0" / "seg8" / "checkpoints" / "latest").is_file()
