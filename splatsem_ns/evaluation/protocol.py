"""Open-vocabulary segmentation protocol for a trained chorus-splat scene, and its two baselines.

Queries are the class names, embedded by the query teacher's own text encoder (open vocabulary: nothing
is trained on the labels). Scored like the papers that the numbers are compared with:

- 2D (SemanticSplat): at every held-out view, the rendered latent is decoded by the query teacher's
  head and each pixel takes the class whose text embedding is most similar. One confusion matrix is
  accumulated over all views.
  Baseline "2D teacher per view": the teacher itself run on each held-out image, scored the same way.
- 3D (SceneSplat): every Gaussian's latent is decoded and classified. Each labelled point takes the
  majority class of its 25 nearest Gaussians. Reported: mIoU, mAcc, and foreground mIoU (without
  wall, floor and ceiling).
  Baseline "2D teacher back-projected": the teacher's per-pixel classes on the training views, voted
  onto the labelled points with a depth test (lifting without optimisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from splatsem_ns.evaluation.metrics import ConfusionMatrix, remap_labels, segmentation_scores
from splatsem_ns.evaluation.voting import ViewLabels, backproject_vote, classify_by_text, knn_vote


@dataclass
class SemanticEvalConfig:
    """Settings of the open-vocabulary segmentation protocol."""

    class_table: Optional[str] = None
    """Class names to query: None uses the scene's classes.json, else NYU40; "nyu40", "scannet20" or
    "scannet200" force a table. Tables are restricted to the classes present in the labelled points."""
    query_teacher: Optional[str] = None
    """Teacher whose head and text encoder answer the queries; None: the first one with a text encoder."""
    knn: int = 25
    """Nearest Gaussians that vote for each labelled point (SceneSplat uses 25)."""
    depth_tolerance: float = 0.1
    """Visibility test of the back-projection baseline, in scene units (|depth - z| below this)."""
    render_scale: float = 1.0
    """Resolution of the semantic render at held-out views, relative to the image."""
    diagnostic_render_scales: Tuple[float, ...] = ()
    """Diagnostic: the held-out views also scored with the semantic render at each of these scales
    (``semantic_2d_scale_<s>``), to see how much of the 2D score depends on the render's resolution."""
    train_views_scored: int = 8
    """Diagnostic ``semantic_2d_train_views``: this many training views (evenly spread) scored like the held-out
    ones. Near the teacher there, the field fits its supervision and held-out losses come from geometry; 0 skips."""
    min_vote_weight: float = 0.01
    """Diagnostic ``semantic_3d_seen``: only Gaussians whose compositing weight, summed over the training views
    at the semantic render's resolution, reaches this many pixels vote (the others never had a teacher)."""
    background_names: Tuple[str, ...] = ("wall", "floor", "ceiling")
    """Classes left out of the foreground averages (they still take part in prediction)."""


def class_queries(class_names: Mapping[int, str]) -> Tuple[List[int], List[str]]:
    """Class ids and names to query, unlabelled (id 0) left out."""
    ids = sorted(i for i in class_names if i != 0)
    return ids, [class_names[i] for i in ids]


def classify_map(
    features: Float[Tensor, "h w C"], text: Float[Tensor, "K C"], ids: Sequence[int]
) -> Int[Tensor, "h w"]:
    """Per-pixel class id of a feature map."""
    labels = classify_by_text(features.reshape(-1, features.shape[-1]), text, list(ids))
    return torch.as_tensor(labels).reshape(features.shape[:2])


def upsample_labels(labels: Int[Tensor, "h w"], size: Tuple[int, int]) -> Int[Tensor, "H W"]:
    """Nearest-neighbour resize of a label map to ``size`` (H, W)."""
    if tuple(labels.shape) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def score(cm: ConfusionMatrix, names: Sequence[str], cfg: SemanticEvalConfig) -> Dict:
    return segmentation_scores(cm, list(names), background_names=cfg.background_names)


def accumulate_2d(
    cm: ConfusionMatrix, predicted: Int[Tensor, "H W"], ground_truth: Int[Tensor, "H W"], ids: Sequence[int]
) -> None:
    """Add one view. Class ids map to the queried classes' indices; other ground truth (unlabelled, or a
    class not queried) is ignored."""
    cm.update(
        remap_labels(predicted.cpu().numpy(), list(ids)), remap_labels(ground_truth.cpu().numpy(), list(ids))
    )


def vote_points_from_gaussians(
    gaussian_xyz: Float[Tensor, "G 3"],
    gaussian_labels: Int[Tensor, " G"],
    points: np.ndarray,
    k: int,
) -> np.ndarray:
    return knn_vote(
        gaussian_xyz.detach().cpu().numpy(), np.asarray(gaussian_labels.cpu()), np.asarray(points), k=k
    )


def backprojected_teacher_labels(
    points: np.ndarray, views: Sequence[ViewLabels], depth_tolerance: float
) -> np.ndarray:
    labels, _ = backproject_vote(np.asarray(points), list(views), depth_tolerance=depth_tolerance)
    return labels


def points_confusion(predicted: np.ndarray, ground_truth: np.ndarray, ids: Sequence[int]) -> ConfusionMatrix:
    """3D confusion over the labelled points whose class is queried (others, and unlabelled, are ignored)."""
    cm = ConfusionMatrix(len(ids), ignore_index=-1)
    accumulate_points(cm, predicted, ground_truth, ids)
    return cm


def accumulate_points(
    cm: ConfusionMatrix, predicted: np.ndarray, ground_truth: np.ndarray, ids: Sequence[int]
) -> None:
    """Add labelled points to ``cm`` (``points_confusion``'s rule: only queried classes count)."""
    cm.update(
        remap_labels(np.asarray(predicted), list(ids)), remap_labels(np.asarray(ground_truth), list(ids))
    )
