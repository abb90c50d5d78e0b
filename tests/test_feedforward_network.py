"""The feed-forward network (splatsem_ns.feedforward): geometry against analytic cameras, then the tiny network.

Cameras here are OpenGL camera-to-world, as the datamanager serves them; the reference projection
(``_project_opengl``) is written independently of the package's OpenCV internals.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gsplat.cuda._torch_impl import _spherical_harmonics

from splatsem_ns.data.depth import pixels_to_world
from splatsem_ns.feedforward import (
    GaussianHead,
    GaussianHeadConfig,
    PredictedGaussians,
    SemanticSplatNetwork,
    SemanticSplatNetworkConfig,
    depth_candidates,
    network_inputs,
    plane_sweep_correlation,
    render_predicted,
    source_pixel_coordinates,
    teacher_channels_of,
    warp_features,
)
from splatsem_ns.feedforward.cameras import (
    quaternion_multiply,
    rotation_to_quaternion,
    unproject_depth,
    world_to_camera_viewmat,
)
from splatsem_ns.feedforward.gaussian_head import sh_rotation_matrices
from splatsem_ns.feedforward.network import PARAMETER_GROUPS

HEIGHT, WIDTH = 32, 40
TEACHERS = {"sam": 12, "siglip2": 20}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: thread start-up dominates, and on a busy 2-core machine two OpenMP threads made the
    tiny forward pass a hundred times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- helpers


def _rotation(axis: str, degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    matrices = {
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
        "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
    }
    return torch.tensor(matrices[axis], dtype=torch.float64)


def _pose(rotation: torch.Tensor, translation) -> torch.Tensor:
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, :3] = rotation
    pose[:3, 3] = torch.as_tensor(translation, dtype=torch.float64)
    return pose


def _intrinsics(focal: float, height: int, width: int, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[focal, 0, width / 2], [0, focal * 1.05, height / 2 - 0.7], [0, 0, 1]], dtype=dtype)


def _project_opengl(points: torch.Tensor, K: torch.Tensor, camera_to_world: torch.Tensor) -> torch.Tensor:
    """World points -> (u, v) pixels (u right, v down, centres at +0.5) of an OpenGL camera (looks down -z)."""
    local = (points - camera_to_world[:3, 3]) @ camera_to_world[:3, :3]
    depth = -local[..., 2]
    u = K[0, 2] + K[0, 0] * local[..., 0] / depth
    v = K[1, 2] - K[1, 1] * local[..., 1] / depth
    return torch.stack([u, v], dim=-1)


def _pixel_grid(height: int, width: int, dtype=torch.float64):
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5, indexing="ij"
    )
    return u, v


def _inputs(views: int, batch: int = 1, teachers=None, seed: int = 0):
    """Random images of ``views`` cameras side by side, looking roughly at the same spot."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, views, 3, HEIGHT, WIDTH, generator=generator)
    K = _intrinsics(36.0, HEIGHT, WIDTH, torch.float32).expand(batch, views, 3, 3).clone()
    poses = torch.stack(
        [_pose(_rotation("y", 3.0 * v), [0.15 * v, 0.02 * v, 0.05 * v]) for v in range(views)]
    ).float()
    features = {
        name: torch.randn(batch, views, 4, 5, channels, generator=generator).half()
        for name, channels in (teachers or {}).items()
    }
    return images, K, poses.expand(batch, views, 4, 4).clone(), features or None


# ------------------------------------------------------------------------------------ warp and cost volume


