"""Sensor depth: reading depth images, and seed points for the Gaussians from RGB-D training views.

Without a seed point cloud splatfacto scatters its initial Gaussians at random in a cube. On sparse
indoor captures that leaves held-out views poorly reconstructed, and every Gaussian's latent inherits
the wrong geometry. Where the capture has depth (ScanNet, 7-Scenes, phone RGB-D apps), back-projecting
the training views' depth gives a seed cloud on the observed surfaces instead, the RGB-D counterpart of
the SfM points splatfacto starts from elsewhere. Only training views are used: held-out views stay unseen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Set, Tuple

import numpy as np
import torch
from jaxtyping import Float, UInt8
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image
from torch import Tensor

DEPTH_SERVED_KEY = "depth_images_served"
"""Training-dataset metadata key: True when the datamanager serves every training view's sensor depth (so a
model's depth loss can run)."""


ASPECT_TOLERANCE = 0.02
"""Largest relative difference between a depth image's aspect ratio and its colour image's for the depth to be
resampled onto the colour pixels. ScanNet's 640 x 480 depth beside 648 x 484 (or 1296 x 968) colour differs by
0.4%; a transposed or cropped depth image differs by far more and would put every depth at the wrong pixel."""

_warned_scales: Set[Tuple[Tuple[int, int], Tuple[int, int]]] = set()
"""(depth size, colour size) pairs already reported, so a run says it once, not once per image."""


def check_depth_size(path: Path, depth_size: Tuple[int, int], image_size: Tuple[int, int]) -> bool:
    """Whether a depth image of ``depth_size`` (H, W) must be resampled to its colour image's ``image_size``.

    Another scale at the same aspect ratio (within ``ASPECT_TOLERANCE``) is resampled, with a warning the first
    time a run meets that pair of sizes. Another aspect ratio is an error naming the file: resampling would
    stretch the depth over the wrong pixels.
    """
    depth_size, image_size = tuple(map(int, depth_size)), tuple(map(int, image_size))
    if depth_size == image_size:
        return False
    (dh, dw), (ih, iw) = depth_size, image_size
    depth_aspect, image_aspect = dw / dh, iw / ih
    if abs(depth_aspect / image_aspect - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"Depth image {path} is {dw}x{dh} (aspect {depth_aspect:.3f}) but its colour image is {iw}x{ih} (aspect "
            f"{image_aspect:.3f}): another shape, not another scale (transposed or cropped?). Depth must cover the "
            "colour image's field of view; register it to the colour camera first."
        )
    if (depth_size, image_size) not in _warned_scales:
        _warned_scales.add((depth_size, image_size))
        CONSOLE.log(
            f"[yellow]Depth images are {dw}x{dh} and colour images {iw}x{ih}: depth is resampled (nearest) to the "
            f"colour size (first: {path})."
        )
    return True


def load_depth_image(path: Path, size: Tuple[int, int], scale: float) -> torch.Tensor:
    """A depth PNG (integer units, 0 = no measurement) as float16 [H, W] in scene units at ``size``.

    Nearest-neighbour resampling: averaging would mix missing (0) pixels and depth edges into false depths. A depth
    image of another aspect ratio than ``size`` is an error (``check_depth_size``).
    """
    try:
        array = np.asarray(Image.open(path), dtype=np.float32)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read depth image {path}: {err}") from err
    if array.ndim != 2:
        raise ValueError(f"Depth image {path} has shape {array.shape}; expected a single channel.")
    depth = torch.from_numpy(array * scale)
    if check_depth_size(path, tuple(depth.shape), size):
        depth = torch.nn.functional.interpolate(depth[None, None], size=size, mode="nearest")[0, 0]
    return depth.to(torch.float16)


