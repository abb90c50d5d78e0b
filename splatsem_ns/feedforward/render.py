"""Rendering predicted Gaussians for target cameras: RGB with expected depth, and the semantic latent.

Both go through ``splatsem_ns.rendering.rasterize_gaussians`` (gsplat on CUDA, the PyTorch reference elsewhere), so
training losses compare renders with the target images exactly as per-scene methods do. The latent is a second
pass with plain features: the RGB pass evaluates SH colours, which the latent is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.feedforward.cameras import world_to_camera_viewmat
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.rendering import rasterize_gaussians
from splatsem_ns.rendering.rasterize import Backend


@dataclass
class RenderedViews:
    """Renders of B scenes for T target cameras each."""

    rgb: Float[Tensor, "B T H W 3"]
    """Colour (SH evaluated, +0.5, clamped at 0 as gsplat does; composited over ``background``)."""
    depth: Float[Tensor, "B T H W"]
    """Expected z-depth (alpha-normalised), gsplat's "ED"."""
    alpha: Float[Tensor, "B T H W"]
    """Accumulated opacity."""
    latent: Optional[Float[Tensor, "B T H W D"]]
    """Rendered semantic latent (zero background), or None when not asked for."""


def render_predicted(
    gaussians: PredictedGaussians,
    intrinsics: Float[Tensor, "B T 3 3"],
    camera_to_world: Float[Tensor, "B T 4 4"],
    width: int,
    height: int,
    sh_degree: Optional[int] = None,
    *,
    background: Optional[Float[Tensor, "3"]] = None,
    render_latent: bool = True,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    rasterize_mode: str = "classic",
    backend: Backend = "auto",
    latent_scale: float = 1.0,
) -> RenderedViews:
    """Render each scene's predicted Gaussians into its target cameras.

    Args:
        gaussians: The network's prediction for B scenes.
        intrinsics: Pinhole intrinsics of the targets in pixels at ``height`` x ``width``.
        camera_to_world: OpenGL camera-to-world of the targets (nerfstudio's convention, as the network's inputs);
            converted here to the OpenCV world-to-camera viewmats the rasterizer takes.
        width: Render width in pixels.
        height: Render height in pixels.
        sh_degree: SH degree to evaluate (at most the prediction's); default the prediction's own.
        background: RGB composited behind the Gaussians (default black).
        render_latent: Also render the latent (a second rasterization).
        near_plane: Gaussians nearer than this to a camera are culled.
        far_plane: Gaussians farther than this are culled.
        rasterize_mode: "classic" or "antialiased".
        backend: Rasterizer backend (see ``rasterize_gaussians``).
        latent_scale: Resolution of the latent render relative to ``height`` x ``width`` (the intrinsics scaled
            alike, pixel centres kept): its 32-channel backward pass is the costliest part of a training step, and
            the teachers it is distilled from are far coarser than the image.
    """
    degree = gaussians.sh_degree if sh_degree is None else sh_degree
    if degree > gaussians.sh_degree:
        raise ValueError(f"sh_degree {degree} exceeds the prediction's SH degree {gaussians.sh_degree}")
    batch, targets = camera_to_world.shape[:2]
    dtype = gaussians.means.dtype
    viewmats = world_to_camera_viewmat(camera_to_world.to(dtype))
    Ks = intrinsics.to(dtype)
    backgrounds = None if background is None else background.to(dtype)[None].expand(targets, 3)
    rgb, depth, alpha, latent = [], [], [], []
    for b in range(batch):
        common = dict(
            means=gaussians.means[b],
            quats=gaussians.quats[b],
            scales=gaussians.scales[b],
            opacities=gaussians.opacities[b],
            viewmats=viewmats[b],
            Ks=Ks[b],
            width=width,
            height=height,
            near_plane=near_plane,
            far_plane=far_plane,
            rasterize_mode=rasterize_mode,
            backend=backend,
        )
        colours = torch.cat([gaussians.features_dc[b][:, None], gaussians.features_rest[b]], dim=1)
        render, accumulated, _ = rasterize_gaussians(
            colors=colours, sh_degree=degree, backgrounds=backgrounds, render_mode="RGB+ED", **common
        )
        rgb.append(render[..., :3])
        depth.append(render[..., 3])
        alpha.append(accumulated[..., 0])
        if render_latent:
            if latent_scale != 1.0:
                common.update(latent_camera(Ks[b], width, height, latent_scale))
            latent.append(rasterize_gaussians(colors=gaussians.latent[b], render_mode="RGB", **common)[0])
    return RenderedViews(
        rgb=torch.stack(rgb),
        depth=torch.stack(depth),
        alpha=torch.stack(alpha),
        latent=torch.stack(latent) if render_latent else None,
    )


def latent_camera(Ks: Float[Tensor, "T 3 3"], width: int, height: int, scale: float) -> Dict[str, Any]:
    """Intrinsics and size of a render at ``scale`` of ``width`` x ``height`` (at least one pixel): focal lengths
    and principal point scale with the image, which keeps every pixel centre where it was in the full image."""
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    factors = torch.tensor([new_width / width, new_height / height, 1.0], dtype=Ks.dtype, device=Ks.device)
    return {"Ks": Ks * factors[None, :, None], "width": new_width, "height": new_height}
