"""Multi-view image features at 1/4 resolution: a per-view CNN, then a cross-view transformer (MVSplat's backbone).

The CNN sees one image at a time; the transformer lets every view's features look at the other views, which is
what makes them good for matching in the cost volume. Attention runs in local windows (Swin-style), so its cost is
linear in the image size: tokens attend to the tokens of their own window in their own view (self-attention) and
to the tokens of the window at the same place in every other view (cross-attention). With views of a scene that
overlap a lot (what the datamanager picks), a point's match lies near the same image position, inside or next to
that window; every other layer shifts the windows by half their size so that information crosses window borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from splatsem_ns.feedforward.constants import device_constant
from splatsem_ns.feedforward.unet import ResidualBlock, group_norm

FEATURE_STRIDE = 4
"""Image pixels per feature cell along each axis: the backbone's features are at 1/4 resolution."""


@dataclass
class BackboneConfig:
    """The per-view CNN and the cross-view transformer."""

    cnn_channels: Tuple[int, int, int] = (64, 96, 128)
    """CNN channels at 1/2 resolution, at the step down to 1/4, and at 1/4 resolution."""
    feature_dim: int = 128
    """Channels of the output features (MVSplat: 128); also the transformer's width."""
    num_transformer_layers: int = 6
    """Cross-view transformer layers (MVSplat: 6); 0 leaves the CNN features per view."""
    num_heads: int = 4
    """Attention heads; must divide ``feature_dim``."""
    window_size: int = 8
    """Attention window edge in tokens (1/4-resolution cells): 8 covers 32x32 image pixels."""
    mlp_ratio: float = 4.0
    """Hidden width of each layer's MLP, relative to ``feature_dim``."""


@dataclass
class BackboneOutput:
    """What the backbone hands to the cost volume and the semantic branch."""

    features: Float[Tensor, "B V C h w"]
    """Multi-view features after the cross-view transformer."""
    cnn_features: Float[Tensor, "B V C h w"]
    """The per-view CNN features before any view saw another (monocular cues)."""


class PerViewCNN(nn.Module):
    """ResNet-style feature extractor: a strided 7x7 stem, residual blocks, 1/4 resolution out."""

    def __init__(self, channels: Tuple[int, int, int], out_dim: int) -> None:
        super().__init__()
        c_half, c_down, c_quarter = channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_half, 7, stride=2, padding=3, bias=False),
            group_norm(c_half),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(
            ResidualBlock(c_half, c_half),
            ResidualBlock(c_half, c_down, stride=2),
            ResidualBlock(c_down, c_quarter),
            ResidualBlock(c_quarter, c_quarter),
        )
        self.out = nn.Conv2d(c_quarter, out_dim, 1)

    def forward(self, images: Float[Tensor, "N 3 H W"]) -> Float[Tensor, "N C h w"]:
        return self.out(self.blocks(self.stem(images)))


def window_positional_encoding(
    height: int, width: int, window: Tuple[int, int], channels: int, device: torch.device
) -> Float[Tensor, "h w C"]:
    """Sine encoding of each token's position inside its window (UniMatch's choice): attention inside a window
    then knows relative layout, while features stay free of the absolute image position."""
    y = torch.arange(height, device=device, dtype=torch.float32) % window[0]
    x = torch.arange(width, device=device, dtype=torch.float32) % window[1]
    quarter = channels // 4
    frequencies = 1.0 / (
        10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    )
    ey = y[:, None] * frequencies  # [h, C/4]
    ex = x[:, None] * frequencies  # [w, C/4]
    encoding = torch.zeros(height, width, channels, device=device)
    encoding[..., 0:quarter] = torch.sin(ey)[:, None, :]
    encoding[..., quarter : 2 * quarter] = torch.cos(ey)[:, None, :]
    encoding[..., 2 * quarter : 3 * quarter] = torch.sin(ex)[None, :, :]
    encoding[..., 3 * quarter : 4 * quarter] = torch.cos(ex)[None, :, :]
    return encoding


