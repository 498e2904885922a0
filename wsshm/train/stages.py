"""The three stages of the paper's recipe, as plug-ins of the one engine in ``engine.py``.

A stage says which network is trained, which loader feeds it, how a batch becomes a loss, what to
log, and what extra state (the EMA teacher) a checkpoint must carry. The losses are
``wsshm.kernels``' (fused on a GPU; it runs the ``wsshm.losses`` reference on a CPU).
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from wsshm import losses
from wsshm.image import denormalize
from wsshm.kernels import fused_student_loss, fused_teacher_loss
from wsshm.models.outputs import forward_maps, has_logits, probabilities
from wsshm.train.options import DEFAULT_ARCH, ConfigError

BOUNDARY_HEAD = "boundary_head."  # parameter-name prefix of MattingNet's boundary head


# ----------------------------------------------------------------------------- networks
class TrainingView(nn.Module):
    """What DeepSpeed wraps: ``forward`` returns ``(matte, boundary or None)``, as logits when the
    network has them (``self.from_logits``). The network stays reachable as ``.net`` for export and EMA."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.from_logits = has_logits(net)

    def forward(self, x: Tensor):
        return forward_maps(self.net, x, logits=self.from_logits)


def load_weights_checked(path: str, what: str) -> nn.Module:
    """``wsshm.models.load_weights`` with its error turned into a one-line ``ConfigError``."""
    from wsshm.models import load_weights
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        return load_weights(path, map_location="cpu")
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise ConfigError(f"{what} {path}: {error}".replace("\n", " ")) from None


def build_network(args) -> nn.Module:
    """``--init`` weights (checked against ``--arch``), else a fresh ``--arch`` network."""
    from wsshm.models import build_model, canonical_arch
    try:
        arch = canonical_arch(args.arch or DEFAULT_ARCH)
    except ValueError as error:
        raise ConfigError(f"--arch {args.arch}: {error}") from None
    if args.init:
        net = load_weights_checked(args.init, "--init")
        if args.arch and getattr(net, "arch", None) != arch:
            raise ConfigError(f"--init {args.init} holds a '{getattr(net, 'arch', '?')}' network, "
                              f"not the --arch '{arch}' asked for")
        return net
    return build_model(arch)


# ----------------------------------------------------------------------------- stages
@dataclass
class StepOutput:
    loss: Tensor
    view: dict[str, Tensor] = field(default_factory=dict)  # detached maps for terms and pictures


