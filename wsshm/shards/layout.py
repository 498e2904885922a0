"""The shard folder layout of SPEC section 5: manifest, shard and index paths, keys, subsets.

Everything that reads or writes a shard folder agrees on it through this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from wsshm.atomic import atomic_path

TOOL_VERSION = "wsshm-shard 0.1.0"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
KINDS = ("matte", "background", "seg", "eval")

# Members per key, besides "json" (SPEC section 5). "image" stands for "jpg" or "png"; for matte
# data the image member is called fg.jpg / fg.png.
IMAGE_MEMBER = {"matte": "fg", "background": "", "seg": "", "eval": ""}
LABEL_MEMBERS = {"matte": ("alpha.png",), "background": (), "seg": ("mask.png",), "eval": ("alpha.png",)}
OPTIONAL_MEMBERS = {"eval": ("trimap.png",)}


class ShardFolderError(ValueError):
    """A shard folder that cannot be used (missing or broken manifest, unfinished conversion)."""


def image_member(kind: str, ext: str) -> str:
    """Tar member suffix of the image of a sample: ``jpg``/``png`` or ``fg.jpg``/``fg.png``."""
    prefix = IMAGE_MEMBER[kind]
    return f"{prefix}.{ext}" if prefix else ext


def index_name(shard_name: str) -> str:
    """``matte-000000.tar`` -> ``matte-000000.idx`` (the name DALI's ``wds2idx`` picks by default)."""
    return shard_name[: -len(".tar")] + ".idx" if shard_name.endswith(".tar") else shard_name + ".idx"


def sample_key(relative_stem: str) -> str:
    """A tar key for a source path without extension: no dots (webdataset and DALI split member names
    at the first dot) and no whitespace (DALI's index is space-separated)."""
    return re.sub(r"[^\w/-]", "_", relative_stem.replace(os.sep, "/"))


def read_manifest(folder) -> dict:
    """The manifest of a finished shard folder; ``ShardFolderError`` naming the file otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardFolderError(f"{path}: no manifest (not a shard folder, or a conversion that never started)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFolderError(f"{path}: unreadable manifest ({exc})") from exc
    missing = [k for k in ("kind", "count", "shards") if k not in manifest] if isinstance(manifest, dict) else ["all"]
    if missing:
        raise ShardFolderError(f"{path}: broken manifest, missing {', '.join(missing)}")
    if manifest.get("complete") is False:
        raise ShardFolderError(f"{path}: the conversion did not finish; run the same wsshm-shard command again")
    if manifest["kind"] not in KINDS:
        raise ShardFolderError(f"{path}: unknown kind {manifest['kind']!r} (expected one of {', '.join(KINDS)})")
    return manifest


def shard_paths(folder) -> list[str]:
    """Paths of the shard tars of a finished folder, in manifest order."""
    return [str(Path(folder) / s["name"]) for s in read_manifest(folder)["shards"]]


def index_paths(folder) -> list[str]:
    """Paths of the DALI index files, parallel to :func:`shard_paths`."""
    return [str(Path(folder) / index_name(s["name"])) for s in read_manifest(folder)["shards"]]


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def select_subset(keys, n, seed=0) -> list:
    """The deterministic subset rule: the ``n`` keys with the smallest ``sha256(seed, key)``, returned
    in the order they come in ``keys``.

    It depends only on the set of keys, ``n`` and ``seed`` (not on the input order), and the subsets of
    one seed are nested (the 50 matte labels are among the 200), as the paper's data-amount sweeps
    need. ``n=None`` keeps every key.
    """
    keys = list(keys)
    if len(set(keys)) != len(keys):
        raise ValueError("select_subset: keys must be unique")
    if n is None:
        return keys
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"select_subset: n must be a non-negative integer, got {n!r}")
    if n > len(keys):
        raise ValueError(f"select_subset: asked for {n} samples but only {len(keys)} are available")
    chosen = set(sorted(keys, key=lambda k: _rank(seed, str(k)))[:n])
    return [k for k in keys if k in chosen]


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that a reader (or a killed writer) never sees half a file."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
