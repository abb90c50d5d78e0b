"""Camera conventions of the feed-forward network, in one place.

Inputs follow nerfstudio (and the multi-scene datamanager): ``camera_to_world`` is OpenGL (x right, y up, the
camera looks down -z), intrinsics are pinhole in pixels at the image size, a pixel's centre sits at +0.5 and depth
is z-depth (distance along the optical axis), exactly as ``splatsem_ns.data.depth.pixels_to_world``. Internally the
geometry is written once in OpenCV (x right, y down, looks down +z), the convention of the rasterizer's viewmats and
of ``K @ X`` projection, so every function below converts at its boundary and nowhere else.

This module repeats the few lines of ``pixels_to_world`` rather than importing ``splatsem_ns.data.depth``: that
module pulls in nerfstudio, and the network must stay importable with torch alone (tests check both agree).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.feedforward.constants import device_constant

OPENGL_TO_OPENCV = (1.0, -1.0, -1.0)
"""Per-axis sign flip between the camera frames: OpenCV's y and z axes are OpenGL's negated."""


def opengl_to_opencv(camera_to_world: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """The same camera pose with an OpenCV camera frame: its rotation's y and z columns negated."""
    flip = device_constant((*OPENGL_TO_OPENCV, 1.0), camera_to_world.device, camera_to_world.dtype)
    return camera_to_world * flip


def rigid_inverse(transform: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """Inverse of a rigid transform ``[R t; 0 1]``: ``[R^T -R^T t; 0 1]`` (exact, unlike a general inverse)."""
    rotation = transform[..., :3, :3].transpose(-1, -2)
    translation = -(rotation @ transform[..., :3, 3:4])
    out = torch.zeros_like(transform)
    out[..., :3, :3] = rotation
    out[..., :3, 3:4] = translation
    out[..., 3, 3] = 1.0
    return out


def world_to_camera_viewmat(camera_to_world: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """OpenGL camera-to-world -> the OpenCV world-to-camera ``viewmat`` that ``rasterize_gaussians`` takes (what
    splatfacto's ``get_viewmat`` computes)."""
    return rigid_inverse(opengl_to_opencv(camera_to_world))


def scale_intrinsics(
    intrinsics: Float[Tensor, "*batch 3 3"], scale_x: float, scale_y: float
) -> Float[Tensor, "*batch 3 3"]:
    """Intrinsics of the same camera on a grid resized by (``scale_x``, ``scale_y``). With pixel centres at +0.5,
    continuous pixel coordinates scale linearly, so the focal lengths and the principal point simply scale."""
    scaled = intrinsics.clone()  # scaled by Python numbers: no small tensor to copy to the device
    scaled[..., 0, :] *= scale_x
    scaled[..., 1, :] *= scale_y
    return scaled


def pixel_centres(
    height: int, width: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "H W 2"]:
    """(u, v) of every pixel centre: u = column + 0.5 (right), v = row + 0.5 (down)."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def unproject_depth(
    depth: Float[Tensor, "*batch H W"],
    intrinsics: Float[Tensor, "*batch 3 3"],
    camera_to_world: Float[Tensor, "*batch 4 4"],
    pixel_offset: Optional[Float[Tensor, "*batch H W 2"]] = None,
) -> Float[Tensor, "*batch H W 3"]:
    """World points at z-depth ``depth`` through every pixel centre (OpenGL ``camera_to_world``), the batched form of
    ``pixels_to_world``: camera centre + depth * ray, where the ray has unit z-extent.

    ``pixel_offset`` (pixels, u right and v down) moves each ray within its pixel, the learned sub-pixel offset of
    the Gaussian head; zero gives the pixel centres themselves.
    """
    height, width = depth.shape[-2:]
    uv = pixel_centres(height, width, depth.device, depth.dtype)
    if pixel_offset is not None:
        uv = uv + pixel_offset
    fx, fy = intrinsics[..., 0, 0, None, None], intrinsics[..., 1, 1, None, None]
    cx, cy = intrinsics[..., 0, 2, None, None], intrinsics[..., 1, 2, None, None]
    # OpenGL camera frame: y up, looking down -z (the same expression as pixels_to_world).
    camera_points = torch.stack(
        [(uv[..., 0] - cx) / fx * depth, -(uv[..., 1] - cy) / fy * depth, -depth], dim=-1
    )
    pose = camera_to_world.to(depth.dtype)
    rotation = pose[..., None, None, :3, :3]
    return (rotation @ camera_points[..., None])[..., 0] + pose[..., None, None, :3, 3]


def pixel_footprint(
    depth: Float[Tensor, "*batch H W"], intrinsics: Float[Tensor, "*batch 3 3"]
) -> Float[Tensor, "*batch H W"]:
    """A pixel's width at z-depth ``depth`` in world units: depth over the focal length (the mean of the two axes')."""
    inverse_focal = 0.5 * (1.0 / intrinsics[..., 0, 0] + 1.0 / intrinsics[..., 1, 1])
    return depth * inverse_focal[..., None, None]


def rotation_to_quaternion(rotation: Float[Tensor, "*batch 3 3"]) -> Float[Tensor, "*batch 4"]:
    """Unit quaternion (wxyz, w >= 0) of a rotation matrix.

    Each of the four textbook formulas divides by one of 4w^2, 4x^2, 4y^2, 4z^2; the largest of them is taken per
    matrix, so no rotation (180-degree turns included) divides by a small number.
    """
    m = rotation
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    squares = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )  # 4w^2, 4x^2, 4y^2, 4z^2
    candidates = torch.stack(
        [
            torch.stack([squares[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, squares[..., 1], m01 + m10, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m01 + m10, squares[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m02 + m20, m12 + m21, squares[..., 3]], dim=-1),
        ],
        dim=-2,
    )  # row i is 4 * q * (its i-th component)
    best = squares.argmax(dim=-1)
    chosen = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    quaternion = chosen / (2.0 * squares.gather(-1, best[..., None]).clamp_min(1e-12).sqrt())
    return quaternion * torch.where(quaternion[..., :1] < 0, -1.0, 1.0)


def quaternion_multiply(
    a: Float[Tensor, "*batch 4"], b: Float[Tensor, "*batch 4"]
) -> Float[Tensor, "*batch 4"]:
    """Hamilton product ``a * b`` of wxyz quaternions: the rotation ``b`` followed by ``a``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )
