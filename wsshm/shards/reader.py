"""Reading shards: the samples of a tar with each member's offset and size, from the shard's DALI
index or by scanning the tar, and their decoding. The loaders, ``verify`` and the evaluator all read
through here.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field

import cv2
import numpy as np

from .images import BadInput, open_image
from .layout import (MEMBERS, ShardFolderError, check_folder, index_path, key_problem, select_subset,
                     shard_file_problem, shard_paths, split_member)


class CorruptSample(ValueError):
    """A sample that lacks a member or does not decode; the message names the shard and the key."""


@dataclass
class Sample:
    key: str
    shard: str
    members: dict = field(default_factory=dict)  # extension -> (offset, size) in the tar

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(self.shard, "rb") as f:
            # checked before reading: a size from a hostile index or tar header (1 TB) would be allocated
            if offset < 0 or size < 0 or offset + size > os.fstat(f.fileno()).st_size:
                raise OSError(f"{self.shard}: member {self.key}.{ext} declares {size} bytes at {offset}, "
                              "beyond the end of the file")
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shard}: member {self.key}.{ext} is truncated")
        return data

    def index_line(self) -> str:
        """The sample's line in a DALI index (v1.2), for index files of a subset."""
        return " ".join(f"{ext} {offset} {size} {self.key}.{ext}" for ext, (offset, size) in self.members.items())


def parse_index(shard: str, idx: str) -> list[Sample]:
    """The samples listed in a DALI v1.2 webdataset index, each line checked against the layout and
    the shard's size (an index declaring a member beyond the shard is refused before anything is
    read); ``ShardFolderError`` naming the index and the line otherwise."""
    shard_size = os.path.getsize(shard)
    with open(idx) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            raise ShardFolderError(f"{idx}: not a DALI v1.2 webdataset index (header {' '.join(header)!r:.80}); "
                                   f"rebuild it with: wds2idx {shard} {idx}")
        samples = []
        for line_no, line in enumerate(f, start=2):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) % 4:
                raise ShardFolderError(f"{idx}: line {line_no} is malformed (not groups of: ext offset size name)")
            sample = Sample(split_member(tokens[3])[0], shard)
            for ext, offset, size, name in zip(*[iter(tokens)] * 4):
                problem = key_problem(sample.key) or (name != f"{sample.key}.{ext}" and "not its key and extension")
                if problem:
                    raise ShardFolderError(f"{idx}: line {line_no} names member {name[:120]}: {problem}")
                if not (offset.isdigit() and size.isdigit()):
                    raise ShardFolderError(f"{idx}: line {line_no} is malformed (offset {offset[:20]!r}, "
                                           f"size {size[:20]!r})")
                offset, size = int(offset), int(size)
                if offset + size > shard_size:
                    raise ShardFolderError(f"{idx}: line {line_no} declares {name[:120]} of {size} bytes at {offset}, "
                                           f"beyond the end of its shard ({shard_size} bytes)")
                sample.members[ext] = (offset, size)
            samples.append(sample)
    return samples


def scan_tar(shard: str) -> tuple[list[Sample], list[str]]:
    """The samples of a tar in order, and what does not fit the layout (entries that are not regular
    files, members without a key or an extension, keys that are no relative path of word characters
    (:func:`~wsshm.shards.layout.key_problem`), a member twice, a key whose members are not adjacent,
    which webdataset and DALI would read as two samples). Raises ``tarfile.TarError``/``OSError``
    (a member declaring more bytes than the tar holds included)."""
    samples: dict[str, Sample] = {}
    oddities = []
    last = None
    with tarfile.open(shard) as tar:
        for info in tar:
            key, ext = split_member(info.name)
            if not info.isfile():
                oddities.append(f"{shard}: {info.name} is not a regular file")
                continue
            if not ext or not key or key.endswith("/"):
                oddities.append(f"{shard}: {info.name} is not a sample member (no key or no extension)")
                continue
            if key in samples and key != last:
                oddities.append(f"{shard}: the members of {key} are not adjacent")
            if key not in samples and key_problem(key):
                oddities.append(f"{shard}: {key_problem(key)}")
            sample = samples.setdefault(key, Sample(key, shard))
            if ext in sample.members:
                oddities.append(f"{shard}: {info.name} appears twice")
            sample.members[ext] = (info.offset_data, info.size)
            last = key
    return list(samples.values()), oddities


