"""One round of self-training on real photos: does a segmentation model trained on a few labelled
CCP photos get better when it also learns from its own pseudo labels of 1094 unlabelled ones?

    .venv/bin/python bench/bench_self_training.py            # ~40 min on the 2-core VM
    .venv/bin/python bench/bench_self_training.py --quick    # smoke run, ~3 min

Round 0: stage 0 (segmentation, ``launch/pretrain_seg.py``) on ``--labelled`` CCP photos.
Pseudo labels: ``wsshm-pseudo-label`` with round 0 over ``../shared/realdata/ccp-unlabeled``.
Round 1: the same training from scratch (same steps, seed and network) on the labelled folder and
the pseudo-labelled one mixed at ``--seg-weights``. Ceiling: round 0's training on every labelled
CCP photo (the 903 outside the held-out 100). Scored on the held-out CCP photos and on 100 ``rbg``
photos (service-made masks): whole-image MSE (``wsshm-eval``) and IoU of the masks at 0.5, with a
paired bootstrap interval over the photos for round 1 minus round 0.

Stage 0 is the learner because the question is the quality of segmentation learnt from pseudo
masks, which whole-image MSE and IoU against masks measure; the student stage reads the same
``--seg`` folders. Writes under ``--out`` (default ``runs/self-training``): ``data/``, ``runs/``,
``eval/``, ``logs/``, ``results.json``, ``report.md``, ``pseudo_labels.png``, ``heldout.png``.
A rerun reuses what is done (trained weights, the pseudo-label folder, evaluations).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.device_count() else "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fidelity_data  # noqa: E402  (bench/ beside this file)
from bench_fidelity import Run, evaluate, train  # noqa: E402
from fidelity_report import Timings, eval_set, mask_ious, predict  # noqa: E402
from wsshm.atomic import atomic_path, write_json, write_text  # noqa: E402
from wsshm.image import IMAGE_SUFFIXES  # noqa: E402
from wsshm.train.launch import ROOT, StepFailed, run_logged, training_env  # noqa: E402

PROG = "bench_self_training"
ARCH, CROP, BATCH, LR = "unet_r18_w0.25", 96, 8, 1e-3
EVAL_SETS = ("ccp-heldout", "rbg")
MODELS = {"round-0": "round 0: labelled only", "round-1": "round 1: labelled + pseudo-labelled",
          "ceiling": "ceiling: every labelled photo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"bench/{PROG}.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="study folder (default: runs/self-training[-quick])")
    parser.add_argument("--realdata", default=str(ROOT.parent / "shared" / "realdata"))
    parser.add_argument("--labelled", type=int, default=200, help="labelled CCP photos of rounds 0 and 1")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each run")
    parser.add_argument("--short-side", type=int, default=128,
                        help="test-time shorter side of the pseudo labels and the evaluation")
    parser.add_argument("--min-confidence", type=float, default=0.9, help="wsshm-pseudo-label's filter")
    parser.add_argument("--seg-weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("LABELLED", "PSEUDO"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 40 unlabelled photos, 32 per set, no confidence filter")
    return parser


def unlabelled_photos(source: Path, out: Path, limit: int | None) -> Path:
    folder = source / "ccp-unlabeled" / "images"
    if limit is None:
        return folder
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    fidelity_data.link_files(photos, out / "data" / "unlabelled-subset")
    return out / "data" / "unlabelled-subset"


def pseudo_label(weights: Path, photos: Path, target: Path, args, env: dict) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "wsshm.pseudo_label", "--weights", str(weights), "--images", str(photos),
           "--out", str(target), "--short-side", str(args.short_side), "--tta", "flip",
           "--min-confidence", str(args.min_confidence), "--workers", "1", "--no-progress"]
    seconds = run_logged(cmd, target.parent.parent / "logs" / "pseudo-label.log", env, PROG)
    return json.loads((target / "pseudo.json").read_text()), seconds


def per_photo(weights: Path, dataset: Path, target: Path, short_side: int, name: str) -> dict:
    """Each photo's whole-image MSE (x1e3, from wsshm-eval's metrics.csv) and mask IoU at 0.5."""
    evaluate(weights, dataset, target, short_side, name, who=PROG)
    with open(target / "metrics.csv") as f:
        mse = {row["key"]: float(row["mse"]) for row in csv.DictReader(f)}
    return {"mse": mse, "iou": mask_ious(weights, dataset, short_side)}


def confidence_check(weights: Path, dataset: Path, short_side: int, min_confidence: float) -> dict:
    """Does wsshm-pseudo-label's confidence tell good pseudo masks from bad? Round 0's masks and scores
    (its flip TTA) on the held-out photos, whose true masks are known: the rank correlation of
    confidence with IoU, and the mean IoU of the photos the filter would keep and drop."""
    from scipy.stats import spearmanr
    from wsshm.models import load_weights
    from wsshm.pseudo_label import agreement, predict_with_scores
    samples = eval_set(str(dataset))
    net = load_weights(str(weights)).eval()
    results = predict_with_scores(net, [s.image for s in samples], 0.5, "flip", short_side=short_side)
    conf, iou = [], []
    for sample, (mask, scores) in zip(samples, results):
        conf.append(scores["confidence"])
        iou.append(agreement(mask, sample.alpha > 0.5))
    conf, iou = np.array(conf), np.array(iou)
    kept = conf >= min_confidence
    return {"spearman": float(spearmanr(conf, iou).statistic), "kept": int(kept.sum()), "photos": len(iou),
            "iou_kept": float(iou[kept].mean()) if kept.any() else None,
            "iou_dropped": float(iou[~kept].mean()) if (~kept).any() else None}


def paired_interval(a: dict, b: dict, draws: int = 2000) -> tuple[float, float, float]:
    """Mean of ``b - a`` over the photos and its 95% bootstrap interval (photos resampled)."""
    diff = np.array([b[k] - a[k] for k in a])
    rng = np.random.default_rng(0)
    means = diff[rng.integers(len(diff), size=(draws, len(diff)))].mean(1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def figures(out: Path, pseudo: dict, photos: Path, data: dict, models: dict, short_side: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from wsshm.image import read_image
    from wsshm.shards.reader import decode_sample, open_shard_set

    # pseudo labels: the most, the median and the least confident kept, and the least confident dropped
    kept = sorted(pseudo["samples"].items(), key=lambda item: item[1]["confidence"])
    dropped = sorted(pseudo["dropped"].items(), key=lambda item: item[1]["confidence"])
    picks = [("kept", *kept[i]) for i in (-1, -2, len(kept) // 2, 0)] + [("dropped", *d) for d in dropped[:2]]
    masks = {s.key: s for s in open_shard_set(out / "data" / "pseudo", "seg").samples}
    fig, axes = plt.subplots(2, len(picks), figsize=(2.2 * len(picks), 5.2), squeeze=False)
    for col, (status, key, scores) in enumerate(picks):
        axes[0, col].set_title(f"{status}\nconfidence {scores['confidence']:.2f}", fontsize=8)
        if key in masks:
            image, mask = decode_sample(masks[key], "seg")
        else:  # a dropped photo has no mask in the folder: show the photo alone
            match = next(iter(photos.glob(key.split("/")[-1] + ".*")), None)
            image, mask = (read_image(match), None) if match else (np.zeros((8, 8, 3), np.uint8), None)
        axes[0, col].imshow(image)
        if mask is not None:
            axes[1, col].imshow(mask, cmap="gray", vmin=0, vmax=255)
        else:
            axes[1, col].text(0.5, 0.5, "dropped:\nno mask written", ha="center", va="center", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("round 0's pseudo labels of unlabelled photos: the most, second most, median and least "
                 "confident kept, the least confident dropped", fontsize=9)
    with atomic_path(out / "pseudo_labels.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)

    samples = eval_set(str(data["ccp-heldout"]))[:4]
    preds = {name: predict(weights, data["ccp-heldout"], short_side, count=4) for name, weights in models.items()}
    fig, axes = plt.subplots(len(samples), 2 + len(preds), figsize=(2.0 * (2 + len(preds)), 2.6 * len(samples)),
                             squeeze=False)
    for row, sample in enumerate(samples):
        panels = [("photo", sample.image), ("mask", sample.alpha)] + [(n, p[row]) for n, p in preds.items()]
        for col, (title, panel) in enumerate(panels):
            axes[row, col].imshow(panel, cmap=None if panel.ndim == 3 else "gray", vmin=0, vmax=1)
            axes[row, col].set_title(title if row == 0 else "", fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    with atomic_path(out / "heldout.png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(out: Path, args, labelled: int, scores: dict, pseudo: dict, check: dict, timings, wall: float) -> Path:
    lines = ["# Self-training on real photos: one round of pseudo labels", "",
             f"Machine: {'GPU' if torch.cuda.is_available() else 'CPU'}, {os.cpu_count()} cores; "
             f"Python {platform.python_version()}, torch {torch.__version__}. Wall time of this invocation "
             f"{wall / 60:.1f} min; recorded time of all parts "
             f"{sum(v['seconds'] for v in timings.saved.values()) / 60:.1f} min.", "",
             f"Stage 0 (segmentation), `{ARCH}`, {CROP} px crops, batch {BATCH}, {args.steps} steps, lr {LR:g}, "
             f"seed 0, each run from scratch. Labelled: {labelled} CCP photos (`--num-seg`); pseudo labels: "
             f"round 0 on {pseudo['counts']['images']} unlabelled CCP photos, flip TTA, shorter side "
             f"{args.short_side}, `--min-confidence {args.min_confidence:g}`: {pseudo['counts']['kept']} kept, "
             f"{pseudo['counts']['dropped']} dropped. Round 1: `--seg labelled pseudo --seg-weights "
             f"{args.seg_weights[0]:g} {args.seg_weights[1]:g}`. Scored at shorter side {args.short_side}; "
             "MSE x1e3 over the whole image; IoU of prediction > 0.5 and mask > 0.5. rbg's masks are a "
             "service's output, i.e. pseudo labels themselves.", "",
             "| model | " + " | ".join(f"{s} MSE | {s} IoU" for s in EVAL_SETS) + " |",
             "| --- | " + " | ".join("--- | ---" for _ in EVAL_SETS) + " |"]
    for model, title in MODELS.items():
        cells = [f"{np.mean(list(scores[model][s]['mse'].values())):.2f} | "
                 f"{np.mean(list(scores[model][s]['iou'].values())):.4f}" for s in EVAL_SETS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Round 1 minus round 0, mean over the photos [95% paired bootstrap interval]:", ""]
    better = []
    for s in EVAL_SETS:
        for metric, sign in (("mse", -1), ("iou", 1)):  # sign: +1 where higher is better
            mean, lo, hi = paired_interval(scores["round-0"][s][metric], scores["round-1"][s][metric])
            lines.append(f"- {s} {metric.upper()}: {mean:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            gain = sorted((sign * lo, sign * hi))  # the interval of the improvement
            better.append("better" if gain[0] > 0 else "worse" if gain[1] < 0 else "no clear change")
    verdict = {"better": "round 1 is better", "worse": "round 1 is worse", "no clear change": "no clear change"}
    lines += ["", "**Verdict:** " + "; ".join(f"{s} {m.upper()}: {verdict[b]}" for (s, m), b in
                                              zip([(s, m) for s in EVAL_SETS for m in ("mse", "iou")], better)),
              "(a change counts when its whole interval is on one side of zero; the interval covers the "
              "choice of test photos, not the training's seed).", "",
              f"Does the confidence pick the better pseudo masks? Round 0's masks of the {check['photos']} "
              f"held-out CCP photos, scored as wsshm-pseudo-label scores them: Spearman correlation of "
              f"confidence and IoU {check['spearman']:.2f}; the {check['kept']} photos at confidence >= "
              f"{args.min_confidence:g} have mean IoU {_fmt(check['iou_kept'])}, the other "
              f"{check['photos'] - check['kept']} {_fmt(check['iou_dropped'])}.", "",
              "![pseudo labels](pseudo_labels.png)", "", "![held-out photos](heldout.png)", "",
              "| part | seconds | this invocation |", "| --- | --- | --- |",
              *[f"| {k} | {v['seconds']:.0f} | {'reused' if k in timings.reused else 'ran'} |"
                for k, v in timings.saved.items()]]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return study(args)
    except StepFailed as failure:  # names the step and its log
        print(failure, file=sys.stderr)
        return 1


def study(args) -> int:
    quick = 32 if args.quick else None
    if args.quick:  # a 40-step round 0 is sure of nothing: keep every pseudo label
        args.steps, args.min_confidence = 40, 0.0
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / ("self-training" + "-quick" * args.quick)
    started = time.perf_counter()
    gpus = torch.cuda.device_count()
    env = training_env(gpus, 1)
    torch.set_num_threads(1)
    source = Path(args.realdata)
    absent = [p for p in (source / "ccp-unlabeled" / "images", source / "ccp" / "masks", source / "rbg" / "masks")
              if not p.is_dir()]
    if absent:  # `make bench` runs every benchmark; without the data kit this one has nothing to measure
        print(f"{PROG}: skipped: {absent[0]} is absent (the real-photo data kit, ../shared/realdata/README.md; "
              "--realdata DIR points elsewhere)")
        return 0
    photos = unlabelled_photos(source, out, 40 if args.quick else None)
    data, seconds = fidelity_data.prepare_real(source, out, env, quick, names=("seg", *EVAL_SETS), prog=PROG)
    timings = Timings(out / "timings.json")  # a rerun that reuses a part still reports its time
    timings.add("data", seconds, steps=None)
    labelled = min(args.labelled, 24) if args.quick else args.labelled
    common = ["--steps", args.steps, "--warmup-steps", max(1, args.steps // 20), "--lr", LR, "--arch", ARCH,
              "--crop-sizes", CROP, "--batch-size", BATCH, "--num-workers", 1, "--log-every", 10,
              "--image-every", 1000, "--save-every", 100]
    runs = {"round-0": Run("round-0", "pretrain", [*common, "--seg", data["seg"], "--num-seg", labelled]),
            "ceiling": Run("ceiling", "pretrain", [*common, "--seg", data["seg"]])}
    timings.add("round-0", train(runs["round-0"], out, env, gpus, 1, who=PROG), args.steps)
    pseudo, seconds = pseudo_label(runs["round-0"].weights(out), photos, out / "data" / "pseudo", args, env)
    timings.add("pseudo labels", seconds, steps=None)
    runs["round-1"] = Run("round-1", "pretrain", [*common, "--seg", data["seg"], out / "data" / "pseudo",
                                                  "--seg-weights", *args.seg_weights, "--num-seg", labelled])
    for name in ("round-1", "ceiling"):
        timings.add(name, train(runs[name], out, env, gpus, 1, who=PROG), args.steps)
    start = time.perf_counter()
    models = {name: runs[name].weights(out) for name in MODELS}
    scores = {name: {s: per_photo(weights, data[s], out / "eval" / name / s, args.short_side, name)
                     for s in EVAL_SETS} for name, weights in models.items()}
    check = confidence_check(models["round-0"], data["ccp-heldout"], args.short_side, args.min_confidence)
    figures(out, pseudo, photos, data, models, args.short_side)
    timings.add("evaluation and figures", time.perf_counter() - start, steps=None)
    write_json(out / "results.json", {"scores": scores, "pseudo_counts": pseudo["counts"], "confidence_check": check,
                                      "timings": timings.saved, "args": vars(args)}, indent=1)
    path = report(out, args, labelled, scores, pseudo, check, timings, time.perf_counter() - started)
    print(f"\n{path}:\n\n{path.read_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
