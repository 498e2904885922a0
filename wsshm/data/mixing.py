"""Several data folders read as one stream, each at its asked-for share of every global batch
(``--seg data/seg data/pseudo --seg-weights 1 0.5``; docs/data.md "Several folders").

Position ``t`` of the stream (global batch ``step`` holds ``step*G .. step*G + G-1``) belongs to
folder 0 when ``floor((t+1)*q + phi) > floor(t*q + phi)`` with ``q`` folder 0's share: a Sturmian
(Beatty) sequence, so any ``G`` consecutive positions hold ``floor`` or ``ceil`` of ``G*q`` of folder 0,
and the count before ``t`` has a closed form, ``floor(t*q + phi)``. The other positions are split
the same way between folder 1 and the rest, and so on. The closed form gives each position's rank
within its folder: the PyTorch loader reads that folder's shuffled stream there (no sample repeats
before the folder's epoch is used up; ranks stay disjoint), from the step alone, so resume is exact.
DALI's readers advance for every sample, the chosen one decodes (``dali_backend``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsshm.shards import ShardSet, open_shard_set


def check_weights(folders: list, weights) -> tuple[float, ...] | None:
    """The weights as floats, or None for the default; ``ValueError`` in one line when they do not fit."""
    if weights is None:
        return None
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} mixing weights for {len(folders)} folders; give one weight per folder")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"mixing weights must be positive numbers, got {' '.join(f'{w:g}' for w in weights)}")
    return weights


def as_folders(folders) -> list[str]:
    """One folder (a str or path) or a sequence of them, as a list of str."""
    if isinstance(folders, (str, bytes)) or not hasattr(folders, "__iter__"):
        return [str(folders)]
    return [str(f) for f in folders]


@dataclass(frozen=True)
class Mixture:
    """The shard sets of the folders and their mixing weights."""

    sets: tuple[ShardSet, ...]
    weights: tuple[float, ...]

    def identity(self) -> list[list]:
        """What a resumed loader must agree on: each folder's size and weight."""
        return [[len(s), w] for s, w in zip(self.sets, self.weights)]

    def streams(self, positions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """int arrays: the folder of each stream position, and the position's rank within that folder."""
        return interleave(self.weights, np.asarray(positions, np.int64), seed)

    def choice(self, batch: int, world_size: int, seed: int, step: int, rank: int) -> np.ndarray:
        """int ``[batch]``: the folder of each sample of this rank's batch ``step``."""
        first = (step * world_size + rank) * batch
        return self.streams(np.arange(first, first + batch), seed)[0]

    def undersized(self, global_batch: int) -> list[str]:
        """The folders holding fewer samples than their share of a global batch."""
        total = sum(self.weights)
        shares = [math.ceil(global_batch * w / total) for w in self.weights]
        return [f"{s.folder}: {len(s)} samples for its {share} of a global batch of {global_batch}"
                for s, share in zip(self.sets, shares) if len(s) < share]


def interleave(weights, positions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(folder, rank within the folder) of each stream position (module docstring)."""
    folder = np.full(positions.shape, len(weights) - 1, np.int64)
    within = positions.copy()
    rest = within.copy()  # each position's rank among the positions not yet given a folder
    undecided = np.ones(positions.shape, bool)
    for i, weight in enumerate(weights[:-1]):
        share = weight / float(sum(weights[i:]))  # <= 1: no position is counted twice
        phase = float(np.random.default_rng([seed, 6, i]).uniform())
        before = np.floor(rest * share + phase).astype(np.int64)
        mine = undecided & (np.floor((rest + 1) * share + phase).astype(np.int64) > before)
        folder[mine], within[mine] = i, before[mine]
        undecided &= ~mine
        rest = rest - before
        within[undecided] = rest[undecided]
    return folder, within


def open_mixture(folders, weights, kind: str, num_samples: int | None, seed: int) -> Mixture:
    """The folders' shard sets (``num_samples`` subsets the first folder: the labelled one of a
    labelled + pseudo-labelled mix); default weights: the folders' sizes, as if concatenated."""
    folders = as_folders(folders)
    weights = check_weights(folders, weights)
    sets = tuple(open_shard_set(folder, kind, num_samples if i == 0 else None, seed)
                 for i, folder in enumerate(folders))
    return Mixture(sets, weights or tuple(float(len(s)) for s in sets))
