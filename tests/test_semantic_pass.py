"""The semantic pass's sampling options: supersampling with block averaging, and its own rasterize mode."""

from __future__ import annotations

import types

import numpy as np
import torch
from support import tiny_camera, tiny_chorus_model


def test_supersampling_averages_a_finer_render() -> None:
    model = tiny_chorus_model(semantic_supersample=1)
    features = model.semantic_source(model.gauss_params).detach()
    fine = model.render_features(tiny_camera(), features, scale=0.5)  # 32 x 24
    assert fine.abs().sum() > 0  # the Gaussians are in view
    model.config.semantic_supersample = 4
    coarse = model.render_features(tiny_camera(), features, scale=0.125)  # 8 x 6, rendered at 32 x 24
    expected = torch.nn.functional.avg_pool2d(fine.permute(2, 0, 1), 4).permute(1, 2, 0)
    assert coarse.shape == (6, 8, features.shape[1])
    torch.testing.assert_close(coarse, expected)
    # Never finer than the image: at full resolution there is nothing to supersample.
    model.config.semantic_supersample = 1
    full = model.render_features(tiny_camera(), features, scale=1.0)
    model.config.semantic_supersample = 4
    torch.testing.assert_close(model.render_features(tiny_camera(), features, scale=1.0), full)


def test_semantic_pass_has_its_own_rasterize_mode() -> None:
    model = tiny_chorus_model()
    features = model.semantic_source(model.gauss_params).detach()
    default = model.render_features(tiny_camera(), features, scale=0.125)
    model.config.semantic_rasterize_mode = "classic"  # the RGB pass's mode, as by default
    torch.testing.assert_close(model.render_features(tiny_camera(), features, scale=0.125), default)
    model.config.semantic_rasterize_mode = "antialiased"
    antialiased = model.render_features(tiny_camera(), features, scale=0.125)
    # Gaussians smaller than a coarse pixel count by their area: less total weight than when dilated.
    ones = torch.ones(model.num_points, 1)
    weight_aa = model.render_features(tiny_camera(), ones, scale=0.125).sum()
    model.config.semantic_rasterize_mode = None
    weight_classic = model.render_features(tiny_camera(), ones, scale=0.125).sum()
    assert not torch.allclose(antialiased, default)
    assert weight_aa < weight_classic
    assert model.config.rasterize_mode == "classic"


def test_distilling_at_the_render_resolution_keeps_the_supersampled_render() -> None:
    model = tiny_chorus_model(semantic_supersample=4, distill_at="render")
    model.train()
    model.optimizers = {}  # set by the trainer; the densification strategy only passes them on here
    latent = model.get_outputs(tiny_camera())["semantic_latent"]
    # The finest teacher grid (sam: 8 cells over 48 rows, so 8 x 11 here) with 4 x 4 pixels per cell, not pooled.
    assert latent.shape[:2] == (32, 44)
    model.eval()
    assert model.get_outputs(tiny_camera())["semantic_latent"].shape[:2] == (8, 11)  # queries see the grid

    targets = {"lang": torch.randn(4, 5, 24), "sam": torch.randn(8, 8, 16)}
    losses = model.distillation_losses(latent, targets)
    # Every rendered pixel against the teacher's features upsampled (bilinear) to the render's size.
    upsampled = torch.nn.functional.interpolate(
        targets["lang"].permute(2, 0, 1)[None], size=(32, 44), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0)
    expected = 1 - torch.nn.functional.cosine_similarity(
        model.decode_features(latent, "lang"), upsampled, dim=-1
    )
    torch.testing.assert_close(losses["distill_lang"], expected.mean())
    assert set(losses) == {"distill_lang", "distill_sam"}


def test_distilling_at_the_teacher_grid_constrains_only_cell_means() -> None:
    """Two renders with the same per-cell means: the grid loss cannot tell them apart, the per-pixel loss can."""
    model = tiny_chorus_model(distill_at="teacher")
    target = {"lang": torch.randn(4, 5, 24)}
    smooth = torch.randn(4, 5, 32).repeat_interleave(4, 0).repeat_interleave(4, 1)  # [16, 20, 32]
    checker = (
        torch.arange(16)[:, None] + torch.arange(20)[None]
    ) % 2 * 2 - 1  # +-1, zero mean per 4 x 4 block
    mixed = smooth + 3.0 * checker[..., None] * torch.randn(32)
    at_grid = [model.distillation_losses(x, target)["distill_lang"] for x in (smooth, mixed)]
    torch.testing.assert_close(at_grid[0], at_grid[1])
    model.config.distill_at = "render"
    at_render = [model.distillation_losses(x, target)["distill_lang"] for x in (smooth, mixed)]
    assert not torch.allclose(at_render[0], at_render[1])


