"""Which views of a scene see the same surfaces, and how a training sample picks its context and target views.

A feed-forward model is given a few context views and asked to predict targets it was not shown. If the targets
look at another part of the room, nothing in the context can predict them, and the loss teaches noise; if the
context views barely overlap, the cost volume has nothing to match. So views are chosen by their overlap:

- ``view_overlap``: for every ordered pair (i, j), the fraction of view i's pixels (on a coarse grid) whose
  surface point, placed in 3D with i's depth, projects into view j in front of j's own depth there (a depth
  test: j sees that point). Without depth images, an approximation from the cameras alone (see
  ``camera_overlap``).
- ``choose_views``: a random anchor, context views that overlap what is already chosen by at least
  ``min_overlap`` but are not near-duplicates (``max_overlap``), then target views that the context covers best,
  never one that is also a context view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
from jaxtyping import Float, Int

from splatsem_ns.data.scene_frames import SceneFrames

OVERLAP_GRID = (48, 64)
"""(rows, cols) of the pixel grid the overlap is measured on: coarse, since it only ranks views."""


@dataclass
class ViewChoiceConfig:
    """How a training sample picks its views (see the module docstring)."""

    num_context_views: int = 2
    """Context views per sample (SemanticSplat and MVSplat train with 2; up to 8)."""
    num_target_views: int = 4
    """Target views per sample, never among the context views."""
    min_overlap: float = 0.3
    """A new context view must see at least this fraction of what an already chosen one sees (and vice versa)."""
    max_overlap: float = 0.9
    """...and at most this much: near-duplicate views give the cost volume no baseline."""
    target_min_overlap: float = 0.7
    """Target views are drawn among those whose surfaces the context sees at least this much; where too few
    qualify, the best covered ones are taken. A target pixel no context view sees can only be guessed: at 0.4, the
    16 held-out rooms of a generated collection got targets of 0.66 mean overlap, and the context pixels placed at
    their sensor depth covered 75% of them (``feedforward.sensor_depth``); at 0.7, 0.77 mean overlap. MVSplat and
    SemanticSplat score targets between their context views."""
    depth_tolerance: float = 0.05
    """Depth test of the overlap: a point is seen by another view when its depth there is within this fraction
    of the view's own depth measurement (plus 2 cm)."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_context_views <= 8:
            raise ValueError(f"num_context_views must be in 1..8, got {self.num_context_views}")
        if self.num_target_views < 0:
            raise ValueError(f"num_target_views must be >= 0, got {self.num_target_views}")
        if not 0.0 <= self.min_overlap <= self.max_overlap <= 1.0:
            raise ValueError(
                f"need 0 <= min_overlap ({self.min_overlap}) <= max_overlap ({self.max_overlap}) <= 1"
            )

    @property
    def views_per_sample(self) -> int:
        return self.num_context_views + self.num_target_views


