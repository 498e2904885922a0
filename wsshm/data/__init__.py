"""Training data: the PyTorch and DALI loaders of the pre-training, teacher and student forms.

``build_loader`` (docs/CONTRACTS.md "Loaders") is the entry point; docs/data.md describes the batches,
the augmentation and the resume semantics.
"""
from __future__ import annotations

import torch

from wsshm.data.forms import FORMS, OPS
from wsshm.data.prepare import fused_prepare, fused_prepare_reference
from wsshm.data.params import AugmentConfig
from wsshm.data.samples import DataError, open_shard_set

BACKENDS = ("torch", "dali")

__all__ = ["build_loader", "AugmentConfig", "DataError", "fused_prepare", "fused_prepare_reference"]


def build_loader(form, *, seg=None, matte=None, background=None, batch_size, crop_sizes=(512, 768), rank=0,
                 world_size=1, device="cpu", backend="torch", seed=0, num_samples=None, num_workers=2,
                 dtype=torch.float32, augment: AugmentConfig | None = None, op="csrc", verify=True,
                 keep_uint8=False):
    """An endless iterator of batch dicts on ``device`` for ``form`` (pretrain / teacher / student).

    Extra options beyond the contract: ``dtype`` (float32 or bfloat16 images), ``augment`` (scale,
    flip and jitter ranges; its crop sizes are replaced by ``crop_sizes``), ``op`` ("csrc": the fused
    C++/CUDA op, "torch": its plain-torch reference), ``verify`` (DALI: run the shard checks first),
    ``keep_uint8`` (also return the uint8 crops the batch was made from, as ``uint8_*``).
    """
    if form not in FORMS:
        raise ValueError(f"unknown loader form {form!r}; expected one of {', '.join(FORMS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    base = augment or AugmentConfig()
    config = AugmentConfig(**{**base.__dict__, "crop_sizes": crop_sizes})
    device = torch.device(device)
    if form == "teacher":
        data = open_shard_set(matte, "matte", num_samples, seed)
        backgrounds = open_shard_set(background, "background", None, seed)
    else:
        data, backgrounds = open_shard_set(seg, "seg", num_samples, seed), None
    if len(data) < batch_size * world_size:
        # not an error for the stream itself, but a rank would see the same sample twice in one batch
        import warnings

        warnings.warn(f"{data.folder}: {len(data)} samples for a global batch of {batch_size * world_size}; "
                      "samples repeat within a batch", RuntimeWarning, stacklevel=2)
    finish_kw = {"op": op, "dtype": dtype, "keep_uint8": keep_uint8}
    if backend == "dali":
        from wsshm.data.dali_backend import DaliLoader, check_shards

        if verify:
            check_shards(*[s for s in (data, backgrounds) if s is not None])
        return DaliLoader(form, data, backgrounds, batch_size=batch_size, config=config, rank=rank,
                          world_size=world_size, seed=seed, device=device, num_workers=num_workers,
                          finish_kw=finish_kw)
    from wsshm.data.torch_backend import BatchDataset, TorchLoader

    dataset = BatchDataset(form, data, backgrounds, batch_size, config, rank, world_size, seed)
    return TorchLoader(dataset, device, num_workers, finish_kw)
