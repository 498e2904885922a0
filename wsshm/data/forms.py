"""The three loader forms in one table: which shard folders each reads, how its crops are made, the
uint8 batch the backends deliver, and the last step both backends share (``Form.finish``), which
turns that batch into the training batch on the device with the fused op.

| form | reads (kind: members) | uint8 batch | batch keys |
| --- | --- | --- | --- |
| pretrain | seg: image, mask.png | image, mask | image, mask |
| teacher | matte: fg, alpha.png; background: image | fg, alpha, background | image (eq. 1), alpha |
| student | seg: image, mask.png | image, mask, jitter | weak, strong, mask |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from wsshm.data.prepare import fused_prepare


def _unit(u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,H,W]`` -> float32 ``[B,1,H,W]`` in [0, 1]."""
    return (u8.float() / 255.0).unsqueeze(1)


def _pretrain(prepare, raw, dtype):
    return {"image": prepare(raw["image"], dtype=dtype)[0], "mask": _unit(raw["mask"])}


def _teacher(prepare, raw, dtype):
    image, _ = prepare(raw["fg"], raw["alpha"], raw["background"], dtype=dtype)
    return {"image": image, "alpha": _unit(raw["alpha"])}


def _student(prepare, raw, dtype):
    weak, strong = prepare(raw["image"], jitter=raw["jitter"], dtype=dtype)
    return {"weak": weak, "strong": strong, "mask": _unit(raw["mask"])}


@dataclass(frozen=True)
class Form:
    name: str
    kind: str  # shard folder kind of the labelled data; its members come from wsshm.shards.MEMBERS
    image: str  # uint8 batch key of the data's images ([B,S,S,3])
    label: str  # uint8 batch key of the data's labels ([B,S,S])
    soft_labels: bool  # alphas are resized linearly; binary masks with nearest neighbour (they stay 0/1)
    background: bool  # also reads a background folder: uint8 key "background", its own geometry
    jitter: bool  # the strong view's colour jitter factors, uint8 batch key "jitter" (float32 [B,4])
    make_batch: Callable  # (prepare, uint8 batch on the device, dtype) -> training batch

    def raw(self, images, labels, backgrounds=None, jitter=None) -> dict:
        """The uint8 batch of this form from a backend's crops (and the jitter factors)."""
        raw = {self.image: images, self.label: labels}
        if self.background:
            raw["background"] = backgrounds
        if self.jitter:
            raw["jitter"] = jitter
        return raw

    def finish(self, raw: dict, device: torch.device, dtype: torch.dtype = torch.float32,
               prepare: Callable = fused_prepare) -> dict:
        """uint8 batch -> training batch on ``device``: compositing, jitter and normalisation in
        ``prepare`` (the fused op; its reference has the same signature)."""
        non_blocking = device.type == "cuda"
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in raw.items()}
        return self.make_batch(prepare, moved, dtype)


FORMS = {
    "pretrain": Form("pretrain", "seg", "image", "mask", soft_labels=False, background=False, jitter=False,
                     make_batch=_pretrain),
    "teacher": Form("teacher", "matte", "fg", "alpha", soft_labels=True, background=True, jitter=False,
                    make_batch=_teacher),
    "student": Form("student", "seg", "image", "mask", soft_labels=False, background=False, jitter=True,
                    make_batch=_student),
}
