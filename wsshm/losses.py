"""Reference PyTorch definitions of the paper's losses (SPEC section 2).

This module is the one home of the math. The fused Triton kernels in ``wsshm.kernels`` are tested
against these functions, and the benchmarks time them as the eager baseline.

Every per-pixel map is a float tensor ``[B, 1, H, W]`` (fp32, bf16 or fp16); the arithmetic is done in
fp32 after upcasting. Targets carry no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

BOUNDARY_LOW = 0.05
BOUNDARY_HIGH = 0.95


def _f32(x: Tensor) -> Tensor:
    """Upcast half types (and uint8/bool labels) to fp32; float64 stays float64 for gradcheck."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def boundary_mask(M: Tensor) -> Tensor:
    """The boundary label alpha of paper section 3.3: 1 where 0.05 < M < 0.95 (strict), else 0.

    Compared in fp32 against fp32 constants, so a bf16 0.05 (which is 0.0500488...) is inside.
    """
    M = M.detach().float()
    return ((M > BOUNDARY_LOW) & (M < BOUNDARY_HIGH)).float()


def mlb_blend(Mt: Tensor, At: Tensor, S: Tensor, threshold: float | None = 0.5) -> Tensor:
    """Matte Label Blending: ``M_bar = alpha' * M' + (1 - alpha') * S`` (paper section 3.3).

    ``H = (At > threshold)`` picks the teacher's matte inside its predicted boundary and the
    segmentation label elsewhere; ``threshold=None`` blends with the soft ``At`` itself.
    """
    Mt, At, S = _f32(Mt.detach()), _f32(At.detach()), _f32(S.detach())
    H = At if threshold is None else (At.float() > float(threshold)).to(Mt.dtype)
    return H * Mt + (1.0 - H) * S


def mse_loss(P: Tensor, T: Tensor) -> Tensor:
    """Eq. 4: ``L_mse = (M - M')^2``, the mean over B*H*W."""
    return (_f32(P) - _f32(T.detach())).pow(2).mean()


def grad_loss(P: Tensor, T: Tensor) -> Tensor:
    """Eq. 5: ``L_grad = |dx M - dx M'| + |dy M - dy M'|`` with forward differences.

    Each term is the mean over its own count (B*H*(W-1) and B*(H-1)*W); a term whose axis has length 1
    is 0. ``torch.abs`` has gradient sign(0) = 0 at ties, as SPEC asks.
    """
    D = _f32(P) - _f32(T.detach())
    zero = D.new_zeros(())
    gx = (D[..., :, 1:] - D[..., :, :-1]).abs().mean() if D.shape[-1] > 1 else zero
    gy = (D[..., 1:, :] - D[..., :-1, :]).abs().mean() if D.shape[-2] > 1 else zero
    return gx + gy


def matte_loss(P: Tensor, T: Tensor) -> Tensor:
    """Eq. 3: ``L_matte = L_mse + L_grad``."""
    return mse_loss(P, T) + grad_loss(P, T)


def teacher_loss(P: Tensor, Q: Tensor, M: Tensor, lam: float = 0.01) -> Tensor:
    """Eq. 2 and 6: ``L = L_matte + lam * |alpha - alpha'|`` with alpha = boundary_mask(M)."""
    return matte_loss(P, M) + lam * (boundary_mask(M) - _f32(Q)).abs().mean()


def student_loss(P: Tensor, Mt: Tensor, At: Tensor, S: Tensor, threshold: float | None = 0.5,
                 Q: Tensor | None = None, lam: float = 0.01) -> Tensor:
    """Step 2: ``L_matte`` of the student's matte against the MLB label ``M_bar`` of the teacher.

    With the student's boundary map ``Q`` this is eq. 2 with ``M_bar`` as the label:
    ``matte_loss(P, M_bar) + lam * |boundary_mask(M_bar) - Q|`` (the student stage's
    ``--student-boundary blend``, for a student that will teach; docs/training.md section 7).
    """
    label = mlb_blend(Mt, At, S, threshold)
    loss = matte_loss(P, label)
    if Q is None:
        return loss
    return loss + lam * (boundary_mask(label) - _f32(Q)).abs().mean()


def pretrain_loss(P: Tensor, S: Tensor) -> Tensor:
    """Stage 0 (section 4.2): segmentation pre-training with the MSE objective."""
    return mse_loss(P, S)
