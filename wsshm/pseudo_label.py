"""``wsshm-pseudo-label``: pseudo segmentation labels for unlabeled photos, as a ``seg`` shard folder.

A trained model is run over a folder of photos with the test-time protocol of :mod:`wsshm.inference`
(the protocol of ``wsshm-eval`` and ``wsshm-predict``); each matte is binarised at ``--threshold``
(foreground where ``matte >= threshold``) and the photos with their masks are converted by the
converter of ``wsshm-shard seg`` (:func:`wsshm.shards.writer.convert`), so the folder is exactly what
``wsshm-shard seg --images FOLDER --masks MASKS`` writes (SPEC section 5): shards, DALI indexes,
``manifest.json``, ``errors.jsonl``, the same handling of broken inputs and the same resumability.

Confidence of a sample (a number in [0, 1], higher is surer):

* ``certainty``: the share of pixels far from the threshold, i.e. below ``threshold / 2`` or above
  ``(1 + threshold) / 2`` (below 0.25 or above 0.75 at the default threshold 0.5);
* ``agreement`` (``--tta flip`` only): the IoU of the mask of the photo and the mask of its mirror
  image flipped back (1 when both are empty). With ``--tta flip`` the matte that is binarised is the
  mean of the two predictions;
* ``confidence`` = ``certainty`` without TTA, ``min(certainty, agreement)`` with it: a sample passes
  ``--min-confidence C`` only when both are at least ``C``.

Samples under ``--min-confidence`` are not written to the shards; they are listed with their scores.
Each kept sample's ``json`` member holds its scores under ``pseudo_label``; ``pseudo.json`` beside
``manifest.json`` holds them all, keyed by sample key: ``samples`` (kept) and ``dropped``, plus the
settings and counts. The manifest's ``source`` records the
images folder and the settings (weights file name and sha256, threshold, TTA, filter), so a rerun with
other settings is refused as "a different conversion" unless ``--overwrite``.

The masks are written to a hidden folder ``OUT/.pseudo-masks`` (a fixed name, so that a killed run
resumes: predictions already made are kept in it with their scores, and the converter resumes after
its last finished shard); it is removed once the folder is complete.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from wsshm.atomic import write_json
from wsshm.image import read_image, write_png
from wsshm.inference import PRECISIONS, SHORT_SIDE, add_runtime_options, positive_int, predict_mattes, runtime
from wsshm.models import load_weights
from wsshm.shards.layout import ERRORS, MANIFEST
from wsshm.shards.pairing import pair_folders
from wsshm.shards.writer import FIXED_MTIME, ConversionError, convert, input_fingerprint, sha256_file

PROG = "wsshm-pseudo-label"
PSEUDO = "pseudo.json"  # the scores and settings, beside manifest.json
MASKS = ".pseudo-masks"  # the hidden folder of masks inside --out while a run is unfinished
STATE = ".state.json"  # inside MASKS: the predictions made so far (hidden: pairing skips it)
FORMAT = "wsshm-pseudo-label 1"
CONFIDENCE_RULE = ("certainty = share of pixels below threshold/2 or above (1+threshold)/2; with --tta flip, "
                   "agreement = IoU of the masks of the image and of its flipped image flipped back, the matte "
                   "binarised = their mean, confidence = min(certainty, agreement); else confidence = certainty")
NAME = "seg"  # shard name prefix, as wsshm-shard seg


class _Parser(argparse.ArgumentParser):
    """Bad options: one line ``wsshm-pseudo-label: error: ...`` and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fraction(closed: bool):
    """An argparse type for a number in [0, 1] (``closed``) or in (0, 1)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        inside = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
        if not inside:
            bounds = "between 0 and 1" if closed else "between 0 and 1 (exclusive)"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     epilog="example: wsshm-pseudo-label --weights runs/r0/student.safetensors "
                            "--images photos/ --out data/pseudo --min-confidence 0.8 --tta flip")
    parser.add_argument("--weights", required=True, help="safetensors weights written by training")
    parser.add_argument("--images", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--out", required=True, help="output seg shard folder")
    parser.add_argument("--threshold", type=_fraction(closed=False), default=0.5,
                        help="foreground where the matte is at least this (default 0.5)")
    parser.add_argument("--min-confidence", type=_fraction(closed=True), default=None, metavar="C",
                        help="drop samples whose confidence is under C (they are listed in pseudo.json)")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="flip: average with the mirrored prediction and score their agreement")
    add_runtime_options(parser)
    parser.add_argument("--workers", type=positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="decoding processes of the shard conversion (default: CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder that holds another conversion")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ---------------------------------------------------------------------------------------------- scores


def binarise(matte: np.ndarray, threshold: float) -> np.ndarray:
    """The pseudo mask of a matte: bool, foreground where ``matte >= threshold``."""
    return matte >= threshold


def certainty(matte: np.ndarray, threshold: float) -> float:
    """The share of pixels far from the threshold: below ``threshold / 2`` or above ``(1 + threshold) / 2``."""
    return float(np.mean((matte < threshold / 2) | (matte > (1 + threshold) / 2)))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 1 when both are empty."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def score(matte: np.ndarray, threshold: float, flipped_back: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """``(mask, scores)`` for a matte and, with flip TTA, the prediction on the mirrored image flipped
    back; the rule is :data:`CONFIDENCE_RULE`."""
    if flipped_back is None:
        mask = binarise(matte, threshold)
        sure = certainty(matte, threshold)
        scores = {"confidence": sure, "certainty": sure}
    else:
        mean = (matte + flipped_back) / 2
        mask = binarise(mean, threshold)
        sure = certainty(mean, threshold)
        agree = agreement(binarise(matte, threshold), binarise(flipped_back, threshold))
        scores = {"confidence": min(sure, agree), "certainty": sure, "agreement": agree}
    scores["foreground"] = float(np.mean(mask))
    return mask, {k: round(v, 6) for k, v in scores.items()}


def predict_with_scores(model, images: list[np.ndarray], threshold: float, tta: str, *, short_side=SHORT_SIDE,
                        device=None, dtype=None, batch_size=1) -> list[tuple[np.ndarray, dict]]:
    """``(mask, scores)`` per image (uint8 RGB ``H x W x 3``) through :func:`wsshm.inference.predict_mattes`;
    with ``tta == "flip"`` the mirrored images go in the same batches as the images themselves."""
    inputs = list(images)
    if tta == "flip":
        inputs += [np.ascontiguousarray(image[:, ::-1]) for image in images]
    mattes = predict_mattes(model, inputs, short_side=short_side, device=device, dtype=dtype, batch_size=batch_size)
    n = len(images)
    if tta == "flip":
        return [score(mattes[i], threshold, mattes[n + i][:, ::-1]) for i in range(n)]
    return [score(mattes[i], threshold) for i in range(n)]


# ------------------------------------------------------------------------------------------- the run


def _stat(path) -> str:
    info = os.stat(path)
    return f"{info.st_size}\t{info.st_mtime_ns}"


def _mask_name(source: str) -> str:
    """The mask file (relative to the masks folder) of an image at ``source`` (relative to --images)."""
    return PurePosixPath(source).with_suffix(".png").as_posix()


def _read_json(path: Path):
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return None


def _load_state(masks: Path, settings: dict) -> dict:
    """The predictions a killed run with the same settings made (``{source: record}``); the masks
    folder is emptied when it holds another run's."""
    state = _read_json(masks / STATE)
    if isinstance(state, dict) and state.get("settings") == settings and isinstance(state.get("samples"), dict):
        return state["samples"]
    if masks.is_dir() and not masks.is_symlink():
        shutil.rmtree(masks)
    elif os.path.lexists(masks):
        os.unlink(masks)
    return {}


