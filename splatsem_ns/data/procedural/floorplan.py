"""Room shapes and the floor occupancy grid of procedural scenes.

A floor plan is an axis-aligned bounding box (floor at z = 0, ceiling at its top) plus solid wall blocks
inside it, all labelled wall:

- **rectangle**: one room, no blocks;
- **l_shape**: one room with a full-height block filling one corner;
- **two_rooms**: the box cut by a partition wall (two half-thickness blocks per side, so that each room has
  its own wall surfaces) with a doorway: the partition is split around the opening, with a lintel above it.

Each room is a ``Region`` (a rectangle of floor with a room type); the walls furniture can stand against are
``WallSegment`` s, found by walking along the region's sides and the blocks' faces and keeping the stretches
with solid behind and free floor in front. ``FloorGrid`` rasterises what stands on the floor (walls,
furniture footprints, heights, access zones); furniture placement and the camera walk both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from jaxtyping import Bool, Float

ROOM_SHAPES: Tuple[str, ...] = ("rectangle", "l_shape", "two_rooms")
ROOM_TYPES: Tuple[str, ...] = ("bedroom", "living_room", "kitchen", "bathroom", "office")

_ROOM_SIZE: Dict[str, Tuple[Tuple[float, float], Tuple[float, float]]] = {
    # Ranges of the two floor dimensions (metres) of a rectangular room of each type.
    "bedroom": ((3.0, 5.0), (3.0, 4.6)),
    "living_room": ((3.8, 7.0), (3.4, 6.0)),
    "kitchen": ((3.0, 5.5), (2.8, 4.8)),
    "bathroom": ((2.2, 3.4), (2.0, 3.0)),
    "office": ((3.0, 6.0), (3.0, 5.0)),
}
_TWO_ROOM_PAIRS: Tuple[Tuple[str, str], ...] = (
    ("bedroom", "bathroom"),
    ("living_room", "kitchen"),
    ("office", "bedroom"),
    ("living_room", "office"),
    ("bedroom", "living_room"),
    ("kitchen", "bathroom"),
    ("office", "bathroom"),
)
PARTITION_THICKNESS = 0.12
"""Thickness of the wall between the two rooms of a two_rooms plan, metres."""


@dataclass
class Region:
    """One room of a plan: a floor rectangle (partition walls excluded) and its type."""

    lo: Float[np.ndarray, " 2"]
    hi: Float[np.ndarray, " 2"]
    room_type: str

    def contains(self, xy: Float[np.ndarray, "N 2"], margin: float = 0.0) -> Bool[np.ndarray, " N"]:
        return np.all((xy >= self.lo + margin) & (xy <= self.hi - margin), axis=-1)

    @property
    def area(self) -> float:
        return float(np.prod(self.hi - self.lo))


@dataclass
class WallBlock:
    """A solid axis-aligned block labelled wall (L-shape corner, partition half, lintel)."""

    lo: Float[np.ndarray, " 3"]
    hi: Float[np.ndarray, " 3"]
    region: int
    """The room whose walls it continues (its surfaces look like that room's walls)."""


@dataclass
class WallSegment:
    """A straight stretch of wall that furniture can stand against."""

    start: Float[np.ndarray, " 2"]
    direction: Float[np.ndarray, " 2"]
    """Unit vector along the wall."""
    normal: Float[np.ndarray, " 2"]
    """Unit vector from the wall into the room."""
    length: float
    region: int
    outer: bool
    """On the plan's outer boundary (windows and entrance doors go there)."""

    def point(self, along: float) -> np.ndarray:
        return self.start + along * self.direction

    @property
    def yaw(self) -> float:
        """Yaw of an object standing against this wall with its front (local +y) facing into the room."""
        return math.atan2(self.normal[1], self.normal[0]) - math.pi / 2


@dataclass
class FloorPlan:
    shape: str
    lo: Float[np.ndarray, " 3"]
    hi: Float[np.ndarray, " 3"]
    blocks: List[WallBlock]
    regions: List[Region]
    split_axis: int = 0
    split_at: float = math.inf
    doorway: Optional[Tuple[np.ndarray, np.ndarray]] = None
    """Floor rectangle (lo, hi) of the opening between the rooms."""
    doorway_height: float = 0.0
    segments: List[WallSegment] = field(default_factory=list)

    @property
    def height(self) -> float:
        return float(self.hi[2] - self.lo[2])

    def solid_at(self, xy: Float[np.ndarray, "N 2"]) -> Bool[np.ndarray, " N"]:
        """Whether floor points are inside a wall (outside the box or in a floor-level block)."""
        solid = np.any((xy <= self.lo[:2]) | (xy >= self.hi[:2]), axis=-1)
        for block in self.blocks:
            if block.lo[2] <= 0.0:
                solid |= np.all((xy > block.lo[:2]) & (xy < block.hi[:2]), axis=-1)
        return solid

    def free_floor_area(self) -> float:
        area = float(np.prod(self.hi[:2] - self.lo[:2]))
        for block in self.blocks:
            if block.lo[2] <= 0.0:
                area -= float(np.prod(block.hi[:2] - block.lo[:2]))
        return area


def _room_type_for(rng: np.random.Generator, allow_bathroom: bool) -> str:
    types = [t for t in ROOM_TYPES if allow_bathroom or t != "bathroom"]
    weights = np.array([{"bathroom": 0.6}.get(t, 1.0) for t in types])
    return types[int(rng.choice(len(types), p=weights / weights.sum()))]


def make_floor_plan(rng: np.random.Generator, shape: str, height_range: Tuple[float, float]) -> FloorPlan:
    """A random plan of the given shape, centred on the origin in x and y."""
    height = float(rng.uniform(*height_range))
    blocks: List[WallBlock] = []
    split_axis, split_at, doorway, doorway_height = 0, math.inf, None, 0.0
    if shape == "rectangle":
        room_type = _room_type_for(rng, allow_bathroom=True)
        (a0, a1), (b0, b1) = _ROOM_SIZE[room_type]
        size = np.array([rng.uniform(a0, a1), rng.uniform(b0, b1)])
        if rng.random() < 0.5:
            size = size[::-1].copy()
        lo, hi = -size / 2, size / 2
        regions = [Region(lo.copy(), hi.copy(), room_type)]
    elif shape == "l_shape":
        room_type = _room_type_for(rng, allow_bathroom=False)
        size = np.array([rng.uniform(4.5, 7.5), rng.uniform(4.0, 6.5)])
        lo, hi = -size / 2, size / 2
        cut = size * rng.uniform(0.32, 0.5, 2)
        corner = rng.integers(0, 2, 2)  # which corner the block fills
        block_lo = np.where(corner == 0, lo, hi - cut)
        block_hi = np.where(corner == 0, lo + cut, hi)
        blocks.append(WallBlock(np.r_[block_lo, 0.0], np.r_[block_hi, height], 0))
        regions = [Region(lo.copy(), hi.copy(), room_type)]
    elif shape == "two_rooms":
        pair = _TWO_ROOM_PAIRS[int(rng.integers(len(_TWO_ROOM_PAIRS)))]
        if rng.random() < 0.5:
            pair = pair[::-1]
        lengths = [rng.uniform(*_ROOM_SIZE[t][0]) for t in pair]
        depth = float(rng.uniform(max(_ROOM_SIZE[t][1][0] for t in pair) + 0.4, 5.5))
        split_axis = int(rng.integers(0, 2))
        other = 1 - split_axis
        size = np.zeros(2)
        size[split_axis] = lengths[0] + PARTITION_THICKNESS + lengths[1]
        size[other] = depth
        lo, hi = -size / 2, size / 2
        wall_lo = lo[split_axis] + lengths[0]
        split_at = wall_lo + PARTITION_THICKNESS / 2
        wall_hi = wall_lo + PARTITION_THICKNESS
        door_width = float(rng.uniform(0.85, 1.1))
        doorway_height = float(min(rng.uniform(2.0, 2.15), height - 0.2))
        door_start = float(rng.uniform(lo[other] + 0.35, hi[other] - 0.35 - door_width))
        door_end = door_start + door_width
        regions = []
        for side, room_type in enumerate(pair):
            r_lo, r_hi = lo.copy(), hi.copy()
            if side == 0:
                r_hi[split_axis] = wall_lo
            else:
                r_lo[split_axis] = wall_hi
            regions.append(Region(r_lo, r_hi, room_type))
            # This room's half of the partition: below and above the doorway along the wall, and the lintel.
            half_lo, half_hi = (wall_lo, split_at) if side == 0 else (split_at, wall_hi)
            for a, b, z0 in (
                (lo[other], door_start, 0.0),
                (door_end, hi[other], 0.0),
                (door_start, door_end, doorway_height),
            ):
                b_lo, b_hi = np.zeros(3), np.zeros(3)
                b_lo[split_axis], b_hi[split_axis] = half_lo, half_hi
                b_lo[other], b_hi[other] = a, b
                b_lo[2], b_hi[2] = z0, height
                blocks.append(WallBlock(b_lo, b_hi, side))
        d_lo, d_hi = np.zeros(2), np.zeros(2)
        d_lo[split_axis], d_hi[split_axis] = wall_lo, wall_hi
        d_lo[other], d_hi[other] = door_start, door_end
        doorway = (d_lo, d_hi)
    else:
        raise ValueError(f"unknown room shape {shape!r}; use one of {ROOM_SHAPES}")
    plan = FloorPlan(
        shape=shape,
        lo=np.r_[lo, 0.0],
        hi=np.r_[hi, height],
        blocks=blocks,
        regions=regions,
        split_axis=split_axis,
        split_at=split_at,
        doorway=doorway,
        doorway_height=doorway_height,
    )
    plan.segments = find_wall_segments(plan)
    return plan


def find_wall_segments(plan: FloorPlan, step: float = 0.01, min_length: float = 0.3) -> List[WallSegment]:
    """Stretches of wall of each region: along the region's sides and the faces of blocks inside it, the points
    with solid just behind and free floor of the region just in front."""
    segments: List[WallSegment] = []
    for r, region in enumerate(plan.regions):
        lines: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (start, end, inward normal)
        lo, hi = region.lo, region.hi
        lines += [
            (np.array([lo[0], lo[1]]), np.array([lo[0], hi[1]]), np.array([1.0, 0.0])),
            (np.array([hi[0], lo[1]]), np.array([hi[0], hi[1]]), np.array([-1.0, 0.0])),
            (np.array([lo[0], lo[1]]), np.array([hi[0], lo[1]]), np.array([0.0, 1.0])),
            (np.array([lo[0], hi[1]]), np.array([hi[0], hi[1]]), np.array([0.0, -1.0])),
        ]
        for block in plan.blocks:
            if block.lo[2] > 0.0:
                continue
            b_lo, b_hi = np.maximum(block.lo[:2], lo), np.minimum(block.hi[:2], hi)
            if np.any(b_lo >= b_hi):
                continue
            lines += [
                (np.array([b_lo[0], b_lo[1]]), np.array([b_lo[0], b_hi[1]]), np.array([-1.0, 0.0])),
                (np.array([b_hi[0], b_lo[1]]), np.array([b_hi[0], b_hi[1]]), np.array([1.0, 0.0])),
                (np.array([b_lo[0], b_lo[1]]), np.array([b_hi[0], b_lo[1]]), np.array([0.0, -1.0])),
                (np.array([b_lo[0], b_hi[1]]), np.array([b_hi[0], b_hi[1]]), np.array([0.0, 1.0])),
            ]
        for start, end, normal in lines:
            length = float(np.linalg.norm(end - start))
            if length < min_length:
                continue
            direction = (end - start) / length
            along = np.arange(step / 2, length, step)
            points = start + along[:, None] * direction
            behind = plan.solid_at(points - 0.02 * normal)
            front = points + 0.05 * normal
            wall = behind & ~plan.solid_at(front) & region.contains(front)
            back = points - 0.02 * normal
            outer = np.any((back <= plan.lo[:2]) | (back >= plan.hi[:2]), axis=-1)
            # Runs of consecutive wall points of the same kind (outer or inner).
            kind = np.where(wall, np.where(outer, 2, 1), 0)
            edges = np.flatnonzero(np.diff(np.r_[0, kind, 0]) != 0)
            for a, b in zip(edges[:-1], edges[1:], strict=True):
                if kind[a] == 0:
                    continue
                seg_start = along[a] - step / 2
                seg_len = (b - a) * step
                if seg_len >= min_length:
                    segments.append(
                        WallSegment(
                            start=start + seg_start * direction,
                            direction=direction,
                            normal=normal,
                            length=float(seg_len),
                            region=r,
                            outer=bool(kind[a] == 2),
                        )
                    )
    return segments


# ----------------------------------------------------------------------------------------------------
# The floor grid


class FloorGrid:
    """What stands on the floor, rasterised on a square grid (rows: y, columns: x).

    Rasterisation is conservative both ways: a footprint marks every cell whose centre lies within half a
    cell diagonal of it, and a footprint is tested against the same cells, so two footprints whose cells are
    disjoint cannot overlap.
    """

    def __init__(self, plan: FloorPlan, cell: float) -> None:
        self.cell = cell
        self.lo = plan.lo[:2].copy()
        self.nx = int(math.ceil((plan.hi[0] - plan.lo[0]) / cell))
        self.ny = int(math.ceil((plan.hi[1] - plan.lo[1]) / cell))
        self.xs = self.lo[0] + (np.arange(self.nx) + 0.5) * cell
        self.ys = self.lo[1] + (np.arange(self.ny) + 0.5) * cell
        self.grow = cell * math.sqrt(0.5)
        shape = (self.ny, self.nx)
        self.wall = np.zeros(shape, dtype=bool)
        """Structural walls (and everything outside the box)."""
        self.blocked = np.zeros(shape, dtype=bool)
        """Furniture and other things standing on the floor."""
        self.reserved = np.zeros(shape, dtype=bool)
        """Kept free of furniture (access in front of furniture, door swings, the doorway); cameras may go there."""
        self.rug = np.zeros(shape, dtype=bool)
        self.floor_top = np.zeros(shape)
        """Highest top of what stands on each cell (metres)."""
        self.hang_bottom = np.full(shape, np.inf)
        """Lowest bottom of wall-mounted things over each cell (metres)."""
        self.tall = np.zeros(shape, dtype=bool)
        """Blocks a horizontal line of sight at eye height (walls, tall furniture)."""

        gx, gy = np.meshgrid(self.xs, self.ys)
        near_edge = (
            (gx - plan.lo[0] < self.grow)
            | (plan.hi[0] - gx < self.grow)
            | (gy - plan.lo[1] < self.grow)
            | (plan.hi[1] - gy < self.grow)
        )
        self.wall |= near_edge
        self.region = np.full(shape, -1, dtype=np.int64)
        """Index of the room each cell belongs to (-1: none, e.g. the doorway)."""
        for index, r in enumerate(plan.regions):
            self.region[(gx >= r.lo[0]) & (gx <= r.hi[0]) & (gy >= r.lo[1]) & (gy <= r.hi[1])] = index
        for block in plan.blocks:
            if block.lo[2] <= 0.0:
                centre = (block.lo[:2] + block.hi[:2]) / 2
                rows, cols, mask = self.cells(centre, (block.hi[:2] - block.lo[:2]) / 2, 0.0)
                self.wall[rows, cols] |= mask
        self.tall |= self.wall

    def snapshot(self) -> Tuple[np.ndarray, ...]:
        return tuple(
            a.copy()
            for a in (self.blocked, self.reserved, self.rug, self.floor_top, self.hang_bottom, self.tall)
        )

    def restore(self, state: Tuple[np.ndarray, ...]) -> None:
        self.blocked, self.reserved, self.rug, self.floor_top, self.hang_bottom, self.tall = (
            a.copy() for a in state
        )

    def cells(
        self, center: np.ndarray, half: np.ndarray, yaw: float, extra: float = 0.0
    ) -> Tuple[slice, slice, np.ndarray]:
        """Cells whose centres lie inside the rectangle (centre, half extents, yaw) grown by half a cell diagonal
        plus ``extra``: (row slice, column slice, mask over that window)."""
        c, s = math.cos(yaw), math.sin(yaw)
        grow = self.grow + extra
        hx, hy = half[0] + grow, half[1] + grow
        ex, ey = abs(c) * hx + abs(s) * hy, abs(s) * hx + abs(c) * hy
        c0 = max(0, int(math.floor((center[0] - ex - self.lo[0]) / self.cell)))
        c1 = min(self.nx, int(math.ceil((center[0] + ex - self.lo[0]) / self.cell)) + 1)
        r0 = max(0, int(math.floor((center[1] - ey - self.lo[1]) / self.cell)))
        r1 = min(self.ny, int(math.ceil((center[1] + ey - self.lo[1]) / self.cell)) + 1)
        if c0 >= c1 or r0 >= r1:
            return slice(0, 0), slice(0, 0), np.zeros((0, 0), dtype=bool)
        dx = self.xs[c0:c1][None, :] - center[0]
        dy = self.ys[r0:r1][:, None] - center[1]
        lx, ly = c * dx + s * dy, -s * dx + c * dy
        return slice(r0, r1), slice(c0, c1), (np.abs(lx) <= hx) & (np.abs(ly) <= hy)

    def walkable(self, clearance: float) -> Bool[np.ndarray, "ny nx"]:
        """Cells at least ``clearance`` from walls and furniture."""
        from scipy.ndimage import distance_transform_edt

        free = ~(self.wall | self.blocked)
        return distance_transform_edt(free) * self.cell >= clearance

    def to_cell(self, xy: Float[np.ndarray, "N 2"]) -> Tuple[np.ndarray, np.ndarray]:
        """(row, column) of the cells holding points (clipped to the grid)."""
        col = np.clip(np.floor((xy[..., 0] - self.lo[0]) / self.cell).astype(np.int64), 0, self.nx - 1)
        row = np.clip(np.floor((xy[..., 1] - self.lo[1]) / self.cell).astype(np.int64), 0, self.ny - 1)
        return row, col

    def centre(self, row: np.ndarray, col: np.ndarray) -> Float[np.ndarray, "N 2"]:
        return np.stack([self.xs[col], self.ys[row]], axis=-1)
