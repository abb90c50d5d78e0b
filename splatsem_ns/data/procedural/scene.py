"""One procedural scene: assembled from a layout, rendered, and written as a nerfstudio dataset.

A scene is a pure function of (generator settings, seed, scene index): its random stream is
``np.random.default_rng([seed, index, attempt])``, where ``attempt`` counts layouts drawn again because the
camera found no room to walk. The files it writes are the single-room generator's (``splatsem_ns.data.synthetic``)::

    transforms.json      intrinsics, frames (OpenGL camera-to-world, OPENCV model), depth_unit_scale_factor 0.001,
                         ply_file_path, labeled_ply_file_path, classes_file_path, and "procedural_scene":
                         the generator settings and the scene's statistics
    classes.json         the NYU40 table {"1": "wall", ...}; label images hold NYU40 ids
    images/NNNN.png      RGB uint8
    depth/NNNN.png       z-depth, uint16 millimetres
    labels/NNNN.png      NYU40 class id per pixel, uint16 (every pixel labelled)
    instances/NNNN.png   instance id per pixel, uint16 (unique per object within the scene)
    points3D.ply         noisy points of surfaces the views saw (x y z red green blue), for Gaussian init
    points_labeled.ply   surface samples (x y z red green blue label instance_id), hidden parts removed (and, with
                         ``labeled_points_seen_only``, those no view sees)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image

from splatsem_ns.data.class_tables import NYU40
from splatsem_ns.data.ply_io import write_point_cloud
from splatsem_ns.data.procedural.appearance import (
    Lighting,
    SurfaceArrays,
    SurfaceFactory,
    SurfaceTable,
    random_lighting,
    shade,
    texture_bank,
)
from splatsem_ns.data.procedural.cameras import CameraPath, CameraPathConfig, walk
from splatsem_ns.data.procedural.layout import LayoutConfig, LayoutError, SceneLayout, make_layout
from splatsem_ns.data.procedural.primitives import (
    BOX,
    ROOM,
    PinholeCamera,
    RoomBox,
    Solids,
    cast_view,
    describe_hits,
    hidden_by_others,
    room_face_areas,
    rotate_z,
    sample_room_face,
    sample_solid,
)
from splatsem_ns.data.scene_files import (
    pinhole_transforms,
    seed_points_of_view,
    write_classes,
    write_view_files,
)
from splatsem_ns.data.view_sampling import views_seeing

GENERATOR_VERSION = 1
"""Bumped whenever the same settings would give different scenes; recorded in every scene."""
NYU40_IDS: Dict[str, int] = {name: class_id for class_id, name in NYU40.items()}
_FLOOR_MATERIALS = {
    "bathroom": (("floor_tile", 1.0),),
    "kitchen": (("floor_tile", 0.7), ("floor_wood", 0.3)),
    "bedroom": (("floor_wood", 0.7), ("carpet", 0.3)),
    "living_room": (("floor_wood", 0.75), ("carpet", 0.25)),
    "office": (("floor_wood", 0.5), ("carpet", 0.3), ("floor_tile", 0.2)),
}


@dataclass
class ProceduralSceneConfig:
    """Settings of every scene of a procedural collection."""

    num_views: int = 24
    """Views along the camera walk."""
    width: int = 320
    """Image width in pixels."""
    height: int = 256
    """Image height in pixels."""
    horizontal_fov_deg: float = 75.0
    """Horizontal field of view of the pinhole camera, degrees."""
    supersample: int = 1
    """Colour samples per pixel along each axis (depth and labels use the pixel centre). 1 renders fastest;
    textures are mip-mapped, so one sample does not alias much."""
    num_seed_points: int = 3000
    """Seed points (``points3D.ply``), back-projected from random pixels of the views, with noise."""
    seed_point_noise: float = 0.01
    """Standard deviation of the seed points' noise, metres (they mimic SfM points)."""
    labeled_points_per_m2: float = 400.0
    """Density of the labelled surface samples (``points_labeled.ply``)."""
    min_points_per_part: int = 20
    """Fewest labelled samples drawn on each primitive, so small parts are represented."""
    labeled_points_seen_only: bool = False
    """Keep only the labelled samples that some view sees (in front, inside the image, within 5 cm + 5% of the
    view's depth there), as a scan reconstructs only what its camera passed: ScanNet's labelled points are the
    vertices of such a reconstruction. Off: every surface of the layout that is not inside another solid, seen or
    not (a walk of 24 views sees about a quarter of them, while ceilings and the walls behind the walk stay)."""
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    """Room shapes and furnishing."""
    camera: CameraPathConfig = field(default_factory=CameraPathConfig)
    """The hand-held camera walk."""
    tile_size: int = 16
    """Screen tiles of the ray caster's culling, pixels (speed only: results do not depend on it)."""
    png_compression: int = 1
    """zlib level of the PNGs (0-9): 1 writes colour images about 4x faster than PIL's default 6, for files
    about 10% larger (depth 50% larger); labels compress well at any level."""
    max_attempts: int = 10
    """Layouts drawn for one scene before giving up (a layout is drawn again when the camera cannot walk)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_views <= 9999:
            raise ValueError(f"num_views must be in 1..9999, got {self.num_views}")
        if self.width < 2 or self.height < 2:
            raise ValueError(f"image size must be at least 2x2, got {self.width}x{self.height}")
        if not 10.0 <= self.horizontal_fov_deg <= 150.0:
            raise ValueError(f"horizontal_fov_deg must be in [10, 150], got {self.horizontal_fov_deg}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")

    @property
    def focal_length(self) -> float:
        """Focal length in pixels (square pixels)."""
        return 0.5 * self.width / math.tan(math.radians(self.horizontal_fov_deg) / 2.0)

    def pinhole(self) -> PinholeCamera:
        return PinholeCamera(self.width, self.height, self.focal_length, self.width / 2.0, self.height / 2.0)

    def to_record(self) -> Dict[str, Any]:
        """JSON-ready settings (what a finished scene records, and what resuming compares)."""
        record = asdict(self)
        record.pop("tile_size")  # speed only: the same scene at any tile size
        return json.loads(json.dumps(record))


def scene_rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    """The random stream of one attempt at scene ``index``: a function of (seed, index, attempt) only, so scenes
    do not depend on which worker makes them, or in what order."""
    return np.random.default_rng([int(seed), int(index), int(attempt)])


@dataclass
class ProceduralScene:
    """Everything needed to render and describe one scene."""

    seed: int
    index: int
    attempt: int
    layout: SceneLayout
    room: RoomBox
    solids: Solids
    surface_table: SurfaceTable
    surfaces: SurfaceArrays
    lighting: Lighting
    lighting_params: Dict[str, Any]
    path: CameraPath
    instance_classes: Dict[int, int]
    """Instance id -> NYU40 class id."""
    rng: np.random.Generator
    """The scene's stream, positioned after layout, lighting and cameras (point samples continue it)."""


