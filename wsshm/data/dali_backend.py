"""The DALI loader: ``fn.readers.webdataset`` over the shards' indexes, decoding (``mixed`` on a GPU,
``cpu`` with ``device_id=None`` without one), random scale / crop / flip in DALI; the per-pixel work
(compositing, colour jitter, normalisation) in the fused op on the training device, as the PyTorch
loader does. The geometry is drawn by ``wsshm.data.params`` and fed through an external source, so
both loaders draw the same parameters; DALI's checkpoint carries the readers' positions for resume.
Several data folders have a reader each; every reader advances each batch, and a DALI conditional
takes each sample from the folder ``wsshm.data.mixing`` chose for it, so only chosen samples decode.
"""
from __future__ import annotations

import base64
import os
import shutil
import tempfile
import weakref

import numpy as np
import torch

from wsshm.data import params
from wsshm.data.forms import Form
from wsshm.data.loader import Loader
from wsshm.data.mixing import Mixture
from wsshm.shards import MEMBERS, ShardFolderError, ShardSet, verify


def reader_extensions(kind: str) -> list[str]:
    """``fn.readers.webdataset``'s ``ext`` for a kind: the image choices as one output, the label."""
    members = MEMBERS[kind]
    return [";".join(members.images), *([members.label] if members.label else [])]


def check_shards(*shard_sets: ShardSet) -> None:
    """The ``wsshm-shard verify`` checks, up front: DALI cannot skip a bad sample mid-run."""
    for shard_set in shard_sets:
        problems = verify(shard_set.folder)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardFolderError(f"{shard_set.folder}: shards failed verification: {problems[0]}{more}; "
                                   f"run: wsshm-shard verify {shard_set.folder}")


def write_indexes(shard_set: ShardSet, folder: str) -> tuple[list[str], list[str]]:
    """DALI index files holding exactly the shard set's samples (a ``num_samples`` subset included)."""
    tars, indexes = [], []
    by_shard: dict[str, list[str]] = {}
    for s in shard_set.samples:
        by_shard.setdefault(s.shard, []).append(s.index_line())
    for n, tar in enumerate(shard_set.shards):
        path = os.path.join(folder, f"{shard_set.kind}-{n:06d}.idx")
        with open(path, "w") as f:
            f.write(f"v1.2 {len(by_shard[tar])}\n" + "\n".join(by_shard[tar]) + "\n")
        tars.append(tar)
        indexes.append(path)
    return tars, indexes


class GeometrySource:
    """External source: per-sample crop size, scale, crop position and flip for each batch, then (with
    several data folders) the folder of each sample."""

    def __init__(self, form: Form, config: params.AugmentConfig, data: Mixture, batch_size: int, seed: int,
                 rank: int, world_size: int):
        self.form, self.config, self.data, self.batch_size = form, config, data, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, batch_info):
        step, B = batch_info.iteration, self.batch_size
        size = params.crop_size(self.config, self.seed, step)
        outputs = [np.full(B, size, np.float32)]
        for stream in range(1 + self.form.background):
            g = params.geometry(self.config, B, self.seed, step, self.rank, stream)
            outputs += [g.scale, g.x, g.y, g.flip.astype(np.int32)]
        if len(self.data.sets) > 1:
            outputs.append(self.data.choice(B, self.world_size, self.seed, step, self.rank).astype(np.int32))
        return tuple(outputs)


