"""Files written so that a reader, or a writer killed half-way, never sees half a file, and so that a
symbolic link planted in the folder cannot redirect a write to another file.

Every temporary is created new (``O_CREAT | O_EXCL``: a link or file already at that name makes the
creation fail, never followed) under an unpredictable name, and takes its final name with
``os.replace``, which replaces a link at the final name instead of writing through it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

TEMPORARY_SUFFIX = ".tmp"


@functools.cache
def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, which would
    briefly give other threads' new files the wrong mode)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def create_exclusive(path: str | os.PathLike) -> BinaryIO:
    """A new file at ``path`` open for binary writing, with the usual mode (0666 less the umask);
    ``FileExistsError`` when anything, a symbolic link included, is already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o666), "wb")


def open_no_follow(path: str | os.PathLike, mode: str = "w", **text_options):
    """``open(path, mode)`` for a log written as it grows ("w" or "a", text), except that a symbolic link
    at ``path`` is refused (``OSError``, ELOOP) instead of followed to the file it names."""
    if mode not in ("w", "a"):
        raise ValueError(f"mode {mode!r}: 'w' or 'a'")
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_TRUNC if mode == "w" else os.O_APPEND
    return os.fdopen(os.open(path, flags, 0o666), mode, **text_options)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, hidden temporary sibling of ``path`` (``.NAME.<random>.tmp``, already created,
    empty) to write; it replaces ``path`` when the block succeeds and is removed when it fails. The
    parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    tmp = Path(name)
    try:
        try:
            os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide weights and shards from the group
        finally:
            os.close(handle)
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def is_temporary_of(name: str, final_name: str) -> bool:
    """Whether the file name ``name`` is a temporary :func:`atomic_path` made for ``final_name``
    (also the ``.NAME.PID.tmp`` of earlier versions), so that a rerun may remove it as a leftover."""
    prefix = f".{final_name}."
    if not (name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX)):
        return False
    return re.fullmatch(r"[a-z0-9_]+", name[len(prefix):-len(TEMPORARY_SUFFIX)]) is not None  # mkstemp's letters


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, flushed to disk before it takes the name."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (reports, READMEs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