def test_alpha_normalized_latent_is_a_weighted_mean() -> None:
    """A constant latent renders as that constant wherever anything is seen (not scaled by coverage), and
    the per-Gaussian supervision weights stay the plain compositing weights."""
    model = tiny_chorus_model(semantic_supersample=1)
    with torch.no_grad():
        model.gauss_params["opacities"].fill_(-2.0)  # opacity 0.12: every pixel partly covered
    constant = torch.tensor([0.5, -2.0, 1.0]).expand(model.num_points, 3)
    plain = model.render_features(tiny_camera(), constant, scale=0.5)
    coverage = model.render_features(tiny_camera(), torch.ones(model.num_points, 1), scale=0.5)
    seen = coverage[..., 0] > 1e-3
    assert seen.any() and (coverage[seen] < 0.99).any()
    model.config.semantic_alpha_normalize = True
    normalized = model.render_features(tiny_camera(), constant, scale=0.5)
    torch.testing.assert_close(normalized[seen], constant[:1].expand(int(seen.sum()), 3))
    torch.testing.assert_close(plain, constant[0] * coverage)
    # Supervision weights are unaffected by the display normalisation.
    cameras = tiny_camera()
    model.config.semantic_alpha_normalize = False
    weights = model.gaussian_view_weights(cameras)
    model.config.semantic_alpha_normalize = True
    torch.testing.assert_close(model.gaussian_view_weights(cameras), weights)


def test_sampled_render_pixels_see_the_upsampled_teacher() -> None:
    """Interpolating the teacher at chosen pixels gives what upsampling its whole grid gives there, so a random
    subset of pixels is an unbiased sample of the full per-pixel loss."""
    from splatsem_ns.models.chorus_splat import render_resolution_pairs

    latent, target = torch.randn(12, 20, 8), torch.randn(3, 5, 6)
    everywhere = render_resolution_pairs(latent, target, None)
    indices = torch.arange(12 * 20)
    torch.testing.assert_close(render_resolution_pairs(latent, target, indices), everywhere)
    some = torch.tensor([0, 19, 37, 120, 239])
    picked = render_resolution_pairs(latent, target, some)
    torch.testing.assert_close(picked[0], everywhere[0][some])
    torch.testing.assert_close(picked[1], everywhere[1][some])

    model = tiny_chorus_model(distill_pixels=50)
    latent = torch.randn(16, 20, 32)
    pixels = model.distillation_pixels(latent)
    assert pixels.shape == (50,) and len(set(pixels.tolist())) == 50 and int(pixels.max()) < 16 * 20
    targets = {"lang": torch.randn(4, 5, 24)}
    expected = 1 - torch.nn.functional.cosine_similarity(
        model.decode_features(latent.reshape(-1, 32)[pixels], "lang"),
        render_resolution_pairs(latent, targets["lang"], None)[1][pixels],
        dim=-1,
    )
    torch.testing.assert_close(
        model.distillation_losses(latent, targets, pixels)["distill_lang"], expected.mean()
    )
    model.config.distill_pixels = 0  # every pixel
    assert model.distillation_pixels(latent) is None
    model.config.distill_pixels, model.config.distill_at = 50, "teacher"  # nothing to sample on the grid
    assert model.distillation_pixels(latent) is None


def test_supersampling_stays_within_the_pixel_budget() -> None:
    model = tiny_chorus_model(semantic_supersample=8)
    features = model.semantic_source(model.gauss_params).detach()
    assert model.render_features(tiny_camera(), features, scale=0.125).shape[:2] == (6, 8)
    model.config.distill_at = "render"
    sizes = []
    for budget in (10_000, 48 * 64, 1000, 1):
        model.config.semantic_max_pixels = budget
        fine = model._render_semantic_latent(
            model.means, model.quats, torch.exp(model.scales), torch.sigmoid(model.opacities).squeeze(-1),
            features, torch.eye(4)[None], tiny_camera().get_intrinsics_matrices(), 64, 48, 0.125, pool=False,
        )  # fmt: skip
        sizes.append(tuple(fine.shape[:2]))
    # 6 x 8 cells: factor 8 fits 10k pixels (the image caps it at 8); 3072 pixels allow 8; 1000 allow 4; 1 allows 1.
    assert sizes == [(48, 64), (48, 64), (24, 32), (6, 8)]


def test_area_weighting_weighs_pixels_by_the_surface_they_show() -> None:
    """A pixel twice as far covers four times the surface: it weighs four times as much, and the weights keep
    their ratio across steps (a running normaliser, not a per-view one)."""
    from splatsem_ns.models.chorus_splat import render_resolution_pairs

    model = tiny_chorus_model(distill_area_weighting=True, distill_pixels=0)
    latent = torch.randn(8, 10, 32)
    depth = torch.ones(16, 20, 1)
    depth[:, 10:] = 2.0  # the right half of the view is twice as far
    weights = model.distillation_pixel_weights(latent, depth, None).reshape(8, 10)
    torch.testing.assert_close(weights[:, 5:], 4 * weights[:, :5])
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))
    closer = model.distillation_pixel_weights(latent, depth / 2, None)  # a close-up: less weight
    assert closer.mean() < 0.9
    sampled = model.distillation_pixel_weights(latent, depth, torch.tensor([0, 9, 79]))  # left, right, right
    torch.testing.assert_close(sampled[1:], 4 * sampled[:1].expand(2))
    targets = {"lang": torch.randn(4, 5, 24)}
    weights = model.distillation_pixel_weights(latent, depth, None)
    per_pixel = 1 - torch.nn.functional.cosine_similarity(
        model.decode_features(latent.reshape(-1, 32), "lang"),
        render_resolution_pairs(latent, targets["lang"], None)[1],
        dim=-1,
    )
    torch.testing.assert_close(
        model.distillation_losses(latent, targets, None, weights)["distill_lang"],
        (per_pixel * weights).mean(),
    )
    # Off (the default), or without a depth render: no weights.
    assert tiny_chorus_model().distillation_pixel_weights(latent, depth, None) is None
    assert model.distillation_pixel_weights(latent, None, None) is None
    # Training renders the depth it needs.
    model.train()
    model.optimizers = {}
    assert model.get_outputs(tiny_camera())["depth"] is not None


