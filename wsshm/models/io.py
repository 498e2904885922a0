"""Weights on disk: safetensors with the architecture in the metadata (never pickle), and
torchvision ResNet state dicts into the encoder."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from wsshm.atomic import atomic_path
from .registry import build_model
from .resnet import ResNetEncoder


def save_weights(model: nn.Module, path, metadata: dict | None = None) -> None:
    """Write ``model.state_dict()`` to ``path`` (atomically) with ``arch`` and ``arch_kwargs`` in
    the metadata, plus ``metadata`` (values stored as strings)."""
    arch = getattr(model, "arch", None)
    if not arch:
        raise ValueError(f"cannot save {type(model).__name__} to {path}: it has no .arch; build it with "
                         "wsshm.models.build_model (register custom networks with register_model)")
    # clone: safetensors refuses tensors that share storage (tied weights in custom students)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(arch=arch, arch_kwargs=json.dumps(getattr(model, "arch_kwargs", {}) or {}))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_weights(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a safetensors file, or a ``ValueError`` naming it."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ...)
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    return tensors, metadata


def load_weights(path, map_location="cpu") -> nn.Module:
    """Rebuild the network recorded in ``path`` and load its weights (as fp32) onto ``map_location``."""
    tensors, metadata = read_weights(path)
    arch = metadata.get("arch")
    if not arch:
        raise ValueError(f"{path}: no 'arch' in the safetensors metadata (not written by save_weights?)")
    try:
        kwargs = json.loads(metadata.get("arch_kwargs") or "{}")
        model = build_model(arch, **kwargs)
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: cannot build arch '{arch}': {error}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit a '{arch}' network: {error}") from None
    return model.to(map_location)


def load_torchvision_encoder(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load a torchvision ResNet state dict (``fc.*`` ignored) into ``model.encoder``, strictly."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, ResNetEncoder):
        raise ValueError(f"{type(model).__name__} has no ResNet encoder to load torchvision weights into")
    weights = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        encoder.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        hint = (f" (torchvision's ResNets have width 1.0; this encoder is resnet{encoder.depth} at width "
                f"{encoder.width:g})" if encoder.width != 1.0 else "")
        raise ValueError(f"the state dict does not fit the resnet{encoder.depth} encoder{hint}: {error}") from None
    return model

