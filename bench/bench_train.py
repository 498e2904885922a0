"""Whole training steps in images/s: wsshm's teacher and student stages against plain PyTorch.

    .venv/bin/python bench/bench_train.py            # CUDA: unet_r18_w0.5 and unet_r101, 512 crops, batch 16
    .venv/bin/python bench/bench_train.py --quick    # anywhere (the default without CUDA): tiny sizes

A step: the next batch from the loader, forward, loss, backward, optimizer step (and the student's EMA
of the teacher). Per stage and network, in one run on the same shard files:

* wsshm: the stage built from its command line (``wsshm.train.options``), set up by ``Trainer.setup``
  (DeepSpeed engine, ``build_loader``), then ``Trainer.train``'s loop body without logs and checkpoints;
  ``--precision auto``: bf16 autocast on a GPU, fp32 on a CPU.
* baseline, as a user would write it: eager fp32; a torch DataLoader whose workers read the same tars
  with ``tarfile``, decode with PIL and augment with torch ops (random scaled crop, flip, compositing
  for the teacher, colour jitter for the student's strong view); ``wsshm.losses``' reference losses;
  ``torch.optim.AdamW`` with the DeepSpeed config's gradient clipping (1.0).
* loader: wsshm's loader alone, and its rate over the wsshm step's (above 1: it keeps up).

Rates are total images over total time after untimed warm-up steps (the clock read after a CUDA
synchronisation); peak memory is CUDA's ``max_memory_allocated`` above what was allocated before.
"""
from __future__ import annotations

import argparse
import gc
import io
import logging
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

# Before deepspeed is imported: which accelerator it picks (the Makefile exports the same).
_CUDA = torch.cuda.is_available()
os.environ.setdefault("DS_ACCELERATOR", "cuda" if _CUDA else "cpu")
os.environ.setdefault("TRITON_INTERPRET", "0" if _CUDA else "1")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, RandomSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsshm import losses  # noqa: E402
from wsshm.data import build_loader  # noqa: E402
from wsshm.data.prepare import color_jitter_reference  # noqa: E402  (torchvision's adjust_* formulas)
from wsshm.image import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from wsshm.models import build_model, load_weights, save_weights  # noqa: E402
from wsshm.train.engine import Trainer, _ensure_distributed_env  # noqa: E402
from wsshm.train.launch import CPU_THREADS  # noqa: E402
from wsshm.train.options import build_parser  # noqa: E402
from wsshm.train.stages import BOUNDARY_HEAD, STAGES  # noqa: E402

STAGE_ORDER = ("teacher", "student")


# ----------------------------------------------------------------------------- timing
def images_per_s(fn, batch: int, warmup: int, count: int, device: torch.device) -> tuple[float, float]:
    """Throughput of ``count`` calls after ``warmup`` untimed ones: total images over total time (not
    a median step: with several workers a loader-bound pipeline delivers batches in bursts, and its
    median step would be one that did not wait), and the seconds of the warm-up (``--compile``'s
    compilation happens there)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count * batch / (time.perf_counter() - start), warm


class PeakMemory:
    """CUDA's peak allocation in a block above what was allocated when it began, in GiB (None on a CPU)."""

    def __init__(self, device: torch.device):
        self.cuda, self.gib = device.type == "cuda", None

    def __enter__(self):
        if self.cuda:
            gc.collect()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.gib = (torch.cuda.max_memory_allocated() - self.before) / 2**30


# ----------------------------------------------------------------------------- wsshm
def stage_argv(stage: str, arch: str, data: dict, teacher: str, out: str, args) -> list[str]:
    """The stage's command line; --steps only shapes the learning-rate schedule here."""
    argv = ["--out", out, "--arch", arch, "--crop-sizes", str(args.crop), "--batch-size", str(args.batch),
            "--steps", str(args.warmup + args.steps), "--num-workers", str(args.workers),
            "--precision", args.precision, "--check-shards", "off", "--save-every", "0", "--image-every", "0",
            "--compile", args.compile]
    argv += ["--zero-stage", str(args.zero_stage)] if args.zero_stage is not None else []
    if stage == "teacher":
        return argv + ["--matte", data["matte"], "--background", data["background"]]
    return argv + ["--seg", data["seg"], "--teacher", teacher]


def run_wsshm(stage_name: str, argv: list[str], args, device) -> tuple[float, float, float, float | None]:
    """(step images/s, warm-up seconds, loader-alone images/s, peak GiB) of the real stage under DeepSpeed."""
    stage = STAGES[stage_name](build_parser(stage_name).parse_args(argv))
    trainer = Trainer(stage, stage.args)
    with PeakMemory(device) as peak:
        trainer.setup(trainer.checked_config())

        def step():  # Trainer.train's loop body, less the monitor, the images and the checkpoints
            trainer.agree_stop()
            trainer.step()

        rate, warm = images_per_s(step, args.batch, args.warmup, args.steps, device)
        trainer.loader.close()
    del trainer.engine, step
    # The loader alone, as Trainer.setup builds it.
    loader = build_loader(stage_name, **stage.loader_kwargs(), batch_size=args.batch, crop_sizes=(args.crop,),
                          device=str(trainer.device), num_workers=args.workers, seed=stage.args.seed)
    loader_rate, _ = images_per_s(lambda: next(loader), args.batch, 2, args.loader_batches, device)
    loader.close()
    return rate, warm, loader_rate, peak.gib


