"""Writing samples into shards: parallel decoding, webdataset's ShardWriter, DALI indexes, and a
manifest that makes a killed run resumable.

Each shard is written under a hidden ``.partial`` name, indexed with DALI's ``wds2idx``, and renamed
into place; only then does the manifest (marked ``"complete": false`` until the end) list it. A rerun
of the same command removes leftover partial files and continues after the last listed shard.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm
from wds2idx import IndexCreator

from wsshm.atomic import atomic_path, write_json
from .layout import ERRORS, MANIFEST, TOOL_VERSION, index_path, select_subset
from .pairing import Scan, build_sample

FIXED_MTIME = 946684800  # 2000-01-01: member timestamps fixed so the same input gives the same sha256


class ConversionError(RuntimeError):
    """The conversion stopped (``--on-error fail`` with broken inputs, or a folder holding another job)."""


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(tar_path, idx_path) -> None:
    """DALI's own index for ``fn.readers.webdataset``, written atomically."""
    with atomic_path(idx_path) as tmp, IndexCreator(str(tar_path), str(tmp), verbose=False) as creator:
        creator.create_index()


_KIND = None
_MAX_PIXELS = None


def _init_worker(kind, max_pixels):
    global _KIND, _MAX_PIXELS
    _KIND, _MAX_PIXELS = kind, max_pixels


def _work(spec):
    return build_sample(_KIND, spec, _MAX_PIXELS)


