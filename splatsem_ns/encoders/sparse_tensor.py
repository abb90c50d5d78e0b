"""Sparse voxel tensors: integer coordinates, per-site features, and a cache of what depends on coordinates only.

A scene becomes a set of active voxels. Neighbour lookups (for convolutions and serialisation) depend only on
the coordinates, so they are computed once per set of coordinates and shared by every layer that works on them:
a ``SparseTensor`` made with ``replace_features`` shares its ``cache`` with the tensor it came from.

Coordinates are hashed into one int64 key per site, ``batch << 48 | x << 32 | y << 16 | z`` (16 bits per axis:
65536 voxels, 1.3 km at 2 cm; 15 bits of scene index), so "is there a site at (b, x, y, z)?" is a binary search
(``torch.searchsorted``) in the sorted keys: no hash table, no custom kernel, the same on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Optional, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

COORDINATE_BITS = 16
"""Bits per spatial axis in a coordinate key."""
MAX_COORDINATE = (1 << COORDINATE_BITS) - 1
"""Largest spatial coordinate a site may have (the smallest is 0)."""
MAX_BATCH_SIZE = 1 << (63 - 3 * COORDINATE_BITS)
"""Scenes one sparse tensor may hold: what is left of a non-negative int64 key after the three axes."""


def coordinate_keys(coords: Int[Tensor, "M 4"]) -> Int[Tensor, " M"]:
    """One int64 key per ``(batch, x, y, z)`` row; sorting keys sorts by scene, then x, y, z.

    Coordinates must lie in ``[0, MAX_COORDINATE]`` (not checked here: see ``check_coordinate_range``).
    """
    c = coords.long()
    bits = COORDINATE_BITS
    return (c[:, 0] << (3 * bits)) | (c[:, 1] << (2 * bits)) | (c[:, 2] << bits) | c[:, 3]


def keys_to_coordinates(keys: Int[Tensor, " M"]) -> Int[Tensor, "M 4"]:
    """Inverse of ``coordinate_keys``: int32 ``(batch, x, y, z)`` rows."""
    bits, mask = COORDINATE_BITS, MAX_COORDINATE
    return torch.stack(
        [keys >> (3 * bits), (keys >> (2 * bits)) & mask, (keys >> bits) & mask, keys & mask], dim=1
    ).int()


def check_coordinate_range(coords: Int[Tensor, "M 4"]) -> None:
    """Raise a readable error when coordinates do not fit the 16-bit-per-axis keys."""
    if coords.numel() == 0:
        return
    low, high = coords[:, 1:].min().item(), coords[:, 1:].max().item()
    if low < 0 or high > MAX_COORDINATE:
        raise ValueError(
            f"Voxel coordinates must lie in [0, {MAX_COORDINATE}], got [{low}, {high}]: the scene spans more "
            "voxels than the coordinate keys hold; use a larger voxel size or split the scene."
        )
    if coords[:, 0].min().item() < 0 or coords[:, 0].max().item() >= MAX_BATCH_SIZE:
        raise ValueError(f"Batch indices must lie in [0, {MAX_BATCH_SIZE}).")


@dataclass(eq=False)
class CoordinateHash:
    """Sorted coordinate keys of a set of sites, for neighbour lookups by binary search."""

    sorted_keys: Int[Tensor, " M"]
    """The sites' keys in increasing order."""
    order: Int[Tensor, " M"]
    """Row (site index) of each sorted key: ``keys[order] == sorted_keys``."""

    @classmethod
    def from_coords(cls, coords: Int[Tensor, "M 4"]) -> "CoordinateHash":
        check_coordinate_range(coords)
        sorted_keys, order = torch.sort(coordinate_keys(coords))
        return cls(sorted_keys=sorted_keys, order=order)

    def lookup(self, query: Int[Tensor, "Q 4"]) -> Int[Tensor, " Q"]:
        """Row of the site at each query coordinate, ``-1`` where there is none (also for coordinates outside
        the key range, such as negative neighbours of border sites)."""
        query = query.long()
        inside = ((query[:, 1:] >= 0) & (query[:, 1:] <= MAX_COORDINATE)).all(dim=1)
        keys = coordinate_keys(query.clamp(0, MAX_COORDINATE))
        if self.sorted_keys.numel() == 0:
            return torch.full_like(keys, -1)
        position = torch.searchsorted(self.sorted_keys, keys).clamp_(max=self.sorted_keys.numel() - 1)
        found = inside & (self.sorted_keys[position] == keys)
        return torch.where(found, self.order[position], torch.full_like(position, -1))


