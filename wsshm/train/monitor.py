"""What a run shows while it trains (rank 0 only): a tqdm bar, TensorBoard scalars and image grids,
and ``loss.csv`` (step, loss, lr and the stage's logged terms) that the reports plot."""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from wsshm.atomic import atomic_path, open_no_follow

GRID_ROWS = 4


def image_grid(columns: list[Tensor], rows: int = GRID_ROWS) -> Tensor:
    """``[3, rows*H, len(columns)*W]`` in [0, 1]: one sample per row, one map per column."""
    n = min(rows, columns[0].shape[0])
    return torch.cat([torch.cat([c[i].float().cpu() for c in columns], dim=2) for i in range(n)], dim=1)


def _forget_rows_after(csv_path: Path, step: int) -> None:
    """Drop the rows of ``loss.csv`` logged after ``step`` (by a run that stopped after its last save)."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = rows[:1] + [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) <= step]
    if len(kept) == len(rows):
        return
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)


class Monitor:
    def __init__(self, tb_dir: Path, csv_path: Path, enabled: bool, total: int, initial: int, desc: str):
        self.enabled = enabled
        self.bar = self.writer = self.csv = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(tb_dir), purge_step=initial + 1 if initial else None)
        resumed = initial > 0 and csv_path.exists()
        if resumed:
            _forget_rows_after(csv_path, initial)  # the resumed run logs those steps again
        # written with the first row, which names the terms (a run stopped before its first row left none)
        self.need_header = not resumed or csv_path.stat().st_size == 0
        self.csv_file = open_no_follow(csv_path, "a" if resumed else "w", newline="")
        self.csv = csv.writer(self.csv_file)
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)
        self.shown_loss = None

    def step(self, step: int, loss: float | None, terms: dict, lr: float, images_per_s: float,
             log: bool) -> None:
        """``loss`` is None between logging steps: the loop reads it back from the GPU only then, and
        the bar shows the last logged value."""
        if not self.enabled:
            return
        if loss is not None:
            self.shown_loss = loss
        shown = {} if self.shown_loss is None else {"loss": f"{self.shown_loss:.4f}"}
        self.bar.set_postfix({**shown, **{k: f"{v:.4f}" for k, v in terms.items()},
                              "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"}, refresh=False)
        self.bar.update(step - self.bar.n)
        if log:
            self.writer.add_scalar("loss/total", loss, step)
            for name, value in terms.items():
                self.writer.add_scalar(f"loss/{name}", value, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("images_per_s", images_per_s, step)
            if self.need_header:
                self.csv.writerow(["step", "loss", "lr", *terms])
                self.need_header = False
            self.csv.writerow([step, f"{loss:.6g}", f"{lr:.6g}", *(f"{v:.6g}" for v in terms.values())])
            self.csv_file.flush()

    def images(self, step: int, columns: list[Tensor]) -> None:
        if self.enabled and columns:
            self.writer.add_image("samples", image_grid(columns), step)

    def close(self) -> None:
        if not self.enabled or self.bar is None:
            return
        self.bar.close()
        self.writer.close()
        self.csv_file.close()
        self.bar = None
