"""Image conventions shared by the loaders, training, evaluation, prediction and export.

Networks take RGB images normalised with the ImageNet statistics (the encoder is a ResNet, and
torchvision's weights expect them), as float ``[B, 3, H, W]``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey as torchvision computes it (ITU-R 601 luma), for colour jitter in Python and C++ alike.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)
# What counts as an image file in a user's folder (lower-case suffixes; OpenCV and PIL read them all).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# The largest image wsshm decodes (width x height), checked from the header before any pixel is
# decoded: by the converter (its --max-pixels default and ceiling), the shard reader (loaders, verify,
# evaluation). 80 MP holds a 61 MP full-frame or 50 MP phone photo; one such image decoded to RGB is
# 240 MB, and the evaluator's float copies of it several GB.
MAX_IMAGE_PIXELS = 80_000_000


def normalize_uint8(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[B, H, W, 3]`` (or ``[H, W, 3]``) RGB -> normalised float ``[B, 3, H, W]``."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects uint8 images, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize_uint8 expects [B, H, W, 3] or [H, W, 3], got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    x = images.permute(0, 3, 1, 2).float()
    return ((x - mean) / std).to(dtype).contiguous()


def denormalize(images: Tensor) -> Tensor:
    """Normalised float ``[B, 3, H, W]`` -> float RGB in [0, 1], for pictures and logs."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def read_image(path: str | os.PathLike, grey: bool = False) -> np.ndarray:
    """An image file as uint8 RGB ``H x W x 3`` (or grey ``H x W``), decoded as the converter's shard
    members are decoded for training and evaluation (``wsshm.shards.reader.decode_image_or_raise``), so a photo
    reads the same in ``wsshm-predict``, ``wsshm-export`` and ``wsshm-eval``: EXIF orientation applied,
    16-bit scaled to 8-bit, grey repeated to RGB, transparency dropped. A ``ValueError`` naming the file
    when it cannot be read."""
    from wsshm.shards.reader import decode_image_or_raise  # here: wsshm.shards imports this module

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ValueError(f"{path}: cannot read image ({error.strerror or error})") from None
    try:
        return decode_image_or_raise(data, grey)
    except Exception as error:  # BadInput saying why (empty, not an image, too large, broken)
        raise ValueError(f"{path}: cannot read image ({error})".replace("\n", " ")) from None


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """uint8 grey ``H x W``, RGB ``H x W x 3`` or RGBA ``H x W x 4`` to ``path`` as PNG, atomically
    (``wsshm.atomic.atomic_path``): a full disk or a read-only folder leaves no half-written file under
    ``path`` and raises an ``OSError`` whose message is one line naming the file."""
    from PIL import Image

    from wsshm.atomic import atomic_path

    try:
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    except OSError as error:
        raise OSError(f"{path}: cannot write ({error.strerror or error})") from None
