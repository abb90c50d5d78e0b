"""Confusion matrix and segmentation scores, checked against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from splatsem_ns.evaluation import (
    ConfusionMatrix,
    foreground_classes,
    per_class_table,
    remap_labels,
    segmentation_scores,
)

# Three classes; the last entry has ignored ground truth and the one before it an out-of-range prediction.
GT = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0, 5, 1])


def test_counts_iou_and_accuracy_by_hand() -> None:
    cm = ConfusionMatrix(3).update(PRED, GT)
    np.testing.assert_array_equal(cm.matrix, [[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    np.testing.assert_array_equal(cm.missed, [0, 0, 1])
    np.testing.assert_array_equal(cm.gt_counts(), [3, 2, 4])
    np.testing.assert_array_equal(cm.pred_counts(), [3, 2, 3])
    # IoU = TP / (GT + predicted - TP); the out-of-range prediction is a false negative of class 2 only.
    np.testing.assert_allclose(cm.iou(), [2 / 4, 1 / 3, 2 / 5])
    np.testing.assert_allclose(cm.accuracy(), [2 / 3, 1 / 2, 2 / 4])
    assert cm.miou() == pytest.approx((2 / 4 + 1 / 3 + 2 / 5) / 3)
    assert cm.macc() == pytest.approx((2 / 3 + 1 / 2 + 2 / 4) / 3)
    assert cm.overall_accuracy() == pytest.approx(5 / 9)
    assert cm.miou(classes=[0, 2]) == pytest.approx((2 / 4 + 2 / 5) / 2)


def test_torch_inputs_of_any_shape_match_numpy() -> None:
    flat = ConfusionMatrix(3).update(PRED, GT)
    shaped = ConfusionMatrix(3).update(
        torch.from_numpy(PRED).reshape(2, 5), torch.from_numpy(GT).reshape(2, 5)
    )
    np.testing.assert_array_equal(flat.matrix, shaped.matrix)
    np.testing.assert_array_equal(flat.missed, shaped.missed)


def test_ignore_index_and_out_of_range_ground_truth_are_skipped() -> None:
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(np.array([0, 1, 1, 0, 1]), np.array([0, 255, 7, -3, 1]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    assert cm.overall_accuracy() == 1.0


def test_out_of_range_prediction_is_a_false_negative_only() -> None:
    cm = ConfusionMatrix(2).update(np.array([-1, -1, 1, 9]), np.array([0, 0, 1, 1]))
    # Class 0: never predicted, 2 gt -> IoU 0; class 1: TP 1, gt 2, predicted 1 -> IoU 1/2.
    np.testing.assert_allclose(cm.iou(), [0.0, 0.5])
    np.testing.assert_allclose(cm.accuracy(), [0.0, 0.5])
    assert cm.overall_accuracy() == pytest.approx(1 / 4)
    np.testing.assert_array_equal(cm.missed, [2, 1])


def test_classes_absent_from_ground_truth() -> None:
    # Class 2 is predicted but never in the ground truth, class 3 appears nowhere.
    cm = ConfusionMatrix(4).update(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]))
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 2) and iou[1] == 1.0 and iou[2] == 0.0 and math.isnan(iou[3])
    acc = cm.accuracy()
    assert math.isnan(acc[2]) and math.isnan(acc[3])
    # Only classes in the ground truth are averaged, but class 2's false positive still lowers class 0.
    assert cm.miou() == pytest.approx((1 / 2 + 1.0) / 2)
    assert cm.macc() == pytest.approx((1 / 2 + 1.0) / 2)
    assert math.isnan(cm.miou(classes=[2, 3]))
    assert math.isnan(ConfusionMatrix(3).overall_accuracy())


def test_merge_equals_update_on_concatenation() -> None:
    rng = np.random.default_rng(0)
    preds = [rng.integers(-1, 6, size=n) for n in (50, 120, 7)]
    gts = [rng.integers(-1, 6, size=n) for n in (50, 120, 7)]
    merged = ConfusionMatrix(5)
    for pred, gt in zip(preds, gts, strict=True):
        merged.merge(ConfusionMatrix(5).update(pred, gt))
    joint = ConfusionMatrix(5).update(np.concatenate(preds), np.concatenate(gts))
    np.testing.assert_array_equal(merged.matrix, joint.matrix)
    np.testing.assert_array_equal(merged.missed, joint.missed)
    np.testing.assert_allclose(merged.iou(), joint.iou())
    with pytest.raises(ValueError, match="4 and 5 classes|5 and 4 classes"):
        merged.merge(ConfusionMatrix(4))


def test_scores_are_pooled_not_averaged_per_image() -> None:
    # Image A: class 0 perfect (1 pixel); image B: class 0 all wrong (3 pixels). Pooled IoU is 1/4,
    # an average of per-image IoUs would be 1/2.
    cm = (
        ConfusionMatrix(2)
        .update(np.array([0]), np.array([0]))
        .update(np.array([1, 1, 1]), np.array([0, 0, 0]))
    )
    assert cm.iou()[0] == pytest.approx(1 / 4)


def test_bad_inputs_raise() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same number of entries"):
        cm.update(np.zeros(3, dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="pred must hold integer"):
        cm.update(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="classes must be in"):
        cm.miou(classes=[3])


def test_foreground_scores_leave_out_background_but_keep_its_predictions() -> None:
    names = {0: "wall", 1: "floor", 2: "chair", 3: "table"}
    gt = np.array([0, 0, 1, 2, 2, 3, 3])
    pred = np.array([0, 2, 1, 2, 2, 3, 0])  # a wall pixel predicted as chair, a table pixel as wall
    scores = segmentation_scores(ConfusionMatrix(4).update(pred, gt), names)
    # chair: TP 2, gt 2, predicted 3 -> 2/3; table: TP 1, gt 2, predicted 1 -> 1/2; wall: 1/3; floor: 1.
    assert scores["per_class"]["chair"]["iou"] == pytest.approx(2 / 3)
    assert scores["per_class"]["table"]["iou"] == pytest.approx(1 / 2)
    assert scores["per_class"]["wall"]["iou"] == pytest.approx(1 / 3)
    assert scores["fg_miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores["fg_macc"] == pytest.approx((1.0 + 1 / 2) / 2)
    assert scores["miou"] == pytest.approx((1 / 3 + 1.0 + 2 / 3 + 1 / 2) / 4)
    assert scores["overall_acc"] == pytest.approx(5 / 7)
    assert scores["per_class"]["wall"]["gt_count"] == 2
    assert foreground_classes(["Wall", "floor", "chair", "ceiling "], 4) == [2]


def test_scores_are_json_safe_with_absent_classes() -> None:
    cm = ConfusionMatrix(3).update(np.array([0, 0]), np.array([0, 0]))
    scores = segmentation_scores(cm, ["wall", "chair", "table"])
    text = json.dumps(scores, allow_nan=False)
    assert json.loads(text)["per_class"]["chair"] == {"iou": None, "acc": None, "gt_count": 0}
    assert scores["fg_miou"] is None and scores["miou"] == 1.0
    assert all(type(scores[key]) is float for key in ("miou", "macc", "overall_acc"))


def test_class_name_validation() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="2 class names"):
        segmentation_scores(cm, ["a", "b"])
    with pytest.raises(ValueError, match="remap_labels"):
        segmentation_scores(cm, {5: "chair"})
    with pytest.raises(ValueError, match="distinct"):
        segmentation_scores(cm, ["a", "a", "b"])
    names = segmentation_scores(cm, {1: "chair"})["per_class"].keys()
    assert list(names) == ["class_0", "chair", "class_2"]


def test_per_class_table() -> None:
    scores = segmentation_scores(
        ConfusionMatrix(2).update(np.array([0, 1, 1]), np.array([0, 1, 0])), ["wall", "sofa"]
    )
    table = per_class_table(scores)
    lines = table.splitlines()
    assert lines[0].startswith("| class | IoU (%) | Acc (%) | GT count |")
    assert "| wall | 50.0 | 50.0 | 2 |" in lines
    assert "| sofa | 50.0 | 100.0 | 1 |" in lines
    assert "| **foreground mean** | 50.0 | 100.0 | |" in lines
    empty = per_class_table(segmentation_scores(ConfusionMatrix(1), ["chair"]))
    assert "| chair | - | - | 0 |" in empty


def test_remap_labels() -> None:
    scannet20 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
    raw = np.array([[0, 1, 14], [39, 40, 13]], dtype=np.uint16)
    np.testing.assert_array_equal(remap_labels(raw, scannet20), [[-1, 0, 12], [19, -1, -1]])
    np.testing.assert_array_equal(remap_labels(torch.tensor([7, 3]), [3, 7], ignore_index=255), [1, 0])
    with pytest.raises(ValueError, match="distinct"):
        remap_labels(raw, [1, 1])


def test_confusion_counts_round_trip_and_merge():
    from splatsem_ns.evaluation.metrics import ConfusionMatrix

    a = ConfusionMatrix(3).update(np.array([0, 1, 2, -1]), np.array([0, 1, 1, 2]))
    b = ConfusionMatrix(3).update(np.array([2, 2]), np.array([2, 0]))
    back = ConfusionMatrix.from_counts(a.counts())
    assert np.array_equal(back.matrix, a.matrix) and np.array_equal(back.missed, a.missed)
    pooled = ConfusionMatrix.from_counts(a.counts()).merge(ConfusionMatrix.from_counts(b.counts()))
    both = ConfusionMatrix(3).update(np.array([0, 1, 2, -1, 2, 2]), np.array([0, 1, 1, 2, 2, 0]))
    assert np.array_equal(pooled.matrix, both.matrix) and pooled.miou() == both.miou()
    with pytest.raises(ValueError, match="K \\+ 1"):
        ConfusionMatrix.from_counts([[1, 2], [3, 4]])
