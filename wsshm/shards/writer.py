"""Writing samples into shards: parallel decoding, webdataset's ShardWriter, DALI indexes, and a
manifest that makes a killed run resumable.

Each shard is written under a hidden ``.partial`` name, indexed with DALI's ``wds2idx``, and renamed
into place; only then does the manifest (marked ``"complete": false`` until the end) list it. A rerun
of the same command removes leftover partial files and continues after the last listed shard.

The manifest also records a fingerprint of the inputs (see :func:`input_fingerprint`): a rerun on
changed inputs is refused rather than resumed or reported complete. wsshm deletes only what a manifest
says it wrote, and does not write shards beside ``.tar``/``.idx`` files that no manifest lists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import webdataset as wds
from tqdm import tqdm
from wds2idx import IndexCreator

from wsshm.atomic import atomic_path, create_exclusive, is_temporary_of, write_json
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


def _open_partial(path):
    """The file an unfinished shard is written to: created new, never through a link planted at its name."""
    return create_exclusive(path)


def input_fingerprint(scan: Scan) -> dict:
    """A summary of what a conversion reads, cheap to recompute (no file is read): for every paired
    file its role, path relative to its folder, size and modification time, and the same for every
    file rejected while pairing. Any added, removed, renamed or edited input changes it."""
    def stat(path):
        try:
            info = os.stat(path)
            return f"{info.st_size}\t{info.st_mtime_ns}"
        except OSError:
            return "unreadable"

    lines = []
    for spec in scan.samples:
        stem = PurePosixPath(spec.source).with_suffix("").as_posix()
        for role, path in spec.paths.items():
            lines.append(f"{role}\t{stem}{Path(path).suffix}\t{stat(path)}")
    for record in scan.errors:  # their folders are in the manifest's "source" already, as absolute paths
        lines.append(f"rejected\t{os.path.abspath(record['path'])}\t{stat(record['path'])}")
    digest = hashlib.sha256("\n".join(sorted(lines)).encode())
    return {"files": len(lines), "sha256": digest.hexdigest()}


def _read_own_manifest(out: Path) -> dict | None:
    """The manifest wsshm wrote in ``out``, None when there is none; a ``manifest.json`` that wsshm did not
    write (unreadable, or another tool's) is refused: wsshm neither deletes nor replaces it."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not (isinstance(manifest, dict) and str(manifest.get("version", "")).startswith("wsshm-shard")):
        raise ConversionError(f"{path}: not a manifest wsshm wrote; wsshm will not replace it: move it away or use "
                              "another --out")
    return manifest


def _plain_name(name) -> bool:
    """A file name directly inside the folder (a hostile manifest may list ``../x.tar``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and "\\" not in name


def _written_by(manifest: dict | None) -> set:
    """The names of the files the conversion of ``manifest`` wrote: its listed shards and their indexes,
    the manifest and errors.jsonl and, while it is unfinished, the next shard (a run killed between
    renaming a shard and listing it leaves that one behind)."""
    if manifest is None:
        return set()
    names = {MANIFEST, ERRORS}
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    for shard in shards:
        name = shard.get("name") if isinstance(shard, dict) else None
        if _plain_name(name) and name.endswith(".tar"):
            names |= {name, index_path(name)}
    prefix = manifest.get("options", {}).get("name") if isinstance(manifest.get("options"), dict) else None
    if manifest.get("complete") is not True and _plain_name(prefix):
        following = f"{prefix}-{len(shards):06d}.tar"
        names |= {following, index_path(following)}
    return names


def _refuse_foreign_shards(out: Path, ours: set) -> None:
    """Refuse a folder holding ``.tar`` or ``.idx`` files that wsshm did not write: a new shard could take
    such a name, --overwrite must not delete it, and ``verify`` would flag it beside the shards."""
    foreign = sorted(e.name for e in os.scandir(out) if e.name.endswith((".tar", ".idx")) and e.name not in ours)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ConversionError(f"{out / foreign[0]}{more}: not listed in this folder's {MANIFEST}, so not wsshm's to "
                              "replace or write beside; move it away or use another --out")


def _is_leftover(file_name: str, name: str) -> bool:
    """Whether ``file_name`` is a temporary a killed conversion named ``name`` left: an unfinished shard,
    or an index, manifest or error report not yet renamed."""
    if re.fullmatch(rf"\.{re.escape(name)}-([0-9a-f]{{8}}-)?[0-9]{{6}}\.tar\.partial", file_name):
        return True
    index = re.match(rf"\.({re.escape(name)}-[0-9]{{6}}\.idx)\.", file_name)
    finals = [MANIFEST, ERRORS] + ([index.group(1)] if index else [])
    return any(is_temporary_of(file_name, final) for final in finals)


def _remove_leftovers(out: Path, names) -> None:
    for entry in os.scandir(out):
        if any(_is_leftover(entry.name, name) for name in names if _plain_name(name)):
            os.unlink(entry.path)  # a link planted there goes, never what it points to


def _clear_outputs(out: Path, manifest: dict) -> None:
    """Delete what the conversion of ``manifest`` wrote (--overwrite): its shards, indexes, error report
    and leftovers, the manifest last so that an interrupted clearing can be run again."""
    for name in sorted(_written_by(manifest) - {MANIFEST}) + [MANIFEST]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / name)
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    _remove_leftovers(out, [options.get("name")])


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
    inputs: dict  # input_fingerprint(scan)
    shards: list = field(default_factory=list)  # the manifest's entries of the finished shards
    open_keys: list = field(default_factory=list)  # keys written into the open shard
    saved_errors: list = field(default_factory=list)
    open_errors: list = field(default_factory=list)
    trailing_errors: list = field(default_factory=list)
    normalised: int = 0
    reasons: Counter = field(default_factory=Counter)
    written: int = 0  # samples written by this run
    partial: str | None = None  # the open shard's file name, and its file
    partial_file: object = None

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
                "source": self.source, "options": self.options, "inputs": self.inputs, "version": TOOL_VERSION,
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

    def open_partial(self, path: str):
        """ShardWriter's ``opener``."""
        self.partial, self.partial_file = path, _open_partial(path)
        return self.partial_file

    def abandon(self, writer) -> None:
        """After a failure (a full disk, an interrupt): remove the open shard; the finished ones stay."""
        if self.partial is not None:
            with contextlib.suppress(Exception):  # closed now, so that tarfile does not retry (and print) at exit
                writer.tarstream.close()
            with contextlib.suppress(OSError):
                self.partial_file.close()  # on a full disk, flushing fails again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)
        self.partial = self.partial_file = None

    def finish_shard(self, partial: str) -> None:
        """ShardWriter's ``post``: index the shard, give it its final name, list it in the manifest."""
        self.partial_file.close()
        keys, self.open_keys = self.open_keys, []
        if not keys:
            os.unlink(partial)
            return
        final = self.out / f"{self.name}-{len(self.shards):06d}.tar"
        write_index(partial, index_path(final))
        digest, size = sha256_file(partial), os.path.getsize(partial)
        os.replace(partial, final)
        self.partial = self.partial_file = None
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


def _previous_manifest(out: Path, kind: str, options: dict, source: dict, inputs: dict, overwrite: bool):
    """The manifest of the same conversion of the same inputs already in ``out`` (finished or not), else
    None. Another conversion, or this one on changed inputs, is replaced with ``overwrite`` (deleting only
    what wsshm wrote) and refused without; so is a folder holding shard-like files wsshm did not write."""
    previous = _read_own_manifest(out)
    if previous is not None:
        same = (previous.get("kind") == kind and previous.get("options") == options
                and previous.get("source") == source)
        if same and previous.get("inputs") == inputs:
            if not previous.get("complete"):  # it will write again
                _refuse_foreign_shards(out, _written_by(previous))
            return previous
        if not overwrite:
            if not same:
                raise ConversionError(f"{out / MANIFEST}: this folder holds a different conversion; use another --out "
                                      "or --overwrite")
            then = previous.get("inputs", {}).get("files") if isinstance(previous.get("inputs"), dict) else None
            when = "was converted" if previous.get("complete") else "was left unfinished"
            what = (f"the input files changed since this folder {when} ({then} files then, {inputs['files']} now)"
                    if then is not None else f"this folder {when} by a wsshm that did not record its inputs")
            raise ConversionError(f"{out}: {what}; rerun with --overwrite to convert them again")
    _refuse_foreign_shards(out, _written_by(previous))
    if previous is not None:
        _clear_outputs(out, previous)
    return None


def convert(kind: str, scan: Scan, out, *, name=None, source=None, limit=None, seed=0, maxcount=1000,
            maxsize=1e9, workers=1, on_error="skip", max_pixels=None, overwrite=False, progress=True) -> dict:
    """Convert the paired samples of ``scan`` into a shard folder ``out``; returns a summary dict."""
    from .images import DEFAULT_MAX_PIXELS

    start = time.time()
    out, name = Path(out), name or kind
    if not re.fullmatch(r"[\w-][\w.-]*", name):  # a name is part of file names inside --out, never a path
        raise ConversionError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (not first)")
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
    inputs = input_fingerprint(scan)  # of all the scanned inputs: a new sample can change the --limit subset

    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(out, kind, options, source, inputs, overwrite)
    if previous and previous.get("complete"):
        return {"kind": kind, "count": previous["count"], "shards": len(previous["shards"]),
                "errors": previous.get("errors", 0), "normalised": previous.get("normalised", {}).get("count", 0),
                "already_complete": True, "seconds": time.time() - start}
    _remove_leftovers(out, [name])  # of a killed run

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

    run = _Conversion(kind, name, out, source, options, scan, inputs)
    resume_at = 0
    if previous:
        run.resume(previous)
        position = {s.key: i for i, s in enumerate(specs)}
        if run.shards and run.shards[-1].get("last_key") not in position:  # same inputs: only a hand-edited manifest
            raise ConversionError(f"{out / MANIFEST}: the last shard's key is not among the inputs; use --overwrite")
        resume_at = position[run.shards[-1]["last_key"]] + 1 if run.shards else 0
    else:
        write_json(out / MANIFEST, run.manifest(complete=False))  # the folder is this conversion's from now on
    todo = specs[resume_at:]

    # the random part keeps another run's (or anyone's) file from standing at the name when it is created;
    # ShardWriter's pattern is a %-format of the whole path
    partial = str(out / f".{name}-{secrets.token_hex(4)}-").replace("%", "%%") + "%06d.tar.partial"
    writer = wds.ShardWriter(partial, maxcount=maxcount, maxsize=maxsize, post=run.finish_shard,
                             opener=run.open_partial, start_shard=len(run.shards), verbose=0, encoder=False,
                             mtime=FIXED_MTIME, user="wsshm", group="wsshm", mode=0o444)
    try:
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
    except BaseException:
        run.abandon(writer)
        raise
    manifest = run.finish()
    return {"kind": kind, "count": manifest["count"], "shards": len(run.shards), "errors": manifest["errors"],
            "normalised": run.normalised, "resumed_after": resume_at, "converted_now": run.written,
            "seconds": time.time() - start, "already_complete": False}