def test_warp_lands_where_the_point_projects():
    """Reference pixel centre at z-depth d -> world (pixels_to_world) -> projected into the source camera: the warp's
    sampling coordinates are there, for a rotation + translation between the two OpenGL cameras."""
    height, width = 12, 16
    K_ref, K_src = _intrinsics(14.0, height, width), _intrinsics(11.0, height, width)
    reference = _pose(_rotation("y", 20.0) @ _rotation("x", -10.0), [0.3, -0.2, 1.0])
    source = _pose(_rotation("y", 5.0) @ _rotation("z", 8.0), [0.9, 0.1, 0.6])
    depths = torch.tensor([1.3, 2.0, 4.5], dtype=torch.float64)
    coordinates, in_front = source_pixel_coordinates(K_ref, reference, K_src, source, depths, height, width)
    assert coordinates.shape == (3, height, width, 2) and bool(in_front.all())

    u, v = _pixel_grid(height, width)
    intrinsics = (K_ref[0, 0].item(), K_ref[1, 1].item(), K_ref[0, 2].item(), K_ref[1, 2].item())
    for i, depth in enumerate(depths):
        world = pixels_to_world(u.flatten(), v.flatten(), depth.expand(u.numel()), intrinsics, reference[:3])
        expected = _project_opengl(world, K_src, source).reshape(height, width, 2)
        torch.testing.assert_close(coordinates[i], expected, atol=1e-9, rtol=0)

    # warp_features samples exactly there: a source map holding its own pixel coordinates warps into them.
    su, sv = _pixel_grid(height, width)
    coordinate_map = torch.stack([su, sv])[None]  # [1, 2, h, w]
    warped = warp_features(
        coordinate_map, K_ref[None], reference[None], K_src[None], source[None], depths[None]
    )
    warped = warped[0].permute(1, 2, 3, 0)  # [D, h, w, 2]
    # Bilinear sampling reproduces a linear map exactly between the outermost pixel centres.
    inside = (
        (coordinates[..., 0] >= 0.5)
        & (coordinates[..., 0] <= width - 0.5)
        & (coordinates[..., 1] >= 0.5)
        & (coordinates[..., 1] <= height - 0.5)
    )
    assert int(inside.sum()) > 50
    torch.testing.assert_close(warped[inside], coordinates[inside], atol=1e-9, rtol=0)
    assert bool((warped[~inside.unsqueeze(-1).expand_as(warped)].abs() <= width).all())


def test_points_behind_the_source_sample_nothing():
    height, width = 6, 8
    K = _intrinsics(8.0, height, width)
    reference = _pose(torch.eye(3, dtype=torch.float64), [0, 0, 0])
    facing_back = _pose(
        _rotation("y", 180.0), [0, 0, -0.5]
    )  # looks towards +z, away from the reference's points
    _, in_front = source_pixel_coordinates(
        K, reference, K, facing_back, torch.tensor([2.0]).double(), height, width
    )
    assert not bool(in_front.any())
    warped = warp_features(
        torch.ones(1, 3, height, width).double(), K[None], reference[None], K[None], facing_back[None],
        torch.tensor([[2.0]]).double(),
    )  # fmt: skip
    assert bool((warped == 0).all())


def test_cost_volume_peaks_at_the_plane_depth():
    """Two cameras (baseline 0.6 m, 4 degrees of yaw) see a random-texture plane 2.6 m in front of the first. With
    fixed features (zero-mean, normalised 5x5 patches of the images), the best-correlating candidate is the one
    nearest the true depth at the pixels that see the plane in both views."""
    height, width, focal, plane = 48, 64, 50.0, 2.6
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]], dtype=torch.float64)
    poses = torch.stack([_pose(torch.eye(3), [0, 0, 0]), _pose(_rotation("y", 4.0), [0.6, 0.05, 0.0])])
    texture = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def render(pose):  # ray-plane intersection (world z = -plane), the texture spans x, y in [-4, 4] m
        u, v = _pixel_grid(height, width)
        rays = torch.stack([(u - K[0, 2]) / focal, -(v - K[1, 2]) / focal, -torch.ones_like(u)], -1)
        rays = rays @ pose[:3, :3].T
        distance = (-plane - pose[2, 3]) / rays[..., 2]
        points = pose[:3, 3] + distance[..., None] * rays
        image = F.grid_sample(texture, points[None, ..., :2] / 4.0, mode="bicubic", align_corners=False)[0]
        z_depth = -((points - pose[:3, 3]) @ pose[:3, :3])[..., 2]
        return image, z_depth, points

    rendered = [render(pose) for pose in poses]
    images = torch.stack([r[0] for r in rendered])
    true_depth = torch.stack([r[1] for r in rendered])
    radius = 2
    patches = F.unfold(images, 2 * radius + 1, padding=radius).reshape(2, -1, height, width)
    features = F.normalize(patches - patches.mean(1, keepdim=True), dim=1)

    candidates = depth_candidates(torch.tensor([1.0]).double(), torch.tensor([10.0]).double(), 32)
    correlation = plane_sweep_correlation(features[None], K.expand(1, 2, 3, 3), poses[None], candidates)
    assert correlation.shape == (1, 2, 32, height, width)
    best = correlation[0].argmax(dim=1)
    inverse_step = 1.0 / candidates[0, 1] - 1.0 / candidates[0, 0]
    position = (1.0 / true_depth - 1.0 / candidates[0, 0]) / inverse_step  # candidate index, fractional
    nearest = position.round().long()

    margin = radius + 1
    for view in range(2):
        uv = _project_opengl(rendered[view][2], K, poses[1 - view])
        sees_both = (
            (uv[..., 0] > margin)
            & (uv[..., 0] < width - margin)
            & (uv[..., 1] > margin)
            & (uv[..., 1] < height - margin)
        )
        sees_both[:margin] = sees_both[-margin:] = False
        sees_both[:, :margin] = sees_both[:, -margin:] = False
        # The plane is slanted for the second (yawed) camera: leave out pixels whose depth is about halfway between
        # two candidates, where the nearest one is not meaningfully nearer.
        clear = sees_both & ((position[view] - nearest[view]).abs() < 0.3)
        assert int(clear.sum()) > 1000
        hits = (best[view] == nearest[view])[clear].float().mean().item()
        assert hits > 0.98, f"view {view}: best candidate is the nearest at only {hits:.1%} of the pixels"
        assert int((best[view] - nearest[view])[sees_both].abs().max()) <= 1
        # Summed over the pixels, the cost volume's peak is unambiguous.
        if view == 0:
            assert int(correlation[0, 0][:, clear].sum(dim=1).argmax()) == int(nearest[0, 0, 0])


