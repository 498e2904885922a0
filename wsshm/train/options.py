"""Command line and DeepSpeed configuration of the three training stages.

Defaults are the paper's (SPEC section 3): Adam, cosine decay with a linear warm-up, global batch 16,
crops from 512 to 768, and per stage the learning rate and iteration count below. Everything can be
overridden on the command line; the DeepSpeed JSON config (``--deepspeed_config``) holds what only
DeepSpeed reads (optimizer and scheduler types, ZeRO stage, gradient clipping).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import deepspeed


@dataclass(frozen=True)
class StageDefaults:
    name: str
    lr: float
    steps: int
    weights_name: str


STAGE_DEFAULTS = {
    "pretrain": StageDefaults("pretrain", lr=1e-4, steps=200_000, weights_name="pretrain.safetensors"),
    "teacher": StageDefaults("teacher", lr=5e-5, steps=10_000, weights_name="teacher.safetensors"),
    "student": StageDefaults("student", lr=5e-5, steps=20_000, weights_name="student.safetensors"),
}
DEFAULT_ARCH = "unet_r18"
ROOT = Path(__file__).resolve().parents[2]  # the checkout: launch/ lives beside wsshm/
LAUNCH_SCRIPTS = {"pretrain": "pretrain_seg.py", "teacher": "train_teacher.py", "student": "train_student.py"}
# What only DeepSpeed reads (optimizer, scheduler, clipping); the ZeRO stage is --zero-stage.
DEFAULT_DS_CONFIG = ROOT / "launch" / "configs" / "deepspeed.json"


class ConfigError(Exception):
    """A configuration mistake found before training; its message is one line for the user."""


def build_parser(stage: str, default_config: str | None = None) -> argparse.ArgumentParser:
    """The stage's command line; ``default_config`` replaces ``DEFAULT_DS_CONFIG``."""
    defaults = STAGE_DEFAULTS[stage]
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviation must not slip past the options wsshm-sweep sets itself
        prog=f"deepspeed launch/{LAUNCH_SCRIPTS[stage]}",
        description=f"wsshm stage '{stage}' (paper defaults: lr {defaults.lr:g}, {defaults.steps} steps)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="run folder: checkpoints/, tb/, run.json, final weights")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None,
                       help=f"network to train (default: the --init weights' arch, else {DEFAULT_ARCH})")
    model.add_argument("--init", default=None, help="safetensors weights to start from (stage-0 output)")
    if stage == "pretrain":
        model.add_argument("--encoder-weights", default=None,
                           help="torchvision ResNet weights (.safetensors, or a .pth loaded with weights_only)")
    data = parser.add_argument_group("data (shard folders, SPEC section 5)")
    if stage in ("pretrain", "student"):
        data.add_argument("--seg", required=True, nargs="+",
                          help="natural images with segmentation masks: one folder, or several mixed at "
                               "--seg-weights (a labelled and a pseudo-labelled one: wsshm-pseudo-label)")
        data.add_argument("--seg-weights", type=float, nargs="+", default=None, metavar="W",
                          help="each --seg folder's share of every batch, relative (1 0.5: two thirds from "
                               "the first); default: the folders' sizes, as if concatenated")
        data.add_argument("--num-seg", type=int, default=None,
                          help="use a deterministic subset of N (of the first --seg folder)")
    if stage == "teacher":
        data.add_argument("--matte", required=True, help="foregrounds with alpha mattes")
        data.add_argument("--background", required=True, help="backgrounds to composite onto")
        data.add_argument("--num-matte", type=int, default=None, help="use a deterministic subset of K")
    data.add_argument("--crop-sizes", type=int, nargs="+", default=[512, 768],
                      help="square crop sides, multiples of 32: one size; LO HI for every multiple of 32 from "
                           "LO to HI (default: the paper's 512..768); or three or more exact sizes")
    data.add_argument("--backend", choices=["torch", "dali"], default="torch")
    data.add_argument("--num-workers", type=int, default=2)
    data.add_argument("--check-shards", choices=["sha256", "off"], default="sha256",
                      help="before training, compare every shard with its manifest's sha256 (reads the data "
                           "once); off: trust the files")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=defaults.steps)
    optim.add_argument("--lr", type=float, default=defaults.lr)
    optim.add_argument("--warmup-steps", type=int, default=None, help="default: min(1000, steps // 10), at least 1")
    optim.add_argument("--batch-size", type=int, default=16, help="global batch (all ranks together)")
    optim.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                       help="ZeRO stage (default: the config's zero_optimization.stage, 1)")
    optim.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto: bf16 on GPU, fp32 on CPU")
    optim.add_argument("--compile", choices=["off", "inductor", "aot_eager"], default="off",
                       help="torch.compile the network (and the student's frozen teacher) with this backend, "
                            "one graph per crop size: inductor generates kernels (measure it: compiling costs "
                            "time per size); aot_eager only traces, to check that a network compiles")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--max-bad-steps", type=int, default=10,
                       help="stop after this many non-finite losses in a row")
    if stage == "teacher":
        optim.add_argument("--lam", type=float, default=0.01, help="weight of the boundary loss (eq. 2)")
    if stage == "student":
        mlb = parser.add_argument_group("teacher and Matte Label Blending")
        mlb.add_argument("--teacher", required=True, help="stage-1 teacher weights (.safetensors)")
        mlb.add_argument("--ema", choices=["auto", "on", "off"], default="auto",
                         help="EMA of the student into the teacher; auto: when the archs match")
        mlb.add_argument("--ema-momentum", type=float, default=0.999)
        mlb.add_argument("--mlb-threshold", type=float, default=0.5,
                         help="boundary threshold of the blend; a negative value blends softly")
        mlb.add_argument("--student-boundary", choices=["off", "blend"], default="off",
                         help="off (default): the student's boundary head is not trained and the EMA leaves "
                              "the teacher's alone; blend: train it on the 0.05..0.95 band of the blended "
                              "label (eq. 2 with M_bar), starting from the teacher's head (docs/training.md)")
        mlb.add_argument("--lam", type=float, default=0.01, help="weight of the student's boundary loss")
        mlb.add_argument("--ema-scope", choices=["trained", "all"], default="trained",
                         help="trained: average into the teacher only what the student trains; all: every "
                              "parameter (the behaviour before 0.2, for comparisons)")
        mlb.add_argument("--strong-view", choices=["on", "off"], default="on",
                         help="off: the student sees the teacher's weak view (paper Table 5)")
    logs = parser.add_argument_group("checkpoints and logs")
    logs.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    logs.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    logs.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars every N steps")
    logs.add_argument("--image-every", type=int, default=500, help="TensorBoard image grids every N steps")
    parser = deepspeed.add_config_arguments(parser)
    parser.set_defaults(deepspeed_config=str(default_config or DEFAULT_DS_CONFIG))
    return parser


