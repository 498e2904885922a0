"""Conversion speed of wsshm-shard, in images/s and images/s per worker, printed as a Markdown table.

    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_shard.py --quick   # 200 pairs, 1 and 2 workers
    DS_ACCELERATOR=cpu .venv/bin/python bench/bench_shard.py           # 1003 pairs, 1/2/4 workers

Inputs are the CCP photos of ``../shared/realdata`` (JPEG images, PNG masks: stored as they are)
when present, else procedural JPEG/PNG pairs of the same size; a second input re-saves the same
images as WebP, which the converter must decode and re-encode (the normalising path). Each row is
the median of ``--repeats`` runs. ``x copy`` is the row's rate over the rate of the baseline measured
in the same run: reading the same files and writing them into a tar with webdataset's TarWriter,
with no checking, decoding or indexing; it is the ceiling of what conversion can reach on this disk.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import webdataset as wds  # noqa: E402

from wsshm.shards.pairing import pair_folders  # noqa: E402
from wsshm.shards.verify import verify  # noqa: E402
from wsshm.shards.writer import convert  # noqa: E402

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"


def inputs(tmp: Path, count: int) -> tuple[Path, Path, str]:
    """An images/masks pair of folders holding ``count`` pairs, and what they are."""
    images, masks = tmp / "images", tmp / "masks"
    images.mkdir(), masks.mkdir()
    source = REALDATA / "ccp"
    if source.is_dir():
        for path in sorted((source / "images").glob("*.jpg"))[:count]:
            shutil.copy(path, images / path.name)
            shutil.copy(source / "masks" / f"{path.stem}.png", masks / f"{path.stem}.png")
        return images, masks, "CCP photos (jpg + png mask)"
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (512, 340, 3), np.uint8)).save(images / f"{i:05d}.jpg", quality=90)
        Image.fromarray(np.where(rng.random((512, 340)) > 0.5, 255, 0).astype(np.uint8)).save(masks / f"{i:05d}.png")
    return images, masks, "random 512x340 (jpg + png mask)"


def as_webp(images: Path, tmp: Path) -> Path:
    out = tmp / "webp"
    out.mkdir()
    for path in sorted(images.iterdir()):
        Image.open(path).save(out / f"{path.stem}.webp", quality=90)
    return out


def copy_baseline(images: Path, masks: Path, out: Path) -> float:
    start = time.perf_counter()
    with wds.TarWriter(str(out), encoder=False) as writer:
        for path in sorted(images.iterdir()):
            writer.write({"__key__": path.stem, "jpg": path.read_bytes(),
                          "mask.png": (masks / f"{path.stem}.png").read_bytes()})
    return time.perf_counter() - start


def timed_convert(images: Path, masks: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = convert("seg", pair_folders(images, {"mask": masks}), out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    assert summary["errors"] == 0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 pairs, 1 and 2 workers, 1 repeat")
    parser.add_argument("--count", type=int, help="pairs to convert (default 1003, or 200 with --quick)")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2 4, or 1 2 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs per row, median reported (default 3, or 1 with --quick)")
    args = parser.parse_args()
    count = args.count or (200 if args.quick else 1003)
    workers = args.workers or ([1, 2] if args.quick else [1, 2, 4])
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, masks, what = inputs(tmp, count)
        n = len(list(images.iterdir()))
        webp = as_webp(images, tmp)
        copy_rate = n / statistics.median(copy_baseline(images, masks, tmp / "copy.tar") for _ in range(repeats))
        rows = [("tar copy (baseline)", what, 1, copy_rate)]
        for label, folder in (("convert, stored as-is", images), ("convert, webp re-encoded", webp)):
            for w in workers:
                seconds = statistics.median(timed_convert(folder, masks, tmp / "out", w) for _ in range(repeats))
                rows.append((label, what if folder is images else "same images as WebP", w, n / seconds))
        start = time.perf_counter()
        problems = verify(tmp / "out")
        rows.append(("verify (decode all)", "the last output", 1, n / (time.perf_counter() - start)))
        assert not problems, problems[:3]
    cpu = platform.processor() or platform.machine()
    print(f"\nwsshm-shard conversion, {n} pairs, {os.cpu_count()} CPU cores ({cpu}), median of {repeats} run(s)\n")
    print("| step | input | workers | images/s | images/s per worker | x copy |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for label, source, w, rate in rows:
        print(f"| {label} | {source} | {w} | {rate:.1f} | {rate / w:.1f} | {rate / copy_rate:.2f} |")


if __name__ == "__main__":
    main()