def _choose(rng: np.random.Generator, options: Tuple[Tuple[str, float], ...]) -> str:
    weights = np.array([w for _, w in options])
    return options[int(rng.choice(len(options), p=weights / weights.sum()))][0]


def assemble(
    layout: SceneLayout, rng: np.random.Generator
) -> Tuple[RoomBox, Solids, SurfaceFactory, Dict[int, int]]:
    """Room faces, wall blocks and placed parts as solids with their surfaces and instance ids."""
    plan = layout.plan
    factory = SurfaceFactory(rng, texture_bank())
    instance_classes: Dict[int, int] = {}
    next_instance = [1]

    def new_instance(class_name: str) -> int:
        instance = next_instance[0]
        next_instance[0] += 1
        instance_classes[instance] = NYU40_IDS[class_name]
        return instance

    two = len(plan.regions) == 2
    face_surfaces = np.zeros((6, 2), dtype=np.int64)
    floor_material = [_choose(rng, _FLOOR_MATERIALS[r.room_type]) for r in plan.regions]
    for r in range(len(plan.regions)):
        for face in range(6):
            axis, positive = divmod(face, 2)
            if two and axis == plan.split_axis and positive != r:
                continue  # this end wall belongs to the other room
            # Face index = 2 * axis + (0 at the low end, 1 at the high end): z low (4) is the floor, z high (5) the
            # ceiling, the rest walls.
            name, material = {4: ("floor", floor_material[r]), 5: ("ceiling", "ceiling")}.get(
                face, ("wall", "wall_paint")
            )
            surface = factory.surface(
                NYU40_IDS[name], name, new_instance(name), material, look=("room", r, name)
            )
            face_surfaces[face, r] = surface
            if not two:
                face_surfaces[face, 1] = surface
    if two:
        # End walls exist in one room only; the other column is never looked up, keep it valid.
        for face in range(6):
            axis, positive = divmod(face, 2)
            if axis == plan.split_axis:
                face_surfaces[face, 1 - positive] = face_surfaces[face, positive]
    room = RoomBox(plan.lo, plan.hi, face_surfaces, plan.split_axis, plan.split_at if two else math.inf)

    kinds: List[int] = []
    centers: List[np.ndarray] = []
    halves: List[np.ndarray] = []
    yaws: List[float] = []
    surfaces: List[int] = []
    for block in plan.blocks:
        instance = new_instance("wall")
        kinds.append(BOX)
        centers.append((block.lo + block.hi) / 2)
        halves.append((block.hi - block.lo) / 2)
        yaws.append(0.0)
        surfaces.append(
            factory.surface(
                NYU40_IDS["wall"], "wall", instance, "wall_paint", look=("room", block.region, "wall")
            )
        )
    for index, placed in enumerate(layout.placed):
        parts = placed.world_parts()
        instances = {}
        for sub in sorted({p.sub for p in parts}):
            label = next(p.label for p in parts if p.sub == sub)
            instances[sub] = new_instance(label)
        for p in parts:
            kinds.append(p.kind)
            centers.append(p.center)
            halves.append(p.half)
            yaws.append(p.yaw)
            surfaces.append(
                factory.surface(
                    NYU40_IDS[p.label], p.label, instances[p.sub], p.material, look=(index, p.material)
                )
            )
    solids = Solids(
        np.array(kinds),
        np.array(centers).reshape(-1, 3),
        np.array(halves).reshape(-1, 3),
        np.array(yaws),
        np.array(surfaces),
    )
    return room, solids, factory, instance_classes


