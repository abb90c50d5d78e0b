"""The linear probe on the synthetic room's labelled points: it recovers features that hold the classes, not
features that hold nothing, and scores raw colour and position in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
from splatsem_ns.evaluation.linear_probe import LinearProbeConfig, linear_probe, nearest_gaussian_features


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    scene = generate_synthetic_scene(
        tmp_path_factory.mktemp("probe") / "room", SyntheticSceneConfig(num_views=4, width=32, height=24)
    ).parent
    cloud = read_point_cloud(scene / "points_labeled.ply")
    present = np.unique(cloud.labels)
    labels = torch.as_tensor(
        np.searchsorted(present, cloud.labels)
    )  # class ids -> indices of the present ones
    split = np.random.default_rng(0).random(len(labels)) < 0.5
    return cloud, labels, torch.as_tensor(split), [f"class_{c}" for c in present]


def _scores(features, labels, split, names, fractions=(1.0,)):
    config = LinearProbeConfig(fractions=fractions, steps=200)
    return linear_probe(features[split], labels[split], features[~split], labels[~split], names, config)


def test_the_probe_reads_classes_from_features_that_hold_them_and_not_from_noise(room):
    cloud, labels, split, names = room
    torch.manual_seed(0)
    one_hot = torch.nn.functional.one_hot(labels, len(names)).float() + 0.1 * torch.randn(
        len(labels), len(names)
    )
    noise = torch.randn(len(labels), 16)
    raw = torch.cat(
        [torch.as_tensor(cloud.rgb, dtype=torch.float32) / 255.0, torch.as_tensor(cloud.xyz)], dim=1
    )
    holding, empty, colour_position = (
        _scores(f, labels, split, names)[1.0]["miou"] for f in (one_hot, noise, raw)
    )
    assert holding > 0.95
    assert empty < 0.3
    assert empty < colour_position < holding


def test_each_fraction_fits_on_that_share_of_the_points(room):
    cloud, labels, split, names = room
    results = _scores(torch.as_tensor(cloud.xyz), labels, split, names, fractions=(0.01, 0.2, 1.0))
    total = int(split.sum())
    assert [r["train_points"] for r in results.values()] == [round(0.01 * total), round(0.2 * total), total]


def test_points_take_their_nearest_gaussians_features():
    means = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0]])
    features = torch.tensor([[1.0], [2.0], [3.0]])
    points = np.array([[0.9, 0.1, 0], [0.1, 1.9, 0], [-0.2, 0, 0]])
    assert nearest_gaussian_features(points, means, features).flatten().tolist() == [2.0, 3.0, 1.0]
