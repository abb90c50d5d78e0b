"""The semantic pass's sampling options: supersampling with block averaging, and its own rasterize mode."""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras
from support import tiny_chorus_model


def _camera() -> Cameras:
    """64 x 48 pixels, looking down -z at the model's seed points in the unit cube from z = 3."""
    camera_to_world = torch.tensor([[[1.0, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 3.0]]])
    return Cameras(camera_to_worlds=camera_to_world, fx=64.0, fy=64.0, cx=32.0, cy=24.0, width=64, height=48)


def test_supersampling_averages_a_finer_render() -> None:
    model = tiny_chorus_model()
    features = model.semantic_source(model.gauss_params).detach()
    fine = model._render_features(_camera(), features, scale=0.5)  # 32 x 24
    assert fine.abs().sum() > 0  # the Gaussians are in view
    model.config.semantic_supersample = 4
    coarse = model._render_features(_camera(), features, scale=0.125)  # 8 x 6, rendered at 32 x 24
    expected = torch.nn.functional.avg_pool2d(fine.permute(2, 0, 1), 4).permute(1, 2, 0)
    assert coarse.shape == (6, 8, features.shape[1])
    torch.testing.assert_close(coarse, expected)
    # Never finer than the image: at full resolution there is nothing to supersample.
    model.config.semantic_supersample = 1
    full = model._render_features(_camera(), features, scale=1.0)
    model.config.semantic_supersample = 4
    torch.testing.assert_close(model._render_features(_camera(), features, scale=1.0), full)


def test_semantic_pass_has_its_own_rasterize_mode() -> None:
    model = tiny_chorus_model()
    features = model.semantic_source(model.gauss_params).detach()
    default = model._render_features(_camera(), features, scale=0.125)
    model.config.semantic_rasterize_mode = "classic"  # the RGB pass's mode, as by default
    torch.testing.assert_close(model._render_features(_camera(), features, scale=0.125), default)
    model.config.semantic_rasterize_mode = "antialiased"
    antialiased = model._render_features(_camera(), features, scale=0.125)
    # Gaussians smaller than a coarse pixel count by their area: less total weight than when dilated.
    ones = torch.ones(model.num_points, 1)
    weight_aa = model._render_features(_camera(), ones, scale=0.125).sum()
    model.config.semantic_rasterize_mode = None
    weight_classic = model._render_features(_camera(), ones, scale=0.125).sum()
    assert not torch.allclose(antialiased, default)
    assert weight_aa < weight_classic
    assert model.config.rasterize_mode == "classic"
