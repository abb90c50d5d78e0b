"""Point Transformer V3, lite and without custom CUDA (after Pointcept's ``point_transformer_v3m1_base``).

What PTv3 needs from custom kernels, and what stands in for it here:

- serialisation (z-order / Hilbert codes): pure PyTorch bit arithmetic (``serialization.py``), as in Pointcept;
- attention over patches of ``patch_size`` consecutive voxels of a serialised order: the voxels are gathered
  into a padded ``[patches, patch_size]`` layout and ``F.scaled_dot_product_attention`` runs with a key mask
  (flash-attn is optional in Pointcept too; it pads the same way when it is off);
- conditional positional encoding (CPE), a submanifold sparse conv (k = 3) before every block: our PyTorch
  sparse conv. It is PTv3's only positional signal; dropping it cost 77.3 -> 66.4 mIoU on ScanNet (Pointcept
  issue 285), so it stays;
- pooling between stages: the voxels of each 2x2x2 cell of the coarser grid merge (max of a linear projection,
  Pointcept's ``SerializedPooling`` with stride 2), with the grid structure of the strided sparse conv;
  unpooling adds the coarse features (projected) to the skip connection's (projected), as Pointcept's
  ``SerializedUnpooling``.

Every block uses one of several orders; in training their assignment to blocks is shuffled per forward pass
(PTv3's "shuffle orders"), so patches cut the scene differently from block to block and from step to step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from splatsem_ns.encoders.layers import FeatureNorm, SceneDropPath, feature_norm
from splatsem_ns.encoders.registry import BACKBONES, BackboneConfig, SparseBackbone
from splatsem_ns.encoders.serialization import ORDERS, Serialization, serialize
from splatsem_ns.encoders.sparse_conv import ConvBackend, SubmanifoldConv3d, downsample_kernel_map
from splatsem_ns.encoders.sparse_tensor import SparseTensor


@dataclass
class PTv3LiteConfig(BackboneConfig):
    """Widths, depths and attention of the PTv3-lite encoder-decoder (tuples ordered fine to coarse)."""

    stem_kernel_size: int = 5
    """Kernel of the embedding's submanifold conv (PTv3: 5)."""
    encoder_channels: Tuple[int, ...] = (32, 64, 128, 256)
    """Width of each encoder stage; stage s > 0 starts by pooling to a grid 2x coarser (PTv3 base: five stages
    up to 512)."""
    encoder_depths: Tuple[int, ...] = (2, 2, 2, 2)
    """Transformer blocks per encoder stage (PTv3 base: 2, 2, 2, 6, 2)."""
    encoder_heads: Tuple[int, ...] = (2, 4, 8, 16)
    """Attention heads per encoder stage (16 channels per head, as PTv3)."""
    decoder_channels: Tuple[int, ...] = (64, 64, 128)
    """Width of decoder stage s, at encoder stage s's resolution; ``decoder_channels[0]`` is the output width.
    One entry fewer than the encoder."""
    decoder_depths: Tuple[int, ...] = (1, 1, 1)
    """Transformer blocks per decoder stage (PTv3 base: 2 each)."""
    decoder_heads: Tuple[int, ...] = (4, 4, 8)
    """Attention heads per decoder stage."""
    patch_size: int = 1024
    """Voxels per attention patch (PTv3: 1024). Shrinks to the largest scene's voxel count when that is smaller."""
    mlp_ratio: float = 4.0
    """Hidden width of each block's MLP relative to its width."""
    qkv_bias: bool = True
    """Bias in the query/key/value projection."""
    orders: Tuple[str, ...] = ORDERS
    """Serialisation orders the blocks cycle through."""
    shuffle_orders: bool = True
    """In training, shuffle which order each block uses, once per forward pass (PTv3)."""
    drop_path: float = 0.3
    """Largest stochastic-depth rate (per scene), reached linearly by the deepest encoder block (PTv3: 0.3)."""
    norm: FeatureNorm = "batch"
    """Normalisation of the embedding and of (un)pooling projections (PTv3: batch). Blocks use LayerNorm."""

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "default": {},
        "tiny": dict(
            encoder_channels=(8, 16, 16),
            encoder_depths=(1, 1, 1),
            encoder_heads=(1, 2, 2),
            decoder_channels=(8, 16),
            decoder_depths=(1, 1),
            decoder_heads=(1, 2),
            patch_size=16,
            drop_path=0.0,
        ),
    }


