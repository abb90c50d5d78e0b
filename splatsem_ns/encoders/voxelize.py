"""Grid voxelisation of points (Gaussian centres) and the maps between points and voxels.

Each scene gets its own grid whose origin is the scene's smallest point coordinate, so voxel indices are
non-negative (what the coordinate keys need) and a translated scene gives the same voxels. Several scenes are
voxelised in one call through a per-point scene index; voxels of different scenes never merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.encoders.sparse_tensor import (
    CoordinateHash,
    SparseGridCache,
    SparseTensor,
    check_coordinate_range,
    coordinate_keys,
    keys_to_coordinates,
)

PoolReduce = Literal["mean", "sum", "max", "min"]


def scene_origins(
    points: Float[Tensor, "N 3"], batch: Int[Tensor, " N"], batch_size: int
) -> Float[Tensor, "B 3"]:
    """Smallest coordinate of each scene's points (zeros for a scene without points)."""
    origins = points.new_full((batch_size, 3), float("inf"))
    origins.scatter_reduce_(0, batch[:, None].expand(-1, 3), points, reduce="amin", include_self=True)
    return torch.where(torch.isfinite(origins), origins, torch.zeros_like(origins))


def grid_coordinates(
    points: Float[Tensor, "N 3"], voxel_size: float, batch: Int[Tensor, " N"], batch_size: int
) -> Tuple[Int[Tensor, "N 3"], Float[Tensor, "B 3"]]:
    """Integer voxel index of every point in its scene's grid, and each scene's grid origin."""
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    origins = scene_origins(points, batch, batch_size)
    grid = torch.floor((points - origins[batch]) / voxel_size).long()
    return grid, origins


def pool_to_voxels(
    point_features: Float[Tensor, "N C"],
    point_to_voxel: Int[Tensor, " N"],
    num_voxels: int,
    reduce: PoolReduce = "mean",
    counts: Optional[Int[Tensor, " M"]] = None,
) -> Float[Tensor, "M C"]:
    """Reduce per-point features into their voxels.

    ``mean`` and ``sum`` use ``index_add_`` (deterministic on CPU); ``max``/``min`` use ``scatter_reduce``.
    Every voxel must hold at least one point (true for a ``Voxelization``).
    """
    channels = point_features.shape[1]
    if reduce in ("mean", "sum"):
        out = point_features.new_zeros(num_voxels, channels).index_add(0, point_to_voxel, point_features)
        if reduce == "sum":
            return out
        if counts is None:
            counts = torch.bincount(point_to_voxel, minlength=num_voxels)
        return out / counts.clamp(min=1).to(out.dtype)[:, None]
    if reduce in ("max", "min"):
        index = point_to_voxel[:, None].expand(-1, channels)
        out = point_features.new_zeros(num_voxels, channels)
        return out.scatter_reduce(0, index, point_features, reduce="a" + reduce, include_self=False)
    raise ValueError(f"Unknown reduction '{reduce}': use mean, sum, max or min.")


def unpool_to_points(
    voxel_features: Float[Tensor, "M C"], point_to_voxel: Int[Tensor, " N"]
) -> Float[Tensor, "N C"]:
    """Every point takes its voxel's feature row."""
    return voxel_features.index_select(0, point_to_voxel)


@dataclass(eq=False)
class Voxelization:
    """The active voxels of one or several scenes and the maps between points and voxels."""

    coords: Int[Tensor, "M 4"]
    """int32 ``(batch, x, y, z)`` of each voxel, sorted by scene then x, y, z."""
    point_to_voxel: Int[Tensor, " N"]
    """Voxel row of each point (``torch.unique``'s inverse)."""
    voxel_to_point: Int[Tensor, " M"]
    """Index of the first point (smallest index) in each voxel."""
    counts: Int[Tensor, " M"]
    """Points in each voxel (all >= 1)."""
    origins: Float[Tensor, "B 3"]
    """World position of each scene's grid corner: voxel ``(x, y, z)`` spans ``origin + [x, x+1) * voxel_size``."""
    voxel_size: float
    """Edge length of a voxel, in the points' units."""
    batch_size: int
    """Number of scenes."""
    cache: SparseGridCache
    """Coordinate hash of ``coords`` (already sorted), handed to every ``SparseTensor`` built on these voxels."""

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_points(self) -> int:
        return self.point_to_voxel.shape[0]

    def pool(self, point_features: Float[Tensor, "N C"], reduce: PoolReduce = "mean") -> Float[Tensor, "M C"]:
        """Per-point features reduced into the voxels."""
        return pool_to_voxels(point_features, self.point_to_voxel, self.num_voxels, reduce, self.counts)

    def unpool(self, voxel_features: Float[Tensor, "M C"]) -> Float[Tensor, "N C"]:
        """Voxel features handed back to every point of the voxel."""
        return unpool_to_points(voxel_features, self.point_to_voxel)

    def voxel_centres(self) -> Float[Tensor, "M 3"]:
        """World position of each voxel's centre."""
        corner = self.origins[self.coords[:, 0].long()]
        return corner + (self.coords[:, 1:].to(corner.dtype) + 0.5) * self.voxel_size

    def point_voxel_centres(self) -> Float[Tensor, "N 3"]:
        """World position of the centre of each point's voxel."""
        return self.voxel_centres().index_select(0, self.point_to_voxel)

    def sparse_tensor(self, features: Float[Tensor, "M C"]) -> SparseTensor:
        """Voxel features as a ``SparseTensor`` sharing this voxelisation's coordinate hash."""
        return SparseTensor(self.coords, features, self.batch_size, self.cache)


def voxelize(
    points: Float[Tensor, "N 3"],
    voxel_size: float = 0.02,
    batch: Optional[Int[Tensor, " N"]] = None,
    batch_size: Optional[int] = None,
) -> Voxelization:
    """Voxelise the points of one or several scenes on a grid of ``voxel_size`` (scene units; 0.02 = 2 cm).

    Args:
        points: positions (Gaussian centres).
        voxel_size: grid cell edge.
        batch: scene index of each point (default: all in scene 0).
        batch_size: number of scenes (default: ``batch.max() + 1``, one host sync).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    num_points = points.shape[0]
    if batch is None:
        batch = torch.zeros(num_points, dtype=torch.long, device=points.device)
    batch = batch.long()
    if batch_size is None:
        batch_size = int(batch.max().item()) + 1 if num_points else 1
    grid, origins = grid_coordinates(points, voxel_size, batch, batch_size)
    point_coords = torch.cat([batch[:, None], grid], dim=1)
    check_coordinate_range(point_coords)
    # Unique keys come back sorted, so the voxels' coordinate hash is free: order is the identity.
    keys, point_to_voxel = torch.unique(coordinate_keys(point_coords), sorted=True, return_inverse=True)
    num_voxels = keys.shape[0]
    counts = torch.bincount(point_to_voxel, minlength=num_voxels)
    point_index = torch.arange(num_points, device=points.device)
    voxel_to_point = torch.full((num_voxels,), num_points, dtype=torch.long, device=points.device)
    voxel_to_point.scatter_reduce_(0, point_to_voxel, point_index, reduce="amin", include_self=True)
    cache = SparseGridCache(
        coordinate_hash=CoordinateHash(sorted_keys=keys, order=torch.arange(num_voxels, device=points.device))
    )
    return Voxelization(
        coords=keys_to_coordinates(keys),
        point_to_voxel=point_to_voxel,
        voxel_to_point=voxel_to_point,
        counts=counts,
        origins=origins,
        voxel_size=float(voxel_size),
        batch_size=batch_size,
        cache=cache,
    )
