"""Training data: the PyTorch and DALI loaders of the pre-training, teacher and student forms.

``build_loader`` (docs/CONTRACTS.md "Loaders") is the entry point; docs/data.md describes the batches,
the augmentation and the resume semantics; ``wsshm.data.forms`` holds the table of the three forms.
"""
from __future__ import annotations

import warnings

import torch

from wsshm.data.forms import FORMS
from wsshm.data.mixing import open_mixture
from wsshm.data.params import AugmentConfig
from wsshm.data.prepare import fused_prepare, fused_prepare_reference
from wsshm.shards import ShardFolderError, open_shard_set

# A shard folder the loaders cannot use (missing, broken, empty, wrong kind, failing DALI's up-front
# verification); the message names the folder or file. The same class as wsshm.shards' error.
DataError = ShardFolderError

BACKENDS = ("torch", "dali")

__all__ = ["build_loader", "AugmentConfig", "DataError", "fused_prepare", "fused_prepare_reference"]


def build_loader(form, *, seg=None, matte=None, background=None, batch_size, crop_sizes=(512, 768), rank=0,
                 world_size=1, device="cpu", backend="torch", seed=0, num_samples=None, num_workers=2,
                 dtype=torch.float32, augment: AugmentConfig | None = None, seg_weights=None):
    """An endless iterator of batch dicts on ``device`` for ``form`` (pretrain / teacher / student).

    ``seg`` may be several folders, mixed at ``seg_weights`` (default: their sizes, as if
    concatenated; ``num_samples`` subsets the first; ``wsshm.data.mixing``). Options beyond the
    contract: ``dtype`` (float32 or bfloat16 images) and ``augment`` (scale, flip and jitter ranges;
    its crop sizes are replaced by ``crop_sizes``). The DALI backend runs the ``wsshm-shard verify``
    checks first: it cannot skip a bad sample mid-run.
    """
    if form not in FORMS:
        raise ValueError(f"unknown loader form {form!r}; expected one of {', '.join(FORMS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    form = FORMS[form]
    base = augment or AugmentConfig()
    config = AugmentConfig(**{**base.__dict__, "crop_sizes": crop_sizes})
    device = torch.device(device)
    if seg_weights is not None and form.kind != "seg":
        raise ValueError(f"seg_weights given to the {form.name} form, which reads no seg folder")
    folders = {"seg": seg, "matte": matte}[form.kind]
    data = open_mixture(folders, seg_weights, form.kind, num_samples, seed)
    backgrounds = open_shard_set(background, "background", None, seed) if form.background else None
    for problem in data.undersized(batch_size * world_size):
        # not an error for the stream itself, but a rank would see the same sample twice in one batch
        warnings.warn(f"{problem}; samples repeat within a batch", RuntimeWarning, stacklevel=2)
    common = dict(batch_size=batch_size, config=config, rank=rank, world_size=world_size, seed=seed,
                  device=device, dtype=dtype, num_workers=num_workers)
    if backend == "dali":
        from wsshm.data.dali_backend import DaliLoader, check_shards

        check_shards(*data.sets, *([backgrounds] if backgrounds is not None else []))
        return DaliLoader(form, data, backgrounds, **common)
    from wsshm.data.torch_backend import TorchLoader

    return TorchLoader(form, data, backgrounds, **common)