@dataclass(eq=False)
class SparseGridCache:
    """What depends on a sparse tensor's coordinates only, shared by every tensor on the same sites.

    ``entries`` holds kernel maps, downsampled grids, serialisation orders and attention patch layouts under
    keys chosen by the modules that compute them (e.g. ``("submanifold", 3)``).
    """

    coordinate_hash: Optional[CoordinateHash] = None
    entries: Dict[Hashable, Any] = field(default_factory=dict)


@dataclass(eq=False)
class SparseTensor:
    """Features on the active voxels of one or several scenes."""

    coords: Int[Tensor, "M 4"]
    """int32 ``(batch, x, y, z)`` of each active voxel; spatial coordinates are non-negative grid indices."""
    features: Float[Tensor, "M C"]
    """One feature row per active voxel."""
    batch_size: int
    """Number of scenes (scene ``b`` owns the rows with ``coords[:, 0] == b``; a scene may have no rows)."""
    cache: SparseGridCache = field(default_factory=SparseGridCache, repr=False)
    """Neighbour structures of ``coords``; shared with every tensor made by ``replace_features``."""

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be [M, 4] (batch, x, y, z), got {tuple(self.coords.shape)}")
        if self.coords.dtype != torch.int32:
            raise TypeError(f"coords must be int32, got {self.coords.dtype}")
        if self.features.dim() != 2 or self.features.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"features must be [M, C] with M = {self.coords.shape[0]} sites, got {tuple(self.features.shape)}"
            )
        # Row-major coordinates (``nonzero()`` may return column-major ones): spconv reads them as raw memory.
        self.coords = self.coords.contiguous()

    @property
    def num_sites(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def batch_index(self) -> Int[Tensor, " M"]:
        """Scene of each site (int64)."""
        return self.coords[:, 0].long()

    def coordinate_hash(self) -> CoordinateHash:
        """Sorted coordinate keys, built on first use and kept in the shared cache."""
        if self.cache.coordinate_hash is None:
            self.cache.coordinate_hash = CoordinateHash.from_coords(self.coords)
        return self.cache.coordinate_hash

    def replace_features(self, features: Float[Tensor, "M D"]) -> "SparseTensor":
        """The same sites (and cache) with other features."""
        return SparseTensor(self.coords, features, self.batch_size, self.cache)

    def to(self, device: torch.device | str) -> "SparseTensor":
        """A copy on ``device`` (with a fresh cache: cached index tensors stay on the old device)."""
        return SparseTensor(self.coords.to(device), self.features.to(device), self.batch_size)

    def spatial_shape(self) -> Tuple[int, int, int]:
        """Smallest grid ``(X, Y, Z)`` holding every site (one host sync; cached)."""
        key = "spatial_shape"
        if key not in self.cache.entries:
            if self.num_sites == 0:
                self.cache.entries[key] = (1, 1, 1)
            else:
                self.cache.entries[key] = tuple(int(v) + 1 for v in self.coords[:, 1:].amax(dim=0).tolist())
        return self.cache.entries[key]

    def dense(self, spatial_shape: Optional[Tuple[int, int, int]] = None) -> Float[Tensor, "B C X Y Z"]:
        """The features scattered into a dense ``[B, C, X, Y, Z]`` grid (zeros at inactive voxels): for tests
        and small grids only."""
        shape = spatial_shape if spatial_shape is not None else self.spatial_shape()
        out = self.features.new_zeros(self.batch_size, *shape, self.num_channels)
        c = self.coords.long()
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.features
        return out.permute(0, 4, 1, 2, 3).contiguous()

    def active_mask(self, spatial_shape: Optional[Tuple[int, int, int]] = None) -> Bool[Tensor, "B X Y Z"]:
        """Dense occupancy of the sites."""
        shape = spatial_shape if spatial_shape is not None else self.spatial_shape()
        mask = torch.zeros(self.batch_size, *shape, dtype=torch.bool, device=self.coords.device)
        c = self.coords.long()
        mask[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = True
        return mask
