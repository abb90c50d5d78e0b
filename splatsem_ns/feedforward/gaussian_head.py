"""Per-pixel Gaussians from depth and features: geometry (unprojection, scale, rotation), opacity and colour.

Every context pixel becomes one Gaussian whose centre is the camera centre plus the predicted z-depth times the
pixel's ray (``unproject_depth``, the same formula as ``pixels_to_world``), optionally moved by a learned sub-pixel
offset along the image plane. Quantities that should not depend on where the world frame is are predicted in the
camera frame and turned into world quantities with the camera pose: the scale is a learned multiple of the pixel's
footprint at its depth (depth / focal length), the rotation and the higher SH bands are camera-relative and rotated
by the camera-to-world rotation. The colour's DC term starts from the pixel's own colour, so an untrained head
already renders the context images back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _eval_sh_bases_fast
from jaxtyping import Float
from torch import Tensor, nn

from splatsem_ns.feedforward.cameras import (
    opengl_to_opencv,
    pixel_footprint,
    quaternion_multiply,
    rotation_to_quaternion,
    unproject_depth,
)
from splatsem_ns.feedforward.constants import device_constant

SH_C0 = 0.28209479177387814
"""The degree-0 SH basis constant: colour = SH_C0 * dc + 0.5 (gsplat's and splatfacto's RGB2SH convention)."""
MAX_SH_DEGREE = 3


@dataclass
class GaussianHeadConfig:
    """Heads that turn per-pixel depth and features into Gaussian parameters."""

    sh_degree: int = 0
    """Degree of the colour's spherical harmonics (0 to 3)."""
    hidden_channels: int = 64
    """Width of the convolutional head."""
    max_pixel_offset: float = 0.5
    """Largest learned shift of a Gaussian's ray within the image plane, in pixels (0: rays through pixel centres)."""
    scale_min: float = 0.5
    """Smallest Gaussian scale, in pixel footprints (depth / focal length) (MVSplat: 0.5)."""
    scale_max: float = 15.0
    """Largest Gaussian scale, in pixel footprints (MVSplat: 15)."""
    scale_init: float = 1.0
    """Scale of an untrained head (raw output 0), in pixel footprints: about one pixel, so a fresh network renders
    its context views back sharply, and the rasterizer is not slowed by Gaussians many pixels wide."""

    def __post_init__(self) -> None:
        if not 0 <= self.sh_degree <= MAX_SH_DEGREE:
            raise ValueError(f"sh_degree must be in [0, {MAX_SH_DEGREE}], got {self.sh_degree}")
        if not 0 < self.scale_min < self.scale_init < self.scale_max:
            raise ValueError(
                "Need 0 < scale_min < scale_init < scale_max, got "
                f"{self.scale_min}, {self.scale_init} and {self.scale_max}"
            )

    @property
    def scale_logit_offset(self) -> float:
        """Added to the raw scale before the sigmoid, so that raw 0 gives ``scale_init``."""
        fraction = (self.scale_init - self.scale_min) / (self.scale_max - self.scale_min)
        return math.log(fraction / (1.0 - fraction))

    @property
    def num_sh_coefficients(self) -> int:
        return (self.sh_degree + 1) ** 2


def rgb_to_sh(rgb: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch 3"]:
    """Colour in [0, 1] -> degree-0 SH coefficient (splatfacto's ``RGB2SH``)."""
    return (rgb - 0.5) / SH_C0


def _sphere_directions(count: int, device: torch.device) -> Float[Tensor, "M 3"]:
    """Nearly uniform unit directions (a Fibonacci lattice): sample points for fitting SH rotations."""
    index = torch.arange(count, dtype=torch.float64, device=device) + 0.5
    z = 1.0 - 2.0 * index / count
    radius = torch.sqrt(1.0 - z * z)
    angle = torch.pi * (3.0 - 5.0**0.5) * index
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), z], dim=-1)