def read_samples(shard: str) -> list[Sample]:
    """The samples of one tar, from its DALI index when it has one, else by scanning the tar."""
    idx = index_path(shard)
    if os.path.lexists(idx) and shard_file_problem(idx):
        raise ShardFolderError(shard_file_problem(idx))
    try:
        return parse_index(shard, idx) if os.path.isfile(idx) else scan_tar(shard)[0]
    except (OSError, tarfile.TarError, UnicodeDecodeError) as exc:
        raise ShardFolderError(f"{shard}: cannot read shard ({exc})".replace("\n", " ")) from exc


def decode_image_or_raise(data: bytes, grey: bool = False) -> np.ndarray:
    """Encoded bytes -> RGB uint8 ``HxWx3`` (or grey ``HxW``) with OpenCV. ``BadInput`` saying why when
    they are empty, not an image, over ``wsshm.image.MAX_IMAGE_PIXELS`` (read from the header, before
    any pixel is decoded), or OpenCV cannot decode them (it returns None for some broken files and
    raises ``cv2.error`` for others, e.g. empty ones)."""
    open_image(data)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise BadInput(f"OpenCV cannot decode it ({str(exc).strip().splitlines()[-1][:200]})") from exc
    if image is None:
        raise BadInput("OpenCV cannot decode it")
    return image if grey else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, grey: bool = False) -> np.ndarray | None:
    """:func:`decode_image_or_raise`, with None for bytes that do not decode."""
    try:
        return decode_image_or_raise(data, grey)
    except BadInput:
        return None


def decode_sample(sample: Sample, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 HxWx3, label uint8 HxW or None) of one sample of ``kind``; ``CorruptSample``
    naming the shard and key when a member is missing, does not decode, or the sizes differ."""
    members = MEMBERS[kind]
    image_ext = members.image_in(sample.members)
    where = f"{sample.shard}: sample {sample.key}"
    if image_ext is None or (members.label and members.label not in sample.members):
        raise CorruptSample(f"{where}: missing members (has {', '.join(sorted(sample.members))})")
    decoded = []
    for ext, grey in ((image_ext, False), (members.label, True)):
        if ext is None:
            decoded.append(None)
            continue
        try:
            decoded.append(decode_image_or_raise(sample.read(ext), grey))
        except OSError as exc:
            raise CorruptSample(f"{where}: {exc}") from exc
        except BadInput as exc:
            raise CorruptSample(f"{where}: member {ext}: {exc}") from exc
    image, label = decoded
    if label is not None and label.shape != image.shape[:2]:
        raise CorruptSample(f"{where}: {members.label} is {label.shape[1]}x{label.shape[0]}, "
                            f"the image {image.shape[1]}x{image.shape[0]}")
    return image, label


@dataclass
class ShardSet:
    """The samples of one shard folder of a kind, reduced to a ``num_samples`` subset when asked."""

    folder: str
    kind: str
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shards(self) -> list[str]:
        """The tars that hold the samples, in folder order."""
        return list(dict.fromkeys(s.shard for s in self.samples))


def open_shard_set(folder, kind: str, num_samples: int | None = None, seed: int = 0) -> ShardSet:
    """The samples of a shard folder of ``kind`` (the deterministic ``num_samples`` subset when asked);
    ``ShardFolderError`` naming the folder when it cannot be used."""
    manifest = check_folder(folder, kind, num_samples)
    samples = [s for path in shard_paths(folder) for s in read_samples(path)]
    if len(samples) != manifest["count"]:
        raise ShardFolderError(f"{folder}: the shards hold {len(samples)} samples, the manifest says "
                               f"{manifest['count']} (run wsshm-shard verify {folder})")
    if num_samples is not None:
        chosen = set(select_subset([s.key for s in samples], num_samples, seed))
        samples = [s for s in samples if s.key in chosen]
    return ShardSet(str(folder), kind, samples)
