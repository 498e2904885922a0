"""``wsshm-eval``: the SPEC's test-time protocol and metrics table for one weights file.

    wsshm-eval --weights runs/demo/student/student.safetensors --data data/demo/eval-natural

``--data`` is an ``eval`` shard folder (SPEC section 5) or a plain folder with ``images/`` and
``alphas/`` (or ``masks/``) whose files pair by name. Writes ``metrics.md``, ``metrics.json``,
``metrics.csv`` (one row per image, then the mean) and ``worst.png`` (the worst predictions by MSE:
image, ground truth, prediction, absolute error) to ``--out``, each atomically; an output that cannot
be written (read-only folder, full disk) is one line naming the file and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import heapq
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from wsshm.atomic import atomic_path, write_json
from wsshm.image import IMAGE_SUFFIXES, read_image, write_png
from wsshm.inference import SHORT_SIDE, default_device, predict_mattes
from wsshm.metrics import METRIC_KEYS, MetricMeter, evaluate_pair
from wsshm.shards import CorruptSample, decode_sample, open_shard_set, select_subset
from wsshm.shards.layout import MANIFEST

LABEL_FOLDERS = ("alphas", "masks")
COLUMNS = {"mse": "MSE", "sad": "SAD", "mse_boundary": "MSE (boundary)", "sad_boundary": "SAD (boundary)",
           "mad": "MAD", "grad": "Grad", "conn": "Conn"}
SHEET_HEIGHT = 160


class EvalDataError(ValueError):
    """An evaluation set we cannot read; the message names the folder or file."""


@dataclass
class EvalSample:
    key: str
    image: np.ndarray  # uint8 H x W x 3 RGB
    alpha: np.ndarray  # float32 H x W in [0, 1]


def _read_image(path: Path, grey: bool = False) -> np.ndarray:
    try:
        return read_image(path, grey)
    except ValueError as error:  # names the file and says why
        raise EvalDataError(str(error)) from None


def _claim(sources: dict, key: str, source, what: str) -> None:
    """Record that ``key`` comes from ``source``; a second source for one key is refused, naming both
    (one would silently replace the other in the scores)."""
    if key in sources:
        raise EvalDataError(f"{sources[key]} and {source}: two {what}s with the key {key!r} "
                            f"(one {what} per {'name' if what == 'image' else 'key'})")
    sources[key] = source


def _sample(key: str, image: np.ndarray, alpha_u8: np.ndarray, where: str) -> EvalSample:
    if image.shape[:2] != alpha_u8.shape:
        raise EvalDataError(f"{where}: image {image.shape[:2]} and alpha {alpha_u8.shape} differ in size")
    return EvalSample(key, image, alpha_u8.astype(np.float32) / 255.0)


def _shard_readers(folder: Path) -> dict:
    """key -> a function that decodes that sample of an ``eval`` shard folder."""
    def read(sample):
        try:
            image, alpha = decode_sample(sample, "eval")
        except CorruptSample as error:
            raise EvalDataError(str(error)) from None
        return _sample(sample.key, image, alpha, f"{sample.shard}:{sample.key}")

    try:
        samples = open_shard_set(folder, "eval").samples
    except ValueError as error:  # ShardFolderError: one line naming the folder
        raise EvalDataError(str(error)) from None
    shards: dict[str, str] = {}
    for sample in samples:
        _claim(shards, sample.key, sample.shard, "sample")
    return {sample.key: (lambda s=sample: read(s)) for sample in samples}


def _folder_readers(folder: Path) -> dict:
    """key -> a function that reads that image and its label from ``images/`` and ``alphas/``."""
    labels = next((folder / name for name in LABEL_FOLDERS if (folder / name).is_dir()), None)
    if not (folder / "images").is_dir() or labels is None:
        raise EvalDataError(f"{folder}: expected an eval shard folder ({MANIFEST}) or images/ with "
                            f"{' or '.join(n + '/' for n in LABEL_FOLDERS)}")
    by_stem = {}
    for path in sorted(labels.iterdir(), key=lambda p: (p.suffix.lower() != ".png", p.name)):  # png first
        if path.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, path)
    readers, images = {}, {}  # images: key -> its file
    for path in sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label = by_stem.get(path.stem)
        if label is None:
            raise EvalDataError(f"{path}: no label {labels / (path.stem + '.png')}")
        _claim(images, path.stem, path, "image")
        readers[path.stem] = lambda p=path, q=label: _sample(p.stem, _read_image(p), _read_image(q, grey=True),
                                                             str(p))
    return readers


def load_eval_set(data, limit: int | None = None, seed: int = 0) -> list[EvalSample]:
    """All samples of ``data`` (or a deterministic subset of ``limit``), in a stable order."""
    folder = Path(data)
    if not folder.is_dir():
        raise EvalDataError(f"{folder}: no such folder")
    readers = _shard_readers(folder) if (folder / MANIFEST).is_file() else _folder_readers(folder)
    keys = sorted(readers)
    if limit is not None:
        keys = sorted(select_subset(keys, limit, seed))
    if not keys:
        raise EvalDataError(f"{folder}: the evaluation set is empty")
    return [readers[key]() for key in keys]


def evaluate_model(model: torch.nn.Module, samples: list[EvalSample], short_side: int = SHORT_SIDE, device=None,
                   batch_size: int = 8, worst: int = 8, progress: bool = True) -> dict:
    """Predict every sample with the test-time protocol and score it; returns the summary dict with
    ``mean``, ``skipped_boundary``, ``images`` (per image metrics) and ``worst`` (arrays for the sheet)."""
    meter, rows, heap = MetricMeter(), [], []
    # disable=None: no bar when stderr is not a terminal (a log file, a scheduler), as in wsshm-predict
    with tqdm(total=len(samples), desc="evaluate", disable=None if progress else True, dynamic_ncols=True) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            preds = predict_mattes(model, [s.image for s in chunk], short_side=short_side, device=device,
                                   batch_size=batch_size)
            for sample, pred in zip(chunk, preds):
                scores = evaluate_pair(pred, sample.alpha)
                meter.update(scores)
                rows.append({"key": sample.key, **scores})
                item = (scores["mse"], len(rows), sample, pred)
                heapq.heappush(heap, item) if len(heap) < worst else heapq.heappushpop(heap, item)
            bar.update(len(chunk))
    worst_items = sorted(heap, key=lambda t: -t[0])
    return {"count": len(samples), "mean": meter.compute(), "skipped_boundary": meter.skipped_boundary,
            "images": rows, "worst": [(s, p, mse) for mse, _, s, p in worst_items]}


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per named result: the SPEC's metrics (MSE x1e3, SAD /1e3, ...)."""
    head = "| model | images | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for name, result in results.items():
        cells = " | ".join(_fmt(result["mean"].get(key)) for key in COLUMNS)
        lines.append(f"| {name} | {result['count']} | {cells} |")
    return "\n".join(lines) + "\n"


