"""Forward-only rasterization of many-channel features in Triton, with the feature sum on tensor cores.

gsplat's ``rasterize_to_pixels`` gives every pixel its own thread, which walks the tile's Gaussians one by one and
adds ``weight * feature`` channel by channel: at 32 channels, 32 scalar multiply-adds per Gaussian-pixel pair, which
is most of the time of a 32-channel semantic render (a 3-channel RGB render of the same scene takes about a third).
Here one program composites a whole tile (16 x 16 = 256 pixels) and takes its depth-sorted Gaussians ``BLOCK_G``
at a time: the alphas of the block ``[pixels, BLOCK_G]`` are computed element-wise, the transmittance in front of
each Gaussian with a cumulative product along the block, and the feature sum becomes one matrix product
``[pixels, BLOCK_G] @ [BLOCK_G, D]`` (``tl.dot``, tensor cores). The program stops as soon as no pixel of its tile
can take more (every one finished, or outside the image).

The numbers are gsplat 1.4.0's (``rasterize_to_pixels_fwd.cu``): pixel centres at +0.5, ``sigma = 0.5 (a dx^2 +
c dy^2) + b dx dy``, ``alpha = min(0.999, opacity exp(-sigma))``, a Gaussian skipped when ``sigma < 0`` or
``alpha < 1/255``, a pixel finished before the Gaussian that would take its transmittance to 1e-4 or below, and the
rendered alpha ``1 - T``. Only the rounding differs: the products of ``1 - alpha`` are grouped per block, and the
feature sum runs in the precision chosen for ``tl.dot`` (see ``DotPrecision``).

``rasterize_relevancy_triton`` keeps each tile's ``[pixels, D]`` latent in registers and ends with the folded
query's relevancy math (``models/fused_query.py``'s ``_relevancy_block``, the same function its kernel calls), so
only the relevancy ``[H, W, P]`` is written. ``render_relevancy`` is the whole path from 3D Gaussians: projection
and tile binning by gsplat's CUDA kernels (or, off the GPU, by the pure-PyTorch rasterizer's, which follow them
rule for rule), then the fused kernel.

The kernels run on CUDA; ``TRITON_INTERPRET=1`` runs them on the CPU (slowly), which is how the tests check them
against the PyTorch rasterizer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.models.fused_query import FoldOperands
from splatsem_ns.rendering.torch_rasterizer import (
    ALPHA_MAX,
    ALPHA_MIN,
    TRANSMITTANCE_MIN,
    RasterizeMode,
    bin_gaussians_to_tiles,
    project_gaussians,
)

try:  # Triton ships with CUDA builds of torch; without it this path is simply unavailable.
    import triton
    import triton.language as tl

    from splatsem_ns.models.fused_query import _relevancy_block
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

DotPrecision = Literal["fp16", "tf32", "ieee"]
"""Inputs of the feature sum's ``tl.dot`` (the accumulation is float32 in every case):

- "fp16": weights and features rounded to float16 (11-bit significand, relative error <= 2^-11 each), at the
  tensor cores' full rate. Weights lie in [0, 1], so only features beyond float16's range (65504) would break it.
- "tf32": float32 inputs rounded by the tensor cores to TF32: the same 11-bit significand as float16, the range of
  float32, at half the rate. For features of unknown range.
