"""A procedural indoor scene with exact geometry, poses and labels, written as a nerfstudio dataset.

The scene is a closed room (floor, four walls, ceiling) furnished with boxes, spheres and vertical
cylinders of several classes (a table, two chairs as two instances of one class, a sofa, a lamp, a
cabinet, a ball, a picture). Views are ray cast analytically in numpy, so depth, per-pixel labels,
instance ids and poses agree exactly; procedural textures with a little Lambertian shading give the
images enough detail for photometric reconstruction. Shading depends only on the surface point, never
on the view, so the scene is exactly multi-view consistent.

Everything is drawn from ``np.random.default_rng(seed)``: the same config gives byte-identical files.

Output layout (nerfstudio ``transforms.json``, OpenGL camera-to-world, OPENCV camera model)::

    transforms.json      intrinsics, frames, ply_file_path (seed points), labeled_ply_file_path
    classes.json         {"1": "wall", ...}; id 0 means unlabelled
    images/NNNN.png      RGB uint8
    depth/NNNN.png       z-depth, uint16 millimetres (depth_unit_scale_factor 0.001)
    labels/NNNN.png      class id per pixel, uint16
    instances/NNNN.png   instance id per pixel, uint16
    points3D.ply         noisy surface points seen by the cameras (x y z red green blue), for Gaussian init
    points_labeled.ply   surface samples (x y z red green blue label instance_id), for 3D evaluation
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Annotated, Dict, List, Optional, Tuple, Union

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image

from splatsem_ns.data.ply_io import write_point_cloud
from splatsem_ns.data.scene_files import (
    pinhole_transforms,
    seed_points_of_view,
    write_classes,
    write_view_files,
)

CLASS_NAMES: Dict[int, str] = {
    1: "wall",
    2: "floor",
    3: "ceiling",
    4: "table",
    5: "chair",
    6: "sofa",
    7: "lamp",
    8: "cabinet",
    9: "ball",
    10: "picture",
}
"""Class ids of the synthetic scene and their names (NYU40/ScanNet200 names, so text queries make sense)."""

_CLASS_COLOURS: Dict[str, Tuple[float, float, float]] = {
    "wall": (0.80, 0.77, 0.70),
    "floor": (0.55, 0.38, 0.22),
    "ceiling": (0.90, 0.90, 0.88),
    "table": (0.45, 0.30, 0.18),
    "chair": (0.22, 0.32, 0.60),
    "sofa": (0.62, 0.16, 0.15),
    "lamp": (0.90, 0.84, 0.55),
    "cabinet": (0.52, 0.47, 0.40),
    "ball": (0.92, 0.50, 0.10),
    "picture": (0.30, 0.52, 0.70),
}
_CLASS_IDS = {name: class_id for class_id, name in CLASS_NAMES.items()}
_FRAME_FILE = re.compile(r"^\d{4}\.png$")
_SUBFOLDERS = ("images", "depth", "labels", "instances")
_EPS = 1e-6
_MIN_ROOM_SIZE = (3.6, 3.0, 2.2)


@dataclass
class SyntheticSceneConfig:
    """Parameters of the procedural room. The defaults render in one to two seconds on one CPU core."""

    seed: int = 0
    """Seed of every random choice (layout jitter, colours, textures, cameras, point samples)."""
    num_views: int = 24
    """Number of rendered views, on a jittered ring inside the room."""
    width: int = 96
    """Image width in pixels."""
    height: int = 72
    """Image height in pixels."""
    horizontal_fov_deg: float = 75.0
    """Horizontal field of view of the pinhole camera, in degrees."""
    supersample: int = 2
    """Colour samples per pixel along each axis (anti-aliasing); depth and labels use the pixel centre."""
    room_size: Tuple[float, float, float] = (4.0, 3.2, 2.4)
    """Room extent in metres along x, y and z (z is up; the floor is at z=0, the room centred in x, y).
    At least 3.6 x 3.0 x 2.2, so the furniture fits without overlapping."""
    camera_ring_fraction: float = 0.62
    """Radius of the camera ring as a fraction of the room's half extents in x and y."""
    camera_height_range: Tuple[float, float] = (1.25, 1.65)
    """Range of camera heights in metres."""
    layout_jitter: float = 0.08
    """Largest random shift of each piece of furniture in x and y, in metres."""
    num_seed_points: int = 3000
    """Number of seed points (``points3D.ply``), back-projected from random pixels of the views."""
    seed_point_noise: float = 0.01
    """Standard deviation in metres of the Gaussian noise added to seed points (they mimic SfM points)."""
    labeled_points_per_m2: float = 400.0
    """Density of the labelled surface samples (``points_labeled.ply``)."""
    min_points_per_part: int = 150
    """Fewest labelled samples drawn on each primitive, so small objects are represented."""

    def __post_init__(self) -> None:
        if self.num_views < 1 or self.num_views > 9999:
            raise ValueError(f"num_views must be in 1..9999, got {self.num_views}")
        if self.width < 2 or self.height < 2:
            raise ValueError(f"image size must be at least 2x2, got {self.width}x{self.height}")
        if not 10.0 <= self.horizontal_fov_deg <= 150.0:
            raise ValueError(f"horizontal_fov_deg must be in [10, 150], got {self.horizontal_fov_deg}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if any(size < least for size, least in zip(self.room_size, _MIN_ROOM_SIZE, strict=True)):
            raise ValueError(
                f"room_size must be at least {_MIN_ROOM_SIZE} to fit the furniture, got {self.room_size}"
            )

    @property
    def focal_length(self) -> float:
        """Focal length in pixels (square pixels: fl_x == fl_y)."""
        return 0.5 * self.width / math.tan(math.radians(self.horizontal_fov_deg) / 2.0)


# ----------------------------------------------------------------------------------------------------
# Surfaces and their appearance


@dataclass
class _Surface:
    label: int
    instance: int
    color_a: np.ndarray
    color_b: np.ndarray
    pattern: str
    """One of "checker", "stripes", "noise", "planks"."""
    frequency: float
    """Pattern cycles per metre."""
    salt: int
    """Offsets the noise lattice so surfaces with the same pattern still differ."""


class _Appearance:
    """Procedural textures of all surfaces plus the fixed light, evaluated at surface points."""

    def __init__(self, surfaces: List[_Surface], rng: np.random.Generator) -> None:
        self.surfaces = surfaces
        self.perm = rng.permutation(256).astype(np.int64)
        light = np.array([0.35, -0.25, 1.0])
        self.light = light / np.linalg.norm(light)

    def _noise(self, u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
        """Smooth value noise in [0, 1] on the integer lattice."""
        iu, iv = np.floor(u), np.floor(v)
        fu, fv = u - iu, v - iv
        iu, iv = iu.astype(np.int64) + salt, iv.astype(np.int64)
        perm = self.perm

        def lattice(i: np.ndarray, j: np.ndarray) -> np.ndarray:
            return perm[(perm[i & 255] + j) & 255] / 255.0

        su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
        top = lattice(iu, iv) * (1 - su) + lattice(iu + 1, iv) * su
        bottom = lattice(iu, iv + 1) * (1 - su) + lattice(iu + 1, iv + 1) * su
        return top * (1 - sv) + bottom * sv

    def _pattern(self, surface: _Surface, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        f = surface.frequency
        if surface.pattern == "checker":
            return ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float64)
        if surface.pattern == "stripes":
            return np.clip(2.0 * np.sin(2 * np.pi * f * (u + 0.5 * v)), -1, 1) * 0.5 + 0.5
        if surface.pattern == "planks":
            # One random tone per plank plus grain, like a wooden floor.
            plank = np.floor(v * f)
            tone = self._noise(plank * 7.31, np.zeros_like(plank), surface.salt)
            grain = self._noise(u * 3 * f, v * 0.5 * f, surface.salt + 1)
            return 0.6 * tone + 0.4 * grain
        noise = 0.65 * self._noise(u * f, v * f, surface.salt) + 0.35 * self._noise(
            u * 2.7 * f, v * 2.7 * f, surface.salt + 2
        )
        return noise

    def color(
        self,
        surface_ids: Int[np.ndarray, " N"],
        points: Float[np.ndarray, "N 3"],
        normals: Float[np.ndarray, "N 3"],
    ) -> Float[np.ndarray, "N 3"]:
        """Shaded RGB in [0, 1] of each surface point."""
        # Planar coordinates along the two axes orthogonal to the dominant normal axis: exact for boxes,
        # continuous enough on spheres and cylinders.
        axis = np.abs(normals).argmax(axis=-1)
        u = np.where(axis == 0, points[:, 1], points[:, 0])
        v = np.where(axis == 2, points[:, 1], points[:, 2])
        out = np.zeros_like(points, dtype=np.float64)
        for sid in np.unique(surface_ids):
            surface = self.surfaces[int(sid)]
            mask = surface_ids == sid
            mix = self._pattern(surface, u[mask], v[mask])[:, None]
            albedo = surface.color_a * (1 - mix) + surface.color_b * mix
            detail = self._noise(u[mask] * 40.0, v[mask] * 40.0, surface.salt + 3)[:, None] - 0.5
            out[mask] = albedo * (1.0 + 0.25 * detail)
        shade = 0.55 + 0.45 * np.clip(normals @ self.light, 0.0, None)
        return np.clip(out * shade[:, None], 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Primitives: analytic ray intersection, area sampling, and containment (to drop hidden samples)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    return 1.0 / np.where(np.abs(d) < 1e-12, np.where(d < 0, -1e-12, 1e-12), d)


def _intersect_boxes(
    lo: Float[np.ndarray, "B 3"], hi: Float[np.ndarray, "B 3"], o: np.ndarray, d: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest entry into any of B axis-aligned boxes (slab test, all boxes at once).

    Returns t [N] (inf on a miss), outward unit normals [N, 3] and the index of the box hit [N].
    """
    inv = _safe_inverse(d)
    # Per-axis [B, N] slabs keep every operation on contiguous rows.
    t_near, t_far, near_axis = None, None, None
    for axis in range(3):
        t1 = (lo[:, axis, None] - o[None, :, axis]) * inv[None, :, axis]
        t2 = (hi[:, axis, None] - o[None, :, axis]) * inv[None, :, axis]
        lo_t, hi_t = np.minimum(t1, t2), np.maximum(t1, t2)
        if t_near is None:
            t_near, t_far, near_axis = lo_t, hi_t, np.zeros(lo_t.shape, dtype=np.int8)
        else:
            near_axis = np.where(lo_t > t_near, axis, near_axis).astype(np.int8)
            t_near, t_far = np.maximum(t_near, lo_t), np.minimum(t_far, hi_t)
    t_near = np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)
    rows = np.arange(d.shape[0])
    box = t_near.argmin(axis=0)
    axis = near_axis[box, rows]
    normals = np.zeros_like(d)
    normals[rows, axis] = -np.sign(d[rows, axis])
    return t_near[box, rows], normals, box


@dataclass
class _Box:
    lo: np.ndarray
    hi: np.ndarray
    surface: int

    def faces(self) -> List[Tuple[int, float, float, np.ndarray]]:
        """(axis, outward normal sign, area, a corner on the face) of each of the six faces."""
        size = self.hi - self.lo
        out = []
        for axis in range(3):
            area = float(np.prod(np.delete(size, axis)))
            out.append((axis, -1.0, area, self.lo))
            out.append((axis, 1.0, area, self.hi))
        return out

    def area(self) -> float:
        return sum(face[2] for face in self.faces())

    def sample(self, rng: np.random.Generator, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        faces = self.faces()
        areas = np.array([face[2] for face in faces])
        per_face = rng.multinomial(count, areas / areas.sum())
        points, normals = [], []
        for (axis, sign, _, corner), n in zip(faces, per_face, strict=True):
            p = self.lo + rng.random((n, 3)) * (self.hi - self.lo)
            p[:, axis] = corner[axis]
            normal = np.zeros((n, 3))
            normal[:, axis] = sign
            points.append(p)
            normals.append(normal)
        return np.concatenate(points), np.concatenate(normals), np.full(count, self.surface)

    def contains(self, p: np.ndarray, margin: float) -> np.ndarray:
        return np.all((p >= self.lo - margin) & (p <= self.hi + margin), axis=-1)


@dataclass
class _Room:
    """The inside of an axis-aligned box; faces ordered -x, +x, -y, +y, floor, ceiling."""

    lo: np.ndarray
    hi: np.ndarray
    face_surfaces: Tuple[int, int, int, int, int, int]

    def intersect(self, o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        inv = _safe_inverse(d)
        t1, t2 = (self.lo - o) * inv, (self.hi - o) * inv
        t_far_axes = np.maximum(t1, t2)
        axis = t_far_axes.argmin(axis=-1)
        rows = np.arange(d.shape[0])
        t_far = t_far_axes[rows, axis]
        positive = d[rows, axis] > 0
        normals = np.zeros_like(d)
        normals[rows, axis] = np.where(positive, -1.0, 1.0)  # pointing into the room
        face = 2 * axis + positive.astype(np.int64)
        surfaces = np.asarray(self.face_surfaces)[face]
        return np.where(t_far > _EPS, t_far, np.inf), normals, surfaces

    def face_areas(self) -> np.ndarray:
        size = self.hi - self.lo
        return np.repeat([size[1] * size[2], size[0] * size[2], size[0] * size[1]], 2)

    def area(self) -> float:
        return float(self.face_areas().sum())

    def sample_face(self, rng: np.random.Generator, face: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
        axis, positive = divmod(face, 2)
        p = self.lo + rng.random((count, 3)) * (self.hi - self.lo)
        p[:, axis] = self.hi[axis] if positive else self.lo[axis]
        normals = np.zeros((count, 3))
        normals[:, axis] = -1.0 if positive else 1.0
        return p, normals

    def near_boundary(self, p: np.ndarray, margin: float) -> np.ndarray:
        return np.any((p <= self.lo + margin) | (p >= self.hi - margin), axis=-1)


@dataclass
class _Sphere:
    center: np.ndarray
    radius: float
    surface: int

    def intersect(self, o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        oc = o - self.center
        a = np.einsum("ij,ij->i", d, d)
        b = 2.0 * np.einsum("ij,ij->i", oc, d)
        c = np.einsum("ij,ij->i", oc, oc) - self.radius**2
        disc = b * b - 4 * a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t = (-b - root) / (2 * a)
        hit = (disc >= 0) & (t > _EPS)
        t = np.where(hit, t, np.inf)
        normals = (o + np.where(hit, t, 0.0)[:, None] * d - self.center) / self.radius
        return t, normals, np.full(d.shape[0], self.surface)

    def area(self) -> float:
        return 4 * math.pi * self.radius**2

    def sample(self, rng: np.random.Generator, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        normals = rng.normal(size=(count, 3))
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        return self.center + self.radius * normals, normals, np.full(count, self.surface)

    def contains(self, p: np.ndarray, margin: float) -> np.ndarray:
        return np.linalg.norm(p - self.center, axis=-1) <= self.radius + margin


@dataclass
class _Cylinder:
    """A closed cylinder with a vertical (z) axis."""

    center_xy: np.ndarray
    radius: float
    z0: float
    z1: float
    surface: int

    def intersect(self, o: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        ox, oy = o[:, 0] - self.center_xy[0], o[:, 1] - self.center_xy[1]
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        a = dx * dx + dy * dy
        b = 2 * (ox * dx + oy * dy)
        c = ox * ox + oy * oy - self.radius**2
        disc = b * b - 4 * a * c
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
        z_side = o[:, 2] + t_side * dz
        side_ok = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (z_side >= self.z0) & (z_side <= self.z1)
        t_side = np.where(side_ok, t_side, np.inf)

        inv_dz = _safe_inverse(dz)
        t_caps, cap_normal_z = [], []
        for z, nz in ((self.z1, 1.0), (self.z0, -1.0)):
            t = (z - o[:, 2]) * inv_dz
            radial = (ox + t * dx) ** 2 + (oy + t * dy) ** 2
            t_caps.append(np.where((t > _EPS) & (radial <= self.radius**2), t, np.inf))
            cap_normal_z.append(nz)
        t_cap = np.minimum(t_caps[0], t_caps[1])
        cap_nz = np.where(t_caps[0] <= t_caps[1], cap_normal_z[0], cap_normal_z[1])

        use_side = t_side <= t_cap
        t = np.where(use_side, t_side, t_cap)
        t_finite = np.where(np.isfinite(t), t, 0.0)
        normals = np.zeros_like(d)
        normals[:, 0] = np.where(use_side, (ox + t_finite * dx) / self.radius, 0.0)
        normals[:, 1] = np.where(use_side, (oy + t_finite * dy) / self.radius, 0.0)
        normals[:, 2] = np.where(use_side, 0.0, cap_nz)
        return t, normals, np.full(d.shape[0], self.surface)

    def area(self) -> float:
        return 2 * math.pi * self.radius * (self.z1 - self.z0) + 2 * math.pi * self.radius**2

    def sample(self, rng: np.random.Generator, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        side = 2 * math.pi * self.radius * (self.z1 - self.z0)
        cap = math.pi * self.radius**2
        n_side, n_top, n_bottom = rng.multinomial(count, np.array([side, cap, cap]) / (side + 2 * cap))
        angle = rng.random(n_side) * 2 * math.pi
        side_normals = np.stack([np.cos(angle), np.sin(angle), np.zeros(n_side)], axis=-1)
        side_points = np.concatenate(
            [self.center_xy + self.radius * side_normals[:, :2], rng.uniform(self.z0, self.z1, (n_side, 1))],
            axis=-1,
        )
        points, normals = [side_points], [side_normals]
        for n, z, nz in ((n_top, self.z1, 1.0), (n_bottom, self.z0, -1.0)):
            r = self.radius * np.sqrt(rng.random(n))
            phi = rng.random(n) * 2 * math.pi
            xy = self.center_xy + np.stack([r * np.cos(phi), r * np.sin(phi)], axis=-1)
            points.append(np.concatenate([xy, np.full((n, 1), z)], axis=-1))
            normals.append(np.tile([0.0, 0.0, nz], (n, 1)))
        return np.concatenate(points), np.concatenate(normals), np.full(count, self.surface)

    def contains(self, p: np.ndarray, margin: float) -> np.ndarray:
        radial = np.linalg.norm(p[:, :2] - self.center_xy, axis=-1)
        return (
            (radial <= self.radius + margin) & (p[:, 2] >= self.z0 - margin) & (p[:, 2] <= self.z1 + margin)
        )


_Solid = Union[_Box, _Sphere, _Cylinder]


# ----------------------------------------------------------------------------------------------------
# The scene


@dataclass
class SyntheticScene:
    """Geometry and appearance of one procedural room, with analytic ray casting."""

    room: _Room
    solids: List[_Solid]
    appearance: _Appearance
    surfaces: List[_Surface]

    def cast(
        self, origins: Float[np.ndarray, "N 3"], directions: Float[np.ndarray, "N 3"]
    ) -> Tuple[Float[np.ndarray, " N"], Float[np.ndarray, "N 3"], Int[np.ndarray, " N"]]:
        """Nearest hit of each ray: ray parameter t, unit normal, surface index.

        ``origins + t * directions`` is the hit point; with camera directions whose z is -1 in the camera
        frame, t is the z-depth. The room is closed, so every ray hits something.
        """
        best_t, best_n, best_s = self.room.intersect(origins, directions)
        boxes = [solid for solid in self.solids if isinstance(solid, _Box)]
        hits = []
        if boxes:
            lo = np.stack([b.lo for b in boxes])
            hi = np.stack([b.hi for b in boxes])
            t, n, index = _intersect_boxes(lo, hi, origins, directions)
            hits.append((t, n, np.array([b.surface for b in boxes])[index]))
        hits += [s.intersect(origins, directions) for s in self.solids if not isinstance(s, _Box)]
        for t, n, s in hits:
            closer = t < best_t
            best_t = np.where(closer, t, best_t)
            best_n = np.where(closer[:, None], n, best_n)
            best_s = np.where(closer, s, best_s)
        return best_t, best_n, best_s

    def sample_surface_points(
        self, rng: np.random.Generator, density: float, min_per_part: int, margin: float = 0.005
    ) -> Tuple[Float[np.ndarray, "N 3"], Float[np.ndarray, "N 3"], Int[np.ndarray, " N"]]:
        """Area-uniform samples on every surface, without the parts hidden inside or against other parts."""
        points, normals, surfaces = [], [], []
        face_areas = self.room.face_areas()
        for face, area in enumerate(face_areas):
            p, n = self.room.sample_face(rng, face, max(min_per_part, round(area * density)))
            keep = ~np.any([solid.contains(p, margin) for solid in self.solids], axis=0)
            points.append(p[keep])
            normals.append(n[keep])
            surfaces.append(np.full(int(keep.sum()), self.room.face_surfaces[face]))
        for index, solid in enumerate(self.solids):
            p, n, s = solid.sample(rng, max(min_per_part, round(solid.area() * density)))
            covered = self.room.near_boundary(p, margin)
            for other_index, other in enumerate(self.solids):
                if other_index != index:
                    covered |= other.contains(p, margin)
            points.append(p[~covered])
            normals.append(n[~covered])
            surfaces.append(s[~covered])
        return np.concatenate(points), np.concatenate(normals), np.concatenate(surfaces).astype(np.int64)

    def labels_of(self, surface_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Class ids and instance ids of surface indices."""
        labels = np.array([s.label for s in self.surfaces], dtype=np.int64)
        instances = np.array([s.instance for s in self.surfaces], dtype=np.int64)
        return labels[surface_ids], instances[surface_ids]


def build_scene(config: SyntheticSceneConfig, rng: np.random.Generator) -> SyntheticScene:
    """Lay out the room and its furniture (with seeded jitter) and give every surface a texture."""
    sx, sy, sz = config.room_size
    lo, hi = np.array([-sx / 2, -sy / 2, 0.0]), np.array([sx / 2, sy / 2, sz])
    surfaces: List[_Surface] = []
    next_instance = [1]

    def surface(label: str, pattern: str, frequency: float, instance: Optional[int] = None) -> int:
        if instance is None:
            instance = next_instance[0]
            next_instance[0] += 1
        # Plausible colours per class (text queries and image teachers see a room, not noise); the
        # second texture colour is a lighter or darker shade of the first with a slight hue shift.
        base = np.clip(np.asarray(_CLASS_COLOURS[label]) + rng.uniform(-0.08, 0.08, 3), 0.05, 0.95)
        contrast = rng.uniform(0.25, 0.45) * rng.choice([-1.0, 1.0])
        shade = np.clip(base * (1.0 + contrast) + rng.uniform(-0.06, 0.06, 3), 0.03, 0.97)
        surfaces.append(
            _Surface(
                label=_CLASS_IDS[label],
                instance=instance,
                color_a=base,
                color_b=shade,
                pattern=pattern,
                frequency=frequency * rng.uniform(0.85, 1.15),
                salt=int(rng.integers(0, 256)),
            )
        )
        return len(surfaces) - 1

    def new_instance() -> int:
        next_instance[0] += 1
        return next_instance[0] - 1

    def jitter() -> np.ndarray:
        return np.append(rng.uniform(-config.layout_jitter, config.layout_jitter, 2), 0.0)

    def box(center_xy: np.ndarray, size: Tuple[float, float], z0: float, z1: float, sid: int) -> _Box:
        half = np.array([size[0] / 2, size[1] / 2, 0.0])
        base = np.array([center_xy[0], center_xy[1], 0.0])
        return _Box(base - half + [0, 0, z0], base + half + [0, 0, z1], sid)

    room = _Room(
        lo,
        hi,
        (
            surface("wall", "stripes", 3.0),
            surface("wall", "noise", 2.5),
            surface("wall", "checker", 2.0),
            surface("wall", "noise", 3.5),
            surface("floor", "planks", 5.0),
            surface("ceiling", "noise", 1.5),
        ),
    )
    solids: List[_Solid] = []
    # The furniture positions are relative to the room's half extents so other room sizes still work.
    ex, ey = sx / 2, sy / 2

    # Table: top slab on four legs, one instance.
    table_id = new_instance()
    top_sid = surface("table", "planks", 9.0, table_id)
    leg_sid = surface("table", "noise", 6.0, table_id)
    table_c = np.array([0.0, -0.1 * ey]) + jitter()[:2]
    solids.append(box(table_c, (1.0, 0.6), 0.70, 0.76, top_sid))
    for lx in (-0.44, 0.44):
        for ly in (-0.24, 0.24):
            solids.append(box(table_c + [lx, ly], (0.05, 0.05), 0.0, 0.70, leg_sid))

    # Two chairs, one on each side of the table: seat, pedestal, backrest.
    for side in (-1.0, 1.0):
        chair_id = new_instance()
        seat_sid = surface("chair", "checker", 10.0, chair_id)
        frame_sid = surface("chair", "noise", 8.0, chair_id)
        c = table_c + [side * 0.85, 0.0] + jitter()[:2] * 0.5
        solids.append(box(c, (0.42, 0.42), 0.42, 0.48, seat_sid))
        solids.append(_Cylinder(np.asarray(c, dtype=np.float64), 0.05, 0.0, 0.42, frame_sid))
        solids.append(box(c + [side * 0.19, 0.0], (0.04, 0.42), 0.48, 0.95, frame_sid))

    # Sofa against the +y wall: base and backrest.
    sofa_id = new_instance()
    sofa_sid = surface("sofa", "noise", 4.0, sofa_id)
    back_sid = surface("sofa", "stripes", 6.0, sofa_id)
    sofa_x = float(jitter()[0])
    solids.append(
        _Box(np.array([sofa_x - 0.9, ey - 0.85, 0.0]), np.array([sofa_x + 0.9, ey, 0.42]), sofa_sid)
    )
    solids.append(
        _Box(np.array([sofa_x - 0.9, ey - 0.25, 0.42]), np.array([sofa_x + 0.9, ey, 0.85]), back_sid)
    )

    # Floor lamp in the (-x, -y) corner: pole and shade.
    lamp_id = new_instance()
    lamp_xy = np.array([-ex + 0.35, -ey + 0.35]) + jitter()[:2] * 0.5
    solids.append(_Cylinder(lamp_xy, 0.03, 0.0, 1.35, surface("lamp", "noise", 8.0, lamp_id)))
    solids.append(_Cylinder(lamp_xy, 0.2, 1.35, 1.65, surface("lamp", "stripes", 12.0, lamp_id)))

    # Cabinet in the (+x, -y) corner.
    cabinet_sid = surface("cabinet", "planks", 7.0)
    solids.append(
        _Box(np.array([ex - 0.5, -ey + 0.05, 0.0]), np.array([ex - 0.05, -ey + 0.65, 1.1]), cabinet_sid)
    )

    # Ball on the floor between the sofa and the second chair.
    ball_r = 0.16
    ball_xy = np.array([ex - 0.75, 0.25 * ey]) + jitter()[:2]
    solids.append(
        _Sphere(np.array([ball_xy[0], ball_xy[1], ball_r]), ball_r, surface("ball", "checker", 12.0))
    )

    # Picture on the -x wall.
    picture_sid = surface("picture", "noise", 6.0)
    solids.append(_Box(np.array([-ex, -0.5, 1.2]), np.array([-ex + 0.03, 0.5, 1.8]), picture_sid))

    appearance = _Appearance(surfaces, rng)
    return SyntheticScene(room=room, solids=solids, appearance=appearance, surfaces=surfaces)


# ----------------------------------------------------------------------------------------------------
# Cameras and rendering


def look_at_opengl(
    eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0])
) -> np.ndarray:
    """OpenGL camera-to-world (x right, y up, camera looking along -z) from ``eye`` towards ``target``."""
    forward = target - eye
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right = right / np.linalg.norm(right)
    true_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, eye
    return c2w


def make_cameras(config: SyntheticSceneConfig, rng: np.random.Generator) -> np.ndarray:
    """Camera-to-world matrices [num_views, 4, 4] on a jittered ring, looking at the room centre.

    Alternate views aim low and high so that both the floor and the ceiling are seen.
    """
    sx, sy, _ = config.room_size
    radii = np.array([sx / 2, sy / 2]) * config.camera_ring_fraction
    step = 2 * math.pi / config.num_views
    poses = []
    for k in range(config.num_views):
        angle = k * step + rng.uniform(-0.3, 0.3) * step
        scale = rng.uniform(0.85, 1.0)
        eye = np.array(
            [
                radii[0] * scale * math.cos(angle),
                radii[1] * scale * math.sin(angle),
                rng.uniform(*config.camera_height_range),
            ]
        )
        target_height = (0.55 if k % 2 == 0 else 1.3) + rng.uniform(-0.15, 0.15)
        target = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), target_height])
        poses.append(look_at_opengl(eye, target))
    return np.stack(poses)


