"""The one rasterization entry point: gsplat's CUDA kernels on GPU, the pure-PyTorch path elsewhere."""

from __future__ import annotations

from typing import Dict, Literal, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.rendering.torch_rasterizer import (
    RasterizeMode,
    RenderMode,
    TileBins,
    composite_tiles_torch,
    rasterize_gaussians_torch,
)

Backend = Literal["auto", "gsplat", "torch"]


def rasterize_gaussians(
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
    backend: Backend = "auto",
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> Tuple[Float[Tensor, "C H W X"], Float[Tensor, "C H W 1"], Dict]:
    """Rasterizes N 3D Gaussians into C pinhole images with the semantics of ``gsplat.rasterization``
    (gsplat 1.4.0, ``packed=False``, ``sparse_grad=False``, pinhole cameras).

    Args:
        means: Gaussian centres in world space. [N, 3]
        quats: Rotations as wxyz quaternions, not necessarily normalised. [N, 4]
        scales: Per-axis standard deviations, already exponentiated. [N, 3]
        opacities: Opacities in [0, 1], already passed through a sigmoid. [N]
        colors: Features [N, D] (or per camera [C, N, D]); with ``sh_degree`` set, SH coefficients
            [N, K, 3] (or [C, N, K, 3]) with (sh_degree + 1)^2 <= K.
        viewmats: World-to-camera transforms, OpenCV convention. [C, 4, 4]
        Ks: Pinhole intrinsics. [C, 3, 3]
        width: Image width W in pixels.
        height: Image height H in pixels.
        near_plane: Gaussians with camera depth below this are culled.
        far_plane: Gaussians with camera depth above this are culled.
        sh_degree: Degree of the SH evaluation of ``colors``, or None for plain features.
        backgrounds: Per-camera background. [C, D]
        render_mode: "RGB", "D" (accumulated depth), "ED" (expected depth), "RGB+D" or "RGB+ED" (depth
            appended as the last channel).
        rasterize_mode: "classic" or "antialiased" (Mip-Splatting opacity compensation).
        absgrad: Fill ``info["means2d"].absgrad`` [C, N, 2] during backward (AbsGS densification).
        backend: "gsplat" runs gsplat's CUDA kernels (CUDA tensors only); "torch" runs
            :func:`rasterize_gaussians_torch` on any device; "auto" picks gsplat for CUDA tensors and torch
            otherwise. Empty scenes (N = 0) always take the torch path.
        eps2d: Screen-space blur (pixels^2) added to every projected covariance.
        tile_size: Tile edge in pixels.

    Returns:
        A tuple:

        - **render**: [C, H, W, X], X = D for "RGB", 1 for "D"/"ED", D + 1 for "RGB+D"/"RGB+ED".
        - **alpha**: [C, H, W, 1]
        - **info**: gsplat's meta dict ("radii" int32 [C, N], "means2d" [C, N, 2], "depths" [C, N],
          "conics" [C, N, 3], "opacities" [C, N], tile bookkeeping, "width", "height", "n_cameras",
          "tile_size", ...) plus "backend" naming the path that ran. It carries everything gsplat's
          ``DefaultStrategy`` reads.

    Raises:
        ValueError: for an unknown backend, ``backend="gsplat"`` on non-CUDA tensors, and (torch path)
            wrongly shaped or non-finite inputs.
    """
    if backend not in ("auto", "gsplat", "torch"):
        raise ValueError(
            f"rasterize_gaussians: unknown backend {backend!r}; use 'auto', 'gsplat' or 'torch'."
        )
    if backend == "gsplat" and not means.is_cuda:
        raise ValueError(
            f"rasterize_gaussians: backend='gsplat' needs CUDA tensors, but means is on {means.device}. "
            "gsplat's kernels only run on NVIDIA GPUs; use backend='torch' (or 'auto') on this device."
        )
    # gsplat's kernels are not exercised on empty inputs; the torch path handles them on any device.
    use_gsplat = backend != "torch" and means.is_cuda and means.shape[0] > 0
    if not use_gsplat:
        return rasterize_gaussians_torch(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmats,
            Ks,
            width,
            height,
            near_plane=near_plane,
            far_plane=far_plane,
            sh_degree=sh_degree,
            backgrounds=backgrounds,
            render_mode=render_mode,
            rasterize_mode=rasterize_mode,
            absgrad=absgrad,
            eps2d=eps2d,
            tile_size=tile_size,
        )

    # Imported here: loading gsplat's extension compiles or loads CUDA code, which CPU-only runs never need.
    from gsplat import rasterization

    render, alpha, info = rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        tile_size=tile_size,
        backgrounds=backgrounds,
        render_mode=render_mode,
        sparse_grad=False,
        absgrad=absgrad,
        rasterize_mode=rasterize_mode,
    )
    info["backend"] = "gsplat"
    return render, alpha, info


def rasterize_from_projection(
    info: Dict, colors: Float[Tensor, "N D"]
) -> Tuple[Float[Tensor, "C H W D"], Float[Tensor, "C H W 1"]]:
    """Other per-Gaussian features (e.g. a semantic latent) composited through the projection and tile binning
    that an earlier :func:`rasterize_gaussians` call made (its ``info``): the same Gaussians seen by the same
    cameras at the same size, tile size and rasterize mode, which then need no second projection. The compositing
    is that call's own: gsplat's ``rasterize_to_pixels`` after a gsplat render, the PyTorch path's after a torch
    one, so the result equals rendering ``colors`` with :func:`rasterize_gaussians` and those settings.

    Returns:
        The composited features [C, H, W, D] (no background) and the accumulated alpha [C, H, W, 1].
    """
    C = info["n_cameras"]
    colors = colors.expand(C, -1, -1) if colors.dim() == 2 else colors  # [C, N, D]
    width, height = info["width"], info["height"]
    if info.get("backend") == "gsplat":
        from gsplat.cuda._wrapper import rasterize_to_pixels

        # 32 channels at a time, as gsplat.rasterization's default channel_chunk does.
        parts = [
            rasterize_to_pixels(
                info["means2d"],
                info["conics"],
                colors[..., i : i + 32],
                info["opacities"],
                width,
                height,
                info["tile_size"],
                info["isect_offsets"],
                info["flatten_ids"],
            )
            for i in range(0, colors.shape[-1], 32)
        ]
        return torch.cat([render for render, _ in parts], dim=-1), parts[0][1]
    render, trans = composite_tiles_torch(
        info["means2d"], info["conics"], info["opacities"], colors, TileBins.from_info(info), width, height
    )
    return render, 1.0 - trans
