"""Click-to-segment, scored: one click at the centre of every object of every held-out view.

Interactive 3D segmentation is scored the way the 2D interactive-segmentation benchmarks place their first
click: at the pixel of the object farthest from its boundary. The click selects Gaussians in the object-aware
teacher's space as the viewer's click does (cosine with the clicked pixel's decoded feature above a
threshold; key "feature").

With ``region_radius`` set, the same click is also scored with a spatial limit (key "region"): of the feature
selection, only the Gaussians connected to the clicked one (the selected Gaussian that weighs most in the clicked
pixel), through chains of centres at most that far apart
(``models.relevancy.grow_region``), so that a second object of the same kind elsewhere is left out.

The baseline is the 2D teacher itself ("teacher_per_view"): on the clicked view's own image, the pixels
whose teacher feature has a cosine above the same threshold with the clicked pixel's (scored in 2D only).

Each selection is scored in 2D, as the mask it renders at the clicked view (the compositing weight of the
selected Gaussians over half the pixel's) against the object's ground-truth mask, and in 3D, as the labelled
points whose nearest Gaussians are mostly selected against the object's points. Reported: the mean
IoU over clicks and the fraction of clicks with IoU of at least 0.5. A click on a pixel that renders empty
scores 0. Objects of the background classes (wall, floor, ceiling) are not clicked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Set

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from splatsem_ns.evaluation.protocol import upsample_labels
from splatsem_ns.models.relevancy import click_seed, grow_region, select_by_click

MODEL = "feature"
"""Key of the field's click: Gaussians selected by feature similarity."""
REGION = "region"
"""Key of the spatially limited click: the connected part of the feature selection around the clicked Gaussian
(``ClickEvalConfig.region_radius``)."""
BASELINE = "teacher_per_view"
"""Key of the 2D teacher's own click, scored in 2D (see the module docstring)."""


@dataclass
class ClickEvalConfig:
    """Settings of the click-to-segment protocol."""

    similarity: float = 0.8
    """Cosine above which a Gaussian's feature matches the clicked pixel's (the viewer's default)."""
    min_pixels_fraction: float = 0.01
    """Objects covering less than this fraction of a held-out view are not clicked there."""
    min_alpha: float = 0.5
    """A click on a pixel whose accumulated opacity is below this hits nothing (as in the viewer)."""
    region_radius: Optional[float] = 0.05
    """Also score the spatially limited click ("region"): the selected Gaussians connected to the clicked one
    through chains of centres at most this far apart, in the units of the dataset's original frame (metres for
    depth-sensor captures). None: only the feature rule."""


class Click(NamedTuple):
    """One click on the ground truth: the object's instance id and class id, and the pixel (row, column)."""

    instance: int
    class_id: int
    row: int
    col: int


def centre_clicks(
    instances: Int[np.ndarray, "H W"],
    classes: Int[np.ndarray, "H W"],
    min_pixels: int,
    skip_classes: Set[int] = frozenset(),
) -> List[Click]:
    """One click per object of a ground-truth view: at its pixel farthest from its boundary (the image border
    counts as boundary; ties go to the tied pixel nearest their mean). Objects are the instance ids above 0
    with at least ``min_pixels`` pixels whose most common class (in ``classes``, 0 unlabelled) is labelled and
    not in ``skip_classes``."""
    from scipy.ndimage import distance_transform_edt

    if instances.shape != classes.shape or instances.ndim != 2:
        raise ValueError(f"Need two [H, W] maps, got {instances.shape} and {classes.shape}.")
    clicks = []
    for instance in np.unique(instances):
        mask = instances == instance
        if instance <= 0 or mask.sum() < min_pixels:
            continue
        class_ids, counts = np.unique(classes[mask], return_counts=True)
        class_id = int(class_ids[np.argmax(counts)])
        if class_id <= 0 or class_id in skip_classes:
            continue
        inside = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        # Of the pixels farthest inside (a ridge for elongated objects), the one nearest their mean.
        rows, cols = np.nonzero(inside == inside.max())
        nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        row, col = rows[nearest], cols[nearest]
        clicks.append(Click(int(instance), class_id, int(row), int(col)))
    return clicks


def mask_iou(predicted: Bool[np.ndarray, "*shape"], target: Bool[np.ndarray, "*shape"]) -> float:
    """Intersection over union of two masks (0 when both are empty)."""
    union = np.logical_or(predicted, target).sum()
    return float(np.logical_and(predicted, target).sum() / union) if union else 0.0