def test_semantic_every_runs_the_semantic_half_on_every_kth_step_only() -> None:
    model = tiny_chorus_model(semantic_every=3, semantic_smoothness_weight=1.0)
    model.train()
    model.optimizers = {}
    targets = {"lang": torch.randn(4, 5, 24), "sam": torch.randn(8, 8, 16)}
    batch = {"image": torch.rand(48, 64, 3), "teacher_features": targets}
    seen = {}
    for step in range(7):
        model.step = step
        outputs = model.get_outputs(tiny_camera())
        losses = model.get_loss_dict(
            outputs, batch if model.is_semantic_step(step) else {"image": batch["image"]}
        )
        seen[step] = (
            "semantic_latent" in outputs,
            sorted(k for k in losses if "distill" in k or "smooth" in k),
        )
    semantic = ["distill_lang", "distill_sam", "semantic_smoothness"]
    assert seen == {s: (True, semantic) if s % 3 == 0 else (False, []) for s in range(7)}
    model.eval()  # renders for the viewer and ns-eval always carry the latent
    assert "semantic_latent" in model.get_outputs(tiny_camera())


def test_the_datamanager_serves_teacher_features_on_semantic_steps_only() -> None:
    from splatsem_ns.data.datamanager import ChorusDataManager

    served = []
    manager = ChorusDataManager.__new__(ChorusDataManager)
    manager._features = {"lang": [np.zeros((4, 5, 24), np.float16)]}
    manager._weights = {}
    manager._depths = []
    manager.device = "cpu"
    manager.serves_teachers_at = lambda step: step % 2 == 0
    manager._host_cameras = types.SimpleNamespace(for_camera=lambda index: None)
    camera = types.SimpleNamespace(metadata={"cam_idx": torch.tensor(0)})
    parent = ChorusDataManager.__mro__[1]
    original = parent.next_train
    parent.next_train = lambda self, step: (camera, {"image": torch.zeros(1)})
    try:
        for step in range(4):
            served.append("teacher_features" in manager.next_train(step)[1])
    finally:
        parent.next_train = original
    assert served == [True, False, True, False]


def test_full_frame_semantic_renders_use_full_frame_tiles() -> None:
    from splatsem_ns.models.chorus_splat import semantic_tile_size

    assert semantic_tile_size(4, 256 * 192) == 4  # training's pass at the teachers' resolution (ScanNet)
    assert semantic_tile_size(4, 1280 * 720) == 16  # the viewer's full-resolution query
    assert semantic_tile_size(32, 1280 * 720) == 32


def test_full_resolution_eval_latent_reuses_the_rgb_pass_projection(monkeypatch) -> None:
    # semantic_shares_rgb_projection: an eval-mode frame whose latent has the RGB pass's size and tiles projects
    # the Gaussians once, and gives the same latent as projecting them again; training and renders with gradients
    # (click weights) project for themselves.
    from splatsem_ns.rendering import torch_rasterizer

    model = tiny_chorus_model(semantic_tile_size=16, semantic_alpha_normalize=True)
    model.eval()
    model.hidden_mask = torch.arange(model.num_points) % 5 == 0  # both passes draw the same visible subset
    model.viewer_semantic_scale = 1.0  # the query panel's full resolution
    projections = []
    project = torch_rasterizer.project_gaussians
    monkeypatch.setattr(
        torch_rasterizer, "project_gaussians", lambda *a, **k: projections.append(1) or project(*a, **k)
    )

    def frame_latent(share: bool, grad: bool = False) -> torch.Tensor:
        model.config.semantic_shares_rgb_projection = share
        projections.clear()
        with torch.set_grad_enabled(grad):
            latent = model.get_outputs(tiny_camera())["semantic_latent"].detach()
        return latent, len(projections)

    (shared, once), (separate, twice) = frame_latent(True), frame_latent(False)
    assert (once, twice) == (1, 2)
    assert shared.shape == (48, 64, model.semantic_source.latent_dim) and shared.abs().sum() > 0
    assert torch.equal(shared, separate)
    assert frame_latent(True, grad=True)[1] == 2
    model.viewer_semantic_scale = None  # training's semantic scale: another size, its own projection
    assert frame_latent(True)[1] == 2
