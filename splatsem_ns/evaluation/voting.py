"""Label transfer without learning: text classification of features, k-NN votes in 3D, and 2D labels
back-projected onto points.

- :func:`classify_by_text`: each feature takes the class of its most similar text embedding.
- :func:`knn_vote`: labelled ground-truth points take the majority label of their k nearest Gaussians
  (SceneSplat's zero-shot protocol, k = 25).
- :func:`backproject_vote`: each point takes the majority of the per-pixel labels of the views that
  see it, the "2D teacher lifted without optimisation" baseline; :func:`backproject_mean` averages their
  features instead (one vote per view).
- :func:`project_points`: the pinhole projection of world points into a nerfstudio (OpenGL) camera that
  the others build on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy.spatial import cKDTree

ArrayLike = Union[np.ndarray, torch.Tensor]

# Rows of the [P, k, k] label-equality tensor in one k-NN vote chunk; bounds memory at ~64 MiB of bools.
_KNN_VOTE_CHUNK_ELEMENTS = 1 << 26


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# ----------------------------------------------------------------------------------------------------
# Projection


def project_points(
    points: Union[Float[np.ndarray, "P 3"], Float[torch.Tensor, "P 3"]],
    K: Union[Float[np.ndarray, "3 3"], Float[torch.Tensor, "3 3"]],
    camera_to_world: Union[Float[np.ndarray, "3 4"], Float[torch.Tensor, "3 4"]],
    image_size: Optional[Tuple[int, int]] = None,
    near: float = 1e-6,
) -> Tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Projects world points into a pinhole camera given by a nerfstudio camera-to-world matrix.

    nerfstudio poses follow OpenGL (camera x right, y up, looking along -z); pixels follow OpenCV
    (u right, v down, ``K`` applied to points with positive depth), so the camera frame's y and z axes
    are flipped before ``K``. Pixel centres sit at half-integers, as in nerfstudio's ray generation:
    pixel (row i, column j) covers ``u`` in [j, j + 1) and ``v`` in [i, i + 1). Lens distortion is
    ignored.

    Args:
        points: World points. [P, 3]
        K: Intrinsics for the image size the pixel coordinates refer to. [3, 3]
        camera_to_world: Camera pose, OpenGL convention; a [4, 4] matrix is accepted too. [3, 4]
        image_size: (H, W). When given, the mask also requires the point to fall inside the image.
        near: Points with depth at or below this are "behind" the camera.

    Returns:
        ``uv`` pixel coordinates [P, 2] (meaningless where the mask is False), ``z`` depth along the
        viewing axis [P] (positive in front of the camera), and the mask [P]: in front of the camera and,
        with ``image_size``, inside the image. numpy in, numpy out; torch in, torch out (on the device
        and with the floating dtype of ``points``).
    """
    as_numpy = not isinstance(points, torch.Tensor)
    pts = torch.as_tensor(np.asarray(points) if as_numpy else points)
    if pts.ndim != 2 or pts.shape[-1] != 3:
        raise ValueError(f"points must have shape [P, 3], got {tuple(pts.shape)}")
    if not pts.is_floating_point():
        pts = pts.to(torch.float64)
    K_t = torch.as_tensor(K if isinstance(K, torch.Tensor) else np.asarray(K))
    K_t = K_t.to(device=pts.device, dtype=pts.dtype)
    c2w = camera_to_world if isinstance(camera_to_world, torch.Tensor) else np.asarray(camera_to_world)
    c2w = torch.as_tensor(c2w).to(device=pts.device, dtype=pts.dtype)
    if tuple(K_t.shape) != (3, 3):
        raise ValueError(f"K must have shape [3, 3], got {tuple(K_t.shape)}")
    if c2w.ndim != 2 or tuple(c2w.shape) not in ((3, 4), (4, 4)):
        raise ValueError(f"camera_to_world must have shape [3, 4] or [4, 4], got {tuple(c2w.shape)}")

    # The inverse rather than the transpose, so a pose with a uniform scale still projects correctly.
    world_to_cam = torch.linalg.inv(c2w[:3, :3])
    cam = (pts - c2w[:3, 3]) @ world_to_cam.T
    cam_cv = cam * torch.tensor([1.0, -1.0, -1.0], dtype=pts.dtype, device=pts.device)
    z = cam_cv[:, 2]
    mask = z > near
    z_safe = torch.where(mask, z, torch.ones_like(z))
    uv = (cam_cv @ K_t.T)[:, :2] / z_safe[:, None]
    if image_size is not None:
        height, width = image_size
        mask = mask & (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    if as_numpy:
        return uv.numpy(), z.numpy(), mask.numpy()
    return uv, z, mask


def pixel_index(
    uv: Float[np.ndarray, "P 2"], image_size: Tuple[int, int], grid: Tuple[int, int]
) -> Tuple[Int[np.ndarray, " P"], Int[np.ndarray, " P"]]:
    """Row and column on a (h, w) grid covering the (H, W) image, for in-image pixel coordinates.

    Scaling the coordinates by w / W equals scaling the intrinsics to the coarser grid.
    """
    height, width = image_size
    rows, cols = grid
    col = np.minimum((uv[:, 0] * (cols / width)).astype(np.int64), cols - 1)
    row = np.minimum((uv[:, 1] * (rows / height)).astype(np.int64), rows - 1)
    return row, col


# ----------------------------------------------------------------------------------------------------
# Classification by text


@torch.no_grad()
def classify_by_text(
    features: Union[Float[np.ndarray, "N C"], Float[torch.Tensor, "N C"]],
    text_embeddings: Union[Float[np.ndarray, "K C"], Float[torch.Tensor, "K C"]],
    labels: Optional[Sequence[int]] = None,
    chunk_size: int = 65536,
) -> ArrayLike:
    """The class of each feature: the text embedding with the highest cosine similarity.

    SceneSplat scores ``sigmoid(feature . text)`` with unit-norm text embeddings and takes the argmax.
    The sigmoid is monotonic and a feature's own norm scales all its scores alike, so that argmax is
    this cosine argmax. A zero feature scores 0 against every class and gets the first one.

    Args:
        features: One feature per Gaussian or point. [N, C]
        text_embeddings: One embedding per class (need not be normalised). [K, C]
        labels: Label id of each text embedding (length K); default ``0..K-1``.
        chunk_size: Features scored at once, bounding memory at ``chunk_size x K`` scores.

    Returns:
        Label per feature [N] (int64): numpy for numpy features, else a tensor on the features' device.
    """
    as_numpy = not isinstance(features, torch.Tensor)
    feats = torch.as_tensor(np.asarray(features) if as_numpy else features)
    text = text_embeddings if isinstance(text_embeddings, torch.Tensor) else np.asarray(text_embeddings)
    text = torch.as_tensor(text).to(feats.device)
    if feats.ndim != 2 or text.ndim != 2:
        raise ValueError(
            f"features must be [N, C] and text_embeddings [K, C], got {tuple(feats.shape)} and {tuple(text.shape)}"
        )
    if feats.shape[1] != text.shape[1]:
        raise ValueError(
            f"features have {feats.shape[1]} channels but text embeddings have {text.shape[1]}; "
            "were they made by different models or heads?"
        )
    if text.shape[0] == 0:
        raise ValueError("text_embeddings is empty: at least one class is needed")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    label_map = None
    if labels is not None:
        label_map = torch.as_tensor(list(labels), dtype=torch.int64, device=feats.device)
        if label_map.shape != (text.shape[0],):
            raise ValueError(f"got {label_map.numel()} labels for {text.shape[0]} text embeddings")

    # Half precision on CPU is slow and loses ties; score in at least float32.
    dtype = torch.promote_types(feats.dtype, torch.float32) if feats.is_floating_point() else torch.float32
    text_unit = torch.nn.functional.normalize(text.to(dtype), dim=-1)
    out = torch.empty(feats.shape[0], dtype=torch.int64, device=feats.device)
    for start in range(0, feats.shape[0], chunk_size):
        chunk = feats[start : start + chunk_size].to(dtype)
        out[start : start + chunk_size] = (chunk @ text_unit.T).argmax(dim=-1)
    if label_map is not None:
        out = label_map[out]
    return out.cpu().numpy() if as_numpy else out


# ----------------------------------------------------------------------------------------------------
# k nearest neighbour vote


def knn_vote(
    source_xyz: Union[Float[np.ndarray, "G 3"], Float[torch.Tensor, "G 3"]],
    source_labels: Union[Int[np.ndarray, " G"], Int[torch.Tensor, " G"]],
    query_xyz: Union[Float[np.ndarray, "P 3"], Float[torch.Tensor, "P 3"]],
    k: int = 25,
    ignore_label: int = -1,
) -> Int[np.ndarray, " P"]:
    """Label of each query point: the majority label among its k nearest sources.

    This is how SceneSplat transfers Gaussian predictions to the labelled points (k = 25). Sources
    labelled ``ignore_label`` (for example Gaussians without a feature) are dropped before the search;
    with fewer than k sources left, all of them vote. A tie goes to the tied label whose nearest source
    is closest to the query.

    Args:
        source_xyz: Source positions (Gaussian centres). [G, 3]
        source_labels: Source labels. [G]
        query_xyz: Query positions (labelled points). [P, 3]
        k: Neighbours per query.
        ignore_label: Label of sources that do not vote; also the result when no source is left.

    Returns:
        Label per query point (int64). [P]
    """
    src = _to_numpy(source_xyz).astype(np.float64, copy=False)
    lab = _to_numpy(source_labels).reshape(-1).astype(np.int64, copy=False)
    query = _to_numpy(query_xyz).astype(np.float64, copy=False)
    if src.ndim != 2 or src.shape[1] != 3 or query.ndim != 2 or query.shape[1] != 3:
        raise ValueError(
            f"source_xyz and query_xyz must be [N, 3], got {tuple(src.shape)} and {tuple(query.shape)}"
        )
    if lab.shape[0] != src.shape[0]:
        raise ValueError(f"got {lab.shape[0]} source labels for {src.shape[0]} source points")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keep = lab != ignore_label
    src, lab = src[keep], lab[keep]
    if not np.isfinite(src).all() or not np.isfinite(query).all():
        raise ValueError("source_xyz and query_xyz must be finite (a diverged Gaussian has NaN/inf position)")
    out = np.full(query.shape[0], ignore_label, dtype=np.int64)
    if src.shape[0] == 0 or query.shape[0] == 0:
        return out

    k_eff = min(k, src.shape[0])
    _, neighbours = cKDTree(src).query(query, k=k_eff, workers=-1)
    neighbour_labels = lab[np.asarray(neighbours).reshape(query.shape[0], k_eff)]
    # Per neighbour slot, how many of the k neighbours share its label. The first slot with the highest
    # count holds the majority label, and among tied labels the one with the nearest source, because
    # the k-d tree returns neighbours sorted by distance.
    rows = max(1, _KNN_VOTE_CHUNK_ELEMENTS // (k_eff * k_eff))
    for start in range(0, query.shape[0], rows):
        chunk = neighbour_labels[start : start + rows]
        support = (chunk[:, :, None] == chunk[:, None, :]).sum(axis=-1)
        winner = support.argmax(axis=-1)
        out[start : start + rows] = chunk[np.arange(chunk.shape[0]), winner]
    return out


# ----------------------------------------------------------------------------------------------------
# Back-projection of per-view label maps


@dataclass
class ViewLabels:
    """One view's per-pixel labels with its camera, for :func:`backproject_vote`."""

    labels: Int[np.ndarray, "h w"]
    """Label per cell. The grid may be coarser than the image (a ViT patch grid, for example): it is
    taken to cover the whole image evenly."""
    K: Float[np.ndarray, "3 3"]
    """Pinhole intrinsics for the full image size ``image_size``."""
    camera_to_world: Float[np.ndarray, "3 4"]
    """Camera pose in nerfstudio's OpenGL convention (looking along -z, y up); [4, 4] is accepted."""
    image_size: Tuple[int, int]
    """(H, W) of the image ``K`` refers to."""
    depth: Optional[Float[np.ndarray, "Hd Wd"]] = None
    """z-depth in metres at any resolution covering the whole image; 0 or non-finite means no
    measurement. Without it, visibility comes from a z-buffer over the points (see
    :func:`backproject_vote`)."""
    name: str = ""
    """Name used in error messages (a frame's file name, for example)."""

    def __post_init__(self) -> None:
        where = f"view {self.name!r}" if self.name else "view"
        self.labels = _to_numpy(self.labels)
        if self.labels.ndim != 2 or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(
                f"{where}: labels must be an integer [h, w] map, got shape {self.labels.shape} "
                f"and dtype {self.labels.dtype}"
            )
        self.labels = self.labels.astype(np.int64, copy=False)
        self.K = _to_numpy(self.K).astype(np.float64)
        self.camera_to_world = _to_numpy(self.camera_to_world).astype(np.float64)
        if self.K.shape != (3, 3) or not np.isfinite(self.K).all():
            raise ValueError(f"{where}: K must be a finite [3, 3] matrix, got shape {self.K.shape}")
        if self.camera_to_world.shape not in ((3, 4), (4, 4)) or not np.isfinite(self.camera_to_world).all():
            raise ValueError(
                f"{where}: camera_to_world must be a finite [3, 4] or [4, 4] matrix, "
                f"got shape {self.camera_to_world.shape}"
            )
        self.camera_to_world = self.camera_to_world[:3]
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"{where}: image_size must be (H, W) with positive sizes, got {self.image_size}")
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if self.depth is not None:
            self.depth = _to_numpy(self.depth)
            if self.depth.ndim == 3 and self.depth.shape[-1] == 1:
                self.depth = self.depth[..., 0]
            if self.depth.ndim != 2:
                raise ValueError(f"{where}: depth must be an [H, W] map, got shape {self.depth.shape}")


def _checked_points(points: ArrayLike, depth_tolerance: float) -> Float[np.ndarray, "P 3"]:
    """``points`` as a float64 [P, 3] array, after checking it and the tolerance."""
    pts = _to_numpy(points).astype(np.float64, copy=False)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [P, 3], got {pts.shape}")
    if depth_tolerance <= 0:
        raise ValueError(f"depth_tolerance must be positive, got {depth_tolerance}")
    return pts


def visible_cells(
    pts: Float[np.ndarray, "P 3"],
    view: ViewLabels,
    depth_tolerance: float,
    zbuffer_grid: Optional[Tuple[int, int]],
) -> Tuple[Int[np.ndarray, " V"], Int[np.ndarray, " V"], Int[np.ndarray, " V"]]:
    """The points ``view`` sees (indices into ``pts``) and the row and column of their cell on the view's label
    grid; visibility as :func:`backproject_vote` describes."""
    uv, z, inside = project_points(pts, view.K, view.camera_to_world, view.image_size)
    idx = np.nonzero(inside)[0]
    uv, z = uv[idx], z[idx]
    if view.depth is not None:
        row, col = pixel_index(uv, view.image_size, view.depth.shape)
        measured = view.depth[row, col].astype(np.float64)
        with np.errstate(invalid="ignore"):
            visible = np.isfinite(measured) & (measured > 0) & (np.abs(measured - z) < depth_tolerance)
    else:
        grid = zbuffer_grid or view.labels.shape
        row, col = pixel_index(uv, view.image_size, grid)
        cell = row * grid[1] + col
        nearest = np.full(grid[0] * grid[1], np.inf)
        np.minimum.at(nearest, cell, z)
        visible = z - nearest[cell] < depth_tolerance
    idx, uv = idx[visible], uv[visible]
    row, col = pixel_index(uv, view.image_size, view.labels.shape)
    return idx, row, col


def backproject_vote(
    points: Union[Float[np.ndarray, "P 3"], Float[torch.Tensor, "P 3"]],
    views: Sequence[ViewLabels],
    depth_tolerance: float = 0.1,
    ignore_label: int = -1,
    zbuffer_grid: Optional[Tuple[int, int]] = None,
) -> Tuple[Int[np.ndarray, " P"], Int[np.ndarray, " P"]]:
    """Labels points by majority over the per-pixel labels of the views that see them.

    A point votes in a view when it projects inside the image, in front of the camera, is visible
    there, and the label of its cell is not ``ignore_label``. Visibility:

    - with a depth map: ``|depth - z| < depth_tolerance`` at the point's depth pixel; pixels without
      a measurement (0 or non-finite) hide the point;
    - without one: a z-buffer over the points themselves on ``zbuffer_grid`` (default: the view's label
      grid). A point is visible when it is within ``depth_tolerance`` of the nearest point in its cell.
      Points are samples, not surfaces, so a fine grid lets a point behind a surface show through the
      gaps between the surface's points; a coarser grid closes those gaps but hides points near depth
      edges.

    Ties between labels go to the smallest label id.

    Args:
        points: World points to label. [P, 3]
        views: Per-view labels and cameras.
        depth_tolerance: Visibility tolerance in metres.
        ignore_label: Label that casts no vote, and the result for points no view saw.
        zbuffer_grid: (h, w) of the point z-buffer for views without depth.

    Returns:
        ``labels`` [P] (int64; ``ignore_label`` where no view voted) and ``votes`` [P] (int64): how many
        views voted for the point, whatever their label.
    """
    pts = _checked_points(points, depth_tolerance)
    num_points = pts.shape[0]
    voter_ids: List[np.ndarray] = []
    voter_labels: List[np.ndarray] = []
    for view in views:
        idx, row, col = visible_cells(pts, view, depth_tolerance, zbuffer_grid)
        label = view.labels[row, col]
        votes = label != ignore_label
        voter_ids.append(idx[votes])
        voter_labels.append(label[votes])

    out = np.full(num_points, ignore_label, dtype=np.int64)
    if not voter_ids or sum(len(ids) for ids in voter_ids) == 0:
        return out, np.zeros(num_points, dtype=np.int64)
    ids = np.concatenate(voter_ids)
    labels = np.concatenate(voter_labels)
    # Sparse (point, label) counts: memory follows the number of votes, not points x classes.
    classes, label_index = np.unique(labels, return_inverse=True)
    keys, counts = np.unique(ids * len(classes) + label_index, return_counts=True)
    key_point, key_label = np.divmod(keys, len(classes))
    order = np.lexsort((key_label, -counts, key_point))
    key_point, key_label = key_point[order], key_label[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = key_point[1:] != key_point[:-1]
    out[key_point[first]] = classes[key_label[first]]
    return out, np.bincount(ids, minlength=num_points)


def backproject_mean(
    points: Union[Float[np.ndarray, "P 3"], Float[torch.Tensor, "P 3"]],
    views: Sequence[ViewLabels],
    features: Sequence[Float[np.ndarray, "h w C"]],
    depth_tolerance: float = 0.1,
    ignore_label: int = -1,
    zbuffer_grid: Optional[Tuple[int, int]] = None,
) -> Tuple[Float[np.ndarray, "P C"], Int[np.ndarray, " P"]]:
    """The soft counterpart of :func:`backproject_vote`: each point takes the mean of the unit-normalised
    feature vectors of its cell in every view that sees it (visibility and ignored cells as there), so every
    view counts once whatever its distance, and the features' classes are decided after averaging.

    Args:
        points: World points. [P, 3]
        views: Per-view cameras, depth and labels (cells labelled ``ignore_label`` cast no vote).
        features: One feature grid per view, on the grid of that view's ``labels``. [h, w, C] each
        depth_tolerance, ignore_label, zbuffer_grid: As in :func:`backproject_vote`.

    Returns:
        ``mean`` [P, C] (float32; zero where no view voted) and ``votes`` [P] (int64).
    """
    if len(features) != len(views):
        raise ValueError(f"need one feature grid per view, got {len(features)} for {len(views)} views")
    pts = _checked_points(points, depth_tolerance)
    channels = int(features[0].shape[-1]) if len(features) else 0
    sums = np.zeros((pts.shape[0], channels), dtype=np.float64)
    votes = np.zeros(pts.shape[0], dtype=np.int64)
    for view, grid in zip(views, features, strict=True):
        grid = _to_numpy(grid).astype(np.float32, copy=False)
        if grid.shape[:2] != view.labels.shape or grid.shape[-1] != channels:
            raise ValueError(
                f"view {view.name!r}: features {grid.shape} do not match its label grid {view.labels.shape} "
                f"and {channels} channels"
            )
        norms = np.linalg.norm(grid, axis=-1, keepdims=True)
        unit = grid / np.maximum(norms, 1e-12)
        idx, row, col = visible_cells(pts, view, depth_tolerance, zbuffer_grid)
        keep = (view.labels[row, col] != ignore_label) & (norms[row, col, 0] > 0)
        np.add.at(sums, idx[keep], unit[row[keep], col[keep]])
        votes += np.bincount(idx[keep], minlength=pts.shape[0])
    return (sums / np.maximum(votes, 1)[:, None]).astype(np.float32), votes
