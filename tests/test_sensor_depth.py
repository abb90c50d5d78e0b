"""The context views placed at their sensor depth (``feedforward.sensor_depth``): the views' own ceiling at targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from splatsem_ns.feedforward.render import render_predicted
from splatsem_ns.feedforward.sensor_depth import sensor_depth_gaussians
from splatsem_ns.pipelines.semantic_splat_pipeline import sensor_depth_scores


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> dict:
    """Two views of a synthetic room at 48x64, batched as the datamanager serves them, with each pixel's class."""
    from splatsem_ns.data.scene_frames import SceneFrames
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    root: Path = tmp_path_factory.mktemp("room") / "room"
    generate_synthetic_scene(root, SyntheticSceneConfig(seed=3, num_views=8, width=64, height=48))
    frames = SceneFrames.load(root)
    loaded = [frames.load_view(i, (48, 64)) for i in (0, 2)]

    def stack(key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(v, key) for v in loaded]))[None]

    return {
        "images": stack("image"),
        "intrinsics": stack("intrinsics").float(),
        "camera_to_world": stack("camera_to_world").float(),
        "depth": stack("depth").float(),
        "labels": stack("labels").long(),
    }


def _render(views: dict, latent=None, target: int = 0):
    gaussians = sensor_depth_gaussians(views, latent)
    return render_predicted(
        gaussians,
        views["intrinsics"][:, target : target + 1],
        views["camera_to_world"][:, target : target + 1],
        64,
        48,
        render_latent=latent is not None,
    )


def _at(views: dict, index: int) -> dict:
    return {k: v[:, index : index + 1] for k, v in views.items()}


def test_a_view_rendered_from_its_own_pixels_at_their_depth_is_itself(views):
    """Into its own camera, every measured pixel's splat lands on that pixel: the image comes back (blurred by a
    pixel-sized splat) and a carried per-pixel class comes back almost everywhere."""
    assert bool((views["depth"] > 0).all())  # the synthetic room measures every pixel
    one = _at(views, 0)
    classes = one["labels"].unique()
    one_hot = (one["labels"][..., None] == classes).float()  # [1, 1, H, W, K]
    rendered = _render(one, one_hot)
    scores = sensor_depth_scores(rendered, one)
    assert scores["sensor_depth_coverage"] > 0.98 and scores["sensor_depth_psnr"] > 25.0, scores
    carried = classes[rendered.latent[0, 0].argmax(-1)]
    assert (carried == one["labels"][0, 0]).float().mean() > 0.9  # splats bleed a little across depth edges
    relative = (rendered.depth[0, 0] - one["depth"][0, 0]).abs() / one["depth"][0, 0]
    # Front-to-back compositing leans each pixel toward its nearer neighbours: a few percent on this room's slanted
    # floor at 48x64 (about 2% of depth per pixel), far from any error of placement.
    assert relative.median() < 0.03 and relative.quantile(0.9) < 0.08


def test_unmeasured_pixels_are_left_out(views):
    """Pixels without a depth measurement (0) place nothing: half a view's depth removed leaves half uncovered."""
    one = _at(views, 0)
    half = {**one, "depth": one["depth"].clone()}
    half["depth"][..., :, 32:] = 0.0
    rendered = _render(half)
    covered = rendered.alpha[0, 0] > 0.5
    assert covered[:, :30].float().mean() > 0.98 and covered[:, 34:].float().mean() < 0.02


def test_another_view_is_reached_where_the_context_sees_it(views):
    """From one context view into another: part of the target is covered, and where it is, the image and the
    depth agree with the target's own far better than where it is not."""
    context, target = _at(views, 1), _at(views, 0)
    gaussians = sensor_depth_gaussians(context)
    rendered = render_predicted(
        gaussians, target["intrinsics"], target["camera_to_world"], 64, 48, render_latent=False
    )
    covered = rendered.alpha[0, 0] > 0.5
    assert 0.2 < covered.float().mean() < 1.0
    relative = (rendered.depth[0, 0] - target["depth"][0, 0]).abs() / target["depth"][0, 0]
    assert relative[covered].median() < 0.05


def test_the_network_is_also_scored_where_the_context_sees(views):
    """``psnr_where_views_see``: the network's PSNR over the target pixels the sensor-depth splats cover, so a render
    that is right there and black elsewhere scores as right, and one wrong there does not."""
    from types import SimpleNamespace

    one = _at(views, 0)
    half = {**one, "depth": one["depth"].clone()}
    half["depth"][..., :, 32:] = 0.0  # the context reaches the left half of the target only
    sensor = _render(half)
    real = one["images"].float()[..., :3] / 255.0
    covered = (sensor.alpha > 0.5)[..., None]
    assert covered[..., :30, :].all() and not covered[..., 34:, :].any()
    right_where_seen = torch.where(covered, real, torch.zeros_like(real))
    scores = sensor_depth_scores(sensor, one, SimpleNamespace(rgb=right_where_seen))
    assert scores["psnr_where_views_see"] > 90.0  # exact on every covered pixel (the MSE floor is 1e-10)
    wrong_where_seen = real.clone()
    wrong_where_seen[..., :32, :] = 1.0 - wrong_where_seen[..., :32, :]
    assert (
        sensor_depth_scores(sensor, one, SimpleNamespace(rgb=wrong_where_seen))["psnr_where_views_see"] < 15.0
    )
    assert "psnr_where_views_see" not in sensor_depth_scores(sensor, one)
