"""Re-reading a shard folder: checksums, counts, DALI indexes, and a full decode of every sample
(``verify``); the checksums alone (``check_checksums``, before training)."""
from __future__ import annotations

import json
import os
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .images import decode_member
from .layout import MEMBERS, META_MEMBER, ShardFolderError, index_path, read_manifest, shard_file_problem
from .reader import scan_tar
from .writer import sha256_file, write_index


def _check_sample(kind, where, members, problems, notes):
    """``members``: member name -> bytes; problems and warnings (``notes``) are appended."""
    layout = MEMBERS[kind]
    present = [m for m in layout.images if m in members]
    required = {META_MEMBER, *([layout.label] if layout.label else [])}
    allowed = required | set(layout.optional) | set(layout.images)
    if len(present) != 1:
        problems.append(f"{where}: expected exactly one of {' or '.join(layout.images)}, found {present or 'none'}")
    for name in sorted(required - members.keys()):
        problems.append(f"{where}: missing {name}")
    for name in sorted(members.keys() - allowed):
        problems.append(f"{where}: unexpected member {name}")
    if len(present) != 1 or not required <= members.keys():
        return
    try:
        meta = json.loads(members[META_MEMBER])
        image = decode_member(members[present[0]])
    except Exception as exc:  # noqa: BLE001 - anything undecodable is a problem to report
        problems.append(f"{where}: cannot decode {present[0]} or json ({exc})")
        return
    height, width = image.shape[:2]
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        problems.append(f"{where}: {present[0]} is not 8-bit RGB (shape {image.shape}, {image.dtype})")
    if (meta.get("width"), meta.get("height")) != (width, height) or "source" not in meta:
        problems.append(f"{where}: json {meta} does not match the image's {width}x{height} or lacks source")
    for name in [m for m in members if m.endswith(".png") and m not in layout.images]:
        try:
            label = decode_member(members[name])
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{where}: cannot decode {name} ({exc})")
            continue
        if label.ndim != 2 or label.dtype != np.uint8:
            problems.append(f"{where}: {name} is not 8-bit grey (shape {label.shape}, {label.dtype})")
        elif label.shape != (height, width):
            problems.append(f"{where}: {name} is {label.shape[1]}x{label.shape[0]}, its image {width}x{height}")
        elif name == "mask.png" and not np.isin(np.unique(label), (0, 255)).all():
            problems.append(f"{where}: mask.png holds values other than 0 and 255")
        elif name in ("mask.png", "alpha.png") and not label.any():
            notes.append(f"{where}: {name} has no foreground (every pixel 0)")


def verify(folder, *, warnings_out: list | None = None) -> list[str]:
    """Every problem found in a shard folder; an empty list means it is sound.

    What is sound but suspicious (a mask or alpha without a foreground pixel) is a warning: appended
    to ``warnings_out`` when given, else issued as a ``RuntimeWarning``.
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardFolderError as exc:
        return [str(exc)]
    kind, problems, notes, total = manifest["kind"], [], [], 0
    listed = {s["name"] for s in manifest["shards"]}
    problems += [f"{p}: shard not listed in the manifest" for p in sorted(folder.glob("*.tar")) if p.name not in listed]
    for entry in manifest["shards"]:
        tar_path = folder / entry["name"]
        idx_path = Path(index_path(tar_path))
        problem = shard_file_problem(tar_path)
        if problem:
            problems.append(problem)
            continue
        if sha256_file(tar_path) != entry["sha256"]:
            problems.append(f"{tar_path}: sha256 differs from the manifest (file changed or damaged)")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                write_index(tar_path, Path(tmp) / "expected.idx")
                expected = (Path(tmp) / "expected.idx").read_text()
            except Exception as exc:  # noqa: BLE001
                expected = None
                problems.append(f"{tar_path}: DALI's wds2idx cannot index it ({exc})".replace("\n", " "))
        if not os.path.lexists(idx_path):
            problems.append(f"{idx_path}: DALI index missing (write it with: wds2idx {tar_path} {idx_path})")
        elif shard_file_problem(idx_path):
            problems.append(shard_file_problem(idx_path))
        elif expected is not None and idx_path.read_text(errors="replace") != expected:
            problems.append(f"{idx_path}: DALI index does not match its shard")
        try:
            samples, oddities = scan_tar(str(tar_path))
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"{tar_path}: unreadable tar ({exc})")
            continue
        problems += oddities
        if len(samples) != entry["count"]:
            problems.append(f"{tar_path}: {len(samples)} samples, manifest says {entry['count']}")
        for sample in samples:
            where = f"{tar_path}:{sample.key}"
            try:
                members = {ext: sample.read(ext) for ext in sample.members}
            except OSError as exc:
                problems.append(f"{where}: {exc}")
                continue
            _check_sample(kind, where, members, problems, notes)
        total += len(samples)
    if total != manifest["count"]:
        problems.append(f"{folder}: {total} samples in the shards, manifest says {manifest['count']}")
    if warnings_out is not None:
        warnings_out += notes
    for note in notes if warnings_out is None else ():
        warnings.warn(note, RuntimeWarning, stacklevel=2)
    return problems


def check_checksums(folder) -> list[str]:
    """The shards of a folder that differ from their manifest's sha256 (tampered or damaged), or are
    missing or links, each as one line; an empty list when every shard matches. It reads every byte
    of the shards once and decodes nothing: the check training runs before it
    starts (the full ``verify`` also decodes every sample). A folder whose manifest is missing or
    broken gives that one line."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardFolderError as exc:
        return [str(exc)]
    problems = []
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        problem = shard_file_problem(path)
        if problem is None and sha256_file(path) != entry["sha256"]:
            problem = f"{path}: sha256 differs from the manifest (file changed or damaged)"
        if problem:
            problems.append(problem)
    return problems