# ------------------------------------------------------------------------------------------ unprojection


def test_unprojection_with_true_depth_matches_pixels_to_world():
    """Gaussian centres from the true depth (no learned offset) are pixels_to_world of the pixel centres."""
    views, height, width = 2, 8, 10
    generator = torch.Generator().manual_seed(1)
    K = torch.stack([_intrinsics(9.0, height, width), _intrinsics(12.0, height, width)]).float()
    poses = torch.stack(
        [
            _pose(_rotation("x", 30.0), [1.0, 2.0, 0.5]),
            _pose(_rotation("z", -50.0) @ _rotation("y", 70.0), [-1, 0, 3]),
        ]
    ).float()
    true_depth = 0.5 + 4.0 * torch.rand(1, views, height, width, generator=generator)
    head = GaussianHead(GaussianHeadConfig(max_pixel_offset=0.0, hidden_channels=8), in_channels=4)
    out = head(
        torch.randn(1, views, 4, height, width, generator=generator),
        torch.rand(1, views, 3, height, width, generator=generator),
        true_depth,
        torch.rand(1, views, height, width, generator=generator),
        K[None],
        poses[None],
    )
    u, v = _pixel_grid(height, width, torch.float32)
    for view in range(views):
        intrinsics = (K[view, 0, 0].item(), K[view, 1, 1].item(), K[view, 0, 2].item(), K[view, 1, 2].item())
        expected = pixels_to_world(
            u.flatten(), v.flatten(), true_depth[0, view].flatten(), intrinsics, poses[view, :3]
        )
        torch.testing.assert_close(out["means"][0, view].reshape(-1, 3), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            unproject_depth(true_depth[0, view], K[view], poses[view]).reshape(-1, 3), expected
        )
    # The scale is a multiple of the pixel footprint at the Gaussian's depth, within the configured range.
    footprint = true_depth * 0.5 * (1 / K[:, 0, 0] + 1 / K[:, 1, 1])[None, :, None, None]
    ratio = out["scales"] / footprint[..., None]
    assert bool((ratio > 0.5).all()) and bool((ratio < 15.0).all())


def test_network_means_follow_its_own_depth():
    """In the full network, centres are the predicted depth unprojected (offsets off)."""
    config = SemanticSplatNetworkConfig.tiny()
    config.gaussians.max_pixel_offset = 0.0
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config).eval()
    images, K, poses, _ = _inputs(views=2)
    with torch.no_grad():
        out = network(images, K, poses)
    expected = unproject_depth(out.depth, K, poses).flatten(1, 3)
    torch.testing.assert_close(out.means, expected)
    assert bool((out.depth >= config.depth.near - 1e-4).all()) and bool(
        (out.depth <= config.depth.far + 1e-3).all()
    )