@dataclass(eq=False)
class PatchLayout:
    """Where each voxel sits in the padded ``[num_patches, patch_size]`` attention layout of one order.

    Each scene's serialised voxels fill whole patches; its last patch is padded, so no patch mixes scenes.
    """

    gather_index: Int[Tensor, " T"]
    """Voxel row of every slot (``num_voxels`` for padding slots, which read a zero row)."""
    slot_of_voxel: Int[Tensor, " M"]
    """Slot of each voxel."""
    key_valid: Bool[Tensor, "P S"]
    """Which slots of each patch hold a voxel (the attention key mask)."""
    patch_size: int
    """Slots per patch (at most the configured patch size)."""
    has_padding: bool
    """Whether any slot is padding (otherwise no mask is passed, which allows the fastest kernels)."""

    @property
    def num_patches(self) -> int:
        return self.key_valid.shape[0]


def patch_layout(
    serialization: Serialization, batch_index: Int[Tensor, " M"], batch_size: int, patch_size: int
) -> PatchLayout:
    """Split each scene's serialised voxels into patches of ``min(patch_size, largest scene)`` slots."""
    order = serialization.order
    num_voxels = order.numel()
    device = order.device
    sorted_batch = batch_index[order]  # scene-major, since codes start with the scene index
    counts = torch.bincount(sorted_batch, minlength=batch_size)
    size = max(1, min(patch_size, int(counts.max().item()) if num_voxels else 1))
    padded = (counts + size - 1) // size * size
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded
    slot = padded_start[sorted_batch] + torch.arange(num_voxels, device=device) - start[sorted_batch]
    total = int(padded.sum().item())
    gather_index = torch.full((total,), num_voxels, dtype=torch.long, device=device)
    gather_index[slot] = order
    slot_of_voxel = torch.empty_like(order)
    slot_of_voxel[order] = slot
    return PatchLayout(
        gather_index=gather_index,
        slot_of_voxel=slot_of_voxel,
        key_valid=(gather_index < num_voxels).view(-1, size),
        patch_size=size,
        has_padding=total != num_voxels,
    )