def _results(kind, specs, workers, max_pixels):
    """``build_sample`` over ``specs`` in order, on ``workers`` processes."""
    if workers <= 1 or len(specs) < 2:
        _init_worker(kind, max_pixels)
        yield from map(_work, specs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (kind, max_pixels)) as pool:
        yield from pool.imap(_work, specs, chunksize=max(1, min(16, len(specs) // (workers * 8))))


def _progress(total, desc, enabled):
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _write_errors(out: Path, errors) -> None:
    with atomic_path(out / ERRORS) as tmp, open(tmp, "w") as f:
        for record in errors:
            f.write(json.dumps(record) + "\n")


def _clear_outputs(out: Path) -> None:
    """Empty a shard folder that --overwrite replaces (its shards, indexes, manifest and report)."""
    for path in out.iterdir():
        if path.is_file() and (path.suffix in (".tar", ".idx", ".partial", ".tmp") or path.name in (MANIFEST, ERRORS)):
            path.unlink()


@dataclass
class _Conversion:
    """The state of one :func:`convert` run: the finished shards, the open one, and where each broken
    input stands.

    A resumed run starts again after the last key of the last finished shard and meets again every
    broken input after it, so broken inputs are kept by where they fall: ``saved_errors`` before the
    last key of a finished shard (the unfinished manifest lists them, for the resumed run),
    ``open_errors`` before the last sample written into the open shard, ``trailing_errors`` after the
    last sample written. Pairing errors (``scan.errors``) come again with every scan.
    """

    kind: str
    name: str
    out: Path
    source: dict
    options: dict
    scan: Scan
    shards: list = field(default_factory=list)  # the manifest's entries of the finished shards
    open_keys: list = field(default_factory=list)  # keys written into the open shard
    saved_errors: list = field(default_factory=list)
    open_errors: list = field(default_factory=list)
    trailing_errors: list = field(default_factory=list)
    normalised: int = 0
    reasons: Counter = field(default_factory=Counter)
    written: int = 0  # samples written by this run

    def resume(self, previous: dict) -> None:
        """Continue the unfinished conversion whose manifest is ``previous``."""
        self.shards = list(previous["shards"])
        self.saved_errors = list(previous.get("pending_errors", []))
        normalised = previous.get("normalised", {})
        self.normalised, self.reasons = normalised.get("count", 0), Counter(normalised.get("reasons", {}))

    def error_count(self) -> int:
        return len(self.scan.errors) + len(self.saved_errors) + len(self.open_errors) + len(self.trailing_errors)

    def manifest(self, complete: bool) -> dict:
        data = {"kind": self.kind, "count": sum(s["count"] for s in self.shards), "shards": self.shards,
                "source": self.source, "options": self.options, "version": TOOL_VERSION,
                "normalised": {"count": self.normalised, "reasons": dict(self.reasons)},
                "errors": len(self.scan.errors) + len(self.saved_errors), "ignored_files": self.scan.ignored,
                "complete": complete}
        if not complete:
            data["pending_errors"] = self.saved_errors
        return data

    def skipped(self, errors: list) -> None:
        self.trailing_errors += errors

    def wrote(self, key: str, reasons: list) -> None:
        self.open_keys.append(key)
        self.open_errors += self.trailing_errors
        self.trailing_errors = []
        self.written += 1
        if reasons:
            self.normalised += 1
            self.reasons.update(reasons)

    def finish_shard(self, partial: str) -> None:
        """ShardWriter's ``post``: index the shard, give it its final name, list it in the manifest."""
        keys, self.open_keys = self.open_keys, []
        if not keys:
            os.unlink(partial)
            return
        final = self.out / f"{self.name}-{len(self.shards):06d}.tar"
        write_index(partial, index_path(final))
        digest, size = sha256_file(partial), os.path.getsize(partial)
        os.replace(partial, final)
        self.shards.append({"name": final.name, "count": len(keys), "sha256": digest, "bytes": size,
                            "last_key": keys[-1]})
        self.saved_errors += self.open_errors
        self.open_errors = []
        write_json(self.out / MANIFEST, self.manifest(complete=False))

    def finish(self) -> dict:
        """After the last shard: every broken input into errors.jsonl, the manifest marked complete."""
        self.saved_errors += self.open_errors + self.trailing_errors
        self.open_errors, self.trailing_errors = [], []
        _write_errors(self.out, self.scan.errors + self.saved_errors)
        manifest = self.manifest(complete=True)
        write_json(self.out / MANIFEST, manifest)
        return manifest


def _previous_manifest(out: Path, kind: str, options: dict, source: dict, overwrite: bool) -> dict | None:
    """The manifest of the same conversion already in ``out`` (finished or not), else None; a folder
    holding another conversion is emptied with ``overwrite`` and refused without."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        previous = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    same = (previous is not None and previous.get("kind") == kind and previous.get("options") == options
            and previous.get("source") == source)
    if same:
        return previous
    if not overwrite:
        raise ConversionError(f"{out / MANIFEST}: this folder holds a different conversion; use another --out "
                              "or --overwrite")
    _clear_outputs(out)
    return None


def convert(kind: str, scan: Scan, out, *, name=None, source=None, limit=None, seed=0, maxcount=1000,
            maxsize=1e9, workers=1, on_error="skip", max_pixels=None, overwrite=False, progress=True) -> dict:
    """Convert the paired samples of ``scan`` into a shard folder ``out``; returns a summary dict."""
    from .images import DEFAULT_MAX_PIXELS

    start = time.time()
    out, name = Path(out), name or kind
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    specs = scan.samples
    if limit is not None:
        chosen = set(select_subset([s.key for s in specs], min(limit, len(specs)), seed))
        if limit > len(specs):
            print(f"warning: --limit {limit} but only {len(specs)} paired samples; converting all", file=sys.stderr)
        specs = [s for s in specs if s.key in chosen]
    options = {"name": name, "limit": limit, "seed": seed, "maxcount": maxcount, "maxsize": maxsize,
               "max_pixels": max_pixels, "on_error": on_error}
    source = source or {}

    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(out, kind, options, source, overwrite)
    if previous and previous.get("complete"):
        return {"kind": kind, "count": previous["count"], "shards": len(previous["shards"]),
                "errors": previous.get("errors", 0), "normalised": previous.get("normalised", {}).get("count", 0),
                "already_complete": True, "seconds": time.time() - start}
    for path in out.glob(f".{name}-*"):
        path.unlink()  # leftovers of a killed run

    if on_error == "fail":
        errors = list(scan.errors)
        with _progress(len(specs), f"checking {kind}", progress) as bar:
            for _, _, bad in _results(kind, specs, workers, max_pixels):
                errors.extend(bad or [])
                bar.update()
        if errors:
            _write_errors(out, errors)
            raise ConversionError(f"{len(errors)} broken input(s), nothing converted (--on-error fail); "
                                  f"see {out / ERRORS}")

    run = _Conversion(kind, name, out, source, options, scan)
    resume_at = 0
    if previous:
        run.resume(previous)
        position = {s.key: i for i, s in enumerate(specs)}
        if run.shards and run.shards[-1]["last_key"] not in position:
            raise ConversionError(f"{out / MANIFEST}: the inputs changed since the interrupted run; use --overwrite")
        resume_at = position[run.shards[-1]["last_key"]] + 1 if run.shards else 0
    todo = specs[resume_at:]

    writer = wds.ShardWriter(str(out / f".{name}-%06d.tar.partial"), maxcount=maxcount, maxsize=maxsize,
                             post=run.finish_shard, start_shard=len(run.shards), verbose=0, encoder=False,
                             mtime=FIXED_MTIME, user="wsshm", group="wsshm", mode=0o444)
    with _progress(len(todo), f"{kind} -> {out}", progress) as bar:
        for spec, (members, reasons, bad) in zip(todo, _results(kind, todo, workers, max_pixels)):
            if bad:
                run.skipped(bad)
            else:
                writer.write({"__key__": spec.key, **members})  # may close the previous shard first
                run.wrote(spec.key, reasons)
            bar.update()
            bar.set_postfix(ok=run.written, errors=run.error_count(), refresh=False)
    writer.close()  # finishes the last shard
    manifest = run.finish()
    return {"kind": kind, "count": manifest["count"], "shards": len(run.shards), "errors": manifest["errors"],
            "normalised": run.normalised, "resumed_after": resume_at, "converted_now": run.written,
            "seconds": time.time() - start, "already_complete": False}
