"""Per-Gaussian (or per-point) input features of a 3D encoder, with a fixed, documented channel layout.

Gaussian variant (Chorus' scene-encoder inputs), 14 channels, from splatfacto-style parameters:

    0:3    position     (mean - reference) / scale: by default the offset from the centre of the Gaussian's voxel
                        in voxel units, in [-0.5, 0.5), so the network stays translation invariant and Gaussians
                        sharing a voxel still differ
    3:6    colour       RGB in [0, 1] from the SH DC coefficients (``features_dc * C0 + 0.5``, clamped)
    6      opacity      ``sigmoid(opacity logit)``
    7:10   log-scales   as splatfacto stores them (natural log of the axis lengths, scene units)
    10:14  rotation     unit quaternion (w, x, y, z) with w >= 0 (q and -q are the same rotation)

Point-cloud variant, 9 channels: position (as above), RGB colour, unit normal (PCA of the k nearest neighbours,
oriented towards the scene's bounding-box centre, when the cloud has none).
"""

from __future__ import annotations

from typing import Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

SH_C0 = 0.28209479177387814
"""Zeroth-order real spherical harmonic, ``1 / (2 sqrt(pi))``: RGB = DC * C0 + 0.5 (gsplat and splatfacto)."""

InputVariant = Literal["gaussian", "point"]

GAUSSIAN_CHANNELS: Tuple[str, ...] = (
    "pos_x", "pos_y", "pos_z", "red", "green", "blue", "opacity",
    "log_scale_0", "log_scale_1", "log_scale_2", "quat_w", "quat_x", "quat_y", "quat_z",
)  # fmt: skip
"""Names of the Gaussian variant's channels, in order."""
POINT_CHANNELS: Tuple[str, ...] = (
    "pos_x",
    "pos_y",
    "pos_z",
    "red",
    "green",
    "blue",
    "normal_x",
    "normal_y",
    "normal_z",
)
"""Names of the point-cloud variant's channels, in order."""
INPUT_CHANNELS: Dict[str, Tuple[str, ...]] = {"gaussian": GAUSSIAN_CHANNELS, "point": POINT_CHANNELS}


def sh_dc_to_rgb(features_dc: Float[Tensor, "N ..."]) -> Float[Tensor, "N 3"]:
    """RGB in [0, 1] of SH DC coefficients (``[N, 3]`` or splatfacto's ``[N, 1, 3]``)."""
    return (features_dc.reshape(features_dc.shape[0], 3) * SH_C0 + 0.5).clamp(0.0, 1.0)


def canonical_quaternions(quats: Float[Tensor, "N 4"]) -> Float[Tensor, "N 4"]:
    """Unit quaternions (w, x, y, z) with w >= 0, so each rotation has one representative."""
    unit = F.normalize(quats, dim=-1, eps=1e-12)
    return torch.where(unit[:, :1] < 0, -unit, unit)


def relative_positions(
    means: Float[Tensor, "N 3"], reference: Optional[Float[Tensor, "N 3"]] = None, scale: float = 1.0
) -> Float[Tensor, "N 3"]:
    """``(means - reference) / scale`` (``reference`` defaults to the origin)."""
    return (means if reference is None else means - reference) / scale


def gaussian_input_features(
    means: Float[Tensor, "N 3"],
    features_dc: Float[Tensor, "N ..."],
    opacities: Float[Tensor, "N ..."],
    scales: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    reference: Optional[Float[Tensor, "N 3"]] = None,
    scale: float = 1.0,
) -> Float[Tensor, "N 14"]:
    """The 14-channel Gaussian features (layout in the module docstring) from splatfacto parameters: opacities
    as logits, scales as logs, quaternions (w, x, y, z) of any norm."""
    num = means.shape[0]
    return torch.cat(
        [
            relative_positions(means, reference, scale),
            sh_dc_to_rgb(features_dc),
            torch.sigmoid(opacities.reshape(num, 1)),
            scales,
            canonical_quaternions(quats),
        ],
        dim=1,
    )


def point_input_features(
    points: Float[Tensor, "N 3"],
    colors: Float[Tensor, "N 3"],
    normals: Optional[Float[Tensor, "N 3"]] = None,
    reference: Optional[Float[Tensor, "N 3"]] = None,
    scale: float = 1.0,
    batch: Optional[Int[Tensor, " N"]] = None,
    num_neighbours: int = 16,
) -> Float[Tensor, "N 9"]:
    """The 9-channel point-cloud features: position, RGB colour in [0, 1], unit normal (estimated when
    ``normals`` is None)."""
    if normals is None:
        normals = estimate_normals(points, num_neighbours, batch)
    return torch.cat(
        [relative_positions(points, reference, scale), colors, F.normalize(normals, dim=-1)], dim=1
    )


def estimate_normals(
    points: Float[Tensor, "N 3"],
    num_neighbours: int = 16,
    batch: Optional[Int[Tensor, " N"]] = None,
    chunk_size: int = 512,
) -> Float[Tensor, "N 3"]:
    """Unit normals by PCA of each point's ``num_neighbours`` nearest neighbours (itself included) in its scene.

    Brute-force k-NN in chunks of ``chunk_size`` query points (memory ``chunk_size * N``, time ``O(N^2)``: fine
    for a few hundred thousand points on a GPU, slow on a CPU). The eigenvector of the smallest covariance
    eigenvalue is the normal; its sign is chosen to face the scene's bounding-box centre (indoor scans are seen
    from inside, so walls and floors face the room).
    """
    if batch is None:
        batch = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    normals = torch.zeros_like(points)
    for scene in torch.unique(batch).tolist():
        rows = torch.nonzero(batch == scene).squeeze(1)
        normals[rows] = _scene_normals(points[rows], num_neighbours, chunk_size)
    return normals


def _scene_normals(
    points: Float[Tensor, "N 3"], num_neighbours: int, chunk_size: int
) -> Float[Tensor, "N 3"]:
    k = min(num_neighbours, points.shape[0])
    centre = (points.amin(dim=0) + points.amax(dim=0)) / 2
    normals = []
    for start in range(0, points.shape[0], chunk_size):
        query = points[start : start + chunk_size]
        neighbours = torch.cdist(query, points).topk(k, dim=1, largest=False).indices
        local = points[neighbours]  # [chunk, k, 3]
        local = local - local.mean(dim=1, keepdim=True)
        covariance = local.transpose(1, 2) @ local / max(k - 1, 1)
        _, vectors = torch.linalg.eigh(covariance.double())  # double: stable for nearly planar patches
        normal = vectors[:, :, 0].to(points.dtype)
        facing = ((centre - query) * normal).sum(dim=1, keepdim=True)
        normals.append(torch.where(facing < 0, -normal, normal))
    return torch.cat(normals) if normals else points.new_zeros(0, 3)