def project_points(
    points: Float[np.ndarray, "M 3"],
    intrinsics: Float[np.ndarray, "3 3"],
    camera_to_world: Float[np.ndarray, "4 4"],
) -> Tuple[Float[np.ndarray, " M"], Float[np.ndarray, " M"], Float[np.ndarray, " M"]]:
    """Pixel coordinates (u right, v down) and z-depth of world points in an OpenGL camera."""
    rotation, centre = camera_to_world[:3, :3], camera_to_world[:3, 3]
    local = (points - centre) @ rotation  # world -> camera: R^T (p - t)
    z = -local[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics[0, 0] * local[:, 0] / z + intrinsics[0, 2]
        v = -intrinsics[1, 1] * local[:, 1] / z + intrinsics[1, 2]
    return u, v, z


def views_seeing(
    points: Float[np.ndarray, "M 3"],
    cameras: Iterable[Tuple[Float[np.ndarray, "3 3"], Float[np.ndarray, "4 4"], Float[np.ndarray, "H W"]]],
    tolerance: float = 0.05,
) -> Int[np.ndarray, " M"]:
    """How many of ``cameras`` (intrinsics, OpenGL camera-to-world, z-depth image in metres; 0 where nothing was
    measured) see each point: in front, inside the image, and within ``tolerance`` metres plus that fraction of the
    depth measured at its pixel (the surface the view shows there, not something in front of it)."""
    seen = np.zeros(len(points), dtype=np.int64)
    for intrinsics, camera_to_world, depth in cameras:
        height, width = depth.shape
        u, v, z = project_points(points, intrinsics, camera_to_world)
        inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        measured = np.zeros(len(points))
        measured[inside] = depth[v[inside].astype(int), u[inside].astype(int)]
        seen += inside & (measured > 0) & (np.abs(z - measured) <= tolerance + tolerance * measured)
    return seen


def view_overlap(frames: SceneFrames, tolerance: float = 0.05) -> Float[np.ndarray, "N N"]:
    """``overlap[i, j]``: the fraction of view i's measured pixels that view j sees (see the module docstring).
    Uses the depth images; a scene without them gets ``camera_overlap``."""
    if not frames.has_depth:
        return camera_overlap(frames)
    size = OVERLAP_GRID
    views = [frames.load_view(i, size, depth=True, labels=False) for i in range(len(frames))]
    depths = [v.depth for v in views]
    rows, cols = np.mgrid[0 : size[0], 0 : size[1]]
    u0, v0 = (cols.reshape(-1) + 0.5), (rows.reshape(-1) + 0.5)
    n = len(views)
    overlap = np.zeros((n, n))
    for i, view in enumerate(views):
        d = depths[i].reshape(-1).astype(np.float64)
        valid = np.isfinite(d) & (d > 0)
        if not valid.any():
            continue
        K = view.intrinsics
        x = (u0[valid] - K[0, 2]) / K[0, 0] * d[valid]
        y = -(v0[valid] - K[1, 2]) / K[1, 1] * d[valid]
        local = np.stack([x, y, -d[valid]], axis=-1)
        world = local @ view.camera_to_world[:3, :3].T + view.camera_to_world[:3, 3]
        for j, other in enumerate(views):
            if j == i:
                overlap[i, j] = 1.0
                continue
            u, v, z = project_points(world, other.intrinsics, other.camera_to_world)
            inside = (z > 0) & (u >= 0) & (u < size[1]) & (v >= 0) & (v < size[0])
            if not inside.any():
                continue
            measured = depths[j][v[inside].astype(np.int64), u[inside].astype(np.int64)]
            seen = (measured > 0) & (np.abs(z[inside] - measured) <= tolerance * measured + 0.02)
            overlap[i, j] = float(seen.sum()) / float(valid.sum())
    return overlap


def camera_overlap(frames: SceneFrames) -> Float[np.ndarray, "N N"]:
    """An approximate overlap for scenes without depth: points along each view's pixel rays at the typical
    distance between the cameras (at least 1 unit) stand in for its surfaces, with no occlusion test."""
    centres = frames.camera_to_world[:, :3, 3]
    spread = np.linalg.norm(centres - centres.mean(0), axis=-1).mean() if len(centres) > 1 else 1.0
    distance = max(float(spread), 1.0)
    n = len(frames)
    overlap = np.eye(n)
    grid = np.stack(np.meshgrid(np.linspace(0.05, 0.95, 8), np.linspace(0.05, 0.95, 6)), -1).reshape(-1, 2)
    for i in range(n):
        height, width = (int(s) for s in frames.sizes[i])
        K = frames.intrinsics[i]
        u, v = grid[:, 0] * width, grid[:, 1] * height
        local = np.stack([(u - K[0, 2]) / K[0, 0], -(v - K[1, 2]) / K[1, 1], -np.ones_like(u)], -1) * distance
        world = local @ frames.camera_to_world[i, :3, :3].T + frames.camera_to_world[i, :3, 3]
        for j in range(n):
            if j != i:
                h_j, w_j = (int(s) for s in frames.sizes[j])
                pu, pv, z = project_points(world, frames.intrinsics[j], frames.camera_to_world[j])
                overlap[i, j] = float(np.mean((z > 0) & (pu >= 0) & (pu < w_j) & (pv >= 0) & (pv < h_j)))
    return overlap


def choose_views(
    overlap: Float[np.ndarray, "N N"], config: ViewChoiceConfig, rng: np.random.Generator
) -> Tuple[Int[np.ndarray, " C"], Int[np.ndarray, " T"]]:
    """(context view indices, target view indices) of one sample; disjoint (see the module docstring).

    Raises:
        ValueError: the scene has fewer views than a sample needs.
    """
    n = overlap.shape[0]
    if n < config.views_per_sample:
        raise ValueError(f"a sample needs {config.views_per_sample} views; the scene has {n}")
    mutual = np.minimum(overlap, overlap.T)
    context: List[int] = [int(rng.integers(n))]
    while len(context) < config.num_context_views:
        link = mutual[context].max(axis=0)  # best overlap of each view with the chosen ones
        link[context] = -1.0
        fits = np.flatnonzero((link >= config.min_overlap) & (link <= config.max_overlap))
        if len(fits) == 0:  # nothing in range: the best-linked view not yet chosen
            fits = np.flatnonzero(link == link.max())
        context.append(int(rng.choice(fits)))
    if config.num_target_views == 0:
        return np.asarray(context), np.zeros(0, dtype=np.int64)
    # How much of each view the context sees: what the model can be asked to predict.
    covered = overlap[:, context].max(axis=1)
    covered[context] = -1.0
    candidates = np.flatnonzero(covered >= config.target_min_overlap)
    if len(candidates) >= config.num_target_views:
        targets = rng.choice(candidates, size=config.num_target_views, replace=False)
    else:
        order = np.argsort(-covered, kind="stable")
        targets = order[: config.num_target_views]
    return np.asarray(context), np.sort(np.asarray(targets, dtype=np.int64))


def sample_overlap(
    overlap: Float[np.ndarray, "N N"], context: Int[np.ndarray, " C"], targets: Int[np.ndarray, " T"]
) -> Optional[float]:
    """Mean fraction of each target view that the context sees (None without targets): a sample's quality."""
    if len(targets) == 0:
        return None
    return float(overlap[np.asarray(targets)][:, np.asarray(context)].max(axis=1).mean())
