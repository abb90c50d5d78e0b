"""Glue of the segmentation protocol: class queries, id remapping, frames, and the datamanager's scene views."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
from splatsem_ns.evaluation.metrics import ConfusionMatrix
from splatsem_ns.evaluation.protocol import (
    SemanticEvalConfig,
    accumulate_2d,
    class_queries,
    points_confusion,
    score,
    upsample_labels,
)
from splatsem_ns.evaluation.voting import project_points
from splatsem_ns.pipelines.chorus_pipeline import _ground_truth_reference, _to_dataparser_frame


def test_class_queries_skip_unlabelled():
    ids, names = class_queries({0: "unlabelled", 4: "table", 1: "wall"})
    assert ids == [1, 4] and names == ["wall", "table"]


def test_upsample_labels_nearest():
    labels = torch.tensor([[1, 2], [3, 4]])
    up = upsample_labels(labels, (4, 4))
    assert up.dtype == torch.long and up.shape == (4, 4)
    assert torch.equal(up[:2, :2], torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(up[2:, 2:], torch.full((2, 2), 4))


def test_2d_and_3d_confusions_use_queried_ids_only():
    ids = [1, 4, 9]
    cm = ConfusionMatrix(len(ids))
    gt = torch.tensor([[1, 4, 0, 7]])  # 0 unlabelled, 7 not queried: both ignored
    pred = torch.tensor([[1, 9, 4, 4]])
    accumulate_2d(cm, pred, gt, ids)
    assert cm.matrix.sum() == 2
    assert cm.matrix[0, 0] == 1 and cm.matrix[1, 2] == 1  # wall right, table predicted as ball
    scores = score(cm, ["wall", "table", "ball"], SemanticEvalConfig())
    assert scores["per_class"]["wall"]["iou"] == 1.0 and scores["per_class"]["table"]["iou"] == 0.0
    assert scores["fg_miou"] == pytest.approx(0.0)  # wall is background; table (0) is the only fg class in gt
    p = points_confusion(np.array([1, 4, 4]), np.array([1, 4, 2]), ids)
    assert p.matrix.sum() == 2 and p.miou() == 1.0


@pytest.fixture(scope="module")
def datamanager(tmp_path_factory):
    from splatsem_ns.data.datamanager import ChorusDataManagerConfig

    root = tmp_path_factory.mktemp("protocol")
    scene = generate_synthetic_scene(root / "scene", SyntheticSceneConfig(num_views=10, width=48, height=36))
    cfg = ChorusDataManagerConfig(
        data=scene.parent,
        teachers=("tiny-dinov2",),
        feature_cache_dir=root / "cache",
        eval_image_indices=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cfg.setup(device="cpu", test_mode="val")


def test_scene_views_match_the_datasets(datamanager):
    views = datamanager.scene_views()
    train = [v for v in views if v.split == "train"]
    evals = [v for v in views if v.split == "eval"]
    assert len(train) == len(datamanager.train_dataset) and len(evals) == len(datamanager.eval_dataset)
    cams = datamanager.train_dataset.cameras
    torch.testing.assert_close(train[3].intrinsics, cams[3].get_intrinsics_matrices())
    torch.testing.assert_close(train[3].camera_to_world, cams[3].camera_to_worlds)
    assert train[3].label_path.name == Path(datamanager.train_dataset.image_filenames[3]).name
    reference = _ground_truth_reference(views, datamanager.scene_metadata(), None)
    maps, train_maps = reference.label_maps(split="eval"), reference.label_maps(split="train")
    assert len(maps) == len(evals) and maps[0].shape == evals[0].image.shape[:2]
    assert len(train_maps) == len(train)
    np.testing.assert_array_equal(train_maps[3].numpy(), np.asarray(Image.open(train[3].label_path)))


def test_labelled_points_land_on_their_labels_in_the_cameras_frame(datamanager):
    """The original-frame PLY, moved by the dataparser transform, projects onto matching label pixels."""
    metadata = datamanager.scene_metadata()
    cloud = read_point_cloud(Path(metadata["labeled_points_path"]))
    points = _to_dataparser_frame(cloud.xyz, metadata)
    view = datamanager.scene_views()[0]
    gt = np.asarray(Image.open(view.label_path))
    uv, z, ok = project_points(points, view.intrinsics.numpy(), view.camera_to_world.numpy(), gt.shape)
    # Nearest point per pixel (a z-buffer), so that only visible points are compared.
    idx = np.flatnonzero(ok)
    pix = np.floor(uv[idx]).astype(int)
    far_to_near = np.argsort(-z[idx])
    buffer = np.full(gt.shape, -1)
    buffer[pix[far_to_near, 1], pix[far_to_near, 0]] = idx[far_to_near]
    visible = buffer[buffer >= 0]
    vpix = np.floor(uv[visible]).astype(int)
    assert len(visible) > 100
    assert (gt[vpix[:, 1], vpix[:, 0]] == cloud.labels[visible]).mean() > 0.9


def test_a_failing_diagnostic_is_recorded_not_raised():
    from splatsem_ns.pipelines.chorus_pipeline import _diagnostic

    out = {"semantic_2d": {"miou": 0.5}}

    def fails(scale):
        raise RuntimeError("tensors on two devices")

    _diagnostic(out, "semantic_3d_seen", fails, 0.5)
    assert out["semantic_2d"] == {"miou": 0.5}
    assert "tensors on two devices" in out["diagnostic_errors"]["semantic_3d_seen"]
    _diagnostic(out, "semantic_2d_train_views", lambda n: {"extra": n}, 1)
    assert out["extra"] == 1 and list(out["diagnostic_errors"]) == ["semantic_3d_seen"]
