"""``wsshm-shard``: convert matting, background, segmentation and evaluation folders into shards."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .demo_data import DEFAULTS, generate
from .images import DEFAULT_MAX_PIXELS
from .layout import ERRORS
from .pairing import pair_folders
from .verify import verify
from .writer import ConversionError, convert

EXAMPLES = """examples:
  wsshm-shard matte --fg AM-2K/train/fg --alpha AM-2K/train/mask --out data/am2k
  wsshm-shard matte --rgba cutouts/ --out data/cutouts
  wsshm-shard background --images coco/train2017_nopeople --out data/bg --workers 8
  wsshm-shard seg --images ccp/images --masks ccp/masks --out data/ccp --limit 2000 --seed 0
  wsshm-shard eval --images P3M-500-NP/original_image --alphas P3M-500-NP/mask --out data/p3m-np
  wsshm-shard verify data/ccp
  wsshm-shard demo --out data/demo
"""


def _size(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500M, 1G, 3e9)")
    return float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _pixels(text: str) -> int:
    value = _positive(text)
    if value > DEFAULT_MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"at most {DEFAULT_MAX_PIXELS} (wsshm's cap on any image it decodes), "
                                         f"got {value}")
    return value


def _common(p):
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--name", help="shard name prefix (default: the kind), giving NAME-000000.tar")
    p.add_argument("--limit", type=_positive, help="convert a deterministic subset of N samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--maxcount", type=_positive, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--maxsize", type=_size, default=1e9, help="bytes per shard at most, e.g. 500M (default 1e9)")
    p.add_argument("--workers", type=_positive, default=max(1, min(8, os.cpu_count() or 1)),
                   help="decoding processes (default: CPU count, at most 8)")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="skip broken inputs (default) or stop before writing anything")
    p.add_argument("--max-pixels", type=_pixels, default=DEFAULT_MAX_PIXELS,
                   help=f"reject images with more pixels (decompression bombs; default and most "
                        f"{DEFAULT_MAX_PIXELS})")
    p.add_argument("--overwrite", action="store_true", help="replace a folder that holds another conversion")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser():
    parser = argparse.ArgumentParser(prog="wsshm-shard", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("matte", help="foregrounds + alphas (or RGBA cut-outs)")
    p.add_argument("--fg", help="foreground folder (RGB)")
    p.add_argument("--alpha", help="alpha folder, files named like the foregrounds")
    p.add_argument("--rgba", help="folder of cut-outs with transparency, split into fg and alpha")
    _common(p)
    p = sub.add_parser("background", help="background images without people")
    p.add_argument("--images", required=True)
    _common(p)
    p = sub.add_parser("seg", help="natural images + binary person masks")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    _common(p)
    p = sub.add_parser("eval", help="evaluation images + alphas (+ optional trimaps)")
    p.add_argument("--images", required=True)
    p.add_argument("--alphas", required=True)
    p.add_argument("--trimaps", help="optional trimap folder (files may be missing for some images)")
    _common(p)
    p = sub.add_parser("verify", help="re-read shard folders; exit 1 on any problem")
    p.add_argument("folders", nargs="+")
    p = sub.add_parser("demo", help="generate the built-in demo data (no download)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=_positive, default=DEFAULTS["size"],
                   help=f"image height; width is 3/4 of it (default {DEFAULTS['size']})")
    for name in ("mattes", "backgrounds", "seg", "eval_natural", "eval_synthetic"):
        p.add_argument(f"--{name.replace('_', '-')}", type=_positive, default=DEFAULTS[name],
                       help=f"samples in that folder (default {DEFAULTS[name]})")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--workers", type=_positive, default=1)
    return parser


def _scan(args):
    if args.command == "matte":
        if bool(args.rgba) == bool(args.fg or args.alpha) or (not args.rgba and not (args.fg and args.alpha)):
            raise ConversionError("matte needs either --fg and --alpha, or --rgba")
        if args.rgba:
            return pair_folders(args.rgba, {}, image_role="rgba"), {"rgba": os.path.abspath(args.rgba)}
        return pair_folders(args.fg, {"alpha": args.alpha}), {"fg": os.path.abspath(args.fg),
                                                             "alpha": os.path.abspath(args.alpha)}
    if args.command == "background":
        return pair_folders(args.images, {}), {"images": os.path.abspath(args.images)}
    if args.command == "seg":
        return (pair_folders(args.images, {"mask": args.masks}),
                {"images": os.path.abspath(args.images), "masks": os.path.abspath(args.masks)})
    optional = {"trimap": args.trimaps} if args.trimaps else None
    source = {"images": os.path.abspath(args.images), "alphas": os.path.abspath(args.alphas)}
    if args.trimaps:
        source["trimaps"] = os.path.abspath(args.trimaps)
    return pair_folders(args.images, {"alpha": args.alphas}, optional), source


def _cannot_write(exc: OSError, out) -> str:
    """One line for an OSError while converting: a failed write names --out (the temporary file's name
    says nothing to a user), any other file is named itself."""
    problem = exc.strerror or str(exc)
    where = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else None
    inside = where is None or os.path.commonpath([where, os.path.abspath(out)]) == os.path.abspath(out)
    return f"cannot write into {out}: {problem}" if inside else f"{exc.filename}: {problem}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        failed = 0
        for folder in args.folders:
            notes: list[str] = []
            problems = verify(folder, warnings_out=notes)
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            warned = f", {len(notes)} warning(s)" if notes else ""
            print(f"{folder}: {'ok' if not problems else f'{len(problems)} problem(s)'}{warned}")
            failed += bool(problems)
        return 1 if failed else 0
    if args.command == "demo":
        settings = {name: getattr(args, name) for name in DEFAULTS}
        try:
            folders = generate(args.out, **settings, workers=args.workers, progress=True)
        except ConversionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {_cannot_write(exc, args.out)}", file=sys.stderr)
            return 2
        for name, path in folders.items():
            print(f"{name}: {path}")
        return 0
    try:
        scan, source = _scan(args)
        kind = "matte" if args.command == "matte" else args.command
        summary = convert(kind, scan, args.out, name=args.name, source=source, limit=args.limit, seed=args.seed,
                          maxcount=args.maxcount, maxsize=args.maxsize, workers=args.workers,
                          on_error=args.on_error, max_pixels=args.max_pixels, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only or full --out; "folder not found" from pairing names its folder
        print(f"error: {exc if exc.errno is None else _cannot_write(exc, args.out)}", file=sys.stderr)
        return 2
    if summary["count"] == 0:
        print(f"error: no sample could be converted into {args.out} (see {os.path.join(args.out, ERRORS)})",
              file=sys.stderr)
        return 2
    if summary["already_complete"]:
        print(f"{args.out}: already complete ({summary['count']} samples in {summary['shards']} shards)")
        return 0
    rate = summary["converted_now"] / max(summary["seconds"], 1e-9)
    print(f"{kind}: {summary['count']} samples in {summary['shards']} shard(s) -> {args.out}; "
          f"{summary['normalised']} normalised, {summary['errors']} rejected, {scan.ignored} non-image files ignored; "
          f"{summary['seconds']:.1f} s, {rate:.1f} img/s ({rate / args.workers:.1f} per worker)"
          + (f"; resumed after {summary['resumed_after']} samples" if summary["resumed_after"] else ""))
    if summary["errors"]:
        print(f"warning: {summary['errors']} input(s) rejected, see {os.path.join(args.out, ERRORS)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
