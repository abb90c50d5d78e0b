"""chorus-pretrain through the real commands on a tiny collection, and each scene's Gaussians served by the
multi-scene datamanager."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    command,
    fit_one_batch,
    ns_eval,
    offline_env,
    tiny_collection,
    train_synthetic,
    trained_on_collection,
)

from splatsem_ns.data.scene_gaussians import (
    GAUSSIAN_KEYS,
    SceneGaussiansError,
    collate_samples,
    load_scene_gaussians,
    points_as_gaussians,
    subset_in_views,
)

TEACHERS = ("labels", "labels-instance")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Four small rooms: three to train on, one held out (test split)."""
    return tiny_collection(tmp_path_factory.mktemp("pretrain_scenes"), rooms=4, test_room=3, seed_points=300)


def test_points_become_gaussians_as_wide_as_their_spacing():
    grid = np.stack(np.meshgrid(np.arange(5), np.arange(5), [0.0], indexing="ij"), -1).reshape(-1, 3) * 0.1
    rgb = np.full((len(grid), 3), 255, dtype=np.uint8)
    gaussians = points_as_gaussians(grid, rgb, neighbours=4)
    assert set(gaussians) == set(GAUSSIAN_KEYS)
    # An inner point's four nearest neighbours are 0.1 away.
    assert torch.exp(gaussians["scales"][12]).tolist() == pytest.approx([0.1] * 3, rel=1e-5)
    assert torch.sigmoid(gaussians["opacities"]).flatten().tolist() == pytest.approx([0.9] * 25)
    assert torch.allclose(0.28209479177387814 * gaussians["features_dc"] + 0.5, torch.ones(25, 3))


def test_surfels_lie_flat_on_their_surface_facing_the_room():
    """A box room's samples as surfels: each disc's thin axis is its surface's normal, pointing into the room (a
    floor faces up, a ceiling down), and its width is still the spacing."""
    from scipy.spatial.transform import Rotation

    from splatsem_ns.encoders.inputs import canonical_quaternions

    u = np.arange(0.05, 2.0, 0.1)
    a, b = (x.ravel() for x in np.meshgrid(u, u, indexing="ij"))
    zero, two = np.zeros_like(a), np.full_like(a, 2.0)
    faces = {  # samples of each face, and its normal facing the room's centre (1, 1, 1)
        "floor": (np.stack([a, b, zero], 1), [0, 0, 1]),
        "ceiling": (np.stack([a, b, two], 1), [0, 0, -1]),
        "wall x=0": (np.stack([zero, a, b], 1), [1, 0, 0]),
        "wall y=2": (np.stack([a, two, b], 1), [0, -1, 0]),
    }
    xyz = np.concatenate([points for points, _ in faces.values()])
    gaussians = points_as_gaussians(xyz, None, neighbours=4, shape="surfel", flatness=0.1)
    quats = gaussians["quats"]
    assert torch.allclose(quats, canonical_quaternions(quats), atol=1e-6)  # unit, w >= 0: the encoder's form
    x, y, z, w = quats.double().numpy()[:, [1, 2, 3, 0]].T
    normals = torch.as_tensor(Rotation.from_quat(np.stack([x, y, z, w], 1)).as_matrix()[:, :, 2])  # local z
    inner = torch.as_tensor((np.abs(a - 1.0) < 0.7) & (np.abs(b - 1.0) < 0.7))  # away from where faces meet
    for i, (name, (_, normal)) in enumerate(faces.items()):
        mine = normals[i * len(a) : (i + 1) * len(a)][inner]
        assert float((mine @ torch.tensor(normal, dtype=torch.float64)).min()) > 0.99, name
    widths = torch.exp(gaussians["scales"])
    assert torch.allclose(widths[:, 2], 0.1 * widths[:, 0]) and torch.allclose(widths[:, 0], widths[:, 1])
    assert float(widths[:, 0].median()) == pytest.approx(0.1, rel=1e-4)
    ball = points_as_gaussians(xyz, None, neighbours=4)
    assert torch.equal(ball["means"], gaussians["means"]) and torch.allclose(
        ball["scales"][:, 0], gaussians["scales"][:, 0]
    )


def test_a_scene_serves_its_fitted_gaussians_or_its_points(collection, tmp_path):
    from splatsem_ns.export.semantic_ply import write_semantic_ply

    scene = collection.parent / "room_0"
    points = load_scene_gaussians(scene, "auto", "gaussians.ply")
    assert len(points["means"]) == 300  # the seed points: no fit in the folder
    with pytest.raises(SceneGaussiansError, match="no fitted Gaussians"):
        load_scene_gaussians(scene, "ply", "gaussians.ply")
    fitted = tmp_path / "room"
    fitted.mkdir()
    (fitted / "transforms.json").write_text((scene / "transforms.json").read_text())
    write_semantic_ply(
        fitted / "gaussians.ply",
        means=points["means"][:10],
        scales_log=points["scales"][:10],
        quats=points["quats"][:10],
        opacities_logit=points["opacities"][:10],
        features_dc=points["features_dc"][:10],
        features_rest=torch.zeros(10, 0, 3),
    )
    served = load_scene_gaussians(fitted, "auto", "gaussians.ply")
    assert len(served["means"]) == 10 and torch.allclose(served["means"], points["means"][:10])
    # The labelled cloud: denser than the seed points, the only cloud of a capture without them.
    from splatsem_ns.data.ply_io import read_point_cloud

    labelled = read_point_cloud(scene / "points_labeled.ply")
    dense = load_scene_gaussians(scene, "labeled_points", "gaussians.ply")
    assert len(dense["means"]) == len(labelled.xyz) > 300
    assert torch.allclose(dense["means"], torch.as_tensor(labelled.xyz, dtype=torch.float32))
    with pytest.raises(SceneGaussiansError, match="labeled_points"):
        load_scene_gaussians(_without_seed_points(fitted), "points", "gaussians.ply")


