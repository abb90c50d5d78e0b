"""Cross-view consistency of a teacher: the parts of a training view that the other views contradict.

A 2D teacher labels each view on its own, and its mistakes are often whole regions: one view calls the floor
"ceiling", another calls a desk "table". Distillation averages such a view with the others, so where it sees
a surface closer (more pixels) or alone, the field learns its mistake. The sensor depth tells which other views
see the same surface, so a view's regions can be checked against them before training:

1. Each view's features are grouped into ``segments`` regions (spherical k-means over its feature cells).
2. Every cell with a depth is placed in 3D and projected into the other views that see it (depth test, as the
   "2D teacher back-projected" baseline does).
3. Another view agrees with a cell when the cell's segment centroid explains that view's feature there as well
   as that view's own segment centroid does (to within ``margin`` in cosine): same content, whatever the
   teacher's feature scale.
4. A segment that the other views agree with in fewer than ``min_agreement`` of at least ``min_pairs`` checks
   gets weight 0 in the distillation loss; every other cell keeps weight 1.

Nothing here knows about classes or text: it works on any teacher's features. The weights are a function of
the features, cameras and depths, computed once when training starts (seconds on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.data.depth import pixels_to_world
from splatsem_ns.evaluation.voting import ViewLabels, pixel_index, visible_cells
from splatsem_ns.progress import logged_progress


@dataclass
class ConsistencyConfig:
    """Down-weighting of teacher regions that the other training views contradict (see the module docstring)."""

    enabled: bool = True
    """Compute the weights when every training view has a depth image (otherwise every cell keeps weight 1)."""
    segments: int = 8
    """Regions per view (k-means over its feature cells). About the number of objects a view shows; a segment
    split in two is judged twice, which costs nothing, and 12 did as well as 8 on ScanNet."""
    min_agreement: float = 0.3
    """A segment whose checks agree less often than this gets weight 0."""
    min_pairs: int = 16
    """Checks (cell, other view) a segment needs before it can be dropped; with fewer it keeps weight 1."""
    margin: float = 0.05
    """Cosine slack of one check: the other view's feature may be this much less similar to the cell's centroid
    than to its own segment's centroid and still agree. Measured on ScanNet scene0000_00 (50 frames, labels
    proxy, benchmarks/results/semantic_report_scannet_consistency_h200.md): 0.05 drops about a quarter of the
    cells and raised held-out 2D mIoU from 57 to 61.5-63.0 over six runs (two of them with 12 segments); 0.2
    drops 6% (labels) and scored 59.8-61.4. On the training views' own ground truth, 0.05 drops 73% of the teacher's wrong cells and 19% of
    its right ones: the field loses little by a right cell dropped, since other views still see the surface,
    and much by a wrong one kept. It is a cosine, so for a teacher whose distinct contents are very alike the
    check drops less."""
    depth_tolerance: float = 0.1
    """Visibility tolerance of the depth test, in the units of the dataset's original frame (metres for
    depth-sensor captures)."""
    kmeans_iterations: int = 20
    """Iterations of the per-view k-means."""
    all_pairs_up_to: int = 200
    """Up to this many training views every view is checked against every other; past it, against its
    ``nearest_views`` only. Each pair costs a projection of the view's cells, so the pairs grow with the square of
    the views: a 1000-view capture would make about a million."""
    nearest_views: int = 64
    """Past ``all_pairs_up_to`` views: the other views each view is checked against, the nearest camera centres
    among those looking the same way (forward directions less than 90 degrees apart), then the nearest others."""


def segment_view(
    features: Float[Tensor, "h w C"], segments: int, iterations: int = 20
) -> tuple[Int[Tensor, "h w"], Float[Tensor, "K C"]]:
    """Spherical k-means over one view's feature cells: (segment id per cell, unit centroids).

    Deterministic: farthest-point seeding from the cell least like the mean direction, so the same features
    always give the same segments (the weights must not change between a run and its resume)."""
    h, w, c = features.shape
    unit = F.normalize(features.reshape(-1, c).float(), dim=-1)
    k = max(1, min(segments, unit.shape[0]))
    # Farthest-point seeding: each new centroid is the cell least similar to the ones chosen so far.
    first = int(torch.argmin(unit @ F.normalize(unit.mean(0), dim=0)))
    chosen = [first]
    best = unit @ unit[first]
    for _ in range(k - 1):
        nxt = int(torch.argmin(best))
        chosen.append(nxt)
        best = torch.maximum(best, unit @ unit[nxt])
    centroids = unit[chosen].clone()
    assign = torch.argmax(unit @ centroids.T, dim=1)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, assign, unit)
        filled = sums.norm(dim=1) > 0
        centroids[filled] = F.normalize(sums[filled], dim=-1)
        new = torch.argmax(unit @ centroids.T, dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign.reshape(h, w), centroids


def _cell_points(view: ViewLabels) -> tuple[Float[np.ndarray, "M 3"], Int[np.ndarray, " M"]]:
    """The world point at the centre of every label-grid cell with a depth measurement, and its flat cell index."""
    h, w = view.labels.shape
    height, width = view.image_size
    rows, cols = np.mgrid[0:h, 0:w]
    u = (cols.reshape(-1) + 0.5) * (width / w)
    v = (rows.reshape(-1) + 0.5) * (height / h)
    drow, dcol = pixel_index(np.stack([u, v], axis=-1), view.image_size, view.depth.shape)
    z = view.depth[drow, dcol].astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    intrinsics = (view.K[0, 0], view.K[1, 1], view.K[0, 2], view.K[1, 2])
    u, v, z = (torch.from_numpy(a[valid]) for a in (u, v, z))
    world = pixels_to_world(u, v, z, intrinsics, torch.from_numpy(view.camera_to_world))
    return world.numpy(), np.nonzero(valid)[0]


def checked_pairs(views: Sequence[ViewLabels], config: ConsistencyConfig) -> List[List[int]]:
    """For each view, the other views it is checked against (see ``ConsistencyConfig.all_pairs_up_to``)."""
    n = len(views)
    if n <= config.all_pairs_up_to or config.nearest_views >= n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    poses = torch.stack(
        [torch.as_tensor(np.asarray(v.camera_to_world), dtype=torch.float64)[:3] for v in views]
    )
    centres = poses[:, :, 3]
    forward = -poses[:, :, 2]  # OpenGL cameras look down -z
    distance = torch.cdist(centres, centres)
    # Views looking away come after every view looking the same way; the view itself comes last of all.
    facing = (forward @ forward.T) > 0
    distance = distance + (~facing).double() * (distance.max() + 1.0)
    distance.fill_diagonal_(float("inf"))
    return distance.topk(config.nearest_views, dim=1, largest=False).indices.tolist()


def consistency_weights(
    features: Sequence[Float[Tensor, "h w C"]],
    views: Sequence[ViewLabels],
    config: ConsistencyConfig,
    depth_tolerance: float,
    progress: str = "",
) -> List[Float[np.ndarray, "h w"]]:
    """One weight map per view on its feature grid: 0 on segments the other views contradict, 1 elsewhere.

    Args:
        features: Each training view's teacher features.
        views: The same views' cameras and depths (``labels`` is ignored; ``depth`` is required).
        config: Segmenting and agreement settings.
        depth_tolerance: Depth-test tolerance in the cameras' units.
        progress: Description of the progress shown over the views (a bar on a terminal, log lines otherwise;
            none when empty).
    """
    if len(features) != len(views):
        raise ValueError(f"{len(features)} feature maps for {len(views)} views")
    if any(v.depth is None for v in views):
        raise ValueError("cross-view consistency needs a depth image for every view")
    grids, centroids, units, segmented = [], [], [], []
    for feats, view in zip(features, views, strict=True):
        seg, cen = segment_view(feats, config.segments, config.kmeans_iterations)
        grids.append(seg)
        centroids.append(cen)
        # Half precision: a scene's features are held at once (300 views of a 64 x 64 x 256 grid: 0.6 GB).
        units.append(F.normalize(feats.reshape(-1, feats.shape[-1]).float(), dim=-1).half())
        # The segment ids stand in for labels so the voting module's visibility test can be reused.
        segmented.append(
            ViewLabels(
                labels=seg.cpu().numpy(),
                K=view.K,
                camera_to_world=view.camera_to_world,
                image_size=view.image_size,
                depth=view.depth,
            )
        )
    partners = checked_pairs(views, config)
    weights = []
    for i, view in enumerate(logged_progress(segmented, progress, unit="views") if progress else segmented):
        points, cells = _cell_points(view)
        own = grids[i].reshape(-1)[torch.from_numpy(cells)]  # segment of each placed cell [M]
        k = centroids[i].shape[0]
        agree = torch.zeros(k, dtype=torch.float64)
        checks = torch.zeros(k, dtype=torch.float64)
        for j in partners[i]:
            other = segmented[j]
            if len(points) == 0:
                continue
            idx, row, col = visible_cells(points, other, depth_tolerance, None)
            if len(idx) == 0:
                continue
            flat = torch.from_numpy(row * other.labels.shape[1] + col)
            seen = units[j][flat].float()  # the other view's unit features there [V, C]
            theirs = (seen * centroids[j][grids[j].reshape(-1)[flat]]).sum(-1)
            segs = own[torch.from_numpy(idx)]
            ours = (seen * centroids[i][segs]).sum(-1)
            agree.index_add_(0, segs, (ours >= theirs - config.margin).double())
            checks.index_add_(0, segs, torch.ones_like(ours, dtype=torch.float64))
        dropped = (checks >= config.min_pairs) & (agree < config.min_agreement * checks)
        weights.append((~dropped)[grids[i]].float().numpy())
    return weights