# ------------------------------------------------------------------------------------------ tiny network


@pytest.mark.parametrize(
    ("views", "batch", "with_teachers", "sh_degree"),
    [(2, 2, False, 0), (2, 1, True, 0), (3, 1, True, 1), (3, 1, False, 0)],
)
def test_forward_shapes_and_dtypes(views, batch, with_teachers, sh_degree):
    config = SemanticSplatNetworkConfig.tiny(TEACHERS)
    config.gaussians.sh_degree = sh_degree
    config.backbone.num_transformer_layers = (
        2  # the second layer shifts its windows (and pads them: 8x10 tokens)
    )
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config)
    images, K, poses, teacher_features = _inputs(views, batch, TEACHERS if with_teachers else None)
    if with_teachers:
        del teacher_features["siglip2"]  # a missing teacher is as good as an absent one
    out = network(images, K, poses, teacher_features)
    n = views * HEIGHT * WIDTH
    rest = (sh_degree + 1) ** 2 - 1
    expected = {
        "means": (batch, n, 3),
        "quats": (batch, n, 4),
        "scales": (batch, n, 3),
        "opacities": (batch, n),
        "features_dc": (batch, n, 3),
        "features_rest": (batch, n, rest, 3),
        "latent": (batch, n, config.semantic.latent_dim),
        "depth": (batch, views, HEIGHT, WIDTH),
        "confidence": (batch, views, HEIGHT, WIDTH),
    }
    for name, shape in expected.items():
        value = getattr(out, name)
        assert tuple(value.shape) == shape, name
        assert value.dtype == torch.float32, name
        assert bool(torch.isfinite(value).all()), name
    assert out.sh_degree == sh_degree and out.num_gaussians == n
    assert bool((out.scales > 0).all())
    assert bool((out.opacities > 0).all()) and bool((out.opacities < 1).all())
    assert bool((out.confidence > 0).all()) and bool((out.confidence <= 1).all())
    torch.testing.assert_close(out.quats.norm(dim=-1), torch.ones(batch, n))
    raw = out.splatfacto_parameters(0)
    assert raw["opacities"].shape == (n, 1)
    torch.testing.assert_close(raw["scales"].exp(), out.scales[0])


def test_gradients_reach_backbone_cost_volume_and_semantic_branch():
    """A loss on rendered RGB and rendered latent (target views, PyTorch rasterizer) trains every part."""
    config = SemanticSplatNetworkConfig.tiny(TEACHERS, teacher_dropout=0.0)
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config).train()
    images, K, poses, teacher_features = _inputs(views=2, teachers=TEACHERS)
    out = network(images, K, poses, teacher_features)
    target_poses = poses.clone()
    target_poses[:, :, 0, 3] += 0.05
    rendered = render_predicted(out, K, target_poses, WIDTH, HEIGHT)
    assert rendered.rgb.shape == (1, 2, HEIGHT, WIDTH, 3)
    assert rendered.latent.shape == (1, 2, HEIGHT, WIDTH, config.semantic.latent_dim)
    assert rendered.depth.shape == (1, 2, HEIGHT, WIDTH) and rendered.alpha.shape == (1, 2, HEIGHT, WIDTH)
    loss = F.mse_loss(rendered.rgb, images.permute(0, 1, 3, 4, 2)) + rendered.latent.square().mean()
    loss.backward()

    def has_gradient(module: torch.nn.Module) -> bool:
        return all(
            p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in module.parameters()
        ) and any(float(p.grad.abs().sum()) > 0 for p in module.parameters())

    assert has_gradient(network.backbone.cnn.stem)
    assert has_gradient(network.backbone.transformer.layers[0].cross_attention)
    assert has_gradient(network.depth_predictor.cost_unet.stem)
    assert has_gradient(network.depth_predictor.cost_unet.encoder)
    assert has_gradient(network.depth_predictor.refine_unet)
    assert has_gradient(network.gaussian_head)
    for teacher in TEACHERS:
        assert has_gradient(network.semantic_branch.teacher_projections[teacher])
    assert has_gradient(network.semantic_branch.aggregation)
    assert has_gradient(network.semantic_branch.latent_head)