def camera_rays(
    c2w: np.ndarray, config: SyntheticSceneConfig, offsets: np.ndarray
) -> Tuple[Float[np.ndarray, "N 3"], Float[np.ndarray, "N 3"]]:
    """Rays through pixel positions ``(i + offset_x, j + offset_y)`` for each offset in ``offsets`` [S, 2].

    Returns origins and un-normalised directions [S*H*W, 3] (sample-major, then row-major pixels),
    scaled so that the ray parameter is the z-depth.
    """
    f = config.focal_length
    cx, cy = config.width / 2.0, config.height / 2.0
    jj, ii = np.meshgrid(np.arange(config.height), np.arange(config.width), indexing="ij")
    u = ii[None].astype(np.float64) + offsets[:, 0, None, None]
    v = jj[None].astype(np.float64) + offsets[:, 1, None, None]
    # OpenCV pixel coordinates -> OpenGL camera frame (y up, looking along -z).
    d_cam = np.stack([(u - cx) / f, -(v - cy) / f, -np.ones_like(u)], axis=-1).reshape(-1, 3)
    directions = d_cam @ c2w[:3, :3].T
    origins = np.broadcast_to(c2w[:3, 3], directions.shape)
    return origins, directions


@dataclass
class RenderedView:
    """One rendered view."""

    rgb: UInt8[np.ndarray, "H W 3"]
    """Anti-aliased colour."""
    depth: Float[np.ndarray, "H W"]
    """z-depth in metres at pixel centres (distance along the optical axis, not along the ray)."""
    labels: Int[np.ndarray, "H W"]
    """Class id at pixel centres."""
    instances: Int[np.ndarray, "H W"]
    """Instance id at pixel centres."""


