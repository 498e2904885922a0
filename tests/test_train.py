"""Training engine, in one process: configuration checks, non-finite steps, safe checkpoint loading.

The 2-process DeepSpeed runs (each stage, EMA under ZeRO-1/3, resume after SIGTERM) are in
``test_train_ds.py``.
"""
import io
import math
import shutil
from pathlib import Path

import pytest
import torch

from wsshm import losses
from wsshm.train import main
from wsshm.train.launch import free_port
from wsshm.train.checkpoint import SafeCheckpointEngine
from wsshm.train.monitor import image_grid
from wsshm.train.options import ConfigError, build_parser, load_ds_config

ROOT = Path(__file__).resolve().parents[1]
ARCH = "unet_r18_w0.25"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from wsshm.shards.demo_data import generate
    out = tmp_path_factory.mktemp("demo")
    return {k: Path(v) for k, v in generate(out, size=64, mattes=4, backgrounds=4, seg=8, eval_natural=2,
                                            eval_synthetic=2).items()}


@pytest.fixture
def single_process(monkeypatch):
    """The environment the ``deepspeed`` launcher would give rank 0 of a one-process run."""
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)


def pretrain_args(data, out, *extra):
    return ["--out", str(out), "--seg", str(data["seg"]), "--arch", ARCH, "--crop-sizes", "32",
            "--batch-size", "2", "--num-workers", "0", "--save-every", "0", "--log-every", "1", *extra]


REAL_PRETRAIN_LOSS = losses.pretrain_loss


def nan_loss_at(call: int):
    """The pre-training loss, NaN on its ``call``-th call: a NaN loss whose gradients are finite, which
    wsshm must still skip. ``.calls`` counts the calls."""
    def loss(P, S):
        loss.calls += 1
        return REAL_PRETRAIN_LOSS(P, S) + (math.nan if loss.calls == call else 0.0)
    loss.calls = 0
    return loss


def test_ds_config_takes_batch_lr_schedule_and_precision_from_the_command_line():
    args = build_parser("teacher").parse_args(
        ["--out", "x", "--matte", "m", "--background", "b", "--batch-size", "16", "--steps", "300",
         "--zero-stage", "3"])
    config = load_ds_config(args, world_size=4, use_bf16=True)
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["optimizer"]["type"] == "Adam" and config["optimizer"]["params"]["lr"] == 5e-5  # paper
    assert config["scheduler"]["params"]["total_num_steps"] == 300
    assert config["scheduler"]["params"]["warmup_num_steps"] == 30
    assert config["zero_optimization"]["stage"] == 3
    # bf16 is autocast over fp32 parameters and BatchNorm statistics, not DeepSpeed's bf16 engine mode
    assert config["bf16"] == {"enabled": False} and "data_types" not in config
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    fp32 = load_ds_config(args, world_size=4, use_bf16=False)
    assert fp32["bf16"] == {"enabled": False} and "torch_autocast" not in fp32 and "data_types" not in fp32
    assert args.steps == 300 and build_parser("student").get_default("steps") == 20_000
    with pytest.raises(ConfigError, match="--batch-size 16 does not divide by the world size 3"):
        load_ds_config(args, world_size=3, use_bf16=False)


