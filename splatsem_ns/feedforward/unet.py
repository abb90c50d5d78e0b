"""Convolution building blocks shared by the network's parts: a residual block and a small 2D U-Net.

GroupNorm everywhere rather than BatchNorm: batches here are one or two scenes of a few views, too few samples
for batch statistics, and GroupNorm makes training and evaluation compute the same function.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest group count up to ``max_groups`` that divides ``channels``."""
    return nn.GroupNorm(math.gcd(channels, max_groups), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.skip = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
        )

    def forward(self, x: Float[Tensor, "B Cin H W"]) -> Float[Tensor, "B Cout h w"]:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x))


class UNet2d(nn.Module):
    """An encoder-decoder with skip connections: ``len(channels)`` levels, each halving the resolution.

    Any input size works: the decoder upsamples to the skip connection's exact size, so odd sizes need no padding.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        if not channels:
            raise ValueError("UNet2d needs at least one level of channels")
        channels = list(channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList([ResidualBlock(channels[0], channels[0])])
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.encoder.append(ResidualBlock(c_in, c_out, stride=2))
        self.decoder = nn.ModuleList(
            [
                ResidualBlock(c_deep + c_skip, c_skip)
                for c_deep, c_skip in zip(channels[:0:-1], channels[-2::-1], strict=True)
            ]
        )
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, x: Float[Tensor, "B Cin H W"]) -> Float[Tensor, "B Cout H W"]:
        skips = []
        x = self.stem(x)
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.decoder, skips[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
