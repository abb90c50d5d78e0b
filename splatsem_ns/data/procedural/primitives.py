"""Solids of a procedural scene: analytic ray casting, surface sampling and containment.

Every solid is one of three kinds, each with a centre, local half extents and a yaw (rotation about z):

- a **box**: ``|x| <= hx, |y| <= hy, |z| <= hz`` in its local frame;
- a **cylinder** with a vertical axis and an elliptic cross-section: ``(x/hx)^2 + (y/hy)^2 <= 1, |z| <= hz``;
- an **ellipsoid**: ``(x/hx)^2 + (y/hy)^2 + (z/hz)^2 <= 1``.

The room itself is the inside of an axis-aligned bounding box (``RoomBox``); solid wall blocks inside it make
L-shapes and partitions. All solids of a scene are held as flat arrays (``Solids``), so that casting a view
runs a fixed number of numpy calls whatever the number of solids.

Ray casting is culled in screen space: the image is cut into square tiles, each solid's bounding box is
projected into the view, and the solid is only tested against the rays of the tiles its projection touches.
The cull is conservative (a solid's projection lies inside the projected hull of its bounding-box corners
when all corners are in front of the camera; otherwise the solid is tested against every tile), so the
result is the same as testing every ray against every solid. The nearest hit per ray is found with one
``np.minimum.reduceat`` over (tile, solid) pairs on a packed 64-bit key: the float32 ray parameter's bits
(monotonic for positive floats) above the solid index, which also breaks ties deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
from jaxtyping import Bool, Float, Int

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
"""Solid kinds (values of ``Solids.kind``)."""
KIND_NAMES: Tuple[str, ...] = ("box", "cylinder", "ellipsoid")

ROOM = -1
"""Primitive index of the room's own faces (bounding-box floor, ceiling and walls) in cast results."""

_EPS = 1e-4
"""Smallest accepted ray parameter (metres of z-depth): cameras never sit on a surface."""
_ROOM_KEY = np.uint64(0xFFFFFFFF)
_NO_HIT = np.float32(np.inf)


# ----------------------------------------------------------------------------------------------------
# Geometry containers


