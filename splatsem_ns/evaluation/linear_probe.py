"""Linear probing: how much semantics frozen per-Gaussian features hold.

One linear layer (on standardised features) is fitted with cross-entropy on labelled 3D points of some scenes and
scored on the labelled points of others, with the confusion-matrix scores of the rest of the package (mIoU, mAcc).
Each labelled point takes the features of its nearest Gaussian. Data efficiency: the same probe fitted on 1, 5, 20
and 100% of the training points (a seeded subset). The features can be anything per Gaussian: the Chorus encoder's
latents, raw inputs (colour and position), or a per-scene chorus-splat latent, so the probe compares them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from scipy.spatial import cKDTree
from torch import Tensor, nn

from splatsem_ns.evaluation.metrics import ConfusionMatrix, segmentation_scores


@dataclass
class LinearProbeConfig:
    """How the probe is fitted and which training fractions it is fitted on."""

    fractions: Tuple[float, ...] = (0.01, 0.05, 0.2, 1.0)
    """Fractions of the training points the probe is fitted on (a seeded random subset each)."""
    steps: int = 300
    """Full-batch optimisation steps (AdamW)."""
    lr: float = 0.05
    """Learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the subsets and the initialisation."""


def nearest_gaussian_features(
    points: Float[np.ndarray, "P 3"], means: Float[np.ndarray, "N 3"], features: Float[Tensor, "N C"]
) -> Float[Tensor, "P C"]:
    """Each point's nearest Gaussian's features."""
    _, index = cKDTree(np.asarray(means, dtype=np.float64)).query(np.asarray(points, dtype=np.float64), k=1)
    return features[torch.as_tensor(index, dtype=torch.long)]


def fit_linear_probe(
    features: Float[Tensor, "P C"], labels: Int[Tensor, " P"], num_classes: int, config: LinearProbeConfig
) -> nn.Module:
    """A linear classifier (standardisation included) fitted on ``features`` to predict ``labels`` in
    ``[0, num_classes)``."""
    torch.manual_seed(config.seed)
    features = features.float()
    mean, std = features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)
    linear = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    normalised = (features - mean) / std
    for _ in range(config.steps):
        loss = F.cross_entropy(linear(normalised), labels.long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return _Standardised(linear.requires_grad_(False), mean, std)


class _Standardised(nn.Module):
    def __init__(self, linear: nn.Linear, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features.float() - self.mean) / self.std)


def linear_probe(
    train_features: Float[Tensor, "P C"],
    train_labels: Int[Tensor, " P"],
    test_features: Float[Tensor, "Q C"],
    test_labels: Int[Tensor, " Q"],
    class_names: Sequence[str],
    config: LinearProbeConfig = LinearProbeConfig(),
) -> Dict[float, Dict[str, object]]:
    """Scores (``segmentation_scores``) of the probe on the test points, per training fraction. Labels are indices
    into ``class_names``; negative labels are unlabelled and ignored."""
    keep = train_labels >= 0
    train_features, train_labels = train_features[keep], train_labels[keep]
    rng = np.random.default_rng(config.seed)
    results: Dict[float, Dict[str, object]] = {}
    for fraction in config.fractions:
        count = max(1, int(round(fraction * len(train_labels))))
        subset = torch.as_tensor(np.sort(rng.choice(len(train_labels), size=count, replace=False)))
        probe = fit_linear_probe(train_features[subset], train_labels[subset], len(class_names), config)
        with torch.no_grad():
            predicted = probe(test_features).argmax(dim=1)
        matrix = ConfusionMatrix(len(class_names)).update(predicted.numpy(), test_labels.numpy())
        results[fraction] = {"train_points": count, **segmentation_scores(matrix, list(class_names))}
    return results