def _probe_camera(config: ProceduralSceneConfig) -> PinholeCamera:
    """A 12-ray-wide camera with the views' field of view: the walk checks candidate views with it."""
    width = 12
    height = max(2, round(width * config.height / config.width))
    focal = 0.5 * width / math.tan(math.radians(config.horizontal_fov_deg) / 2.0)
    return PinholeCamera(width, height, focal, width / 2.0, height / 2.0)


def film_targets(layout: SceneLayout) -> Tuple[np.ndarray, np.ndarray]:
    """What the camera walk films: the centre of each placed object (rugs and ceiling lamps excepted), weighted
    by the square root of its footprint so big furniture draws the eye more often than small things."""
    centres, weights = [], []
    for placed in layout.placed:
        if placed.where in ("rug", "ceiling", "door"):
            continue  # doors are seen in passing; filmed from a metre, a door leaf fills the view
        lo, hi = placed.model.bounds()
        centre = np.r_[
            placed.position + rotate_z(np.r_[(lo[:2] + hi[:2]) / 2, 0.0], placed.yaw)[:2],
            placed.z + (lo[2] + hi[2]) / 2,
        ]
        centres.append(centre)
        weights.append(math.sqrt(max(float(np.prod(hi[:2] - lo[:2])), 0.01)))
    return np.array(centres).reshape(-1, 3), np.array(weights)


def build_scene(config: ProceduralSceneConfig, seed: int, index: int) -> ProceduralScene:
    """Lay out, furnish, light and film scene ``index`` of the collection with ``seed``."""
    for attempt in range(config.max_attempts):
        rng = scene_rng(seed, index, attempt)
        try:
            layout = make_layout(rng, config.layout)
            room, solids, factory, instance_classes = assemble(layout, rng)
            targets, weights = film_targets(layout)
            probe_camera = _probe_camera(config)

            def probe(c2w: np.ndarray, room=room, solids=solids, camera=probe_camera) -> np.ndarray:
                return cast_view(room, solids, c2w, camera, tile=8).depth

            path = walk(rng, layout.grid, config.camera, config.num_views, targets, weights, probe)
        except LayoutError:
            continue
        lighting, lighting_params = random_lighting(rng, layout.lights)
        return ProceduralScene(
            seed=seed,
            index=index,
            attempt=attempt,
            layout=layout,
            room=room,
            solids=solids,
            surface_table=factory.table,
            surfaces=factory.table.arrays(),
            lighting=lighting,
            lighting_params=lighting_params,
            path=path,
            instance_classes=instance_classes,
            rng=rng,
        )
    raise RuntimeError(f"scene {index} (seed {seed}): no usable layout in {config.max_attempts} attempts")


# ----------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class RenderedView:
    rgb: UInt8[np.ndarray, "H W 3"]
    depth: Float[np.ndarray, "H W"]
    """z-depth in metres at pixel centres."""
    labels: Int[np.ndarray, "H W"]
    """NYU40 class id at pixel centres."""
    instances: Int[np.ndarray, "H W"]
    """Instance id at pixel centres."""


