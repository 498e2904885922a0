"""The matting network of paper Fig. 12: U-Net decoder + ASPP on a ResNet encoder, two heads.

    x ──► stem(/2) ─► layer1(/2) ─► layer2(/4) ─► layer3(/8) ─► layer4(/16) ─► ASPP
                                                                                │
    matte, boundary ◄─ heads ◄─ up·[x] ◄─ up·[stem, layer1] ◄─ up·[layer2] ◄─ up·[layer3]

Each ``up·[...]`` is a bilinear x2 upsampling, a concatenation with the skip features of that
resolution, and two 3x3 conv-BN-ReLU. Every width (encoder and decoder) scales with ``width``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import ResNetEncoder, scaled

OUTPUT_STRIDE = 16  # deepest features: stem stride 2 (no max-pool) x three stride-2 stages
# Dilation rates for the 3x3 ASPP branches. DeepLab's (6, 12, 18) are sized for 33x33 stride-16 maps
# (513 crops); our crops are 512-768 and test images have a 512 short side, i.e. 32-48 cells, and
# Fig. 12 draws d=3, so we use (3, 6, 9): receptive fields of 7, 13 and 19 cells at stride 16.
ASPP_RATES = (3, 6, 9)
ASPP_WIDTH = 256
DECODER_WIDTHS = (256, 128, 64, 32)  # outputs at strides 8, 4, 2, 1


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """1x1 branch, one 3x3 branch per dilation rate, and image pooling, fused by a 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates=ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] +
                                      [conv_bn_relu(cin, cout, 3, rate) for rate in rates])
        # no BatchNorm after pooling: a 1x1 map with batch 1 has a single value per channel
        self.pool = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, x.shape[2], x.shape[3])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class UpBlock(nn.Module):
    """Bilinear x2, concatenate the skips, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.fuse = nn.Sequential(conv_bn_relu(cin + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, *skips], dim=1))


class Head(nn.Module):
    """3x3 conv-BN-ReLU then a 1x1 conv to one logit channel."""

    def __init__(self, cin: int):
        super().__init__()
        self.body = conv_bn_relu(cin, cin)
        self.logit = nn.Conv2d(cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logit(self.body(x))


class MattingNet(nn.Module):
    """``forward(x) -> (matte, boundary)`` in [0, 1], ``forward_logits(x)`` the pre-sigmoid maps.

    ``x`` is ImageNet-normalised RGB ``[B, 3, H, W]`` with ``H`` and ``W`` multiples of 16 (the
    output stride; the project's test-time protocol uses multiples of 32).
    """

    def __init__(self, depth: int = 18, width: float = 1.0, aspp_rates=ASPP_RATES, in_channels: int = 3):
        super().__init__()
        self.arch: str | None = None  # set by the registry
        self.encoder = ResNetEncoder(depth, width, in_channels)
        stem, c1, c2, c3, c4 = self.encoder.channels
        d8, d4, d2, d1 = (scaled(c, width) for c in DECODER_WIDTHS)
        self.aspp = ASPP(c4, scaled(ASPP_WIDTH, width), tuple(aspp_rates))
        self.decoder = nn.ModuleList([UpBlock(scaled(ASPP_WIDTH, width), c3, d8),
                                      UpBlock(d8, c2, d4),
                                      UpBlock(d4, stem + c1, d2),
                                      UpBlock(d2, in_channels, d1)])
        self.matte_head = Head(d1)
        self.boundary_head = Head(d1)

    def forward_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x.shape[-2:]
        if height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
            raise ValueError(f"MattingNet needs height and width multiples of {OUTPUT_STRIDE} "
                             f"(use multiples of 32), got {height}x{width}")
        stem, f1, f2, f3, f4 = self.encoder(x)
        y = self.aspp(f4)
        for block, skips in zip(self.decoder, ([f3], [f2], [stem, f1], [x])):
            y = block(y, skips)
        return self.matte_head(y), self.boundary_head(y)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        matte, boundary = self.forward_logits(x)
        return torch.sigmoid(matte), torch.sigmoid(boundary)
