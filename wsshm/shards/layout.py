"""The shard folder layout of SPEC section 5: kinds and their members, member names, manifest, shard
and index paths, the folder check, keys and subsets.

Everything that reads or writes a shard folder (the converter, ``verify``, the loaders, the
evaluator) agrees on it through this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

TOOL_VERSION = "wsshm-shard 0.1.0"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
META_MEMBER = "json"  # every sample's source path, width and height


@dataclass(frozen=True)
class Members:
    """The members of one sample of a kind, besides ``json``."""

    images: tuple[str, ...]  # exactly one of them: the RGB image as stored (jpg) or re-encoded (png)
    label: str | None = None  # 8-bit grey, the image's size
    optional: tuple[str, ...] = ()

    def image_member(self, ext: str) -> str:
        """The image member for a stored format: ``jpg`` -> ``jpg`` or ``fg.jpg``."""
        return next(m for m in self.images if m.rsplit(".", 1)[-1] == ext)

    def image_in(self, names) -> str | None:
        """The image member among ``names``, or None."""
        return next((m for m in self.images if m in names), None)


MEMBERS = {
    "matte": Members(("fg.jpg", "fg.png"), "alpha.png"),
    "background": Members(("jpg", "png")),
    "seg": Members(("jpg", "png"), "mask.png"),
    "eval": Members(("jpg", "png"), "alpha.png", optional=("trimap.png",)),
}
KINDS = tuple(MEMBERS)


class ShardFolderError(ValueError):
    """A shard folder that cannot be used; the message is one line naming the folder or file."""


def split_member(name: str) -> tuple[str, str]:
    """A tar member name -> ``(key, extension)``, split at the first dot after the last slash, as
    webdataset and DALI do (``a/b.fg.png`` -> ``a/b``, ``fg.png``); no dot: ``(name, "")``."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def index_path(shard) -> str:
    """The DALI index beside a shard: ``matte-000000.tar`` -> ``matte-000000.idx`` (the name DALI's
    ``wds2idx`` picks by default)."""
    shard = os.fspath(shard)
    return (shard[: -len(".tar")] if shard.endswith(".tar") else shard) + ".idx"


def sample_key(relative_stem: str) -> str:
    """A tar key for a source path without extension: no dots (webdataset and DALI split member names
    at the first dot) and no whitespace (DALI's index is space-separated)."""
    return re.sub(r"[^\w/-]", "_", relative_stem.replace(os.sep, "/"))