def _build_pipeline(form, data_files, bg_files, source, *, batch_size, num_threads, device_id, seed,
                    rank, world_size, checkpoint):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device_id is not None
    decoder = "mixed" if gpu else "cpu"
    # the crop size, then scale, x, y, flip per geometry stream, then the folder when there are several
    n_out = 5 + 4 * form.background + (len(data_files) > 1)

    def read(files, kind, name, reader_seed):
        return fn.readers.webdataset(
            paths=files[0], index_paths=files[1], ext=reader_extensions(kind), shard_id=rank, num_shards=world_size,
            random_shuffle=True, initial_fill=256, seed=reader_seed, missing_component_behavior="error", name=name)

    def resize(image, size, flip, interp):
        # The flip is a mirrored region of interest of the resize (x from 1 to 0): on the CPU a
        # separate fn.flip pass cost as much as a tenth of the whole pipeline.
        mirrored = fn.cast(flip, dtype=types.FLOAT)
        zero = mirrored * 0.0
        return fn.resize(image, resize_x=size, resize_y=size, roi_relative=True,
                         roi_start=fn.stack(zero, mirrored), roi_end=fn.stack(zero + 1.0, 1.0 - mirrored),
                         interp_type=interp, antialias=interp != types.INTERP_NN)

    def warp(image, size, side, flip):
        # The same bilinear map as the resize above (pixel corners at the origin), flip included:
        # x_src = k*x (or side - k*x when flipped), y_src = k*y, with k = side / size.
        f = fn.cast(flip, dtype=types.FLOAT)
        k = side / size
        zero = f * 0.0
        matrix = fn.reshape(fn.stack(k - 2.0 * k * f, zero, side * f, zero, k, zero, zero, zero, zero + 1.0),
                            shape=[3, 3])
        return fn.experimental.warp_perspective(image, matrix=matrix, size=fn.stack(size, size),
                                                interp_type=types.INTERP_LINEAR, border_mode="replicate")

    def decode_crop(encoded, size, scale, x, y, flip, grey=False, nearest=False):
        # Decode only the window that becomes the crop (a square of side min(h, w) / scale at the
        # fractional position x, y), then resize it to size x size: the same geometry as resizing
        # the shorter side to size*scale and cropping, without resizing the whole image.
        shape = fn.cast(fn.peek_image_shape(encoded), dtype=types.FLOAT)
        side = dmath.floor(dmath.min(shape[0], shape[1]) / scale + 0.5)  # rounded, as torch_backend.crop
        image = fn.decoders.image_crop(encoded, device=decoder, output_type=types.GRAY if grey else types.RGB,
                                       crop_w=side, crop_h=side, crop_pos_x=x, crop_pos_y=y)
        if nearest or gpu:  # nearest neighbour is cheap; on a GPU so is the antialiased resize
            return resize(image, size, flip, types.INTERP_NN if nearest else types.INTERP_LINEAR)
        # On the CPU fn.resize's separable float filter costs 8-15x cv2.resize (docs/data.md). When
        # enlarging (no antialiasing needed) fn.experimental.warp_perspective, OpenCV's fixed-point
        # bilinear warp inside DALI, does the same map 2-3x faster; shrinking keeps the antialiased
        # resize (a warp would alias). The choice is per sample: a DALI conditional.
        if side <= size:
            out = warp(image, size, side, flip)
        else:
            out = resize(image, size, flip, types.INTERP_LINEAR)
        return out

    @pipeline_def(enable_checkpointing=True, enable_conditionals=True)
    def pipeline():
        geo = fn.external_source(source=source, num_outputs=n_out, batch=True, batch_info=True)
        size, folder = geo[0], geo[-1]
        # the first folder's reader keeps the name and seed a single-folder pipeline has always had
        encoded, encoded_label = read(data_files[0], form.kind, "data", seed * 2 + 1)
        for i, files in enumerate(data_files[1:], start=1):
            other, other_label = read(files, form.kind, f"data{i}", seed * 2 + 1 + 1000 * i)
            if folder == i:
                encoded, encoded_label = other, other_label
        image = decode_crop(encoded, size, *geo[1:5])
        label = decode_crop(encoded_label, size, *geo[1:5], grey=True, nearest=not form.soft_labels)
        if not form.background:
            return image, label
        encoded_bg = read(bg_files, "background", "background", seed * 2 + 2)  # one ext: one node
        return image, label, decode_crop(encoded_bg, size, *geo[5:9])

    # exec_dynamic (DALI's default model, named because _to_torch relies on it): fresh output buffers
    # each iteration, kept alive while referenced.
    pipe = pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed + 7919 * rank,
                    prefetch_queue_depth=2, exec_dynamic=True, checkpoint=checkpoint)
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    # no copy: the tensor shares DALI's output buffer, which the dynamic executor does not reuse
    # while the tensor (holding the DLPack capsule) lives
    return torch.from_dlpack(tensor_list.as_tensor())


class DaliLoader(Loader):
    """The state is the step and DALI's pipeline checkpoint (the readers' positions)."""

    backend = "dali"
    state_must_match = ("backend", *Loader.state_must_match)

    def __init__(self, form: Form, data: Mixture, background: ShardSet | None, *, num_workers: int, **common):
        super().__init__(form, data, **common)
        self.num_threads = max(1, num_workers)
        self._tmp = tempfile.mkdtemp(prefix="wsshm-dali-idx-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self.data_files = []
        for i, shard_set in enumerate(data.sets):
            folder = os.path.join(self._tmp, f"data{i}")
            os.makedirs(folder)
            self.data_files.append(write_indexes(shard_set, folder))
        bg_dir = os.path.join(self._tmp, "bg")
        os.makedirs(bg_dir)
        self.bg_files = write_indexes(background, bg_dir) if background is not None else None
        self._pipe = None
        self._checkpoint = None

    def _start(self):
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        source = GeometrySource(self.form, self.config, self.data, self.batch_size, self.seed, self.rank,
                                self.world_size)
        self._pipe = _build_pipeline(
            self.form, self.data_files, self.bg_files, source, batch_size=self.batch_size,
            num_threads=self.num_threads, device_id=device_id, seed=self.seed, rank=self.rank,
            world_size=self.world_size, checkpoint=self._checkpoint)

    def _read(self) -> dict:
        if self._pipe is None:
            self._start()
        outputs = [_to_torch(o, self.device) for o in self._pipe.run()]
        crops = {"images": outputs[0], "labels": outputs[1][..., 0]}
        if self.form.background:
            crops["backgrounds"] = outputs[2]
        return crops

    def _extra_state(self) -> dict:
        checkpoint = self._pipe.checkpoint() if self._pipe is not None else self._checkpoint
        if isinstance(checkpoint, bytes):  # keep the state JSON-safe
            checkpoint = "base64:" + base64.b64encode(checkpoint).decode()
        return {"dali_checkpoint": checkpoint}

    def _restore(self, state: dict) -> None:
        checkpoint = state["dali_checkpoint"]
        if isinstance(checkpoint, str) and checkpoint.startswith("base64:"):
            checkpoint = base64.b64decode(checkpoint[len("base64:"):])
        self._checkpoint = checkpoint

    def _stop(self) -> None:
        self._pipe = None
