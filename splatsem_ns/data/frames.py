"""Between a capture's own frame and nerfstudio's dataparser frame.

nerfstudio's dataparser moves a capture into its own frame: ``p' = scale * (R p + t)`` (``transform`` = ``[R | t]``,
from the dataparser outputs). Networks trained across scenes (semantic-splat, the Chorus encoder) work in each
scene's own metric frame, per-scene models in the dataparser's; these move cameras and Gaussians between the two.
"""

from __future__ import annotations

from typing import Tuple

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.feedforward.cameras import quaternion_multiply, rotation_to_quaternion


def to_metric_frame(
    camera_to_world: Float[Tensor, "N 3 4"], transform: Float[Tensor, "3 4"], scale: float
) -> Float[Tensor, "N 4 4"]:
    """Cameras of nerfstudio's dataparser frame (``p' = scale * (R p + t)``) back in the scene's own frame."""
    rotation, translation = transform[:, :3].double(), transform[:, 3].double()
    c2w = camera_to_world.double()
    out = torch.eye(4, dtype=torch.float64).repeat(len(c2w), 1, 1)
    out[:, :3, :3] = rotation.T @ c2w[:, :3, :3]
    out[:, :3, 3] = (c2w[:, :3, 3] / scale - translation) @ rotation  # R^T (c / s - t)
    return out.float()


def to_dataparser_frame(
    means: Float[Tensor, "N 3"],
    scales: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    transform: Float[Tensor, "3 4"],
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gaussians of the scene's frame (positive scales, wxyz quaternions) in the dataparser frame."""
    rotation, translation = transform[:, :3].to(means), transform[:, 3].to(means)
    moved = scale * (means @ rotation.T + translation)
    turned = quaternion_multiply(rotation_to_quaternion(rotation)[None].expand_as(quats), quats)
    return moved, scales * scale, turned


def to_scene_frame(
    means: Float[Tensor, "N 3"],
    log_scales: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    transform: Float[Tensor, "3 4"],
    scale: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gaussians of nerfstudio's dataparser frame (``p' = scale * (R p + t)``) back in the scene's own frame
    (log scales, wxyz quaternions): the inverse of ``to_dataparser_frame``."""
    rotation, translation = transform[:, :3].to(means), transform[:, 3].to(means)
    moved = (means / scale - translation) @ rotation  # R^T (p' / s - t)
    back = rotation_to_quaternion(rotation.T)[None].expand_as(quats)
    return (
        moved,
        log_scales - torch.log(torch.tensor(scale, dtype=means.dtype)),
        quaternion_multiply(back, quats),
    )
