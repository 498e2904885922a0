"""``fused_teacher_loss`` and ``fused_student_loss``: input checks, dispatch and the autograd Function.

Dispatch, decided here and nowhere else: CUDA tensors run the Triton kernels; CPU tensors run the
``wsshm.losses`` reference (what training on a CPU uses), except inside ``triton_on_cpu()``, which runs
the same Triton kernels on CPU tensors in Triton's interpreter, to test them without a GPU. The
interpreter is about 500x slower than the reference, so nothing else asks for it. Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, i.e. at import, so ``triton_on_cpu()`` needs it set
before this module is imported (``INTERPRET``).

The forward pass computes the loss and, when a gradient is wanted, the gradient too (one pass); the
backward only scales the saved gradient by ``grad_output`` (skipped on the device when it is 1).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import os

import torch
from torch import Tensor

from wsshm import losses
from wsshm.models.outputs import probabilities

try:
    import triton

    from . import _triton as K

    _knobs = getattr(triton, "knobs", None)  # older Tritons read the variable directly
    INTERPRET = (bool(_knobs.runtime.interpret) if _knobs is not None else
                 os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))
    # tl.fdiv(approx=True) (div.approx.f32) is newer than some Tritons that ship with torch.
    _HAS_APPROX_DIV = "approx" in inspect.signature(triton.language.fdiv).parameters
except ImportError:  # a CPU-only install without triton still gets the reference path
    triton = K = None
    INTERPRET = _HAS_APPROX_DIV = False

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.uint8, torch.bool)
# (ROWS, ROWS_PER_STEP, BLOCK_W, num_warps): a program walks ROWS rows of a BLOCK_W-wide column
# strip, ROWS_PER_STEP at a time. One row per step evaluates D 3 times per pixel instead of 5.
# bench/bench_losses.py sweeps alternatives on a GPU.
GPU_TILE = (8, 1, 256, 2)
# The interpreter's cost is per operation, so it gets the fewest, largest operations.
INTERPRET_TILE = (64, 64, 256, 1)
SCALE_BLOCK = 4096
_MAX_GRID_YZ = 65535


def _check_inputs(fn: str, tensors: dict[str, Tensor], mask_ok: tuple[str, ...]) -> Tensor:
    """Same ``[B, 1, H, W]`` shape and device for all, supported dtypes; returns the first tensor."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"{fn}: {name} must have shape [B, 1, H, W], got {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)} but {first_name} has "
                             f"{tuple(first.shape)}; all inputs must have the same shape")
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}")
        allowed = FLOAT_DTYPES + (MASK_DTYPES if name in mask_ok else ())
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected one of {names}")
    if first.numel() == 0:
        raise ValueError(f"{fn}: empty input of shape {tuple(first.shape)}; B, H and W must be >= 1")
    return first


_TRITON_ON_CPU = contextvars.ContextVar("wsshm_kernels_triton_on_cpu", default=False)


@contextlib.contextmanager
def triton_on_cpu():
    """Within this block CPU tensors run the Triton kernels in Triton's interpreter (for tests)."""
    if not (INTERPRET and K is not None):
        raise RuntimeError("wsshm.kernels.triton_on_cpu needs triton and TRITON_INTERPRET=1 set before "
                           "wsshm.kernels is imported")
    token = _TRITON_ON_CPU.set(True)
    try:
        yield
    finally:
        _TRITON_ON_CPU.reset(token)


def _runs_triton(x: Tensor) -> bool:
    if x.device.type == "cuda":
        if K is None:
            raise RuntimeError("wsshm.kernels: CUDA tensors need triton, which is not installed")
        return True
    return x.device.type == "cpu" and _TRITON_ON_CPU.get()


def _tile(H: int, W: int, device: torch.device) -> tuple[int, int, int, int]:
    rows, per_step, block_w, warps = GPU_TILE if device.type == "cuda" else INTERPRET_TILE
    rows = min(rows, triton.next_power_of_2(H))
    return rows, min(per_step, rows), min(block_w, triton.next_power_of_2(W)), warps


def _sigmoid_mode(device: torch.device) -> int:
    if device.type == "cuda" and torch.version.hip is None:
        return K.SIGMOID_PTX_FTZ.value
    return (K.SIGMOID_APPROX_DIV if _HAS_APPROX_DIV else K.SIGMOID_TL).value


