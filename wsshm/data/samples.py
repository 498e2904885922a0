"""Random access to the samples of a shard folder (SPEC section 5) through the shards' DALI indexes.

Both loaders start here: the PyTorch loader reads members at their offsets, the DALI loader gives the
same index files (filtered to a ``num_samples`` subset when asked) to ``fn.readers.webdataset``.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

# The members each loader form needs, per folder kind: (image member choices, label member or None).
IMAGE_MEMBERS = {"matte": ("fg.jpg", "fg.png"), "seg": ("jpg", "png"), "background": ("jpg", "png")}
LABEL_MEMBER = {"matte": "alpha.png", "seg": "mask.png", "background": None}


class DataError(ValueError):
    """A shard folder the loaders cannot use; the message names the folder or file."""


@dataclass
class Sample:
    key: str
    shard: str
    members: dict = field(default_factory=dict)  # extension -> (offset, size)
    index_line: str = ""  # the sample's line in a DALI index (v1.2), for filtered indexes

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(self.shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shard}: member {self.key}.{ext} is truncated")
        return data


def index_path_for(shard: str) -> str | None:
    """The DALI index beside a shard (``x.idx`` or ``x.tar.idx``), or None."""
    for candidate in (shard[: -len(".tar")] + ".idx" if shard.endswith(".tar") else None, shard + ".idx"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _parse_index(shard: str, idx: str) -> list[Sample]:
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            raise DataError(f"{idx}: not a DALI v1.2 webdataset index (header {' '.join(header)!r}); "
                            f"rebuild it with: wds2idx {shard} {idx}")
        samples = []
        for line_no, line in enumerate(f, start=2):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) % 4:
                raise DataError(f"{idx}: line {line_no} is malformed")
            members = {}
            key = None
            for ext, offset, size, name in zip(*[iter(tokens)] * 4):
                members[ext] = (int(offset), int(size))
                key = name[: name.find(".", name.rfind("/") + 1)]
            samples.append(Sample(key, shard, members, line.rstrip("\n")))
    return samples


def _scan_tar(shard: str) -> list[Sample]:
    samples: dict[str, Sample] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name[member.name.rfind("/") + 1 :]
            dot = member.name.find(".", member.name.rfind("/") + 1)
            if dot < 0 or not base or base.startswith("."):
                continue
            key, ext = member.name[:dot], member.name[dot + 1 :]
            samples.setdefault(key, Sample(key, shard)).members[ext] = (member.offset_data, member.size)
    for s in samples.values():
        s.index_line = " ".join(f"{e} {o} {n} {s.key}.{e}" for e, (o, n) in s.members.items())
    return list(samples.values())


def read_samples(shard: str) -> list[Sample]:
    """The samples of one tar, from its DALI index when it has one (else by scanning the tar)."""
    idx = index_path_for(shard)
    try:
        return _parse_index(shard, idx) if idx else _scan_tar(shard)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{shard}: cannot read shard ({exc})") from exc


@dataclass
class ShardSet:
    """One shard folder of a given kind, reduced to a ``num_samples`` subset when asked."""

    folder: str
    kind: str
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shards(self) -> list[str]:
        return sorted({s.shard for s in self.samples}, key=lambda p: self._order[p])

    def __post_init__(self):
        self._order = {}
        for s in self.samples:
            self._order.setdefault(s.shard, len(self._order))


def open_shard_set(folder, kind: str, num_samples: int | None = None, seed: int = 0) -> ShardSet:
    """Open a shard folder of ``kind``; a clear ``DataError`` for a missing, empty or wrong folder."""
    from wsshm import shards

    if folder is None:
        raise DataError(f"no {kind} shard folder given")
    folder = str(folder)
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: shard folder not found")
    try:
        manifest = shards.read_manifest(folder)
        paths = shards.shard_paths(folder)
    except ValueError as exc:  # ShardFolderError is a ValueError
        raise DataError(str(exc)) from exc
    if manifest["kind"] != kind:
        raise DataError(f"{folder}: holds {manifest['kind']!r} shards, this loader needs {kind!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{folder}: shard file missing: {missing[0]}")
    samples = [s for p in paths for s in read_samples(p)]
    if not samples:
        raise DataError(f"{folder}: the shard folder holds no samples")
    if num_samples is not None:
        chosen = set(shards.select_subset([s.key for s in samples], num_samples, seed))
        samples = [s for s in samples if s.key in chosen]
    return ShardSet(folder, kind, samples)
