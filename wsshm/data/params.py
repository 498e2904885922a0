"""Augmentation parameters, drawn from counters so that any batch can be redrawn exactly.

Every draw is a function of ``(seed, step)`` (the crop size, shared by all ranks so every rank's
batch has the same shape) or ``(seed, step, rank)`` (per-sample geometry and colour jitter). A
resumed loader that knows its step therefore draws the same parameters as an uninterrupted one, and
the DALI and PyTorch loaders share the same draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CROP_MULTIPLE = 32


@dataclass(frozen=True)
class AugmentConfig:
    """Basic augmentation (random scale, random crop, horizontal flip) and the strong view's jitter.

    ``crop_sizes``: an int (one size), a pair ``(lo, hi)`` (every multiple of 32 from lo to hi, the
    paper's 512..768), or a longer sequence (exactly those sizes). ``scale_range``: the shorter side
    of the image is resized to ``crop * s`` with ``s`` uniform in the range (so a crop covers
    between ``1/hi`` and ``1/lo`` of the shorter side). Jitter: brightness, contrast and saturation
    factors uniform in ``[1-x, 1+x]``, hue shift uniform in ``[-h, h]`` turns (torchvision's
    ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` ranges by default).
    """

    crop_sizes: tuple = (512, 768)
    scale_range: tuple = (1.0, 1.5)
    flip_probability: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1

    def __post_init__(self):
        sizes = candidate_sizes(self.crop_sizes)
        object.__setattr__(self, "crop_sizes", tuple(sizes))
        lo, hi = self.scale_range
        if not 1.0 <= lo <= hi:
            raise ValueError(f"scale_range must satisfy 1 <= lo <= hi (crops never leave the image), got {self.scale_range}")
        if not 0.0 <= self.hue <= 0.5 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("jitter ranges must be >= 0 and hue <= 0.5")


def candidate_sizes(crop_sizes) -> list[int]:
    """The crop sides ``crop_sizes`` stands for (the one rule the loaders and the command line share)."""
    if isinstance(crop_sizes, (int, np.integer)):
        sizes = [int(crop_sizes)]
    elif len(crop_sizes) == 2:
        lo, hi = (int(v) for v in crop_sizes)
        if lo % CROP_MULTIPLE or hi % CROP_MULTIPLE or lo > hi:
            raise ValueError(f"crop_sizes (lo, hi) must be multiples of {CROP_MULTIPLE} with lo <= hi, got {crop_sizes}")
        sizes = list(range(lo, hi + 1, CROP_MULTIPLE))
    else:
        sizes = [int(v) for v in crop_sizes]
    if not sizes or min(sizes) < 1 or any(size % CROP_MULTIPLE for size in sizes):
        raise ValueError(f"crop sides must be positive multiples of {CROP_MULTIPLE} (the network halves "
                         f"its input 5 times), got {crop_sizes}")
    return sizes


def _rng(*counters: int) -> np.random.Generator:
    return np.random.default_rng([int(c) for c in counters])


def crop_size(config: AugmentConfig, seed: int, step: int) -> int:
    """The crop size of global batch ``step`` (the same on every rank)."""
    return int(_rng(seed, step, 1).choice(config.crop_sizes))


@dataclass
class Geometry:
    """Per-sample geometry: scale factor, crop position (fractions of the free room) and flip."""

    scale: np.ndarray  # float32 [B]
    x: np.ndarray  # float32 [B] in [0, 1]
    y: np.ndarray  # float32 [B] in [0, 1]
    flip: np.ndarray  # bool [B]


def geometry(config: AugmentConfig, batch: int, seed: int, step: int, rank: int, stream: int = 0) -> Geometry:
    """``stream`` tells independent draws apart (0: the images, 1: the teacher's backgrounds)."""
    rng = _rng(seed, step, rank, 2 + stream)
    return Geometry(
        scale=rng.uniform(*config.scale_range, size=batch).astype(np.float32),
        x=rng.uniform(size=batch).astype(np.float32),
        y=rng.uniform(size=batch).astype(np.float32),
        flip=rng.uniform(size=batch) < config.flip_probability,
    )


def jitter(config: AugmentConfig, batch: int, seed: int, step: int, rank: int) -> np.ndarray:
    """float32 ``[B, 4]``: brightness, contrast, saturation factors and the hue shift (turns)."""
    rng = _rng(seed, step, rank, 9)
    spans = (config.brightness, config.contrast, config.saturation)
    factors = [rng.uniform(1 - s, 1 + s, size=batch) for s in spans]
    return np.stack(factors + [rng.uniform(-config.hue, config.hue, size=batch)], axis=1).astype(np.float32)


def background_choice(num_backgrounds: int, batch: int, seed: int, step: int, rank: int) -> np.ndarray:
    """Indices of the backgrounds for a teacher batch: a fresh random draw for every sample and step."""
    return _rng(seed, step, rank, 5).integers(num_backgrounds, size=batch)


def sample_order(num_samples: int, seed: int, epoch: int, source: int = 0) -> np.ndarray:
    """The shuffled order of one epoch of data folder ``source`` (the first folder's draw is the one
    a single-folder run has always made)."""
    # the fourth counter of the other folders stays clear of the (seed, step, rank, stream) draws
    return _rng(seed, epoch, 3, *([100 + source] if source else [])).permutation(num_samples)