def test_image_grid_puts_samples_in_rows_and_maps_in_columns():
    a, b = torch.zeros(6, 3, 4, 5), torch.ones(6, 3, 4, 5)
    grid = image_grid([a, b], rows=4)
    assert grid.shape == (3, 16, 10)
    assert grid[:, :, :5].max() == 0 and grid[:, :, 5:].min() == 1


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3, "loader": [{"epoch": 1}]}, good)
    assert SafeCheckpointEngine().load(str(good))["step"] == 3
    evil = tmp_path / "evil.pt"
    torch.save({"payload": io.StringIO("not plain data")}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        SafeCheckpointEngine().load(str(evil))


def run_main(stage, argv, capsys):
    code = main(stage, argv)
    return code, capsys.readouterr().err


def test_configuration_mistakes_fail_fast_with_one_line(data, tmp_path, single_process, capsys):
    from wsshm.models import build_model, save_weights
    torch.manual_seed(0)
    save_weights(build_model(ARCH), tmp_path / "r18.safetensors")
    save_weights(build_model("unet_r18_w0.5"), tmp_path / "other.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    other_world = tmp_path / "two-ranks"  # a run.json of 2 processes
    other_world.mkdir()
    (other_world / "run.json").write_text('{"stage": "pretrain", "world_size": 2}')
    broken_info = tmp_path / "broken-info"
    broken_info.mkdir()
    (broken_info / "run.json").write_text('["not", "an object"]')
    hostile = tmp_path / "hostile"  # its only checkpoint pickles an arbitrary object
    (hostile / "checkpoints" / "step00000002").mkdir(parents=True)
    (hostile / "checkpoints" / "latest").write_text("step00000002")
    torch.save({"payload": io.StringIO("not plain data")}, hostile / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt")
    tampered = tmp_path / "tampered"  # one byte of a shard changed after conversion
    shutil.copytree(data["seg"], tampered)
    shard = next(tampered.glob("*.tar"))
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1  # inside the first member's data: the tar still reads
    shard.write_bytes(bytes(raw))
    victim = tmp_path / "victim.txt"  # a file outside the run that planted links point to
    victim.write_text("keep me")
    planted = tmp_path / "planted"
    (planted / "checkpoints").mkdir(parents=True)
    (planted / "checkpoints" / "latest").symlink_to(victim)
    planted_log = tmp_path / "planted-log"
    planted_log.mkdir()
    (planted_log / "loss.csv").symlink_to(victim)
    student = ["--out", str(tmp_path / "s"), "--seg", str(data["seg"]), "--arch", ARCH, "--crop-sizes", "32",
               "--batch-size", "2", "--num-workers", "0"]
    cases = [
        ("student", student + ["--teacher", str(tmp_path / "missing.safetensors")], "missing.safetensors: no such file"),
        ("student", student + ["--teacher", str(tmp_path / "other.safetensors"), "--ema", "on"],
         "--ema on needs the same architecture"),
        ("student", student + ["--teacher", str(tmp_path / "r18.safetensors"), "--init",
                               str(tmp_path / "other.safetensors")], "holds a 'unet_r18_w0.5' network"),
        ("pretrain", pretrain_args({"seg": empty}, tmp_path / "p"), f"--seg {empty}"),
        ("pretrain", pretrain_args(data, tmp_path / "p", "--resume"), "--resume: no usable checkpoint"),
        ("pretrain", pretrain_args({"seg": data["eval-natural"]}, tmp_path / "p"),
         "holds 'eval' shards where 'seg' shards are needed"),
        ("pretrain", pretrain_args(data, tmp_path / "p", "--encoder-weights", str(broken)),
         f"--encoder-weights {broken}"),
        ("pretrain", pretrain_args(data, tmp_path / "p", "--batch-size", "0"), "--batch-size 0: must be positive"),
        ("pretrain", pretrain_args(data, other_world, "--resume"), "written by 2 processes, this run has 1"),
        ("pretrain", pretrain_args(data, hostile, "--resume"), "no usable checkpoint"),
        ("pretrain", pretrain_args(data, broken_info, "--resume"), f"{broken_info / 'run.json'}: not a JSON object"),
        ("pretrain", pretrain_args({"seg": tampered}, tmp_path / "p"),
         f"--seg {shard}: sha256 differs from the manifest"),
        ("pretrain", pretrain_args(data, planted), f"{planted}/checkpoints/latest is a symbolic link"),
        ("pretrain", pretrain_args(data, planted_log), f"{planted_log}/loss.csv is a symbolic link"),
        ("pretrain", pretrain_args(data, tmp_path / "p", "--crop-sizes", "40"), "multiples of 32"),
        # the loaders' rule: three or more values are exact sizes, each checked
        ("pretrain", pretrain_args(data, tmp_path / "p", "--crop-sizes", "32", "64", "100"), "multiples of 32"),
    ]
    for stage, argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(stage, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, (argv, err)
        assert len(err) == 1 and expected in err[0] and err[0].startswith(f"wsshm {stage}: error:"), err
    (tmp_path / "notjson").write_text("{")
    with pytest.raises(SystemExit):
        main("pretrain", pretrain_args(data, tmp_path / "p", "--deepspeed_config", str(tmp_path / "notjson")))
    assert "cannot read DeepSpeed config" in capsys.readouterr().err
    assert not (tmp_path / "s" / "checkpoints").exists()
    assert victim.read_text() == "keep me"
    # the user's choice to trust the files: the same tampered folder passes the checks and trains
    code, err = run_main("pretrain", pretrain_args({"seg": tampered}, tmp_path / "trusted", "--steps", "1",
                                                   "--check-shards", "off"), capsys)
    assert code == 0, err


def test_resume_passes_over_a_truncated_newest_checkpoint(data, tmp_path, single_process, capsys):
    out = tmp_path / "run"
    code, err = run_main("pretrain", pretrain_args(data, out, "--steps", "4", "--save-every", "2"), capsys)
    assert code == 0, err
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000002", "step00000004"]
    assert not list(checkpoints.rglob("*.py"))  # no DeepSpeed recovery script that unpickles freely
    newest = checkpoints / "step00000004" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (checkpoints / "step_notes").mkdir()  # the user's: pruning old checkpoints must leave it
    with open(out / "loss.csv", "a") as log:
        log.write("a line someone typed\n")
    with pytest.warns(UserWarning, match="passing over an unusable checkpoint: .*step00000004"):
        code, err = run_main("pretrain", pretrain_args(data, out, "--steps", "6", "--save-every", "2", "--resume"),
                             capsys)
    assert code == 0, err
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 of the first run were logged again, once
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000004", "step00000006",
                                                                           "step_notes"]
    # a save killed before rank 0 wrote its ZeRO-1 optimizer file: DeepSpeed would fail after building
    (checkpoints / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.warns(UserWarning, match="step00000006: rank 0's ZeRO optim states file is missing"):
        code, err = run_main("pretrain", pretrain_args(data, out, "--steps", "7", "--save-every", "2", "--resume"),
                             capsys)
    assert code == 0, err
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("zero, precision", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (1, "bf16")])
def test_a_non_finite_step_makes_no_update_and_counts_and_a_run_of_them_stops(data, tmp_path, single_process,
                                                                               monkeypatch, capsys, zero, precision,
                                                                               changed_between_checkpoints):
    """Stages 1-3: DeepSpeed's own non-finite-norm check discards the step (no read-back by wsshm);
    stage 0: wsshm reads the loss back and skips the step itself. Either way the weights, the
    optimizer's state and the schedule are untouched, and the step counts, like the batch drawn.
    bf16 (autocast, the GPU's default) keeps fp32 masters, which DeepSpeed checks the same way."""
    nan_on_second_call = nan_loss_at(2)
    monkeypatch.setattr(losses, "pretrain_loss", nan_on_second_call)
    out = tmp_path / "once"
    with pytest.warns(UserWarning, match=r"step 2: non-finite loss or gradients, no update \(1 in a row"):
        code, err = run_main("pretrain", pretrain_args(data, out, "--steps", "2", "--save-every", "1",
                                                       "--zero-stage", str(zero), "--precision", precision), capsys)
    assert code == 0, err
    assert nan_on_second_call.calls == 2 and (out / "pretrain.safetensors").is_file()
    steps = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [1]  # the skipped step is not logged
    changed, compared = changed_between_checkpoints(out / "checkpoints" / "step00000001",
                                                    out / "checkpoints" / "step00000002")
    # BatchNorm's running statistics saw the step's batch in the forward pass; nothing else changed
    assert changed and all("running_" in key or "num_batches_tracked" in key for key in changed), changed
    assert any("optim" in key for key in compared) and any("lr_scheduler" in key for key in compared)

    monkeypatch.setattr(losses, "pretrain_loss", lambda P, S: REAL_PRETRAIN_LOSS(P, S) * math.nan)
    with pytest.warns(UserWarning):
        code, err = run_main("pretrain", pretrain_args(data, tmp_path / "always", "--steps", "5",
                                                       "--max-bad-steps", "3", "--zero-stage", str(zero)), capsys)
    assert code == 3
    assert "3 steps in a row without an update (non-finite loss or gradients) at step 3; stopping" in err
    assert not (tmp_path / "always" / "pretrain.safetensors").exists()


def test_student_of_another_architecture_trains_without_ema(data, tmp_path, single_process, capsys):
    from wsshm.models import build_model, load_weights, save_weights
    torch.manual_seed(0)
    save_weights(build_model("unet_r18_w0.5"), tmp_path / "teacher.safetensors")
    code, err = run_main("student", ["--out", str(tmp_path / "s"), "--seg", str(data["seg"]), "--arch", ARCH,
                                     "--teacher", str(tmp_path / "teacher.safetensors"), "--crop-sizes", "32",
                                     "--batch-size", "2", "--num-workers", "0", "--steps", "2"], capsys)
    assert code == 0, err
    assert load_weights(tmp_path / "s" / "student.safetensors").arch == ARCH
    assert not (tmp_path / "s" / "teacher-ema.safetensors").exists()
    info = (tmp_path / "s" / "run.json").read_text()
    assert '"ema": false' in info and '"teacher_arch": "unet_r18_w0.5"' in info


def test_which_deepspeed_configs_skip_a_non_finite_step_themselves():
    from wsshm.train.engine import Trainer
    discards = Trainer.optimizer_discards_non_finite
    assert [discards({"zero_optimization": {"stage": n}}) for n in (0, 1, 2, 3)] == [False, True, True, True]
    assert not discards({})
    assert not discards({"zero_optimization": {"stage": 1, "compute_grad_norm": False}})
    assert discards({"zero_optimization": {"stage": 3, "compute_grad_norm": False}})  # stage 3 always checks
    assert not discards({"zero_optimization": {"stage": 3, "offload_optimizer": {"super_offload": True}}})
    assert not discards({"zero_optimization": {"stage": 2, "zenflow": {"topk_ratio": 0.1}}})
    assert discards({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})


def test_bf16_training_keeps_fp32_batchnorm_statistics(data, tmp_path, single_process, capsys):
    """bf16 compute (autocast) must leave BatchNorm's running mean and variance in fp32: the eval-mode
    network uses them everywhere, and bf16 holds ~3 significant digits (bench/bn_statistics.py)."""
    from wsshm.models import read_weights
    code, err = run_main("pretrain", pretrain_args(data, tmp_path / "bf16", "--steps", "3", "--precision", "bf16"),
                         capsys)
    assert code == 0, err
    rows = (tmp_path / "bf16" / "loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(math.isfinite(float(row.split(",")[1])) for row in rows)
    saved = read_weights(tmp_path / "bf16" / "pretrain.safetensors")[0]
    stats = {k: t for k, t in saved.items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(t.dtype == torch.float32 for t in stats.values())
    values = torch.cat([t.flatten() for t in stats.values()])
    exact = (values.bfloat16().float() == values).float().mean().item()
    assert exact < 0.1, f"{exact:.0%} of the statistics are bf16 values stored as fp32"


def test_several_seg_folders_mix_in_both_stages_and_resume_only_with_the_same_mix(data, tmp_path, single_process,
                                                                                  capsys):
    from wsshm.models import build_model, save_weights
    pseudo = tmp_path / "pseudo"
    shutil.copytree(data["seg"], pseudo)
    mix = ["--seg", str(data["seg"]), str(pseudo), "--seg-weights", "1", "0.5"]

    def args(steps, weights=("1", "0.5"), *extra):
        argv = pretrain_args(data, tmp_path / "mixed", "--steps", str(steps), "--save-every", "2", *extra)
        argv[argv.index("--seg"):argv.index("--seg") + 2] = [*mix[:4], *weights]
        return argv

    code, err = run_main("pretrain", args(4), capsys)
    assert code == 0, err
    code, err = run_main("pretrain", args(6, ("1", "0.5"), "--resume"), capsys)
    assert code == 0, err
    code, err = run_main("pretrain", args(8, ("1", "2"), "--resume"), capsys)
    assert code == 2 and "--resume: the loader state was saved for data folders of (size, weight) " \
                         "[[8, 1.0], [8, 0.5]], this loader reads [[8, 1.0], [8, 2.0]]" in err, err
    for wrong, expected in ((["--seg-weights", "1"], "--seg-weights: 1 mixing weights for 2 folders"),
                            (["--seg-weights", "1", "-1"], "--seg-weights: mixing weights must be positive")):
        with pytest.raises(SystemExit) as exit_info:
            main("pretrain", [*args(4), *wrong])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    torch.manual_seed(0)
    save_weights(build_model(ARCH), tmp_path / "teacher.safetensors")
    code, err = run_main("student", ["--out", str(tmp_path / "s"), *mix, "--arch", ARCH, "--teacher",
                                     str(tmp_path / "teacher.safetensors"), "--crop-sizes", "32",
                                     "--batch-size", "3", "--num-workers", "0", "--steps", "2"], capsys)
    assert code == 0, err


def test_compiled_student_trains_as_the_eager_one(data, tmp_path, single_process, capsys):
    """--compile: the trained network and the frozen teacher compiled in place (aot_eager traces the
    same graphs inductor would compile, without generating code): the same losses, the same weights
    under the same names."""
    from wsshm.models import build_model, read_weights, save_weights
    torch.manual_seed(0)
    save_weights(build_model(ARCH), tmp_path / "teacher.safetensors")
    from torch._dynamo.utils import counters
    results, graphs = {}, {}
    for mode in ("off", "aot_eager"):
        out = tmp_path / mode
        torch._dynamo.reset()
        counters.clear()
        code, err = run_main("student", ["--out", str(out), "--seg", str(data["seg"]), "--arch", ARCH,
                                         "--teacher", str(tmp_path / "teacher.safetensors"), "--crop-sizes", "32",
                                         "--batch-size", "2", "--num-workers", "0", "--steps", "3",
                                         "--log-every", "1", "--compile", mode], capsys)
        assert code == 0, err
        losses_logged = [float(line.split(",")[1]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
        results[mode] = (losses_logged, read_weights(out / "student.safetensors")[0],
                         read_weights(out / "teacher-ema.safetensors")[0])
        graphs[mode] = counters["stats"]["unique_graphs"]
    assert graphs["off"] == 0 and graphs["aot_eager"] >= 2  # the student's graph and the teacher's
    (eager_loss, eager_student, eager_ema), (compiled_loss, student, ema) = results["off"], results["aot_eager"]
    assert len(eager_loss) == 3
    torch.testing.assert_close(torch.tensor(compiled_loss), torch.tensor(eager_loss), rtol=1e-4, atol=1e-6)
    assert student.keys() == eager_student.keys() and ema.keys() == eager_ema.keys()
    for key in student:
        torch.testing.assert_close(student[key], eager_student[key], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("stage, zero, reads_per_step", [("pretrain", 1, 0), ("teacher", 1, 0), ("student", 1, 0),
                                                      ("pretrain", 0, 1)])
def test_a_training_step_reads_nothing_back_from_the_device_but_on_logging_steps(data, tmp_path, single_process,
                                                                                  monkeypatch, capsys, stage, zero,
                                                                                  reads_per_step):
    """Every read of a tensor's value by wsshm's own code in the loop would stall a GPU's queue of
    work. Under ZeRO the step has none (DeepSpeed's own norm check decides on non-finite steps);
    stage 0 reads its loss once. The logging after a step reads the loss on logging steps only."""
    import sys
    from wsshm.train.engine import Trainer
    reads, inside = [], []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if inside and caller.f_globals.get("__name__", "").startswith("wsshm"):
                reads.append((*inside[-1], name, caller.f_globals["__name__"], caller.f_lineno))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        counting(name)
    real_step, real_log = Trainer.step, Trainer.log
    logged = []

    def step(self):
        inside.append(("step", self.engine.global_steps + 1))
        try:
            return real_step(self)
        finally:
            inside.pop()

    def log(self, monitor, step, out, lr, seconds):
        logged.append(step)
        inside.append(("log", step))
        try:
            return real_log(self, monitor, step, out, lr, seconds)
        finally:
            inside.pop()
    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(Trainer, "log", log)
    from wsshm.models import build_model, save_weights
    torch.manual_seed(0)
    save_weights(build_model(ARCH), tmp_path / "teacher.safetensors")
    inputs = {"pretrain": ["--seg", str(data["seg"])],
              "teacher": ["--matte", str(data["matte"]), "--background", str(data["background"])],
              "student": ["--seg", str(data["seg"]), "--teacher", str(tmp_path / "teacher.safetensors")]}[stage]
    code, err = run_main(stage, ["--out", str(tmp_path / "run"), *inputs, "--arch", ARCH, "--crop-sizes", "32",
                                 "--batch-size", "2", "--num-workers", "0", "--save-every", "0", "--steps", "4",
                                 "--log-every", "2", "--zero-stage", str(zero)], capsys)
    assert code == 0, err
    assert logged == [1, 2, 3, 4]
    in_step = {n: [r for r in reads if r[:2] == ("step", n)] for n in logged}
    assert all(len(found) == reads_per_step for found in in_step.values()), reads
    in_log = {n: [r for r in reads if r[:2] == ("log", n)] for n in logged}
    assert not in_log[1] and not in_log[3] and in_log[2] and in_log[4], reads  # --log-every 2
    steps = [int(line.split(",")[0]) for line in (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4]


def test_resume_after_a_skipped_step_gives_the_uninterrupted_weights(data, tmp_path, single_process, monkeypatch,
                                                                     capsys):
    """A step without an update still counts (as DeepSpeed counts the steps its optimizer skips), in
    the checkpoint too: a run resumed after one ends with the uninterrupted run's weights."""
    from wsshm.models import read_weights
    monkeypatch.setattr(losses, "pretrain_loss", nan_loss_at(2))
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        code, err = run_main("pretrain", pretrain_args(data, tmp_path / "whole", "--steps", "5"), capsys)
    assert code == 0, err
    monkeypatch.setattr(losses, "pretrain_loss", nan_loss_at(2))
    with pytest.warns(UserWarning, match="step 2: non-finite"):
        code, err = run_main("pretrain", pretrain_args(data, tmp_path / "split", "--steps", "3", "--save-every", "3"),
                             capsys)
    assert code == 0, err
    monkeypatch.setattr(losses, "pretrain_loss", REAL_PRETRAIN_LOSS)
    code, err = run_main("pretrain", pretrain_args(data, tmp_path / "split", "--steps", "5", "--resume"), capsys)
    assert code == 0, err
    whole, _ = read_weights(tmp_path / "whole" / "pretrain.safetensors")
    split, _ = read_weights(tmp_path / "split" / "pretrain.safetensors")
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=0, msg=name)
