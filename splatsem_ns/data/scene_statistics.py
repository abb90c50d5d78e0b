"""Simple statistics of a scene, to set generated scenes beside real captures (a realism check, not a metric).

- depth: percentiles of the measured depth (metres), and the fraction of pixels without a measurement;
- classes: the share of each class among the labelled surface points (``points_labeled.ply``), which both the
  generator and ScanNet exports have;
- colour: per-channel mean and standard deviation of the images, their mean saturation and the mean image
  gradient (texture);
- views per surface point: of the labelled points, how many views see each (projected, depth-tested), as
  percentiles: how densely a capture covers its surfaces.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.scene_frames import SceneFrames
from splatsem_ns.data.view_sampling import views_seeing

STATS_SIZE = (120, 160)
"""(height, width) the views are read at for the statistics."""


def scene_statistics(
    scene_dir: Path,
    class_names: Optional[Dict[int, str]] = None,
    max_views: int = 60,
    max_points: int = 20000,
) -> Dict[str, object]:
    """The statistics of one scene (see the module docstring); views and points are subsampled evenly."""
    frames = SceneFrames.load(Path(scene_dir))
    picked = np.unique(np.linspace(0, len(frames) - 1, min(max_views, len(frames))).astype(int))
    views = [frames.load_view(int(i), STATS_SIZE, labels=False) for i in picked]
    images = np.stack([v.image for v in views]).astype(np.float64) / 255.0
    stats: Dict[str, object] = {
        "views": len(frames),
        "colour_mean": images.mean(axis=(0, 1, 2)).round(3).tolist(),
        "colour_std": images.std(axis=(0, 1, 2)).round(3).tolist(),
        "saturation_mean": round(float((images.max(-1) - images.min(-1)).mean()), 3),
        "gradient_mean": round(float(np.abs(np.diff(images.mean(-1), axis=2)).mean()), 4),
    }
    if frames.has_depth:
        depth = np.stack([v.depth for v in views])
        measured = depth[depth > 0]
        stats["depth_missing"] = round(float((depth <= 0).mean()), 3)
        stats["depth_percentiles_m"] = {
            str(p): round(float(np.percentile(measured, p)), 2) for p in (5, 25, 50, 75, 95)
        }
    points_path = Path(scene_dir) / "points_labeled.ply"
    if points_path.is_file():
        cloud = read_point_cloud(points_path)
        rng = np.random.default_rng(0)
        keep = rng.choice(len(cloud), size=min(max_points, len(cloud)), replace=False)
        if cloud.labels is not None:
            counts = Counter(int(label) for label in cloud.labels[keep] if int(label) != 0)
            total = sum(counts.values()) or 1
            names = class_names or {}
            stats["class_shares"] = {
                names.get(k, str(k)): round(v / total, 4) for k, v in counts.most_common()
            }
        if frames.has_depth:
            seen = _views_per_point(cloud.xyz[keep], views)
            stats["views_per_point"] = {str(p): float(np.percentile(seen, p)) for p in (10, 50, 90)}
            stats["points_unseen"] = round(float((seen == 0).mean()), 3)
            stats["views_per_point_scale"] = f"{len(views)} of {len(frames)} views checked"
    return stats


def _views_per_point(points: np.ndarray, views) -> np.ndarray:
    """How many of ``views`` see each point: inside the image and within 5 cm (+5%) of the measured depth."""
    return views_seeing(points, ((view.intrinsics, view.camera_to_world, view.depth) for view in views))