class Stage(abc.ABC):
    name = ""  # also the loader form (wsshm.data) and the launch script's stage
    # bf16 under --precision bf16 (set by the trainer): DeepSpeed autocasts the trained network's
    # forward; a stage autocasts its other networks with ``self.autocast`` (None: fp32)
    autocast_dtype: torch.dtype | None = None

    def __init__(self, args):
        self.args = args
        self._network: nn.Module | None = None

    def check(self) -> None:
        """Rank 0, before anything else: raise ``ConfigError`` on a mistake."""
        from wsshm.data.params import candidate_sizes
        try:
            candidate_sizes(self.args.crop_sizes)
        except ValueError as error:
            raise ConfigError(f"--crop-sizes {' '.join(map(str, self.args.crop_sizes))}: {error}") from None
        if self.args.steps <= 0:
            raise ConfigError(f"--steps {self.args.steps}: must be positive")
        self.network()

    def check_shards(self, folder: str, option: str, kind: str, num_samples: int | None = None) -> None:
        """The shard folder given as ``option`` as ``wsshm.shards.check_folder`` sees it and, under
        ``--check-shards sha256``, every shard's sha256 against its manifest (one read of the data);
        a problem is a one-line ``ConfigError`` naming the option."""
        from wsshm.shards import ShardFolderError, check_checksums, check_folder
        try:
            check_folder(folder, kind, num_samples)
        except ShardFolderError as error:
            raise ConfigError(f"{option} {error}") from None
        # the DALI loader runs the full verify (checksums included) itself: it cannot skip a bad sample
        if self.args.check_shards != "sha256" or self.args.backend == "dali":
            return
        problems = check_checksums(folder)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"{option} {problems[0]}{more}; convert the data again, or skip this check "
                              f"with --check-shards off")

    def network(self) -> nn.Module:
        """The trained network, built once per process (rank 0 builds it while checking), from
        ``--seed`` and without touching the global random state."""
        if self._network is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.args.seed)
                self._network = self.build_network()
        return self._network

    def build_network(self) -> nn.Module:
        return build_network(self.args)

    def check_seg(self) -> None:
        """Every ``--seg`` folder (``--num-seg`` subsets the first) and the ``--seg-weights``."""
        from wsshm.data.mixing import check_weights
        try:
            check_weights(self.args.seg, self.args.seg_weights)
        except ValueError as error:
            raise ConfigError(f"--seg-weights: {error}") from None
        for i, folder in enumerate(self.args.seg):
            self.check_shards(folder, "--seg", "seg", self.args.num_seg if i == 0 else None)

    def seg_loader_kwargs(self) -> dict:
        return {"seg": self.args.seg, "seg_weights": self.args.seg_weights, "num_samples": self.args.num_seg}

    @abc.abstractmethod
    def loader_kwargs(self) -> dict:
        """Which shard folders and options ``build_loader`` gets for this stage."""

    def autocast(self, device: torch.device):
        """The training precision for a forward outside the DeepSpeed engine."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare(self, device: torch.device, trained: nn.Module) -> None:
        """Build what the stage needs beside the trained network (the frozen teacher)."""

    def compile(self, backend: str) -> None:
        """``torch.compile`` the networks ``prepare`` built (the trained one is the engine's)."""

    @abc.abstractmethod
    def step(self, engine, batch: dict) -> StepOutput:
        """Forward and loss of one batch (fp32 inputs; the engine autocasts under bf16)."""

    def after_step(self, engine) -> None:
        """Runs after each optimizer step (EMA)."""

    def terms(self, view: dict[str, Tensor]) -> dict[str, float]:
        return {}

    def pictures(self, view: dict[str, Tensor]) -> list[Tensor]:
        return []

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def exports(self) -> dict[str, nn.Module]:
        """Extra weight files to write at the end (name -> network)."""
        return {}

    def run_info(self, trained: nn.Module) -> dict:
        return {"stage": self.name, "arch": getattr(trained, "arch", type(trained).__name__)}


def _rgb(x: Tensor) -> Tensor:
    return denormalize(x.float())


def _grey(x: Tensor) -> Tensor:
    return x.float().clamp(0, 1).expand(-1, 3, -1, -1)


class PretrainStage(Stage):
    """Stage 0: segmentation pre-training with ``pretrain_loss`` (MSE against the mask)."""
    name = "pretrain"

    def check(self) -> None:
        self.check_seg()
        if self.args.encoder_weights and not Path(self.args.encoder_weights).is_file():
            raise ConfigError(f"--encoder-weights {self.args.encoder_weights}: no such file")
        super().check()

    def build_network(self) -> nn.Module:
        net = build_network(self.args)
        if self.args.encoder_weights:
            from wsshm.models import load_torchvision_encoder
            path = self.args.encoder_weights
            try:
                load_torchvision_encoder(net, _read_state_dict(path))
            except Exception as error:  # noqa: BLE001 - a broken or foreign file, in one line
                raise ConfigError(f"--encoder-weights {path}: {str(error).splitlines()[0]}") from None
        return net

    def loader_kwargs(self) -> dict:
        return self.seg_loader_kwargs()

    def step(self, engine, batch):
        matte, _ = engine(batch["image"])
        P = probabilities(matte, engine.module.from_logits)
        return StepOutput(losses.pretrain_loss(P, batch["mask"]),
                          {"image": batch["image"], "mask": batch["mask"], "pred": P.detach()})

    def terms(self, view):
        return {"mse": float(losses.mse_loss(view["pred"], view["mask"]))}

    def pictures(self, view):
        return [_rgb(view["image"]), _grey(view["mask"]), _grey(view["pred"])]


class TeacherStage(Stage):
    """Stage 1: the teacher on synthetic composites with ``teacher_loss`` (eq. 2)."""
    name = "teacher"

    def check(self) -> None:
        self.check_shards(self.args.matte, "--matte", "matte", self.args.num_matte)
        self.check_shards(self.args.background, "--background", "background")
        super().check()

    def loader_kwargs(self) -> dict:
        return {"matte": self.args.matte, "background": self.args.background,
                "num_samples": self.args.num_matte}

    def step(self, engine, batch):
        matte, boundary = engine(batch["image"])
        if boundary is None:
            raise ValueError("the teacher must return (matte, boundary)")
        from_logits = engine.module.from_logits
        loss = fused_teacher_loss(matte, boundary, batch["alpha"], lam=self.args.lam, from_logits=from_logits)
        return StepOutput(loss, {"image": batch["image"], "alpha": batch["alpha"],
                                 "pred": probabilities(matte.detach(), from_logits),
                                 "boundary": probabilities(boundary.detach(), from_logits)})

    def terms(self, view):
        return {"mse": float(losses.mse_loss(view["pred"], view["alpha"])),
                "grad": float(losses.grad_loss(view["pred"], view["alpha"])),
                "boundary_l1": float((losses.boundary_mask(view["alpha"]) - view["boundary"]).abs().mean())}

    def pictures(self, view):
        return [_rgb(view["image"]), _grey(view["alpha"]), _grey(view["pred"]),
                _grey(losses.boundary_mask(view["alpha"])), _grey(view["boundary"])]


class StudentStage(Stage):
    """Stage 2: frozen teacher on the weak view, MLB label, student on the strong view, EMA."""
    name = "student"

    def __init__(self, args):
        super().__init__(args)
        self.teacher: nn.Module | None = None
        self.ema = None

    @property
    def threshold(self) -> float | None:
        return None if self.args.mlb_threshold < 0 else self.args.mlb_threshold

    def check(self) -> None:
        self.check_seg()
        teacher = self.frozen_teacher()
        super().check()
        student = self.network()
        same = getattr(teacher, "arch", None) is not None and teacher.arch == getattr(student, "arch", None)
        if self.args.ema == "on" and not same:
            raise ConfigError(f"--ema on needs the same architecture, but the teacher is "
                              f"'{getattr(teacher, 'arch', '?')}' and the student '{getattr(student, 'arch', '?')}'")

    def loader_kwargs(self) -> dict:
        return self.seg_loader_kwargs()

    @property
    def trains_boundary(self) -> bool:
        return self.args.student_boundary != "off"

    def frozen_teacher(self) -> nn.Module:
        """The ``--teacher`` weights, read once per process (rank 0 reads them while checking)."""
        if self.teacher is None:
            self.teacher = load_weights_checked(self.args.teacher, "--teacher")
        return self.teacher

    def prepare(self, device, trained):
        teacher = self.frozen_teacher().to(device)
        teacher.eval().requires_grad_(False)
        same = getattr(teacher, "arch", None) == getattr(trained, "arch", None)
        if same and self.trains_boundary:
            # Stage 0 never trains a boundary head; start the student's from the teacher's, so that
            # the EMA averages trained heads into the teacher's from the first step.
            heads = {k: v for k, v in teacher.state_dict().items() if k.startswith(BOUNDARY_HEAD)}
            trained.load_state_dict(heads, strict=False)
        if self.args.ema == "on" or (self.args.ema == "auto" and same):
            from wsshm.ema import ModelEMA
            # A boundary head the student does not train must not be averaged into the teacher's.
            keep = (BOUNDARY_HEAD,) if self.args.ema_scope == "trained" and not self.trains_boundary else ()
            self.ema = ModelEMA(teacher, momentum=self.args.ema_momentum, keep=keep)
        self.teacher = teacher  # fp32 like the trained network; bf16 compute through self.autocast

    def compile(self, backend):
        # in place: the EMA keeps updating the same parameters, and the export's names stay
        self.teacher.compile(backend=backend, dynamic=False)

    def step(self, engine, batch):
        with torch.no_grad(), self.autocast(batch["weak"].device):
            Mt, At = forward_maps(self.teacher, batch["weak"])
        seen = batch["strong"] if self.args.strong_view == "on" else batch["weak"]
        matte, boundary = engine(seen)
        from_logits = engine.module.from_logits
        trained_boundary = boundary if self.trains_boundary else None
        loss = fused_student_loss(matte, Mt, At, batch["mask"], threshold=self.threshold, from_logits=from_logits,
                                  Q=trained_boundary, lam=self.args.lam)
        view = {"image": seen, "weak": batch["weak"], "mask": batch["mask"], "teacher": Mt.float(),
                "boundary": At.float(), "pred": probabilities(matte.detach(), from_logits)}
        if trained_boundary is not None:
            view["pred_boundary"] = probabilities(trained_boundary.detach(), from_logits)
        return StepOutput(loss, view)

    def after_step(self, engine):
        if self.ema is None:
            return
        student = engine.module.net
        if engine.zero_optimization_stage() == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
                self.ema.update(student)
        else:
            self.ema.update(student)

    def _label(self, view):
        return losses.mlb_blend(view["teacher"], view["boundary"], view["mask"], self.threshold)

    def terms(self, view):
        label = self._label(view)
        taken = view["boundary"] if self.threshold is None else (view["boundary"] > self.threshold).float()
        terms = {"mse": float(losses.mse_loss(view["pred"], label)),
                 "grad": float(losses.grad_loss(view["pred"], label)),
                 "teacher_vs_mask": float(losses.mse_loss(view["teacher"], view["mask"])),
                 "teacher_share": float(taken.mean())}  # share of pixels where the blend takes Mt
        if "pred_boundary" in view:
            terms["boundary_l1"] = float((losses.boundary_mask(label) - view["pred_boundary"]).abs().mean())
        return terms

    def pictures(self, view):
        return [_rgb(view["weak"]), _grey(view["teacher"]), _grey(view["boundary"]),
                _grey(self._label(view)), _grey(view["pred"])]

    def extra_state(self):
        if self.ema is None:
            return {}
        return {"ema": self.ema.state_dict()}

    def load_extra_state(self, state):
        if self.ema is None:
            return
        if "ema" not in state:
            raise ConfigError("the checkpoint has no EMA state, but this run updates the teacher by EMA")
        self.ema.load_state_dict(state["ema"])  # also writes the averaged weights into the teacher

    def exports(self):
        return {"teacher-ema.safetensors": self.teacher} if self.ema is not None else {}

    def run_info(self, trained):
        info = super().run_info(trained)
        info.update(teacher=self.args.teacher, teacher_arch=getattr(self.teacher, "arch", None),
                    ema=self.ema is not None)
        return info


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


STAGES = {"pretrain": PretrainStage, "teacher": TeacherStage, "student": StudentStage}
