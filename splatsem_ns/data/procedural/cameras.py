"""Camera paths of procedural scenes: a person walking through the rooms, filming with a phone.

The walk stays on the floor cells that keep ``clearance`` from walls and furniture (the largest connected piece
of them). Like a person filming a room, it picks an object to look at for a few views (bigger ones more often,
preferring those not far off the current heading and in sight), turns towards it by at most a few degrees per
view, aims the pitch at it, and walks sideways around it (parallax) while keeping 1.2-2.8 m from it; then it
moves on to the next. Each step moves 0.15-0.35 m. A view is only taken when it has a long free line of sight
at eye level and, checked with a coarse ray cast of the scene, most of it lies more than ``min_view_depth``
away, so no view is a close-up of a wall or a door; otherwise the turn is widened. Height (1.2-1.7 m), pitch
(-30..+10 degrees) and a slight roll drift slowly. Neighbouring views therefore see mostly the same surfaces,
and views several steps apart still overlap, as in a real hand-held capture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
from jaxtyping import Float

from splatsem_ns.data.procedural.floorplan import FloorGrid
from splatsem_ns.data.procedural.layout import LayoutError


@dataclass
class CameraPathConfig:
    """The hand-held walk."""

    clearance: float = 0.3
    """Least distance from walls and furniture, metres (relaxed down to 0.15 m in crowded rooms)."""
    height_range: Tuple[float, float] = (1.2, 1.7)
    """Camera heights, metres."""
    pitch_range_deg: Tuple[float, float] = (-30.0, 10.0)
    """Pitch range (negative looks down), degrees."""
    step_range: Tuple[float, float] = (0.15, 0.35)
    """Distance between consecutive views, metres."""
    turn_range_deg: Tuple[float, float] = (4.0, 14.0)
    """Yaw change between consecutive views when no object is being filmed, degrees (towards an object the
    turn is what it takes, at most the upper bound)."""
    min_sight: float = 1.5
    """Free horizontal line of sight wanted along the view direction, metres."""
    min_view_depth: float = 0.8
    """Depth that at least 80% of a view must exceed (checked with a coarse ray cast), metres."""
    target_distance: Tuple[float, float] = (1.2, 2.8)
    """Distance kept from the object being filmed, metres."""
    views_per_target: Tuple[int, int] = (4, 8)
    """How many views are spent on one object before the next is chosen."""
    roll_std_deg: float = 1.5
    """Spread of the slowly drifting roll, degrees."""


@dataclass
class CameraPath:
    poses: Float[np.ndarray, "V 4 4"]
    """OpenGL camera-to-world matrices (x right, y up, looking along -z)."""
    positions: Float[np.ndarray, "V 3"]
    yaw: Float[np.ndarray, " V"]
    pitch: Float[np.ndarray, " V"]
    clearance: float
    """The clearance the walk could keep."""

    def describe(self) -> dict:
        steps = np.linalg.norm(np.diff(self.positions, axis=0), axis=1)
        forward = self.poses[:, :3, 2]
        cosines = np.clip(np.einsum("ij,ij->i", forward[1:], forward[:-1]), -1, 1)
        turns = np.degrees(np.arccos(cosines))
        return {
            "path_length_m": round(float(steps.sum()), 3),
            "mean_step_m": round(float(steps.mean()), 3) if steps.size else 0.0,
            "mean_turn_deg": round(float(turns.mean()), 2) if turns.size else 0.0,
            "clearance_m": self.clearance,
        }


def pose_matrix(position: np.ndarray, yaw: float, pitch: float, roll: float) -> Float[np.ndarray, "4 4"]:
    """OpenGL camera-to-world matrix of a camera at ``position`` looking along (yaw, pitch), rolled by
    ``roll`` (radians; yaw about +z from +x, pitch up from the horizon)."""
    forward = np.array([math.cos(pitch) * math.cos(yaw), math.cos(pitch) * math.sin(yaw), math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    up = np.cross(right, forward)
    c, s = math.cos(roll), math.sin(roll)
    right, up = c * right + s * up, -s * right + c * up
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def line_of_sight(
    grid: FloorGrid, position: Float[np.ndarray, " 2"], yaws: Float[np.ndarray, " K"], reach: float = 5.0
) -> Float[np.ndarray, " K"]:
    """Free horizontal distance from ``position`` along each yaw before a tall cell (capped at ``reach``)."""
    steps = np.arange(0.05, reach, grid.cell)
    directions = np.stack([np.cos(yaws), np.sin(yaws)], axis=-1)
    points = position + steps[None, :, None] * directions[:, None, :]
    row, col = grid.to_cell(points)
    outside = (
        (points[..., 0] < grid.lo[0])
        | (points[..., 1] < grid.lo[1])
        | (points[..., 0] >= grid.lo[0] + grid.nx * grid.cell)
        | (points[..., 1] >= grid.lo[1] + grid.ny * grid.cell)
    )
    blocked = grid.tall[row, col] | outside
    first = np.where(blocked.any(axis=1), blocked.argmax(axis=1), steps.size)
    return np.append(steps, reach)[first]


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _walkable_region(grid: FloorGrid, clearance: float) -> Tuple[np.ndarray, float]:
    """The largest connected piece of floor keeping ``clearance`` (relaxed by 5 cm steps down to 0.15 m when
    there is less than 0.5 m^2 of it) and the clearance kept."""
    from scipy.ndimage import label

    while True:
        labels, count = label(grid.walkable(clearance))
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            if sizes.max() * grid.cell**2 >= 0.5:
                return labels == (int(sizes.argmax()) + 1), clearance
        if clearance <= 0.15 + 1e-9:
            raise LayoutError("no walkable floor for the camera")
        clearance = max(0.15, clearance - 0.05)


def _route_to_other_room(
    rng: np.random.Generator, grid: FloorGrid, region: np.ndarray, position: np.ndarray
) -> Optional[np.ndarray]:
    """Walking distance (in cells) to an open spot of the room the camera is not in, over the walkable
    cells (inf elsewhere); None when the camera is in no room (the doorway)."""
    from scipy.ndimage import distance_transform_edt
    from skimage.graph import MCP_Geometric

    row, col = (a[0] for a in grid.to_cell(position[None]))
    here = grid.region[row, col]
    if here < 0:
        return None
    other = region & (grid.region >= 0) & (grid.region != here)
    if not other.any():
        return None
    openness = distance_transform_edt(region)
    rows, cols = np.nonzero(other)
    weights = openness[rows, cols] ** 2
    goal = int(rng.choice(rows.size, p=weights / weights.sum()))
    costs = np.where(region, 1.0, np.inf)
    distance, _ = MCP_Geometric(costs).find_costs([(int(rows[goal]), int(cols[goal]))])
    return distance


def walk(
    rng: np.random.Generator,
    grid: FloorGrid,
    config: CameraPathConfig,
    num_views: int,
    targets: Float[np.ndarray, "T 3"],
    weights: Float[np.ndarray, " T"],
    probe: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> CameraPath:
    """A hand-held camera path of ``num_views`` poses (see the module docstring).

    Args:
        rng: The scene's random stream.
        grid: The furnished floor (walkable cells, tall obstacles).
        config: The walk's settings.
        num_views: Number of poses.
        targets: Points worth filming (object centres), world coordinates.
        weights: How much each target attracts the camera (bigger objects more).
        probe: Depths seen from a camera-to-world pose through a coarse grid of rays (the scene's own ray
            caster). Without it only the floor grid's line of sight is checked.
    """
    from scipy.ndimage import distance_transform_edt

    region, clearance = _walkable_region(grid, config.clearance)
    rows, cols = np.nonzero(region)
    # Start where the floor is open (far from obstacles), so the first views look into the room.
    openness = distance_transform_edt(~(grid.wall | grid.blocked))[rows, cols]
    start = int(rng.choice(rows.size, p=openness**2 / (openness**2).sum()))
    position = (
        grid.centre(rows[start : start + 1], cols[start : start + 1])[0]
        + rng.uniform(-0.5, 0.5, 2) * grid.cell
    )
    targets = np.asarray(targets, dtype=np.float64).reshape(-1, 3)
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    filmed = np.ones(targets.shape[0])
    """Weight factor of each target, lowered once it has been filmed."""
    near_d, far_d = config.target_distance
    turn_lo, turn_hi = (math.radians(a) for a in config.turn_range_deg)
    pitch_lo, pitch_hi = (math.radians(a) for a in config.pitch_range_deg)
    h_lo, h_hi = config.height_range

    def free(p: np.ndarray) -> bool:
        r, c = grid.to_cell(p[None])
        return bool(region[r[0], c[0]])

    def pick_target(yaw: float, current: int) -> int:
        """A target in range and in sight, preferring big ones not far off the current heading (-1: none)."""
        if not targets.shape[0]:
            return -1
        offset = targets[:, :2] - position
        dist = np.linalg.norm(offset, axis=1)
        bearing = np.arctan2(offset[:, 1], offset[:, 0])
        turn = np.abs((bearing - yaw + math.pi) % (2 * math.pi) - math.pi)
        sight = line_of_sight(grid, position, bearing)
        ok = (
            (dist > near_d)
            & (dist < 6.0)
            & (sight >= np.minimum(dist - 0.6, config.min_sight))
            & (turn < 1.9)
        )
        ok &= np.arange(targets.shape[0]) != current
        if not ok.any():
            return -1
        score = weights * filmed * ok * np.exp(-turn)
        return int(rng.choice(targets.shape[0], p=score / score.sum()))

    def view_score(
        yaws: np.ndarray, pitch: float, roll: float, height: float, sight_wanted: float
    ) -> np.ndarray:
        """>= 0 for views worth taking (a free line of sight at eye level and, with a probe, 80% of the view
        beyond ``min_view_depth``); larger is better."""
        score = line_of_sight(grid, position, yaws) - sight_wanted
        if probe is not None:
            eye = np.r_[position, height]
            near = np.array([np.percentile(probe(pose_matrix(eye, y, pitch, roll)), 20) for y in yaws])
            score = np.minimum(score, near - config.min_view_depth)
        return score

    pitch = rng.uniform(math.radians(-20), math.radians(0))
    height = rng.uniform(h_lo + 0.1, h_hi - 0.1)
    roll = rng.normal(0, math.radians(config.roll_std_deg))
    candidates = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    score = view_score(candidates, pitch, roll, height, config.min_sight)
    best = np.argsort(-score, kind="stable")[: max(1, candidates.size // 4)]
    yaw = float(candidates[int(rng.choice(best))]) + rng.uniform(-0.05, 0.05)
    turn_sign = 1.0 if rng.random() < 0.5 else -1.0
    strafe = 1.0 if rng.random() < 0.5 else -1.0
    target, target_left = (
        pick_target(yaw, -1),
        int(rng.integers(config.views_per_target[0], config.views_per_target[1] + 1)),
    )

    # In a plan of two rooms the walk crosses into the other one partway, through the doorway, along the
    # shortest walkable route.
    rooms_reached = set(np.unique(grid.region[region]).tolist()) - {-1}
    cross_at = int(num_views * rng.uniform(0.35, 0.6)) if len(rooms_reached) > 1 else -1
    route: Optional[np.ndarray] = None

    poses, positions, yaws, pitches = [], [], [], []
    for view in range(num_views):
        eye = np.r_[position, height]
        poses.append(pose_matrix(eye, yaw, pitch, roll))
        positions.append(eye)
        yaws.append(yaw)
        pitches.append(pitch)

        if view == cross_at:
            route = _route_to_other_room(rng, grid, region, position)
            target = -1
        if route is not None:
            # Crossing: step downhill on the route's distance field, looking where the walk goes.
            step = rng.uniform(*config.step_range)
            angles = yaw + np.linspace(-math.pi, math.pi, 24, endpoint=False)
            goals = position + step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            r, c = grid.to_cell(goals)
            cost = np.where(region[r, c], route[r, c], np.inf)
            here = route[tuple(a[0] for a in grid.to_cell(position[None]))]
            best = int(np.argmin(cost))
            if not np.isfinite(cost[best]) or cost[best] >= here or here * grid.cell < 0.8:
                route = None  # arrived
            else:
                heading = math.atan2(goals[best, 1] - position[1], goals[best, 0] - position[0])
                yaw += float(np.clip(_wrap(heading - yaw), -turn_hi, turn_hi))
                pitch += float(np.clip(math.radians(-12) - pitch, -math.radians(5), math.radians(5)))
                height = float(np.clip(height + rng.normal(0, 0.02), h_lo, h_hi))
                roll = 0.85 * roll + rng.normal(0, math.radians(config.roll_std_deg) * 0.5)
                position = goals[best]
                continue

        target_left -= 1
        if target < 0 or target_left <= 0:
            if target >= 0:
                filmed[target] *= 0.3  # move on to other things
            target = pick_target(yaw, target)
            target_left = int(rng.integers(config.views_per_target[0], config.views_per_target[1] + 1))
        if target >= 0:
            # Film the target: turn towards it (at most turn_hi per view) and aim the pitch at its height.
            offset = targets[target, :2] - position
            dist = float(np.linalg.norm(offset))
            want = _wrap(math.atan2(offset[1], offset[0]) - yaw)
            turn = float(np.clip(want, -turn_hi, turn_hi)) + rng.normal(0, math.radians(1.5))
            # A little below the object's centre: people film what stands on the floor from above.
            want_pitch = math.atan2(targets[target, 2] - height, max(dist, 0.3)) - math.radians(6)
        else:
            # Nothing to film: keep turning one way, now and then the other.
            if rng.random() < 0.15:
                turn_sign = -turn_sign
            turn = turn_sign * rng.uniform(turn_lo, turn_hi)
            dist, want_pitch = 2.0, math.radians(-18.0)
        want_pitch = float(np.clip(want_pitch, pitch_lo, pitch_hi))
        pitch += float(np.clip(want_pitch - pitch, -math.radians(5), math.radians(5))) + rng.normal(
            0, math.radians(2)
        )
        pitch = float(np.clip(pitch, pitch_lo, pitch_hi))
        height = float(np.clip(height + rng.normal(0, 0.025), h_lo, h_hi))
        roll = 0.85 * roll + rng.normal(0, math.radians(config.roll_std_deg) * 0.5)

        # Widen the turn when the view would face something too close.
        options = np.array([turn, turn + turn_hi, turn - turn_hi, turn + 2 * turn_hi, turn - 2 * turn_hi])
        score = view_score(yaw + options, pitch, roll, height, min(config.min_sight, dist))
        good = np.flatnonzero(score >= 0)
        choice = int(good[0]) if good.size else int(np.argmax(score))
        if choice and target >= 0:
            target = -1  # the target cannot be filmed well from here: look elsewhere
        yaw = yaw + float(options[choice])

        # Walk sideways around what is filmed (parallax), closer or further to keep its distance in range.
        if rng.random() < 0.1:
            strafe = -strafe
        radial = 0.0 if near_d <= dist <= far_d else (0.8 if dist > far_d else -0.8)
        forward = np.array([math.cos(yaw), math.sin(yaw)])
        direction = np.array([forward[1], -forward[0]]) * strafe + radial * forward + rng.normal(0, 0.3, 2)
        heading = math.atan2(direction[1], direction[0])
        step = rng.uniform(*config.step_range)
        moved = False
        for scale in (1.0, 0.6):
            for delta in (0, 0.5, -0.5, 1.0, -1.0, 1.6, -1.6, 2.2, -2.2, math.pi):
                goal = position + scale * step * np.array(
                    [math.cos(heading + delta), math.sin(heading + delta)]
                )
                if free(goal) and free((position + goal) / 2):
                    position = goal
                    moved = True
                    if abs(delta) > 1.5:
                        strafe = -strafe  # blocked that way: walk back the other way
                    break
            if moved:
                break
    return CameraPath(
        poses=np.stack(poses),
        positions=np.stack(positions),
        yaw=np.array(yaws),
        pitch=np.array(pitches),
        clearance=round(float(clearance), 3),
    )
