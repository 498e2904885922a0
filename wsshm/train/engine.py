"""The one training loop every stage runs under DeepSpeed.

Order of a run: distributed init -> configuration checks on rank 0 (one line and exit 2 on a
mistake) -> networks, loader and ``deepspeed.initialize`` -> optional resume -> steps -> final
checkpoint and safetensors export.

A step reads nothing back from the GPU that DeepSpeed does not read anyway: ZeRO's optimizer reads
the gradient norm back and discards an update whose norm is not finite, so a non-finite loss is
turned into NaN gradients and the decision is DeepSpeed's (``engine.was_step_applied()``). Where
DeepSpeed does not check (ZeRO 0, SuperOffload, ZenFlow) the loss is read before the backward pass.
Otherwise it is read only on logging steps; the SIGTERM flag travels between the CPUs over gloo.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from deepspeed.accelerator import get_accelerator

from wsshm.train.checkpoint import (SafeCheckpointEngine, planted_links, prune_checkpoints, read_run_info,
                                    resume_tag, write_run_info)
from wsshm.train.launch import free_port
from wsshm.train.monitor import Monitor
from wsshm.train.options import STAGE_DEFAULTS, ConfigError, build_parser, load_ds_config
from wsshm.train.stages import STAGES, Stage, TrainingView

EXIT_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_TERMINATED = 143
KEEP_CHECKPOINTS = 2


def _ensure_distributed_env() -> None:
    """Lets ``python launch/x.py`` run as a single process without the ``deepspeed`` launcher."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _remove_shared_allreduce_buffer(rank: int) -> None:
    """DeepSpeed's CPU backend, when every rank is on one machine (the launcher's LOCAL_SIZE equals
    the world size), gives each rank a 69 MB allreduce buffer in /dev/shm and never unlinks it: every
    multi-process CPU run would leave its buffers in memory for good. Each rank maps its peers'
    buffers during start-up, so once all ranks have met, a rank can remove the name of its own."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def _broadcast(value, rank: int):
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(value) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class Trainer:
    def __init__(self, stage: Stage, args):
        self.stage, self.args = stage, args
        self.out = Path(args.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.on_gpu = get_accelerator().device_name() == "cuda" and torch.cuda.is_available()
        self.device = torch.device(get_accelerator().device_name(self.local_rank) if self.on_gpu else "cpu")
        self.use_bf16 = args.precision == "bf16" or (args.precision == "auto" and self.on_gpu)
        # bf16 is autocast: fp32 parameters, statistics and inputs; DeepSpeed autocasts the trained
        # network's forward, the stage the rest (the student stage's frozen teacher).
        self.stage.autocast_dtype = torch.bfloat16 if self.use_bf16 else None
        if self.on_gpu:
            # one cuDNN algorithm search per crop size (at most nine), then the fastest for each
            torch.backends.cudnn.benchmark = True
        self.stop_requested = False
        self.bad_in_a_row = 0
        self.resume_from: str | None = None  # the checkpoint tag --resume continues from
        self.ranks_met = False

    # ------------------------------------------------------------------ checks
    def check(self) -> dict:
        """Every configuration mistake we can see before training, as a ``ConfigError``; returns the
        DeepSpeed config."""
        config = load_ds_config(self.args, self.world, self.use_bf16)
        links = planted_links(self.out)
        if links:
            raise ConfigError(f"--out: {links[0]} is a symbolic link; a run folder holds only what wsshm "
                              f"wrote, so remove it" + (f" (and {len(links) - 1} more)" if len(links) > 1 else ""))
        self.stage.check()
        if self.args.resume:
            self.check_resume(int(config.get("zero_optimization", {}).get("stage", 0)))
        if self.args.save_every < 0 or self.args.log_every <= 0 or self.args.image_every < 0:
            raise ConfigError("--save-every/--image-every must be >= 0 and --log-every > 0")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--out {self.out}: {error}") from None
        return config

    def check_resume(self, zero_stage: int) -> None:
        """Which checkpoint ``--resume`` continues from, found before DeepSpeed opens any."""
        try:
            info = read_run_info(self.out) or {}
        except ValueError as error:
            raise ConfigError(f"--resume: {error}") from None
        if info.get("stage") not in (None, self.stage.name):
            raise ConfigError(f"--resume: {self.out} holds a '{info['stage']}' run, not '{self.stage.name}'")
        arch = getattr(self.stage.network(), "arch", None)
        if info.get("arch") not in (None, arch):
            raise ConfigError(f"--resume: {self.out} holds a checkpoint of a '{info['arch']}' network, "
                              f"not of the '{arch}' this command builds")
        if info.get("world_size") not in (None, self.world):
            raise ConfigError(f"--resume: the checkpoints in {self.ckpt_dir} were written by {info['world_size']} "
                              f"processes, this run has {self.world}; resume with the same number")
        tag, skipped = resume_tag(self.ckpt_dir, self.world, zero_stage)
        for reason in skipped:
            warnings.warn(f"--resume: passing over an unusable checkpoint: {reason}", stacklevel=2)
        if tag is None:
            raise ConfigError(f"--resume: no usable checkpoint in {self.ckpt_dir}"
                              + (f" ({skipped[0]})" if skipped else ""))
        self.resume_from = tag

    def checked_config(self) -> dict:
        """Rank 0 checks and reads the config; every rank gets rank 0's config or its one-line error."""
        config, message = None, None
        if self.rank == 0:
            try:
                config = self.check()
            except ConfigError as error:
                message = str(error)
        config, message, self.resume_from = _broadcast((config, message, self.resume_from), self.rank)
        self.ranks_met = True  # every rank is past start-up, DeepSpeed's shared buffers included
        if message:
            if self.rank == 0:
                print(f"wsshm {self.stage.name}: error: {message}", file=sys.stderr, flush=True)
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
            sys.exit(EXIT_CONFIG)
        return config

    # ------------------------------------------------------------------ setup
    def setup(self, ds_config: dict) -> None:
        from wsshm.data import build_loader
        torch.manual_seed(self.args.seed)
        net = self.stage.network()
        self.stage.prepare(self.device, net)
        view = TrainingView(net)
        self.engine, _, _, _ = deepspeed.initialize(model=view, model_parameters=view.parameters(),
                                                    config=ds_config)
        if self.args.compile != "off":
            self.compile_networks()
        self.discards_non_finite = self.optimizer_discards_non_finite(ds_config)
        self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine._config)
        # DeepSpeed copies its zero_to_fp32.py into every checkpoint; that script unpickles without
        # weights_only, and a checkpoint someone sends should not invite running code from it.
        self.engine._copy_recovery_script = lambda save_path: None
        self.loader = build_loader(self.stage.name, **self.stage.loader_kwargs(),
                                   batch_size=ds_config["train_micro_batch_size_per_gpu"],
                                   crop_sizes=tuple(self.args.crop_sizes), rank=self.rank,
                                   world_size=self.world, device=str(self.device), backend=self.args.backend,
                                   seed=self.args.seed, num_workers=self.args.num_workers)
        if self.args.resume:
            self.resume()
        elif self.rank == 0:
            write_run_info(self.out, {**self.stage.run_info(net), "world_size": self.world,
                                      "batch_size": self.args.batch_size, "steps": self.args.steps})
        # The stop flag travels over gloo between the ranks' CPUs: asking it every step then never
        # waits for the GPU's queue of work, as an all-reduce of a CUDA tensor read back would.
        self.control_group = dist.new_group(backend="gloo")
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def compile_networks(self) -> None:
        """``--compile``: DeepSpeed compiles its module in place (checkpoints and exports keep their
        names), the stage its other networks. ``dynamic=False``: one graph per crop size, each with
        kernels chosen for its shapes; the student and its teacher share the network's code, so the
        recompile limit must hold two graphs per size."""
        from wsshm.data.params import candidate_sizes
        graphs = 2 * len(candidate_sizes(self.args.crop_sizes)) + 2
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
        self.engine.compile(backend=self.args.compile, compile_kwargs={"dynamic": False})
        self.stage.compile(self.args.compile)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        step = self.engine.global_steps
        client_state = {
            "wsshm": {"stage": self.stage.name, "step": step},
            "loader": _all_gather(self.loader.state_dict()),
            "rng": _all_gather(torch.get_rng_state()),
            **self.stage.extra_state(),
        }
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{step:08d}", client_state=client_state)
        dist.barrier()
        if self.rank == 0:
            prune_checkpoints(self.ckpt_dir, KEEP_CHECKPOINTS)

    def resume(self) -> None:
        path, client_state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self.resume_from)
        if path is None or "wsshm" not in client_state:
            raise ConfigError(f"--resume: {self.ckpt_dir} holds no wsshm checkpoint")
        if len(client_state["loader"]) != self.world:
            raise ConfigError(f"--resume: the checkpoint was written by {len(client_state['loader'])} ranks, "
                              f"this run has {self.world}")
        try:
            self.loader.load_state_dict(client_state["loader"][self.rank])
        except ValueError as error:  # other data, weights, seed or batch than the checkpoint's
            raise ConfigError(f"--resume: {error}") from None
        torch.set_rng_state(client_state["rng"][self.rank])
        self.stage.load_extra_state(client_state)

    def export(self) -> None:
        from wsshm.models import save_weights
        net = self.engine.module.net
        # The parameters are the fp32 masters, under bf16 too (autocast; wsshm.train.options).
        params = list(net.parameters())
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if self.engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
        with gather:
            if self.rank == 0:
                meta = {"stage": self.stage.name, "steps": str(self.engine.global_steps)}
                save_weights(net, self.out / STAGE_DEFAULTS[self.stage.name].weights_name, metadata=meta)
                for name, extra in self.stage.exports().items():
                    save_weights(extra, self.out / name, metadata=meta)
        dist.barrier()

    # ------------------------------------------------------------------ loop
    def average_buffers(self) -> None:
        """Average BatchNorm's running statistics over the ranks after each step.

        DeepSpeed, unlike DDP, leaves buffers per rank and checkpoints only rank 0's, so without this
        a resumed rank 1 would continue from rank 0's statistics (and an EMA teacher would differ
        between ranks). The running mean and variance are linear in the batch statistics, so their
        mean over ranks is the running statistic of all ranks' batches."""
        if self.world == 1:
            return
        buffers = [b for b in self.engine.module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = _flatten_dense_tensors([b.float() for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world
        for buffer, mean in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            buffer.copy_(mean)

    def agree_stop(self) -> bool:
        """All ranks: did any rank get SIGTERM? Asked before the next batch is fetched, because a
        signal sent to the whole process group may also have ended the loader's workers."""
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, group=self.control_group)
        return flag.item() > 0

    def agree_loss(self, loss: torch.Tensor) -> tuple[float, bool]:
        """All ranks: (mean loss, whether any rank's loss is non-finite). Reads back from the GPU."""
        local = loss.detach().float().reshape(())
        flags = torch.stack([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0),
                             (~torch.isfinite(local)).float()])
        dist.all_reduce(flags)
        total, bad = flags.tolist()
        return total / self.world, bad > 0

    @staticmethod
    def optimizer_discards_non_finite(ds_config: dict) -> bool:
        """Whether DeepSpeed's optimizer itself skips an update whose gradient norm is not finite
        (leaving weights, optimizer state and schedule alone): ZeRO 1-3 compute that norm, unless a
        config turns it off for stages 1-2; stage 0 does not. SuperOffload and ZenFlow update during
        the backward pass, before the norm is known, so they are left to wsshm's own check."""
        zero = ds_config.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        if zero.get("zenflow") or (zero.get("offload_optimizer") or {}).get("super_offload"):
            return False
        return stage == 3 or (stage in (1, 2) and zero.get("compute_grad_norm", True))

    def step(self):
        """One training step on the next batch: ``(StepOutput, applied)``. A step whose loss is
        non-finite on any rank (or, when DeepSpeed checks, whose gradient is) makes no update on any
        rank, and still counts as a step, as DeepSpeed counts the steps its optimizer skips."""
        self.engine.train()
        batch = next(self.loader)
        if self.on_gpu:  # cuDNN's NHWC kernels (tensor cores); the weights may stay NCHW
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                     for k, v in batch.items()}
        out = self.stage.step(self.engine, batch)
        if self.discards_non_finite:
            # NaN * 0 is NaN: every gradient of a non-finite loss becomes NaN, ZeRO's reductions carry
            # it to every rank, and each rank's optimizer sees the same non-finite norm.
            finite = torch.isfinite(out.loss.detach())
            self.engine.backward(out.loss * torch.where(finite, 1.0, math.nan))
            self.engine.step()
            applied = self.engine.was_step_applied()
        else:
            applied = not self.agree_loss(out.loss)[1]
            if applied:
                self.engine.backward(out.loss)
                self.engine.step()
            else:  # counted as DeepSpeed counts a step its own optimizer skips
                self.engine.global_steps += 1
                self.engine.global_samples += self.engine.train_batch_size()
                self.engine.skipped_steps += 1
        if applied:
            self.average_buffers()
            self.stage.after_step(self.engine)
        return out, applied

    def log(self, monitor: Monitor, step: int, out, lr: float, seconds: float) -> None:
        """The progress bar every step; on logging steps the loss (the only time the loop reads it
        back from the GPU), the stage's terms and, every ``--image-every`` steps, pictures."""
        log_now = step % self.args.log_every == 0
        loss = self.agree_loss(out.loss)[0] if log_now else None
        terms = self.stage.terms(out.view) if log_now and self.rank == 0 else {}
        monitor.step(step, loss, terms, lr, self.args.batch_size / max(seconds, 1e-9), log=log_now)
        if self.args.image_every and step % self.args.image_every == 0 and self.rank == 0:
            monitor.images(step, self.stage.pictures(out.view))

    def train(self) -> int:
        monitor = Monitor(self.out / "tb", self.out / "loss.csv", enabled=self.rank == 0,
                          total=self.args.steps, initial=self.engine.global_steps, desc=self.stage.name)
        last_saved = self.engine.global_steps if self.args.resume else -1
        tick = time.perf_counter()
        try:
            while self.engine.global_steps < self.args.steps:
                if self.agree_stop():
                    step = self.engine.global_steps
                    if step != last_saved:
                        self.save()
                    if self.rank == 0:
                        print(f"wsshm {self.stage.name}: SIGTERM: saved step {step} in {self.ckpt_dir}; "
                              f"continue with --resume", file=sys.stderr, flush=True)
                    return EXIT_TERMINATED
                lr = self.engine.get_lr()[0]
                out, applied = self.step()
                step = self.engine.global_steps
                if applied:
                    self.bad_in_a_row = 0
                    self.log(monitor, step, out, lr, time.perf_counter() - tick)
                else:
                    self.bad_in_a_row += 1
                    if self.rank == 0:
                        warnings.warn(f"step {step}: non-finite loss or gradients, no update "
                                      f"({self.bad_in_a_row} in a row, limit {self.args.max_bad_steps})")
                    if self.bad_in_a_row >= self.args.max_bad_steps:
                        if self.rank == 0:
                            print(f"wsshm {self.stage.name}: error: {self.bad_in_a_row} steps in a row without an "
                                  f"update (non-finite loss or gradients) at step {step}; stopping (lower --lr, "
                                  f"check the data, or resume from {self.ckpt_dir})", file=sys.stderr, flush=True)
                        return EXIT_NON_FINITE
                del out
                tick = time.perf_counter()
                if self.args.save_every and step % self.args.save_every == 0:
                    self.save()
                    last_saved = step
            if self.engine.global_steps != last_saved:
                self.save()
            self.export()
        finally:
            try:
                monitor.close()
            finally:
                # Before the interpreter exits: its atexit hook stops leftover workers with SIGTERM,
                # which they ignore (see the torch loader), and would wait for them forever.
                self.loader.close()
        return 0


def main(stage_name: str, argv: list[str] | None = None, default_config: str | None = None) -> int:
    args = build_parser(stage_name, default_config).parse_args(argv)
    _ensure_distributed_env()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    trainer = Trainer(STAGES[stage_name](args), args)
    try:
        ds_config = trainer.checked_config()
        try:
            trainer.setup(ds_config)
        except ConfigError as error:  # found only once the checkpoint is open (all ranks see it)
            if trainer.rank == 0:
                print(f"wsshm {stage_name}: error: {error}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        return trainer.train()
    finally:
        if dist.is_initialized():
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        if trainer.ranks_met:
            _remove_shared_allreduce_buffer(trainer.rank)
