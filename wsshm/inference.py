"""The SPEC's test-time protocol: resize so the shorter side is 512 with both sides multiples of 32,
predict, and resize the matte back bilinearly to the image's own size.

Used by evaluation (``wsshm-eval``), prediction (``wsshm-predict``) and the demo, so that every
number and every picture comes from the same resizing.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsshm.image import normalize_uint8
from wsshm.models import split_output

SHORT_SIDE = 512  # SPEC: the shorter side at test time
MULTIPLE = 32  # SPEC: both test-time sides are multiples of this


def test_time_size(h: int, w: int, short_side: int = SHORT_SIDE, multiple: int = MULTIPLE) -> tuple[int, int]:
    """Network input size for an ``h x w`` image.

    Scale so the shorter side becomes ``short_side``, then round each side to the nearest multiple
    of ``multiple`` (halves round up) and to at least ``multiple``. A 1080x1920 photo becomes
    512x896 (910.2 rounds to 896); a 500x333 one becomes 768x512.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = short_side / min(h, w)

    def snap(side: int) -> int:
        return max(multiple, int(math.floor(side * scale / multiple + 0.5)) * multiple)

    return snap(h), snap(w)


test_time_size.__test__ = False  # not a pytest test, though test files import it by this name


def network_input(image: np.ndarray, short_side: int = SHORT_SIDE,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """A uint8 RGB ``H x W x 3`` image as the network sees it at test time: normalised float
    ``[1, 3, h, w]`` at ``test_time_size``."""
    x = normalize_uint8(torch.tensor(image, device=device))  # a copy: decoded images may be read-only
    size = test_time_size(*image.shape[:2], short_side=short_side)
    # antialias keeps large photos from aliasing when they are shrunk to 512
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def default_device(name: str | None = None) -> torch.device:
    """``name`` (e.g. a ``--device`` option) or, when it is ``None``, CUDA when available, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# --precision of the command-line tools that run a network on photos: the autocast dtype (None: fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, else one line saying why."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--batch-size``, ``--precision``, ``--short-side`` of ``wsshm-predict`` and
    ``wsshm-pseudo-label``; :func:`runtime` resolves their defaults."""
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 16 on GPU, 1 on CPU")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                        help="network compute precision; default fp16 on GPU, fp32 on CPU")
    parser.add_argument("--short-side", type=positive_int, default=SHORT_SIDE,
                        help=f"test-time shorter side (SPEC: {SHORT_SIDE})")


def runtime(args) -> tuple[torch.device, int, str]:
    """``(device, batch size, precision name)`` from :func:`add_runtime_options`' options."""
    device = default_device(args.device)
    on_gpu = device.type == "cuda"
    return device, args.batch_size or (16 if on_gpu else 1), args.precision or ("fp16" if on_gpu else "fp32")


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _predict_batch(model: nn.Module, images: Sequence[np.ndarray], short_side: int,
                   device: torch.device, dtype: torch.dtype | None) -> list[np.ndarray]:
    """Mattes of images that share a test-time size, in one network call."""
    batch = torch.cat([network_input(image, short_side, device) for image in images])
    autocast = (torch.autocast(device.type, dtype=dtype)
                if dtype is not None and dtype != torch.float32 else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        mattes = split_output(model(batch))[0].float()
    out = []
    for matte, image in zip(mattes, images):
        back = F.interpolate(matte[None], size=image.shape[:2], mode="bilinear", align_corners=False)
        out.append(back[0, 0].clamp_(0, 1).cpu().numpy())
    return out


def _check_image(image: np.ndarray, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image {index}: expected uint8 H x W x 3 RGB, got {desc}")


def predict_mattes(model: nn.Module, images: Sequence[np.ndarray], short_side: int = SHORT_SIDE,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   batch_size: int = 8) -> list[np.ndarray]:
    """Mattes (float32 ``H x W`` in [0, 1], each at its image's size) for uint8 RGB ``H x W x 3``
    images, in input order. Images that share a test-time size are batched together
    (``batch_size`` at most). ``device`` defaults to the model's; ``dtype`` bf16/fp16 runs the
    network under autocast."""
    for index, image in enumerate(images):
        _check_image(image, index)
    device = torch.device(device) if device is not None else _model_device(model)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(test_time_size(*image.shape[:2], short_side=short_side), []).append(index)
    results: list[np.ndarray | None] = [None] * len(images)
    with _eval_mode(model):
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                mattes = _predict_batch(model, [images[i] for i in chunk], short_side, device, dtype)
                for i, matte in zip(chunk, mattes):
                    results[i] = matte
    return results  # type: ignore[return-value]


def predict_matte(model: nn.Module, image_uint8_hwc: np.ndarray, short_side: int = SHORT_SIDE,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> np.ndarray:
    """The matte of one uint8 RGB ``H x W x 3`` image: float32 ``H x W`` in [0, 1]."""
    return predict_mattes(model, [image_uint8_hwc], short_side=short_side, device=device, dtype=dtype)[0]
