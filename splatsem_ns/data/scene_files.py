"""Writing a generated view into a nerfstudio scene folder: its image files, its frame entry, its seed points.

The single demo room (``synthetic``) and the procedural collections (``procedural``) write the same layout::

    images/NNNN.png      RGB uint8
    depth/NNNN.png       z-depth, uint16 millimetres (depth_unit_scale_factor 0.001)
    labels/NNNN.png      class id per pixel, uint16
    instances/NNNN.png   instance id per pixel, uint16
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
from jaxtyping import Float, Int, UInt8

SavePng = Callable[[Path, np.ndarray], None]
"""Writes one array as a PNG (the caller picks the compression)."""


def write_view_files(
    out_dir: Path,
    name: str,
    rgb: UInt8[np.ndarray, "H W 3"],
    depth: Float[np.ndarray, "H W"],
    labels: Int[np.ndarray, "H W"],
    instances: Int[np.ndarray, "H W"],
    camera_to_world: Float[np.ndarray, "4 4"],
    save: SavePng,
) -> Dict[str, object]:
    """Write one view's four images (depth in millimetres, clipped to uint16) and return its transforms.json frame."""
    save(out_dir / "images" / name, rgb)
    depth_mm = np.clip(np.round(depth * 1000.0), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    save(out_dir / "depth" / name, depth_mm)
    save(out_dir / "labels" / name, labels.astype(np.uint16))
    save(out_dir / "instances" / name, instances.astype(np.uint16))
    return {
        "file_path": f"images/{name}",
        "depth_file_path": f"depth/{name}",
        "semantic_file_path": f"labels/{name}",
        "instance_file_path": f"instances/{name}",
        "transform_matrix": [[float(x) for x in row] for row in camera_to_world],
    }


def seed_points_of_view(
    rng: np.random.Generator,
    rgb: UInt8[np.ndarray, "H W 3"],
    depth: Float[np.ndarray, "H W"],
    camera_to_world: Float[np.ndarray, "4 4"],
    focal: float,
    count: int,
    noise: float,
) -> Tuple[Float[np.ndarray, "N 3"], UInt8[np.ndarray, "N 3"]]:
    """``count`` seed points of one view that mimic an SfM cloud: surfaces the camera saw (random pixels placed at
    their exact depth; principal point at the image centre), with Gaussian noise of ``noise`` metres."""
    height, width = depth.shape
    cx, cy = width / 2.0, height / 2.0
    num_pixels = width * height
    pick = rng.choice(num_pixels, size=count, replace=count > num_pixels)
    jj, ii = np.divmod(pick, width)
    d_cam = np.stack([(ii + 0.5 - cx) / focal, -(jj + 0.5 - cy) / focal, -np.ones(len(pick))], axis=-1)
    points = camera_to_world[:3, 3] + depth[jj, ii, None] * (d_cam @ camera_to_world[:3, :3].T)
    return points + rng.normal(scale=noise, size=points.shape), rgb[jj, ii]
