"""Matte Label Blending keeps the teacher's boundary through the EMA (issue: MLB that works).

Stage 0 never trains the boundary head, and the student stage does not either (by default). Before
the fix, the EMA averaged that untrained head into the teacher, so ``At > 0.5`` of the EMA teacher
soon covered nearly every pixel and the blend took the teacher's matte everywhere; now the EMA
averages only what the student trains. Here a short pipeline
(stage 0 -> stage 1 -> student with a fast EMA) checks that the EMA teacher's ``At > 0.5`` still
covers about as many pixels of fixed natural images as the stage-1 teacher's, and that the logged
share of pixels where the blend takes the teacher stays near its first value. (The IoU of either map
with the true boundary band is printed on failure; a test-sized teacher finds the band too roughly
for a threshold on it to mean much.)

Why not "the same pixels as the stage-1 teacher": with the EMA the teacher becomes an average of the
student, whose features differ from the stage-1 teacher's, so its boundary moves pixel by pixel
even when it stays a boundary detector (IoU about 0.25-0.65 with the stage-1 map in our runs, for
the fixed and the old code alike); what breaks MLB is a map that fires everywhere.
"""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from wsshm.train import main
from wsshm.train.launch import free_port

pytestmark = pytest.mark.xdist_group("mlb")  # one worker builds the stage-1 fixture once
ROOT = Path(__file__).resolve().parents[1]
ARCH = "unet_r18_w0.25"
COMMON = ["--arch", ARCH, "--crop-sizes", "32", "--batch-size", "4", "--num-workers", "0", "--save-every", "0",
          "--log-every", "1", "--image-every", "0"]


@pytest.fixture(scope="module")
def one_process():
    """The environment the ``deepspeed`` launcher would give rank 0 of a one-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tiny networks train 2-5x faster on one thread of a small, busy CPU
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
            patch.setenv(key, value)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, one_process):
    """Demo data, a stage-0 model and a stage-1 teacher fine-tuned from it."""
    from wsshm.shards.demo_data import generate
    root = tmp_path_factory.mktemp("mlb")
    data = {k: Path(v) for k, v in generate(root / "data", size=64, mattes=8, backgrounds=4, seg=16,
                                            eval_natural=4, eval_synthetic=1).items()}
    assert main("pretrain", ["--out", str(root / "pretrain"), "--seg", str(data["seg"]), "--steps", "80",
                             "--lr", "2e-3", *COMMON]) == 0
    # lam 1: a boundary head worth keeping within a test's budget
    assert main("teacher", ["--out", str(root / "teacher"), "--matte", str(data["matte"]), "--background",
                            str(data["background"]), "--init", str(root / "pretrain" / "pretrain.safetensors"),
                            "--steps", "150", "--lr", "2e-3", "--lam", "1.0", *COMMON]) == 0
    return root, data


def boundary(weights: Path, images: torch.Tensor) -> torch.Tensor:
    from wsshm.models import load_weights
    with torch.no_grad():
        return load_weights(weights).eval()(images)[1] > 0.5


def natural_images(folder: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised image, true boundary band) of every image of an eval folder."""
    from wsshm.evaluate import load_eval_set
    from wsshm.image import normalize_uint8
    from wsshm.losses import boundary_mask
    return [(normalize_uint8(torch.tensor(s.image)), boundary_mask(torch.tensor(s.alpha)[None, None]) > 0)
            for s in load_eval_set(folder)]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum().clamp(min=1))


def run_student(root: Path, data: dict, name: str, *extra) -> Path:
    out = root / name
    code = main("student", ["--out", str(out), "--seg", str(data["seg"]), "--teacher",
                            str(root / "teacher" / "teacher.safetensors"), "--init",
                            str(root / "pretrain" / "pretrain.safetensors"), "--steps", "40", "--lr", "1e-3",
                            "--ema-momentum", "0.95", *COMMON, *extra])
    assert code == 0
    return out


def teacher_shares(out: Path) -> np.ndarray:
    with open(out / "loss.csv") as handle:
        return np.array([float(row["teacher_share"]) for row in csv.DictReader(handle)])


@pytest.mark.parametrize("flags, keeps_boundary", [((), True), (("--student-boundary", "blend"), True),
                                                   (("--ema-scope", "all"), False)],
                         ids=["default", "blend", "before-the-fix"])
def test_the_ema_teacher_keeps_a_boundary_detector(stage1, flags, keeps_boundary):
    root, data = stage1
    out = run_student(root, data, "student-" + "-".join(flags or ("default",)), *flags)
    samples = natural_images(data["eval-natural"])
    images = torch.cat([sample[0] for sample in samples])
    band = torch.cat([sample[1] for sample in samples])
    stage1_map = boundary(root / "teacher" / "teacher.safetensors", images)
    ema_map = boundary(out / "teacher-ema.safetensors", images)
    shares = teacher_shares(out)
    assert shares[0] < 0.6 and stage1_map.float().mean() < 0.6  # the stage-1 head is not firing everywhere
    # 0.2: with this test's fast EMA (momentum 0.95, 40 steps) the teacher's body is nearly the student's
    # by the end, and the kept head fires on ~0.15 more of the pixels; before the fix, on ~0.7 more.
    checks = {"share of the EMA map": abs(float(ema_map.float().mean() - stage1_map.float().mean())) < 0.2,
              "logged share": abs(shares[-5:].mean() - shares[:3].mean()) < 0.1}
    summary = (f"shares {float(stage1_map.float().mean()):.3f} -> {float(ema_map.float().mean()):.3f}, band IoU "
               f"{iou(stage1_map, band):.3f} -> {iou(ema_map, band):.3f}, logged {shares[:3]} -> {shares[-5:]}")
    if keeps_boundary:
        assert all(checks.values()), summary
    else:  # the old behaviour, kept behind flags for comparisons, must still show the failure
        assert not checks["share of the EMA map"] and not checks["logged share"], summary
