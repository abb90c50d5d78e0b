"""Teacher features lifted onto the Gaussians a view sees (splatsem_ns.encoders.lifted_targets), and the per-Gaussian
distillation term of chorus-pretrain that uses them."""

from __future__ import annotations

import pytest
import torch

from splatsem_ns.encoders.lifted_targets import lift_teacher_features


def _views(has_depth: bool = True) -> dict:
    """One scene, one 8 x 6 view from the origin looking down -z (OpenGL) at a wall 2 units away; the teacher's
    4 x 3 grid holds each cell centre's image position [u / W, v / H], so bilinear reads are exact inside."""
    intrinsics = torch.tensor([[4.0, 0.0, 4.0], [0.0, 4.0, 3.0], [0.0, 0.0, 1.0]])
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    grid = torch.stack(((cols + 0.5) / 4, (rows + 0.5) / 3), dim=-1)  # [3, 4, 2]
    return {
        "images": torch.zeros(1, 1, 6, 8, 3),
        "intrinsics": intrinsics[None, None],
        "camera_to_world": torch.eye(4)[None, None],
        "depth": torch.full((1, 1, 6, 8), 2.0 if has_depth else 0.0),
        "has_depth": torch.tensor([has_depth]),
        "teacher_features": {"t": grid[None, None].half()},
        "teacher_available": {"t": torch.tensor([[True]])},
    }


MEANS = torch.tensor(
    [
        [0.0, 0.0, -2.0],  # on the wall, at image position (4, 3)
        [0.5, 0.5, -2.0],  # on the wall, at (5, 2)
        [0.0, 0.0, -3.0],  # behind the wall: the sensor sees the wall there
        [10.0, 0.0, -2.0],  # outside the image
        [0.0, 0.0, 2.0],  # behind the camera
    ]
)


def test_gaussians_seen_by_a_view_get_the_teachers_feature_at_their_position():
    lifted = lift_teacher_features(
        MEANS, torch.zeros(5, dtype=torch.long), _views(), ["t"], pairs_per_scene=100
    )
    assert lifted is not None and lifted.gaussians.tolist() == [0, 1]
    torch.testing.assert_close(
        lifted.features["t"], torch.tensor([[4 / 8, 3 / 6], [5 / 8, 2 / 6]]), atol=2e-3, rtol=0
    )
    assert lifted.available["t"].tolist() == [True, True]


def test_views_without_depth_lift_nothing_and_each_scene_keeps_at_most_its_share():
    batch_index = torch.zeros(5, dtype=torch.long)
    assert lift_teacher_features(MEANS, batch_index, _views(has_depth=False), ["t"], 100) is None
    one = lift_teacher_features(MEANS, batch_index, _views(), ["t"], pairs_per_scene=1)
    assert one is not None and len(one.gaussians) == 1 and one.gaussians.item() in (0, 1)


@pytest.mark.slow
def test_the_per_gaussian_term_trains_the_encoder_on_a_collection(tmp_path):
    """chorus-pretrain with point_loss_weight > 0: lifted pairs on the generated rooms (which have depth), a
    ``distill_points_<teacher>`` loss with gradients into the encoder, which falls over a few dozen steps."""
    from support import fit_one_batch, tiny_collection

    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
    from splatsem_ns.models.chorus_pretrain import ChorusPretrainModelConfig
    from splatsem_ns.pipelines.chorus_pretrain_pipeline import ChorusPretrainPipelineConfig

    collection = tiny_collection(tmp_path / "scenes", rooms=2, test_room=1, seed_points=300)
    torch.manual_seed(0)
    config = ChorusPretrainPipelineConfig(
        datamanager=MultiSceneDataManagerConfig(
            data=collection, image_size=(48, 64), teachers=("labels",), eval_split="test", num_workers=0,
            feature_cache_dir=tmp_path / "cache", gaussians="points", max_scenes=1,
        ),
        model=ChorusPretrainModelConfig(tiny_encoder=True, point_loss_weight=1.0, point_loss_pairs=512),
    )  # fmt: skip
    pipeline = config.setup(device="cpu", test_mode="val")
    pipeline.model.train()
    _, batch = pipeline.datamanager.next_train(0)
    outputs = pipeline.model(batch)
    assert all(len(outputs[part]["lifted"].gaussians) <= 512 for part in ("context", "target"))
    losses = pipeline.model.get_loss_dict(outputs, batch)
    assert {"distill_labels", "distill_centred_labels", "distill_points_labels"} <= set(losses)
    losses["distill_points_labels"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipeline.model.encoder.parameters())
    history = fit_one_batch(pipeline.model, batch, "distill_points_labels", 30)
    assert history[-1] < 0.7 * history[0], history[::6]
    pipeline.model.eval()
    assert "lifted" not in pipeline.model(batch)["context"]  # evaluation renders only
