"""Exponential moving average of the student into the teacher (paper section 3.4, SPEC stage 2).

The average lives in an fp32 master copy: with momentum 0.999 a bf16 teacher could not hold the
increments ``(1-m)*(student-teacher)``, which are far below bf16's resolution, so averaging in the
teacher's own dtype would freeze it. After each update the master is written (cast) into the
teacher. Integer buffers (BatchNorm's ``num_batches_tracked``) are copied, not averaged.

Under DeepSpeed ZeRO-3 the student's parameters are partitioned; gather them first::

    with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
        ema.update(student)

``update`` also takes any iterable of ``(name, tensor)`` pairs covering every parameter and buffer
of the teacher, e.g. full tensors collected some other way.

``keep`` names prefixes (e.g. ``"boundary_head."``) that the average leaves alone: a part of the
network the student does not train would otherwise pull the teacher's trained part toward the
student's untrained one.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


class ModelEMA:
    """``teacher <- m * teacher + (1 - m) * student`` over parameters and floating buffers."""

    def __init__(self, teacher: nn.Module, momentum: float = 0.999, keep: tuple[str, ...] = ()):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.teacher = teacher
        self.momentum = float(momentum)
        self.keep = tuple(keep)
        self.updates = 0
        self.master = {name: (t.detach().float().clone() if t.is_floating_point() else t.detach().clone())
                       for name, t in _named_tensors(teacher).items()}

    def _collect(self, student) -> dict[str, Tensor]:
        pairs = _named_tensors(student) if isinstance(student, nn.Module) else dict(student)
        missing = sorted(set(self.master) - set(pairs))
        extra = sorted(set(pairs) - set(self.master))
        if missing or extra:
            raise ValueError(f"EMA: the student does not match the teacher (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}{', ...' if len(missing) > 5 or len(extra) > 5 else ''})")
        for name, master in self.master.items():
            if pairs[name].shape != master.shape:
                raise ValueError(f"EMA: '{name}' is {tuple(pairs[name].shape)} in the student but "
                                 f"{tuple(master.shape)} in the teacher (ZeRO-3: update inside "
                                 "deepspeed.zero.GatheredParameters)")
        return pairs

    @torch.no_grad()
    def update(self, student: nn.Module | Iterable[tuple[str, Tensor]]) -> None:
        """Average ``student`` (a module, or ``(name, tensor)`` pairs) into the master and the teacher."""
        pairs = self._collect(student)
        averaged = [name for name in self.master if not name.startswith(self.keep)]
        floats = [name for name in averaged if self.master[name].is_floating_point()]
        masters = [self.master[name] for name in floats]
        students = [pairs[name].detach().to(device=self.master[name].device, dtype=torch.float32)
                    for name in floats]
        if masters:
            torch._foreach_mul_(masters, self.momentum)
            torch._foreach_add_(masters, students, alpha=1.0 - self.momentum)
        for name in averaged:
            if not self.master[name].is_floating_point():
                self.master[name].copy_(pairs[name])
        self.updates += 1
        self._write_teacher()

    @torch.no_grad()
    def _write_teacher(self) -> None:
        # looked up each time: teacher.to(dtype) replaces buffer tensors (parameters keep their identity)
        for name, target in _named_tensors(self.teacher).items():
            target.copy_(self.master[name])

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "updates": self.updates,
                "master": {name: t.detach().clone() for name, t in self.master.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the master (and write it into the teacher)."""
        master = state["master"]
        if set(master) != set(self.master):
            diff = sorted(set(master) ^ set(self.master))
            raise ValueError(f"EMA state does not match the teacher: differing names {diff[:5]}")
        for name, tensor in master.items():
            if tensor.shape != self.master[name].shape:
                raise ValueError(f"EMA state: '{name}' is {tuple(tensor.shape)}, the teacher's "
                                 f"{tuple(self.master[name].shape)}")
            self.master[name].copy_(tensor)
        self.momentum = float(state["momentum"])
        self.updates = int(state["updates"])
        self._write_teacher()
