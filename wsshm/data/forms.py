"""The last stage both loaders share: uint8 crops -> the training batch on ``device``.

The backends deliver uint8 HWC crops (and, for the student form, the jitter factors); this stage moves
them to the device and runs the fused op there (the CUDA kernel on a GPU, the C++ path on a CPU), so
the colour work and the normalisation happen where the batch is consumed.
"""
from __future__ import annotations

import torch

from wsshm.data.prepare import fused_prepare, fused_prepare_reference

OPS = {"csrc": fused_prepare, "torch": fused_prepare_reference}
FORMS = ("pretrain", "teacher", "student")


def _map(u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,H,W]`` -> float32 ``[B,1,H,W]`` in [0, 1]."""
    return (u8.float() / 255.0).unsqueeze(1)


def finish_batch(form: str, raw: dict, device: torch.device, *, op: str = "csrc",
                 dtype: torch.dtype = torch.float32, keep_uint8: bool = False) -> dict:
    prepare = OPS[op]
    non_blocking = device.type == "cuda"
    moved = {k: v.to(device, non_blocking=non_blocking) for k, v in raw.items()}
    if form == "pretrain":
        batch = {"image": prepare(moved["image"], dtype=dtype)[0], "mask": _map(moved["mask"])}
    elif form == "teacher":
        image, _ = prepare(moved["fg"], moved["alpha"], moved["background"], dtype=dtype)
        batch = {"image": image, "alpha": _map(moved["alpha"])}
    elif form == "student":
        weak, strong = prepare(moved["image"], jitter=moved["jitter"], dtype=dtype)
        batch = {"weak": weak, "strong": strong, "mask": _map(moved["mask"])}
    else:
        raise ValueError(f"unknown loader form {form!r}; expected one of {', '.join(FORMS)}")
    if keep_uint8:
        batch.update({f"uint8_{k}": v for k, v in moved.items()})
    return batch