def score_clicks(
    model,
    teacher: str,
    cameras,
    instance_maps: Sequence[Int[Tensor, "H W"]],
    class_maps: Sequence[Int[Tensor, "H W"]],
    points: Float[np.ndarray, "P 3"],
    point_instances: Int[np.ndarray, " P"],
    skip_classes: Set[int],
    cfg: ClickEvalConfig,
    knn: int = 25,
    render_scale: float = 1.0,
    teacher_features: Optional[Sequence[Float[Tensor, "h w C"]]] = None,
) -> Dict:
    """Click every object of every view of ``cameras`` (ground truth ``instance_maps`` / ``class_maps``, one
    per camera, at image size) and score the field's selections and the teacher's; see the module docstring.

    Args:
        model: A trained ``ChorusSplatModel`` in eval mode.
        teacher: The object-aware teacher whose head reads the clicks.
        cameras: Cameras of the clicked views.
        points: Labelled points in the cameras' frame, with their instance ids (0 or less: unlabelled). [P, 3]
        knn: Nearest Gaussians that vote whether a labelled point is selected.
        render_scale: Resolution of the renders, relative to the image.
        teacher_features: The teacher's features on each clicked view's own image (on its grid), for the
            baseline; None leaves it out.

    Returns:
        ``{"clicks", "empty_clicks", "feature": {...}, "teacher_per_view": {...}, "per_click": [...]}``: the
        mean IoU over clicks (``miou_2d``, ``miou_3d``) and the fraction of clicks with IoU >= 0.5
        (``success_2d``, ``success_3d``); 2D only for the teacher.
    """
    from scipy.spatial import cKDTree

    if len(instance_maps) != len(cameras) or len(class_maps) != len(cameras):
        raise ValueError(f"Need one instance and one class map per camera ({len(cameras)}).")
    if teacher_features is not None and len(teacher_features) != len(cameras):
        raise ValueError(f"Need the teacher's features of every clicked view ({len(cameras)}).")
    means = model.means.detach()
    features = model.gaussian_features(teacher)
    region_radius = (
        None if cfg.region_radius is None else cfg.region_radius * float(getattr(model, "scene_scale", 1.0))
    )
    # Which Gaussians vote for each labelled point: found once, every click reuses it.
    _, neighbours = cKDTree(means.cpu().numpy()).query(np.asarray(points), k=min(knn, len(means)))
    neighbours = torch.as_tensor(neighbours.reshape(len(points), -1), device=means.device)
    labelled = point_instances > 0
    records = []
    for j, (instances, classes) in enumerate(zip(instance_maps, class_maps, strict=True)):
        instances, classes = np.asarray(instances.cpu()), np.asarray(classes.cpu())
        min_pixels = max(1, int(cfg.min_pixels_fraction * instances.size))
        clicks = centre_clicks(instances, classes, min_pixels, skip_classes)
        if not clicks:
            continue
        camera = cameras[j : j + 1]
        latent = model.render_semantic_latent(camera, scale=render_scale)
        h, w = latent.shape[:2]
        at = [_cell(c, instances.shape, (h, w)) for c in clicks]
        alpha = model.render_features(
            camera, torch.ones(len(means), 1, device=means.device), render_scale, normalize=False
        )
        valid = instances > 0  # unlabelled pixels count neither way
        for click, (row, col) in zip(clicks, at, strict=True):
            target_2d = instances[valid] == click.instance
            target_3d = point_instances[labelled] == click.instance
            record = {"view": j, "instance": click.instance, "class_id": click.class_id}
            record["empty"] = float(alpha[row, col, 0]) < cfg.min_alpha  # an empty pixel selects nothing
            selected = torch.zeros(len(means), dtype=torch.bool, device=means.device)
            if not record["empty"]:
                pixel_feature = model.decode_features(latent[row, col], teacher)
                selected = select_by_click(features, pixel_feature, cfg.similarity)
            selections = {MODEL: selected}
            if region_radius is not None:
                seed = click_seed(means, selected, model.pixel_weights(camera, row, col, render_scale))
                selections[REGION] = grow_region(means, selected, seed, region_radius)
            for rule, chosen in selections.items():
                shown = model.render_features(camera, chosen[:, None].float(), render_scale, normalize=True)
                mask_2d = _upsampled(shown[..., 0] > 0.5, instances.shape)
                voted = (chosen[neighbours].float().mean(dim=1) > 0.5).cpu().numpy()
                record[f"{rule}_iou_2d"] = mask_iou(mask_2d[valid], target_2d)
                record[f"{rule}_iou_3d"] = mask_iou(voted[labelled], target_3d)
                record[f"{rule}_selected"] = int(chosen.sum())
            if teacher_features is not None:
                record[f"{BASELINE}_iou_2d"] = mask_iou(
                    _teacher_click(teacher_features[j], click, instances.shape, cfg.similarity)[valid],
                    target_2d,
                )
            records.append(record)
    return summarise_clicks(records)


def summarise_clicks(records: List[Dict]) -> Dict:
    """Means over clicks of the field's and the teacher's IoUs, and the fraction of clicks with IoU >= 0.5
    ("success"); the teacher's only when every click has it."""
    out: Dict = {"clicks": len(records), "empty_clicks": sum(r["empty"] for r in records)}
    for rule in (MODEL, REGION, BASELINE):
        scores = {}
        for dim in ("2d", "3d"):
            key = f"{rule}_iou_{dim}"
            if records and all(key in r for r in records):
                ious = np.array([r[key] for r in records], dtype=np.float64)
                scores.update(
                    {f"miou_{dim}": float(ious.mean()), f"success_{dim}": float((ious >= 0.5).mean())}
                )
        if scores:
            out[rule] = scores
    out["per_click"] = records
    return out


def _cell(click: Click, size, grid) -> tuple:
    """The (row, column) of the cell of an ``[h, w]`` grid covering the image of ``size`` that holds the click
    (always inside the grid: row < H gives row * h // H < h)."""
    return click.row * grid[0] // size[0], click.col * grid[1] // size[1]


def _teacher_click(
    grid: Float[Tensor, "h w C"], click: Click, size, similarity: float
) -> Bool[np.ndarray, "H W"]:
    """The teacher's own click: the pixels of its feature grid similar to the clicked one, at image size."""
    similar = select_by_click(
        grid.reshape(-1, grid.shape[-1]), grid[_cell(click, size, grid.shape)], similarity
    )
    return _upsampled(similar.reshape(grid.shape[:2]), size)


def _upsampled(mask: Bool[Tensor, "h w"], size) -> Bool[np.ndarray, "H W"]:
    """A mask resized (nearest) to the image's ``size``, on the host."""
    return upsample_labels(mask.long(), tuple(size)).bool().cpu().numpy()


__all__ = [
    "Click",
    "ClickEvalConfig",
    "centre_clicks",
    "mask_iou",
    "score_clicks",
    "summarise_clicks",
]
