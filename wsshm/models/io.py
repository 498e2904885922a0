"""Weights on disk: safetensors with the architecture in the metadata (never pickle), and
torchvision ResNet state dicts into the encoder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
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


def _open(path):
    """``safe_open`` of ``path``, or a ``ValueError`` naming it (missing file, not safetensors)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such weights file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ...)
        raise ValueError(f"{path}: not a readable safetensors file ({error})".replace("\n", " ")) from None


def read_header(path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """``(metadata, {tensor name: shape})`` from the file's header alone: no tensor is read."""
    with _open(path) as handle:
        return handle.metadata() or {}, {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def read_weights(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a safetensors file, or a ``ValueError`` naming it."""
    try:
        with _open(path) as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except ValueError:
        raise
    except Exception as error:  # a tensor's data that cannot be read
        raise ValueError(f"{path}: not a readable safetensors file ({error})".replace("\n", " ")) from None
    return tensors, metadata


def _arch_of(path, metadata: dict[str, str]) -> tuple[str, dict]:
    """``(arch, arch_kwargs)`` recorded by ``save_weights``, or a ``ValueError`` naming the file."""
    arch = metadata.get("arch")
    if not arch:
        raise ValueError(f"{path}: no 'arch' in the safetensors metadata (not written by save_weights?)")
    try:
        kwargs = json.loads(metadata.get("arch_kwargs") or "{}")
    except ValueError:  # JSONDecodeError
        raise ValueError(f"{path}: cannot build arch '{arch}': arch_kwargs is not JSON "
                         f"({metadata['arch_kwargs'][:80]!r})") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: cannot build arch '{arch}': arch_kwargs must be a JSON object, got {kwargs!r:.80}")
    return arch, kwargs


def _build(path, arch: str, kwargs: dict) -> nn.Module:
    try:
        return build_model(arch, **kwargs)
    except Exception as error:  # a registered factory may raise anything for keywords it cannot take
        raise ValueError(f"{path}: cannot build arch '{arch}': {error}".replace("\n", " ")) from None


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "a scalar"


def _check_fits(path, arch: str, network: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """A one-line ``ValueError`` naming the file when its tensors are not the network's (names and shapes)."""
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    wrong = [name for name in expected if name in shapes and shapes[name] != expected[name]]
    if not (missing or unexpected or wrong):
        return

    def listed(names: list[str], what: str) -> str:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"{len(names)} {what} tensor{'s' if len(names) > 1 else ''} ({shown})"

    problems = [f"{name} is {_shape(shapes[name])} in the file, {_shape(expected[name])} in the network"
                for name in wrong[:2]]
    if len(wrong) > 2:
        problems.append(f"{len(wrong) - 2} more of another shape")
    if missing:
        problems.append(listed(missing, "missing"))
    if unexpected:
        problems.append(listed(unexpected, "unexpected"))
    raise ValueError(f"{path}: the file does not hold a '{arch}' network its metadata names: {'; '.join(problems)}")


def load_weights(path, map_location="cpu") -> nn.Module:
    """Rebuild the network recorded in ``path`` and load its weights (as fp32) onto ``map_location``.

    The metadata only names the network; the file's header must then hold exactly that network's
    tensors (names and shapes), checked on a skeleton built on the meta device before anything is
    allocated, so a small file naming a huge network is refused instead of allocated.
    """
    metadata, shapes = read_header(path)
    arch, kwargs = _arch_of(path, metadata)
    with torch.device("meta"):
        skeleton = _build(path, arch, kwargs)
    _check_fits(path, arch, skeleton, shapes)
    tensors, _ = read_weights(path)
    model = _build(path, arch, kwargs)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:  # e.g. a tensor that cannot be cast (checked names and shapes fit)
        raise ValueError(f"{path}: the weights do not fit a '{arch}' network: {error}".replace("\n", " ")) from None
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

