"""Networks by name: ``unet_r{18,34,50,101}[_w<width>]`` plus anything added with ``register_model``.

``build_model`` stamps the result with ``.arch`` (the canonical name, e.g. ``unet_r18_w0.5``; width
1.0 has no suffix) and ``.arch_kwargs`` (the keyword arguments), which ``save_weights`` records so
``load_weights`` can rebuild the same network.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .resnet import DEPTHS
from .unet import MattingNet

UNET_NAME = re.compile(r"unet_r(\d+)(?:_w(\d*\.?\d+))?")
PAPER_MODELS = ("unet_r18_w0.5", "unet_r18", "unet_r34", "unet_r50", "unet_r101")
_CUSTOM: dict[str, Callable[..., nn.Module]] = {}


def _parse_unet(name: str) -> tuple[int, float] | None:
    match = UNET_NAME.fullmatch(name)
    if match is None or int(match.group(1)) not in DEPTHS:
        return None
    width = float(match.group(2)) if match.group(2) else 1.0
    return (int(match.group(1)), width) if width > 0 else None


def canonical_arch(name: str) -> str:
    """The name ``build_model(name).arch`` will carry (``unet_r18_w1.0`` -> ``unet_r18``)."""
    if name in _CUSTOM:
        return name
    parsed = _parse_unet(name)
    if parsed is None:
        registered = f" or a registered name ({', '.join(sorted(_CUSTOM))})" if _CUSTOM else ""
        raise ValueError(f"unknown model '{name}': expected unet_r{{{','.join(map(str, DEPTHS))}}}"
                         f"[_w<width>] with a positive width{registered}")
    depth, width = parsed
    return f"unet_r{depth}" if width == 1.0 else f"unet_r{depth}_w{width:g}"


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``build_model(name, **kw)`` (and so ``load_weights``) build ``factory(**kw)``.

    The module's ``forward(x)`` must return ``(matte, boundary)`` or a matte ``[B,1,H,W]`` in
    [0, 1]; an optional ``forward_logits(x)`` returns the pre-sigmoid maps (see ``outputs.py``).
    """
    if _parse_unet(name) is not None:
        raise ValueError(f"'{name}' is a built-in U-Net name; register custom models under another name")
    _CUSTOM[name] = factory


def list_models() -> list[str]:
    """The paper's networks and the registered ones (any ``_w<width>`` suffix also builds)."""
    return list(PAPER_MODELS) + sorted(_CUSTOM)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# The keywords a built-in U-Net takes besides its name, and what each must be. Checked here because
# they come from weights files too (``arch_kwargs``), and torch's own errors for a string where a
# channel count belongs read "not all arguments converted during string formatting".
UNET_KEYWORDS = {
    "aspp_rates": ("a list of positive integers",
                   lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_is_positive_int, v))),
    "in_channels": ("a positive integer", _is_positive_int),
}


def check_unet_keywords(arch: str, kwargs: dict) -> None:
    """A ``ValueError`` for a keyword ``MattingNet`` does not take or a value it cannot build from."""
    for key, value in kwargs.items():
        if key in ("depth", "width"):
            raise ValueError(f"arch keyword {key} is given by the name {arch}, not as a keyword")
        if key not in UNET_KEYWORDS:
            raise ValueError(f"unknown arch keyword {key} ({arch} takes {', '.join(sorted(UNET_KEYWORDS))})")
        what, valid = UNET_KEYWORDS[key]
        if not valid(value):
            raise ValueError(f"arch keyword {key} must be {what}, got {value!r}")


def build_model(name: str, **kwargs) -> nn.Module:
    arch = canonical_arch(name)
    if arch in _CUSTOM:
        model = _CUSTOM[arch](**kwargs)
    else:
        check_unet_keywords(arch, kwargs)
        depth, width = _parse_unet(arch)
        model = MattingNet(depth=depth, width=width, **kwargs)
    model.arch = arch
    model.arch_kwargs = dict(kwargs)
    return model
