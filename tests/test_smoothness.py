"""The voxel consensus prior on the semantic latent (splatsem_ns.models.smoothness) and its place in the model."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_camera, tiny_chorus_model

from splatsem_ns.models.smoothness import voxel_consensus_loss, voxel_index, voxel_keys


def test_voxel_keys_are_equal_exactly_for_equal_cells() -> None:
    cells = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, 0]])
    keys = voxel_keys(cells).tolist()
    assert keys[0] == keys[-1]
    assert len(set(keys[:-1])) == 6
    assert (
        voxel_keys(torch.tensor([[-1000, 5, 123456]]))[0] != voxel_keys(torch.tensor([[5, -1000, 123456]]))[0]
    )


def test_latents_are_pulled_to_their_voxels_weighted_mean() -> None:
    means = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [5.0, 5.0, 5.0]])
    latent = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    loss = voxel_consensus_loss(latent, means, torch.ones(3), voxel=1.0, offset=torch.zeros(3))
    # The first two share a voxel whose mean is (0.5, 0.5): cosine 1/sqrt(2) each; the third is alone.
    torch.testing.assert_close(loss, torch.tensor(1.0 - 1.0 / math.sqrt(2.0)))
    loss.backward()
    assert (latent.grad[2] == 0).all()
    assert latent.grad[0, 1] < 0 and latent.grad[1, 0] < 0  # gradient descent moves each towards the other
    # Weights: a transparent Gaussian follows its voxel and does not pull the opaque one.
    latent = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = voxel_consensus_loss(latent, means[:2], torch.tensor([1.0, 0.0]), 1.0, torch.zeros(3))
    loss.backward()
    assert latent.grad[0].abs().max() == 0 and latent.grad[1, 0] < 0
    # The offset moves the grid: with 0.2 voxels shifted by 0.15, 0.1 and 0.2 fall on either side of a boundary.
    assert voxel_consensus_loss(latent, means[:2], torch.ones(2), 0.2, torch.full((3,), 0.05)) > 0
    assert voxel_consensus_loss(latent, means[:2], torch.ones(2), 0.2, torch.full((3,), 0.15)) == 0


def test_unsupervised_latents_take_their_neighbours_value() -> None:
    """Three Gaussians held by a (distillation-like) target, one beside them with no supervision at all: with the
    prior, the free one converges to its neighbours' latent; without it, it keeps its random start."""
    torch.manual_seed(0)
    means = torch.tensor([[0.01, 0.01, 0.01], [0.02, 0.03, 0.01], [0.03, 0.02, 0.02], [0.02, 0.02, 0.02]])
    target = torch.tensor([1.0, -2.0, 0.5, 0.0])
    start = torch.randn(4, 4)
    for weight in (0.0, 1.0):
        latent = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latent], lr=0.05)
        for _ in range(300):
            optimizer.zero_grad()
            supervised = (1 - torch.nn.functional.cosine_similarity(latent[:3], target[None], dim=-1)).mean()
            offset = torch.rand(3) * 0.05
            prior = voxel_consensus_loss(latent, means, torch.ones(4), 0.05, offset)
            (supervised + weight * prior).backward()
            optimizer.step()
        similarity = torch.nn.functional.cosine_similarity(latent[3].detach(), target, dim=0)
        if weight == 0:
            torch.testing.assert_close(latent[3].detach(), start[3])
        else:
            assert similarity > 0.99, similarity


def test_the_model_adds_the_prior_on_the_latent_only() -> None:
    camera = tiny_camera()
    assert tiny_chorus_model().config.semantic_smoothness_weight > 0  # on by default
    off = tiny_chorus_model(num_downscales=0, semantic_smoothness_weight=0.0)
    assert off.scene_scale == 1.0  # no dataparser scale in the metadata: the dataset's own units
    model = tiny_chorus_model(semantic_smoothness_weight=2.0, semantic_smoothness_voxel=0.5, num_downscales=0)
    model.train()
    model.optimizers = {}  # set by the trainer; the densification strategy only passes them on here
    outputs = model.get_outputs(camera)
    batch = {"image": torch.rand(48, 64, 3)}
    losses = model.get_loss_dict(outputs, batch)
    off.train()
    off.optimizers = {}
    assert "semantic_smoothness" not in off.get_loss_dict(off.get_outputs(camera), batch)
    assert 0 < losses["semantic_smoothness"] <= 2.0 * 2.0  # 1 - cos lies in [0, 2]
    losses["semantic_smoothness"].backward()
    assert model.gauss_params["semantic_latent"].grad.abs().sum() > 0
    assert model.gauss_params["means"].grad is None
    model.eval()
    assert "semantic_smoothness" not in model.get_loss_dict(outputs, batch)


