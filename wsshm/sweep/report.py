"""Table 7 and Figures 6-9 from whatever cells are done: ``report/table7.md``, ``report/table7.csv``,
``report/cells.json`` and ``report/figure-NAME.png`` per evaluation set, each written atomically.
A cell without its ``metrics.json`` is a blank (a missing point in the figures), never an error."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from wsshm.atomic import atomic_path, write_json, write_text
from wsshm.sweep.plan import cell_name, model_kind

# Table 7's columns per evaluation set: MSE x1e3 and SAD /1e3, as wsshm-eval reports them.
METRICS = {"mse": "MSE", "mse_boundary": "MSE (boundary)", "sad": "SAD", "sad_boundary": "SAD (boundary)"}


def read_sweep(out: Path) -> dict:
    from wsshm.sweep.cli import SWEEP_FILE, InputError
    path = out / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--out {out}: no {SWEEP_FILE}; not a sweep folder (start it with wsshm-sweep run)") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable ({error})") from None


def collect(out: Path, sweep: dict) -> list[dict]:
    """One entry per trained cell (all but (0, 0)), with each evaluation set's mean metrics or None."""
    cells = []
    for seg in sweep["num_seg"]:
        for matte in sweep["num_matte"]:
            if seg == 0 and matte == 0:
                continue  # the paper trains nothing without labels
            metrics = {}
            for name in sweep["eval"]:
                path = out / "eval" / cell_name(seg, matte) / name / "metrics.json"
                try:
                    metrics[name] = json.loads(path.read_text())["mean"]
                except (OSError, ValueError, KeyError, TypeError):
                    metrics[name] = None  # not done yet (or being written by another shard)
            cells.append({"seg": seg, "matte": matte, "model": model_kind(seg, matte),
                          "done": all(m is not None for m in metrics.values()), "metrics": metrics})
    return cells


def value(cell: dict, name: str, key: str) -> float:
    metrics = cell["metrics"][name]
    number = metrics.get(key) if metrics else None
    return math.nan if number is None else float(number)


def fmt(number: float) -> str:
    return "" if math.isnan(number) else f"{number:.3f}"


def table_rows(cells: list[dict], names: list[str]) -> tuple[list[str], list[list[str]]]:
    head = ["#seg", "#matte", "model"] + [f"{name} {label}" for name in names for label in METRICS.values()]
    rows = [[str(c["seg"]), str(c["matte"]), c["model"]] + [fmt(value(c, name, key)) for name in names
                                                               for key in METRICS] for c in cells]
    return head, rows


def markdown(cells: list[dict], names: list[str]) -> str:
    head, rows = table_rows(cells, names)
    done = sum(c["done"] for c in cells)
    lines = [f"{done} of {len(cells)} cells done (blank: not done yet). MSE x1e3, SAD /1e3.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(cells: list[dict], sweep: dict, name: str, path: Path) -> None:
    """Figures 6-9: MSE against #seg, one line per #matte; whole image and boundary panels."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a training machine
    import matplotlib.pyplot as plt
    segs = sweep["num_seg"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, (("mse", "whole image"), ("mse_boundary", "boundary"))):
        for matte in sweep["num_matte"]:
            by_seg = {c["seg"]: value(c, name, key) for c in cells if c["matte"] == matte}
            ys = [by_seg.get(s, math.nan) for s in segs]
            # evenly spaced counts, as in the paper's figures (0 has no place on a log axis)
            ax.plot(range(len(segs)), ys, marker="o", label=f"#matte {matte}")
        ax.set_xticks(range(len(segs)), [str(s) for s in segs])
        ax.set_xlabel("#seg")
        ax.set_ylabel("MSE (x1e3)")
        ax.set_title(f"{name}: {label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out: Path) -> list[Path]:
    """Write the report of the sweep in ``out``; returns the files written."""
    sweep = read_sweep(out)
    names = list(sweep["eval"])
    cells = collect(out, sweep)
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "table7.md", markdown(cells, names))
    head, rows = table_rows(cells, names)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([head, *rows])
    write_text(folder / "table7.csv", buffer.getvalue())
    write_json(folder / "cells.json", {"eval": names, "cells": cells}, indent=2)
    written = [folder / "table7.md", folder / "table7.csv", folder / "cells.json"]
    for name in names:
        figure(cells, sweep, name, folder / f"figure-{name}.png")
        written.append(folder / f"figure-{name}.png")
    return written
