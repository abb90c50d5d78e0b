"""Each scene's 3D Gaussians, served beside its views: the input of the Chorus encoder over Gaussians.

Where a scene's Gaussians come from (``MultiSceneDataManagerConfig.gaussians``):
- "ply": a fitted 3DGS file in the scene's folder (``gaussians_file``, e.g. a short splatfacto or chorus-splat fit
  exported there), in the scene's own frame, read with ``read_semantic_ply`` (any 3DGS PLY with SH colours);
- "points": the scene's seed point cloud (transforms.json's ``ply_file_path``) as small Gaussians, each as wide as
  the mean distance to its nearest neighbours, nearly opaque, coloured by its point, isotropic or flat along the
  surface (``point_shape``): what a scene without a fit still offers (Chorus also trains a point-cloud variant);
- "auto": the fitted file where a scene has one, else its points;
- "labeled_points": the scene's labelled point cloud (transforms.json's ``labeled_ply_file_path``, else
  ``points_labeled.ply``) the same way, its labels unused: a denser surface sample than the seed points (ScanNet's
  mesh vertices, a generated scene's surface samples), and the only cloud of a capture without seed points.

Each sample carries at most ``max_gaussians`` of them, so one large scene cannot blow up a batch: a seeded random
subset, or (``gaussian_subset`` "views") those the sample's views see, at full density (``subset_in_views``).
Batches join the scenes' Gaussians along the first axis with a ``batch`` index per Gaussian (Pointcept's layout),
which the encoder takes as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.models.splatfacto import RGB2SH
from torch import Tensor
from torch.utils.data import default_collate

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.scene_frames import labelled_points_path
from splatsem_ns.evaluation.voting import project_points
from splatsem_ns.export.semantic_ply import read_semantic_ply

GaussianSource = Literal["off", "auto", "ply", "points", "labeled_points"]
PointShape = Literal["ball", "surfel"]
GAUSSIAN_KEYS = ("means", "features_dc", "opacities", "scales", "quats")
"""What a served scene's Gaussians hold (splatfacto's parameters: opacity logits, log-scales, wxyz quaternions)."""


class SceneGaussiansError(ValueError):
    """A scene has no Gaussians of the asked kind."""


def points_as_gaussians(
    xyz: Float[np.ndarray, "N 3"],
    rgb: Optional[np.ndarray],
    neighbours: int = 4,
    opacity: float = 0.9,
    shape: PointShape = "ball",
    normal_neighbours: int = 16,
    flatness: float = 0.1,
) -> Dict[str, Tensor]:
    """Points as Gaussians as wide as the mean distance to their ``neighbours`` nearest points, opacity
    ``opacity``, colour from ``rgb`` (uint8; grey when None).

    ``shape`` "ball": isotropic, identity rotation. "surfel": a flat disc in the plane of the point's
    ``normal_neighbours`` nearest points (PCA), ``flatness`` times as thick as it is wide, its normal (the local
    z axis) facing the cloud's bounding-box centre: the orientation a fitted 3DGS has on a surface, which an
    isotropic ball hides from an encoder that reads rotations and scales (a floor and a wall then differ only by
    where their neighbours are; indoor scans are seen from inside, so a floor faces up and a ceiling down).
    """
    from scipy.spatial import cKDTree

    coordinates = np.asarray(xyz, dtype=np.float32)
    points = torch.as_tensor(coordinates)
    n = len(points)
    if n == 0:
        raise SceneGaussiansError("the point cloud is empty")
    if shape not in ("ball", "surfel"):
        raise ValueError(f"Unknown point shape '{shape}': use ball or surfel")
    quats = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4).contiguous()
    thickness = torch.ones(n, 3)
    if n == 1:
        spacing = torch.zeros(1)
    else:
        # A k-d tree, not all pairwise distances: this runs in the loader's workers for every sample, and a
        # 28k-point cloud took seconds per sample that way (O(N^2)), which starved the GPU.
        k = min(max(neighbours, normal_neighbours if shape == "surfel" else 0), n - 1)
        distances, nearest = cKDTree(coordinates).query(coordinates, k=k + 1)  # the first is the point itself
        spacing = torch.as_tensor(
            distances[:, 1 : min(neighbours, n - 1) + 1].mean(axis=1), dtype=torch.float32
        )
        if shape == "surfel" and n >= 3:
            quats = torch.as_tensor(_surfel_rotations(coordinates, nearest), dtype=torch.float32)
            thickness[:, 2] = flatness
    spacing = spacing.clamp_min(
        float(spacing[spacing > 0].median()) * 0.1 if bool((spacing > 0).any()) else 1e-3
    )
    colours = (
        torch.full((n, 3), 0.5)
        if rgb is None
        else torch.as_tensor(np.asarray(rgb), dtype=torch.float32) / 255.0
    )
    return {
        "means": points,
        "features_dc": RGB2SH(colours),
        "opacities": torch.full((n, 1), float(np.log(opacity / (1.0 - opacity)))),
        "scales": torch.log(spacing[:, None] * thickness),
        "quats": quats,
    }


def _surfel_rotations(points: Float[np.ndarray, "N 3"], nearest: np.ndarray) -> Float[np.ndarray, "N 4"]:
    """Per point, the (w, x, y, z) rotation whose z axis is the PCA normal of its neighbourhood (``nearest``: [N, k]
    indices, itself first) facing the bounding-box centre, and whose x axis is the neighbourhood's main direction."""
    from scipy.spatial.transform import Rotation

    neighbourhoods = points[nearest]  # [N, k, 3]
    local = neighbourhoods - neighbourhoods.mean(axis=1, keepdims=True)
    _, vectors = np.linalg.eigh(np.einsum("nki,nkj->nij", local, local))  # eigenvalues ascending
    normal, tangent = vectors[:, :, 0], vectors[:, :, 2]
    centre = (points.min(axis=0) + points.max(axis=0)) / 2
    flip = np.einsum("ni,ni->n", normal, centre - points) < 0
    normal[flip] = -normal[flip]
    frame = np.stack([tangent, np.cross(normal, tangent), normal], axis=2)  # columns x, y, z: right-handed
    x, y, z, w = Rotation.from_matrix(frame.astype(np.float64)).as_quat().T
    quats = np.stack([w, x, y, z], axis=1)
    return np.where(quats[:, :1] < 0, -quats, quats)  # one sign per rotation, w >= 0