def sh_rotation_matrices(
    rotation: Float[Tensor, "*batch 3 3"], sh_degree: int
) -> Float[Tensor, "*batch K K"]:
    """Matrices that re-express SH coefficients (gsplat's real basis, K = (degree + 1)^2) under a rotation.

    For ``f(d) = sum_k c_k Y_k(d)`` defined on directions ``d`` of one frame, and ``rotation`` taking that frame to
    another, the coefficients ``M @ c`` describe the same function of the other frame's directions:
    ``sum_k (M c)_k Y_k(rotation @ d) = f(d)``. SH bands are closed under rotation, so evaluating both bases at
    enough directions and solving by least squares gives ``M`` exactly (up to rounding), for any degree, without
    Wigner-D formulas.
    """
    num = (sh_degree + 1) ** 2
    directions = _sphere_directions(4 * num + 16, rotation.device)  # [M, 3] in the target frame
    dtype = torch.float64
    basis = _eval_sh_bases_fast(num, directions)  # Y(d_target)  [M, K]
    # d_source = R^T d_target; row-vector form: d_target @ R.
    source_directions = directions @ rotation.to(dtype)  # [..., M, 3]
    source_basis = _eval_sh_bases_fast(num, source_directions)  # Y(R^T d_target)  [..., M, K]
    # Solve basis @ M = source_basis  ->  f(d_t) = Y(R^T d_t) c = Y(d_t) M c.
    matrices = torch.linalg.pinv(basis) @ source_basis
    return matrices.to(rotation.dtype)


class GaussianHead(nn.Module):
    """Refinement features + image + depth + confidence -> Gaussian parameters for every context pixel."""

    def __init__(self, config: GaussianHeadConfig, in_channels: int) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        # Output channels: pixel offset (2), opacity (1), scale (3), rotation (4), colour (3 per SH coefficient).
        self.split = (2, 1, 3, 4, 3 * config.num_sh_coefficients)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + 4, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, sum(self.split), 1),
        )

    def forward(
        self,
        features: Float[Tensor, "B V F H W"],
        images: Float[Tensor, "B V 3 H W"],
        depth: Float[Tensor, "B V H W"],
        confidence: Float[Tensor, "B V H W"],
        intrinsics: Float[Tensor, "B V 3 3"],
        camera_to_world: Float[Tensor, "B V 4 4"],
    ) -> Dict[str, Tensor]:
        """``images`` in [0, 1]; cameras OpenGL camera-to-world with intrinsics at H x W. Returns means, quats,
        scales, opacities, features_dc, features_rest, each [B, V, H, W, ...]."""
        batch, views, _, height, width = images.shape
        # The opacity sees the matching confidence: a confident match is likely a visible surface.
        inputs = torch.cat([features, images * 2.0 - 1.0, confidence[:, :, None]], dim=2)
        raw = self.net(inputs.flatten(0, 1)).unflatten(0, (batch, views)).permute(0, 1, 3, 4, 2)
        raw_offset, raw_opacity, raw_scale, raw_rotation, raw_colour = raw.split(self.split, dim=-1)

        config = self.config
        offset = config.max_pixel_offset * torch.tanh(raw_offset) if config.max_pixel_offset > 0 else None
        means = unproject_depth(depth, intrinsics, camera_to_world, offset)

        # A pixel's footprint at its depth, in world units (the mean of the two axes' footprints).
        footprint = pixel_footprint(depth, intrinsics)
        multiplier = config.scale_min + (config.scale_max - config.scale_min) * torch.sigmoid(
            raw_scale + config.scale_logit_offset
        )
        scales = footprint[..., None] * multiplier

        # Rotation: camera-relative (OpenCV camera frame), identity-biased, then composed with the camera's rotation.
        camera_rotation = opengl_to_opencv(camera_to_world)[..., :3, :3]
        local = F.normalize(
            raw_rotation + device_constant((1.0, 0.0, 0.0, 0.0), raw_rotation.device, raw_rotation.dtype),
            dim=-1,
        )
        camera_quaternion = rotation_to_quaternion(camera_rotation)[:, :, None, None].expand_as(local)
        quats = quaternion_multiply(camera_quaternion, local)

        colour = raw_colour.unflatten(-1, (config.num_sh_coefficients, 3))
        features_dc = rgb_to_sh(images.permute(0, 1, 3, 4, 2)) + colour[..., 0, :]
        features_rest = colour[..., 1:, :]
        if config.sh_degree > 0:
            # Higher bands are predicted in the camera frame; M maps them to world-frame coefficients.
            rotation = sh_rotation_matrices(camera_rotation, config.sh_degree)[..., 1:, 1:]  # [B, V, K, K]
            features_rest = torch.einsum("bvij,bvhwjc->bvhwic", rotation, features_rest)
        return {
            "means": means,
            "quats": quats,
            "scales": scales,
            "opacities": torch.sigmoid(raw_opacity[..., 0]),
            "features_dc": features_dc,
            "features_rest": features_rest,
        }