def warmup_steps(args) -> int:
    """DeepSpeed's WarmupCosineLR needs at least one warm-up step."""
    if args.warmup_steps is not None and not 1 <= args.warmup_steps <= args.steps:
        raise ConfigError(f"--warmup-steps {args.warmup_steps}: must be between 1 and --steps {args.steps}")
    return args.warmup_steps if args.warmup_steps is not None else max(1, min(1000, args.steps // 10))


def load_ds_config(args, world_size: int, use_bf16: bool) -> dict:
    """The JSON config with the command line's batch, lr, schedule, ZeRO stage and precision."""
    if not args.deepspeed_config:
        raise ConfigError(f"no DeepSpeed config: pass --deepspeed_config {DEFAULT_DS_CONFIG}")
    path = Path(args.deepspeed_config)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {error}") from None
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size {args.batch_size}: must be positive")
    if args.batch_size % world_size:
        raise ConfigError(f"--batch-size {args.batch_size} does not divide by the world size {world_size}")
    config["train_batch_size"] = args.batch_size
    config["train_micro_batch_size_per_gpu"] = args.batch_size // world_size
    config["gradient_accumulation_steps"] = 1
    config.setdefault("optimizer", {"type": "Adam", "params": {}})
    config["optimizer"].setdefault("params", {})["lr"] = args.lr
    config.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    if config["scheduler"]["type"] == "WarmupCosineLR":
        params = config["scheduler"].setdefault("params", {})
        params["total_num_steps"] = args.steps
        params["warmup_num_steps"] = warmup_steps(args)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    # bf16 is torch.autocast, not DeepSpeed's bf16 engine mode: the parameters (and the optimizer's
    # masters) stay fp32, convolutions run in bf16, and BatchNorm keeps fp32 running statistics, which
    # the eval-mode network uses everywhere (bench/bn_statistics.py). The engine mode casts the whole
    # network to bf16, and CUDA's BatchNorm then wants bf16 statistics too (~3 significant digits).
    # DeepSpeed supports autocast under ZeRO 0-3; bf16 needs no loss scaler. No module is listed as
    # "lower precision safe", so ZeRO communicates gradients and (ZeRO-3) gathers parameters in fp32
    # as in fp32 training: the networks are small, and the EMA and the export then see exact weights.
    config["bf16"] = {"enabled": False}
    config.pop("torch_autocast", None)
    if use_bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    config.pop("fp16", None)
    config.setdefault("steps_per_print", 10**9)  # our own progress bar reports
    return config
