"""Click-to-segment, scored: where the protocol clicks and how it scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import tiny_camera, tiny_chorus_model

from splatsem_ns.evaluation.clicks import (
    Click,
    ClickEvalConfig,
    centre_clicks,
    mask_iou,
    score_clicks,
    summarise_clicks,
)


def test_centre_clicks_pick_the_innermost_pixel_of_each_object():
    instances = np.zeros((12, 16), dtype=np.int64)
    classes = np.zeros_like(instances)
    instances[2:7, 1:10], classes[2:7, 1:10] = 1, 4  # 5 x 9: centre (4, 5)
    instances[9:11, 12:14], classes[9:11, 12:14] = 2, 4  # 4 pixels: too small
    instances[0:12, 14:16], classes[0:12, 14:16] = 3, 1  # background class: skipped
    instances[8:12, 0:6] = 4  # no class (0): skipped
    instances[0:2, 10:14], classes[0:2, 10:14] = 5, 6  # touches the image border: the border is a boundary
    clicks = centre_clicks(instances, classes, min_pixels=5, skip_classes={1})
    assert clicks == [Click(1, 4, 4, 5), Click(5, 6, 0, 11)]
    with pytest.raises(ValueError, match="two"):
        centre_clicks(instances, classes[:-1], 5)


def test_mask_iou_by_hand():
    a = np.array([True, True, False, False])
    assert mask_iou(a, np.array([True, False, True, False])) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(~a & a, ~a & a) == 0.0  # both empty


def test_summary_means_and_success_rates():
    records = [
        {"empty": False, "feature_iou_2d": 0.5, "feature_iou_3d": 0.4, "teacher_per_view_iou_2d": 0.9},
        {"empty": True, "feature_iou_2d": 0.0, "feature_iou_3d": 0.0},
    ]
    out = summarise_clicks(records)
    assert out["clicks"] == 2 and out["empty_clicks"] == 1
    # IoU 0.5 counts as a success.
    assert out["feature"] == {"miou_2d": 0.25, "success_2d": 0.5, "miou_3d": 0.2, "success_3d": 0.0}
    assert "teacher_per_view" not in out  # the baseline is reported only when every click has it
    records[1]["teacher_per_view_iou_2d"] = 0.4
    assert summarise_clicks(records)["teacher_per_view"] == {"miou_2d": 0.65, "success_2d": 0.5}
    assert summarise_clicks([])["clicks"] == 0


def _one_object_scene():
    """``score_clicks``'s leading arguments for the tiny model where every Gaussian and pixel is one object."""
    model = tiny_chorus_model(semantic_supersample=1)
    model.eval()
    points = model.means.detach().numpy()
    point_instances = np.ones(len(points), dtype=np.int64)
    instances = torch.ones(48, 64, dtype=torch.long)
    classes = torch.full((48, 64), 4)
    return (model, "sam", tiny_camera(), [instances], [classes], points, point_instances, set())


def test_score_clicks_on_a_tiny_scene():
    """Every Gaussian belongs to one object: a threshold below any cosine selects it all (3D IoU 1), one above
    any selects nothing (IoU 0), and a view that sees nothing has only empty clicks."""
    args = _one_object_scene()
    model, points, point_instances, instances, classes = args[0], args[5], args[6], args[3][0], args[4][0]
    teacher_grid = torch.ones(8, 8, 16)  # one feature everywhere: the teacher's click takes the whole view
    everything = score_clicks(
        *args, ClickEvalConfig(similarity=-1.01), knn=5, teacher_features=[teacher_grid]
    )
    assert everything["clicks"] == 1 and everything["empty_clicks"] == 0
    record = everything["per_click"][0]
    assert record["feature_selected"] == model.num_points and record["feature_iou_3d"] == 1.0
    assert everything["teacher_per_view"]["miou_2d"] == 1.0
    nothing = score_clicks(*args, ClickEvalConfig(similarity=1.01), knn=5)
    assert nothing["per_click"][0]["feature_selected"] == 0
    assert nothing["feature"]["miou_2d"] == nothing["feature"]["miou_3d"] == 0.0
    assert "teacher_per_view" not in nothing
    away = tiny_camera()
    away.camera_to_worlds[0, 2, 3] = -3.0  # behind the Gaussians, looking away from them
    missed = score_clicks(model, "sam", away, [instances], [classes], points, point_instances, set(),
                          ClickEvalConfig(similarity=-1.01), knn=5)  # fmt: skip
    assert missed["empty_clicks"] == 1 and missed["per_click"][0]["feature_selected"] == 0
    with pytest.raises(ValueError, match="one instance and one class map"):
        score_clicks(model, "sam", tiny_camera(), [], [], points, point_instances, set(), ClickEvalConfig())


def test_region_growing_keeps_the_clicked_object_of_two_alike():
    from splatsem_ns.models.relevancy import click_seed, grow_region

    generator = torch.Generator().manual_seed(0)
    chair_a = torch.rand(40, 3, generator=generator) * 0.2  # a 20 cm blob at the origin
    chair_b = chair_a + torch.tensor([1.0, 0.0, 0.0])  # the same chair a metre away
    table = torch.rand(30, 3, generator=generator) * 0.2 + torch.tensor([0.0, 0.5, 0.0])
    means = torch.cat([chair_a, chair_b, table])
    selected = torch.zeros(len(means), dtype=torch.bool)
    selected[:80] = True  # both chairs match the clicked feature; the table does not
    region = grow_region(means, selected, 5, radius=0.15)
    assert region[:40].all() and not region[40:].any()
    region = grow_region(means, selected, 45, radius=0.15)
    assert region[40:80].all() and not region[:40].any()
    assert grow_region(means, selected, 5, radius=2.0)[:80].all()  # a link distance spanning both
    assert not grow_region(means, selected, 85, radius=0.15).any()  # a seed outside the selection

    # The seed: the selected Gaussian that weighs most in the clicked pixel ...
    weights = torch.zeros(len(means))
    weights[[3, 50, 90]] = torch.tensor([0.2, 0.5, 0.9])
    assert click_seed(means, selected, weights) == 50
    # ... else the selected one nearest the pixel's most visible Gaussian.
    weights = torch.zeros(len(means))
    weights[45] = 1.0
    only_a = torch.zeros_like(selected)
    only_a[:40] = True
    assert click_seed(means, only_a, weights) == int((means[:40] - means[45]).norm(dim=-1).argmin())
    assert click_seed(means, torch.zeros_like(selected), weights) is None


def test_the_region_rule_is_scored_beside_the_feature_rule():
    args = _one_object_scene()
    model = args[0]
    wide = score_clicks(*args, ClickEvalConfig(similarity=-1.01, region_radius=10.0), knn=5)
    record = wide["per_click"][0]
    assert record["region_selected"] == record["feature_selected"] == model.num_points  # one connected blob
    assert wide["region"] == wide["feature"]
    narrow = score_clicks(*args, ClickEvalConfig(similarity=-1.01, region_radius=1e-4), knn=5)
    assert narrow["per_click"][0]["region_selected"] == 1  # no neighbour that close: the seed alone
    assert "region" not in score_clicks(*args, ClickEvalConfig(similarity=-1.01, region_radius=None), knn=5)
