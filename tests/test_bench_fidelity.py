"""The fidelity study's planning and reporting (bench/bench_fidelity.py), without training anything."""
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_fidelity as study  # noqa: E402
import fidelity_report as report  # noqa: E402

ALL_FLAGS = {"student-boundary": {"blend", "off"}, "ema-scope": {"trained", "all"},
             "strong-view": {"on", "off"}}
DATA = {name: Path("/data") / name for name in ("seg", "matte", "background", "eval-natural", "eval-synthetic")}


def _student(runs, name):
    return next(run for run in runs if run.name == f"student-{name}")


def _value(args, flag):
    return args[args.index(flag) + 1] if flag in args else None


def test_runs_chain_the_stages_and_pass_each_students_flags(tmp_path):
    preset = study.PRESETS["builtin"]
    runs = study.plan_runs(preset, DATA, tmp_path, 0.1, ALL_FLAGS)
    assert [run.name for run in runs[:2]] == ["pretrain", "teacher"] and len(runs) == 2 + len(study.STUDENT_RUNS)
    assert _value(runs[0].args, "--steps") == round(0.1 * preset.steps["pretrain"])
    assert _value(runs[2].args, "--steps") == round(0.1 * preset.steps["student"])
    before = _student(runs, "before-fix")
    assert not before.missing and _value(before.args, "--ema-scope") == "all"
    assert _value(before.args, "--student-boundary") == "off"
    assert _value(before.args, "--teacher") == tmp_path / "runs" / "teacher" / "teacher.safetensors"
    assert _value(_student(runs, "weak-view-no-ema").args, "--strong-view") == "off"
    assert _value(_student(runs, "no-ema").args, "--ema") == "off"


def test_runs_that_need_an_absent_flag_or_choice_are_not_run(tmp_path):
    older = study.plan_runs(study.PRESETS["builtin"], DATA, tmp_path, 1.0, {})
    assert not _student(older, "default").missing and "--strong-view" not in _student(older, "default").args
    assert _student(older, "weak-view").missing == ["--strong-view off"]
    partial = {**ALL_FLAGS, "student-boundary": {"off"}}
    runs = study.plan_runs(study.PRESETS["builtin"], DATA, tmp_path, 1.0, partial)
    assert [run.name for run in runs if run.missing] == ["student-boundary-blend"]


def test_curves_keep_the_last_value_of_a_step_logged_twice(tmp_path):
    csv_path = tmp_path / "loss.csv"
    csv_path.write_text("step,loss,lr,teacher_share\n5,0.5,1,0.2\n10,0.4,1,\n10,0.3,1,0.25\n15,0.2,1,\n")
    steps, values = report.read_curve(csv_path)
    assert steps.tolist() == [5, 10, 15] and values.tolist() == [0.5, 0.3, 0.2]
    assert report.last_logged(csv_path, "teacher_share") == 0.25
    assert report.last_logged(csv_path, "absent") is None


def _results(student_mse, teacher_bnd):
    metrics = {"seg-only": {"mse": 10.0, "mse_boundary": 50.0}, "teacher": {"mse": 12.0, "mse_boundary": teacher_bnd},
               "student-default": {"mse": student_mse, "mse_boundary": 40.0}}
    return {"metrics": {m: {"eval-natural": v, "eval-synthetic": {"mse": 1.0, "mse_boundary": math.nan}}
                        for m, v in metrics.items()},
            "iou": {}, "drift": {"ema-default": {"iou": 0.9, "share_ema": 0.1, "share_teacher": 0.11}},
            "teacher_share": {"student-default": 0.12}}


def test_checks_compare_the_papers_three_orderings():
    preset = study.PRESETS["builtin"]
    assert [ok for ok, _ in report.checks(preset, _results(8.0, 45.0))] == [True, True, True]
    assert [ok for ok, _ in report.checks(preset, _results(13.0, 55.0))] == [False, True, False]


def test_report_has_the_tables_the_paper_numbers_and_the_checks(tmp_path):
    preset = study.PRESETS["builtin"]
    runs = study.plan_runs(preset, DATA, tmp_path, 1.0, ALL_FLAGS)
    timings = report.Timings(tmp_path / "timings.json")
    timings.add("pretrain", 60.0, steps=300)
    path = report.write_report(tmp_path, preset, runs, _results(8.0, 45.0), timings, DATA, ["a note"], wall=90.0,
                               gpus=0, scale=1.0)
    text = path.read_text()
    assert "## Table 3" in text and "## Table 5" in text and "## Candidates" in text and "**Note:** a note" in text
    assert "6.676" in text and "4.472" in text and text.count("**PASS**") == 3
    assert "eval-synthetic MSE (boundary)" not in text  # no model has a boundary score there
    assert "| pretrain | 300 | 60 | 0.20 | ran |" in text
    assert (tmp_path / "loss_curves.png").is_file() and (tmp_path / "results.json").is_file()
