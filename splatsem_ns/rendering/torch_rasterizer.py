"""Pure-PyTorch rasterization of 3D Gaussians with the semantics of gsplat 1.4.0 (``packed=False``).

It runs wherever torch runs, CPU included, and follows gsplat's CUDA kernels
(``fully_fused_projection_fwd.cu``, ``isect_tiles.cu``, ``rasterize_to_pixels_{fwd,bwd}.cu``) rule for
rule: EWA projection with a screen-space blur of ``eps2d`` pixels, optional antialiasing compensation,
3-sigma integer radii, near/far and off-screen culling, 16x16 tiles, front-to-back compositing with
``alpha = min(0.999, opacity * exp(-sigma))``, contributions below 1/255 skipped and a pixel finished
once its transmittance would drop to 1e-4 or below.

Compositing works tile by tile: every tile only sees the Gaussians whose screen bounding box touches it
(exactly gsplat's tile assignment, which matters because a Gaussian can still be visible just outside
its 3-sigma radius). Tiles are padded to a common Gaussian count, grouped into memory-bounded chunks
and evaluated as dense ``[tiles, pixels, gaussians]`` blocks. The backward pass is written by hand: it
keeps the intermediates of at most one chunk's worth of pairs and recomputes the others, so memory stays
bounded for large scenes, and it yields gsplat's sum of per-pixel absolute gradients (``absgrad``) from
the same per-pixel terms as gsplat's kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

import torch
from gsplat.cuda._torch_impl import (
    _persp_proj,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
    _world_to_cam,
)
from jaxtyping import Bool, Float, Int
from torch import Tensor

ALPHA_MAX = 0.999
"""Upper clamp of a single Gaussian's alpha, so that transmittance never reaches exactly zero."""
ALPHA_MIN = 1.0 / 255.0
"""Contributions with a smaller alpha are skipped (they would not change an 8-bit image)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel is finished before the Gaussian that would bring its transmittance to this value or below."""

RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
RasterizeMode = Literal["classic", "antialiased"]


# ---------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------