def _without_seed_points(folder: Path) -> Path:
    meta = json.loads((folder / "transforms.json").read_text())
    meta.pop("ply_file_path", None)
    (folder / "transforms.json").write_text(json.dumps(meta))
    return folder


def test_batches_join_the_scenes_gaussians_with_their_index():
    samples = [
        {
            "sample_id": i,
            "gaussians": {k: torch.full((n, 4 if k == "quats" else 3), float(i)) for k in GAUSSIAN_KEYS},
        }
        for i, n in enumerate((3, 5))
    ]
    for s in samples:
        s["gaussians"]["opacities"] = s["gaussians"]["opacities"][:, :1]
    batch = collate_samples(samples)
    assert batch["sample_id"].tolist() == [0, 1]
    assert batch["gaussians"]["batch"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch["gaussians"]["means"][:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_the_datamanager_serves_a_seeded_subset_of_each_scenes_gaussians(collection, tmp_path):
    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig

    config = MultiSceneDataManagerConfig(
        data=collection, image_size=(48, 64), teachers=(), num_workers=0, batch_size=2, gaussians="points",
        max_gaussians=100, feature_cache_dir=tmp_path / "cache",
    )  # fmt: skip
    first = config.setup(device="cpu").train_dataset[0]
    again = config.setup(device="cpu").train_dataset[0]
    assert len(first["gaussians"]["means"]) == 100
    assert torch.equal(first["gaussians"]["means"], again["gaussians"]["means"])
    _, batch = config.setup(device="cpu").next_train(0)
    assert batch["gaussians"]["batch"].tolist() == [0] * 100 + [1] * 100

    # The views' choice: as many, and each inside one of the sample's views.
    from splatsem_ns.evaluation.voting import project_points

    config.gaussian_subset = "views"
    sample = config.setup(device="cpu").train_dataset[0]
    means = sample["gaussians"]["means"]
    assert len(means) == 100
    views = [sample[part] for part in ("context", "target")]
    size = tuple(sample["target"]["images"].shape[1:3])
    inside = torch.zeros(len(means), dtype=torch.bool)
    poses = torch.cat([v["camera_to_world"] for v in views]).double()
    for pose, K in zip(poses, torch.cat([v["intrinsics"] for v in views]).double(), strict=True):
        inside |= project_points(means.double(), K, pose[:3], size)[2]
    assert bool(inside.all())


def test_the_views_subset_keeps_what_the_views_see_at_full_density():
    # A 20 x 20 x 20 grid of Gaussians in [-1, 1]^3 and one camera at z = 3 looking down -z with a narrow field:
    # it sees only the grid's middle columns.
    axis = torch.linspace(-1.0, 1.0, 20)
    means = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    gaussians = {"means": means, "opacities": torch.arange(len(means), dtype=torch.float32)[:, None]}
    pose = torch.eye(4)[:3].clone()
    pose[2, 3] = 3.0
    K = torch.tensor([[160.0, 0.0, 16.0], [0.0, 160.0, 16.0], [0.0, 0.0, 1.0]])
    from splatsem_ns.evaluation.voting import project_points

    seen = project_points(means.double(), K.double(), pose.double(), (32, 32))[2]  # in the subset's precision
    assert 0 < int(seen.sum()) < 2000

    def subset(limit, seed=0):
        return subset_in_views(gaussians, limit, pose[None], K[None], (32, 32), np.random.default_rng(seed))

    # Room for all it sees: every one of them, then the nearest of the rest to the camera, in the original order.
    chosen = subset(2000)
    ids = chosen["opacities"][:, 0].long()
    assert len(ids) == 2000 and bool((ids[1:] > ids[:-1]).all())
    assert bool(seen[ids].sum() == seen.sum())
    unseen = ids[~seen[ids]]
    others = torch.nonzero(~seen).squeeze(1)
    farthest_kept = (means[unseen] - pose[:, 3]).norm(dim=1).max()
    nearest_left = (means[others[~torch.isin(others, unseen)]] - pose[:, 3]).norm(dim=1).min()
    assert farthest_kept <= nearest_left
    # Fewer than it sees: only seen ones, a seeded random choice among them.
    few = subset(50)["opacities"][:, 0].long()
    assert len(few) == 50 and bool(seen[few].all())
    assert torch.equal(few, subset(50)["opacities"][:, 0].long())
    assert not torch.equal(few, subset(50, seed=1)["opacities"][:, 0].long())
    # A scene under the limit is served whole.
    assert torch.equal(subset(len(means))["means"], means)


@pytest.fixture(scope="module")
def pretrained(collection, tmp_path_factory) -> Path:
    """A tiny chorus-pretrain run of 4 steps through the real ns-train; returns its run folder."""
    root = tmp_path_factory.mktemp("pretrain_run")
    return trained_on_collection(
        "chorus-pretrain", collection, root, 4, "pre", "--pipeline.model.tiny-encoder", "True"
    )


def test_ns_train_chorus_pretrain_trains_the_encoder_and_ns_eval_scores_it(collection, pretrained, tmp_path):
    run = pretrained
    checkpoint = torch.load(
        next((run / "nerfstudio_models").iterdir()), map_location="cpu", weights_only=False
    )
    weights = checkpoint["pipeline"]
    assert any(k.startswith("_model.encoder.backbone.") for k in weights)
    assert {k.split(".")[2] for k in weights if k.startswith("_model.projector_heads.")} == {
        "labels",
        "instances",
    }

    results = ns_eval(run, tmp_path / "eval.json")
    assert results["num_scenes"] == 1 and results["per_scene"][0]["scene"] == "room_3"
    assert results["num_gaussians"] == 300
    assert -1.0 <= results["cosine_labels"] <= 1.0 and -1.0 <= results["cosine_instances"] <= 1.0
    assert (
        0.0 < results["constant_cosine_labels"] <= 1.0 and 0.0 < results["constant_cosine_instances"] <= 1.0
    )
    assert 0.0 <= results["semantic_2d_target"]["miou"] <= 1.0
    # The labels proxy on the held-out views themselves: far above chance over the room's classes.
    assert results["semantic_2d_teacher_target"]["overall_acc"] > 0.5

    # splatsem-encode: a plain 3DGS PLY in, a queryable semantic PLY + sidecar out, with the encoder's latents.
    from splatsem_ns.export import load_semantic_scene
    from splatsem_ns.export.semantic_ply import write_semantic_ply
    from splatsem_ns.models.semantic_splat import restore_network_model

    points = load_scene_gaussians(collection.parent / "room_3", "points", "gaussians.ply")
    write_semantic_ply(
        tmp_path / "plain.ply", points["means"], points["scales"], points["quats"], points["opacities"],
        points["features_dc"], torch.zeros(len(points["means"]), 0, 3),
    )  # fmt: skip
    encoded = subprocess.run(
        [command("splatsem-encode"), "--scene", str(tmp_path / "plain.ply"), "--checkpoint", str(run / "config.yml"),
         "--output-dir", str(tmp_path / "enc"), "--device", "cpu"],
        capture_output=True, text=True, env=offline_env(), timeout=600,
    )  # fmt: skip
    assert encoded.returncode == 0, encoded.stderr[-4000:]
    scene = load_semantic_scene(tmp_path / "enc" / "scene.ply")
    assert (
        scene.num_gaussians == 300 and scene.latent_dim == 8 and set(scene.heads) == {"labels", "instances"}
    )
    model = restore_network_model(run / "config.yml", "ns-train chorus-pretrain")
    with torch.no_grad():
        expected = model.encoder(
            points["means"], points["features_dc"], points["opacities"], points["scales"], points["quats"]
        )
    assert torch.allclose(scene.latent, expected, atol=1e-5)
    relevancy = scene.query("sofa")
    assert relevancy.shape == (300,) and bool(torch.isfinite(relevancy).all())
    # splatsem-tokens with the run: tokens of the encoder's coarsest stage, decodable by the scene's heads.
    from splatsem_ns.export.tokens import ExportTokens, load_scene_tokens

    written = ExportTokens(
        scene=tmp_path / "enc" / "scene.ply", tokens=16, checkpoint=run / "config.yml", device="cpu",
        teachers=("labels",),
    ).main()  # fmt: skip
    tokens = load_scene_tokens(written)
    assert tokens.encoder_features is not None and len(tokens.encoder_features) == tokens.num_tokens <= 16
    assert tokens.features["labels"].shape == (tokens.num_tokens, scene.heads["labels"].feature_dim)


def test_the_encoder_learns_to_render_a_teacher(collection, tmp_path):
    """A few dozen steps on one scene's sample bring the rendered, decoded latent towards the teacher's features."""
    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
    from splatsem_ns.models.chorus_pretrain import ChorusPretrainModelConfig
    from splatsem_ns.pipelines.chorus_pretrain_pipeline import ChorusPretrainPipelineConfig

    torch.manual_seed(0)
    config = ChorusPretrainPipelineConfig(
        datamanager=MultiSceneDataManagerConfig(
            data=collection, image_size=(48, 64), teachers=("labels",), eval_split="test", num_workers=0,
            feature_cache_dir=tmp_path / "cache", gaussians="points", max_scenes=1,
        ),
        model=ChorusPretrainModelConfig(tiny_encoder=True, distill_pixels=0),
    )  # fmt: skip
    pipeline = config.setup(device="cpu", test_mode="val")
    _, batch = pipeline.datamanager.next_train(0)
    losses = fit_one_batch(pipeline.model, batch, "distill_labels", 40)
    assert losses[-1] < 0.6 * losses[0], losses[::8]


def _adapted_run(pretrained: Path, tmp_path: Path, adapt: str):
    """A 3-step chorus-splat run through the real ns-train with the pretrained encoder as its latent source, adapted
    as ``adapt`` says: its saved weights, its encoder's weights and the pretrained encoder's."""
    from splatsem_ns.models.semantic_splat import restore_network_model

    run = train_synthetic(
        tmp_path,
        iterations=3,
        num_views=8,
        extra=(
            "--pipeline.model.semantic-source.kind", "encoder",
            "--pipeline.model.semantic-source.encoder-checkpoint", str(pretrained / "config.yml"),
            "--pipeline.model.semantic-source.adapt", adapt,
            "--pipeline.model.sh-degree", "0",
        ),
    )  # fmt: skip
    state = torch.load(next((run / "nerfstudio_models").iterdir()), map_location="cpu", weights_only=False)
    weights = state["pipeline"]
    encoder = {
        k.split("semantic_source.encoder.", 1)[1]: v
        for k, v in weights.items()
        if "semantic_source.encoder." in k
    }
    start = restore_network_model(pretrained / "config.yml", "ns-train chorus-pretrain").encoder.state_dict()
    return weights, encoder, start, run


def test_chorus_splat_adapts_the_pretrained_encoder(pretrained, tmp_path):
    """--pipeline.model.semantic-source.kind encoder: the latent comes from the pretrained encoder, which starts
    from the checkpoint with its heads and whose layers after the backbone are fine-tuned by the scene's
    render-and-distill loss."""
    weights, encoder, start, _ = _adapted_run(pretrained, tmp_path, "head")
    assert not any("semantic_latent" in k for k in weights)  # no free latent per Gaussian
    assert set(encoder) == set(start)
    changed = [k for k in start if not torch.equal(encoder[k], start[k])]
    assert changed, "the encoder was not fine-tuned"
    # adapt "head": the backbone, its BatchNorm statistics included, stays as pretrained.
    assert not any(k.startswith("backbone.") for k in changed), changed


def test_ns_train_chorus_splat_trains_latents_seeded_by_the_encoder(pretrained, tmp_path):
    """--pipeline.model.semantic-source.adapt latents through the real ns-train: the run saves a trained free latent
    per Gaussian, and not the encoder that seeded it."""
    weights, encoder, start, run = _adapted_run(pretrained, tmp_path, "latents")
    latents = next(v for k, v in weights.items() if k.endswith("gauss_params.semantic_latent"))
    assert (
        latents.shape[0] == next(v for k, v in weights.items() if k.endswith("gauss_params.means")).shape[0]
    )
    assert latents.abs().sum() > 0 and bool(
        next(v for k, v in weights.items() if k.endswith("latents_seeded"))
    )
    assert encoder == {} and start  # the encoder seeded the latents and was not saved with the run

    # On a machine without the pretraining run, ns-eval and ns-viewer still restore it: the checkpoint's latents
    # (the tiny encoder's 8 channels, not the configured 32) and heads are all it needs.
    import yaml
    from nerfstudio.utils.eval_utils import eval_setup

    config = yaml.load((run / "config.yml").read_text(), Loader=yaml.Loader)
    config.pipeline.model.semantic_source.encoder_checkpoint = tmp_path / "elsewhere" / "config.yml"
    (run / "config.yml").write_text(yaml.dump(config))
    _, pipeline, _, _ = eval_setup(run / "config.yml", test_mode="test")
    model = pipeline.model
    assert torch.equal(model.gauss_params["semantic_latent"].detach().cpu(), latents)
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        rendered = model.get_outputs(camera)["semantic_latent"]
    assert rendered.shape[-1] == latents.shape[1] == 8 and torch.isfinite(rendered).all()
    # A new run cannot be seeded without it, and says why.
    model.semantic_source.latents_seeded.fill_(False)
    model.semantic_source._latents_seeded = False
    with pytest.raises(FileNotFoundError, match="encoder checkpoint .* does not exist"):
        model.semantic_source(model.gauss_params)


def test_the_encoder_source_encodes_once_per_change_in_renders_without_gradients(pretrained, collection):
    """The viewer renders every frame without gradients: the encoder runs again only when the Gaussians or its
    weights change; a training step that adapts the whole encoder always runs it (it needs the graph)."""
    from torch import nn

    from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig

    source = LearnedLatentSourceConfig(
        kind="encoder", encoder_checkpoint=pretrained / "config.yml", adapt="all"
    ).setup()
    points = load_scene_gaussians(collection.parent / "room_0", "points", "gaussians.ply")
    params = nn.ParameterDict({k: nn.Parameter(v) for k, v in points.items()})
    calls = []
    encode = source._encode
    source._encode = lambda p: calls.append(1) or encode(p)  # type: ignore[method-assign]
    source.eval()
    with torch.no_grad():
        first = source(params)
        assert torch.equal(source(params), first) and len(calls) == 1
        params["means"].add_(0.01)  # the Gaussians moved
        moved = source(params)
        assert len(calls) == 2 and not torch.equal(moved, first)
        next(source.encoder.parameters()).mul_(1.5)  # the encoder was fine-tuned
        source(params)
        assert len(calls) == 3
    source.train()
    source(params)
    source(params)
    assert len(calls) == 5


def test_head_adaptation_reuses_the_backbone_until_the_gaussians_change(pretrained, collection):
    """adapt "head": training steps run the backbone without gradients only when densification replaces the
    Gaussians or after ``refresh_every`` optimizer updates, train only the layers after it, and give the full
    encoder's latents (evaluation mode) for the Gaussians the backbone last saw."""
    from torch import nn

    from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig

    source = LearnedLatentSourceConfig(
        kind="encoder", encoder_checkpoint=pretrained / "config.yml", adapt="head", refresh_every=3
    ).setup()
    encoder = source.encoder
    trained = {id(p) for p in source.param_groups()["semantic_encoder"]}
    after = {id(p) for m in (encoder.voxel_proj, encoder.point_mlp, encoder.head) for p in m.parameters()}
    assert trained == after and not any(id(p) in trained for p in encoder.backbone.parameters())
    points = load_scene_gaussians(collection.parent / "room_0", "points", "gaussians.ply")
    params = nn.ParameterDict({k: nn.Parameter(v) for k, v in points.items()})
    runs = []
    backbone_features = encoder.backbone_features
    encoder.backbone_features = lambda *a: runs.append(1) or backbone_features(*a)  # type: ignore[method-assign]
    source.train()
    assert not encoder.backbone.training and encoder.head.training  # its BatchNorm statistics stay fixed
    latent = source(params)
    source.eval()
    with torch.no_grad():
        assert torch.allclose(latent, source(params), atol=1e-5)  # the full encoder, evaluation mode
    source.train()
    latent.square().mean().backward()
    assert encoder.head[-1].weight.grad is not None
    optimizer = torch.optim.SGD(params.parameters(), lr=0.01)
    for _ in range(2):  # the Gaussians move, but not far enough yet
        params["means"].grad = torch.ones_like(params["means"])
        optimizer.step()
        source(params)
    assert len(runs) == 1
    params["means"].grad = torch.ones_like(params["means"])
    optimizer.step()  # the third update since the backbone ran
    source(params)
    assert len(runs) == 2
    params["means"] = nn.Parameter(params["means"].detach()[:-5])  # densification: new Gaussians
    for key in ("features_dc", "opacities", "scales", "quats"):
        params[key] = nn.Parameter(params[key].detach()[:-5])
    assert source(params).shape[0] == points["means"].shape[0] - 5 and len(runs) == 3
    source.config.adapt = "none"
    assert not source(params).requires_grad


def test_latent_adaptation_seeds_free_latents_with_the_encoders_output_once(pretrained, collection):
    """adapt "latents": the first render fills a free per-Gaussian latent with the encoder's output (evaluation
    mode); from then on the latents train like kind learned's, the encoder is dropped (never saved, never run again),
    and a restored run keeps its trained latents instead of seeding them anew."""
    from torch import nn

    from splatsem_ns.models.semantic_source import LearnedLatentSourceConfig
    from splatsem_ns.models.semantic_splat import restore_network_model

    config = LearnedLatentSourceConfig(
        kind="encoder", encoder_checkpoint=pretrained / "config.yml", adapt="latents"
    )
    source = config.setup()
    assert source.param_groups() == {}  # no encoder weight trains
    assert set(source.initial_heads()) == {
        "labels",
        "instances",
    }  # the pretrained heads, unless asked otherwise
    assert LearnedLatentSourceConfig(**{**vars(config), "heads": "fresh"}).setup().initial_heads() == {}
    assert set(source.state_dict()) == {"latents_seeded"}  # the encoder is not part of the run
    points = load_scene_gaussians(collection.parent / "room_0", "points", "gaussians.ply")
    num = points["means"].shape[0]
    params = nn.ParameterDict({k: nn.Parameter(v) for k, v in points.items()})
    params.update(source.gaussian_params(num))
    assert params["semantic_latent"].shape == (num, source.latent_dim)
    encoder = restore_network_model(pretrained / "config.yml", "ns-train chorus-pretrain").encoder.eval()
    with torch.no_grad():
        expected = encoder(*source._inputs(params))  # the zero-shot latents
    source.train()
    latent = source(params)
    assert latent is params["semantic_latent"] and source._seed_encoder == []  # seeded, the encoder dropped
    assert torch.allclose(latent, expected, atol=1e-6) and expected.abs().sum() > 0
    optimizer = torch.optim.SGD([params["semantic_latent"]], lr=0.1)
    latent.square().mean().backward()
    optimizer.step()
    trained = source(params).detach().clone()
    assert not torch.allclose(trained, expected)  # trained, not seeded again

    restored = config.setup()
    restored.load_state_dict(source.state_dict())
    restored_params = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in params.items()})
    assert torch.equal(restored(restored_params), trained) and restored._seed_encoder == []