@dataclass
class Solids:
    """All solids of a scene as flat arrays (one row per solid)."""

    kind: Int[np.ndarray, " P"]
    """BOX, CYLINDER or ELLIPSOID."""
    center: Float[np.ndarray, "P 3"]
    """Centre in world coordinates (metres, z up)."""
    half: Float[np.ndarray, "P 3"]
    """Half extents along the local axes (box half sizes; cylinder and ellipsoid radii, half height)."""
    yaw: Float[np.ndarray, " P"]
    """Rotation about the vertical axis, radians: local x maps to (cos yaw, sin yaw, 0)."""
    surface: Int[np.ndarray, " P"]
    """Index of the solid's surface (texture, label, instance) in the scene's surface table."""

    def __post_init__(self) -> None:
        self.kind = np.asarray(self.kind, dtype=np.int64).reshape(-1)
        self.center = np.asarray(self.center, dtype=np.float64).reshape(-1, 3)
        self.half = np.asarray(self.half, dtype=np.float64).reshape(-1, 3)
        self.yaw = np.asarray(self.yaw, dtype=np.float64).reshape(-1)
        self.surface = np.asarray(self.surface, dtype=np.int64).reshape(-1)
        if (self.half <= 0).any():
            raise ValueError("solids need positive half extents")

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def corners(self) -> Float[np.ndarray, "P 8 3"]:
        """Corners of each solid's oriented bounding box (exact for boxes, enclosing the round kinds)."""
        signs = np.array(
            [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64
        )
        local = signs[None] * self.half[:, None]
        return self.center[:, None] + rotate_z(local, self.yaw[:, None])

    def aabb(self) -> Tuple[Float[np.ndarray, "P 3"], Float[np.ndarray, "P 3"]]:
        """World axis-aligned bounds (lo, hi) of each solid's oriented bounding box."""
        corners = self.corners()
        return corners.min(axis=1), corners.max(axis=1)

    def to_local(self, index: Int[np.ndarray, " N"], points: Float[np.ndarray, "N 3"]) -> np.ndarray:
        """World points -> the local frame of solid ``index[i]``."""
        return rotate_z(points - self.center[index], -self.yaw[index])

    def contains(
        self, index: Int[np.ndarray, " N"], points: Float[np.ndarray, "N 3"], margin: float
    ) -> Bool[np.ndarray, " N"]:
        """Whether ``points[i]`` lies inside solid ``index[i]`` grown by ``margin`` (approximately, for the
        round kinds: their radii are grown by ``margin``)."""
        local = np.abs(self.to_local(index, points))
        half = self.half[index] + margin
        kind = self.kind[index]
        inside_box = np.all(local <= half, axis=-1)
        radial = (local[:, 0] / half[:, 0]) ** 2 + (local[:, 1] / half[:, 1]) ** 2
        inside_cylinder = (radial <= 1.0) & (local[:, 2] <= half[:, 2])
        inside_ellipsoid = radial + (local[:, 2] / half[:, 2]) ** 2 <= 1.0
        return np.where(
            kind == BOX, inside_box, np.where(kind == CYLINDER, inside_cylinder, inside_ellipsoid)
        )

    def area(self) -> Float[np.ndarray, " P"]:
        """Surface area of each solid (Knud Thomsen's approximation for ellipsoids, Ramanujan's perimeter for
        elliptic cylinders)."""
        a, b, c = self.half[:, 0], self.half[:, 1], self.half[:, 2]
        box = 8.0 * (a * b + a * c + b * c)
        perimeter = math.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
        cylinder = perimeter * 2 * c + 2 * math.pi * a * b
        p = 1.6075
        ellipsoid = 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
        return np.where(self.kind == BOX, box, np.where(self.kind == CYLINDER, cylinder, ellipsoid))


def rotate_z(v: Float[np.ndarray, "... 3"], yaw: np.ndarray) -> Float[np.ndarray, "... 3"]:
    """Rotate vectors about z by ``yaw`` (broadcast against ``v[..., 0]``)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1], v[..., 2]], axis=-1)


@dataclass
class RoomBox:
    """The inside of an axis-aligned box: floor, ceiling and four walls.

    Faces are numbered -x, +x, -y, +y, floor (-z), ceiling (+z). A flat of two rooms is one box cut by a
    partition (solid wall blocks) at ``split_at`` along ``split_axis``; each face then has one surface per
    side of the cut (region 0 below ``split_at``, region 1 above), so each room has its own walls and floor.
    """

    lo: Float[np.ndarray, " 3"]
    hi: Float[np.ndarray, " 3"]
    face_surfaces: Int[np.ndarray, "6 2"]
    """Surface index of each face in each region (both columns equal for a single room)."""
    split_axis: int = 0
    """Axis (0: x, 1: y) along which the regions are cut."""
    split_at: float = math.inf
    """Coordinate of the cut (inf: one region)."""

    def __post_init__(self) -> None:
        self.lo = np.asarray(self.lo, dtype=np.float64)
        self.hi = np.asarray(self.hi, dtype=np.float64)
        self.face_surfaces = np.asarray(self.face_surfaces, dtype=np.int64).reshape(6, 2)

    def region(self, points: Float[np.ndarray, "N 3"]) -> Int[np.ndarray, " N"]:
        """Region index (0 or 1) of each point."""
        return (points[:, self.split_axis] > self.split_at).astype(np.int64)

    def face_of(self, points: Float[np.ndarray, "N 3"]) -> Int[np.ndarray, " N"]:
        """Index of the face nearest each point (the face a point on the room's boundary lies on)."""
        distances = np.concatenate(
            [np.abs(points - self.lo)[:, :, None], np.abs(points - self.hi)[:, :, None]], axis=2
        ).reshape(-1, 6)
        return distances.argmin(axis=1)

    def surfaces_at(self, points: Float[np.ndarray, "N 3"]) -> Int[np.ndarray, " N"]:
        return self.face_surfaces[self.face_of(points), self.region(points)]

    def normals_at(self, faces: Int[np.ndarray, " N"]) -> Float[np.ndarray, "N 3"]:
        """Unit normals pointing into the room."""
        normals = np.zeros((faces.shape[0], 3))
        normals[np.arange(faces.shape[0]), faces // 2] = np.where(faces % 2 == 1, -1.0, 1.0)
        return normals


# ----------------------------------------------------------------------------------------------------
# Per-kind intersection of (ray, solid) pairs in the solid's local frame


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """1 / d with zeros nudged to a tiny number of the same sign (one pass: zero components are rare)."""
    tiny = np.float32(1e-20)
    zero = d == 0
    if zero.any():
        d = np.where(zero, np.copysign(tiny, d), d)
    with np.errstate(over="ignore"):
        return np.float32(1.0) / d


def _t_box(o: List[np.ndarray], d: List[np.ndarray], h: List[np.ndarray]) -> np.ndarray:
    """Entry parameter of rays ``o + t d`` (local frame; o, h [P, 1], d [P, R]) into boxes; inf on a miss."""
    t_near = t_far = None
    for axis in range(3):
        inv = _safe_inverse(d[axis])
        t1 = (-h[axis] - o[axis]) * inv
        t2 = (h[axis] - o[axis]) * inv
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        t_near = lo if t_near is None else np.maximum(t_near, lo)
        t_far = hi if t_far is None else np.minimum(t_far, hi)
    return np.where((t_near <= t_far) & (t_near > _EPS), t_near, _NO_HIT)


def _t_cylinder(o: List[np.ndarray], d: List[np.ndarray], h: List[np.ndarray]) -> np.ndarray:
    """Entry parameter into vertical elliptic cylinders (scaled to unit radius); inf on a miss."""
    ox, oy, dx, dy = o[0] / h[0], o[1] / h[1], d[0] / h[0], d[1] / h[1]
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - 1.0
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    z_side = o[2] + t_side * d[2]
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (np.abs(z_side) <= h[2])
    t = np.where(side_ok, t_side, _NO_HIT)
    # Caps: the camera is outside every solid, so the cap facing it is the only one it can enter through.
    inv_dz = _safe_inverse(d[2])
    cap_z = np.where(o[2] > 0, h[2], -h[2])
    t_cap = (cap_z - o[2]) * inv_dz
    radial = (ox + t_cap * dx) ** 2 + (oy + t_cap * dy) ** 2
    cap_ok = (t_cap > _EPS) & (radial <= 1.0)
    return np.where(cap_ok, np.minimum(t, t_cap), t)


def _t_ellipsoid(o: List[np.ndarray], d: List[np.ndarray], h: List[np.ndarray]) -> np.ndarray:
    """Entry parameter into ellipsoids (scaled to the unit sphere); inf on a miss."""
    os_ = [o[i] / h[i] for i in range(3)]
    ds = [d[i] / h[i] for i in range(3)]
    a = ds[0] * ds[0] + ds[1] * ds[1] + ds[2] * ds[2]
    b = os_[0] * ds[0] + os_[1] * ds[1] + os_[2] * ds[2]
    c = os_[0] * os_[0] + os_[1] * os_[1] + os_[2] * os_[2] - 1.0
    disc = b * b - a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
    return np.where((disc >= 0) & (t > _EPS), t, _NO_HIT)


_T_OF_KIND = (_t_box, _t_cylinder, _t_ellipsoid)


# ----------------------------------------------------------------------------------------------------
# Views: pinhole rays in tiles, screen-space culling, nearest hits


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics of an undistorted pinhole camera (OpenCV pixel convention: pixel (i, j) covers
    [i, i+1) x [j, j+1), its centre at i + 0.5)."""

    width: int
    height: int
    focal: float
    cx: float
    cy: float


@dataclass(frozen=True)
class _TileLayout:
    tile: int
    tiles_x: int
    tiles_y: int
    directions: Float[np.ndarray, "3 T R"]
    """Camera-frame ray directions (OpenGL: x right, y up, z = -1), per tile and ray within the tile."""
    pixel_of_ray: Int[np.ndarray, "H W"]
    """Flat index (tile * R + ray) of each image pixel."""


@lru_cache(maxsize=8)
def _tile_layout(camera: PinholeCamera, tile: int, offset: Tuple[float, float]) -> _TileLayout:
    tiles_x, tiles_y = -(-camera.width // tile), -(-camera.height // tile)
    jj, ii = np.meshgrid(np.arange(tiles_y * tile), np.arange(tiles_x * tile), indexing="ij")

    def order(a: np.ndarray) -> np.ndarray:
        # [tiles_y, tile, tiles_x, tile] -> [tiles_y * tiles_x, tile * tile]: rays of a tile are contiguous.
        return a.reshape(tiles_y, tile, tiles_x, tile).transpose(0, 2, 1, 3).reshape(tiles_y * tiles_x, -1)

    u = order(ii).astype(np.float64) + offset[0]
    v = order(jj).astype(np.float64) + offset[1]
    directions = np.stack([(u - camera.cx) / camera.focal, -(v - camera.cy) / camera.focal, -np.ones_like(u)])
    flat = np.arange(tiles_x * tiles_y * tile * tile).reshape(tiles_y, tiles_x, tile, tile)
    flat = flat.transpose(0, 2, 1, 3).reshape(tiles_y * tile, tiles_x * tile)
    return _TileLayout(
        tile=tile,
        tiles_x=tiles_x,
        tiles_y=tiles_y,
        directions=directions.astype(np.float32),
        pixel_of_ray=flat[: camera.height, : camera.width].copy(),
    )


@dataclass
class ViewHits:
    """Nearest hit of every pixel's ray of one view."""

    depth: Float[np.ndarray, "H W"]
    """Ray parameter of the hit: z-depth in metres (the rays' camera-frame z is -1)."""
    primitive: Int[np.ndarray, "H W"]
    """Index of the solid hit, or ``ROOM`` for the room's own faces."""
    directions: Float[np.ndarray, "H W 3"]
    """World-frame ray directions (not normalised; camera-frame z = -1)."""
    tested_pairs: int
    """Number of (ray, solid) tests done after culling (for speed reports)."""


def project_corners(
    corners: Float[np.ndarray, "P K 3"], c2w: Float[np.ndarray, "4 4"], camera: PinholeCamera
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates (u, v) and z-depth [P, K] of points for an OpenGL camera-to-world pose."""
    rel = corners - c2w[:3, 3]
    x = rel @ c2w[:3, 0]
    y = rel @ c2w[:3, 1]
    depth = -(rel @ c2w[:3, 2])
    with np.errstate(divide="ignore", invalid="ignore"):
        u = camera.focal * x / depth + camera.cx
        v = -camera.focal * y / depth + camera.cy
    return u, v, depth


_BOX_EDGES = np.array([(i, i | bit) for i in range(8) for bit in (1, 2, 4) if not i & bit])
"""The 12 edges of a box as pairs of corner indices (corners numbered by the bits of their sign pattern)."""


def _tile_ranges(
    solids: Solids, c2w: np.ndarray, camera: PinholeCamera, layout: _TileLayout, offset: Tuple[float, float]
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inclusive tile ranges (tx0, tx1, ty0, ty1) [P] that each solid's projection can touch (empty when
    tx0 > tx1).

    The bounding box is clipped at the depth rays start to count hits (``_EPS``): its part in front of that
    plane is the convex hull of the corners in front and of the points where its edges cross the plane, and the
    projection of a convex hull in front of the camera is the hull of the projected points. Points on the
    plane project far out, so a box reaching behind the camera still only claims the side of the image it is
    on.
    """
    rel = solids.corners() - c2w[:3, 3]
    x, y, depth = rel @ c2w[:3, 0], rel @ c2w[:3, 1], -(rel @ c2w[:3, 2])
    front = depth >= _EPS
    a, b = _BOX_EDGES[:, 0], _BOX_EDGES[:, 1]
    da, db = depth[:, a], depth[:, b]
    crosses = (da >= _EPS) != (db >= _EPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(crosses, (_EPS - da) / (db - da), 0.0)
        ux = np.concatenate(
            [
                np.where(front, x / depth, np.nan),
                np.where(crosses, (x[:, a] + w * (x[:, b] - x[:, a])) / _EPS, np.nan),
            ],
            axis=1,
        )
        uy = np.concatenate(
            [
                np.where(front, y / depth, np.nan),
                np.where(crosses, (y[:, a] + w * (y[:, b] - y[:, a])) / _EPS, np.nan),
            ],
            axis=1,
        )
    visible = front.any(axis=1)
    ux = np.where(visible[:, None], ux, 0.0)
    uy = np.where(visible[:, None], uy, 0.0)
    u_min = camera.focal * np.nanmin(ux, axis=1) + camera.cx
    u_max = camera.focal * np.nanmax(ux, axis=1) + camera.cx
    v_min = -camera.focal * np.nanmax(uy, axis=1) + camera.cy
    v_max = -camera.focal * np.nanmin(uy, axis=1) + camera.cy
    # Pixel i is tested at i + offset: it can see the solid when umin <= i + offset <= umax. One pixel of slack
    # on each side keeps the cull conservative under rounding.
    i0 = np.floor(u_min - offset[0]) - 1
    i1 = np.ceil(u_max - offset[0]) + 1
    j0 = np.floor(v_min - offset[1]) - 1
    j1 = np.ceil(v_max - offset[1]) + 1
    culled = ~visible | (i1 < 0) | (i0 > camera.width - 1) | (j1 < 0) | (j0 > camera.height - 1)
    t = layout.tile
    tx0 = np.clip(i0, 0, camera.width - 1).astype(np.int64) // t
    tx1 = np.clip(i1, 0, camera.width - 1).astype(np.int64) // t
    ty0 = np.clip(j0, 0, camera.height - 1).astype(np.int64) // t
    ty1 = np.clip(j1, 0, camera.height - 1).astype(np.int64) // t
    tx1 = np.where(culled, tx0 - 1, tx1)
    return tx0, tx1, ty0, ty1


def _room_t(room: RoomBox, origin: np.ndarray, d: List[np.ndarray]) -> np.ndarray:
    """Exit parameter of rays from inside the room box through its faces."""
    t_far = None
    for axis in range(3):
        inv = _safe_inverse(d[axis])
        t1 = np.float32(room.lo[axis] - origin[axis]) * inv
        t2 = np.float32(room.hi[axis] - origin[axis]) * inv
        hi = np.maximum(t1, t2)
        t_far = hi if t_far is None else np.minimum(t_far, hi)
    return t_far


def _key(t: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Sortable key: float32 bits of t (> 0) above a 32-bit index."""
    bits = np.ascontiguousarray(t, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (bits << np.uint64(32)) | index.astype(np.uint64)


def cast_view(
    room: RoomBox,
    solids: Solids,
    c2w: Float[np.ndarray, "4 4"],
    camera: PinholeCamera,
    offset: Tuple[float, float] = (0.5, 0.5),
    tile: int = 16,
    cull: bool = True,
) -> ViewHits:
    """Nearest hit of the ray through ``(i + offset[0], j + offset[1])`` of every pixel (i, j).

    Args:
        room: The room box (every ray from inside it hits one of its faces at the latest).
        solids: Solids inside the room.
        c2w: OpenGL camera-to-world pose (x right, y up, looking along -z).
        camera: Intrinsics.
        offset: Sub-pixel position of the ray within each pixel.
        tile: Side of the square screen tiles used for culling, in pixels.
        cull: Cull in screen space (False tests every ray against every solid: the reference for tests).
    """
    layout = _tile_layout(camera, tile, (float(offset[0]), float(offset[1])))
    rot = c2w[:3, :3].astype(np.float32)
    origin = c2w[:3, 3].astype(np.float64)
    dc = layout.directions
    # World directions [3, T, R]: explicit sums instead of a matmul, so no BLAS threading can change bits.
    dw = [rot[a, 0] * dc[0] + rot[a, 1] * dc[1] + rot[a, 2] * dc[2] for a in range(3)]
    best = _key(_room_t(room, origin, dw), np.zeros(dc.shape[1:], dtype=np.uint64)) | _ROOM_KEY

    tested = 0
    if len(solids):
        if cull:
            tx0, tx1, ty0, ty1 = _tile_ranges(solids, c2w, camera, layout, offset)
        else:
            p = len(solids)
            tx0, ty0 = np.zeros(p, np.int64), np.zeros(p, np.int64)
            tx1, ty1 = np.full(p, layout.tiles_x - 1), np.full(p, layout.tiles_y - 1)
        nx = np.maximum(tx1 - tx0 + 1, 0)
        ny = np.maximum(ty1 - ty0 + 1, 0)
        counts = nx * ny
        total = int(counts.sum())
        if total:
            prim = np.repeat(np.arange(len(solids)), counts)
            k = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            tiles = (ty0[prim] + k // nx[prim]) * layout.tiles_x + tx0[prim] + k % nx[prim]
            keys = np.empty((total, dc.shape[2]), dtype=np.uint64)
            cos, sin = np.cos(solids.yaw).astype(np.float32), np.sin(solids.yaw).astype(np.float32)
            rel = origin[None] - solids.center
            # Camera position in each solid's local frame (float64, then float32).
            o_local = np.stack(
                [
                    np.cos(solids.yaw) * rel[:, 0] + np.sin(solids.yaw) * rel[:, 1],
                    -np.sin(solids.yaw) * rel[:, 0] + np.cos(solids.yaw) * rel[:, 1],
                    rel[:, 2],
                ],
                axis=1,
            ).astype(np.float32)
            half = solids.half.astype(np.float32)
            for kind, t_of in enumerate(_T_OF_KIND):
                rows = np.flatnonzero(solids.kind[prim] == kind)
                if rows.size == 0:
                    continue
                p, tl = prim[rows], tiles[rows]
                c, s = cos[p, None], sin[p, None]
                gx, gy, gz = dw[0][tl], dw[1][tl], dw[2][tl]
                d = [c * gx + s * gy, c * gy - s * gx, gz]
                o = [o_local[p, a, None] for a in range(3)]
                h = [half[p, a, None] for a in range(3)]
                keys[rows] = _key(t_of(o, d, h), p[:, None])
            tested = total * dc.shape[2]
            order = np.argsort(tiles, kind="stable")
            tiles_sorted = tiles[order]
            starts = np.flatnonzero(np.r_[True, tiles_sorted[1:] != tiles_sorted[:-1]])
            nearest = np.minimum.reduceat(keys[order], starts, axis=0)
            hit_tiles = tiles_sorted[starts]
            best[hit_tiles] = np.minimum(best[hit_tiles], nearest)

    flat = best.reshape(-1)[layout.pixel_of_ray]
    depth = (flat >> np.uint64(32)).astype(np.uint32).view(np.float32)
    index = (flat & _ROOM_KEY).astype(np.int64)
    index[index == int(_ROOM_KEY)] = ROOM
    directions = np.stack([dw[a].reshape(-1)[layout.pixel_of_ray] for a in range(3)], axis=-1)
    return ViewHits(depth=depth, primitive=index, directions=directions, tested_pairs=tested)


# ----------------------------------------------------------------------------------------------------
# Surface frames of hit points: normals and texture coordinates


@dataclass
class SurfacePoints:
    """Points on surfaces with what shading needs."""

    points: Float[np.ndarray, "N 3"]
    normals: Float[np.ndarray, "N 3"]
    """Unit normals (outward for solids, into the room for the room's faces)."""
    surface: Int[np.ndarray, " N"]
    uv: Float[np.ndarray, "N 2"]
    """Texture coordinates in metres along the surface (tiled textures)."""
    uv_fit: Float[np.ndarray, "N 2"]
    """Coordinates in [0, 1] across the face (stretched textures: photos on pictures and screens); v = 1 at
    the top of vertical faces."""
    face_size: Float[np.ndarray, "N 2"]
    """Size in metres of the face along u and v (to pick a texture's resolution for stretched textures)."""


def describe_hits(
    room: RoomBox,
    solids: Solids,
    primitive: Int[np.ndarray, " N"],
    points: Float[np.ndarray, "N 3"],
) -> SurfacePoints:
    """Normals, surfaces and texture coordinates of points lying on the given solid (or room face).

    The room is handled as one more box (its faces seen from inside, normals flipped), so every point on a
    flat face goes through the same arithmetic; the few points on cylinders and ellipsoids are redone after.
    Computed in float32: texture coordinates and normals need no more.
    """
    n = points.shape[0]
    count = len(solids)
    on_room = primitive == ROOM
    index = np.where(on_room, count, primitive)
    centre = np.concatenate([solids.center, ((room.lo + room.hi) / 2)[None]]).astype(np.float32)
    halves = np.concatenate([solids.half, ((room.hi - room.lo) / 2)[None]]).astype(np.float32)
    cos_all = np.append(np.cos(solids.yaw), 1.0).astype(np.float32)
    sin_all = np.append(np.sin(solids.yaw), 0.0).astype(np.float32)
    kind_all = np.append(solids.kind, BOX)
    c, s = cos_all[index], sin_all[index]
    rel = points.astype(np.float32) - centre[index]
    local = np.stack([c * rel[:, 0] + s * rel[:, 1], c * rel[:, 1] - s * rel[:, 0], rel[:, 2]], axis=1)
    half = halves[index]
    q = local / half
    axis = np.abs(q).argmax(axis=1)
    rows = np.arange(n)
    positive = q[rows, axis] > 0
    # Face coordinates: vertical faces use (the other horizontal axis, z), top and bottom (x, y). u increases to
    # the right of a viewer facing the face from outside (on the +y face that is -x), so stretched images
    # (photos, screens) read left to right.
    a_u = np.where(axis == 0, 1, 0)
    a_v = np.where(axis == 2, 1, 2)
    flip = np.where(((axis == 1) & positive) | ((axis == 0) & ~positive), np.float32(-1), np.float32(1))
    h_u, h_v = half[rows, a_u], half[rows, a_v]
    u = local[rows, a_u] * flip + h_u
    v = local[rows, a_v] + h_v
    size_u, size_v = 2 * h_u, 2 * h_v
    n_local = np.zeros((n, 3), dtype=np.float32)
    n_local[rows, axis] = np.where(positive != on_room, np.float32(1), np.float32(-1))
    room_face = 2 * axis + positive
    surface = np.where(
        on_room,
        room.face_surfaces[room_face, room.region(points)],
        np.append(solids.surface, 0)[index],
    )

    round_rows = np.flatnonzero(kind_all[index] != BOX)
    if round_rows.size:
        lq, hq = local[round_rows], half[round_rows]
        grad = lq / hq**2
        is_cyl = kind_all[index[round_rows]] == CYLINDER
        radial = np.sqrt((lq[:, 0] / hq[:, 0]) ** 2 + (lq[:, 1] / hq[:, 1]) ** 2)
        # On a cap |z| = hz exactly; on the side the scaled radius is 1.
        cap = is_cyl & (np.abs(np.abs(lq[:, 2]) - hq[:, 2]) < np.abs(radial - 1.0) * hq[:, :2].min(axis=1))
        grad[:, 2] = np.where(is_cyl, 0.0, grad[:, 2])
        grad = np.where(cap[:, None], np.stack([0 * lq[:, 0], 0 * lq[:, 0], np.sign(lq[:, 2])], 1), grad)
        n_local[round_rows] = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
        radius = 0.5 * (hq[:, 0] + hq[:, 1])
        angle = np.arctan2(lq[:, 1] / hq[:, 1], lq[:, 0] / hq[:, 0])
        u[round_rows] = np.where(cap, lq[:, 0], angle * radius)
        v[round_rows] = np.where(cap, lq[:, 1], lq[:, 2] + hq[:, 2])
        size_u[round_rows] = np.where(cap, 2 * hq[:, 0], 2 * math.pi * radius)
        size_v[round_rows] = np.where(cap, 2 * hq[:, 1], 2 * hq[:, 2])

    normals = np.stack(
        [c * n_local[:, 0] - s * n_local[:, 1], s * n_local[:, 0] + c * n_local[:, 1], n_local[:, 2]], axis=1
    )
    uv = np.stack([u, v], axis=1)
    uv_fit = np.clip(uv / np.stack([size_u, size_v], axis=1), 0.0, 1.0)
    if round_rows.size:
        # Round kinds: angle and height (caps: centred disc coordinates).
        uv_fit[round_rows, 0] = np.where(
            cap, 0.5 + lq[:, 0] / (2 * hq[:, 0]), (angle + math.pi) / (2 * math.pi)
        )
        uv_fit[round_rows, 1] = np.where(
            cap, 0.5 + lq[:, 1] / (2 * hq[:, 1]), 0.5 + lq[:, 2] / (2 * hq[:, 2])
        )
    return SurfacePoints(
        points=points,
        normals=normals,
        surface=surface,
        uv=uv,
        uv_fit=uv_fit,
        face_size=np.stack([size_u, size_v], axis=1),
    )


# ----------------------------------------------------------------------------------------------------
# Area sampling and visibility of samples (labelled point clouds)


def sample_solid(
    solids: Solids, index: int, count: int, rng: np.random.Generator
) -> Float[np.ndarray, "N 3"]:
    """About area-uniform points on the surface of one solid (exact for boxes and cylinders; for ellipsoids,
    points of a sphere stretched, denser where it is stretched least)."""
    kind, half = int(solids.kind[index]), solids.half[index]
    if kind == BOX:
        areas = np.repeat([half[1] * half[2], half[0] * half[2], half[0] * half[1]], 2)
        face = rng.choice(6, size=count, p=areas / areas.sum())
        local = rng.uniform(-1.0, 1.0, (count, 3)) * half
        axis, sign = face // 2, np.where(face % 2 == 1, 1.0, -1.0)
        local[np.arange(count), axis] = sign * half[axis]
    elif kind == CYLINDER:
        a, b, c = half
        perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
        side, cap = perimeter * 2 * c, math.pi * a * b
        part = rng.choice(3, size=count, p=np.array([side, cap, cap]) / (side + 2 * cap))
        angle = rng.random(count) * 2 * math.pi
        radius = np.where(part == 0, 1.0, np.sqrt(rng.random(count)))
        z = np.where(part == 0, rng.uniform(-c, c, count), np.where(part == 1, c, -c))
        local = np.stack([a * radius * np.cos(angle), b * radius * np.sin(angle), z], axis=1)
    else:
        direction = rng.normal(size=(count, 3))
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        local = direction * half
    return solids.center[index] + rotate_z(local, solids.yaw[index])


def sample_room_face(
    room: RoomBox, face: int, count: int, rng: np.random.Generator
) -> Float[np.ndarray, "N 3"]:
    """Uniform points on one face of the room box."""
    axis, positive = divmod(face, 2)
    p = room.lo + rng.random((count, 3)) * (room.hi - room.lo)
    p[:, axis] = room.hi[axis] if positive else room.lo[axis]
    return p


def room_face_areas(room: RoomBox) -> Float[np.ndarray, " 6"]:
    size = room.hi - room.lo
    return np.repeat([size[1] * size[2], size[0] * size[2], size[0] * size[1]], 2)


def hidden_by_others(
    solids: Solids,
    points: Float[np.ndarray, "N 3"],
    owner: Int[np.ndarray, " N"],
    margin: float,
    room: Optional[RoomBox] = None,
) -> Bool[np.ndarray, " N"]:
    """Which points lie inside (or within ``margin`` of) a solid other than their owner (``ROOM`` for room
    faces), or, for solids' points, on or outside the room's boundary: surface that no camera can see.

    Only solids whose bounding box contains the point are tested (points are bucketed per solid through an
    axis-aligned bounding-box test first), so the cost is linear in the number of points.
    """
    hidden = np.zeros(points.shape[0], dtype=bool)
    if room is not None:
        near = np.any((points <= room.lo + margin) | (points >= room.hi - margin), axis=1)
        hidden |= near & (owner != ROOM)
    if not len(solids) or not points.shape[0]:
        return hidden
    lo, hi = solids.aabb()
    lo, hi = lo - margin, hi + margin
    # Sort points along x so each solid's candidates are one contiguous slice.
    order = np.argsort(points[:, 0], kind="stable")
    xs = points[order, 0]
    first = np.searchsorted(xs, lo[:, 0], side="left")
    last = np.searchsorted(xs, hi[:, 0], side="right")
    for index in range(len(solids)):
        if first[index] >= last[index]:
            continue
        cand = order[first[index] : last[index]]
        p = points[cand]
        box = np.all((p >= lo[index]) & (p <= hi[index]), axis=1) & (owner[cand] != index)
        cand = cand[box]
        if cand.size:
            inside = solids.contains(np.full(cand.size, index), points[cand], margin)
            hidden[cand[inside]] = True
    return hidden
