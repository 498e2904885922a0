"""Image conventions shared by the loaders, training, evaluation, prediction and export.

Networks take RGB images normalised with the ImageNet statistics (the encoder is a ResNet, and
torchvision's weights expect them), as float ``[B, 3, H, W]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey as torchvision computes it (ITU-R 601 luma), for colour jitter in Python and C++ alike.
GREY_WEIGHTS = (0.2989, 0.587, 0.114)
# What counts as an image file in a user's folder (lower-case suffixes; OpenCV and PIL read them all).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


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
