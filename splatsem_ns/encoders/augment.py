"""Random transforms of a 3D encoder's inputs during pretraining (Pointcept-style scene augmentation).

Only what the encoder sees is transformed: chorus-pretrain still renders each Gaussian's latent with the Gaussian's
true geometry, so the encoder learns features that do not depend on where the scene sits on its voxel grid, how it is
turned about the vertical, its exact size, or its colour balance.

Why it matters here: generated rooms put floors, walls and table tops at exact coordinates, so their points share a
few positions inside their 2 cm voxels (in one room 40% of the height offsets fall in one tenth of the voxel, against
an even spread in ScanNet). Position channels relative to the voxel let the encoder key on that, and real scans
never show it. A random shift of the whole scene (a voxel or more), a turn about the up axis, a small scale change
and per-point jitter take it away; colour changes stand in for the gap between generated textures and real photos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from gsplat.utils import normalized_quat_to_rotmat
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.encoders.inputs import SH_C0
from splatsem_ns.feedforward.cameras import quaternion_multiply


@dataclass
class InputAugmentationConfig:
    """Per-scene random transforms of the encoder's inputs (each scene of a batch draws its own)."""

    enabled: bool = True
    """Apply them (training only; evaluation and encoding always see the scene as it is)."""
    up_axis: int = 2
    """Index of the vertical axis of the served Gaussians (2: z up, as ScanNet and the generated rooms)."""
    rotate: bool = True
    """Turn each scene by a uniform random angle about ``up_axis``."""
    scale_range: Tuple[float, float] = (0.9, 1.1)
    """Uniform random factor on positions and Gaussian sizes; (1, 1): none."""
    shift: float = 1.0
    """Uniform random shift of each scene along every axis, in scene units, up to this (more than a voxel, so the
    scene's surfaces land anywhere inside their voxels); 0: none."""
    jitter: float = 0.005
    """Standard deviation of per-point Gaussian noise on positions, in scene units (clipped at four times it)."""
    colour_contrast: float = 0.2
    """Per-scene, per-channel gain about mid-grey, uniform in [1 - this, 1 + this]."""
    colour_shift: float = 0.05
    """Per-scene, per-channel offset of RGB in [0, 1], uniform in [-this, this]."""
    colour_noise: float = 0.01
    """Standard deviation of per-point RGB noise."""


def _up_rotation_quaternions(angles: Float[Tensor, " B"], up_axis: int) -> Float[Tensor, "B 4"]:
    """Unit quaternions (w, x, y, z) of turns by ``angles`` about coordinate axis ``up_axis``."""
    quats = torch.zeros(angles.shape[0], 4, dtype=angles.dtype, device=angles.device)
    quats[:, 0] = torch.cos(angles / 2)
    quats[:, 1 + up_axis] = torch.sin(angles / 2)
    return quats


def augment_inputs(
    gaussians: Mapping[str, Tensor],
    batch: Int[Tensor, " N"],
    batch_size: int,
    config: InputAugmentationConfig,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """``gaussians`` (means, features_dc, opacities, scales, quats of one or several scenes, ``batch`` naming each
    Gaussian's scene) with each scene randomly transformed as ``config`` says. Opacities are left as they are."""
    means = gaussians["means"].float()
    device, dtype = means.device, means.dtype

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=device, dtype=dtype) * (high - low) + low

    out = {k: v for k, v in gaussians.items()}
    angles = (
        uniform(0.0, 2 * math.pi, batch_size) if config.rotate else torch.zeros(batch_size, device=device)
    )
    turn = _up_rotation_quaternions(angles, config.up_axis)  # [B, 4]
    # The positions turn by the matrix of the very quaternion that turns the Gaussians' own rotations.
    rotation = normalized_quat_to_rotmat(turn)[batch]  # [N, 3, 3]
    factor = uniform(*config.scale_range, batch_size)
    shift = (
        uniform(-config.shift, config.shift, batch_size, 3)
        if config.shift > 0
        else means.new_zeros(batch_size, 3)
    )
    moved = torch.einsum("nij,nj->ni", rotation, means) * factor[batch, None] + shift[batch]
    if config.jitter > 0:
        noise = torch.randn(means.shape, generator=generator, device=device, dtype=dtype) * config.jitter
        moved = moved + noise.clamp(-4 * config.jitter, 4 * config.jitter)
    out["means"] = moved
    out["scales"] = gaussians["scales"].float() + torch.log(factor)[batch, None]
    out["quats"] = quaternion_multiply(turn[batch], gaussians["quats"].float())

    dc = gaussians["features_dc"].float()
    rgb = dc.reshape(dc.shape[0], 3) * SH_C0 + 0.5
    gain = uniform(1 - config.colour_contrast, 1 + config.colour_contrast, batch_size, 3)
    offset = uniform(-config.colour_shift, config.colour_shift, batch_size, 3)
    rgb = (rgb - 0.5) * gain[batch] + 0.5 + offset[batch]
    if config.colour_noise > 0:
        rgb = (
            rgb
            + torch.randn(rgb.shape, generator=generator, device=device, dtype=dtype) * config.colour_noise
        )
    out["features_dc"] = ((rgb.clamp(0.0, 1.0) - 0.5) / SH_C0).reshape(dc.shape)
    return out
