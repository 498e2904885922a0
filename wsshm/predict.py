"""``wsshm-predict``: alpha mattes, RGBA cut-outs and composites for photos.

For each readable image it writes, under ``--out``:
``alpha/<name>.png`` (8-bit matte), ``cutout/<name>.png`` (RGBA, the matte as alpha) and, with
``--composite '#00ff00'`` or ``--background PATH``, ``composite/<name>.png``
(``alpha * image + (1 - alpha) * background``; a background image is resized to each photo).
``<name>`` is the file's stem, or its path relative to a folder given on the command line.
Photos are read as training and evaluation read them (``wsshm.image.read_image``). Unreadable inputs
are reported and skipped; the exit status is 1 when nothing could be processed, 2 when ``--out`` cannot
be written (read-only, full disk). Every file is written to a temporary name and renamed, so no
half-written PNG is left.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from wsshm.image import IMAGE_SUFFIXES, read_image, write_png
from wsshm.inference import PRECISIONS, add_runtime_options, predict_mattes, runtime
from wsshm.models import load_weights



def parse_colour(text: str) -> tuple[int, int, int]:
    """``'#00ff00'`` / ``'00ff00'`` -> ``(0, 255, 0)``."""
    match = re.fullmatch(r"#?([0-9a-fA-F]{6})", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"colour {text!r} is not of the form '#rrggbb'")
    value = match.group(1)
    return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def collect_inputs(paths: list[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """``(file, output name)`` pairs from files and folders (searched recursively for image
    suffixes), plus the problems found (missing paths). Clashing names get ``-2``, ``-3``, ..."""
    found: list[tuple[Path, str]] = []
    problems: list[str] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
        elif path.is_file():
            found.append((path, path.stem))
        else:
            problems.append(f"{path}: no such file or folder")
    used: dict[str, int] = {}
    unique = []
    for path, name in found:
        used[name] = used.get(name, 0) + 1
        unique.append((path, name if used[name] == 1 else f"{name}-{used[name]}"))
    return unique, problems


def write_prediction(image: np.ndarray, matte: np.ndarray, name: str, out: Path,
                     colour: tuple[int, int, int] | None, background: np.ndarray | None) -> None:
    """``alpha/<name>.png``, ``cutout/<name>.png`` and, given a colour or background, ``composite/<name>.png``;
    an ``OSError`` naming the file when one cannot be written."""
    alpha8 = np.round(matte * 255.0).astype(np.uint8)
    write_png(out / "alpha" / f"{name}.png", alpha8)
    write_png(out / "cutout" / f"{name}.png", np.dstack([image, alpha8]))
    if colour is None and background is None:
        return
    h, w = image.shape[:2]
    if background is not None:
        back = np.asarray(Image.fromarray(background).resize((w, h), Image.BILINEAR), dtype=np.float32)
    else:
        back = np.broadcast_to(np.array(colour, dtype=np.float32), image.shape)
    a = matte[..., None]
    composite = a * image.astype(np.float32) + (1.0 - a) * back
    write_png(out / "composite" / f"{name}.png", np.clip(np.round(composite), 0, 255).astype(np.uint8))


def output_folder_problem(out: Path) -> str | None:
    """Why ``out`` cannot take the outputs (created here when missing), or None: checked before any
    photo is processed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"{out}: cannot create the output folder ({error.strerror or error})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"{out}: cannot write into the output folder (permission denied)"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wsshm-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="image files and/or folders")
    parser.add_argument("--weights", required=True, help="safetensors weights written by training")
    parser.add_argument("--out", required=True, help="output folder")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--composite", type=parse_colour, metavar="'#rrggbb'", help="composite on this colour")
    group.add_argument("--background", help="composite on this image (resized to each photo)")
    add_runtime_options(parser)
    args = parser.parse_args(argv)

    device, batch_size, precision_name = runtime(args)
    precision = PRECISIONS[precision_name]
    background = None
    if args.background:
        try:
            background = read_image(args.background)
        except ValueError as error:
            parser.error(f"--background {error}")

    try:
        model = load_weights(args.weights, map_location="cpu").to(device).eval()
    except ValueError as error:
        print(f"wsshm-predict: error: {error}", file=sys.stderr)
        return 2
    # channels-last: the layout oneDNN (CPU) and tensor cores (GPU) convolve fastest
    model = model.to(memory_format=torch.channels_last)

    inputs, failures = collect_inputs(args.inputs)
    out = Path(args.out)
    problem = output_folder_problem(out)
    if problem:
        print(f"wsshm-predict: error: {problem}", file=sys.stderr)
        return 2
    done = 0
    chunk: list[tuple[str, np.ndarray]] = []

    def flush() -> int:
        mattes = predict_mattes(model, [image for _, image in chunk], short_side=args.short_side,
                                device=device, dtype=precision, batch_size=batch_size)
        for (name, image), matte in zip(chunk, mattes):
            write_prediction(image, matte, name, out, args.composite, background)
        count = len(chunk)
        chunk.clear()
        return count

    try:
        with tqdm(total=len(inputs), unit="img", desc="wsshm-predict", disable=None) as bar:
            for path, name in inputs:
                try:
                    chunk.append((name, read_image(path)))
                except ValueError as error:  # names the file and says why
                    failures.append(str(error))
                if len(chunk) >= 4 * batch_size:  # a few batches at once lets same-size photos share one
                    done += flush()
                bar.update(1)
            if chunk:
                done += flush()
    except OSError as error:  # a full disk or a folder made read-only meanwhile: nothing more can be written
        print(f"wsshm-predict: error: {error}", file=sys.stderr)
        return 2
    for problem in failures:
        print(f"wsshm-predict: skipped {problem}", file=sys.stderr)
    print(f"wsshm-predict: {done} image(s) written to {out}, {len(failures)} skipped")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