- "ieee": plain float32 products (no tensor cores on the GPU); what the tests compare to the PyTorch rasterizer.
"""

BLOCK_GAUSSIANS = 32
"""Gaussians per compositing step (the K of the ``[pixels, K] @ [K, D]`` product; at least 16 for ``tl.dot``)."""
NUM_WARPS = 8
"""Warps per tile program: 256 pixels x 32 channels of float32 accumulator take 32 registers per thread."""


def triton_raster_available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: Triton present and CUDA, or Triton's CPU interpreter."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_tile_size_ok(tile_size: int) -> bool:
    """Whether the kernels take tiles of this edge: a power of two >= 4 (at least ``tl.dot``'s 16 rows of pixels)."""
    return tile_size >= 4 and not tile_size & (tile_size - 1)


def _check_tile_size(tile_size: int) -> int:
    pixels = tile_size * tile_size
    if not triton_tile_size_ok(tile_size):
        raise ValueError(f"the Triton rasterizer needs a power-of-two tile size >= 4 (tl.dot's 16 rows), "
                         f"got {tile_size}")  # fmt: skip
    return pixels


def _padded_width(channels: int) -> int:
    """Feature width of the kernels: a power of two (Triton block shapes), at least 16 (``tl.dot``'s K/N)."""
    return max(16, triton.next_power_of_2(channels))


def _kernel_features(features: Tensor, n_cameras: int, n_gauss: int, width: int) -> Tuple[Tensor, int]:
    """Features as the kernels read them, ``[rows, width]`` contiguous, and the row offset of a camera: shared
    ``[N, D]`` features are not copied per camera (row = flat id - camera * N)."""
    if features.dim() == 2:
        flat, camera_offset = features, n_gauss
    elif features.dim() == 3 and features.shape[:2] == (n_cameras, n_gauss):
        flat, camera_offset = features.reshape(n_cameras * n_gauss, -1), 0
    else:
        raise ValueError(f"features must be [N, D] or [C, N, D] with C={n_cameras}, N={n_gauss}, "
                         f"got {tuple(features.shape)}")  # fmt: skip
    if flat.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        flat = flat.float()
    if flat.shape[1] != width:  # zero channels: the product ignores them
        flat = torch.nn.functional.pad(flat, (0, width - flat.shape[1]))
    return flat.contiguous(), camera_offset


def _geometry(
    means2d: Tensor, conics: Tensor, opacities: Tensor, isect_offsets: Tensor, flatten_ids: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    C, N = opacities.shape
    if means2d.shape != (C, N, 2) or conics.shape != (C, N, 3):
        raise ValueError(f"means2d [C, N, 2] and conics [C, N, 3] must match opacities [C, N] = {(C, N)}, "
                         f"got {tuple(means2d.shape)} and {tuple(conics.shape)}")  # fmt: skip
    if isect_offsets.shape[0] != C:
        raise ValueError(f"isect_offsets has {isect_offsets.shape[0]} cameras, opacities {C}")
    return (
        means2d.float().reshape(C * N, 2).contiguous(),
        conics.float().reshape(C * N, 3).contiguous(),
        opacities.float().reshape(C * N).contiguous(),
        isect_offsets.to(torch.int32).reshape(-1).contiguous(),
        flatten_ids.to(torch.int32).contiguous(),
    )


@dataclass
class _TileLaunch:
    """What both tile kernels take, prepared once: the flat geometry, the padded features, the tile grid."""

    inputs: Tuple[Tensor, ...]
    """Means, conics, opacities, features, tile offsets and ids: the kernels' first arguments."""
    sizes: Tuple[int, ...]
    """Intersections, tiles, tiles per row and per camera, width, height, feature row offset per camera: the
    arguments after the outputs."""
    n_tiles: int
    constants: Dict[str, Any]
    """The compile-time constants both kernels share."""

    @property
    def empty(self) -> bool:
        return self.n_tiles == 0 or self.sizes[4] == 0 or self.sizes[5] == 0


def _tile_launch(
    means2d: Tensor,
    conics: Tensor,
    opacities: Tensor,
    features: Tensor,
    isect_offsets: Tensor,
    flatten_ids: Tensor,
    width: int,
    height: int,
    tile_size: int,
    precision: DotPrecision,
    block_gaussians: int,
) -> _TileLaunch:
    pixels = _check_tile_size(tile_size)
    geometry = _geometry(means2d, conics, opacities, isect_offsets, flatten_ids)
    C, N = opacities.shape
    padded = _padded_width(features.shape[-1])
    feats, camera_offset = _kernel_features(features, C, N, padded)
    tiles_y, tiles_x = isect_offsets.shape[1:]
    n_tiles = C * tiles_y * tiles_x
    means, conic, opacity, offsets, ids = geometry
    return _TileLaunch(
        inputs=(means, conic, opacity, feats, offsets, ids),
        sizes=(ids.shape[0], n_tiles, tiles_x, tiles_y * tiles_x, width, height, camera_offset),
        n_tiles=n_tiles,
        constants={
            "TILE": tile_size,
            "PIXELS": pixels,
            "CHANNELS": padded,
            "BLOCK_G": block_gaussians,
            "DOT_FP16": precision == "fp16",
            "INPUT_PRECISION": "ieee" if precision == "ieee" else "tf32",
        },
    )


@torch.no_grad()
def rasterize_features_triton(
    means2d: Float[Tensor, "C N 2"],
    conics: Float[Tensor, "C N 3"],
    opacities: Float[Tensor, "C N"],
    features: Float[Tensor, "C N D"],
    isect_offsets: Int[Tensor, "C TH TW"],
    flatten_ids: Int[Tensor, " M"],
    width: int,
    height: int,
    tile_size: int = 16,
    *,
    normalize_min_alpha: Optional[float] = None,
    precision: DotPrecision = "fp16",
    block_gaussians: int = BLOCK_GAUSSIANS,
    num_warps: int = NUM_WARPS,
) -> Tuple[Float[Tensor, "C H W D"], Float[Tensor, "C H W 1"]]:
    """gsplat's ``rasterize_to_pixels`` (``packed=False``, no backgrounds or masks), forward only, with the feature
    sum on tensor cores (see the module docstring). No gradients flow through it.

    Args:
        means2d: Projected centres in pixels. [C, N, 2]
        conics: Upper triangle (a, b, c) of the inverse projected covariances. [C, N, 3]
        opacities: Per-camera opacities (after any antialiasing compensation). [C, N]
        features: Per-camera features [C, N, D], or features shared by every camera [N, D]; any width D (it is
            zero-padded to a power of two >= 16 inside).
        isect_offsets: Start of every tile's run in ``flatten_ids`` (``isect_offset_encode``). [C, TH, TW]
        flatten_ids: Flat Gaussian index ``camera * N + gaussian`` of every tile intersection, sorted by tile and
            front to back within a tile (``isect_tiles``). [M]
        width: Image width W.
        height: Image height H.
        tile_size: Tile edge, a power of two >= 4 (the tiles of ``isect_offsets``).
        normalize_min_alpha: None returns the features as composited (a weighted sum); a number divides them by the
            accumulated alpha clamped below at that number, inside the kernel (``semantic_alpha_normalize``): one
            pass less over the ``[C, H, W, D]`` output than dividing afterwards.
        precision: Inputs of the feature product (``DotPrecision``).
        block_gaussians: Gaussians per compositing step (power of two >= 16).
        num_warps: Warps per tile program.

    Returns:
        The rendered features [C, H, W, D] (float32) and the accumulated alpha ``1 - T`` [C, H, W, 1].
    """
    launch = _tile_launch(
        means2d, conics, opacities, features, isect_offsets, flatten_ids, width, height, tile_size, precision,
        block_gaussians,
    )  # fmt: skip
    C, channels = opacities.shape[0], features.shape[-1]
    render = torch.empty(C, height, width, channels, dtype=torch.float32, device=means2d.device)
    alpha = torch.empty(C, height, width, 1, dtype=torch.float32, device=means2d.device)
    if launch.empty:
        return render, alpha
    _render_kernel[(launch.n_tiles,)](
        *launch.inputs,
        render,
        alpha,
        *launch.sizes,
        0.0 if normalize_min_alpha is None else float(normalize_min_alpha),
        OUT_CHANNELS=channels,
        NORMALIZE=normalize_min_alpha is not None,
        num_warps=num_warps,
        **launch.constants,
    )
    return render, alpha


@torch.no_grad()
def rasterize_relevancy_triton(
    means2d: Float[Tensor, "C N 2"],
    conics: Float[Tensor, "C N 3"],
    opacities: Float[Tensor, "C N"],
    features: Float[Tensor, "C N D"],
    isect_offsets: Int[Tensor, "C TH TW"],
    flatten_ids: Int[Tensor, " M"],
    width: int,
    height: int,
    query: FoldOperands,
    tile_size: int = 16,
    *,
    normalize_min_alpha: Optional[float] = None,
    precision: DotPrecision = "fp16",
    block_gaussians: int = BLOCK_GAUSSIANS,
    num_warps: int = NUM_WARPS,
) -> Float[Tensor, "C H W P"]:
    """``rasterize_features_triton`` followed, inside the kernel, by the folded query: each tile's latent stays in
    registers and only the relevancy is written.

    Args:
        query: The folded query's kernel operands (``fused_query.fold_operands``), padded to the kernel's latent
            width (``channels=`` the padded width of ``features``; ``fold_operands_for`` does it).
        normalize_min_alpha: None renders the latent as it is (a weighted sum); a number divides it by the
            accumulated alpha clamped below at that number first, as ``semantic_alpha_normalize`` does.
        The other arguments are ``rasterize_features_triton``'s.

    Returns:
        LERF relevancy of each positive query, float32. [C, H, W, P]
    """
    launch = _tile_launch(
        means2d, conics, opacities, features, isect_offsets, flatten_ids, width, height, tile_size, precision,
        block_gaussians,
    )  # fmt: skip
    padded = launch.constants["CHANNELS"]
    if query.channels != padded:
        raise ValueError(f"the query's head takes {query.channels} channels, the padded latent has {padded}; "
                         f"build it with fold_operands(..., channels={padded})")  # fmt: skip
    positives = query.num_positives
    out = torch.empty(
        opacities.shape[0], height, width, positives, dtype=torch.float32, device=means2d.device
    )
    if launch.empty:
        return out
    _relevancy_raster_kernel[(launch.n_tiles,)](
        *launch.inputs,
        out,
        *launch.sizes,
        query.front_weight,
        query.front_bias,
        query.query_part,
        query.gram,
        query.gram_bias,
        query.query_bias,
        query.bias_norm,
        query.norm_factor,
        query.norm_offset,
        query.norm_residual,
        query.temperature,
        0.0 if normalize_min_alpha is None else float(normalize_min_alpha),
        NORMALIZE=normalize_min_alpha is not None,
        FACTORED=query.factored,
        HIDDEN=query.hidden,
        QUERIES=query.queries,
        PADDED_QUERIES=query.padded_queries,
        POSITIVES=positives,
        BLOCK_HIDDEN=_EPILOGUE_BLOCK_HIDDEN,
        num_warps=num_warps,
        **launch.constants,
    )
    return out


_EPILOGUE_BLOCK_HIDDEN = 64
"""Hidden units per block of the relevancy epilogue (the head's hidden width must be a multiple of it)."""


def fold_operands_for(folded, latent_channels: int, factored: Optional[bool] = None) -> FoldOperands:
    """The kernel operands of a ``FoldedQuery`` with one hidden layer, its first layer zero-padded to the kernel's
    width for ``latent_channels``-channel latents (kept on ``folded``: ``FoldedQuery.operands``); ``factored``: the
    norm's form (``fused_query``'s module docstring; None: ``FoldedQuery.factored_by_default``). The epilogue works
    on a whole tile (256 pixels of a 16-pixel tile), whose full ``[pixels, hidden]`` activations, which the factored
    form holds, do not fit in registers (it spills: ``tests/test_triton_compiles.py``); it still measured slightly
    faster than the Gram epilogue on H100s (3.49-3.96 ms against 3.57-4.10 ms, each pair in one run; three runs)."""
    return folded.operands(_padded_width(latent_channels), factored)


# ---------------------------------------------------------------------------------------------------------
# From 3D Gaussians
# ---------------------------------------------------------------------------------------------------------

ProjectionBackend = Literal["auto", "gsplat", "torch"]


@dataclass
class ProjectedTiles:
    """Projected Gaussians of C cameras and their tile intersections: ``rasterize_to_pixels``' inputs."""

    means2d: Float[Tensor, "C N 2"]
    conics: Float[Tensor, "C N 3"]
    opacities: Float[Tensor, "C N"]
    """After the antialiasing compensation, if any."""
    isect_offsets: Int[Tensor, "C TH TW"]
    flatten_ids: Int[Tensor, " M"]

    @classmethod
    def from_info(cls, info: Dict[str, Any]) -> "ProjectedTiles":
        """The projection and binning a ``rasterize_gaussians`` call made (its returned ``info``; gsplat's meta or
        the PyTorch rasterizer's, ``packed=False``), for another render of the same Gaussians, camera, size, tile
        size and rasterize mode, which then skips them."""
        return cls(
            info["means2d"].detach(), info["conics"].detach(), info["opacities"].detach(),
            info["isect_offsets"], info["flatten_ids"],
        )  # fmt: skip


@torch.no_grad()
def project_and_bin(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    opacities: Float[Tensor, " N"],
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    *,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    rasterize_mode: RasterizeMode = "classic",
    tile_size: int = 16,
    backend: ProjectionBackend = "auto",
) -> ProjectedTiles:
    """Projection and tile binning as ``gsplat.rasterization`` does them with ``packed=False`` (the calls and
    arguments of ``rendering/rasterize.py``): gsplat's CUDA kernels ("gsplat"; CUDA tensors), or the pure-PyTorch
    rasterizer's versions of them ("torch"; any device). "auto": gsplat on CUDA, torch elsewhere."""
    C = viewmats.shape[0]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    antialiased = rasterize_mode == "antialiased"
    if backend == "gsplat" or (backend == "auto" and means.is_cuda):
        # Imported here: loading gsplat's extension compiles or loads CUDA code, which CPU-only runs never need.
        from gsplat.cuda._wrapper import fully_fused_projection, isect_offset_encode, isect_tiles

        radii, means2d, depths, conics, compensations = fully_fused_projection(
            means, None, quats, scales, viewmats, Ks, width, height,
            eps2d=eps2d, near_plane=near_plane, far_plane=far_plane, packed=False,
            calc_compensations=antialiased,
        )  # fmt: skip
        _, isect_ids, flatten_ids = isect_tiles(
            means2d, radii, depths, tile_size, tiles_x, tiles_y, packed=False, n_cameras=C
        )
        isect_offsets = isect_offset_encode(isect_ids, C, tiles_x, tiles_y)
    else:
        radii, means2d, depths, conics, compensations = project_gaussians(
            means, quats, scales, viewmats, Ks, width, height,
            eps2d=eps2d, near_plane=near_plane, far_plane=far_plane, calc_compensations=antialiased,
        )  # fmt: skip
        bins = bin_gaussians_to_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)
        isect_offsets, flatten_ids = bins.isect_offsets, bins.flatten_ids.to(torch.int32)
    opacities_cn = opacities.repeat(C, 1)
    if compensations is not None:
        opacities_cn = opacities_cn * compensations
    return ProjectedTiles(means2d, conics, opacities_cn, isect_offsets, flatten_ids)


@torch.no_grad()
def render_relevancy(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    opacities: Float[Tensor, " N"],
    latent: Float[Tensor, "N D"],
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    query: FoldOperands,
    *,
    normalize_min_alpha: Optional[float] = None,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    rasterize_mode: RasterizeMode = "classic",
    tile_size: int = 16,
    backend: ProjectionBackend = "auto",
    precision: DotPrecision = "fp16",
    block_gaussians: int = BLOCK_GAUSSIANS,
    num_warps: int = NUM_WARPS,
) -> Float[Tensor, "C H W P"]:
    """Relevancy of every pixel of C cameras straight from the Gaussians: ``project_and_bin`` then
    ``rasterize_relevancy_triton`` (``block_gaussians`` and ``num_warps`` tune its kernel). The same map as rendering
    the latent with ``rasterize_gaussians`` (same settings), dividing it by ``alpha.clamp(min=normalize_min_alpha)``
    if set, and folding the query into it, up to rounding."""
    tiles = project_and_bin(
        means, quats, scales, opacities, viewmats, Ks, width, height,
        eps2d=eps2d, near_plane=near_plane, far_plane=far_plane, rasterize_mode=rasterize_mode,
        tile_size=tile_size, backend=backend,
    )  # fmt: skip
    return rasterize_relevancy_triton(
        tiles.means2d, tiles.conics, tiles.opacities, latent, tiles.isect_offsets, tiles.flatten_ids,
        width, height, query, tile_size, normalize_min_alpha=normalize_min_alpha, precision=precision,
        block_gaussians=block_gaussians, num_warps=num_warps,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

if triton is not None:
    # Kernels may only read globals that are constexprs; the values are the PyTorch rasterizer's (gsplat's).
    _ALPHA_MAX = tl.constexpr(ALPHA_MAX)
    _ALPHA_MIN = tl.constexpr(ALPHA_MIN)
    _TRANSMITTANCE_MIN = tl.constexpr(TRANSMITTANCE_MIN)

    @triton.jit
    def _composite_tile(
        means_ptr,  # [G, 2] float32
        conics_ptr,  # [G, 3] float32
        opacities_ptr,  # [G] float32
        features_ptr,  # [rows, CHANNELS]
        offsets_ptr,  # [T] int32, T = C * tiles_y * tiles_x
        ids_ptr,  # [M] int32
        n_isects,
        n_tiles,
        tiles_x,
        tiles_per_camera,
        width,
        height,
        camera_offset,  # feature row = flat id - camera * camera_offset
        TILE: tl.constexpr,
        PIXELS: tl.constexpr,
        CHANNELS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        DOT_FP16: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Composites this program's tile; returns the features [PIXELS, CHANNELS] (float32), the final
        transmittance [PIXELS], and the camera, row, column and in-image flag of every pixel."""
        tile = tl.program_id(0)
        camera = tile // tiles_per_camera
        local = tile - camera * tiles_per_camera
        tile_y = local // tiles_x
        tile_x = local - tile_y * tiles_x
        pixel = tl.arange(0, PIXELS)
        row = tile_y * TILE + pixel // TILE
        col = tile_x * TILE + pixel % TILE
        inside = (row < height) & (col < width)
        px = col.to(tl.float32) + 0.5
        py = row.to(tl.float32) + 0.5

        start = tl.load(offsets_ptr + tile)
        # The last tile's run ends with the list (gsplat's rule); every other one where the next tile's starts.
        end = tl.load(offsets_ptr + tile + 1, mask=tile + 1 < n_tiles, other=n_isects)
        channel = tl.arange(0, CHANNELS)
        slot = tl.arange(0, BLOCK_G)
        row_shift = camera.to(tl.int64) * camera_offset

        acc = tl.zeros((PIXELS, CHANNELS), dtype=tl.float32)
        trans = tl.full((PIXELS,), 1.0, dtype=tl.float32)
        live = inside  # still taking Gaussians
        n_live = tl.sum(live.to(tl.int32), axis=0)
        # A real early exit: a while loop that ends once no pixel of the tile is live (gsplat's
        # __syncthreads_count test, per block of Gaussians instead of per batch of 256).
        while (start < end) & (n_live > 0):
            isect = start + slot
            valid = isect < end
            gid = tl.load(ids_ptr + isect, mask=valid, other=0).to(tl.int64)
            mx = tl.load(means_ptr + 2 * gid, mask=valid, other=0.0)
            my = tl.load(means_ptr + 2 * gid + 1, mask=valid, other=0.0)
            ca = tl.load(conics_ptr + 3 * gid, mask=valid, other=0.0)
            cb = tl.load(conics_ptr + 3 * gid + 1, mask=valid, other=0.0)
            cc = tl.load(conics_ptr + 3 * gid + 2, mask=valid, other=0.0)
            # Padding slots get opacity 0: below 1/255, so skipped like any faint Gaussian.
            opacity = tl.load(opacities_ptr + gid, mask=valid, other=0.0)
            feature = tl.load(
                features_ptr + (gid - row_shift)[:, None] * CHANNELS + channel[None, :],
                mask=valid[:, None],
                other=0.0,
            )

            dx = mx[None, :] - px[:, None]  # [PIXELS, BLOCK_G]
            dy = my[None, :] - py[:, None]
            sigma = 0.5 * (ca[None, :] * dx * dx + cc[None, :] * dy * dy) + cb[None, :] * dx * dy
            alpha = tl.minimum(_ALPHA_MAX, opacity[None, :] * tl.exp(-sigma))
            alpha = tl.where((sigma >= 0.0) & (alpha >= _ALPHA_MIN), alpha, 0.0)
            one_minus = 1.0 - alpha  # >= 0.001: alpha is clamped at 0.999
            # Transmittance behind each Gaussian of the block. It only decreases along the block, so the
            # Gaussians a pixel still takes (those that leave it above 1e-4) form a prefix.
            trans_after = trans[:, None] * tl.cumprod(one_minus, axis=1)
            take = (trans_after > _TRANSMITTANCE_MIN) & live[:, None]
            # alpha * T in front of the Gaussian; the division by (1 - alpha) undoes the Gaussian's own factor.
            weight = tl.where(take, alpha * trans_after / one_minus, 0.0)
            if DOT_FP16:
                acc += tl.dot(weight.to(tl.float16), feature.to(tl.float16))
            else:
                acc += tl.dot(weight, feature.to(tl.float32), input_precision=INPUT_PRECISION)
            trans = tl.min(tl.where(take, trans_after, trans[:, None]), axis=1)
            # A pixel is finished at the first Gaussian it refuses; the last product is the block's smallest.
            live = live & (tl.min(trans_after, axis=1) > _TRANSMITTANCE_MIN)
            n_live = tl.sum(live.to(tl.int32), axis=0)
            start += BLOCK_G
        return acc, trans, camera, row, col, inside

    @triton.jit
    def _render_kernel(
        means_ptr,
        conics_ptr,
        opacities_ptr,
        features_ptr,
        offsets_ptr,
        ids_ptr,
        render_ptr,  # [C, H, W, OUT_CHANNELS] float32
        alpha_ptr,  # [C, H, W] float32
        n_isects,
        n_tiles,
        tiles_x,
        tiles_per_camera,
        width,
        height,
        camera_offset,
        min_alpha,
        TILE: tl.constexpr,
        PIXELS: tl.constexpr,
        CHANNELS: tl.constexpr,
        OUT_CHANNELS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        DOT_FP16: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        acc, trans, camera, row, col, inside = _composite_tile(
            means_ptr, conics_ptr, opacities_ptr, features_ptr, offsets_ptr, ids_ptr,
            n_isects, n_tiles, tiles_x, tiles_per_camera, width, height, camera_offset,
            TILE, PIXELS, CHANNELS, BLOCK_G, DOT_FP16, INPUT_PRECISION,
        )  # fmt: skip
        if NORMALIZE:  # as the relevancy kernel below does
            acc = acc / tl.maximum(1.0 - trans, min_alpha)[:, None]
        pixel = (camera.to(tl.int64) * height + row) * width + col
        channel = tl.arange(0, CHANNELS)
        tl.store(
            render_ptr + pixel[:, None] * OUT_CHANNELS + channel[None, :],
            acc,
            mask=inside[:, None] & (channel[None, :] < OUT_CHANNELS),
        )
        tl.store(alpha_ptr + pixel, 1.0 - trans, mask=inside)

    @triton.jit
    def _relevancy_raster_kernel(
        means_ptr,
        conics_ptr,
        opacities_ptr,
        features_ptr,
        offsets_ptr,
        ids_ptr,
        out_ptr,  # [C, H, W, POSITIVES] float32
        n_isects,
        n_tiles,
        tiles_x,
        tiles_per_camera,
        width,
        height,
        camera_offset,
        weight_ptr,
        bias_ptr,
        query_ptr,
        gram_ptr,
        gram_bias_ptr,
        query_bias_ptr,
        bias_norm_ptr,
        factor_ptr,
        offset_ptr,
        residual_ptr,
        temperature,
        min_alpha,
        TILE: tl.constexpr,
        PIXELS: tl.constexpr,
        CHANNELS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        DOT_FP16: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        NORMALIZE: tl.constexpr,
        FACTORED: tl.constexpr,
        HIDDEN: tl.constexpr,
        QUERIES: tl.constexpr,
        PADDED_QUERIES: tl.constexpr,
        POSITIVES: tl.constexpr,
        BLOCK_HIDDEN: tl.constexpr,
    ):
        latent, trans, camera, row, col, inside = _composite_tile(
            means_ptr, conics_ptr, opacities_ptr, features_ptr, offsets_ptr, ids_ptr,
            n_isects, n_tiles, tiles_x, tiles_per_camera, width, height, camera_offset,
            TILE, PIXELS, CHANNELS, BLOCK_G, DOT_FP16, INPUT_PRECISION,
        )  # fmt: skip
        if NORMALIZE:
            # chorus-splat's semantic_alpha_normalize: a weighted mean, fading to zero where almost nothing is seen.
            latent = latent / tl.maximum(1.0 - trans, min_alpha)[:, None]
        relevancy = _relevancy_block(
            latent, weight_ptr, bias_ptr, query_ptr, gram_ptr, gram_bias_ptr, query_bias_ptr, bias_norm_ptr,
            factor_ptr, offset_ptr, residual_ptr, temperature, FACTORED, CHANNELS, HIDDEN, QUERIES, PADDED_QUERIES,
            POSITIVES, BLOCK_HIDDEN,
        )  # fmt: skip
        pixel = (camera.to(tl.int64) * height + row) * width + col
        column = tl.arange(0, PADDED_QUERIES)
        tl.store(
            out_ptr + pixel[:, None] * POSITIVES + column[None, :],
            relevancy,
            mask=inside[:, None] & (column[None, :] < POSITIVES),
        )