def test_ns_eval_votes_the_decoded_gaussians_onto_the_labelled_points(collection):
    """``semantic_3d`` of chorus-pretrain's ns-eval: Gaussians at the labelled points whose decoded features are
    their own class's text embedding score 100% mIoU with one voter (25, the protocol's, blur class boundaries); the
    same features shuffled score far less. Through tokens (``semantic_3d_tokens_K``): a token per Gaussian keeps
    every latent, and one token for the whole room leaves a single class."""
    from types import SimpleNamespace

    from splatsem_ns.data.collection import SceneCollection
    from splatsem_ns.data.scene_frames import SceneFrames
    from splatsem_ns.encoders.encoder import CoarsestStage
    from splatsem_ns.evaluation.protocol import SemanticEvalConfig, class_queries
    from splatsem_ns.pipelines.chorus_pretrain_pipeline import _PointVote

    loaded = SceneCollection.load(collection)
    ids, names = class_queries(loaded.classes)
    xyz, labels = SceneFrames.load(collection.parent / "room_3").labelled_points(loaded.classes)
    one_hot = torch.eye(len(ids))[[ids.index(int(c)) for c in labels]]  # decoded feature = class embedding
    gaussians = points_as_gaussians(xyz, None)
    segmentation = SimpleNamespace(
        teacher_name="labels", text=torch.eye(len(ids)), ids=ids, names=names, cfg=SemanticEvalConfig(knn=1)
    )
    # An encoder whose coarsest stage has a site per Gaussian and whose latents are the one-hot features above.
    encoder = SimpleNamespace(
        parameters=lambda: iter([torch.zeros(1)]),
        coarsest_stage=lambda means, *rest: CoarsestStage(
            latent=one_hot, features=torch.zeros(len(means), 1), centres=means, site=torch.arange(len(means))
        ),
    )
    pipeline = SimpleNamespace(
        datamanager=SimpleNamespace(collection=loaded),
        model=SimpleNamespace(projector_heads={"labels": torch.nn.Identity()}, encoder=encoder),
        config=SimpleNamespace(eval_tokens=(len(xyz), 1)),
    )
    exact = _PointVote(pipeline, segmentation)
    exact.add("room_3", gaussians, one_hot)
    scores = exact.scores()
    assert scores["semantic_3d"]["scenes"] == 1 and scores["semantic_3d"]["miou"] == pytest.approx(1.0)
    assert scores[f"semantic_3d_tokens_{len(xyz)}"]["miou"] == pytest.approx(1.0)
    assert scores["semantic_3d_tokens_1"]["miou"] < 0.5
    pipeline.config.eval_tokens = ()
    shuffled = _PointVote(pipeline, segmentation)
    shuffled.add("room_3", gaussians, one_hot[torch.randperm(len(one_hot))])
    assert shuffled.scores()["semantic_3d"]["miou"] < 0.5
    assert not any(key.startswith("semantic_3d_tokens") for key in shuffled.scores())


