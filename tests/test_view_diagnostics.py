"""The benchmark's error diagnostics on the trained synthetic room: the geometry oracle and the per-view dump."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from view_diagnostics import dump_views, geometry_oracle, heldout_vote  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(labels_run):
    from nerfstudio.utils.eval_utils import eval_setup

    import splatsem_ns.method_configs.chorus_splat  # noqa: F401 (numpy globals for weights_only loading)

    return eval_setup(labels_run / "config.yml", test_mode="test")[1]


@pytest.fixture(scope="module")
def protocol(pipeline):
    """The protocol's own scores (ns-eval's), to compare the diagnostics with."""
    return pipeline.semantic_metrics()


@pytest.fixture(scope="module")
def dumped(pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    dump_views(pipeline, out)
    return out


def test_ground_truth_labels_rendered_through_the_trained_geometry(pipeline):
    scores = geometry_oracle(pipeline)
    # The room's Gaussians lie on its labelled surfaces, so nearly all take a class and the renders are right
    # almost everywhere at the training views.
    assert scores["oracle_labelled_fraction"] > 0.8, scores["oracle_labelled_fraction"]
    assert scores["oracle_2d_train_views"]["miou"] > 0.6, scores["oracle_2d_train_views"]
    assert scores["oracle_2d"]["miou"] > 0.4, scores["oracle_2d"]
    assert 0.0 < scores["oracle_2d_blocking"]["miou"] <= 1.0
    # With no Gaussian labelled (every one farther than the limit), nothing is right.
    nothing = geometry_oracle(pipeline, max_distance_m=-1.0)
    assert nothing["oracle_2d"]["miou"] == nothing["oracle_2d_blocking"]["miou"] == 0.0
    # With every Gaussian labelled, there is nothing off the surfaces to block: both counts agree.
    everything = geometry_oracle(pipeline, max_distance_m=1e9)
    assert everything["oracle_labelled_fraction"] > 0.99
    assert everything["oracle_2d"] == everything["oracle_2d_blocking"]


def test_dump_matches_the_protocols_scores(pipeline, protocol, dumped):
    from splatsem_ns.evaluation.metrics import ConfusionMatrix, segmentation_scores

    views = np.load(dumped / "views_eval.npz")
    names = list(views["names"])
    count, height, width = views["gt"].shape
    assert views["rgb"].shape == (count, height, width, 3) and views["depth_mm"].dtype == np.uint16
    assert count == sum(v.split == "eval" for v in pipeline.datamanager.scene_views())
    # The dumped maps score exactly what the protocol reports for the model and the teacher.
    for key, maps in (("semantic_2d", views["model"]), ("semantic_2d_teacher_per_view", views["teacher"])):
        cm = ConfusionMatrix(len(names), ignore_index=255).update(maps, views["gt"])
        assert abs(segmentation_scores(cm, names)["miou"] - protocol[key]["miou"]) < 1e-9
    gaussians = np.load(dumped / "gaussians.npz")
    assert gaussians["means"].shape == (pipeline.model.num_points, 3)
    assert gaussians["label"].max() < len(names)


def test_heldout_vote_scores_plain_voting_at_the_held_out_pixels(pipeline, protocol, dumped):
    scores = heldout_vote(pipeline, stride=1, dump=dumped / "views_eval.npz")
    # Every pixel (stride 1): the teacher per view is scored exactly as the protocol scores it.
    assert abs(scores["teacher_2d"]["miou"] - protocol["semantic_2d_teacher_per_view"]["miou"]) < 1e-9
    assert 0.5 < scores["seen_fraction"] <= 1.0  # the training views ring the small room
    # Pixels no training view sees count against the vote, so the vote scores higher on the seen ones.
    assert scores["vote_2d_seen"]["miou"] >= scores["vote_2d"]["miou"] > 0.3
    assert {"model_2d_seen", "model_2d_unseen", "soft_vote_seen_model_unseen_2d"} <= set(scores)
    # The soft vote scores the same seen pixels; the teacher is scored there too.
    assert scores["soft_vote_2d_seen"]["miou"] > 0.3 and scores["teacher_2d_seen"]["miou"] > 0.3
    # After a short CPU run the room's rendered depth is within the tolerance at about half of the pixels (the
    # rest lie about 10 cm off); a unit mix-up (mm, metres, scene units) would leave none, and no vote.
    assert 0.3 < scores["rendered_depth_within_tolerance"] <= 1.0, scores["rendered_depth_within_tolerance"]
    assert scores["soft_vote_rendered_depth_2d_seen"]["miou"] > 0.3, scores[
        "soft_vote_rendered_depth_2d_seen"
    ]