def _pointer(t: Tensor) -> Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _launch(P, T0, At, S, Q, *, target, lam, threshold, from_logits, grad_p, grad_q):
    """One kernel launch; returns ``(loss, dP or None, dQ or None)``."""
    B, _, H, W = P.shape
    for t in (P, T0, At, S) + ((Q,) if Q is not None else ()):
        if (H - 1) * t.stride(2) + (W - 1) * t.stride(3) >= 2**31:
            raise ValueError(f"wsshm.kernels: one image of {H}x{W} with strides {t.stride()} is too "
                             "large for 32-bit in-image offsets")
    rows, per_step, block_w, warps = _tile(H, W, P.device)
    grid = (triton.cdiv(W, block_w), triton.cdiv(H, rows), B)
    if max(grid[1], grid[2]) > _MAX_GRID_YZ:
        raise ValueError(f"wsshm.kernels: shape {tuple(P.shape)} needs a launch grid {grid} larger "
                         f"than {_MAX_GRID_YZ} in its 2nd/3rd dimension")
    partials = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=P.device)
    dP = torch.empty_like(P, memory_format=torch.contiguous_format) if grad_p else None
    dQ = torch.empty_like(Q, memory_format=torch.contiguous_format) if grad_q else None
    n = B * H * W
    with_boundary = Q is not None
    Qp = Q if with_boundary else P  # never read when WITH_BOUNDARY is off
    args = []
    for t in (P, T0, At, S, Qp):
        args += [_pointer(t), t.stride(0), t.stride(2), t.stride(3)]
    device_guard = torch.cuda.device(P.device) if P.device.type == "cuda" else contextlib.nullcontext()
    with device_guard:
        K.matte_loss_kernel[grid](
            *args, partials if dP is None else dP, partials if dQ is None else dQ, partials,
            H, W, 0.0 if threshold is None else float(threshold),
            losses.BOUNDARY_LOW, losses.BOUNDARY_HIGH,
            1.0 / n, 1.0 / (B * H * (W - 1)) if W > 1 else 0.0,
            1.0 / (B * (H - 1) * W) if H > 1 else 0.0, float(lam) / n,
            TARGET=target, WITH_BOUNDARY=with_boundary, FROM_LOGITS=bool(from_logits),
            GRAD_P=grad_p, GRAD_Q=grad_q, SIGMOID=_sigmoid_mode(P.device),
            ROWS=rows, ROWS_PER_STEP=per_step, BLOCK_W=block_w,
            num_warps=warps, enable_fp_fusion=False,
        )
    return partials.sum(), dP, dQ


def _scale_in_place(x: Tensor, scale: Tensor) -> None:
    scale = scale.detach().reshape(1).to(device=x.device, dtype=torch.float32)
    device_guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with device_guard:
        K.scale_in_place_kernel[(triton.cdiv(x.numel(), SCALE_BLOCK),)](x, scale, x.numel(),
                                                                       BLOCK=SCALE_BLOCK)


class _FusedMatteLoss(torch.autograd.Function):
    """Differentiable in ``P`` (and ``Q``); the gradient is made in the forward pass."""

    @staticmethod
    def forward(ctx, P, Q, T0, At, S, options):
        loss, ctx.dP, ctx.dQ = _launch(P, T0, At, S, Q, **options)
        ctx.used = False
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("wsshm.kernels: a fused loss keeps one gradient and supports one "
                               "backward per forward (no retain_graph=True); compute the loss again")
        ctx.used = True
        dP, dQ, ctx.dP, ctx.dQ = ctx.dP, ctx.dQ, None, None  # let autograd own them
        for g in (dP, dQ):
            if g is not None:
                _scale_in_place(g, grad_output)
        return dP, dQ, None, None, None, None


def _run(P, Q, T0, At, S, **options) -> Tensor:
    grad_p = torch.is_grad_enabled() and P.requires_grad
    grad_q = torch.is_grad_enabled() and Q is not None and Q.requires_grad
    if not (grad_p or grad_q):
        return _launch(P, T0, At, S, Q, grad_p=False, grad_q=False, **options)[0]
    return _FusedMatteLoss.apply(P, Q, T0, At, S, dict(options, grad_p=grad_p, grad_q=grad_q))


def fused_teacher_loss(P: Tensor, Q: Tensor, M: Tensor, lam: float = 0.01,
                       from_logits: bool = False) -> Tensor:
    """``wsshm.losses.teacher_loss(P, Q, M, lam)`` and its gradient in ``P`` and ``Q`` in one pass.

    With ``from_logits=True``, ``P`` and ``Q`` are logits (the sigmoid is taken inside, in fp32) and
    the gradients are with respect to the logits. Returns an fp32 scalar.
    """
    _check_inputs("fused_teacher_loss", {"P": P, "Q": Q, "M": M}, mask_ok=())
    if not _runs_triton(P):
        return losses.teacher_loss(probabilities(P, from_logits), probabilities(Q, from_logits),
                                   M, lam)
    return _run(P, Q, M, M, M, target=K.TARGET_MATTE.value, lam=lam, threshold=None,
                from_logits=from_logits)


def fused_student_loss(P: Tensor, Mt: Tensor, At: Tensor, S: Tensor, threshold: float | None = 0.5,
                       from_logits: bool = False, Q: Tensor | None = None, lam: float = 0.01) -> Tensor:
    """``wsshm.losses.student_loss(P, Mt, At, S, threshold, Q, lam)`` and its gradient in ``P`` (and
    ``Q``) in one pass.

    The MLB target (hard ``At > threshold``, or soft with ``threshold=None``) is blended in registers
    and never stored; with the student's boundary map ``Q`` the boundary label is the band of that
    target. ``At`` and ``S`` may be uint8 or bool (values used as they are: 1, not 255, means
    foreground). With ``from_logits=True``, ``P`` and ``Q`` are logits. Returns an fp32 scalar.
    """
    inputs = {"P": P, "Mt": Mt, "At": At, "S": S} | ({"Q": Q} if Q is not None else {})
    _check_inputs("fused_student_loss", inputs, mask_ok=("At", "S"))
    if not _runs_triton(P):
        return losses.student_loss(probabilities(P, from_logits), Mt, At, S, threshold,
                                   None if Q is None else probabilities(Q, from_logits), lam)
    target = (K.TARGET_BLEND_SOFT if threshold is None else K.TARGET_BLEND_HARD).value
    return _run(P, Q, Mt, At, S, target=target, lam=lam if Q is not None else 0.0, threshold=threshold,
                from_logits=from_logits)
