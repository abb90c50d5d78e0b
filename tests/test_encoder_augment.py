"""chorus-pretrain's random transforms of the encoder's inputs (``splatsem_ns.encoders.augment``)."""

from __future__ import annotations

import math

import pytest
import torch

from splatsem_ns.encoders.augment import InputAugmentationConfig, augment_inputs
from splatsem_ns.encoders.inputs import SH_C0
from splatsem_ns.feedforward.cameras import quaternion_multiply

GEOMETRY_ONLY = dict(jitter=0.0, colour_contrast=0.0, colour_shift=0.0, colour_noise=0.0)


def _quaternion_matrices(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack(
        (
            torch.stack((1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)), -1),
            torch.stack((2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)), -1),
            torch.stack((2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)), -1),
        ),
        -2,
    )


def _covariances(quats: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    rotations = _quaternion_matrices(quats)
    return rotations @ torch.diag_embed(torch.exp(2 * log_scales)) @ rotations.mT


def _scenes(count: int, per_scene: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = count * per_scene
    gaussians = {
        "means": torch.rand(n, 3, generator=g) * 4,
        "features_dc": (torch.rand(n, 3, generator=g) - 0.5) / SH_C0 * 0.8,
        "opacities": torch.randn(n, 1, generator=g),
        "scales": torch.randn(n, 3, generator=g) - 4,
        "quats": torch.randn(n, 4, generator=g),
    }
    return gaussians, torch.arange(count).repeat_interleave(per_scene)


@pytest.mark.parametrize("up_axis", [0, 1, 2])
def test_each_scene_turns_about_the_up_axis_as_one_rigid_body_with_its_gaussians(up_axis: int) -> None:
    """Positions and every Gaussian's covariance turn by the same rotation (about ``up_axis``) and scale by the same
    factor within a scene; the up coordinate only scales and shifts; scenes of a batch draw their own transforms."""
    gaussians, batch = _scenes(3)
    config = InputAugmentationConfig(up_axis=up_axis, **GEOMETRY_ONLY)
    out = augment_inputs(gaussians, batch, 3, config, torch.Generator().manual_seed(1))
    transforms = []
    for b in range(3):
        mine = batch == b
        before, after = gaussians["means"][mine], out["means"][mine]
        # A similarity transform: solve after = before @ A + t by least squares, then A = factor * rotation.
        homogeneous = torch.cat((before, torch.ones(before.shape[0], 1)), 1)
        solution = torch.linalg.lstsq(homogeneous, after).solution
        linear = solution[:3].T  # after_i = linear @ before_i + t
        factor = torch.linalg.det(linear) ** (1 / 3)
        rotation = linear / factor
        assert torch.allclose(rotation @ rotation.T, torch.eye(3), atol=1e-4)
        assert torch.allclose(rotation[:, up_axis], torch.eye(3)[up_axis], atol=1e-4)  # the up axis stays put
        assert 0.9 - 1e-4 <= factor <= 1.1 + 1e-4
        expected = (
            factor**2
            * rotation
            @ _covariances(gaussians["quats"][mine], gaussians["scales"][mine])
            @ rotation.T
        )
        assert torch.allclose(
            _covariances(out["quats"][mine], out["scales"][mine]), expected, rtol=1e-3, atol=1e-9
        )
        transforms.append(linear)
    assert not torch.allclose(transforms[0], transforms[1], atol=1e-3)
    assert torch.equal(out["opacities"], gaussians["opacities"])


def test_surfaces_at_exact_coordinates_land_anywhere_inside_their_voxels() -> None:
    """A floor at z = 0 puts every point at the bottom of its 2 cm voxel; shifted scenes spread it over the voxel."""
    per_scene, scenes, voxel = 200, 64, 0.02
    xy = torch.rand(per_scene * scenes, 2) * 3
    gaussians = {
        "means": torch.cat((xy, torch.zeros(xy.shape[0], 1)), 1),
        "features_dc": torch.zeros(xy.shape[0], 3),
        "opacities": torch.zeros(xy.shape[0], 1),
        "scales": torch.full((xy.shape[0], 3), -4.0),
        "quats": torch.tensor([[1.0, 0, 0, 0]]).expand(xy.shape[0], 4),
    }
    batch = torch.arange(scenes).repeat_interleave(per_scene)

    def height_offsets(means: torch.Tensor) -> torch.Tensor:
        return means[:, 2] / voxel - torch.floor(means[:, 2] / voxel)

    assert torch.histc(height_offsets(gaussians["means"]), bins=10, min=0, max=1).count_nonzero() == 1
    for shift, bins in ((0.0, 1), (1.0, 10)):  # the shift does it (the jitter alone would too: off here)
        config = InputAugmentationConfig(shift=shift, jitter=0.0)
        out = augment_inputs(gaussians, batch, scenes, config, torch.Generator().manual_seed(0))
        assert torch.histc(height_offsets(out["means"]), bins=10, min=0, max=1).count_nonzero() == bins


def test_colours_change_per_scene_and_stay_valid() -> None:
    gaussians, batch = _scenes(2)
    unchanged = augment_inputs(gaussians, batch, 2, InputAugmentationConfig(**GEOMETRY_ONLY))
    assert torch.allclose(unchanged["features_dc"], gaussians["features_dc"], atol=1e-5)
    config = InputAugmentationConfig(colour_noise=0.0)
    out = augment_inputs(gaussians, batch, 2, config, torch.Generator().manual_seed(3))
    rgb_in, rgb_out = (x * SH_C0 + 0.5 for x in (gaussians["features_dc"], out["features_dc"]))
    assert rgb_out.min() >= -1e-6 and rgb_out.max() <= 1 + 1e-6
    for b in range(2):  # within a scene one gain and offset per channel: an exact affine map of the colours
        mine = batch == b
        fit = torch.linalg.lstsq(torch.cat((rgb_in[mine], torch.ones(int(mine.sum()), 1)), 1), rgb_out[mine])
        assert torch.allclose(fit.solution[:3], torch.diag(torch.diagonal(fit.solution[:3])), atol=1e-4)
        assert (torch.diagonal(fit.solution[:3]) - 1).abs().max() <= config.colour_contrast + 1e-4
    assert not torch.allclose(rgb_out, rgb_in, atol=1e-3)


def test_quaternion_product_composes_rotations() -> None:
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    product = _quaternion_matrices(quaternion_multiply(a, b))
    assert torch.allclose(product, _quaternion_matrices(a) @ _quaternion_matrices(b), atol=1e-5)
    half_turn = torch.tensor([[math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]])
    assert torch.allclose(
        _quaternion_matrices(half_turn)[0] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]), atol=1e-6
    )
