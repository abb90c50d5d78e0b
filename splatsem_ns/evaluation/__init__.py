"""Segmentation metrics and label-transfer baselines (numpy, torch and scipy only)."""

from splatsem_ns.evaluation.metrics import (
    BACKGROUND_NAMES,
    ConfusionMatrix,
    foreground_classes,
    per_class_table,
    remap_labels,
    segmentation_scores,
)
from splatsem_ns.evaluation.voting import (
    ViewLabels,
    backproject_mean,
    backproject_vote,
    classify_by_text,
    knn_vote,
    project_points,
)

__all__ = [
    "BACKGROUND_NAMES",
    "ConfusionMatrix",
    "ViewLabels",
    "backproject_mean",
    "backproject_vote",
    "classify_by_text",
    "foreground_classes",
    "knn_vote",
    "per_class_table",
    "project_points",
    "remap_labels",
    "segmentation_scores",
]
