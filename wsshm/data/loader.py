"""What the PyTorch and DALI loaders share: iteration, the last step on the device, state and close.

A backend implements ``_read()`` (this rank's uint8 crops of batch ``self.step``: a dict of
``images`` and ``labels``, plus ``backgrounds`` for the teacher form),
``_stop()`` (drop its workers or pipeline) and, when its state holds more than the step,
``_extra_state()`` / ``_restore(state)``.
"""
from __future__ import annotations

import torch

from wsshm.data import params
from wsshm.data.forms import Form
from wsshm.data.mixing import Mixture
from wsshm.data.prepare import fused_prepare


class Loader:
    """Endless iterator of training batches; ``state_dict()`` lets a fresh loader resume exactly."""

    backend = ""
    # what a saved state must agree on with the loader that loads it ("folders": each data folder's
    # size and mixing weight; states saved before folders could be mixed lack it)
    state_must_match = ("form", "seed", "world_size", "batch_size", "folders")

    def __init__(self, form: Form, data: Mixture, *, batch_size: int, config: params.AugmentConfig, rank: int,
                 world_size: int, seed: int, device: torch.device, dtype: torch.dtype):
        self.form, self.data, self.batch_size, self.config = form, data, batch_size, config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device, self.dtype = device, dtype
        self.prepare = fused_prepare  # the benchmark swaps in fused_prepare_reference
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.finish(self.next_raw())

    def next_raw(self) -> dict:
        """The uint8 batch the next training batch is made from (the crops, before the fused op)."""
        jitter = self.jitter(self.step) if self.form.jitter else None
        raw = self.form.raw(**self._read(), jitter=jitter)
        self.step += 1
        return raw

    def finish(self, raw: dict) -> dict:
        """uint8 batch -> training batch on the device."""
        return self.form.finish(raw, self.device, self.dtype, self.prepare)

    def jitter(self, step: int) -> torch.Tensor:
        """The strong view's colour jitter factors of this rank's batch ``step``."""
        return torch.from_numpy(params.jitter(self.config, self.batch_size, self.seed, step, self.rank))

    def _identity(self) -> dict:
        return {"backend": self.backend, "form": self.form.name, "step": self.step, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "folders": self.data.identity()}

    def state_dict(self) -> dict:
        return {**self._identity(), **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        for key in self.state_must_match:
            if key == "folders" and key not in state and len(self.data.sets) == 1:
                continue
            if state.get(key) != mine[key]:
                if key == "folders":
                    raise ValueError(f"the loader state was saved for data folders of (size, weight) "
                                     f"{state.get(key)}, this loader reads {mine[key]}")
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this loader has {mine[key]!r}")
        self.close()
        self.step = int(state["step"])
        self._restore(state)

    def close(self) -> None:
        self._stop()

    def _read(self) -> dict:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _restore(self, state: dict) -> None:
        pass