def load_scene_gaussians(
    scene: Path, source: GaussianSource, gaussians_file: str, point_shape: PointShape = "ball"
) -> Dict[str, Tensor]:
    """One scene's Gaussians (``GAUSSIAN_KEYS``, float32) from ``source`` (see the module docstring); a point
    cloud's Gaussians have ``point_shape`` (``points_as_gaussians``)."""
    scene = Path(scene)
    fitted = scene / gaussians_file
    if source == "ply" or (source == "auto" and fitted.is_file()):
        if not fitted.is_file():
            raise SceneGaussiansError(
                f"{scene} has no fitted Gaussians {gaussians_file}: fit the scene first, or serve its seed points "
                "with --pipeline.datamanager.gaussians points (or auto)"
            )
        arrays = read_semantic_ply(fitted)
        return {k: getattr(arrays, k).float().contiguous() for k in GAUSSIAN_KEYS}
    if source == "labeled_points":
        path = labelled_points_path(scene)
        if path is None:
            raise SceneGaussiansError(
                f"{scene} has no labelled point cloud (transforms.json's labeled_ply_file_path, or points_labeled.ply)"
            )
    else:
        ply = json.loads((scene / "transforms.json").read_text()).get("ply_file_path")
        path = scene / ply if ply else None
        if path is None or not path.is_file():
            raise SceneGaussiansError(
                f"{scene} has neither fitted Gaussians ({gaussians_file}) nor a seed point cloud (transforms.json's "
                "ply_file_path); a scene with labelled points can serve those (--pipeline.datamanager.gaussians "
                "labeled_points)"
            )
    cloud = read_point_cloud(path)
    return points_as_gaussians(cloud.xyz, cloud.rgb, shape=point_shape)


def subsample(gaussians: Mapping[str, Tensor], limit: int, rng: np.random.Generator) -> Dict[str, Tensor]:
    """At most ``limit`` of the Gaussians, a random subset drawn from ``rng`` (all of them, in order, below it)."""
    n = len(gaussians["means"])
    if n <= limit:
        return dict(gaussians)
    keep = torch.from_numpy(np.sort(rng.choice(n, size=limit, replace=False)))
    return {k: v[keep] for k, v in gaussians.items()}


GaussianSubset = Literal["random", "views"]


def subset_in_views(
    gaussians: Mapping[str, Tensor],
    limit: int,
    camera_to_world: Float[Tensor, "V 3 4"],
    intrinsics: Float[Tensor, "V 3 3"],
    image_size: Tuple[int, int],
    rng: np.random.Generator,
) -> Dict[str, Tensor]:
    """At most ``limit`` of the Gaussians, chosen for the views a sample renders into (``camera_to_world``: OpenGL
    poses in the Gaussians' frame; ``intrinsics`` for ``image_size`` (H, W)): first those whose centre falls inside
    at least one view (a random subset of them where they alone are more than ``limit``), then the rest by their
    distance to the nearest of the views' cameras. Kept in their original order.

    A random subset of the whole scene (``subsample``) thins every surface, which changes what the encoder sees
    (voxel occupancy, neighbours) and leaves the rendered views semi-transparent; this keeps the rendered part of a
    large scene at its full density, and its surroundings next."""
    means = gaussians["means"]
    n = len(means)
    if n <= limit:
        return dict(gaussians)
    poses = camera_to_world.double()
    inside = torch.zeros(n, dtype=torch.bool)
    for pose, K in zip(poses, intrinsics.double(), strict=True):
        inside |= project_points(means.double(), K, pose[:3], image_size)[2]
    seen = torch.nonzero(inside).squeeze(1).numpy()
    if len(seen) >= limit:
        keep = rng.choice(seen, size=limit, replace=False)
    else:
        rest = torch.nonzero(~inside).squeeze(1)
        distance = torch.cdist(means[rest].double(), poses[:, :3, 3]).amin(dim=1)
        nearest = rest[torch.argsort(distance, stable=True)[: limit - len(seen)]].numpy()
        keep = np.concatenate([seen, nearest])
    keep = torch.from_numpy(np.sort(keep))
    return {k: v[keep] for k, v in gaussians.items()}


def collate_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """torch's default collation, except for the scenes' Gaussians (of different counts): joined along the first
    axis, with ``batch`` [N] saying whose each is."""
    if not samples or "gaussians" not in samples[0]:
        return default_collate(list(samples))
    gaussians: List[Dict[str, Tensor]] = [s["gaussians"] for s in samples]
    rest = default_collate([{k: v for k, v in s.items() if k != "gaussians"} for s in samples])
    sizes = torch.tensor([len(g["means"]) for g in gaussians])
    joined = {k: torch.cat([g[k] for g in gaussians]) for k in GAUSSIAN_KEYS}
    joined["batch"] = torch.repeat_interleave(torch.arange(len(gaussians)), sizes)
    rest["gaussians"] = joined
    return rest
