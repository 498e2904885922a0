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
from pathlib import Path

import webdataset as wds
from tqdm import tqdm
from wds2idx import IndexCreator

from wsshm.atomic import atomic_path
from .layout import ERRORS, MANIFEST, TOOL_VERSION, index_name, select_subset, write_json_atomic
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
    previous = None
    if (out / MANIFEST).is_file():
        try:
            previous = json.loads((out / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        same = (previous is not None and previous.get("kind") == kind and previous.get("options") == options
                and previous.get("source") == source)
        if not same and not overwrite:
            raise ConversionError(f"{out / MANIFEST}: this folder holds a different conversion; use another --out "
                                  "or --overwrite")
        if not same:
            _clear_outputs(out)
            previous = None
        elif previous.get("complete"):
            return {"kind": kind, "count": previous["count"], "shards": len(previous["shards"]),
                    "errors": previous.get("errors", 0), "normalised": previous.get("normalised", {}).get("count", 0),
                    "already_complete": True, "seconds": time.time() - start}
    for path in out.glob(f".{name}-*"):
        path.unlink()  # leftovers of a killed run

    errors = list(scan.errors)
    if on_error == "fail":
        with _progress(len(specs), f"checking {kind}", progress) as bar:
            for spec, (_, _, bad) in zip(specs, _results(kind, specs, workers, max_pixels)):
                errors.extend(bad or [])
                bar.update()
        if errors:
            _write_errors(out, errors)
            raise ConversionError(f"{len(errors)} broken input(s), nothing converted (--on-error fail); "
                                  f"see {out / ERRORS}")

    shards = list(previous["shards"]) if previous else []
    done_errors = list(previous.get("pending_errors", [])) if previous else []
    reasons = Counter(previous.get("normalised", {}).get("reasons", {})) if previous else Counter()
    normalised = previous.get("normalised", {}).get("count", 0) if previous else 0
    resume_at = 0
    if shards:
        position = {s.key: i for i, s in enumerate(specs)}
        if shards[-1]["last_key"] not in position:
            raise ConversionError(f"{out / MANIFEST}: the inputs changed since the interrupted run; use --overwrite")
        resume_at = position[shards[-1]["last_key"]] + 1
    todo = specs[resume_at:]

    # "errors": broken samples since the last written one; "shard_errors": those before it, which the
    # current shard's last key covers when the run resumes.
    state = {"keys": [], "errors": [], "shard_errors": [], "normalised": normalised, "reasons": reasons}

    def manifest(complete):
        count = sum(s["count"] for s in shards)
        data = {"kind": kind, "count": count, "shards": shards, "source": source, "options": options,
                "version": TOOL_VERSION, "normalised": {"count": state["normalised"], "reasons": dict(state["reasons"])},
                "errors": len(errors) + len(done_errors), "ignored_files": scan.ignored,
                "complete": complete}
        if not complete:
            data["pending_errors"] = done_errors
        return data

    def finish_shard(partial):
        keys, state["keys"] = state["keys"], []
        if not keys:
            os.unlink(partial)
            return
        final = f"{name}-{len(shards):06d}.tar"
        write_index(partial, out / index_name(final))
        digest, size = sha256_file(partial), os.path.getsize(partial)
        os.replace(partial, out / final)
        shards.append({"name": final, "count": len(keys), "sha256": digest, "bytes": size, "last_key": keys[-1]})
        done_errors.extend(state["shard_errors"])
        state["shard_errors"] = []
        write_json_atomic(out / MANIFEST, manifest(complete=False))

    writer = wds.ShardWriter(str(out / f".{name}-%06d.tar.partial"), maxcount=maxcount, maxsize=maxsize,
                             post=finish_shard, start_shard=len(shards), verbose=0, encoder=False,
                             mtime=FIXED_MTIME, user="wsshm", group="wsshm", mode=0o444)
    written = 0
    with _progress(len(todo), f"{kind} -> {out}", progress) as bar:
        for spec, (members, why, bad) in zip(todo, _results(kind, todo, workers, max_pixels)):
            bar.update()
            if bad:
                state["errors"].extend(bad)
                bar.set_postfix(ok=written, errors=len(errors) + len(done_errors) + len(state["shard_errors"])
                                + len(state["errors"]))
                continue
            writer.write({"__key__": spec.key, **members})
            state["keys"].append(spec.key)
            state["shard_errors"] += state["errors"]
            state["errors"] = []
            written += 1
            if why:
                state["normalised"] += 1
                state["reasons"].update(why)
            bar.set_postfix(ok=written, errors=len(errors) + len(done_errors) + len(state["shard_errors"]),
                            refresh=False)
    writer.close()  # finishes the last shard
    done_errors.extend(state["shard_errors"] + state["errors"])
    all_errors = errors + done_errors
    _write_errors(out, all_errors)
    final = manifest(complete=True)
    write_json_atomic(out / MANIFEST, final)
    seconds = time.time() - start
    return {"kind": kind, "count": final["count"], "shards": len(shards), "errors": len(all_errors),
            "normalised": state["normalised"], "resumed_after": resume_at, "converted_now": written,
            "seconds": seconds, "already_complete": False}
