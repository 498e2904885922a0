"""The demo's report helpers: loss trends, the loss plot, and the honest verdict on the paper's orderings."""
import sys

import cv2

from wsshm.demo import loss_plot, loss_trend, orderings, stage_commands, verdict
from wsshm.train.launch import ROOT


def write_csv(path, losses):
    path.write_text("step,loss,lr\n" + "".join(f"{5 * (i + 1)},{v},1e-3\n" for i, v in enumerate(losses)))
    return path


def test_loss_trend_compares_the_first_and_last_fifth(tmp_path):
    falling = loss_trend(write_csv(tmp_path / "a.csv", [1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2]))
    assert falling["first"] == 0.95 and falling["last"] == 0.2 and falling["falling"]
    rising = loss_trend(write_csv(tmp_path / "b.csv", [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert not rising["falling"] and rising["change"] == 4.0


def test_loss_plot_draws_one_panel_per_stage(tmp_path):
    curves = {s: write_csv(tmp_path / f"{s}.csv", [0.5, 0.4, 0.35]) for s in ("pretrain", "teacher", "student")}
    loss_plot(curves, tmp_path / "curves.png")
    image = cv2.imread(str(tmp_path / "curves.png"))
    assert image.shape == (200, 3 * 320, 3) and image.min() < 100  # lines and text drawn on white


def test_verdict_checks_the_papers_three_orderings():
    means = {"seg-only": {"mse": 30.0, "mse_boundary": 150.0}, "teacher": {"mse": 40.0, "mse_boundary": 120.0},
             "student": {"mse": 25.0, "mse_boundary": 130.0}}
    assert [ok for ok, _ in orderings(means)] == [True, True, True]
    assert "3 of the paper's 3 orderings hold" in verdict(means)
    means["student"] = {"mse": 45.0, "mse_boundary": 160.0}
    checks = orderings(means)
    assert [ok for ok, _ in checks] == [False, False, True]
    assert "45.000 vs 40.000" in checks[0][1]
    assert "1 of the paper's 3 orderings hold" in verdict(means) and "- **no**: the student beats" in verdict(means)


def test_stage_commands_chain_the_stages_through_their_weights(tmp_path):
    cmds = stage_commands(tmp_path / "data", tmp_path / "run", {"pretrain": 30, "teacher": 20, "student": 20}, gpus=0)
    assert cmds["pretrain"][:2] == [sys.executable, str(ROOT / "launch" / "pretrain_seg.py")]  # one CPU process
    assert str(tmp_path / "run" / "pretrain" / "pretrain.safetensors") in cmds["teacher"]
    student = cmds["student"]
    assert student[student.index("--teacher") + 1] == str(tmp_path / "run" / "teacher" / "teacher.safetensors")
    assert student[student.index("--steps") + 1] == "20"
    assert "--num_gpus" not in stage_commands(tmp_path, tmp_path, {"pretrain": 1, "teacher": 1, "student": 1}, 4)["student"]
