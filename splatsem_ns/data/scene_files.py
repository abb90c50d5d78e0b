"""Writing a generated view into a nerfstudio scene folder: its image files, its frame entry, its seed points.

The single demo room (``synthetic``) and the procedural collections (``procedural``) write the same layout::

    images/NNNN.png      RGB uint8
    depth/NNNN.png       z-depth, uint16 millimetres (depth_unit_scale_factor 0.001)
    labels/NNNN.png      class id per pixel, uint16
    instances/NNNN.png   instance id per pixel, uint16
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Tuple

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


def write_classes(out_dir: Path, names: Dict[int, str]) -> None:
    """``classes.json``: class id -> name of the label images and labelled points."""
    (out_dir / "classes.json").write_text(json.dumps({str(k): v for k, v in names.items()}, indent=1) + "\n")


def pinhole_transforms(
    width: int, height: int, focal: float, frames: List[Dict[str, object]], **extra: object
) -> Dict[str, object]:
    """transforms.json of a generated scene: one undistorted pinhole camera (principal point at the image centre),
    millimetre depth, the seed and labelled point clouds and the class table beside it, then ``extra`` entries
    (what generated the scene) and the frames."""
    return {
        "camera_model": "OPENCV",
        "w": width,
        "h": height,
        "fl_x": focal,
        "fl_y": focal,
        "cx": width / 2.0,
        "cy": height / 2.0,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "depth_unit_scale_factor": 0.001,
        "ply_file_path": "points3D.ply",
        "labeled_ply_file_path": "points_labeled.ply",
        "classes_file_path": "classes.json",
        **extra,
        "frames": frames,
    }
