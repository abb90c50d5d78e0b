"""The context views placed at their sensor depth: what the target views allow a prediction to reach, network aside.

Every context pixel with a depth measurement becomes an opaque, isotropic Gaussian at the measured depth, about one
pixel footprint wide, coloured by its pixel; pixels without a measurement get opacity 0. Rendered into the target
views this gives ceilings that no network changes, only the choice of views:

- the PSNR and the coverage the context views allow at the targets (target pixels that no context pixel reaches
  stay background, whatever the depth);
- carrying each pixel's teacher feature as its latent, the teacher warped to the target by the sensor's depth: the
  counterpart, with perfect depth, of semantic-splat's "teacher warped by predicted depth" baseline.

Splats of a fixed pixel footprint leave holes where a target sees a surface larger than its context views did, so
these are a practical reference more than a strict bound.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.feedforward.cameras import pixel_footprint, unproject_depth
from splatsem_ns.feedforward.gaussian_head import rgb_to_sh
from splatsem_ns.feedforward.gaussians import PredictedGaussians

FOOTPRINT = 0.5
"""Standard deviation of each splat, in pixel footprints at its depth. Neighbouring pixels' splats overlap, which
closes a surface seen head-on; wider splats close more of a target but bleed across depth edges. On a synthetic room
at 48x64, a view re-rendered from its own pixels kept 95, 93, 92 and 87% of its pixels' classes at 0.4, 0.5, 0.7
and 1.0, and two other views covered 45, 47, 51 and 58% of a third."""

OPACITY = 0.99
"""Opacity of a measured pixel's splat (nearly opaque: the first surface along a ray hides what is behind it)."""


def sensor_depth_gaussians(
    views: Mapping[str, Any], latent: Optional[Float[Tensor, "B V H W C"]] = None
) -> PredictedGaussians:
    """One Gaussian per pixel of ``views`` (a batch's "context" views, as ``MultiSceneDataManager`` serves them:
    uint8 or float images [B, V, H, W, 3], intrinsics, OpenGL camera-to-world, depth with 0 where unmeasured),
    placed at its sensor depth; ``latent``: a per-pixel feature to carry (default: one zero channel)."""
    images = views["images"]
    colours = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    colours = colours[..., :3]
    batch, count, height, width = colours.shape[:4]
    depth = views["depth"].float()
    measured = torch.isfinite(depth) & (depth > 0)
    # Unmeasured pixels are placed anywhere (1 m), transparent.
    depth = torch.where(measured, depth, torch.ones_like(depth))
    intrinsics = views["intrinsics"].float()
    means = unproject_depth(depth, intrinsics, views["camera_to_world"].float())
    scales = (FOOTPRINT * pixel_footprint(depth, intrinsics))[..., None].expand(-1, -1, -1, -1, 3)
    quats = torch.zeros(batch, count, height, width, 4, device=depth.device)
    quats[..., 0] = 1.0
    if latent is None:
        latent = torch.zeros(batch, count, height, width, 1, device=depth.device)

    def flat(x: Tensor) -> Tensor:  # [B, V, H, W, ...] -> [B, V*H*W, ...], the network's pixel order
        return x.flatten(1, 3)

    return PredictedGaussians(
        means=flat(means),
        quats=flat(quats),
        scales=flat(scales),
        opacities=flat(measured.float() * OPACITY),
        features_dc=flat(rgb_to_sh(colours)),
        features_rest=torch.zeros(batch, count * height * width, 0, 3, device=depth.device),
        latent=flat(latent.float()),
        depth=depth * measured,
        confidence=measured.float(),
    )
