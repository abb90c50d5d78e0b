"""Scene tokens: even coverage, pooling that decodes back, files that round-trip, and a token-compressed scene
that still answers text queries."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from splatsem_ns.export.loader import SemanticScene, load_semantic_scene
from splatsem_ns.export.semantic_ply import TeacherInfo
from splatsem_ns.export.tokens import (
    ExportTokens,
    decoded_scene,
    encoder_tokens,
    farthest_points,
    load_scene_tokens,
    scene_tokens,
)
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.teachers.registry import make_teacher_config


def _blob_scene(n_per_blob: int = 500) -> SemanticScene:
    """Four blobs of Gaussians, each with its own latent (plus a little noise), and a labels-proxy head."""
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0, 0], [2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    codes = torch.randn(4, 8)
    means = torch.cat([c + 0.3 * torch.randn(n_per_blob, 3) for c in centres])
    latent = codes.repeat_interleave(n_per_blob, 0) + 0.01 * torch.randn(4 * n_per_blob, 8)
    n = len(means)
    config = make_teacher_config("labels")
    return SemanticScene(
        means=means, scales=torch.full((n, 3), -3.0), quats=torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
        opacities=torch.full((n, 1), 2.0), features_dc=torch.zeros(n, 3), features_rest=torch.zeros(n, 0, 3),
        latent=latent, heads={"labels": ProjectorHead(8, 384, 32, 2).eval()},
        teachers={"labels": TeacherInfo.from_config(config, 384, True)}, sh_degree=0, source="blobs",
    )  # fmt: skip


def test_farthest_points_cover_the_points_evenly():
    line = torch.stack([torch.arange(100.0), torch.zeros(100), torch.zeros(100)], dim=1)
    chosen = farthest_points(line, 10, seed=5)
    assert len(set(chosen.tolist())) == 10
    assert chosen[1] in (0, 99)  # the second sample is the farthest from the first
    radius = (line[:, None, 0] - line[chosen][None, :, 0]).abs().min(dim=1).values.max()
    assert radius <= 10  # farthest-point sampling is within twice the best covering radius (5)


def test_tokens_pool_the_scene_and_decode_it_back():
    scene = _blob_scene()
    tokens = scene_tokens(scene, num_tokens=64, teachers=("labels",))
    assert tokens.num_tokens == 64 and int(tokens.counts.sum()) == scene.num_gaussians
    assert tokens.features["labels"].shape == (64, 384)
    back = tokens.decode_latent(scene.means)
    cosine = torch.nn.functional.cosine_similarity(back, scene.latent, dim=1)
    assert float(cosine.median()) > 0.99 and float((cosine > 0.9).float().mean()) > 0.95


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_token_files_round_trip(tmp_path, suffix):
    tokens = scene_tokens(_blob_scene(), num_tokens=32, teachers=("labels",))
    loaded = load_scene_tokens(tokens.save(tmp_path / f"scene.tokens{suffix}"))
    for name in ("positions", "latent", "counts"):
        assert torch.equal(getattr(loaded, name), getattr(tokens, name)), name
    assert torch.equal(loaded.features["labels"], tokens.features["labels"])
    (tmp_path / "other.npz").write_bytes(b"not tokens")
    with pytest.raises(ValueError, match="not a scene-token file"):
        load_scene_tokens(tmp_path / "other.npz")


def test_a_scene_decoded_from_512_tokens_still_answers_queries(tmp_path):
    scene = _blob_scene()
    scene.save(tmp_path / "scene.ply")
    path = ExportTokens(scene=tmp_path / "scene.ply", tokens=512).main()
    assert path == tmp_path / "scene.tokens.npz"
    tokens = load_scene_tokens(path)
    compressed = decoded_scene(load_semantic_scene(tmp_path / "scene.ply"), tokens)
    full, via_tokens = scene.query("chair"), compressed.query("chair")
    assert via_tokens.shape == full.shape
    assert torch.corrcoef(torch.stack([full, via_tokens]))[0, 1] > 0.95


@pytest.mark.parametrize("backbone", ["SpUNet-v1", "PTv3-lite-v1"])
def test_encoder_tokens_come_from_the_coarsest_stage(backbone, tmp_path):
    """Every Gaussian lies in its coarsest-stage site; tokens are the most opaque sites, carry that stage's
    features, pool the encoder's latents (decodable back), and survive a round trip through a file."""
    from splatsem_ns.encoders import GaussianEncoder, GaussianEncoderConfig

    torch.manual_seed(0)
    encoder = GaussianEncoder(
        GaussianEncoderConfig(backbone=backbone, backbone_preset="tiny", voxel_size=0.05, latent_dim=8)
    ).eval()
    scene = _blob_scene(200)
    with torch.no_grad():
        stage = encoder.coarsest_stage(
            scene.means, scene.features_dc, scene.opacities, scene.scales, scene.quats
        )
        latent = encoder(scene.means, scene.features_dc, scene.opacities, scene.scales, scene.quats)
    edge = 0.05 * encoder.backbone.coarsest_stride
    assert encoder.backbone.coarsest is None  # kept only while tokens are made
    assert float((scene.means - stage.centres[stage.site]).abs().max()) <= edge / 2 + 1e-5
    assert torch.allclose(stage.latent, latent, atol=1e-5)
    assert stage.features.shape[0] == len(stage.centres) > 8
    tokens = encoder_tokens(replace(scene, latent=latent), encoder, num_tokens=8, teachers=("labels",))
    assert tokens.num_tokens == 8 and tokens.encoder_features.shape == (8, stage.features.shape[1])
    mass = torch.zeros(len(stage.centres)).index_add_(0, stage.site, torch.ones(len(stage.site)))
    assert sorted(tokens.counts.tolist()) == sorted(mass.topk(8).values.long().tolist())
    loaded = load_scene_tokens(tokens.save(tmp_path / "scene.tokens.npz"))
    assert torch.equal(loaded.encoder_features, tokens.encoder_features)
    assert tokens.decode_latent(scene.means).shape == latent.shape
