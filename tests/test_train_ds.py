"""The three stages under the real ``deepspeed`` launcher with 2 CPU processes (GPU-free).

One pipeline per test run: stage 0 (ZeRO-2) -> stage 1 (ZeRO-3) -> stage 2 under ZeRO-1 and ZeRO-3 with
EMA, and a stage-2 run stopped by SIGTERM and resumed, which must end with the same weights as the
uninterrupted one. All in one xdist group, and a file lock besides (xdist 3.8 here does not keep the group on one
worker), so that two multi-process runs never share the 2 cores.
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsshm.train.launch import free_port
from wsshm.train.options import LAUNCH_SCRIPTS

pytestmark = pytest.mark.xdist_group("ds")

ROOT = Path(__file__).resolve().parents[1]
ARCH = "unet_r18_w0.25"
COMMON = ["--arch", ARCH, "--crop-sizes", "32", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
          "--image-every", "2"]
TIMEOUT = 300


def launch(stage: str, *args, zero: int) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / LAUNCH_SCRIPTS[stage]), *COMMON, "--zero-stage", str(zero), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == expect, out[-4000:]
    return out


def weights(path: Path) -> dict:
    from wsshm.models import read_weights
    return read_weights(path)[0]


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=0, atol=atol), key


@pytest.fixture(scope="session")
def pipeline(shared, one_run_at_a_time):
    """Stage 0 (ZeRO-2) and stage 1 (ZeRO-3) once per test run, whichever worker asks first."""
    root = shared
    with one_run_at_a_time():
        if not (root / "teacher" / "teacher.safetensors").exists():
            from wsshm.shards.demo_data import generate
            generate(root / "data", size=64, mattes=6, backgrounds=4, seg=12, eval_natural=1, eval_synthetic=1)
            finish(launch("pretrain", "--out", root / "pretrain", "--seg", root / "data" / "seg",
                          "--steps", "4", "--save-every", "2", zero=2))
            finish(launch("teacher", "--out", root / "teacher", "--matte", root / "data" / "matte",
                          "--background", root / "data" / "background",
                          "--init", root / "pretrain" / "pretrain.safetensors", "--steps", "3",
                          "--save-every", "0", zero=3))
    return root, {k: root / "data" / k for k in ("seg", "matte", "background")}


def student(root: Path, data: dict, out: str, zero: int, *extra) -> subprocess.Popen:
    return launch("student", "--out", root / out, "--seg", data["seg"],
                  "--teacher", root / "teacher" / "teacher.safetensors",
                  "--init", root / "pretrain" / "pretrain.safetensors", "--ema-momentum", "0.5",
                  "--steps", "8", "--save-every", "2", *extra, zero=zero)


def test_pretrain_and_teacher_train_on_two_processes(pipeline):
    from wsshm.models import load_weights
    root, _ = pipeline
    pre, teacher = weights(root / "pretrain" / "pretrain.safetensors"), weights(root / "teacher" / "teacher.safetensors")
    assert load_weights(root / "teacher" / "teacher.safetensors").arch == ARCH
    changed = [k for k in pre if not torch.equal(pre[k], teacher[k])]
    assert len(changed) > len(pre) // 2  # the teacher started from stage 0 and trained
    for stage in ("pretrain", "teacher"):
        rows = (root / stage / "loss.csv").read_text().splitlines()[1:]
        assert len(rows) >= 3 and all(float(r.split(",")[1]) > 0 for r in rows)
        assert any((root / stage / "tb").iterdir())
    assert (root / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step00000004"


def distance(a: dict, b: dict) -> float:
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)


def test_student_with_ema_is_the_same_under_zero1_and_zero3(pipeline, one_run_at_a_time):
    root, data = pipeline
    with one_run_at_a_time():
        if not (root / "student-z1" / "student.safetensors").exists():
            finish(student(root, data, "student-z1", 1))
        finish(student(root, data, "student-z3", 3))
    start = {"student.safetensors": weights(root / "pretrain" / "pretrain.safetensors"),
             "teacher-ema.safetensors": weights(root / "teacher" / "teacher.safetensors")}
    for name, initial in start.items():
        z1, z3 = weights(root / "student-z1" / name), weights(root / "student-z3" / name)
        moved = distance(z1, initial)
        assert moved > 0  # trained, and the EMA moved the teacher toward the student
        # ZeRO-3 reduces gradients in another order and Adam magnifies that on near-zero gradients,
        # so "the same" means far closer to each other than to where training started
        assert distance(z1, z3) < 0.01 * moved, (name, distance(z1, z3), moved)
    losses = [[float(r.split(",")[1]) for r in (root / f"student-z{z}" / "loss.csv").read_text().splitlines()[1:]]
              for z in (1, 3)]
    assert losses[0] == pytest.approx(losses[1], rel=2e-3)


def test_resume_after_sigterm_gives_the_uninterrupted_weights(pipeline, one_run_at_a_time):
    root, data = pipeline
    reference = root / "student-z1"
    with one_run_at_a_time():
        if not (reference / "student.safetensors").exists():
            finish(student(root, data, "student-z1", 1))
        # with a loader worker, which the scheduler's signal to the process group reaches too
        proc = student(root, data, "student-cut", 1, "--num-workers", "1")
        latest = root / "student-cut" / "checkpoints" / "latest"
        deadline = time.monotonic() + TIMEOUT
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempting the job does
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert "SIGTERM: saved step" in out, out[-4000:]
        assert not (root / "student-cut" / "student.safetensors").exists()
        finish(student(root, data, "student-cut", 1, "--resume", "--num-workers", "1"))
    for name in ("student.safetensors", "teacher-ema.safetensors"):
        assert_same(weights(reference / name), weights(root / "student-cut" / name))
    steps = [int(r.split(",")[0]) for r in (root / "student-cut" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 9))  # each step logged once across the stop and the resume


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigterm_to_a_single_process_run_with_workers_saves_and_exits_143(pipeline, tmp_path, one_run_at_a_time):
    root, data = pipeline
    out = tmp_path / "cut"
    cmd = [sys.executable, str(ROOT / "launch" / LAUNCH_SCRIPTS["pretrain"]), *COMMON, "--num-workers", "2",
           "--out", str(out), "--seg", str(data["seg"]), "--steps", "100000", "--save-every", "0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    with one_run_at_a_time():
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT
        while len(read_lines(out / "loss.csv")) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # two steps logged: the workers are up and feeding
        os.killpg(proc.pid, signal.SIGTERM)  # the run and its two loader workers, as a scheduler does
        try:
            output, _ = proc.communicate(timeout=120)  # a run that waits on its workers never ends
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-4000:]
    assert "SIGTERM: saved step" in output and "Traceback" not in output, output[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() >= "step00000002"


def test_bf16_training_saves_the_fp32_master_weights(pipeline, shared, one_run_at_a_time):
    """bf16 is compute only (autocast): the saved weights must be the fp32 masters, collected from both
    ranks' ZeRO-3 partitions, and BatchNorm's fp32 running statistics, not bf16 roundings of either."""
    root, data = pipeline
    with one_run_at_a_time():
        finish(launch("pretrain", "--out", root / "pretrain-bf16", "--seg", data["seg"], "--steps", "3",
                      "--save-every", "0", "--precision", "bf16", zero=3))
    saved = weights(root / "pretrain-bf16" / "pretrain.safetensors")
    floats = {k: t for k, t in saved.items() if t.is_floating_point()}
    assert floats and all(t.dtype == torch.float32 for t in floats.values())
    rounded = [k for k, t in floats.items() if torch.equal(t.bfloat16().float(), t)]
    assert len(rounded) < len(floats) // 10, rounded[:5]  # not bf16 values stored as fp32


NAN_ON_ONE_RANK = '''
import os
if os.environ.get("RANK") == os.environ.get("WSSHM_TEST_NAN_RANK"):
    import wsshm.losses as losses
    real, calls = losses.pretrain_loss, []

    def nan_on_second_call(P, S):
        calls.append(1)
        return real(P, S) + (float("nan") if len(calls) == 2 else 0.0)
    losses.pretrain_loss = nan_on_second_call
'''


@pytest.mark.parametrize("zero", [1, 0])
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(pipeline, tmp_path, one_run_at_a_time,
                                                               changed_between_checkpoints, zero):
    """Rank 1 alone gets a NaN loss (with finite gradients) at step 2. ZeRO 1: wsshm reads nothing
    back; the NaN gradients reach both ranks' partitions through ZeRO's reduction and both skip.
    Stage 0: the ranks agree on the loss. Either way no rank's weights or optimizer state move."""
    _, data = pipeline
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(NAN_ON_ONE_RANK)
    out, port = tmp_path / "run", free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(ROOT / "launch" / LAUNCH_SCRIPTS["pretrain"]), *COMMON, "--zero-stage", str(zero),
           "--out", str(out), "--seg", str(data["seg"]), "--steps", "2", "--save-every", "1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WSSHM_TEST_NAN_RANK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")]))}
    with one_run_at_a_time():
        output = finish(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True))
    assert "step 2: non-finite loss or gradients, no update" in output, output[-4000:]
    changed, compared = changed_between_checkpoints(out / "checkpoints" / "step00000001",
                                                    out / "checkpoints" / "step00000002")
    assert any("zero_pp_rank_1" in key for key in compared) == (zero == 1)  # rank 1's optimizer partition
    assert changed and all("running_" in key or "num_batches_tracked" in key for key in changed), changed
    steps = [int(r.split(",")[0]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1]
    # DeepSpeed's CPU backend gave each rank a shared-memory buffer; the run removed both
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
