"""The PyTorch loader: random access to the shards through their indexes, decoding and geometry in
DataLoader workers (OpenCV), the per-pixel work in the fused op on the training device.

Global batch ``step`` takes the positions ``step*world*B + rank*B + j`` of an endless stream made of
shuffled epochs, so ranks get disjoint samples within an epoch, every batch is full, and the loader's
whole state is its step counter. With several folders each folder has such a stream, and the
positions are dealt to the folders at their shares (``wsshm.data.mixing``).
"""
from __future__ import annotations

import itertools
import signal
import sys
import warnings

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsshm.data import params
from wsshm.data.forms import Form
from wsshm.data.loader import Loader
from wsshm.data.mixing import Mixture
from wsshm.shards import CorruptSample, ShardSet, decode_sample


def crop(image: np.ndarray, size: int, scale: float, x: float, y: float, flip: bool, nearest=False) -> np.ndarray:
    """Resize so the shorter side is ``size*scale``, crop ``size`` square at fraction (x, y) of the room,
    flip: done as crop-then-resize of the matching window of the original, which is cheaper."""
    h, w = image.shape[:2]
    side = min(h, w) / scale  # window in original pixels that becomes the crop
    side_px = max(1, min(int(round(side)), h, w))
    x0 = int(round(x * (w - side_px)))
    y0 = int(round(y * (h - side_px)))
    window = image[y0 : y0 + side_px, x0 : x0 + side_px]
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if side_px > size else cv2.INTER_LINEAR
    out = cv2.resize(window, (size, size), interpolation=interpolation)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def _leave_sigterm_to_the_trainer(worker_id: int) -> None:
    """A scheduler's SIGTERM reaches the whole process group. A worker that died of it would make the
    trainer raise before it can save; ignored here, the trainer saves and then stops its workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchDataset(Dataset):
    """Item ``step`` is this rank's uint8 batch of global batch ``step``."""

    def __init__(self, form: Form, data: Mixture, background: ShardSet | None, batch_size: int,
                 config: params.AugmentConfig, rank: int, world_size: int, seed: int):
        self.form, self.data, self.background = form, data, background
        self.batch_size, self.config = batch_size, config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._warned: set[str] = set()

    def __len__(self):  # endless; DataLoader only needs a number
        return 2**62

    def _index(self, source: int, position: int) -> int:
        n = len(self.data.sets[source])
        key = (source, position // n)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one epoch per folder
            self._orders[key] = params.sample_order(n, self.seed, key[1], source)
        return int(self._orders[key][position % n])

    def _decode_at(self, shard_set: ShardSet, index: int):
        """Decode sample ``index``, skipping corrupt ones (with a warning) to the next good one."""
        for attempt in range(len(shard_set)):
            sample = shard_set.samples[(index + attempt) % len(shard_set)]
            try:
                return decode_sample(sample, shard_set.kind)
            except CorruptSample as exc:
                if str(exc) not in self._warned:
                    self._warned.add(str(exc))
                    warnings.warn(f"skipping corrupt sample: {exc}", RuntimeWarning, stacklevel=2)
        raise RuntimeError(f"{shard_set.folder}: no sample decodes")

    def __getitem__(self, step: int) -> dict:
        cv2.setNumThreads(1)
        B, cfg = self.batch_size, self.config
        size = params.crop_size(cfg, self.seed, step)
        geo = params.geometry(cfg, B, self.seed, step, self.rank)
        first = (step * self.world_size + self.rank) * B
        folders, within = self.data.streams(np.arange(first, first + B), self.seed)
        images, labels = [], []
        for j in range(B):
            source = int(folders[j])
            image, label = self._decode_at(self.data.sets[source], self._index(source, int(within[j])))
            args = (size, float(geo.scale[j]), float(geo.x[j]), float(geo.y[j]), bool(geo.flip[j]))
            images.append(crop(image, *args))
            labels.append(crop(label, *args, nearest=not self.form.soft_labels))
        crops = {"images": torch.from_numpy(np.stack(images)), "labels": torch.from_numpy(np.stack(labels))}
        if self.form.background:
            bg_geo = params.geometry(cfg, B, self.seed, step, self.rank, stream=1)
            choice = params.background_choice(len(self.background), B, self.seed, step, self.rank)
            backgrounds = []
            for j in range(B):
                bg, _ = self._decode_at(self.background, int(choice[j]))
                backgrounds.append(crop(bg, size, float(bg_geo.scale[j]), float(bg_geo.x[j]),
                                        float(bg_geo.y[j]), bool(bg_geo.flip[j])))
            crops["backgrounds"] = torch.from_numpy(np.stack(backgrounds))
        return crops


class TorchLoader(Loader):
    """The loader's whole state is its step: item ``step`` of the dataset is batch ``step``."""

    backend = "torch"

    def __init__(self, form: Form, data: Mixture, background: ShardSet | None, *, num_workers: int, **common):
        super().__init__(form, data, **common)
        self.dataset = BatchDataset(form, data, background, self.batch_size, self.config, self.rank,
                                    self.world_size, self.seed)
        self.num_workers = num_workers
        self._batches = None

    def _read(self) -> dict:
        if self._batches is None:
            workers = self.num_workers
            # Forking a process in which a DALI pipeline has run hung the workers (a lock held by a DALI
            # thread at fork time): then start them from a clean fork server (needs a __main__ guard).
            context = "forkserver" if workers and "nvidia.dali.backend" in sys.modules else None
            self._batches = iter(DataLoader(
                self.dataset, batch_size=None, sampler=itertools.count(self.step), num_workers=workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None,
                persistent_workers=False, multiprocessing_context=context,
                worker_init_fn=_leave_sigterm_to_the_trainer if workers else None))
        return next(self._batches)

    def _stop(self) -> None:
        self._batches = None  # drops the DataLoader iterator, which stops its workers
