"""The fused per-pixel image op: decoded uint8 HWC crops -> normalised NCHW training tensors.

One call does, per pixel: compositing ``I = a*Fg + (1-a)*Bg`` (paper eq. 1, teacher form), the
plain (weak) view, and the colour-jittered (strong) view with per-sample parameters, each normalised
with the ImageNet statistics of ``wsshm.image``. ``fused_prepare`` runs the operator
``torch.ops.wsshm.fused_prepare`` (CPU and CUDA kernels in ``csrc/augment.cpp``, built into
``wsshm._C``; its fake implementation below lets ``torch.compile`` trace it without a graph break);
``fused_prepare_reference`` is the same math in plain torch ops, the definition the C++ and CUDA paths
are tested against.

Colour jitter (strong view), in this fixed order, per sample with factors ``[B, 4]``:
brightness ``x*b``; contrast ``c*x + (1-c)*mean(grey(x))`` (mean over the image); saturation
``s*x + (1-s)*grey(x)``; hue: rotate the HSV hue by ``h`` turns. Each step clamps to [0, 1]; grey is
torchvision's, with ``wsshm.image.GREY_WEIGHTS``. These are torchvision's ``adjust_*`` formulas. The
op takes the mean, std and grey weights as arguments, so ``wsshm.image`` is their one home.
"""
from __future__ import annotations

import torch
from torch import Tensor

from wsshm import _C  # noqa: F401  (loading it registers torch.ops.wsshm)
from wsshm.image import GREY_WEIGHTS, IMAGENET_MEAN, IMAGENET_STD


def _check_dtype(dtype: torch.dtype) -> bool:
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fused_prepare: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return dtype == torch.bfloat16


def fused_prepare(image: Tensor, alpha: Tensor | None = None, background: Tensor | None = None,
                  jitter: Tensor | None = None, *, plain: bool = True,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor | None]:
    """uint8 ``[B,H,W,3]`` crops -> ``(plain, strong)`` normalised ``[B,3,H,W]`` (None if not asked).

    ``alpha`` uint8 ``[B,H,W]`` and ``background`` uint8 ``[B,H,W,3]`` composite ``image`` (the
    foreground) over the background first; ``jitter`` float32 ``[B,4]`` (brightness, contrast,
    saturation factors and hue shift in turns) asks for the strong view.
    """
    bf16 = _check_dtype(dtype)
    if alpha is not None and alpha.dim() == 4:
        alpha = alpha.squeeze(-1)
    plain_out, strong_out = torch.ops.wsshm.fused_prepare(image, alpha, background, jitter, plain, bf16,
                                                          IMAGENET_MEAN, IMAGENET_STD, GREY_WEIGHTS)
    return (plain_out if plain else None), (strong_out if jitter is not None else None)


@torch.library.register_fake("wsshm::fused_prepare")
def _fused_prepare_fake(image, alpha, background, jitter, plain, bf16, mean, std, grey):
    """The op's outputs without computing them, for tracing: a view not asked for is empty."""
    batch, height, width, _ = image.shape
    dtype = torch.bfloat16 if bf16 else torch.float32
    shape = lambda wanted: (batch, 3, height, width) if wanted else (0,)  # noqa: E731
    return image.new_empty(shape(plain), dtype=dtype), image.new_empty(shape(jitter is not None), dtype=dtype)


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def _rotate_hue(x: Tensor, shift: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = h / 6.0 + shift.view(-1, 1, 1)
    h = h - torch.floor(h)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    v = maxc
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = []
    for c in range(3):
        stacked = torch.stack([choice[c] for choice in choices], dim=1)
        out.append(stacked.gather(1, i.unsqueeze(1)).squeeze(1))
    rotated = torch.stack(out, dim=1)
    return torch.where((delta > 0).unsqueeze(1), rotated, x)


def color_jitter_reference(x: Tensor, jitter: Tensor) -> Tensor:
    """Float RGB ``[B,3,H,W]`` in [0, 1] -> jittered, with per-sample factors ``[B, 4]``."""
    factor = jitter.float()
    col = lambda k: factor[:, k].view(-1, 1, 1, 1)  # noqa: E731
    x = (x * col(0)).clamp(0, 1)
    mean = _grey(x).mean(dim=(2, 3), keepdim=True)
    x = (col(1) * x + (1 - col(1)) * mean).clamp(0, 1)
    x = (col(2) * x + (1 - col(2)) * _grey(x)).clamp(0, 1)
    return _rotate_hue(x, factor[:, 3])


def fused_prepare_reference(image: Tensor, alpha: Tensor | None = None, background: Tensor | None = None,
                            jitter: Tensor | None = None, *, plain: bool = True,
                            dtype: torch.dtype = torch.float32) -> tuple[Tensor | None, Tensor | None]:
    """The same op as :func:`fused_prepare` in plain torch ops (its definition and baseline)."""
    _check_dtype(dtype)
    if (alpha is None) != (background is None):
        raise ValueError("fused_prepare: alpha and background go together (compositing needs both)")
    x = image.permute(0, 3, 1, 2).float() / 255.0
    if alpha is not None:
        a = alpha.reshape(alpha.shape[0], 1, *alpha.shape[1:3]).float() / 255.0
        x = (a * image.permute(0, 3, 1, 2).float() + (1 - a) * background.permute(0, 3, 1, 2).float()) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    normalise = lambda t: ((t - mean) * inv_std).to(dtype).contiguous()  # noqa: E731
    strong = normalise(color_jitter_reference(x, jitter)) if jitter is not None else None
    return (normalise(x) if plain else None), strong