def backproject_depth(
    depth: Float[Tensor, "H W"],
    rgb: UInt8[Tensor, "H W 3"],
    intrinsics: Tuple[float, float, float, float],
    camera_to_world: Float[Tensor, "3 4"],
    stride: int,
) -> Tuple[Float[Tensor, "N 3"], UInt8[Tensor, "N 3"]]:
    """World points and colours of every ``stride``-th pixel with a depth measurement.

    nerfstudio's camera convention (OpenGL): x right, y up, the camera looks down -z; pixel centres at +0.5.
    ``depth`` is the distance along the optical axis (z-depth), as RGB-D sensors store it.
    """
    d = depth[::stride, ::stride].float()
    v, u = torch.meshgrid(
        torch.arange(0, depth.shape[0], stride, dtype=torch.float32),
        torch.arange(0, depth.shape[1], stride, dtype=torch.float32),
        indexing="ij",
    )
    valid = torch.isfinite(d) & (d > 0)
    d, u, v = d[valid], u[valid], v[valid]
    world = pixels_to_world(u + 0.5, v + 0.5, d, intrinsics, camera_to_world)
    return world, rgb[::stride, ::stride][valid]


def pixels_to_world(
    u: Float[Tensor, " N"],
    v: Float[Tensor, " N"],
    depth: Float[Tensor, " N"],
    intrinsics: Tuple[float, float, float, float],
    camera_to_world: Float[Tensor, "3 4"],
) -> Float[Tensor, "N 3"]:
    """World points at image positions (``u`` right, ``v`` down, in pixels; a pixel's centre is at +0.5) and
    z-depth ``depth``, in nerfstudio's camera convention (OpenGL: x right, y up, the camera looks down -z).
    Computed in ``depth``'s dtype."""
    fx, fy, cx, cy = intrinsics
    camera_points = torch.stack([(u - cx) / fx * depth, -(v - cy) / fy * depth, -depth], dim=-1)
    pose = camera_to_world.to(depth.dtype)
    return camera_points @ pose[:3, :3].T + pose[:3, 3]


def voxel_downsample(
    xyz: Float[Tensor, "N 3"], rgb: UInt8[Tensor, "N 3"], voxel: float
) -> Tuple[Float[Tensor, "M 3"], UInt8[Tensor, "M 3"]]:
    """One point per occupied voxel: the mean position and colour of the points that fall in it."""
    keys = torch.floor(xyz / voxel).long()
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    n = int(counts.shape[0])
    mean_xyz = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, inverse, xyz.double())
    mean_rgb = torch.zeros(n, 3, dtype=torch.float64).index_add_(0, inverse, rgb.double())
    denominator = counts[:, None].double()
    return (mean_xyz / denominator).float(), (mean_rgb / denominator).round().clamp(0, 255).to(torch.uint8)


def depth_seed_points(
    cameras,
    image_filenames: Sequence[Path],
    depth_filenames: Sequence[Path],
    depth_scale: float,
    stride: int,
    voxel: float,
) -> Tuple[Float[Tensor, "N 3"], UInt8[Tensor, "N 3"]]:
    """Seed points (dataparser frame) from the depth of the given views.

    ``cameras``: nerfstudio Cameras of those views, in the dataparser frame; ``depth_scale`` turns depth
    image units into that frame's units; ``voxel`` is in the same units.
    """
    points, colours = [], []
    for i, (image_path, depth_path) in enumerate(zip(image_filenames, depth_filenames, strict=True)):
        height, width = int(cameras.height[i]), int(cameras.width[i])
        image = Image.open(image_path).convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        xyz, rgb = backproject_depth(
            load_depth_image(Path(depth_path), (height, width), depth_scale),
            torch.from_numpy(np.array(image)),
            (float(cameras.fx[i]), float(cameras.fy[i]), float(cameras.cx[i]), float(cameras.cy[i])),
            cameras.camera_to_worlds[i],
            stride,
        )
        points.append(xyz)
        colours.append(rgb)
    xyz, rgb = voxel_downsample(torch.cat(points), torch.cat(colours), voxel)
    CONSOLE.log(
        f"Seed points from the depth of {len(points)} training views: {len(xyz)} (voxel {voxel:.4g})."
    )
    return xyz, rgb