def patch_attention(qkv: Float[Tensor, "M C3"], layout: PatchLayout, num_heads: int) -> Float[Tensor, "M C"]:
    """Multi-head attention within patches: voxel rows of ``[q | k | v]`` in, attended values out (same rows).

    Padding slots are masked as keys, so a voxel's output does not depend on how much padding its patch has.
    """
    num_voxels, three_c = qkv.shape
    channels = three_c // 3
    if channels % num_heads:
        raise ValueError(f"{channels} channels do not split into {num_heads} heads")
    padded = torch.cat([qkv, qkv.new_zeros(1, three_c)]).index_select(0, layout.gather_index)
    padded = padded.view(layout.num_patches, layout.patch_size, 3, num_heads, channels // num_heads)
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # each [patches, heads, patch_size, head_dim]
    mask = layout.key_valid[:, None, None, :] if layout.has_padding else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(-1, channels)
    return out.index_select(0, layout.slot_of_voxel)


def serialized_layouts(x: SparseTensor, orders: Sequence[str], patch_size: int) -> Dict[str, PatchLayout]:
    """Patch layouts of ``x``'s voxels for each order (cached with the coordinates: a stage's blocks share them)."""
    key = ("patch_layouts", tuple(orders), patch_size)
    cached = x.cache.entries.get(key)
    if cached is None:
        serializations = serialize(x.coords, tuple(orders))
        cached = {
            name: patch_layout(s, x.batch_index, x.batch_size, patch_size)
            for name, s in zip(orders, serializations, strict=True)
        }
        x.cache.entries[key] = cached
    return cached


class PTv3Block(nn.Module):
    """CPE (sparse conv k=3 -> linear -> LayerNorm, added) -> pre-norm patch attention -> pre-norm MLP."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        backend: ConvBackend,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.cpe_conv = SubmanifoldConv3d(channels, channels, 3, bias=True, backend=backend)
        self.cpe_linear = nn.Linear(channels, channels)
        self.cpe_norm = nn.LayerNorm(channels)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.drop_path = SceneDropPath(drop_path)

    def forward(self, x: SparseTensor, layout: PatchLayout) -> SparseTensor:
        features = x.features + self.cpe_norm(self.cpe_linear(self.cpe_conv(x).features))
        batch = x.batch_index
        attended = self.proj(patch_attention(self.qkv(self.norm1(features)), layout, self.num_heads))
        features = features + self.drop_path(attended, batch, x.batch_size)
        features = features + self.drop_path(self.mlp(self.norm2(features)), batch, x.batch_size)
        return x.replace_features(features)


def grid_parents(x: SparseTensor, stride: int) -> Tuple[SparseTensor, Int[Tensor, " M"]]:
    """The coarser grid's sites (an empty-featured tensor sharing the strided conv's cached grid) and the coarse
    row each of ``x``'s voxels falls into."""
    coarse_coords, coarse_cache, kernel_map = downsample_kernel_map(x, stride, stride)
    key = ("parents", stride)
    parent = x.cache.entries.get(key)
    if parent is None:  # kernel == stride: every fine voxel appears in exactly one pair
        parent = torch.empty(x.num_sites, dtype=torch.long, device=x.coords.device)
        parent[kernel_map.in_rows] = kernel_map.out_rows
        x.cache.entries[key] = parent
    empty = x.features.new_zeros(coarse_coords.shape[0], 0)
    return SparseTensor(coarse_coords, empty, x.batch_size, coarse_cache), parent


class GridPooling(nn.Module):
    """Linear projection, max over the voxels of each coarse cell, normalisation, GELU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: FeatureNorm) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = feature_norm(norm, out_channels)

    def forward(self, x: SparseTensor) -> Tuple[SparseTensor, Int[Tensor, " M"]]:
        coarse, parent = grid_parents(x, self.stride)
        projected = self.proj(x.features)
        index = parent[:, None].expand(-1, projected.shape[1])
        pooled = projected.new_zeros(coarse.num_sites, projected.shape[1])
        pooled = pooled.scatter_reduce(0, index, projected, reduce="amax", include_self=False)
        return coarse.replace_features(F.gelu(self.norm(pooled))), parent


class GridUnpooling(nn.Module):
    """Coarse features (projected) handed to their fine voxels, added to the skip connection's (projected)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: FeatureNorm) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(in_channels, out_channels), feature_norm(norm, out_channels), nn.GELU()
        )
        self.proj_skip = nn.Sequential(
            nn.Linear(skip_channels, out_channels), feature_norm(norm, out_channels), nn.GELU()
        )

    def forward(self, x: SparseTensor, skip: SparseTensor, parent: Int[Tensor, " M"]) -> SparseTensor:
        return skip.replace_features(
            self.proj(x.features).index_select(0, parent) + self.proj_skip(skip.features)
        )


def _drop_path_rates(depths: Sequence[int], rate: float) -> List[List[float]]:
    total = sum(depths)
    rates = torch.linspace(0, rate, total).tolist() if total else []
    out, start = [], 0
    for depth in depths:
        out.append(rates[start : start + depth])
        start += depth
    return out


@BACKBONES.register("PTv3-lite-v1")
class PTv3Lite(SparseBackbone):
    """Serialised-attention U-Net: voxel features in, ``decoder_channels[0]`` features per voxel out."""

    config_class = PTv3LiteConfig

    def __init__(self, in_channels: int, config: PTv3LiteConfig) -> None:
        super().__init__()
        stages = len(config.encoder_channels)
        if stages < 2:
            raise ValueError("PTv3-lite needs at least two stages.")
        for name, length in (
            ("encoder_depths", stages),
            ("encoder_heads", stages),
            ("decoder_channels", stages - 1),
            ("decoder_depths", stages - 1),
            ("decoder_heads", stages - 1),
        ):
            if len(getattr(config, name)) != length:
                raise ValueError(f"{name} needs {length} entries, got {getattr(config, name)}")
        if not config.orders:
            raise ValueError("PTv3-lite needs at least one serialisation order.")
        self.config = config
        self.in_channels = in_channels
        self.out_channels = config.decoder_channels[0]
        backend, norm = config.conv_backend, config.norm
        enc_ch = config.encoder_channels
        self.embedding = SubmanifoldConv3d(
            in_channels, enc_ch[0], config.stem_kernel_size, bias=False, backend=backend
        )
        self.embedding_norm = feature_norm(norm, enc_ch[0])
        enc_rates = _drop_path_rates(config.encoder_depths, config.drop_path)
        self.pooling = nn.ModuleList(GridPooling(enc_ch[s - 1], enc_ch[s], 2, norm) for s in range(1, stages))
        self.encoder = nn.ModuleList(
            nn.ModuleList(
                PTv3Block(
                    enc_ch[s], config.encoder_heads[s], config.mlp_ratio, config.qkv_bias, rate, backend
                )
                for rate in enc_rates[s]
            )
            for s in range(stages)
        )
        dec_ch = config.decoder_channels
        dec_rates = _drop_path_rates(config.decoder_depths, config.drop_path)
        self.unpooling = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(stages - 1):
            deeper = enc_ch[-1] if s == stages - 2 else dec_ch[s + 1]
            self.unpooling.append(GridUnpooling(deeper, enc_ch[s], dec_ch[s], norm))
            self.decoder.append(
                nn.ModuleList(
                    PTv3Block(
                        dec_ch[s], config.decoder_heads[s], config.mlp_ratio, config.qkv_bias, rate, backend
                    )
                    for rate in dec_rates[s]
                )
            )

    def _block_orders(self) -> List[str]:
        orders = list(self.config.orders)
        if self.training and self.config.shuffle_orders and len(orders) > 1:
            orders = [orders[i] for i in torch.randperm(len(orders)).tolist()]
        return orders

    def _run_blocks(self, x: SparseTensor, blocks: nn.ModuleList, orders: List[str]) -> SparseTensor:
        if not len(blocks):
            return x
        layouts = serialized_layouts(x, orders, self.config.patch_size)
        for i, block in enumerate(blocks):
            x = block(x, layouts[orders[i % len(orders)]])
        return x

    @property
    def coarsest_stride(self) -> int:
        return 2 ** len(self.pooling)  # one stride-2 grid pooling per stage after the first

    def forward(self, x: SparseTensor) -> SparseTensor:
        orders = self._block_orders()
        x = self.embedding(x)
        x = x.replace_features(F.gelu(self.embedding_norm(x.features)))
        x = self._run_blocks(x, self.encoder[0], orders)
        skips, parents = [x], []
        for s, pooling in enumerate(self.pooling, start=1):
            x, parent = pooling(x)
            x = self._run_blocks(x, self.encoder[s], orders)
            skips.append(x)
            parents.append(parent)
        deepest = skips.pop()  # the coarsest stage: the decoder starts from it, not from a skip
        self.coarsest = deepest if self.keep_coarsest else None
        for s in reversed(range(len(self.decoder))):
            x = self.unpooling[s](x, skips.pop(), parents.pop())
            x = self._run_blocks(x, self.decoder[s], orders)
        return x
