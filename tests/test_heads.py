"""Projector heads, the distillation loss and the semantic latent source."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splatsem_ns.models.heads import (
    ProjectorHead,
    cosine_distillation_loss,
    heads_from_state_dict,
    resize_feature_map,
)
from splatsem_ns.models.semantic_source import LearnedLatentSource, LearnedLatentSourceConfig


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_head_shapes_and_layers(layers):
    head = ProjectorHead(latent_dim=16, feature_dim=40, hidden_dim=24, num_layers=layers)
    out = head(torch.randn(5, 7, 16))
    assert out.shape == (5, 7, 40)
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == layers


def test_head_rejects_zero_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        ProjectorHead(8, 8, num_layers=0)


def test_heads_rebuilt_from_checkpoint_match():
    heads = nn.ModuleDict({"sam": ProjectorHead(32, 256, 64, 2), "clip": ProjectorHead(32, 512, 64, 1)})
    state = {f"projector_heads.{k}": v for k, v in heads.state_dict().items()}
    state["gauss_params.means"] = torch.zeros(3, 3)  # other model keys are ignored
    rebuilt = nn.ModuleDict(heads_from_state_dict(state, "projector_heads."))
    rebuilt.load_state_dict(heads.state_dict())
    x = torch.randn(4, 32)
    for name in heads:
        torch.testing.assert_close(rebuilt[name](x), heads[name](x))


def test_cosine_loss_values():
    a = torch.randn(6, 5, 8)
    assert cosine_distillation_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_distillation_loss(a, 3.0 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert cosine_distillation_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    e = torch.eye(2)
    assert cosine_distillation_loss(e[:1], e[1:]).item() == pytest.approx(1.0)
    assert cosine_distillation_loss(a, a.half()).dtype == torch.float32  # fp16 cached targets


def test_head_learns_to_match_a_teacher():
    torch.manual_seed(0)
    latent = torch.randn(12, 9, 16)
    target = torch.tanh(latent @ torch.randn(16, 48))
    head = ProjectorHead(16, 48, 64, 2)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    start = cosine_distillation_loss(head(latent), target).item()
    for _ in range(200):
        loss = cosine_distillation_loss(head(latent), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * start


def test_resize_feature_map():
    x = torch.arange(16.0).reshape(4, 4, 1)
    assert resize_feature_map(x, (4, 4)) is x
    down = resize_feature_map(x, (2, 2))
    torch.testing.assert_close(down[..., 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # 2x2 block means
    up = resize_feature_map(torch.ones(2, 3, 5), (4, 6))
    assert up.shape == (4, 6, 5) and torch.allclose(up, torch.ones_like(up))


def test_learned_latent_source_params_densify_with_gaussians():
    source = LearnedLatentSource(LearnedLatentSourceConfig(latent_dim=17, init_std=0.5))
    params = source.gaussian_params(10)
    assert list(params) == ["semantic_latent"] and params["semantic_latent"].shape == (10, 17)
    assert params["semantic_latent"].std() > 0.1  # non-zero so heads get gradients from step 0
    gauss = nn.ParameterDict(params)
    assert source(gauss) is gauss["semantic_latent"]
    assert source.param_groups() == {}


def test_masked_distillation_averages_over_the_views_that_have_a_teacher():
    from splatsem_ns.models.heads import cosine_distillation_loss, masked_cosine_distillation_loss

    predicted = torch.randn(2, 3, 5, 4)
    target = torch.randn(2, 3, 5, 4)
    available = torch.tensor([[True, False, True], [False, False, False]])
    masked = masked_cosine_distillation_loss(predicted, target, available)
    kept = predicted[available], target[available]
    assert torch.allclose(masked, cosine_distillation_loss(*kept))
    assert (
        float(masked_cosine_distillation_loss(predicted, target, torch.zeros(2, 3, dtype=torch.bool))) == 0.0
    )
    assert torch.equal(
        masked_cosine_distillation_loss(predicted, target, None), cosine_distillation_loss(predicted, target)
    )