def window_partition(
    x: Float[Tensor, "*batch Hp Wp C"], window: Tuple[int, int]
) -> Float[Tensor, "*batch n T C"]:
    """Split a (padded) token grid into non-overlapping windows of ``window`` tokens, row-major."""
    *batch, height, width, channels = x.shape
    wh, ww = window
    x = x.reshape(*batch, height // wh, wh, width // ww, ww, channels)
    x = x.transpose(-4, -3)  # [..., nH, nW, wh, ww, C]
    return x.reshape(*batch, (height // wh) * (width // ww), wh * ww, channels)


def window_merge(
    windows: Float[Tensor, "*batch n T C"], height: int, width: int, window: Tuple[int, int]
) -> Float[Tensor, "*batch Hp Wp C"]:
    """Inverse of ``window_partition``."""
    *batch, _, _, channels = windows.shape
    wh, ww = window
    x = windows.reshape(*batch, height // wh, width // ww, wh, ww, channels)
    x = x.transpose(-4, -3)
    return x.reshape(*batch, height, width, channels)


@lru_cache(maxsize=64)
def attention_mask(
    height: int,
    width: int,
    padded: Tuple[int, int],
    window: Tuple[int, int],
    shift: Tuple[int, int],
    device: str,
) -> Optional[Bool[Tensor, "n T T"]]:
    """Which tokens of each window may attend to each other (``window_region_ids``), None where all may. It depends
    on the grid's shape only, so it is built on the host once per shape and device: testing it for "all" on the
    device would make the host wait for the GPU at every layer of every step."""
    ids = window_partition(window_region_ids(height, width, padded, window, shift, "cpu")[..., None], window)[
        ..., 0
    ]  # [n, T]
    mask = ids[:, :, None] == ids[:, None, :]
    return None if bool(mask.all()) else mask.to(device)


def window_region_ids(
    height: int, width: int, padded: Tuple[int, int], window: Tuple[int, int], shift: Tuple[int, int], device
) -> Int[Tensor, "Hp Wp"]:
    """Which tokens of a (rolled) window may attend to each other: equal ids only.

    A cyclic shift brings tokens from the opposite border into the last windows (Swin); they get other ids than
    their new neighbours, and the padding tokens added to reach a multiple of the window size get ids of their own,
    so no real token attends to either. Every token keeps at least itself, so no attention row is empty.
    """
    hp, wp = padded
    rows = torch.zeros(hp, dtype=torch.long, device=device)
    cols = torch.zeros(wp, dtype=torch.long, device=device)
    if shift[0]:
        rows[hp - window[0] : hp - shift[0]] = 1
        rows[hp - shift[0] :] = 2
    if shift[1]:
        cols[wp - window[1] : wp - shift[1]] = 1
        cols[wp - shift[1] :] = 2
    regions = rows[:, None] * 3 + cols[None, :]
    padding = torch.ones(hp, wp, dtype=torch.long, device=device)
    padding[:height, :width] = 0
    padding = torch.roll(padding, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    return regions + 9 * padding


class WindowAttention(nn.Module):
    """Multi-head attention of query tokens onto key tokens, through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the feature dimension ({dim})")
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self,
        queries: Float[Tensor, "*batch L C"],
        keys: Float[Tensor, "*batch S C"],
        mask: Optional[Bool[Tensor, "*mask L S"]] = None,
    ) -> Float[Tensor, "*batch L C"]:
        heads = self.num_heads
        q = self.query(queries).unflatten(-1, (heads, -1)).transpose(-3, -2)  # [..., heads, L, d]
        k, v = self.key_value(keys).unflatten(-1, (2, heads, -1)).unbind(-3)
        k, v = k.transpose(-3, -2), v.transpose(-3, -2)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[..., None, :, :]
        )
        return self.out(attended.transpose(-3, -2).flatten(-2))


class CrossViewTransformerLayer(nn.Module):
    """Pre-norm layer: window self-attention, window cross-attention to the other views, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = WindowAttention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attention = WindowAttention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, tokens: Float[Tensor, "B V n T C"], mask: Optional[Bool[Tensor, "n T T"]]
    ) -> Float[Tensor, "B V n T C"]:
        num_views = tokens.shape[1]
        h = self.norm_self(tokens)
        tokens = tokens + self.self_attention(h, h, mask)
        if num_views > 1:
            h = self.norm_cross(tokens)
            # Keys of view v: the same window in every other view, concatenated along the token axis.
            others = device_constant(
                tuple(tuple(u for u in range(num_views) if u != v) for v in range(num_views)),
                tokens.device,
                torch.long,
            )
            keys = h[:, others]  # [B, V, V-1, n, T, C]
            keys = keys.transpose(2, 3).flatten(3, 4)  # [B, V, n, (V-1)T, C]
            cross_mask = None if mask is None else mask.repeat(1, 1, num_views - 1)
            tokens = tokens + self.cross_attention(h, keys, cross_mask)
        return tokens + self.mlp(self.norm_mlp(tokens))


class CrossViewTransformer(nn.Module):
    """Layers of window attention within and across views; odd layers shift the windows by half a window."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, window_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.layers = nn.ModuleList(
            [CrossViewTransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers)]
        )

    def forward(self, features: Float[Tensor, "B V C h w"]) -> Float[Tensor, "B V C h w"]:
        if not self.layers:
            return features
        _, _, channels, height, width = features.shape
        # A window never exceeds the grid; the grid is padded up to a multiple of the window.
        window = (min(self.window_size, height), min(self.window_size, width))
        padded = (math.ceil(height / window[0]) * window[0], math.ceil(width / window[1]) * window[1])
        x = features.permute(0, 1, 3, 4, 2)  # channels last for the linear layers
        x = x + window_positional_encoding(height, width, window, channels, x.device).to(x.dtype)
        x = F.pad(x, (0, 0, 0, padded[1] - width, 0, padded[0] - height))
        for index, layer in enumerate(self.layers):
            # Shifting only helps where there is more than one window along an axis (as in Swin).
            shifted = index % 2 == 1
            shift = tuple(w // 2 if shifted and p > w else 0 for w, p in zip(window, padded, strict=True))
            mask = attention_mask(height, width, padded, window, shift, str(x.device))
            if any(shift):
                x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(2, 3))
            x = window_merge(layer(window_partition(x, window), mask), padded[0], padded[1], window)
            if any(shift):
                x = torch.roll(x, shifts=shift, dims=(2, 3))
        return x[:, :, :height, :width].permute(0, 1, 4, 2, 3)


class MultiViewBackbone(nn.Module):
    """Images -> per-view CNN features -> cross-view transformer features, both at 1/4 resolution."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.cnn = PerViewCNN(config.cnn_channels, config.feature_dim)
        self.transformer = CrossViewTransformer(
            config.feature_dim,
            config.num_transformer_layers,
            config.num_heads,
            config.window_size,
            config.mlp_ratio,
        )

    def forward(self, images: Float[Tensor, "B V 3 H W"]) -> BackboneOutput:
        """``images`` already normalised by the network (roughly zero mean, unit range)."""
        batch, views, _, height, width = images.shape
        if height % FEATURE_STRIDE or width % FEATURE_STRIDE:
            raise ValueError(
                f"Image size {height}x{width} must be a multiple of {FEATURE_STRIDE} on both sides "
                "(features are at exactly 1/4 resolution)."
            )
        cnn_features = self.cnn(images.flatten(0, 1)).unflatten(0, (batch, views))
        return BackboneOutput(features=self.transformer(cnn_features), cnn_features=cnn_features)