def _tile(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat((np.clip(array, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    width = max(1, round(array.shape[1] * SHEET_HEIGHT / array.shape[0]))
    return cv2.resize(array, (width, SHEET_HEIGHT), interpolation=cv2.INTER_AREA)


def worst_sheet(worst: list, path: Path) -> None:
    """Rows of image | ground truth | prediction | |error|, worst first, with key and MSE written on."""
    rows = []
    for sample, pred, mse in worst:
        tiles = [_tile(sample.image), _tile(sample.alpha), _tile(pred), _tile(np.abs(pred - sample.alpha))]
        row = np.concatenate(tiles, axis=1)
        cv2.putText(row, f"{sample.key}  MSE {mse:.2f}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 64, 64), 1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    write_png(path, sheet)


@contextlib.contextmanager
def _writing(path: Path):
    """An ``OSError`` while writing ``path`` (full disk, read-only folder) as one line naming it."""
    try:
        yield
    except OSError as error:
        raise OSError(f"{path}: cannot write ({error.strerror or error})") from None


def write_report(result: dict, out: Path, name: str, meta: dict) -> list[str]:
    """metrics.md, metrics.json, metrics.csv and worst.png of one evaluation into ``out``, each
    atomically; returns the names written. An ``OSError`` naming the file that cannot be written."""
    out.mkdir(parents=True, exist_ok=True)
    with _writing(out / "metrics.md"), atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(markdown_table({name: result}) + f"\n{result['skipped_boundary']} image(s) without a "
                       "boundary region left out of the boundary MSE.\n")
    summary = {**meta, "count": result["count"], "mean": result["mean"],
               "skipped_boundary": result["skipped_boundary"], "images": result["images"]}
    with _writing(out / "metrics.json"):
        write_json(out / "metrics.json", summary, indent=2)
    with _writing(out / "metrics.csv"), atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["key", *METRIC_KEYS])
        writer.writeheader()
        writer.writerows(result["images"])
        writer.writerow({"key": "mean", **result["mean"]})
    if not result["worst"]:
        return ["metrics.md", "metrics.json", "metrics.csv"]
    worst_sheet(result["worst"], out / "worst.png")  # write_png names the file itself
    return ["metrics.md", "metrics.json", "metrics.csv", "worst.png"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsshm-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="a .safetensors file from training")
    parser.add_argument("--data", required=True, help="an eval shard folder, or a folder with images/ + alphas/")
    parser.add_argument("--out", default=None, help="output folder (default: <weights>-eval/<data name>)")
    parser.add_argument("--name", default=None, help="row name in the table (default: the weights' file name)")
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE, help="test-time shorter side (SPEC: 512)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate a deterministic subset of N images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worst", type=int, default=8, help="rows in worst.png")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wsshm.models import load_weights
    from wsshm.predict import output_folder_problem
    weights = Path(args.weights)
    out = Path(args.out) if args.out else weights.with_name(weights.stem + "-eval") / Path(args.data).name
    try:
        model = load_weights(str(weights), map_location="cpu")
        samples = load_eval_set(args.data, limit=args.limit, seed=args.seed)
    except (ValueError, OSError) as error:
        print(f"wsshm-eval: error: {error}", file=sys.stderr)
        return 2
    problem = output_folder_problem(out)  # before the evaluation, not after it
    if problem:
        print(f"wsshm-eval: error: {problem}", file=sys.stderr)
        return 2
    device = default_device(args.device)
    model = model.to(device).eval()
    result = evaluate_model(model, samples, short_side=args.short_side, device=device,
                            batch_size=args.batch_size, worst=args.worst)
    name = args.name or weights.stem
    try:
        written = write_report(result, out, name, {"weights": str(weights), "data": str(args.data),
                                                   "arch": getattr(model, "arch", None), "short_side": args.short_side})
    except OSError as error:
        print(f"wsshm-eval: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table({name: result}), end="")
    print(f"wrote {out}/{', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