# ----------------------------------------------------------------------------- baseline
class TarFolder:
    """The samples of a folder of tars: key -> {extension: (tar, offset, size)}, read with tarfile."""

    def __init__(self, folder: str):
        self.samples: dict[str, dict] = {}
        for path in sorted(Path(folder).glob("*.tar")):
            with tarfile.open(path) as tar:
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    self.samples.setdefault(key, {})[ext] = (path, info.offset_data, info.size)
        self.keys = sorted(self.samples)

    def image(self, index: int, exts: tuple[str, ...], mode: str) -> torch.Tensor:
        """The first of ``exts`` the sample has, decoded to float ``[C, H, W]`` in [0, 1]."""
        members = self.samples[self.keys[index]]
        path, offset, size = members[next(ext for ext in exts if ext in members)]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
        tensor = torch.from_numpy(pixels.copy()).float() / 255
        return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor[None]


def random_crop(maps: list[torch.Tensor], size: int, nearest: tuple[bool, ...]) -> list[torch.Tensor]:
    """One random square window (1/1.5 .. 1 of the shorter side, as wsshm's scale range), resized to
    ``size``, flipped half of the time; the same geometry for all ``maps``."""
    h, w = maps[0].shape[-2:]
    side = max(1, int(min(h, w) / float(torch.empty(()).uniform_(1.0, 1.5))))
    y, x = int(torch.randint(h - side + 1, ())), int(torch.randint(w - side + 1, ()))
    flip = bool(torch.rand(()) < 0.5)
    out = []
    for m, near in zip(maps, nearest):
        window = m[None, :, y:y + side, x:x + side]
        resized = (F.interpolate(window, size=(size, size), mode="nearest") if near else
                   F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
        out.append(resized[0].flip(-1) if flip else resized[0])
    return out


FG, IMAGE = ("fg.jpg", "fg.png"), ("jpg", "png")  # the members of SPEC section 5's shard kinds
MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


class BaselineDataset(Dataset):
    def __init__(self, stage: str, data: dict, size: int):
        self.stage, self.size = stage, size
        self.main = TarFolder(data["matte" if stage == "teacher" else "seg"])
        self.backgrounds = TarFolder(data["background"]) if stage == "teacher" else None

    def __len__(self):
        return len(self.main.keys)

    def __getitem__(self, i):
        if self.stage == "teacher":
            fg, alpha = random_crop([self.main.image(i, FG, "RGB"), self.main.image(i, ("alpha.png",), "L")],
                                    self.size, (False, False))
            j = int(torch.randint(len(self.backgrounds.keys), ()))
            bg, = random_crop([self.backgrounds.image(j, IMAGE, "RGB")], self.size, (False,))
            return {"image": (alpha * fg + (1 - alpha) * bg - MEAN) / STD, "alpha": alpha}
        image, mask = random_crop([self.main.image(i, IMAGE, "RGB"), self.main.image(i, ("mask.png",), "L")],
                                  self.size, (False, True))
        # brightness, contrast, saturation in [0.6, 1.4], hue in [-0.1, 0.1] turns (ColorJitter(.4,.4,.4,.1))
        jitter = torch.cat([torch.empty(1, 3).uniform_(0.6, 1.4), torch.empty(1, 1).uniform_(-0.1, 0.1)], 1)
        strong = color_jitter_reference(image[None], jitter)[0]
        return {"weak": (image - MEAN) / STD, "strong": (strong - MEAN) / STD, "mask": mask}


def run_baseline(stage: str, arch: str, data: dict, teacher_path: str, args, device) -> tuple[float, float | None]:
    """(step images/s, peak GiB) of the plain-PyTorch loop."""
    dataset = BaselineDataset(stage, data, args.crop)
    loader = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers, drop_last=True,
                        sampler=RandomSampler(dataset, replacement=True, num_samples=10**9),
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    batches = iter(loader)
    with PeakMemory(device) as peak:
        torch.manual_seed(0)
        net = build_model(arch).to(device).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
        teacher = None
        if stage == "student":
            teacher = load_weights(teacher_path).to(device).eval().requires_grad_(False)
            ema = [(t, s) for (name, t), s in zip(teacher.named_parameters(), net.parameters())
                   if not name.startswith(BOUNDARY_HEAD)]

        def step():
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            if stage == "teacher":
                matte, boundary = net(batch["image"])
                loss = losses.teacher_loss(matte, boundary, batch["alpha"], lam=0.01)
            else:
                with torch.no_grad():
                    Mt, At = teacher(batch["weak"])
                matte, _ = net(batch["strong"])
                loss = losses.student_loss(matte, Mt, At, batch["mask"], threshold=0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            if teacher is not None:
                with torch.no_grad():
                    for t, s in ema:
                        t.lerp_(s, 1 - 0.999)
            loss.item()  # a user logs the loss

        rate, _ = images_per_s(step, args.batch, args.warmup, args.steps, device)
    del batches, loader
    return rate, peak.gib


# ----------------------------------------------------------------------------- main
def shard_folders(args, tmp: str) -> dict:
    """``--data``'s matte/, background/ and seg/ as they are, else fresh demo shards in ``tmp``."""
    if args.data:
        return {kind: str(Path(args.data) / kind) for kind in ("matte", "background", "seg")}
    from wsshm.shards.demo_data import generate
    height = max(96, int(args.crop * 1.25))  # portrait, 0.75 as wide: about one crop wide
    n = 2 * args.batch
    return generate(Path(tmp) / "data", size=height, mattes=n, backgrounds=n, seg=2 * n, eval_natural=1,
                    eval_synthetic=1, workers=min(8, os.cpu_count() or 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the default without CUDA)")
    ap.add_argument("--archs", nargs="+", help="default: unet_r18_w0.5 unet_r101 (quick: unet_r18_w0.25)")
    ap.add_argument("--stages", nargs="+", choices=STAGE_ORDER, default=list(STAGE_ORDER))
    ap.add_argument("--crop", type=int, help="crop side, a multiple of 32 (default 512, quick 64)")
    ap.add_argument("--batch", type=int, help="default 16 (quick 4)")
    ap.add_argument("--warmup", type=int, help="untimed steps (default 3, quick 4)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10, quick 24)")
    ap.add_argument("--loader-batches", type=int, help="timed batches of the loader alone (default 2 x steps)")
    ap.add_argument("--workers", type=int, help="DataLoader workers of both loaders (default 8, quick 2)")
    ap.add_argument("--threads", type=int, help=f"torch threads (default: all on CUDA, {CPU_THREADS} on a CPU)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="wsshm's --precision")
    ap.add_argument("--compile", choices=["off", "inductor", "aot_eager"], default="off",
                    help="wsshm's --compile (its compilation falls in the warm-up column)")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="wsshm's --zero-stage (default: the config's)")
    ap.add_argument("--data", help="folder with matte/, background/, seg/ shard folders (default: demo shards)")
    args = ap.parse_args(argv)
    small = args.quick or not _CUDA
    # 24 steps: at toy sizes on a shared CPU a step's time moves by a third from one to the next
    defaults = dict(archs=["unet_r18_w0.25"], crop=64, batch=4, warmup=4, steps=24, workers=2) if small else \
        dict(archs=["unet_r18_w0.5", "unet_r101"], crop=512, batch=16, warmup=3, steps=10, workers=8)
    for key, value in {**defaults, "loader_batches": 2 * (args.steps or defaults["steps"])}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # On a small shared CPU, OpenMP threads wait for each other whenever the loader's workers (or
    # another job) hold a core: wsshm's own CPU runs use CPU_THREADS (wsshm.train.launch).
    if args.threads or not _CUDA:
        torch.set_num_threads(args.threads or CPU_THREADS)
    # DeepSpeed logs to stdout: its info lines (and a warning that the LR scheduler has not started
    # when the engine reads the first rate) would land inside the table.
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)

    # One process of a world of one, as the engine's main() runs without the deepspeed launcher.
    _ensure_distributed_env()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if _CUDA else torch.device("cpu")
    if _CUDA:
        torch.cuda.set_device(device)
    machine = torch.cuda.get_device_name(device) if _CUDA else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# bench_train on {machine}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), deepspeed {deepspeed.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}\n\n{args.warmup} warm-up + {args.steps} timed steps per cell, loader alone "
          f"{args.loader_batches} batches, {args.workers} DataLoader workers each; wsshm --precision "
          f"{args.precision} (auto: bf16 on CUDA, fp32 on a CPU), baseline eager fp32\n", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            data = shard_folders(args, tmp)
            print("| stage | arch | crop | batch | wsshm img/s | baseline img/s | ratio | loader img/s | "
                  "loader/step | peak mem GiB (wsshm / baseline) | wsshm warm-up s |\n"
                  "|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
            for arch in args.archs:
                teacher_path = str(Path(tmp) / f"teacher-{arch}.safetensors")
                save_weights(build_model(arch), teacher_path)  # the student stage's --teacher
                for stage in [s for s in STAGE_ORDER if s in args.stages]:
                    base, base_peak = run_baseline(stage, arch, data, teacher_path, args, device)
                    argv = stage_argv(stage, arch, data, teacher_path, str(Path(tmp) / f"run-{stage}-{arch}"), args)
                    ours, warm, loader, peak = run_wsshm(stage, argv, args, device)
                    mem = "-" if peak is None else f"{peak:.1f} / {base_peak:.1f}"
                    print(f"| {stage} | {arch} | {args.crop} | {args.batch} | {ours:.1f} | {base:.1f} | "
                          f"{ours / base:.2f}x | {loader:.1f} | {loader / ours:.2f}x | {mem} | {warm:.1f} |",
                          flush=True)
    finally:
        if torch.distributed.is_initialized():
            deepspeed.comm.destroy_process_group()
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