def _shade_hits(
    scene: ProceduralScene, c2w: np.ndarray, config: ProceduralSceneConfig, offset: Tuple[float, float]
):
    hits = cast_view(scene.room, scene.solids, c2w, config.pinhole(), offset, config.tile_size)
    depth = hits.depth.astype(np.float64).reshape(-1)
    directions = hits.directions.reshape(-1, 3).astype(np.float64)
    points = c2w[:3, 3] + depth[:, None] * directions
    described = describe_hits(scene.room, scene.solids, hits.primitive.reshape(-1), points)
    cosine = np.abs(np.einsum("ij,ij->i", described.normals, directions)) / np.linalg.norm(directions, axis=1)
    footprint = depth / config.focal_length / np.maximum(cosine, 0.2)
    colour = shade(texture_bank(), scene.surfaces, scene.lighting, described, footprint)
    return hits, described, colour


def render_view(
    scene: ProceduralScene, c2w: Float[np.ndarray, "4 4"], config: ProceduralSceneConfig
) -> RenderedView:
    """Colour (averaged over ``supersample``^2 sub-pixel rays), and depth, class and instance at pixel centres."""
    h, w, s = config.height, config.width, config.supersample
    hits, described, colour = _shade_hits(scene, c2w, config, (0.5, 0.5))
    if s > 1:
        colour = np.zeros_like(colour)
        for j in range(s):
            for i in range(s):
                colour += _shade_hits(scene, c2w, config, ((i + 0.5) / s, (j + 0.5) / s))[2]
        colour /= s * s
    labels = scene.surfaces.label[described.surface].reshape(h, w)
    instances = scene.surfaces.instance[described.surface].reshape(h, w)
    return RenderedView(
        rgb=np.round(colour.reshape(h, w, 3) * 255).astype(np.uint8),
        depth=hits.depth.astype(np.float64),
        labels=labels,
        instances=instances,
    )


