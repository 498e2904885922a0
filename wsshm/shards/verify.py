"""Re-reading a shard folder: checksums, counts, DALI indexes, and a full decode of every sample."""
from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .images import decode_member
from .layout import MEMBERS, META_MEMBER, ShardFolderError, index_path, read_manifest
from .reader import scan_tar
from .writer import sha256_file, write_index


def _check_sample(kind, where, members, problems):
    """``members``: member name -> bytes."""
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


def verify(folder) -> list[str]:
    """Every problem found in a shard folder; an empty list means it is sound."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ShardFolderError as exc:
        return [str(exc)]
    kind, problems, total = manifest["kind"], [], 0
    listed = {s["name"] for s in manifest["shards"]}
    problems += [f"{p}: shard not listed in the manifest" for p in sorted(folder.glob("*.tar")) if p.name not in listed]
    for entry in manifest["shards"]:
        tar_path = folder / entry["name"]
        idx_path = Path(index_path(tar_path))
        if not tar_path.is_file():
            problems.append(f"{tar_path}: missing")
            continue
        if sha256_file(tar_path) != entry["sha256"]:
            problems.append(f"{tar_path}: sha256 differs from the manifest (file changed or damaged)")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                write_index(tar_path, Path(tmp) / "expected.idx")
                expected = (Path(tmp) / "expected.idx").read_text()
            except Exception as exc:  # noqa: BLE001
                expected = None
                problems.append(f"{tar_path}: DALI's wds2idx cannot index it ({exc})")
        if not idx_path.is_file():
            problems.append(f"{idx_path}: DALI index missing (write it with: wds2idx {tar_path} {idx_path})")
        elif expected is not None and idx_path.read_text() != expected:
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
            if "." in sample.key:
                problems.append(f"{tar_path}: key {sample.key!r} holds a dot")
            try:
                members = {ext: sample.read(ext) for ext in sample.members}
            except OSError as exc:
                problems.append(f"{where}: {exc}")
                continue
            _check_sample(kind, where, members, problems)
        total += len(samples)
    if total != manifest["count"]:
        problems.append(f"{folder}: {total} samples in the shards, manifest says {manifest['count']}")
    return problems
