"""The fidelity study's data: shard folders under ``OUT/data`` made with ``wsshm-shard``.

* builtin: the procedural demo data (``wsshm-shard demo``, as ``wsshm/demo.py`` makes it), with
  100 images per evaluation set instead of the demo's 20, so that small differences are not noise.
* real: ``../shared/realdata`` (see its README). CCP's photos split by name, the last 100 held out;
  the split is two folders of symbolic links, so no photo is copied. Segmentation = CCP minus the
  held-out part; evaluation = the held-out CCP photos (their masks as alpha), ``rbg`` and
  ``p3m-demo``; matte data = ``p3m-demo`` (foreground = the photo, alpha = its predicted matte),
  composited over ``backgrounds`` while the teacher trains. ``rbg`` is evaluated on 100 of its photos.

Both return ``({role or set name: shard folder}, seconds)``; folders already converted with the
same options are left as they are (the converter and the generator both check).
"""
from __future__ import annotations

import sys
from pathlib import Path

from wsshm.image import IMAGE_SUFFIXES
from wsshm.train.launch import run_logged

DEMO_SIZE = 128  # 128 x 96 images, as in wsshm/demo.py
DEMO_COUNTS = {"mattes": 48, "backgrounds": 32, "seg": 160, "eval-natural": 100, "eval-synthetic": 100}
HELDOUT = 100  # CCP photos held out for evaluation: the last ones by name
# rbg is scored on a deterministic 100 of its 290 photos (the converter's --limit): four models on
# all of them took ~1 s a photo with the IoU pass, a quarter of the real preset's 40 minutes.
EVAL_LIMITS = {"rbg": 100}


def prepare_builtin(out: Path, env: dict) -> tuple[dict, float]:
    data = out / "data"
    counts = [f"--{name}={count}" for name, count in DEMO_COUNTS.items()]
    seconds = run_logged([sys.executable, "-m", "wsshm.shards.cli", "demo", "--out", str(data),
                          "--size", str(DEMO_SIZE), *counts], out / "logs" / "data.log", env, "bench_fidelity")
    names = ("seg", "matte", "background", "eval-natural", "eval-synthetic")
    return {name: data / name for name in names}, seconds


def link_files(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        link = folder / path.name
        if not link.is_symlink():
            link.symlink_to(path)


def split_ccp(ccp: Path, split: Path) -> dict[str, Path]:
    """``split/ccp-train`` and ``split/ccp-heldout``, each with ``images/`` and ``masks/`` of links."""
    images = sorted(p for p in (ccp / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    parts = {"ccp-train": images[:-HELDOUT], "ccp-heldout": images[-HELDOUT:]}
    for name, files in parts.items():
        masks = [next((ccp / "masks").glob(p.stem + ".*"), ccp / "masks" / (p.stem + ".png")) for p in files]
        link_files(files, split / name / "images")
        link_files(masks, split / name / "masks")
    return {name: split / name for name in parts}


def prepare_real(source: Path, out: Path, env: dict, limit: int | None, names=None,
                 prog: str = "bench_fidelity") -> tuple[dict, float]:
    """The real preset's shard folders (``names``: only those of them)."""
    needed = [source / "ccp" / "images", source / "ccp" / "masks", source / "rbg", source / "p3m-demo",
              source / "backgrounds"]
    absent = [str(path) for path in needed if not path.is_dir()]
    if absent:
        raise SystemExit(f"{prog}: the real-photo data kit is needed, but {absent[0]} is "
                         "absent (see ../shared/realdata/README.md; --realdata DIR points elsewhere); skipped")
    data = out / ("data" if limit is None else f"data-limit{limit}")
    split = split_ccp(source / "ccp", data / "split")
    p3m = source / "p3m-demo"
    conversions = {
        "seg": ["seg", "--images", split["ccp-train"] / "images", "--masks", split["ccp-train"] / "masks"],
        "ccp-heldout": ["eval", "--images", split["ccp-heldout"] / "images", "--alphas",
                        split["ccp-heldout"] / "masks"],
        "rbg": ["eval", "--images", source / "rbg" / "images", "--alphas", source / "rbg" / "masks"],
        "p3m-demo": ["eval", "--images", p3m / "images", "--alphas", p3m / "alphas"],
        "matte": ["matte", "--fg", p3m / "images", "--alpha", p3m / "alphas"],
        "background": ["background", "--images", source / "backgrounds"],
    }
    conversions = {name: conversion for name, conversion in conversions.items() if names is None or name in names}
    seconds = 0.0
    for name, (kind, *options) in conversions.items():
        cmd = [sys.executable, "-m", "wsshm.shards.cli", kind, *map(str, options), "--out", str(data / name),
               "--workers", "1", "--no-progress"]
        limits = [n for n in (limit, EVAL_LIMITS.get(name)) if n is not None]
        if limits:
            cmd += ["--limit", str(min(limits))]
        seconds += run_logged(cmd, out / "logs" / f"data-{name}.log", env, prog)
    return {name: data / name for name in conversions}, seconds