def project_gaussians(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    calc_compensations: bool = False,
) -> Tuple[
    Int[Tensor, "C N"],
    Float[Tensor, "C N 2"],
    Float[Tensor, "C N"],
    Float[Tensor, "C N 3"],
    Optional[Float[Tensor, "C N"]],
]:
    """EWA projection of 3D Gaussians into C pinhole cameras, as gsplat's ``fully_fused_projection``.

    Args:
        means: Gaussian centres in world space. [N, 3]
        quats: Rotations as wxyz quaternions, not necessarily normalised. [N, 4]
        scales: Per-axis standard deviations (already exponentiated). [N, 3]
        viewmats: World-to-camera transforms (OpenCV convention). [C, 4, 4]
        Ks: Pinhole intrinsics. [C, 3, 3]
        width: Image width in pixels.
        height: Image height in pixels.
        eps2d: Variance in pixels^2 added to the projected covariance (screen-space blur).
        near_plane: Gaussians with camera-space depth below this are culled.
        far_plane: Gaussians with camera-space depth above this are culled.
        calc_compensations: Also return the antialiasing factor sqrt(det(cov2d) / det(cov2d + eps2d I)).

    Returns:
        A tuple:

        - **radii**: 3-sigma radius in pixels, 0 for culled Gaussians. int32 [C, N]
        - **means2d**: Projected centres in pixels. [C, N, 2]
        - **depths**: Camera-space z of the centres. [C, N]
        - **conics**: Upper triangle (a, b, c) of the inverse blurred 2D covariance. [C, N, 3]
        - **compensations**: Antialiasing factors, 0 for culled Gaussians, or None. [C, N]

    Values of culled Gaussians are finite but meaningless (gsplat leaves them uninitialised).
    """
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    means_c, covars_c = _world_to_cam(means, covars, viewmats)  # [C, N, 3], [C, N, 3, 3]
    depths = means_c[..., 2]
    in_depth_range = (depths >= near_plane) & (depths <= far_plane)
    # gsplat's own torch projection divides by z for every Gaussian; a centre on the camera plane then
    # yields inf/NaN that poison the gradients of everything (0 * inf) even though it is culled. Culled
    # centres are swapped for a harmless point on the optical axis before the projection.
    safe_point = means_c.new_tensor([0.0, 0.0, 1.0])
    means_c_safe = torch.where(in_depth_range[..., None], means_c, safe_point)
    means2d, covars2d = _persp_proj(means_c_safe, covars_c, Ks, width, height)

    c00, c01, c10, c11 = covars2d[..., 0, 0], covars2d[..., 0, 1], covars2d[..., 1, 0], covars2d[..., 1, 1]
    det_orig = c00 * c11 - c01 * c10
    c00 = c00 + eps2d
    c11 = c11 + eps2d
    det = c00 * c11 - c01 * c10
    valid = in_depth_range & (det > 0)
    det_safe = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c11 / det_safe, -0.5 * (c01 + c10) / det_safe, c00 / det_safe], dim=-1)

    compensations = None
    if calc_compensations:
        # The clamp keeps sqrt's gradient finite for flat Gaussians; it only moves factors below 1e-6.
        ratio = torch.clamp(det_orig / det_safe, min=1e-12)
        compensations = torch.where(valid, torch.sqrt(ratio), torch.zeros_like(ratio))

    with torch.no_grad():
        b = 0.5 * (c00 + c11)
        v1 = b + torch.sqrt(torch.clamp(b * b - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(v1))
        x, y = means2d[..., 0], means2d[..., 1]
        on_screen = (x + radius > 0) & (x - radius < width) & (y + radius > 0) & (y - radius < height)
        keep = valid & (radius > 0) & on_screen
        radii = torch.where(keep, radius, torch.zeros_like(radius)).to(torch.int32)
    return radii, means2d, depths, conics, compensations


# ---------------------------------------------------------------------------------------------------------
# Tile binning
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TileBins:
    """Gaussian/tile intersections of C cameras, sorted by tile and front to back inside a tile.

    Tiles are numbered globally as ``camera * tile_height * tile_width + row * tile_width + column``.
    """

    tile_size: int
    """Edge length of a square tile in pixels."""
    tile_width: int
    """Tiles per image row."""
    tile_height: int
    """Tiles per image column."""
    n_cameras: int
    """Number of cameras C."""
    tiles_per_gauss: Int[Tensor, "C N"]
    """How many tiles each Gaussian touches (int32, 0 when culled)."""
    tile_ids: Int[Tensor, " M"]
    """Global tile index of every intersection (int64)."""
    flatten_ids: Int[Tensor, " M"]
    """Flat Gaussian index ``camera * N + gaussian`` of every intersection (int64)."""
    isect_ids: Int[Tensor, " M"]
    """gsplat's sort key ``camera | tile | float32 depth bits`` of every intersection (int64)."""
    tile_counts: Int[Tensor, " T"]
    """Intersections per global tile, T = C * tile_height * tile_width (int64)."""
    tile_starts: Int[Tensor, " T"]
    """Index in ``tile_ids`` of the first intersection of every tile (int64)."""

    @property
    def n_tiles(self) -> int:
        return self.n_cameras * self.tile_height * self.tile_width

    @property
    def isect_offsets(self) -> Int[Tensor, "C TH TW"]:
        """gsplat's per-tile start offsets (int32)."""
        return self.tile_starts.view(self.n_cameras, self.tile_height, self.tile_width).to(torch.int32)

    @classmethod
    def from_info(cls, info: Dict) -> "TileBins":
        """The bins of a :func:`rasterize_gaussians_torch` call, rebuilt from the ``info`` it returned (the
        intersections are sorted by tile, so each tile's run starts at its offset)."""
        starts = info["isect_offsets"].reshape(-1).long()
        flatten_ids = info["flatten_ids"].long()
        counts = torch.diff(starts, append=starts.new_tensor([flatten_ids.numel()]))
        return cls(
            tile_size=info["tile_size"],
            tile_width=info["tile_width"],
            tile_height=info["tile_height"],
            n_cameras=info["n_cameras"],
            tiles_per_gauss=info["tiles_per_gauss"],
            tile_ids=torch.repeat_interleave(torch.arange(starts.numel(), device=starts.device), counts),
            flatten_ids=flatten_ids,
            isect_ids=info["isect_ids"],
            tile_counts=counts,
            tile_starts=starts,
        )


@torch.no_grad()
def bin_gaussians_to_tiles(
    means2d: Float[Tensor, "C N 2"],
    radii: Int[Tensor, "C N"],
    depths: Float[Tensor, "C N"],
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> TileBins:
    """Assigns every visible Gaussian to the tiles its 3-sigma bounding box touches, as gsplat's
    ``isect_tiles`` (same bounding-box rule, same front-to-back order, ties broken by flat index).

    Args:
        means2d: Projected centres in pixels. [C, N, 2]
        radii: Integer radii, 0 for culled Gaussians. [C, N]
        depths: Camera-space depths used for ordering. [C, N]
        tile_size: Tile edge in pixels.
        tile_width: Tiles per row (ceil(width / tile_size)).
        tile_height: Tiles per column (ceil(height / tile_size)).
    """
    C, N = radii.shape
    device = means2d.device
    tile_xy = means2d.detach() / tile_size
    tile_r = (radii.to(means2d.dtype) / tile_size)[..., None]
    bounds = means2d.new_tensor([tile_width, tile_height])
    # gsplat casts to uint32 first, which saturates negatives to 0: a clamp on both sides.
    lo = torch.minimum(torch.floor(tile_xy - tile_r).clamp(min=0), bounds).to(torch.int64)
    hi = torch.minimum(torch.ceil(tile_xy + tile_r).clamp(min=0), bounds).to(torch.int64)
    extent = hi - lo  # [C, N, 2]
    tiles_per_gauss = extent[..., 0] * extent[..., 1] * (radii > 0)

    counts_flat = tiles_per_gauss.reshape(-1)
    visible = torch.nonzero(counts_flat > 0).squeeze(-1)
    # Stable sort by depth first, then (below) stable sort by tile: the same order as gsplat's stable radix
    # sort of (tile, depth) keys, in full precision for float64 too.
    visible = visible[torch.sort(depths.detach().reshape(-1)[visible], stable=True).indices]
    counts = counts_flat[visible]
    n_isects = int(counts.sum().item()) if counts.numel() else 0

    owner = torch.repeat_interleave(torch.arange(visible.numel(), device=device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(n_isects, device=device) - first[owner]
    gauss = visible[owner]
    lo_flat, extent_flat = lo.reshape(-1, 2)[gauss], extent.reshape(-1, 2)[gauss]
    tx = lo_flat[:, 0] + local % extent_flat[:, 0]
    ty = lo_flat[:, 1] + torch.div(local, extent_flat[:, 0], rounding_mode="floor")
    cam = torch.div(gauss, max(N, 1), rounding_mode="floor")
    tile_in_cam = ty * tile_width + tx
    tile_ids = cam * (tile_width * tile_height) + tile_in_cam
    order = torch.sort(tile_ids, stable=True).indices
    tile_ids, gauss, cam, tile_in_cam = tile_ids[order], gauss[order], cam[order], tile_in_cam[order]

    tile_n_bits = (tile_width * tile_height).bit_length()
    depth_bits = depths.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)[gauss]
    isect_ids = (cam << (32 + tile_n_bits)) | (tile_in_cam << 32) | depth_bits.to(torch.int64)

    n_tiles = C * tile_width * tile_height
    tile_counts = torch.bincount(tile_ids, minlength=n_tiles)
    tile_starts = torch.cumsum(tile_counts, 0) - tile_counts
    return TileBins(
        tile_size=tile_size,
        tile_width=tile_width,
        tile_height=tile_height,
        n_cameras=C,
        tiles_per_gauss=tiles_per_gauss.to(torch.int32),
        tile_ids=tile_ids,
        flatten_ids=gauss,
        isect_ids=isect_ids,
        tile_counts=tile_counts,
        tile_starts=tile_starts,
    )


# ---------------------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """A group of tiles evaluated as one dense block, padded to the largest Gaussian count K among them."""

    tiles: Int[Tensor, " B"]
    """Global indices of the chunk's tiles."""
    gauss: Int[Tensor, "B K"]
    """Flat Gaussian index of every slot, front to back; padding slots repeat the tile's first Gaussian."""
    valid: Bool[Tensor, "B K"]
    """False for padding slots."""
    px: Float[Tensor, "B P"]
    """Pixel-centre x of every pixel of every tile."""
    py: Float[Tensor, "B P"]
    """Pixel-centre y of every pixel of every tile."""


def _plan_chunks(bins: TileBins, max_pairs: int, dtype: torch.dtype) -> List[_Chunk]:
    """Groups non-empty tiles (largest first, so padding stays small) into chunks of at most
    ``max_pairs`` pixel/Gaussian pairs, except that a single tile always forms a chunk."""
    ts = bins.tile_size
    P = ts * ts
    counts = bins.tile_counts
    device = counts.device
    nonempty = torch.nonzero(counts > 0).squeeze(-1)
    nonempty = nonempty[torch.sort(counts[nonempty], descending=True, stable=True).indices]
    sorted_counts = counts[nonempty].tolist()
    tiles_per_cam = bins.tile_width * bins.tile_height
    offs = torch.arange(P, device=device)
    off_x = (offs % ts).to(dtype) + 0.5
    off_y = torch.div(offs, ts, rounding_mode="floor").to(dtype) + 0.5

    chunks = []
    i = 0
    while i < len(sorted_counts):
        K = sorted_counts[i]
        B = max(1, max_pairs // (K * P))
        tiles = nonempty[i : i + B]
        i += B
        j = torch.arange(K, device=device)
        starts = bins.tile_starts[tiles][:, None]
        valid = j[None, :] < counts[tiles][:, None]
        idx = torch.where(valid, starts + j[None, :], starts)  # padding repeats a real Gaussian of the tile
        local = tiles % tiles_per_cam
        tx = (local % bins.tile_width).to(dtype) * ts
        ty = torch.div(local, bins.tile_width, rounding_mode="floor").to(dtype) * ts
        chunks.append(
            _Chunk(
                tiles=tiles,
                gauss=bins.flatten_ids[idx],
                valid=valid,
                px=tx[:, None] + off_x[None, :],
                py=ty[:, None] + off_y[None, :],
            )
        )
    return chunks


def _chunk_forward(chunk: _Chunk, means2d: Tensor, conics: Tensor, opacities: Tensor) -> Dict[str, Tensor]:
    """Per pixel/Gaussian quantities of one chunk: [B, P, K] tensors, except "trans_final" [B, P] and the
    conic coefficients "ca", "cb", "cc" [B, 1, K]."""
    xy = means2d[chunk.gauss]  # [B, K, 2]
    con = conics[chunk.gauss]  # [B, K, 3]
    # Padding slots get opacity 0, so they fall under the 1/255 threshold like any faint contribution.
    opa = torch.where(chunk.valid, opacities[chunk.gauss], torch.zeros_like(opacities[chunk.gauss]))[
        :, None, :
    ]
    dx = xy[:, None, :, 0] - chunk.px[:, :, None]
    dy = xy[:, None, :, 1] - chunk.py[:, :, None]
    ca, cb, cc = con[:, None, :, 0], con[:, None, :, 1], con[:, None, :, 2]
    # 0.5 (a dx^2 + c dy^2) + b dx dy, written as dx (a/2 dx + b dy) + c/2 dy^2 to save passes over memory.
    sigma = torch.addcmul(dx * torch.addcmul(0.5 * ca * dx, cb, dy), 0.5 * cc * dy, dy)
    gauss = torch.exp(-sigma)
    alpha_raw = opa * gauss
    hit = (sigma >= 0) & (alpha_raw >= ALPHA_MIN)  # the clamp at 0.999 cannot take alpha below 1/255
    alpha = alpha_raw.clamp(max=ALPHA_MAX) * hit
    one_minus = 1.0 - alpha
    trans_incl = torch.cumprod(one_minus, dim=-1)
    # Transmittance only decreases, so the Gaussians a pixel still takes ("would not bring it to 1e-4 or
    # below") form a prefix; inside it the products above are exact, after it nothing contributes.
    keep = trans_incl > TRANSMITTANCE_MIN
    hit = hit & keep
    trans = torch.cat([torch.ones_like(trans_incl[..., :1]), trans_incl[..., :-1]], dim=-1)
    trans_final = torch.where(keep, trans_incl, torch.ones_like(trans_incl)).amin(dim=-1)
    return {
        "dx": dx,
        "dy": dy,
        "ca": ca,
        "cb": cb,
        "cc": cc,
        "gauss": gauss,
        "alpha_raw": alpha_raw,
        "hit": hit,
        "one_minus": one_minus,
        "trans": trans,
        "trans_final": trans_final,
        "weights": alpha * keep * trans,
    }


class _TileCompositing(torch.autograd.Function):
    """Front-to-back alpha compositing of all chunks; returns per-tile colours and final transmittance."""

    @staticmethod
    def forward(
        ctx,
        means2d: Tensor,  # [G, 2], G = C * N
        conics: Tensor,  # [G, 3]
        opacities: Tensor,  # [G]
        colors: Tensor,  # [G, D]
        chunks: List[_Chunk],
        n_tiles: int,
        tile_pixels: int,
        absgrad_out: Optional[Tensor],  # [G, 2], filled in backward
        max_cached_pairs: int,
    ) -> Tuple[Tensor, Tensor]:
        D = colors.shape[-1]
        render = means2d.new_zeros(n_tiles, tile_pixels, D)
        trans_final = means2d.new_ones(n_tiles, tile_pixels)
        # Chunk intermediates are kept for backward up to a budget of one chunk; the rest are recomputed,
        # so memory stays bounded while small scenes skip the recomputation.
        cached: List[Optional[Dict[str, Tensor]]] = []
        cached_pairs = 0
        for chunk in chunks:
            st = _chunk_forward(chunk, means2d, conics, opacities)
            render[chunk.tiles] = torch.bmm(st["weights"], colors[chunk.gauss])
            trans_final[chunk.tiles] = st["trans_final"]
            cached_pairs += st["weights"].numel()
            cached.append(st if cached_pairs <= max_cached_pairs else None)
        ctx.save_for_backward(means2d, conics, opacities, colors)
        ctx.chunks = chunks
        ctx.cached = cached
        ctx.absgrad_out = absgrad_out
        return render, trans_final

    @staticmethod
    def backward(ctx, v_render: Tensor, v_trans_final: Tensor):
        means2d, conics, opacities, colors = ctx.saved_tensors
        v_means2d = torch.zeros_like(means2d)
        v_conics = torch.zeros_like(conics)
        v_opacities = torch.zeros_like(opacities)
        v_colors = torch.zeros_like(colors)
        absgrad_out = ctx.absgrad_out
        for chunk, st in zip(ctx.chunks, ctx.cached, strict=True):
            if st is None:
                st = _chunk_forward(chunk, means2d, conics, opacities)
            ids = chunk.gauss.reshape(-1)
            col = colors[chunk.gauss]  # [B, K, D]
            v_out = v_render[chunk.tiles]  # [B, P, D]
            weights = st["weights"]
            v_colors.index_add_(
                0, ids, torch.bmm(weights.transpose(1, 2), v_out).reshape(-1, colors.shape[-1])
            )

            # render = sum_k w_k c_k, w_k = alpha_k T_k, T_k = prod_{j<k} (1 - alpha_j); the final
            # transmittance also depends on every alpha. d/dalpha_k of everything behind k is
            # -(sum_{j>k} dL/dw_j w_j + dL/dT_final T_final) / (1 - alpha_k).
            v_w = torch.bmm(v_out, col.transpose(1, 2))  # [B, P, K]
            vw_w = v_w * weights
            suffix_incl = torch.flip(torch.cumsum(torch.flip(vw_w, dims=[-1]), dim=-1), dims=[-1])
            behind = torch.cat([suffix_incl[..., 1:], torch.zeros_like(suffix_incl[..., :1])], dim=-1)
            v_tf = (v_trans_final[chunk.tiles] * st["trans_final"])[..., None]
            v_alpha = v_w * st["trans"] - (behind + v_tf) / st["one_minus"]
            # Clamped (alpha > 0.999) and skipped contributions pass no gradient to opacity or shape.
            v_alpha = v_alpha * (st["hit"] & (st["alpha_raw"] <= ALPHA_MAX))
            v_opacities.index_add_(0, ids, (v_alpha * st["gauss"]).sum(dim=1).reshape(-1))

            # dalpha/dsigma = -alpha; the minus sign is applied to the sums below.
            neg_v_sigma = v_alpha * st["alpha_raw"]
            dx, dy = st["dx"], st["dy"]
            u, w = neg_v_sigma * dx, neg_v_sigma * dy
            v_con = torch.stack([0.5 * (u * dx).sum(1), (u * dy).sum(1), 0.5 * (w * dy).sum(1)], dim=-1)
            v_conics.index_add_(0, ids, -v_con.reshape(-1, 3))
            # dsigma/dxy = (a dx + b dy, b dx + c dy) and a, b, c are constant over the pixels of a tile.
            ca, cb, cc = st["ca"][:, 0], st["cb"][:, 0], st["cc"][:, 0]
            su, sw = u.sum(1), w.sum(1)
            v_xy = torch.stack([ca * su + cb * sw, cb * su + cc * sw], dim=-1)
            v_means2d.index_add_(0, ids, -v_xy.reshape(-1, 2))
            if absgrad_out is not None:
                abs_x = (st["ca"] * u + st["cb"] * w).abs().sum(1)
                abs_y = (st["cb"] * u + st["cc"] * w).abs().sum(1)
                absgrad_out.index_add_(
                    0, ids, torch.stack([abs_x, abs_y], dim=-1).reshape(-1, 2).to(absgrad_out.dtype)
                )
        # Frees the cached intermediates now; a second backward (retain_graph=True) recomputes them.
        ctx.cached = [None] * len(ctx.chunks)
        return v_means2d, v_conics, v_opacities, v_colors, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Full rasterization
# ---------------------------------------------------------------------------------------------------------


def _check_inputs(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    sh_degree: Optional[int],
    backgrounds: Optional[Tensor],
    render_mode: str,
    rasterize_mode: str,
) -> None:
    where = "splatsem_ns.rendering.rasterize_gaussians_torch"
    N = means.shape[0] if means.dim() == 2 else -1
    C = viewmats.shape[0] if viewmats.dim() == 3 else -1
    expected = {
        "means": (means, (N, 3)),
        "quats": (quats, (N, 4)),
        "scales": (scales, (N, 3)),
        "opacities": (opacities, (N,)),
        "viewmats": (viewmats, (C, 4, 4)),
        "Ks": (Ks, (C, 3, 3)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or N < 0 or C < 0:
            raise ValueError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, expected {shape} (N={N}, C={C})."
            )
    if sh_degree is None:
        ok = (colors.dim() == 2 and colors.shape[0] == N) or (
            colors.dim() == 3 and colors.shape[:2] == (C, N)
        )
        if not ok:
            raise ValueError(
                f"{where}: colors has shape {tuple(colors.shape)}, expected [N, D] or [C, N, D]."
            )
    else:
        ok = (colors.dim() == 3 and colors.shape[0] == N and colors.shape[2] == 3) or (
            colors.dim() == 4 and colors.shape[:2] == (C, N) and colors.shape[3] == 3
        )
        if not ok:
            raise ValueError(
                f"{where}: with sh_degree={sh_degree} colors must be SH coefficients [N, K, 3] or [C, N, K, 3], "
                f"got {tuple(colors.shape)}."
            )
        if (sh_degree + 1) ** 2 > colors.shape[-2]:
            raise ValueError(
                f"{where}: sh_degree={sh_degree} needs {(sh_degree + 1) ** 2} SH coefficients, colors has "
                f"{colors.shape[-2]}."
            )
    if backgrounds is not None and render_mode in ("RGB", "RGB+D", "RGB+ED"):
        D = colors.shape[-1]
        if tuple(backgrounds.shape) != (C, D):
            raise ValueError(f"{where}: backgrounds has shape {tuple(backgrounds.shape)}, expected {(C, D)}.")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"{where}: unknown render_mode {render_mode!r}.")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"{where}: unknown rasterize_mode {rasterize_mode!r}.")
    named = {
        "means": means,
        "quats": quats,
        "scales": scales,
        "opacities": opacities,
        "colors": colors,
        "viewmats": viewmats,
        "Ks": Ks,
        "backgrounds": backgrounds,
    }
    for name, tensor in named.items():
        if tensor is not None and not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{where}: {name} contains non-finite values (NaN or inf).")


def composite_tiles_torch(
    means2d: Float[Tensor, "C N 2"],
    conics: Float[Tensor, "C N 3"],
    opacities: Float[Tensor, "C N"],
    colors: Float[Tensor, "C N D"],
    bins: TileBins,
    width: int,
    height: int,
    max_pairs_per_chunk: Optional[int] = None,
    absgrad_buffer: Optional[Tensor] = None,
) -> Tuple[Float[Tensor, "C H W D"], Float[Tensor, "C H W 1"]]:
    """gsplat's ``rasterize_to_pixels`` (``packed=False``, no backgrounds or masks) in PyTorch: the features
    composited front to back through projected Gaussians and their tile ``bins``, and the final transmittance
    (``1 - alpha``). Differentiable; ``absgrad_buffer`` [C * N, 2] gathers AbsGS gradients in backward.
    ``max_pairs_per_chunk``: as :func:`rasterize_gaussians_torch`'s."""
    C, N = opacities.shape
    dtype, D = means2d.dtype, colors.shape[-1]
    if max_pairs_per_chunk is None:
        max_pairs_per_chunk = 2**25 if means2d.device.type == "cuda" else 2**21
    chunks = _plan_chunks(bins, max_pairs_per_chunk, dtype)
    ts, tile_width, tile_height = bins.tile_size, bins.tile_width, bins.tile_height
    render_tiles, trans_tiles = _TileCompositing.apply(
        means2d.reshape(C * N, 2),
        conics.reshape(C * N, 3),
        opacities.reshape(C * N).to(dtype),
        colors.reshape(C * N, D).to(dtype),
        chunks,
        bins.n_tiles,
        ts * ts,
        absgrad_buffer,
        max_pairs_per_chunk,
    )

    def to_image(tiles: Tensor) -> Tensor:  # [C * TH * TW, P, X] -> [C, H, W, X]
        X = tiles.shape[-1]
        image = tiles.view(C, tile_height, tile_width, ts, ts, X).permute(0, 1, 3, 2, 4, 5)
        return image.reshape(C, tile_height * ts, tile_width * ts, X)[:, :height, :width]

    return to_image(render_tiles), to_image(trans_tiles[..., None])


def rasterize_gaussians_torch(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    opacities: Float[Tensor, " N"],
    colors: Tensor,
    viewmats: Float[Tensor, "C 4 4"],
    Ks: Float[Tensor, "C 3 3"],
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    sh_degree: Optional[int] = None,
    backgrounds: Optional[Float[Tensor, "C D"]] = None,
    render_mode: RenderMode = "RGB",
    rasterize_mode: RasterizeMode = "classic",
    absgrad: bool = False,
    eps2d: float = 0.3,
    tile_size: int = 16,
    max_pairs_per_chunk: Optional[int] = None,
) -> Tuple[Float[Tensor, "C H W X"], Float[Tensor, "C H W 1"], Dict]:
    """Rasterizes N 3D Gaussians into C pinhole images in pure PyTorch, matching ``gsplat.rasterization``
    with ``packed=False`` (same inputs, outputs and ``info`` keys; see the module docstring for the rules).

    Args:
        means: Gaussian centres in world space. [N, 3]
        quats: Rotations as wxyz quaternions, not necessarily normalised. [N, 4]
        scales: Per-axis standard deviations, already exponentiated. [N, 3]
        opacities: Opacities in [0, 1], already passed through a sigmoid. [N]
        colors: Per-Gaussian features [N, D] or per-camera features [C, N, D]; with ``sh_degree`` set,
            SH coefficients [N, K, 3] or [C, N, K, 3] with (sh_degree + 1)^2 <= K.
        viewmats: World-to-camera transforms (OpenCV convention: x right, y down, z forward). [C, 4, 4]
        Ks: Pinhole intrinsics. [C, 3, 3]
        width: Image width W in pixels.
        height: Image height H in pixels.
        near_plane: Gaussians closer than this (camera z) are culled.
        far_plane: Gaussians farther than this are culled.
        sh_degree: Evaluate ``colors`` as SH of this degree (result + 0.5, clamped at 0), or None.
        backgrounds: Colour behind the Gaussians, per camera. [C, D]; ignored (zero) for "D"/"ED".
        render_mode: "RGB" renders the D channels; "D" the accumulated depth sum_i w_i z_i; "ED" the
            expected depth D / alpha; "RGB+D" and "RGB+ED" append that depth as the last channel.
        rasterize_mode: "antialiased" multiplies opacities by the compensation factor
            sqrt(det(cov2d) / det(cov2d + eps2d I)) (Mip-Splatting); "classic" does not.
        absgrad: Also accumulate, during backward, ``info["means2d"].absgrad`` [C, N, 2]: the sum over
            pixels of the absolute per-pixel gradient of the projected centres (AbsGS). It is computed
            from the same per-pixel terms as gsplat's kernel; only the summation order differs. The
            attribute holds zeros until backward has run.
        eps2d: Screen-space blur (pixels^2) added to every projected covariance.
        tile_size: Tile edge in pixels; compositing and culling work per tile, as in gsplat.
        max_pairs_per_chunk: Upper bound of pixel/Gaussian pairs evaluated at once (memory knob). Default:
            2^21 on CPU, 2^25 on CUDA.

    Returns:
        A tuple:

        - **render**: [C, H, W, X] with X = D for "RGB", 1 for "D"/"ED" and D + 1 for "RGB+D"/"RGB+ED".
        - **alpha**: Accumulated opacity 1 - T_final. [C, H, W, 1]
        - **info**: gsplat's meta dict for ``packed=False``: "camera_ids" and "gaussian_ids" (None),
          "radii" int32 [C, N], "means2d" [C, N, 2] (a non-leaf tensor of the graph, so ``retain_grad``
          works), "depths" [C, N], "conics" [C, N, 3], "opacities" [C, N] (after compensation),
          "tile_width", "tile_height", "tiles_per_gauss" int32 [C, N], "isect_ids" int64 [M],
          "flatten_ids" int32 [M], "isect_offsets" int32 [C, TH, TW], "width", "height", "tile_size",
          "n_cameras", plus "backend" = "torch".

    Raises:
        ValueError: on wrongly shaped or non-finite inputs (the message names the input).
    """
    _check_inputs(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats,
        Ks,
        sh_degree,
        backgrounds,
        render_mode,
        rasterize_mode,
    )
    N, C = means.shape[0], viewmats.shape[0]
    dtype = means.dtype

    radii, means2d, depths, conics, compensations = project_gaussians(
        means,
        quats,
        scales,
        viewmats,
        Ks,
        width,
        height,
        eps2d=eps2d,
        near_plane=near_plane,
        far_plane=far_plane,
        calc_compensations=rasterize_mode == "antialiased",
    )
    opacities_cn = opacities.repeat(C, 1)  # [C, N]
    if compensations is not None:
        opacities_cn = opacities_cn * compensations

    if sh_degree is None:
        colors_cn = colors.expand(C, -1, -1) if colors.dim() == 2 else colors  # [C, N, D]
    else:
        camtoworlds = torch.inverse(viewmats)
        dirs = means[None, :, :] - camtoworlds[:, None, :3, 3]  # [C, N, 3]
        shs = colors.expand(C, -1, -1, -1) if colors.dim() == 3 else colors  # [C, N, K, 3]
        colors_cn = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)

    if render_mode in ("RGB+D", "RGB+ED"):
        colors_cn = torch.cat([colors_cn, depths[..., None]], dim=-1)
        if backgrounds is not None:
            backgrounds = torch.cat([backgrounds, backgrounds.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        colors_cn = depths[..., None]
        if backgrounds is not None:
            backgrounds = backgrounds.new_zeros(C, 1)

    tile_width = math.ceil(width / tile_size)
    tile_height = math.ceil(height / tile_size)
    bins = bin_gaussians_to_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)
    absgrad_buffer = means.new_zeros(C * N, 2) if absgrad else None
    render, trans = composite_tiles_torch(
        means2d, conics, opacities_cn, colors_cn, bins, width, height, max_pairs_per_chunk, absgrad_buffer
    )
    if backgrounds is not None:
        render = render + trans * backgrounds.to(dtype)[:, None, None, :]
    alpha = 1.0 - trans
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)

    if absgrad_buffer is not None:
        means2d.absgrad = absgrad_buffer.view(C, N, 2)
    info = {
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opacities_cn,
        "tile_width": tile_width,
        "tile_height": tile_height,
        "tiles_per_gauss": bins.tiles_per_gauss,
        "isect_ids": bins.isect_ids,
        "flatten_ids": bins.flatten_ids.to(torch.int32),
        "isect_offsets": bins.isect_offsets,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": C,
        "backend": "torch",
    }
    return render, alpha, info