def render_view(scene: SyntheticScene, c2w: np.ndarray, config: SyntheticSceneConfig) -> RenderedView:
    """Ray cast one view: anti-aliased colour, and depth/labels/instances at pixel centres."""
    h, w, s = config.height, config.width, config.supersample
    sub = (np.arange(s) + 0.5) / s
    offsets = np.stack(np.meshgrid(sub, sub, indexing="xy"), axis=-1).reshape(-1, 2)
    origins, directions = camera_rays(c2w, config, offsets)
    t, normals, sids = scene.cast(origins, directions)
    colours = scene.appearance.color(sids, origins + t[:, None] * directions, normals)
    rgb = colours.reshape(s * s, h, w, 3).mean(axis=0)

    origins, directions = camera_rays(c2w, config, np.array([[0.5, 0.5]]))
    t, _, sids = scene.cast(origins, directions)
    if not np.isfinite(t).all():
        raise RuntimeError("a camera ray left the room; is a camera outside it?")
    labels, instances = scene.labels_of(sids)
    return RenderedView(
        rgb=np.round(rgb * 255).astype(np.uint8),
        depth=t.reshape(h, w),
        labels=labels.reshape(h, w),
        instances=instances.reshape(h, w),
    )


# ----------------------------------------------------------------------------------------------------
# Dataset writer


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def generate_synthetic_scene(
    out_dir: Path, config: Optional[SyntheticSceneConfig] = None, overwrite: bool = False
) -> Path:
    """Render the procedural room and write it as a nerfstudio dataset in ``out_dir``.

    Args:
        out_dir: Destination folder (created if needed).
        config: Scene parameters; defaults to :class:`SyntheticSceneConfig`.
        overwrite: Replace an existing dataset in ``out_dir``; otherwise an existing ``transforms.json``
            is an error. Only files this generator writes are removed.

    Returns:
        The path of the written ``transforms.json``.
    """
    config = config or SyntheticSceneConfig()
    out_dir = Path(out_dir)
    transforms_path = out_dir / "transforms.json"
    if transforms_path.exists() and not overwrite:
        raise FileExistsError(
            f"{transforms_path} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    for sub in _SUBFOLDERS:
        folder = out_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if _FRAME_FILE.match(stale.name):
                stale.unlink()

    rng = np.random.default_rng(config.seed)
    scene = build_scene(config, rng)
    poses = make_cameras(config, rng)
    per_view = [config.num_seed_points // config.num_views] * config.num_views
    per_view[0] += config.num_seed_points - sum(per_view)

    frames = []
    seed_xyz, seed_rgb = [], []
    f = config.focal_length
    for index, c2w in enumerate(poses):
        view = render_view(scene, c2w, config)
        frames.append(
            write_view_files(
                out_dir, f"{index:04d}.png", view.rgb, view.depth, view.labels, view.instances, c2w, _save_png
            )
        )
        xyz, rgb = seed_points_of_view(
            rng, view.rgb, view.depth, c2w, f, per_view[index], config.seed_point_noise
        )
        seed_xyz.append(xyz)
        seed_rgb.append(rgb)

    write_point_cloud(out_dir / "points3D.ply", np.concatenate(seed_xyz), np.concatenate(seed_rgb))

    points, normals, sids = scene.sample_surface_points(
        rng, config.labeled_points_per_m2, config.min_points_per_part
    )
    colours = np.round(scene.appearance.color(sids, points, normals) * 255).astype(np.uint8)
    labels, instances = scene.labels_of(sids)
    write_point_cloud(out_dir / "points_labeled.ply", points, colours, labels=labels, instance_ids=instances)

    write_classes(out_dir, CLASS_NAMES)
    record = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    transforms = pinhole_transforms(config.width, config.height, f, frames, synthetic_scene_config=record)
    transforms_path.write_text(json.dumps(transforms, indent=1) + "\n")
    return transforms_path


_SINGLE_ROOM_ONLY = ("room_size", "camera_ring_fraction", "camera_height_range", "layout_jitter")
"""Settings of the single room that a procedural collection has no use for."""


def _default(text: str):
    """A help hint for fields whose default depends on the mode (single room or collection)."""
    import tyro

    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


@dataclass
class SyntheticSceneCommand(SyntheticSceneConfig):
    """Write a procedural indoor scene (images, depth, per-pixel labels, labelled points) as a nerfstudio dataset,
    or with --num-scenes a collection of procedural scenes (rooms of several shapes and types, furnished, filmed by a
    walking hand-held camera) and its index, collection.json."""

    num_views: int = 24
    """Number of rendered views: on a jittered ring in the single room, along a hand-held walk in each scene of a collection."""
    width: Annotated[Optional[int], _default("96; 320 with --num-scenes")] = None  # type: ignore[assignment]
    """Image width in pixels."""
    height: Annotated[Optional[int], _default("72; 256 with --num-scenes")] = None  # type: ignore[assignment]
    """Image height in pixels."""
    supersample: Annotated[Optional[int], _default("2; 1 with --num-scenes")] = None  # type: ignore[assignment]
    """Colour samples per pixel along each axis (anti-aliasing); depth and labels use the pixel centre."""
    min_points_per_part: Annotated[Optional[int], _default("150; 20 with --num-scenes")] = None  # type: ignore[assignment]
    """Fewest labelled samples drawn on each primitive, so small objects are represented."""
    out: Annotated[
        Optional[Path], _default("data/synthetic_room; data/procedural_scenes with --num-scenes")
    ] = None
    """Output folder."""
    overwrite: bool = False
    """Replace an existing dataset in the output folder (with --num-scenes: regenerate finished scenes made with other settings, which are otherwise an error)."""
    num_scenes: Optional[int] = None
    """Write a collection of this many procedural scenes (OUT/proc_000000, ...) and its index OUT/collection.json instead of the single demo room; rerunning the same command resumes an interrupted run."""
    workers: Annotated[Optional[int], _default("the number of CPUs")] = None
    """With --num-scenes: worker processes."""
    val_fraction: float = 0.05
    """With --num-scenes: fraction of scenes in the validation split (a hash of the scene name decides)."""
    test_fraction: float = 0.05
    """With --num-scenes: fraction of scenes in the test split (a hash of the scene name decides)."""
    labeled_points_seen_only: bool = False
    """With --num-scenes: keep only the labelled points some view sees, as in a scan's reconstruction (ScanNet's
    labelled points); by default every surface of the room, seen or not."""

    def __post_init__(self) -> None:
        pass  # each mode checks its own configuration (SyntheticSceneConfig, ProceduralSceneConfig)


def main() -> None:
    """Console entry point ``splatsem-synthetic``."""
    import tyro

    command = tyro.cli(SyntheticSceneCommand)
    if command.num_scenes is not None:
        _write_collection(command)
        return
    if command.labeled_points_seen_only:
        raise SystemExit("--labeled-points-seen-only is a setting of collections (--num-scenes N)")
    # Fields the command leaves unset (None) take the single room's own defaults.
    fields = {
        f.name: f.default if getattr(command, f.name) is None else getattr(command, f.name)
        for f in dataclass_fields(SyntheticSceneConfig)
    }
    out = command.out if command.out is not None else Path("data/synthetic_room")
    path = generate_synthetic_scene(out, SyntheticSceneConfig(**fields), overwrite=command.overwrite)
    print(f"wrote {path}")


def _write_collection(command: SyntheticSceneCommand) -> None:
    """``splatsem-synthetic --num-scenes N``: a procedural collection (``splatsem_ns.data.procedural``)."""
    from splatsem_ns.data.collection import CollectionError
    from splatsem_ns.data.procedural.generate import CollectionConfig, generate_collection
    from splatsem_ns.data.procedural.scene import ProceduralSceneConfig

    defaults = SyntheticSceneConfig()
    ignored = [name for name in _SINGLE_ROOM_ONLY if getattr(command, name) != getattr(defaults, name)]
    if ignored:
        raise SystemExit(
            f"--{', --'.join(n.replace('_', '-') for n in ignored)}: settings of the single demo room, not used with "
            "--num-scenes (collections draw room sizes, layouts and camera walks per scene)"
        )
    scene_defaults = ProceduralSceneConfig()
    try:
        scene = ProceduralSceneConfig(
            num_views=command.num_views,
            width=command.width if command.width is not None else scene_defaults.width,
            height=command.height if command.height is not None else scene_defaults.height,
            horizontal_fov_deg=command.horizontal_fov_deg,
            supersample=command.supersample
            if command.supersample is not None
            else scene_defaults.supersample,
            num_seed_points=command.num_seed_points,
            seed_point_noise=command.seed_point_noise,
            labeled_points_per_m2=command.labeled_points_per_m2,
            min_points_per_part=(
                command.min_points_per_part
                if command.min_points_per_part is not None
                else scene_defaults.min_points_per_part
            ),
            labeled_points_seen_only=command.labeled_points_seen_only,
        )
        config = CollectionConfig(
            num_scenes=command.num_scenes,
            seed=command.seed,
            workers=command.workers,
            val_fraction=command.val_fraction,
            test_fraction=command.test_fraction,
            scene=scene,
            overwrite=command.overwrite,
        )
        out = command.out if command.out is not None else Path("data/procedural_scenes")
        generate_collection(out, config)
    except (ValueError, CollectionError) as err:
        raise SystemExit(f"splatsem-synthetic: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
