"""What a network's output means, read in one place for training, inference, export and the benches.

A network's ``forward(x)`` returns ``(matte, boundary)`` or a lone matte ``[B, 1, H, W]``, in [0, 1];
a network may also have ``forward_logits(x)``, the same maps before the sigmoid, which lets the losses
take the sigmoid inside (``from_logits=True``) where it is cheaper and more exact.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def split_output(output) -> tuple[Tensor, Tensor | None]:
    """``(matte, boundary)`` of a network's output; ``boundary`` is ``None`` for a lone matte."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) in (1, 2):
        return output[0], (output[1] if len(output) == 2 else None)
    raise TypeError(f"a network must return a matte tensor or (matte, boundary), got {type(output).__name__}"
                    + (f" of {len(output)}" if isinstance(output, (tuple, list)) else ""))


def has_logits(model: nn.Module) -> bool:
    """Whether ``model`` gives its maps before the sigmoid (``forward_logits``)."""
    return hasattr(model, "forward_logits")


def forward_maps(model: nn.Module, x: Tensor, logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(matte, boundary or None)`` of ``model`` on ``x``: logits from ``forward_logits`` when
    ``logits`` (the model must have it), else the probabilities of ``forward``."""
    return split_output(model.forward_logits(x) if logits else model(x))


def probabilities(x: Tensor, from_logits: bool) -> Tensor:
    """A map in [0, 1] in at least fp32: ``sigmoid(x)`` when ``x`` is a logit, else ``x`` itself
    (half types upcast; float64 stays float64, for gradcheck)."""
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return x.sigmoid() if from_logits else x
