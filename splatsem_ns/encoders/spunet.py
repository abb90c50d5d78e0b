"""A sparse convolutional U-Net in the style of Pointcept's SpUNet-v1m1 (the MinkUNet family).

Stem (submanifold conv, kernel 5) -> per stage: strided conv (kernel 2, stride 2) + residual blocks of
submanifold convs -> decoder stages: transposed conv back to the finer sites, concatenation with the encoder's
features there, residual blocks. Output: one feature row per input voxel.

The default channels and depths are SpUNet-v1m1's (``channels=(32, 64, 128, 256, 256, 128, 96, 96)``,
``layers=(2, 3, 4, 6, 2, 2, 2, 2)``), written here as separate encoder and decoder tuples ordered fine to coarse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Tuple

import torch
from torch import nn

from splatsem_ns.encoders.layers import FeatureNorm, feature_norm
from splatsem_ns.encoders.registry import BACKBONES, BackboneConfig, SparseBackbone
from splatsem_ns.encoders.sparse_conv import ConvBackend, InverseConv3d, StridedConv3d, SubmanifoldConv3d
from splatsem_ns.encoders.sparse_tensor import SparseTensor


@dataclass
class SpUNetConfig(BackboneConfig):
    """Channels and depths of the sparse U-Net (tuples ordered from the finest stage to the coarsest)."""

    stem_channels: int = 32
    """Channels of the stem at the input resolution."""
    stem_kernel_size: int = 5
    """Kernel of the stem's submanifold conv (5: a 10 cm neighbourhood at 2 cm voxels)."""
    encoder_channels: Tuple[int, ...] = (32, 64, 128, 256)
    """Channels of each encoder stage; stage s works at 1/2^(s+1) of the input resolution."""
    encoder_depths: Tuple[int, ...] = (2, 3, 4, 6)
    """Residual blocks (two submanifold convs each) per encoder stage."""
    decoder_channels: Tuple[int, ...] = (96, 96, 128, 256)
    """Channels of each decoder stage; decoder stage s works at encoder stage s - 1's resolution (the stem's for
    s = 0), so ``decoder_channels[0]`` is the output width."""
    decoder_depths: Tuple[int, ...] = (2, 2, 2, 2)
    """Residual blocks per decoder stage."""
    norm: FeatureNorm = "batch"
    """Feature normalisation after each conv (Pointcept: batch)."""

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "default": {},
        "tiny": dict(
            stem_channels=8,
            encoder_channels=(8, 16),
            encoder_depths=(1, 1),
            decoder_channels=(8, 16),
            decoder_depths=(1, 1),
        ),
    }


class SparseResidualBlock(nn.Module):
    """conv3 -> norm -> ReLU -> conv3 -> norm, plus the input (projected when the width changes), -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: FeatureNorm, backend: ConvBackend) -> None:
        super().__init__()
        self.conv1 = SubmanifoldConv3d(in_channels, out_channels, 3, bias=False, backend=backend)
        self.norm1 = feature_norm(norm, out_channels)
        self.conv2 = SubmanifoldConv3d(out_channels, out_channels, 3, bias=False, backend=backend)
        self.norm2 = feature_norm(norm, out_channels)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Linear(in_channels, out_channels, bias=False), feature_norm(norm, out_channels)
            )
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.conv1(x)
        y = self.conv2(y.replace_features(torch.relu(self.norm1(y.features))))
        return x.replace_features(torch.relu(self.norm2(y.features) + self.skip(x.features)))


class _ConvNormReLU(nn.Module):
    """A sparse conv followed by normalisation and ReLU (stem, down- and up-sampling)."""

    def __init__(self, conv: nn.Module, norm: FeatureNorm) -> None:
        super().__init__()
        self.conv = conv
        self.norm = feature_norm(norm, conv.out_channels)

    def forward(self, x: SparseTensor, *target: SparseTensor) -> SparseTensor:
        y = self.conv(x, *target)
        return y.replace_features(torch.relu(self.norm(y.features)))


def _blocks(in_channels: int, out_channels: int, depth: int, norm: FeatureNorm, backend: ConvBackend):
    return nn.ModuleList(
        SparseResidualBlock(in_channels if i == 0 else out_channels, out_channels, norm, backend)
        for i in range(depth)
    )


@BACKBONES.register("SpUNet-v1")
class SpUNet(SparseBackbone):
    """Sparse residual U-Net: voxel features in, ``decoder_channels[0]`` features per voxel out."""

    config_class = SpUNetConfig

    def __init__(self, in_channels: int, config: SpUNetConfig) -> None:
        super().__init__()
        stages = len(config.encoder_channels)
        for name in ("encoder_depths", "decoder_channels", "decoder_depths"):
            if len(getattr(config, name)) != stages:
                raise ValueError(
                    f"{name} needs one entry per encoder stage ({stages}), got {getattr(config, name)}"
                )
        self.config = config
        self.in_channels = in_channels
        self.out_channels = config.decoder_channels[0]
        norm, backend = config.norm, config.conv_backend
        self.stem = _ConvNormReLU(
            SubmanifoldConv3d(
                in_channels, config.stem_channels, config.stem_kernel_size, bias=False, backend=backend
            ),
            norm,
        )
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        widths = [config.stem_channels, *config.encoder_channels]  # width at each resolution level
        for s in range(stages):
            self.down.append(
                _ConvNormReLU(
                    StridedConv3d(widths[s], widths[s + 1], 2, 2, bias=False, backend=backend), norm
                )
            )
            self.encoder.append(
                _blocks(widths[s + 1], widths[s + 1], config.encoder_depths[s], norm, backend)
            )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(stages):
            deeper = config.encoder_channels[-1] if s == stages - 1 else config.decoder_channels[s + 1]
            width = config.decoder_channels[s]
            self.up.append(
                _ConvNormReLU(InverseConv3d(deeper, width, 2, 2, bias=False, backend=backend), norm)
            )
            self.decoder.append(_blocks(width + widths[s], width, config.decoder_depths[s], norm, backend))

    @property
    def coarsest_stride(self) -> int:
        return 2 ** len(self.config.encoder_channels)  # one kernel-2, stride-2 conv per stage

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.stem(x)
        skips = [x]
        for down, blocks in zip(self.down, self.encoder, strict=True):
            x = down(x)
            for block in blocks:
                x = block(x)
            skips.append(x)
        x = skips.pop()
        self.coarsest = x if self.keep_coarsest else None
        for s in reversed(range(len(self.up))):
            skip = skips.pop()
            x = self.up[s](x, skip)
            x = skip.replace_features(torch.cat([x.features, skip.features], dim=1))
            for block in self.decoder[s]:
                x = block(x)
        return x