def test_ns_eval_back_projects_the_teacher_from_the_scene_views(collection):
    """``semantic_3d_teacher_backprojected``: a teacher whose features are each pixel's own class, classified on the
    scene's views and voted onto the labelled points they see, is right on every point it reaches and leaves the
    others unlabelled; ``semantic_3d_in_views`` scores the encoder's vote over just those points."""
    from types import SimpleNamespace

    from splatsem_ns.data.collection import SceneCollection
    from splatsem_ns.data.scene_frames import SceneFrames
    from splatsem_ns.evaluation.protocol import SemanticEvalConfig, class_queries
    from splatsem_ns.evaluation.voting import ViewLabels, backproject_vote
    from splatsem_ns.pipelines.chorus_pretrain_pipeline import _PointVote

    loaded = SceneCollection.load(collection)
    ids, names = class_queries(loaded.classes)
    frames = SceneFrames.load(collection.parent / "room_3")
    xyz, labels = frames.labelled_points(loaded.classes)
    size = (24, 32)

    class Views:  # the two methods of SceneSampleDataset the vote reads
        scenes = [SimpleNamespace(name="room_3")]

        def frames(self, index):
            return frames

        def views(self, index, chosen):
            loaded_views = [frames.load_view(int(i), size) for i in chosen]
            class_maps = np.stack([v.labels for v in loaded_views])
            position = np.searchsorted(ids, np.clip(class_maps, ids[0], ids[-1]))
            one_hot = torch.eye(len(ids))[torch.from_numpy(position)]  # [V, H, W, K]: the pixel's class
            return {
                "images": torch.zeros(len(chosen), *size, 3, dtype=torch.uint8),
                "intrinsics": torch.from_numpy(np.stack([v.intrinsics for v in loaded_views])),
                "camera_to_world": torch.from_numpy(np.stack([v.camera_to_world for v in loaded_views])),
                "depth": torch.from_numpy(np.stack([v.depth for v in loaded_views])),
                "has_depth": True,
                "teacher_features": {"labels": one_hot.half()},
                "teacher_available": {"labels": torch.ones(len(chosen), dtype=torch.bool)},
            }

    one_hot = torch.eye(len(ids))[[ids.index(int(c)) for c in labels]]
    segmentation = SimpleNamespace(
        teacher_name="labels", text=torch.eye(len(ids)), ids=ids, names=names, cfg=SemanticEvalConfig(knn=1)
    )
    pipeline = SimpleNamespace(
        datamanager=SimpleNamespace(collection=loaded),
        model=SimpleNamespace(projector_heads={"labels": torch.nn.Identity()}),
        config=SimpleNamespace(eval_tokens=(), eval_backprojection_views=4),
    )
    vote = _PointVote(pipeline, segmentation)
    vote.add("room_3", points_as_gaussians(xyz, None), one_hot[torch.randperm(len(one_hot))], Views())
    scores = vote.scores()
    chosen = np.unique(np.linspace(0, len(frames) - 1, 4).round().astype(np.int64))
    served = Views().views(0, chosen)
    expected, votes = backproject_vote(
        xyz,
        [
            ViewLabels(
                labels=np.asarray(ids)[served["teacher_features"]["labels"][v].float().argmax(-1).numpy()],
                K=served["intrinsics"][v].numpy(),
                camera_to_world=served["camera_to_world"][v].numpy(),
                image_size=size,
                depth=served["depth"][v].numpy(),
            )
            for v in range(len(chosen))
        ],
        depth_tolerance=0.1,
    )
    seen = votes > 0
    assert 0 < seen.sum() < len(xyz)  # four views see part of the room, not all of it
    # Mostly right wherever a view saw the point (pixels at class edges of a 24x32 view miss), unlabelled elsewhere.
    assert (expected[seen] == labels[seen]).mean() > 0.8 and (expected[~seen] == -1).all()
    teacher = scores["semantic_3d_teacher_backprojected"]
    assert teacher["overall_acc"] == pytest.approx((expected == labels).mean(), abs=1e-6)
    # The encoder's vote (shuffled latents: poor) counted over the seen points alone.
    in_views = scores["semantic_3d_in_views"]
    assert sum(c["gt_count"] for c in in_views["per_class"].values()) == seen.sum()
    assert in_views["miou"] < 0.5

    pipeline.config.eval_backprojection_views = 0
    off = _PointVote(pipeline, segmentation)
    off.add("room_3", points_as_gaussians(xyz, None), one_hot, Views())
    assert (
        "semantic_3d_teacher_backprojected" not in off.scores() and "semantic_3d_in_views" not in off.scores()
    )