def labeled_points(
    scene: ProceduralScene, density: float, min_per_part: int, margin: float = 0.005
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Area-uniform samples on every surface without the parts no camera can see (inside or against other
    solids, inside walls): points [N, 3], colours [N, 3] uint8, labels [N], instance ids [N]."""
    rng = scene.rng
    room, solids = scene.room, scene.solids
    points, owners = [], []
    for face, area in enumerate(room_face_areas(room)):
        p = sample_room_face(room, face, max(min_per_part, round(area * density)), rng)
        points.append(p)
        owners.append(np.full(p.shape[0], ROOM))
    areas = solids.area()
    for index in range(len(solids)):
        p = sample_solid(solids, index, max(min_per_part, round(float(areas[index]) * density)), rng)
        points.append(p)
        owners.append(np.full(p.shape[0], index))
    xyz = np.concatenate(points)
    owner = np.concatenate(owners)
    keep = ~hidden_by_others(solids, xyz, owner, margin, room)
    xyz, owner = xyz[keep], owner[keep]
    described = describe_hits(room, solids, owner, xyz)
    colour = shade(texture_bank(), scene.surfaces, scene.lighting, described, np.full(xyz.shape[0], 0.005))
    labels = scene.surfaces.label[described.surface]
    instances = scene.surfaces.instance[described.surface]
    return xyz, np.round(colour * 255).astype(np.uint8), labels, instances


# ----------------------------------------------------------------------------------------------------
# Statistics and writing


def _yaw_off_grid(yaw: float) -> float:
    """Degrees between ``yaw`` and the nearest multiple of 90 degrees."""
    d = math.degrees(yaw) % 90.0
    return min(d, 90.0 - d)


def scene_statistics(scene: ProceduralScene, class_pixels: np.ndarray, num_labeled: int) -> Dict[str, Any]:
    """What the scene holds (JSON-ready, deterministic)."""
    plan = scene.layout.plan
    placed = scene.layout.placed
    objects: Dict[str, int] = {}
    for p in placed:
        objects[p.model.name] = objects.get(p.model.name, 0) + 1
    per_class: Dict[str, int] = {}
    for class_id in scene.instance_classes.values():
        per_class[NYU40[class_id]] = per_class.get(NYU40[class_id], 0) + 1
    # An instance counts as rotated when its biggest part (a chair's seat, not a leg of its star base) is turned
    # more than 5 degrees off the walls' axes.
    rotated = 0
    for p in placed:
        biggest: Dict[int, Tuple[float, float]] = {}
        for part in p.world_parts():
            volume = float(np.prod(part.half))
            if volume > biggest.get(part.sub, (-1.0, 0.0))[0]:
                biggest[part.sub] = (volume, part.yaw)
        rotated += sum(_yaw_off_grid(yaw) > 5.0 for _, yaw in biggest.values())
    bank = texture_bank()
    used = {bank.names[t] for t in np.unique(scene.surfaces.texture)}
    photos = sorted(n for n in used if bank.is_photo[bank.index(n)])
    return {
        "room_shape": plan.shape,
        "room_types": [r.room_type for r in plan.regions],
        "size_m": [round(float(x), 3) for x in (plan.hi - plan.lo)],
        "floor_area_m2": round(plan.free_floor_area(), 3),
        "furnishing": [round(f, 3) for f in scene.layout.furnishing],
        "num_objects": len(placed),
        "objects": dict(sorted(objects.items())),
        "num_instances": len(scene.instance_classes),
        "instances_per_class": dict(sorted(per_class.items())),
        "class_pixels": {str(i): int(n) for i, n in enumerate(class_pixels) if n},
        "visible_classes": sorted(NYU40[i] for i, n in enumerate(class_pixels) if n and i in NYU40),
        "rotated_instances": int(rotated),
        "photo_textures": photos,
        "num_primitives": len(scene.solids),
        "num_labeled_points": int(num_labeled),
        "lighting": scene.lighting_params,
        "camera": scene.path.describe(),
        "layout_attempts": scene.attempt + 1,
    }


def generator_record(config: ProceduralSceneConfig, seed: int, index: int) -> Dict[str, Any]:
    """What a scene is a function of (stored in its transforms.json, compared when resuming)."""
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "index": int(index),
        "settings": config.to_record(),
    }


def _save_png(path: Path, array: np.ndarray, level: int) -> None:
    Image.fromarray(array).save(path, compress_level=level)


def write_scene(out_dir: Path, config: ProceduralSceneConfig, seed: int, index: int) -> Dict[str, Any]:
    """Build scene ``index`` and write it into ``out_dir`` (which should be a fresh, hidden temporary folder:
    the collection generator renames it into place when this returns). Returns the scene's statistics."""
    out_dir = Path(out_dir)
    for sub in ("images", "depth", "labels", "instances"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    scene = build_scene(config, seed, index)
    rng = scene.rng
    f = config.focal_length
    per_view = [config.num_seed_points // config.num_views] * config.num_views
    per_view[0] += config.num_seed_points - sum(per_view)
    class_pixels = np.zeros(max(NYU40) + 1, dtype=np.int64)
    frames, seed_xyz, seed_rgb, depths = [], [], [], []
    for view_index, c2w in enumerate(scene.path.poses):
        view = render_view(scene, c2w, config)
        if config.labeled_points_seen_only:
            depths.append(view.depth)
        frames.append(
            write_view_files(
                out_dir,
                f"{view_index:04d}.png",
                view.rgb,
                view.depth,
                view.labels,
                view.instances,
                c2w,
                lambda path, array: _save_png(path, array, config.png_compression),
            )
        )
        class_pixels += np.bincount(view.labels.ravel(), minlength=class_pixels.size)[: class_pixels.size]
        xyz, rgb = seed_points_of_view(
            rng, view.rgb, view.depth, c2w, f, per_view[view_index], config.seed_point_noise
        )
        seed_xyz.append(xyz)
        seed_rgb.append(rgb)
    write_point_cloud(out_dir / "points3D.ply", np.concatenate(seed_xyz), np.concatenate(seed_rgb))

    xyz, colours, labels, instances = labeled_points(
        scene, config.labeled_points_per_m2, config.min_points_per_part
    )
    if config.labeled_points_seen_only:
        camera = config.pinhole()
        intrinsics = np.array([[camera.focal, 0, camera.cx], [0, camera.focal, camera.cy], [0, 0, 1.0]])
        seen = (
            views_seeing(xyz, ((intrinsics, c2w, d) for c2w, d in zip(scene.path.poses, depths, strict=True)))
            > 0
        )
        xyz, colours, labels, instances = xyz[seen], colours[seen], labels[seen], instances[seen]
    write_point_cloud(out_dir / "points_labeled.ply", xyz, colours, labels=labels, instance_ids=instances)
    write_classes(out_dir, NYU40)
    stats = scene_statistics(scene, class_pixels, xyz.shape[0])
    transforms = pinhole_transforms(
        config.width,
        config.height,
        f,
        frames,
        procedural_scene={"generator": generator_record(config, seed, index), "stats": stats},
    )
    # Written last: a folder with transforms.json is a finished scene.
    (out_dir / "transforms.json").write_text(json.dumps(transforms, indent=1) + "\n")
    return stats


def read_scene_record(scene_dir: Path) -> Optional[Dict[str, Any]]:
    """The "procedural_scene" record of a finished scene, or None when it has none (or no transforms.json)."""
    path = Path(scene_dir) / "transforms.json"
    try:
        return json.loads(path.read_text()).get("procedural_scene")
    except (OSError, ValueError, AttributeError):
        return None