def test_render_puts_a_gaussian_where_its_camera_projects_it():
    """render_predicted's camera convention: a small Gaussian at pixels_to_world(u, v, d) of an OpenGL target camera
    renders at pixel (u, v) with expected depth d."""
    K = _intrinsics(30.0, HEIGHT, WIDTH, torch.float32)
    pose = _pose(_rotation("y", 25.0) @ _rotation("x", -15.0), [0.4, -0.3, 1.2]).float()
    row, column, depth = 9, 27, 2.5
    intrinsics = (K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item())
    centre = pixels_to_world(
        torch.tensor([column + 0.5]), torch.tensor([row + 0.5]), torch.tensor([depth]), intrinsics, pose[:3]
    )
    gaussians = PredictedGaussians(
        means=centre[None],
        quats=torch.tensor([[[1.0, 0, 0, 0]]]),
        scales=torch.full((1, 1, 3), 0.02),
        opacities=torch.tensor([[0.9]]),
        features_dc=torch.full((1, 1, 3), 1.0),
        features_rest=torch.zeros(1, 1, 0, 3),
        latent=torch.ones(1, 1, 4),
        depth=torch.zeros(1, 1, 1, 1),
        confidence=torch.zeros(1, 1, 1, 1),
    )
    rendered = render_predicted(gaussians, K[None, None], pose[None, None], WIDTH, HEIGHT)
    alpha = rendered.alpha[0, 0]
    assert divmod(int(alpha.argmax()), WIDTH) == (row, column)
    assert abs(float(rendered.depth[0, 0, row, column]) - depth) < 1e-3
    assert float(rendered.latent[0, 0, row, column, 0]) > 0.5
    viewmat = world_to_camera_viewmat(pose)
    torch.testing.assert_close(
        viewmat @ pose, torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0])), atol=1e-6, rtol=0
    )
    # At half resolution the latent lands in the half-size pixel that holds the full-size one, the RGB pass stays.
    half = render_predicted(gaussians, K[None, None], pose[None, None], WIDTH, HEIGHT, latent_scale=0.5)
    assert half.rgb.shape[2:4] == (HEIGHT, WIDTH) and half.latent.shape[2:4] == (HEIGHT // 2, WIDTH // 2)
    assert divmod(int(half.latent[0, 0, ..., 0].argmax()), WIDTH // 2) == (row // 2, column // 2)


def test_freeze_stops_gradients():
    config = SemanticSplatNetworkConfig.tiny(TEACHERS, teacher_dropout=0.0)
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config)
    images, K, poses, teacher_features = _inputs(views=2, teachers=TEACHERS)
    groups = network.parameter_groups()
    assert set(groups) == set(PARAMETER_GROUPS)
    assert sum(len(g) for g in groups.values()) == len(list(network.parameters()))
    assert len({id(p) for g in groups.values() for p in g}) == len(list(network.parameters()))

    def backward() -> None:
        network.zero_grad(set_to_none=True)
        out = network(images, K, poses, teacher_features)
        (out.latent.square().mean() + out.features_dc.square().mean() + out.means.square().mean()).backward()

    # Stage: semantics on a trained reconstruction network.
    network.freeze("geometry", "appearance")
    backward()
    for part in ("geometry", "appearance"):
        for module in network.part_modules(part):
            assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert all(p.grad is not None for p in network.semantic_branch.parameters())

    # Stage: open vocabulary with the object-aware part frozen.
    network.freeze("geometry", "appearance", frozen=False)
    network.freeze("semantic_object")
    backward()
    for module in network.part_modules("semantic_object"):
        assert all(p.grad is None for p in module.parameters())
    for module in network.part_modules("semantic_language") + network.part_modules("geometry"):
        assert all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match="Unknown part"):
        network.freeze("everything")


def test_frozen_object_part_fixes_the_object_latent_channels():
    """With object_latent_dim > 0, training the language part leaves the object channels of the latent unchanged."""
    config = SemanticSplatNetworkConfig.tiny(TEACHERS, object_latent_dim=3)
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config).eval()
    network.freeze("geometry", "appearance", "semantic_object")
    images, K, poses, teacher_features = _inputs(views=2, teachers=TEACHERS)
    with torch.no_grad():
        before = network(images, K, poses, teacher_features).latent
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=1.0)
    network(images, K, poses, teacher_features).latent.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = network(images, K, poses, teacher_features).latent
    torch.testing.assert_close(after[..., :3], before[..., :3], atol=0, rtol=0)
    assert not torch.allclose(after[..., 3:], before[..., 3:])