def test_point_spacing_matches_all_pairwise_distances():
    """The k-d tree's spacing equals the brute-force mean distance to the nearest neighbours."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 2, size=(700, 3)).astype(np.float32)
    gaussians = points_as_gaussians(xyz, None, neighbours=4)
    distances = torch.cdist(torch.as_tensor(xyz), torch.as_tensor(xyz))
    brute = distances.topk(5, dim=1, largest=False).values[:, 1:].mean(dim=1)
    assert torch.allclose(torch.exp(gaussians["scales"][:, 0]), brute, rtol=1e-4)
    single = points_as_gaussians(xyz[:1], None)
    assert bool(torch.isfinite(single["scales"]).all())


def test_the_constant_reference_is_the_best_single_features_cosine_over_the_available_views():
    from types import SimpleNamespace

    from splatsem_ns.models.chorus_pretrain import ChorusPretrainModel

    generator = torch.Generator().manual_seed(0)
    # Teacher features with a shared direction, as real ones have: a constant already scores well.
    features = {
        part: torch.randn(1, 2, 4, 4, 8, generator=generator) + torch.linspace(1, 2, 8)
        for part in ("context", "target")
    }
    pixels = torch.arange(16).expand(1, 2, 16)  # every pixel of a 4x4 image: the grid values themselves
    batch = {
        part: {"teacher_features": {"labels": features[part]}, "images": torch.zeros(1, 2, 4, 4, 3)}
        for part in features
    }
    # The target's second view has no features of this teacher.
    batch["target"]["teacher_available"] = {"labels": torch.tensor([[True, False]])}
    outputs = {part: {"pixels": pixels} for part in features}
    model = SimpleNamespace(
        projector_heads={"labels": None}, _sampled_targets=ChorusPretrainModel._sampled_targets
    )

    total, count = ChorusPretrainModel.target_direction_sums(model, outputs, batch)["labels"]
    used = torch.cat([features["context"].reshape(-1, 8), features["target"][0, 0].reshape(-1, 8)])
    unit = torch.nn.functional.normalize(used, dim=-1)
    assert count == 3 * 16
    constant = float(torch.linalg.vector_norm(total) / count)
    best = total / torch.linalg.vector_norm(total)
    assert constant == pytest.approx(float((unit @ best).mean()), abs=1e-5)
    # No other constant does better: not the plain mean, not random directions.
    others = torch.cat([used.mean(0, keepdim=True), torch.randn(64, 8, generator=generator)])
    others = torch.nn.functional.normalize(others, dim=-1)
    assert float((unit @ others.T).mean(0).max()) < constant


def test_the_centred_loss_separates_classes_the_plain_cosine_barely_tells_apart():
    from functools import partial
    from types import SimpleNamespace

    from splatsem_ns.models.chorus_pretrain import ChorusPretrainModel

    # Two classes whose teacher features share a strong common direction, as real teachers' do.
    common, a, b = torch.eye(8)[0] * 4, torch.eye(8)[1], torch.eye(8)[2]
    labels = torch.tensor([0, 1] * 8)  # 16 pixels of one view, half of each class
    target = torch.where(labels[:, None] == 0, common + a, common + b).reshape(1, 1, 4, 4, 8)
    pixels = torch.arange(16).expand(1, 1, 16)
    batch = {
        part: {"teacher_features": {"labels": target}, "images": torch.zeros(1, 1, 4, 4, 3)}
        for part in ("context", "target")
    }
    model = SimpleNamespace(
        projector_heads={"labels": None},
        _sampled_targets=ChorusPretrainModel._sampled_targets,
        training=True,
    )
    model.target_direction_sums = partial(ChorusPretrainModel.target_direction_sums, model)
    model.centres = partial(ChorusPretrainModel.centres, model)

    def losses(decoded: torch.Tensor) -> tuple:
        outputs = {
            part: {"pixels": pixels, "decoded": {"labels": decoded.reshape(1, 1, 16, 8)}} for part in batch
        }
        plain = float(ChorusPretrainModel.distillation(model, outputs, batch)["labels"])
        centred = float(ChorusPretrainModel.centred_distillation(model, outputs, batch)["labels"])
        return plain, centred

    exact = target.reshape(16, 8)
    swapped = torch.where(labels[:, None] == 0, common + b, common + a)
    constant = (common + (a + b) / 2).expand(16, 8)
    assert losses(exact) == pytest.approx((0.0, 0.0), abs=1e-6)
    plain_swapped, centred_swapped = losses(swapped)
    plain_constant, centred_constant = losses(constant)
    # The plain cosine hardly penalises the wrong class or ignoring the input; the centred one does, fully.
    assert plain_swapped < 0.06 and plain_constant < 0.02
    assert centred_swapped == pytest.approx(2.0, abs=1e-4)
    assert centred_constant > 0.99


def test_only_training_encodes_randomly_transformed_inputs(pretrained, collection, monkeypatch):
    """chorus-pretrain's ``augment``: training steps hand the encoder transformed Gaussians; evaluation (and training
    with ``augment.enabled`` off) hands it the scene as it is."""
    import splatsem_ns.models.chorus_pretrain as chorus_pretrain
    from splatsem_ns.models.semantic_splat import restore_network_model

    model = restore_network_model(pretrained / "config.yml", "ns-train chorus-pretrain")
    points = load_scene_gaussians(collection.parent / "room_0", "points", "gaussians.ply")
    gaussians = dict(points, batch=torch.zeros(points["means"].shape[0], dtype=torch.long))
    seen, augment = [], chorus_pretrain.augment_inputs

    def recording(*args, **kwargs):
        seen.append(1)
        return augment(*args, **kwargs)

    monkeypatch.setattr(chorus_pretrain, "augment_inputs", recording)
    model.eval()
    with torch.no_grad():
        model.encode(gaussians)
    assert seen == []
    model.train()
    with torch.no_grad():
        model.encode(gaussians)
    assert seen == [1]
    model.config.augment.enabled = False
    with torch.no_grad():
        model.encode(gaussians)
    assert seen == [1]
    del model.config.augment  # a run whose config.yml predates the option resumes without it
    with torch.no_grad():
        model.encode(gaussians)
    assert seen == [1]


def _global_centre(rank: int, world_size: int, result: str, global_rank: int) -> None:
    from splatsem_ns.models.heads import mean_direction, unit_direction_sum

    features = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(rank))
    available = torch.tensor(
        [[True, rank == 0, True], [False, True, True]]
    )  # the ranks hold different counts
    found = mean_direction(*unit_direction_sum(features, available))
    local = mean_direction(*unit_direction_sum(features, available), across_ranks=False)
    torch.save({"global": found, "local": local}, f"{result}.{rank}")


def test_ddp_ranks_centre_the_loss_on_the_global_batchs_mean_direction(tmp_path):
    """In DDP training the centred term's centre is the mean unit teacher feature of every rank's views together,
    as one GPU with the whole batch would compute it, not each rank's own."""
    from splatsem_ns.engine.distributed import spawn_on_gloo
    from splatsem_ns.models.heads import mean_direction, unit_direction_sum

    spawn_on_gloo(_global_centre, 2, str(tmp_path / "centre"))
    got = [torch.load(tmp_path / f"centre.{r}") for r in (0, 1)]
    views = []
    for rank in (0, 1):
        features = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(rank))
        available = torch.tensor([[True, rank == 0, True], [False, True, True]])
        views.append(features[available])  # [views, 4, 8]
    everything = torch.cat(views)[None]  # one batch holding both ranks' views
    expected = mean_direction(*unit_direction_sum(everything, None))
    for rank in (0, 1):
        assert torch.allclose(got[rank]["global"], expected, atol=1e-6)
    assert not torch.allclose(got[0]["local"], got[1]["local"], atol=1e-3)