def _check_entries(path: Path, manifest: dict) -> None:
    """The shard entries of a manifest (which nothing but wsshm should write, but anyone can edit):
    each an object with a plain file name of the folder, a count and a sha256; ``ShardFolderError``
    naming the file and the entry otherwise."""
    def broken(problem):
        return ShardFolderError(f"{path}: broken manifest, {problem}")

    if not isinstance(manifest["shards"], list):
        raise broken("shards must be a list")
    if not _whole(manifest["count"]):
        raise broken(f"count must be a whole number, not {manifest['count']!r}")
    names = set()
    for n, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict):
            raise broken(f"shard entry {n} is not an object ({entry!r:.60})")
        missing = [k for k in ("name", "count", "sha256") if k not in entry]
        if missing:
            raise broken(f"shard entry {n} lacks {', '.join(missing)}")
        name = entry["name"]
        if not isinstance(name, str) or not name:
            raise broken(f"shard entry {n} has no file name ({name!r:.60})")
        if not is_plain_name(name):
            raise broken(f"shard entry {n}: {name!r:.80} is not a plain file name in the folder")
        if name in names:
            raise broken(f"shard entry {n} lists {name} twice")
        names.add(name)
        if not _whole(entry["count"]):
            raise broken(f"shard entry {n}: count must be a whole number, not {entry['count']!r:.40}")
        if not (isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise broken(f"shard entry {n}: sha256 must be 64 hexadecimal digits, not {entry['sha256']!r:.80}")
    total = sum(entry["count"] for entry in manifest["shards"])
    if manifest["count"] != total:
        raise broken(f"count {manifest['count']} is not the sum of the shards' counts ({total})")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_plain_name(name: str) -> bool:
    """Whether ``name`` names a file directly inside a folder: no path separator, not absolute, not
    ``.`` or ``..``, no NUL (a manifest naming ``../../x.tar`` would make readers leave the folder)."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and os.path.basename(name) == name)


_KEY = re.compile(r"[\w-]+(/[\w-]+)*")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a sample key, or None. Keys are relative paths of letters, digits, ``_``,
    ``-`` and ``/`` (what :func:`sample_key` makes): a dot would split the member name where webdataset
    and DALI split it, whitespace would break DALI's space-separated index, and a leading ``/`` or an
    empty part is no relative path."""
    if _KEY.fullmatch(key):
        return None
    return f"key {key!r:.120} is not a relative path of letters, digits, _, - and /"


def read_manifest(folder) -> dict:
    """The manifest of a finished shard folder, its shard entries checked (:func:`_check_entries`);
    ``ShardFolderError`` naming the file otherwise."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardFolderError(f"{path}: no manifest (not a shard folder, or a conversion that never started)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFolderError(f"{path}: unreadable manifest ({exc})".replace("\n", " ")) from exc
    missing = [k for k in ("kind", "count", "shards") if k not in manifest] if isinstance(manifest, dict) else ["all"]
    if missing:
        raise ShardFolderError(f"{path}: broken manifest, missing {', '.join(missing)}")
    if manifest.get("complete") is False:
        raise ShardFolderError(f"{path}: the conversion did not finish; run the same wsshm-shard command again")
    if manifest["kind"] not in KINDS:
        raise ShardFolderError(f"{path}: unknown kind {manifest['kind']!r:.40} (expected one of {', '.join(KINDS)})")
    _check_entries(path, manifest)
    return manifest


def shard_file_problem(path) -> str | None:
    """Why the shard (or index) file ``path`` of a folder cannot be read, or None: missing, a symbolic
    link (it could point anywhere; wsshm reads only the folder's own files), not a regular file."""
    path = Path(path)
    if path.is_symlink():
        return f"{path}: a symbolic link, not a shard file (wsshm reads only the files of the folder itself)"
    if not path.exists():
        return f"{path}: missing"
    if not path.is_file():
        return f"{path}: not a regular file"
    return None


def shard_paths(folder) -> list[str]:
    """Paths of the shard tars of a finished folder, in manifest order."""
    return [str(Path(folder) / s["name"]) for s in read_manifest(folder)["shards"]]


def index_paths(folder) -> list[str]:
    """Paths of the DALI index files, parallel to :func:`shard_paths`."""
    return [index_path(p) for p in shard_paths(folder)]


def check_folder(folder, kind: str | None = None, num_samples: int | None = None) -> dict:
    """The manifest of a shard folder that a reader can use, checked from the manifest and the file
    list (cheap: nothing is decoded; :func:`wsshm.shards.verify` reads everything,
    :func:`wsshm.shards.check_checksums` the shards' checksums).

    ``ShardFolderError``, one line naming the folder or file, for: no folder given, a missing folder,
    a missing, broken or unfinished manifest (shard names that are not plain file names of the folder
    included), another ``kind`` than asked, a listed shard file missing or a symbolic link, no samples,
    or ``num_samples`` that is not between 1 and the folder's count.
    """
    if folder is None:
        raise ShardFolderError(f"no {kind + ' ' if kind else ''}shard folder given")
    if not Path(folder).is_dir():
        raise ShardFolderError(f"{folder}: shard folder not found")
    manifest = read_manifest(folder)
    if kind is not None and manifest["kind"] != kind:
        raise ShardFolderError(f"{folder}: holds {manifest['kind']!r} shards where {kind!r} shards are needed")
    for entry in manifest["shards"]:
        problem = shard_file_problem(Path(folder) / entry["name"])
        if problem and problem.endswith(": missing"):
            raise ShardFolderError(f"{folder}: shard file missing: {Path(folder) / entry['name']}")
        if problem:
            raise ShardFolderError(problem)
    count = manifest["count"]
    if count <= 0 or not manifest["shards"]:
        raise ShardFolderError(f"{folder}: the shard folder holds no samples")
    if num_samples is not None and not 0 < num_samples <= count:
        raise ShardFolderError(f"{folder}: holds {count} samples; cannot select {num_samples}")
    return manifest


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