def test_eval_forward_is_deterministic_and_absent_teachers_are_masked():
    config = SemanticSplatNetworkConfig.tiny(TEACHERS)
    torch.manual_seed(0)
    network = SemanticSplatNetwork(config).eval()
    images, K, poses, teacher_features = _inputs(views=3, teachers=TEACHERS)
    with torch.no_grad():
        first = network(images, K, poses, teacher_features)
        second = network(images, K, poses, teacher_features)
        without = network(images, K, poses)
        masked = network(
            images, K, poses, teacher_features,
            teacher_available={name: torch.zeros(1, 3, dtype=torch.bool) for name in TEACHERS},
        )  # fmt: skip
    for name in ("means", "quats", "scales", "opacities", "features_dc", "latent", "depth", "confidence"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    torch.testing.assert_close(masked.latent, without.latent)
    assert not torch.allclose(first.latent, without.latent)
    # Teacher features only touch the latent: geometry and appearance are the same without them.
    assert torch.equal(first.means, without.means) and torch.equal(first.features_dc, without.features_dc)


def test_inputs_from_served_views_and_unknown_teachers():
    generator = torch.Generator().manual_seed(0)
    views = {
        "images": torch.randint(0, 256, (1, 2, HEIGHT, WIDTH, 3), dtype=torch.uint8, generator=generator),
        "intrinsics": _intrinsics(36.0, HEIGHT, WIDTH, torch.float32).expand(1, 2, 3, 3).clone(),
        "camera_to_world": _inputs(2)[2],
        "teacher_features": {"sam": torch.randn(1, 2, 4, 5, 12).half()},
    }
    assert teacher_channels_of(views) == {"sam": 12}
    kwargs = network_inputs(views)
    assert kwargs["images"].shape == (1, 2, 3, HEIGHT, WIDTH) and kwargs["images"].dtype == torch.float32
    assert float(kwargs["images"].max()) <= 1.0
    network = SemanticSplatNetwork(SemanticSplatNetworkConfig.tiny(teacher_channels_of(views))).eval()
    with torch.no_grad():
        assert network(**kwargs).latent.shape[1] == 2 * HEIGHT * WIDTH
        with pytest.raises(ValueError, match="not among the teachers"):
            network(**{**kwargs, "teacher_features": {"dino": torch.zeros(1, 2, 4, 5, 3)}})
        with pytest.raises(TypeError, match="float"):
            network(views["images"].permute(0, 1, 4, 2, 3), kwargs["intrinsics"], kwargs["camera_to_world"])


# ------------------------------------------------------------------------------------- rotations and SH


def test_quaternions_and_sh_rotation():
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(64, 4, dtype=torch.float64, generator=generator), dim=-1)
    q = q * torch.where(q[:, :1] < 0, -1.0, 1.0)
    w, x, y, z = q.unbind(-1)
    matrices = torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    torch.testing.assert_close(rotation_to_quaternion(matrices), q)
    half_turn = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))  # w = 0: the hard case
    torch.testing.assert_close(rotation_to_quaternion(half_turn), torch.tensor([0.0, 1.0, 0.0, 0.0]).double())
    product = quaternion_multiply(q[:8], q[8:16])
    product = product * torch.where(product[:, :1] < 0, -1.0, 1.0)
    torch.testing.assert_close(rotation_to_quaternion(matrices[:8] @ matrices[8:16]), product)

    # Camera-frame SH coefficients, re-expressed in the world frame, give the same colour for the same direction.
    rotation = matrices[0]
    coefficients = torch.randn(16, 3, dtype=torch.float64, generator=generator)
    world = sh_rotation_matrices(rotation, 3) @ coefficients
    directions_camera = F.normalize(torch.randn(50, 3, dtype=torch.float64, generator=generator), dim=-1)
    directions_world = directions_camera @ rotation.T
    torch.testing.assert_close(
        _spherical_harmonics(3, directions_world, world.expand(50, 16, 3)),
        _spherical_harmonics(3, directions_camera, coefficients.expand(50, 16, 3)),
    )