@pytest.mark.slow
def test_voxels_are_sized_in_the_datasets_own_units(labels_run):
    """The datamanager hands the dataparser's scale to the model, so the prior's voxel edge means metres of the
    capture (the synthetic room's frame), whatever scale the dataparser applied."""
    from nerfstudio.utils.eval_utils import eval_setup

    import splatsem_ns.method_configs.chorus_splat  # noqa: F401 (numpy globals for weights_only loading)

    pipeline = eval_setup(labels_run / "config.yml", test_mode="test")[1]
    scale = float(pipeline.datamanager.train_dataparser_outputs.dataparser_scale)
    assert scale != 1.0 and pipeline.model.scene_scale == pytest.approx(scale)


def test_voxel_ids_are_those_of_torch_unique() -> None:
    """The sync-free voxel ids (sort and count on the device) equal torch.unique's inverse."""
    generator = torch.Generator().manual_seed(0)
    keys = voxel_keys(torch.randint(-40, 40, (5000, 3), generator=generator))
    _, inverse = torch.unique(keys, return_inverse=True)
    assert torch.equal(voxel_index(keys), inverse)
    assert voxel_index(keys[:0]).numel() == 0 and voxel_index(keys[:1]).tolist() == [0]


def _per_gaussian_sums_consensus(latent, means, weights, voxel, offset):
    """The prior as first written: weighted sums, total weights and counts per voxel in three separate passes,
    the target their weighted mean."""
    cells = torch.floor((means.detach() - offset) / voxel).long()
    inverse = voxel_index(voxel_keys(cells))
    weights = weights.detach().to(latent.dtype)
    rows = len(inverse)
    sums = torch.zeros(rows, latent.shape[1], dtype=latent.dtype).index_add_(
        0, inverse, latent.detach() * weights[:, None]
    )
    totals = torch.zeros(rows, dtype=latent.dtype).index_add_(0, inverse, weights)
    counts = torch.zeros(rows, dtype=torch.int64).index_add_(0, inverse, torch.ones_like(inverse))
    target = sums[inverse] / totals[inverse].clamp(min=1e-12)[:, None]
    shared = (counts[inverse] > 1).to(latent.dtype)
    cosine = torch.nn.functional.cosine_similarity(latent, target, dim=-1, eps=1e-8)
    return ((1.0 - cosine) * shared).sum() / shared.sum().clamp(min=1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_lean_prior_matches_the_prior_as_first_written(dtype) -> None:
    """The prior that normalises each voxel's weighted sum and holds one target per Gaussian gives the loss and
    gradient of the separate sums divided by the total weights: to float64's precision, and in float32 up to
    rounding (the gradients are about 1e-5)."""
    generator = torch.Generator().manual_seed(3)
    means = (torch.rand(4000, 3, generator=generator) * 2.0).to(dtype)
    weights = torch.rand(4000, generator=generator).to(dtype)
    weights[::7] = 0.0  # transparent Gaussians, and voxels whose total weight is 0
    offset = (torch.rand(3, generator=generator) * 0.1).to(dtype)
    results = []
    for loss_fn in (voxel_consensus_loss, _per_gaussian_sums_consensus):
        latent = (
            torch.randn(4000, 16, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
        )
        loss = loss_fn(latent, means, weights, 0.1, offset)
        loss.backward()
        results.append((loss.detach(), latent.grad))
    loss_tol, grad_tol = (1e-12, 1e-15) if dtype == torch.float64 else (1e-6, 1e-9)
    assert results[1][1].abs().max() > 1e3 * grad_tol  # gradients well above the tolerance
    torch.testing.assert_close(results[0][0], results[1][0], rtol=loss_tol, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=loss_tol, atol=grad_tol)