def _prune(masks: Path, keep: set) -> None:
    """Remove mask files no current image needs (an image removed since a killed run)."""
    for dirpath, _, filenames in os.walk(masks):
        for name in filenames:
            path = Path(dirpath) / name
            relative = path.relative_to(masks).as_posix()
            if not name.startswith(".") and relative not in keep:
                path.unlink()


def _already_done(out: Path, source: dict, images_fingerprint: dict) -> dict | None:
    """The pseudo.json of a finished run of the same command on the same photos, else None."""
    manifest, pseudo = _read_json(out / MANIFEST), _read_json(out / PSEUDO)
    if not (isinstance(manifest, dict) and isinstance(pseudo, dict)):
        return None
    if manifest.get("complete") is True and manifest.get("source") == source \
            and pseudo.get("images_fingerprint") == images_fingerprint and pseudo.get("settings") == source["pseudo_label"]:
        return pseudo
    return None


def _other_conversion(out: Path, source: dict) -> str | None:
    """Why ``out`` cannot take this run without --overwrite (checked before any prediction), or None."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return None
    manifest = _read_json(path)
    if not (isinstance(manifest, dict) and str(manifest.get("version", "")).startswith("wsshm-shard")):
        return f"{path}: not a manifest wsshm wrote; move it away or use another --out"
    if manifest.get("kind") != "seg" or manifest.get("source") != source:
        return f"{path}: this folder holds a different conversion; use another --out or --overwrite"
    return None


def _fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}".replace("\n", " "), file=sys.stderr)
    return status


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    weights, images, out = Path(args.weights), Path(args.images), Path(args.out)
    if not weights.is_file():
        return _fail(f"{weights}: no such weights file")
    if not images.is_dir():
        return _fail(f"{images}: images folder not found")
    device, batch_size, precision = runtime(args)
    try:
        model = load_weights(weights, map_location="cpu").to(device).eval()
    except ValueError as error:
        return _fail(str(error))
    except (RuntimeError, AssertionError) as error:  # e.g. --device cuda without one
        return _fail(f"--device {device}: {error}")
    model = model.to(memory_format=torch.channels_last)

    settings = {"weights": weights.name, "weights_sha256": sha256_file(weights), "threshold": args.threshold,
                "tta": args.tta, "min_confidence": args.min_confidence, "short_side": args.short_side,
                "precision": precision, "confidence": CONFIDENCE_RULE}
    # what the masks depend on: the filter does not change a prediction, so a run with another
    # --min-confidence reuses the predictions an unfinished one left
    predict_settings = {k: v for k, v in settings.items() if k != "min_confidence"}
    source = {"images": os.path.abspath(images), "pseudo_label": settings}
    image_scan = pair_folders(images, {})
    if not image_scan.samples:
        return _fail(f"{images}: holds no usable images" + (f" ({len(image_scan.errors)} rejected)"
                                                            if image_scan.errors else ""))
    images_fingerprint = input_fingerprint(image_scan)

    try:
        out.mkdir(parents=True, exist_ok=True)
        done = _already_done(out, source, images_fingerprint)
        if done is not None:
            print(f"{out}: already complete ({done['counts']['kept']} samples kept, "
                  f"{done['counts']['dropped']} dropped)")
            return 0
        problem = _other_conversion(out, source)
        if problem and not args.overwrite:
            return _fail(problem)
        masks = out / MASKS
        records = _load_state(masks, predict_settings)
        masks.mkdir(exist_ok=True)
        records = _predict_all(model, image_scan.samples, records, masks, predict_settings, args, device,
                               PRECISIONS[precision], batch_size)
    except OSError as error:
        return _fail(f"cannot write into {out}: {error.strerror or error}" if error.errno else str(error))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to continue", 130)

    unreadable = {s.paths["image"]: records[s.source]["error"] for s in image_scan.samples
                  if "error" in records[s.source]}
    scored = {s.key: records[s.source]["scores"] for s in image_scan.samples if "scores" in records[s.source]}
    threshold_c = args.min_confidence
    dropped = {key: scores for key, scores in scored.items()
               if threshold_c is not None and scores["confidence"] < threshold_c}
    kept = {key: scores for key, scores in scored.items() if key not in dropped}
    for key, scores in sorted(dropped.items(), key=lambda item: item[1]["confidence"])[:10]:
        print(f"dropped {key}: confidence {scores['confidence']:.3f} < {threshold_c}", file=sys.stderr)
    if len(dropped) > 10:
        print(f"dropped {len(dropped) - 10} more (all listed in {out / PSEUDO} when the run completes)",
              file=sys.stderr)
    if not kept:
        for path, reason in list(unreadable.items())[:10]:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        return _fail(f"no sample kept ({len(dropped)} under --min-confidence, {len(unreadable)} unreadable)"
                     + (f"; the predictions stay in {out / MASKS} for a rerun with a lower --min-confidence"
                        if dropped else ""), 1)

    # the converter pairs the photos with the masks; the photos that could not be read have no mask,
    # and are reported with the reason they could not be read, not as "without a partner mask"
    scan = pair_folders(images, {"mask": masks})
    scan.errors = [e for e in scan.errors if e["path"] not in unreadable]
    scan.errors += [{"path": path, "reason": reason} for path, reason in unreadable.items()]
    scan.samples = [s for s in scan.samples if s.key in kept]
    for spec in scan.samples:
        spec.meta = {"pseudo_label": kept[spec.key]}  # each sample carries its own scores
    try:
        previous = _read_json(out / PSEUDO)
        if os.path.lexists(out / PSEUDO) and (args.overwrite or not isinstance(previous, dict)
                                              or previous.get("settings") != settings):
            os.unlink(out / PSEUDO)  # another conversion's scores; this run writes its own at the end
        summary = convert("seg", scan, out, name=NAME, source=source, workers=args.workers,
                          overwrite=args.overwrite, progress=not args.no_progress)
    except ConversionError as error:
        return _fail(str(error))
    except OSError as error:
        return _fail(f"cannot write into {out}: {error.strerror or error}" if error.errno else str(error))
    except KeyboardInterrupt:
        return _fail("interrupted; run the same command again to continue", 130)
    if summary["count"] == 0:
        return _fail(f"no sample could be converted into {out} (see {out / ERRORS})")
    written = _written_keys(scan, kept, out)
    pseudo = {"version": FORMAT, "settings": settings, "images_fingerprint": images_fingerprint,
              "counts": {"images": len(image_scan.samples), "kept": summary["count"], "dropped": len(dropped),
                         "unreadable": len(unreadable), "rejected": summary["errors"]},
              "samples": {key: kept[key] for key in written}, "dropped": dropped}
    try:
        write_json(out / PSEUDO, pseudo)
        shutil.rmtree(masks)
    except OSError as error:
        return _fail(f"cannot write into {out}: {error.strerror or error}")
    print(f"{PROG}: {summary['count']} samples in {summary['shards']} shard(s) -> {out}; {len(dropped)} dropped under "
          f"--min-confidence, {summary['errors']} rejected (see {out / ERRORS}); scores in {out / PSEUDO}")
    return 0


def _written_keys(scan, kept: dict, out: Path) -> list[str]:
    """The keys the converter wrote: the kept samples less those it rejected (errors.jsonl names their files)."""
    rejected = set()
    with contextlib.suppress(OSError):
        for line in (out / ERRORS).read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                rejected.add(json.loads(line)["path"])
    return [s.key for s in scan.samples if s.key in kept and not (set(s.paths.values()) & rejected)]


def _predict_all(model, specs, records: dict, masks: Path, settings: dict, args, device, dtype, batch_size) -> dict:
    """Predict every photo not predicted yet (an unchanged photo a killed run predicted keeps its mask
    and scores), writing its mask into ``masks`` and its record into the state file after each chunk."""
    records = {source: record for source, record in records.items()
               if isinstance(record, dict) and source in {s.source for s in specs}}
    todo = []
    for spec in specs:
        record = records.get(spec.source)
        try:
            same = record is not None and record.get("stat") == _stat(spec.paths["image"])
        except OSError:
            same = False
        if same and ("error" in record or (masks / _mask_name(spec.source)).is_file()):
            continue
        records.pop(spec.source, None)
        todo.append(spec)
    _prune(masks, {_mask_name(source) for source, r in records.items() if "scores" in r})

    def save():
        write_json(masks / STATE, {"settings": settings, "samples": records}, indent=None)

    chunk: list = []

    def flush():
        results = predict_with_scores(model, [image for _, image, _ in chunk], args.threshold, args.tta,
                                      short_side=args.short_side, device=device, dtype=dtype, batch_size=batch_size)
        for (spec, _, stat), (mask, scores) in zip(chunk, results):
            path = masks / _mask_name(spec.source)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, mask.astype(np.uint8) * 255)
            os.utime(path, ns=(FIXED_MTIME * 10**9,) * 2)  # the same mask, the same converter fingerprint
            records[spec.source] = {"stat": stat, "scores": scores}
        chunk.clear()
        save()

    with tqdm(total=len(todo), unit="img", desc=PROG, disable=True if args.no_progress else None,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for spec in todo:
            path = spec.paths["image"]
            try:
                stat = _stat(path)
                chunk.append((spec, read_image(path), stat))
            except (ValueError, OSError) as error:  # names the file and says why
                reason = str(error)
                prefix = f"{path}: "
                reason = reason[len(prefix):] if reason.startswith(prefix) else reason
                try:
                    stat = _stat(path)
                except OSError:
                    stat = None  # read again by a rerun
                records[spec.source] = {"stat": stat, "error": reason}
            if len(chunk) >= 4 * batch_size:  # a few batches at once lets same-size photos share one
                flush()
            bar.update(1)
        if chunk:
            flush()
    save()
    return records


if __name__ == "__main__":
    sys.exit(main())
