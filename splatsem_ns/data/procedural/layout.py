"""Furnishing a floor plan: which objects each room type gets, and where they go.

Objects are placed in phases, every room of the plan in turn within each phase:

1. openings: entrance doors (floor level, with a swing zone kept free), windows on outer walls (with curtains
   or blinds), and in a two-room plan an open door leaf in the doorway (turned at a random angle) with the
   passage through it kept free;
2. rugs (flat, other furniture may stand on them);
3. furniture standing on the floor, in the room type's order: against a wall (back to the wall with a few
   degrees of jitter, often in a corner) or free-standing (any yaw, or facing the room's centre);
4. small objects on the tops of placed furniture (lamps on night stands, paper and books on desks);
5. things hung on walls above whatever stands there (pictures, mirrors, shelves, televisions, whiteboards);
6. ceiling lamps.

Placement never overlaps: ``FloorGrid`` holds walls, footprints, access zones and heights, and is tested
conservatively. A free-standing object (and any non-essential one) is only kept if the floor that stays
walkable with the camera clearance still forms one large area, so the camera walk has room.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from jaxtyping import Float

from splatsem_ns.data.procedural.catalogue import BuildContext, Model, Part, build, open_door_leaf
from splatsem_ns.data.procedural.floorplan import ROOM_SHAPES, FloorGrid, FloorPlan, make_floor_plan
from splatsem_ns.data.procedural.primitives import rotate_z

EYE_LEVEL = (1.2, 1.5)
"""Parts spanning this height band block a horizontal line of sight (the camera's look-ahead test)."""


class LayoutError(RuntimeError):
    """The layout (or the camera walk in it) cannot be completed; the scene is drawn again."""


@dataclass(frozen=True)
class Item:
    """An entry of a room type's program."""

    model: str
    """Catalogue name (``catalogue.build``)."""
    where: str
    """"door", "window", "rug", "wall" (standing against a wall), "free" (standing anywhere), "hang" (on a wall)."""
    p: float = 1.0
    """Probability that the room gets it (scaled by the room's furnishing level unless essential)."""
    count: Tuple[int, int] = (1, 1)
    """Range of how many when it does."""
    essential: bool = False
    """Always attempted, and kept even if it leaves little floor to walk on."""


PROGRAMS: Dict[str, Tuple[Item, ...]] = {
    "bedroom": (
        Item("door", "door", 0.9, essential=True),
        Item("window", "window", 1.0, (1, 2), essential=True),
        Item("rug", "rug", 0.5),
        Item("bed_set", "wall", essential=True),
        Item("wardrobe", "wall", 0.7),
        Item("dresser", "wall", 0.5),
        Item("desk_set", "wall", 0.4),
        Item("bookshelf", "wall", 0.35),
        Item("low_cabinet", "wall", 0.25),
        Item("armchair", "free", 0.3),
        Item("chair", "wall", 0.3),
        Item("floor_lamp", "wall", 0.35),
        Item("plant", "wall", 0.35),
        Item("box_stack", "free", 0.5, (1, 2)),
        Item("bag", "free", 0.5),
        Item("picture", "hang", 0.9, (1, 3)),
        Item("mirror", "hang", 0.3),
        Item("wall_tv", "hang", 0.15),
        Item("wall_shelves", "hang", 0.35),
    ),
    "living_room": (
        Item("door", "door", 0.9, essential=True),
        Item("window", "window", 1.0, (1, 3), essential=True),
        Item("rug", "rug", 0.6),
        Item("sofa_set", "wall", essential=True),
        Item("tv_unit", "wall", 0.75),
        Item("bookshelf", "wall", 0.6, (1, 2)),
        Item("armchair", "free", 0.7, (1, 2)),
        Item("side_table", "wall", 0.5, (1, 2)),
        Item("floor_lamp", "wall", 0.5),
        Item("plant", "wall", 0.7, (1, 2)),
        Item("low_cabinet", "wall", 0.4),
        Item("dining_set", "free", 0.35),
        Item("chair", "wall", 0.25),
        Item("box_stack", "free", 0.3),
        Item("bag", "free", 0.25),
        Item("picture", "hang", 0.9, (1, 4)),
        Item("wall_shelves", "hang", 0.45),
        Item("wall_tv", "hang", 0.15),
        Item("mirror", "hang", 0.15),
    ),
    "kitchen": (
        Item("door", "door", 0.9, essential=True),
        Item("window", "window", 0.7, (1, 2), essential=True),
        # The table first: it needs the middle of the room, counters can go along any wall.
        Item("dining_set", "free", 0.85, essential=True),
        Item("counter_run", "wall", essential=True),
        Item("refrigerator", "wall", 0.9, essential=True),
        Item("counter_run", "wall", 0.35),
        Item("wardrobe", "wall", 0.25),
        Item("low_cabinet", "wall", 0.4),
        Item("chair", "wall", 0.25),
        Item("box_stack", "free", 0.5, (1, 2)),
        Item("bag", "free", 0.3),
        Item("plant", "wall", 0.3),
        Item("bath_mat", "rug", 0.2),
        Item("picture", "hang", 0.5),
        Item("wall_shelves", "hang", 0.55),
    ),
    "bathroom": (
        Item("door", "door", 0.95, essential=True),
        Item("window", "window", 0.5, essential=True),
        Item("bath_mat", "rug", 0.7),
        Item("bathtub", "wall", 0.75, essential=True),
        Item("toilet", "wall", essential=True),
        Item("vanity", "wall", essential=True),
        Item("low_cabinet", "wall", 0.3),
        Item("box_stack", "free", 0.15),
        Item("towel", "hang", 0.9, (1, 2)),
        Item("wall_shelves", "hang", 0.4),
        Item("picture", "hang", 0.3),
        Item("mirror", "hang", 0.1),
    ),
    "office": (
        Item("door", "door", 0.9, essential=True),
        Item("window", "window", 1.0, (1, 3), essential=True),
        Item("rug", "rug", 0.3),
        Item("desk_set", "wall", 1.0, (1, 3), essential=True),
        Item("bookshelf", "wall", 0.75, (1, 3)),
        Item("file_cabinet", "wall", 0.6, (1, 2)),
        Item("low_cabinet", "wall", 0.3),
        Item("meeting_set", "free", 0.35),
        Item("armchair", "free", 0.25),
        Item("chair", "wall", 0.3),
        Item("sofa", "wall", 0.15),
        Item("plant", "wall", 0.6, (1, 2)),
        Item("floor_lamp", "wall", 0.3),
        Item("box_stack", "free", 0.6, (1, 3)),
        Item("bag", "free", 0.3),
        Item("whiteboard", "hang", 0.6),
        Item("picture", "hang", 0.5, (1, 2)),
        Item("wall_shelves", "hang", 0.45),
        Item("wall_tv", "hang", 0.2),
    ),
}
"""What each room type may hold, in placement order within each phase."""

TOP_ITEMS: Dict[str, Tuple[Tuple[str, float], ...]] = {
    "desk": (
        ("paper_stack", 0.6),
        ("book_stack", 0.5),
        ("desk_lamp", 0.5),
        ("small_plant", 0.3),
        ("small_box", 0.2),
    ),
    "table": (
        ("book_stack", 0.3),
        ("paper_stack", 0.2),
        ("small_plant", 0.35),
        ("small_box", 0.15),
        ("table_lamp", 0.1),
    ),
    "night stand": (("table_lamp", 0.7), ("book_stack", 0.4)),
    "dresser": (("table_lamp", 0.4), ("small_box", 0.4), ("book_stack", 0.3), ("small_plant", 0.3)),
    "cabinet": (("small_box", 0.4), ("small_plant", 0.3), ("book_stack", 0.3), ("table_lamp", 0.2)),
    "counter": (("small_box", 0.4), ("small_plant", 0.3), ("book_stack", 0.1), ("paper_stack", 0.1)),
    "bookshelf": (("small_box", 0.4), ("small_plant", 0.3)),
}
"""Small objects that may be put on each kind of top, with their probabilities."""

_PHASES = ("door", "window", "rug", "floor", "top", "hang", "ceiling")


@dataclass
class LayoutConfig:
    """How rooms are shaped and furnished."""

    shape_weights: Tuple[float, float, float] = (0.4, 0.3, 0.3)
    """Relative frequency of rectangle, l_shape and two_rooms plans."""
    ceiling_height: Tuple[float, float] = (2.4, 3.0)
    """Range of room heights, metres."""
    furnishing: Tuple[float, float] = (0.8, 1.2)
    """Range of the factor a room's optional furniture probabilities are scaled by (sparse to full rooms)."""
    grid_cell: float = 0.025
    """Floor grid resolution, metres."""
    walk_clearance: float = 0.3
    """Clearance from walls and furniture of the camera walk (metres): furniture is kept only while enough floor
    stays walkable with it."""
    min_walkable_fraction: float = 0.35
    """Least fraction of the initially walkable floor that must stay walkable (in one piece) after placing a
    non-essential object."""
    max_lights: int = 4
    """Most point lights per scene (lamps beyond these are drawn but give no light)."""


@dataclass
class Placed:
    """A model placed in the scene."""

    model: Model
    position: Float[np.ndarray, " 2"]
    z: float
    yaw: float
    region: int
    where: str

    def world_parts(self) -> List[Part]:
        out = []
        offset = np.r_[self.position, self.z]
        for p in self.model.parts:
            center = rotate_z(p.center, self.yaw) + offset
            out.append(Part(p.kind, center, p.half, p.yaw + self.yaw, p.label, p.sub, p.material))
        return out

    def world_lights(self) -> List[np.ndarray]:
        offset = np.r_[self.position, self.z]
        return [rotate_z(light, self.yaw) + offset for light in self.model.lights]


@dataclass
class SceneLayout:
    plan: FloorPlan
    grid: FloorGrid
    placed: List[Placed]
    lights: Float[np.ndarray, "K 3"]
    furnishing: List[float] = field(default_factory=list)


def _centred(model: Model) -> Model:
    """The model translated so that its footprint's bounding box is centred on the origin."""
    lo, hi = model.bounds()
    shift = np.r_[(lo[:2] + hi[:2]) / 2, 0.0]
    if np.allclose(shift, 0.0):
        return model
    for p in model.parts:
        p.center = p.center - shift
    for t in model.tops:
        t.center = t.center - shift[:2]
    model.lights = [light - shift for light in model.lights]
    return model


class _Placer:
    def __init__(self, rng: np.random.Generator, plan: FloorPlan, config: LayoutConfig) -> None:
        self.rng = rng
        self.plan = plan
        self.config = config
        self.grid = FloorGrid(plan, config.grid_cell)
        self.spans: Dict[int, List[Tuple[float, float, float, float]]] = {}
        self.placed: List[Placed] = []
        self._walkable_area0: Optional[float] = None

    # -- helpers ------------------------------------------------------------------------------------

    def ctx(self, region: int, outer: bool = False) -> BuildContext:
        lengths = [s.length for s in self.plan.segments if s.region == region and (s.outer or not outer)]
        r = self.plan.regions[region]
        size = (float(r.hi[0] - r.lo[0]), float(r.hi[1] - r.lo[1]))
        return BuildContext(ceiling=self.plan.height, max_length=max(lengths, default=1.0), room_size=size)

    def _cells(self, center, half, yaw, extra=0.0):
        return self.grid.cells(
            np.asarray(center, dtype=np.float64), np.asarray(half, dtype=np.float64), yaw, extra
        )

    @staticmethod
    def _footprint(model: Model) -> Tuple[np.ndarray, float, float]:
        lo, hi = model.bounds()
        return (hi[:2] - lo[:2]) / 2, float(lo[2]), float(hi[2])

    def _largest_walkable(self) -> float:
        """Area (m^2) of the largest piece of floor keeping the walk clearance (on a grid coarsened twice,
        conservatively)."""
        from scipy.ndimage import distance_transform_edt, label

        g = self.grid
        obstacle = g.wall | g.blocked
        ny, nx = (obstacle.shape[0] // 2) * 2, (obstacle.shape[1] // 2) * 2
        coarse = obstacle[:ny, :nx].reshape(ny // 2, 2, nx // 2, 2).any(axis=(1, 3))
        walk = distance_transform_edt(~coarse) * (2 * g.cell) >= self.config.walk_clearance
        labels, count = label(walk)
        return 0.0 if count == 0 else float(np.bincount(labels.ravel())[1:].max()) * (2 * g.cell) ** 2

    def _walkable_ok(self) -> bool:
        """Whether the walkable floor still holds one piece of at least ``min_walkable_fraction`` of the
        reference (what was walkable before furniture)."""
        largest = self._largest_walkable()
        if self._walkable_area0 is None:
            self._walkable_area0 = largest
            return True
        return largest >= self.config.min_walkable_fraction * self._walkable_area0

    def _accept_anyway(self, fallback: Optional[Tuple]) -> bool:
        """Place an essential object where it fitted but cut the walkable floor (no better place was found); the
        reference is lowered so that what follows is judged against the floor that is left."""
        if fallback is None:
            return False
        self._commit_floor(*fallback)
        left = self._largest_walkable()
        if self._walkable_area0 is not None:
            self._walkable_area0 = min(self._walkable_area0, left / 0.6)
        return True

    # -- floor-standing ---------------------------------------------------------------------------------

    def _fits_floor(self, model: Model, pos: np.ndarray, yaw: float, region: int) -> bool:
        g = self.grid
        half, _, top = self._footprint(model)
        corners = (
            pos
            + rotate_z(
                np.array([[sx * half[0], sy * half[1], 0.0] for sx in (-1, 1) for sy in (-1, 1)]), yaw
            )[:, :2]
        )
        if not self.plan.regions[region].contains(corners).all():
            return False
        rows, cols, mask = self._cells(pos, half, yaw)
        if (g.wall[rows, cols] | g.blocked[rows, cols] | g.reserved[rows, cols])[mask].any():
            return False
        if (g.hang_bottom[rows, cols][mask] < top + 0.03).any():
            return False
        if model.access > 0:
            front = pos + rotate_z(np.array([0.0, half[1] + model.access / 2, 0.0]), yaw)[:2]
            rows, cols, mask = self._cells(front, (half[0], model.access / 2), yaw)
            if (g.wall[rows, cols] | g.blocked[rows, cols])[mask].any():
                return False
        return True

    def _mark_parts(self, placed: Placed, hanging: bool) -> None:
        """Heights and line-of-sight blockers of each part; ``hanging``: parts above the floor are wall-mounted
        (they lower ``hang_bottom``) rather than resting on something below."""
        g = self.grid
        for p in placed.world_parts():
            z0, z1 = p.center[2] - p.half[2], p.center[2] + p.half[2]
            # Round parts rasterise as their bounding box (conservative).
            rows, cols, mask = self._cells(p.center[:2], p.half[:2], p.yaw)
            if hanging and z0 >= 0.1:
                window = g.hang_bottom[rows, cols]
                window[mask] = np.minimum(window[mask], z0)
                continue
            window = g.floor_top[rows, cols]
            window[mask] = np.maximum(window[mask], z1)
            if z0 < EYE_LEVEL[1] and z1 > EYE_LEVEL[0]:
                g.tall[rows, cols] |= mask
            if hanging:
                g.blocked[rows, cols] |= mask

    def _commit_floor(self, model: Model, pos: np.ndarray, yaw: float, region: int, where: str) -> Placed:
        g = self.grid
        half, _, _ = self._footprint(model)
        rows, cols, mask = self._cells(pos, half, yaw)
        g.blocked[rows, cols] |= mask
        if model.access > 0:
            front = pos + rotate_z(np.array([0.0, half[1] + model.access / 2, 0.0]), yaw)[:2]
            rows, cols, mask = self._cells(front, (half[0], model.access / 2), yaw)
            g.reserved[rows, cols] |= mask
        placed = Placed(model, np.asarray(pos, dtype=np.float64), 0.0, float(yaw), region, where)
        self._mark_parts(placed, hanging=False)
        self.placed.append(placed)
        return placed

    def _try_floor(self, model, pos, yaw, region, where) -> Optional[bool]:
        """Place ``model`` if it fits and keeps enough floor walkable: True; fits but cuts the floor: None
        (undone); does not fit: False."""
        if not self._fits_floor(model, pos, yaw, region):
            return False
        state = self.grid.snapshot()
        self._commit_floor(model, pos, yaw, region, where)
        if self._walkable_ok():
            return True
        self.grid.restore(state)
        self.placed.pop()
        return None

    def against_wall(self, model: Model, region: int, essential: bool, tries: int = 30) -> bool:
        rng = self.rng
        half, _, _ = self._footprint(model)
        segments = [s for s in self.plan.segments if s.region == region and s.length >= 2 * half[0] + 0.12]
        if not segments:
            return False
        weights = np.array([s.length for s in segments])
        fallback = None
        for _ in range(tries):
            seg = segments[int(rng.choice(len(segments), p=weights / weights.sum()))]
            jitter = math.radians(rng.uniform(-3.0, 3.0))
            c, s = abs(math.cos(jitter)), abs(math.sin(jitter))
            along_half = c * half[0] + s * half[1]
            room = seg.length - 2 * along_half - 0.1
            if room < 0:
                continue
            if rng.random() < 0.35:  # into a corner
                along = along_half + 0.05 + (room if rng.random() < 0.5 else 0.0)
            else:
                along = along_half + 0.05 + rng.uniform(0.0, room)
            offset = 0.04 + rng.uniform(0.0, 0.02) + s * half[0] + c * half[1]
            pos = seg.point(along) + seg.normal * offset
            placed = self._try_floor(model, pos, seg.yaw + jitter, region, "wall")
            if placed:
                return True
            if placed is None and essential and fallback is None:
                fallback = (model, pos, seg.yaw + jitter, region, "wall")
        return self._accept_anyway(fallback)

    def _inside(self, region: int, half: np.ndarray, yaw: float) -> Optional[np.ndarray]:
        """A random centre keeping a rectangle of ``half`` extents turned by ``yaw`` inside the region (None
        when it cannot fit)."""
        r = self.plan.regions[region]
        c, s = abs(math.cos(yaw)), abs(math.sin(yaw))
        extent = np.array([c * half[0] + s * half[1], s * half[0] + c * half[1]]) + 0.01
        lo, hi = r.lo + extent, r.hi - extent
        if (lo > hi).any():
            return None
        return self.rng.uniform(lo, hi)

    def free_standing(self, model: Model, region: int, essential: bool, tries: int = 40) -> bool:
        rng = self.rng
        r = self.plan.regions[region]
        centre = (r.lo + r.hi) / 2
        half, _, _ = self._footprint(model)
        face_centre = model.name in ("armchair",)
        fallback = None
        for _ in range(tries):
            if face_centre:
                # Turned towards the middle of the room from a random spot.
                spot = rng.uniform(r.lo, r.hi)
                yaw = (
                    math.atan2(centre[1] - spot[1], centre[0] - spot[0])
                    - math.pi / 2
                    + rng.uniform(-0.4, 0.4)
                )
            elif rng.random() < (0.75 if model.name.endswith("_set") else 0.4):
                # Mostly square to the walls (big groups nearly always), otherwise at any angle.
                yaw = rng.integers(4) * math.pi / 2 + math.radians(rng.uniform(-5, 5))
            else:
                yaw = rng.uniform(0, 2 * math.pi)
            pos = self._inside(region, half, float(yaw))
            if pos is None:
                continue
            placed = self._try_floor(model, pos, float(yaw), region, "free")
            if placed:
                return True
            if placed is None and essential and fallback is None:
                fallback = (model, pos, float(yaw), region, "free")
        return self._accept_anyway(fallback)

    def rug(self, model: Model, region: int, tries: int = 20) -> bool:
        g, rng = self.grid, self.rng
        r = self.plan.regions[region]
        half, _, _ = self._footprint(model)
        for _ in range(tries):
            yaw = float(rng.integers(4) * math.pi / 2 + math.radians(rng.uniform(-8, 8)))
            pos = self._inside(region, half + 0.05, yaw)
            if pos is None:
                continue
            corners = (
                pos
                + rotate_z(
                    np.array([[sx * half[0], sy * half[1], 0.0] for sx in (-1, 1) for sy in (-1, 1)]), yaw
                )[:, :2]
            )
            if not r.contains(corners, margin=0.05).all():
                continue
            rows, cols, mask = self._cells(pos, half, yaw)
            if (g.wall[rows, cols] | g.blocked[rows, cols] | g.rug[rows, cols])[mask].any():
                continue
            g.rug[rows, cols] |= mask
            self.placed.append(Placed(model, pos, 0.0, yaw, region, "rug"))
            return True
        return False

    # -- on walls ---------------------------------------------------------------------------------------

    def on_wall(self, model: Model, region: int, outer_only: bool, tries: int = 25) -> bool:
        """Hang ``model`` flat against a wall (its back 2 mm off it); floor-level parts (door leaves, long
        curtains) need free floor, the rest must clear what stands below."""
        g, rng = self.grid, self.rng
        half, z_lo, z_hi = self._footprint(model)
        segments = [
            (i, s)
            for i, s in enumerate(self.plan.segments)
            if s.region == region and (s.outer or not outer_only) and s.length >= 2 * half[0] + 0.25
        ]
        if not segments:
            return False
        weights = np.array([s.length for _, s in segments])
        for _ in range(tries):
            index, seg = segments[int(rng.choice(len(segments), p=weights / weights.sum()))]
            along = rng.uniform(half[0] + 0.12, seg.length - half[0] - 0.12)
            a0, a1 = along - half[0], along + half[0]
            if any(
                a0 < b1 + 0.08 and b0 < a1 + 0.08 and z_lo < w1 + 0.05 and w0 < z_hi + 0.05
                for b0, b1, w0, w1 in self.spans.get(index, [])
            ):
                continue
            pos = seg.point(along) + seg.normal * (half[1] + 0.002)
            placed = Placed(model, pos, 0.0, seg.yaw, region, "hang")
            ok = True
            for p in placed.world_parts():
                z0 = p.center[2] - p.half[2]
                rows, cols, mask = self._cells(p.center[:2], p.half[:2], p.yaw)
                if z0 < 0.1:
                    ok = not (g.blocked[rows, cols] | g.reserved[rows, cols])[mask].any()
                else:
                    ok = not (g.floor_top[rows, cols][mask] > z0 - 0.03).any()
                if not ok:
                    break
            if ok and model.access > 0:
                front = pos + seg.normal * (half[1] + model.access / 2)
                rows, cols, mask = self._cells(front, (half[0], model.access / 2), seg.yaw)
                ok = not (g.wall[rows, cols] | g.blocked[rows, cols])[mask].any()
                if ok:
                    g.reserved[rows, cols] |= mask
            if not ok:
                continue
            self._mark_parts(placed, hanging=True)
            self.spans.setdefault(index, []).append((a0, a1, z_lo, z_hi))
            self.placed.append(placed)
            return True
        return False

    def place(self, model: Model, item: Item, region: int) -> bool:
        """Place ``model`` as ``item`` says (against a wall, free-standing, as a rug, or on a wall)."""
        if item.where == "wall":
            return self.against_wall(model, region, item.essential)
        if item.where == "free":
            return self.free_standing(model, region, item.essential)
        if item.where == "rug":
            return self.rug(model, region)
        # Doors mostly lead outside (they may also open to a closet); windows always look outside.
        outer = item.where == "window" or (item.where == "door" and self.rng.random() < 0.8)
        return self.on_wall(model, region, outer_only=outer)

    def doorway_leaf(self) -> None:
        """An open door leaf in the doorway between the two rooms, and the passage kept free of furniture."""
        plan, g, rng = self.plan, self.grid, self.rng
        assert plan.doorway is not None
        d_lo, d_hi = plan.doorway
        a, o = plan.split_axis, 1 - plan.split_axis
        side = int(rng.integers(2))
        into = -1.0 if side == 0 else 1.0
        face = d_lo[a] if side == 0 else d_hi[a]
        start_end = int(rng.integers(2))
        along_dir = 1.0 if start_end == 0 else -1.0
        hinge = np.zeros(2)
        hinge[a] = face + into * 0.03
        hinge[o] = (d_lo[o] + 0.03) if start_end == 0 else (d_hi[o] - 0.03)
        width = float(d_hi[o] - d_lo[o] - 0.06)
        alpha = math.radians(rng.uniform(70, 110))
        v = np.zeros(2)
        v[o] = along_dir * math.cos(alpha)
        v[a] = into * math.sin(alpha)
        model = open_door_leaf(rng, self.ctx(side), width, plan.doorway_height - 0.02)
        placed = Placed(model, hinge, 0.0, math.atan2(v[1], v[0]), side, "door")
        self._mark_parts(placed, hanging=False)
        for p in placed.world_parts():
            rows, cols, mask = self._cells(p.center[:2], p.half[:2], p.yaw)
            g.blocked[rows, cols] |= mask
        self.placed.append(placed)
        centre = (d_lo + d_hi) / 2
        half = np.zeros(2)
        half[o] = (d_hi[o] - d_lo[o]) / 2
        half[a] = 0.75
        rows, cols, mask = self._cells(centre, half, 0.0)
        g.reserved[rows, cols] |= mask

    # -- on tops and ceilings -----------------------------------------------------------------------------

    def on_tops(self, furnishing: List[float]) -> None:
        g, rng = self.grid, self.rng
        hosts = [p for p in self.placed if p.where in ("wall", "free")]
        for host in hosts:
            for top in host.model.tops:
                options = TOP_ITEMS.get(top.host, ())
                if not options:
                    continue
                centre = host.position + rotate_z(np.r_[top.center, 0.0], host.yaw)[:2]
                rows, cols, mask = self._cells(centre, top.half, host.yaw)
                above = g.hang_bottom[rows, cols][mask]
                headroom = min(
                    top.headroom,
                    self.plan.height - top.z - 0.15,
                    float(above.min(initial=np.inf)) - top.z - 0.05,
                )
                taken: List[Tuple[np.ndarray, float]] = []
                for name, p in options:
                    if rng.random() >= p * furnishing[host.region]:
                        continue
                    item = _centred(build(name, rng, self.ctx(host.region)))
                    half, _, height = self._footprint(item)
                    radius = float(np.hypot(*half))
                    if height > headroom or radius > min(top.half) + 0.02:
                        continue
                    for _ in range(8):
                        local = rng.uniform(-1, 1, 2) * np.maximum(top.half - radius, 0.0) + top.center
                        if all(np.linalg.norm(local - c) > radius + r + 0.02 for c, r in taken):
                            break
                    else:
                        continue
                    taken.append((local, radius))
                    pos = host.position + rotate_z(np.r_[local, 0.0], host.yaw)[:2]
                    placed = Placed(
                        item, pos, top.z, host.yaw + float(rng.uniform(-0.6, 0.6)), host.region, "top"
                    )
                    self._mark_parts(placed, hanging=False)
                    self.placed.append(placed)

    def ceiling_lamp(self, region: int) -> bool:
        g, rng = self.grid, self.rng
        r = self.plan.regions[region]
        model = _centred(build("ceiling_lamp", rng, self.ctx(region)))
        half, z_lo, _ = self._footprint(model)
        for _ in range(10):
            pos = rng.uniform(r.lo + 0.5, np.maximum(r.hi - 0.5, r.lo + 0.51))
            rows, cols, mask = self._cells(pos, half, 0.0)
            if (g.wall[rows, cols][mask]).any() or (g.floor_top[rows, cols][mask] > z_lo - 0.05).any():
                continue
            self.placed.append(Placed(model, pos, 0.0, 0.0, region, "ceiling"))
            return True
        return False


def make_layout(rng: np.random.Generator, config: LayoutConfig) -> SceneLayout:
    """A furnished floor plan drawn from ``rng``."""
    weights = np.asarray(config.shape_weights, dtype=np.float64)
    shape = ROOM_SHAPES[int(rng.choice(len(ROOM_SHAPES), p=weights / weights.sum()))]
    plan = make_floor_plan(rng, shape, config.ceiling_height)
    placer = _Placer(rng, plan, config)
    furnishing = [float(rng.uniform(*config.furnishing)) for _ in plan.regions]

    # Draw each room's program up front: how many of each item.
    wanted: List[List[Tuple[Item, int]]] = []
    for region, furnish in zip(plan.regions, furnishing, strict=True):
        program = []
        for item in PROGRAMS[region.room_type]:
            p = item.p if item.essential else item.p * furnish
            if rng.random() < p:
                program.append((item, int(rng.integers(item.count[0], item.count[1] + 1))))
        wanted.append(program)

    if plan.doorway is not None:
        placer.doorway_leaf()
    for phase in _PHASES:
        if phase == "top":
            placer.on_tops(furnishing)
            continue
        if phase == "ceiling":
            for region in range(len(plan.regions)):
                if rng.random() < 0.6:
                    placer.ceiling_lamp(region)
            continue
        if phase == "floor":
            placer._walkable_ok()  # the reference walkable area: after openings, before furniture
        for region, program in enumerate(wanted):
            for item, count in program:
                kind = {"wall": "floor", "free": "floor"}.get(item.where, item.where)
                if kind != phase:
                    continue
                for _ in range(count):
                    # A model that finds no place is drawn again once, smaller when it is a group standing in
                    # the middle of the room (a dining table for a smaller room, fewer chairs).
                    for shrink in (1.0, 0.75):
                        ctx = placer.ctx(region, outer=item.where == "window")
                        ctx.room_size = (ctx.room_size[0] * shrink, ctx.room_size[1] * shrink)
                        model = _centred(build(item.model, rng, ctx))
                        if placer.place(model, item, region):
                            break

    lights = [light for p in placer.placed for light in p.world_lights()][: config.max_lights]
    if not lights:
        # No lamp: an unseen light near each room's ceiling, so rooms are not lit by ambient light alone.
        lights = [np.r_[(r.lo + r.hi) / 2, plan.height - 0.3] for r in plan.regions]
    return SceneLayout(
        plan=plan, grid=placer.grid, placed=placer.placed, lights=np.array(lights), furnishing=furnishing
    )
