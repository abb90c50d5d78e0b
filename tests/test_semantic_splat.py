"""semantic-splat through the real commands on a tiny collection, its losses and stages, DistributedDataParallel on
two CPU processes (gloo), and the export of a prediction."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    command,
    ns_eval,
    ns_train_on_collection,
    offline_env,
    tiny_collection,
    trained_on_collection,
)

from splatsem_ns.models.heads import resize_feature_map
from splatsem_ns.models.semantic_splat import (
    covered_depth_metrics,
    depth_metrics,
    psnr_from_mse,
    sample_feature_maps,
)

TEACHERS = ("labels", "labels-instance")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Five small rooms: four to train on, one held out (test split)."""
    return tiny_collection(tmp_path_factory.mktemp("ff_scenes"), rooms=5, test_room=4, seed_points=200)


def _ns_train(collection: Path, root: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return ns_train_on_collection(
        "semantic-splat", collection, root, steps, "ff", "--pipeline.model.tiny-network", "True", *extra
    )


@pytest.fixture(scope="module")
def trained(collection, tmp_path_factory) -> Path:
    """A tiny semantic-splat run of 6 steps through the real ns-train; returns its run folder."""
    root = tmp_path_factory.mktemp("ff_run")
    return trained_on_collection(
        "semantic-splat", collection, root, 6, "ff", "--pipeline.model.tiny-network", "True"
    )


@pytest.mark.slow
def test_ns_train_eval_resume_and_export(collection, trained, tmp_path):
    run = trained
    assert [p.name for p in (run / "nerfstudio_models").iterdir()] == ["step-000000005.ckpt"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for loss in ("rgb", "depth", "distill_labels", "distill_instances"):
        assert f"Train Loss Dict/{loss}" in tags, sorted(tags)

    results = ns_eval(run, tmp_path / "eval.json")
    assert results["num_scenes"] == 1 and results["per_scene"][0]["scene"] == "room_4"
    assert 5.0 < results["psnr"] < 40.0
    assert results["target_depth_abs_rel"] >= 0.0 and 0.0 <= results["context_depth_delta1"] <= 1.0
    for key in (
        "semantic_2d_target",
        "semantic_2d_source",
        "semantic_2d_context_latent",
        "semantic_2d_teacher_target",
        "semantic_2d_teacher_warped_target",
        "semantic_2d_teacher_sensor_warped_target",
    ):
        assert 0.0 <= results[key]["miou"] <= 1.0, key
    # The views' own ceiling (context pixels at their sensor depth): part of each target covered.
    assert 0.0 < results["sensor_depth_coverage"] <= 1.0 and results["sensor_depth_psnr"] > 5.0
    assert results["psnr_where_views_see"] > 5.0  # the network over the pixels the context reaches
    # Each scene's own target counts are kept; with one scene they are the whole matrix.
    from splatsem_ns.evaluation.metrics import ConfusionMatrix

    own = ConfusionMatrix.from_counts(results["per_scene"][0]["target_confusion"])
    assert abs(own.miou() - results["semantic_2d_target"]["miou"]) < 1e-9
    # The teacher on the held-out view is the degraded labels proxy: far above chance over the room's classes.
    assert results["semantic_2d_teacher_target"]["overall_acc"] > 0.5

    resumed = _ns_train(collection, tmp_path, 9, "--load-dir", str(run / "nerfstudio_models"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "DoneloadingNerfstudiocheckpoint" in "".join(resumed.stdout.split())
    resumed_run = tmp_path / "out" / "ff" / "semantic-splat" / "run" / "nerfstudio_models"
    assert [p.name for p in resumed_run.iterdir()] == ["step-000000008.ckpt"]

    exported = subprocess.run(
        [command("splatsem-export"), "--load-config", str(run / "config.yml"), "--output-dir", str(tmp_path / "exp"),
         "--scene", "room_4", "--context-views", "0", "1"],
        capture_output=True, text=True, env=offline_env(), timeout=600,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-4000:]
    from splatsem_ns.export import load_semantic_scene

    scene = load_semantic_scene(tmp_path / "exp" / "scene.ply")
    assert scene.num_gaussians == 2 * 48 * 64 and scene.latent_dim == 8
    assert set(scene.heads) == {"labels", "instances"} and scene.decode("labels").shape == (2 * 48 * 64, 384)
    relevancy = scene.query("sofa")
    assert relevancy.shape == (2 * 48 * 64,) and bool(torch.isfinite(relevancy).all())


def test_teacher_features_are_sampled_where_the_pixels_are():
    torch.manual_seed(0)
    features = torch.rand(1, 2, 6, 8, 5)
    pixels = torch.randint(0, 24 * 32, (1, 2, 50))
    sampled = sample_feature_maps(features, pixels, (24, 32))
    dense = torch.stack(
        [resize_feature_map(features[0, v], (24, 32)) for v in range(2)]
    )  # bilinear upsampling
    expected = torch.stack([dense[v].reshape(-1, 5)[pixels[0, v]] for v in range(2)])[None]
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=0)


def test_depth_metrics():
    sensor = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    predicted = torch.tensor([[1.1, 2.0], [7.0, 2.0]])
    scores = depth_metrics(predicted, sensor)
    assert scores["depth_abs_rel"] == pytest.approx((0.1 + 0.0 + 0.5) / 3)
    assert scores["depth_delta1"] == pytest.approx(2 / 3)
    assert depth_metrics(predicted, torch.zeros(2, 2)) == {}
    # Only the pixels the prediction covers: the uncovered one (depth 7 against 0 measured) is left out anyway, and
    # the one at 2.0 against 4.0 is outside.
    alpha = torch.tensor([[0.9, 0.9], [0.9, 0.1]])
    covered = covered_depth_metrics(predicted, alpha, sensor)
    assert covered["target_coverage"] == pytest.approx(2 / 3)
    assert covered["target_covered_depth_abs_rel"] == pytest.approx(0.05)
    assert covered_depth_metrics(predicted, alpha, torch.zeros(2, 2)) == {}


def test_psnr_from_mse():
    assert float(psnr_from_mse(torch.tensor(0.01))) == pytest.approx(20.0)
    assert float(psnr_from_mse(torch.tensor(0.0))) == pytest.approx(100.0)  # floored, not inf


def _pipeline(collection: Path, cache: Path, datamanager: dict | None = None, **model):
    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
    from splatsem_ns.models.semantic_splat import SemanticSplatModelConfig
    from splatsem_ns.pipelines.semantic_splat_pipeline import SemanticSplatPipelineConfig

    config = SemanticSplatPipelineConfig(
        datamanager=MultiSceneDataManagerConfig(
            data=collection, image_size=(48, 64), teachers=TEACHERS, eval_split="test", num_workers=0,
            feature_cache_dir=cache, **(datamanager or {}),
        ),
        model=SemanticSplatModelConfig(tiny_network=True, **model),
    )  # fmt: skip
    return config.setup(device="cpu", test_mode="val")


def test_the_latent_renders_at_its_training_scale_and_evaluates_at_full_size(collection, tmp_path):
    pipeline = _pipeline(collection, tmp_path / "cache", latent_render_scale=0.5)
    model = pipeline.model
    _, batch = pipeline.datamanager.next_train(0)
    outputs = model(batch)
    assert outputs["rendered"].latent.shape[2:4] == (24, 32) and outputs["latent_size"] == (24, 32)
    assert int(outputs["pixels"].max()) < 24 * 32
    losses = model.get_loss_dict(outputs, batch)
    assert all(bool(torch.isfinite(v)) for v in losses.values()) and "distill_labels" in losses
    sum(losses.values()).backward()
    assert next(model.network.semantic_branch.parameters()).grad is not None
    model.eval()
    with torch.no_grad():
        assert model(batch)["rendered"].latent.shape[2:4] == (48, 64)


def test_the_centred_distillation_term_is_added_only_when_weighted(collection, tmp_path):
    from splatsem_ns.models.heads import centred_cosine_distillation_loss, unit_direction_sum

    pipeline = _pipeline(collection, tmp_path / "cache", centred_loss_weight=0.5)
    model = pipeline.model
    _, batch = pipeline.datamanager.next_train(0)
    outputs = model(batch)
    losses = model.get_loss_dict(outputs, batch)
    assert len(outputs["decoded"]) == 2
    for name in outputs["decoded"]:
        assert {f"distill_centred_{name}", f"distill_context_centred_{name}"} <= set(losses)
    # The term is the centred loss on the target views' own mean direction, at its weight.
    wanted = sample_feature_maps(
        batch["target"]["teacher_features"]["labels"], outputs["pixels"], outputs["latent_size"]
    )
    total, count = unit_direction_sum(wanted, None)
    expected = 0.5 * centred_cosine_distillation_loss(
        outputs["decoded"]["labels"], wanted, total / count, None
    )
    assert float(losses["distill_centred_labels"]) == pytest.approx(float(expected), rel=1e-5)
    sum(losses.values()).backward()
    model.config.centred_loss_weight = 0.0
    assert not any("centred" in key for key in model.get_loss_dict(outputs, batch))


def test_stages_distil_their_teachers_and_freeze_the_object_part(collection, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = _pipeline(collection, tmp_path, stage="joint")
        object_stage = _pipeline(collection, tmp_path, stage="object")
        language = _pipeline(collection, tmp_path, stage="language")
    for pipeline, distilled in (
        (joint, {"labels", "instances"}),
        (object_stage, {"instances"}),
        (language, {"labels"}),
    ):
        _, losses, _ = pipeline.get_train_loss_dict(0)
        context = {k[len("distill_context_") :] for k in losses if k.startswith("distill_context_")}
        target = {k[len("distill_") :] for k in losses if k.startswith("distill_")} - {
            f"context_{n}" for n in context
        }
        assert target == distilled and context == distilled  # the context views distil the same teachers
        sum(losses.values()).backward()
    frozen = [p for m in language.model.network.part_modules("semantic_object") for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(p.grad is None for p in language.model.projector_heads["instances"].parameters())
    assert any(p.grad is not None for p in language.model.projector_heads["labels"].parameters())


def _ddp_worker(local_rank: int, world_size: int, config, global_rank: int = 0) -> None:
    """One rank: train a few steps through the package's trainer, then compare every weight with the other rank's."""
    import torch.distributed as dist

    from splatsem_ns.engine.trainer import ChorusTrainer

    trainer = ChorusTrainer(config, local_rank=local_rank, world_size=world_size)
    trainer.setup()

    def weights() -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in trainer.pipeline.model.parameters()])

    start = weights()  # after DDP's broadcast of rank 0's initial weights
    trainer.train()
    end = weights()
    gathered = [torch.zeros_like(end) for _ in range(world_size)]
    dist.all_gather(gathered, end)
    samples = [
        torch.zeros(config.pipeline.datamanager.batch_size * 4, dtype=torch.int64) for _ in range(world_size)
    ]
    dist.all_gather(samples, torch.tensor(trainer.pipeline.datamanager.served_sample_ids, dtype=torch.int64))
    if global_rank == 0:
        result = {
            "identical": all(torch.equal(gathered[0], g) for g in gathered),
            "moved": float((end - start).abs().max()),
            "samples": [s.tolist() for s in samples],
        }
        torch.save(end, Path(config.result_file).with_suffix(".weights.pt"))
        Path(config.result_file).write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["semantic-splat", "chorus-pretrain"])
def test_two_ranks_on_gloo_hold_identical_weights(collection, tmp_path, method, monkeypatch):
    """Two processes on gloo, as ``--machine.num-devices 2`` starts them: each draws its own samples, DDP averages
    the gradients, both end with the same weights, which training changed, and the checkpoint they wrote loads in
    one process on the CPU: through ``eval_setup`` (how ns-eval, ns-viewer and the exporters load a run) with the
    ranks' final weights exactly, and through the network restore that splatsem-encode and feed-forward init use."""
    import copy
    import sys

    from nerfstudio.utils.eval_utils import eval_setup

    from splatsem_ns.engine.distributed import spawn_on_gloo
    from splatsem_ns.method_configs.chorus_pretrain import chorus_pretrain
    from splatsem_ns.method_configs.semantic_splat import semantic_splat
    from splatsem_ns.models.semantic_splat import restore_network_model

    spec = {"semantic-splat": semantic_splat, "chorus-pretrain": chorus_pretrain}[method]
    config = copy.deepcopy(spec.config)
    config.pipeline.datamanager.data = collection
    config.pipeline.datamanager.image_size = (48, 64)
    config.pipeline.datamanager.teachers = TEACHERS
    config.pipeline.datamanager.num_workers = 0
    config.pipeline.datamanager.feature_cache_dir = tmp_path / "cache"
    config.pipeline.datamanager.eval_split = "test"
    if method == "semantic-splat":
        config.pipeline.model.tiny_network = True
    else:
        config.pipeline.model.tiny_encoder = True
    config.machine.device_type = "cpu"
    config.machine.num_devices = 2
    config.max_num_iterations = 4
    config.steps_per_save = 1000
    config.steps_per_eval_image = 1000
    config.output_dir = tmp_path / "out"
    config.timestamp = "run"
    config.vis = "tensorboard"
    config.result_file = str(tmp_path / "result.json")  # type: ignore[attr-defined]
    config.save_config()  # as ns-train does before it launches the ranks
    # nerfstudio's launcher asserts CUDA even for gloo, so the two CPU ranks are spawned the way it spawns them.
    spawn_on_gloo(_ddp_worker, 2, config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["identical"], "the ranks' weights differ: gradients were not averaged"
    assert result["moved"] > 0, "training did not change the weights"
    rank0, rank1 = (set(s) for s in result["samples"])
    assert rank0 and rank1 and not rank0 & rank1, "each rank draws its own samples"
    restored = restore_network_model(config.get_base_dir() / "config.yml", f"ns-train {method}", "cpu")
    assert set(restored.projector_heads) == {"labels", "instances"}
    monkeypatch.setattr(sys, "argv", ["ns-eval"])
    _, pipeline, _, step = eval_setup(config.get_base_dir() / "config.yml", test_mode="test")
    assert step == config.max_num_iterations - 1 and not any(
        k.startswith("module.") for k in pipeline.model.state_dict()
    )
    loaded = torch.cat([p.detach().flatten() for p in pipeline.model.parameters()])
    assert torch.equal(loaded, torch.load(tmp_path / "result.weights.pt")), (
        "the checkpoint lost the ranks' weights"
    )


@pytest.mark.slow
def test_chorus_splat_starts_from_a_feedforward_prediction(collection, trained, tmp_path):
    """``--pipeline.feedforward-init`` seeds chorus-splat with the network's Gaussians, latents and heads."""
    scene = Path(json.loads(collection.read_text())["scenes"][0]["path"])
    scene = scene if scene.is_absolute() else collection.parent / scene
    proc = subprocess.run(
        [
            command("ns-train"), "chorus-splat", "--data", str(scene), "--output-dir", str(tmp_path / "out"),
            "--experiment-name", "c", "--timestamp", "run", "--max-num-iterations", "5", "--vis", "tensorboard",
            "--machine.device-type", "cpu", "--viewer.quit-on-train-completion", "True",
            "--pipeline.datamanager.teachers", *TEACHERS,
            "--pipeline.datamanager.feature-cache-dir", str(tmp_path / "cache"),
            "--pipeline.feedforward-init", str(trained / "config.yml"),
            "--pipeline.feedforward.image-size", "48", "64",
            "--pipeline.model.semantic-source.latent-dim", "8",
        ],
        capture_output=True, text=True, env=offline_env(), timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    said = " ".join(proc.stdout.split())
    assert "Feed-forward init:" in said and "the heads of labels, instances" in said
    # 7 training views (one of 8 held out) in groups of 2: 3 predictions of 2 x 48 x 64 pixels, the opaque ones kept
    count = int(said.split("Feed-forward init: ")[1].split()[0])
    assert 0 < count <= 3 * 2 * 48 * 64


def test_cameras_and_gaussians_move_between_the_metric_and_the_dataparser_frame():
    from splatsem_ns.data.frames import to_dataparser_frame, to_metric_frame
    from splatsem_ns.feedforward.cameras import rotation_to_quaternion

    torch.manual_seed(0)
    angle = 0.7
    rotation = torch.tensor(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    ).float()
    transform = torch.cat([rotation, torch.tensor([[0.3], [-1.0], [2.0]])], dim=1)
    scale = 0.25
    metric = torch.eye(4)[:3][None].repeat(2, 1, 1)
    metric[:, :, 3] = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 1.5]])
    # nerfstudio's dataparser: c2w' = [R R_c | s (R c + t)]
    parsed = torch.cat(
        [rotation @ metric[:, :, :3], (scale * (metric[:, :, 3] @ rotation.T + transform[:, 3]))[..., None]],
        -1,
    )
    torch.testing.assert_close(to_metric_frame(parsed, transform, scale)[:, :3], metric, atol=1e-5, rtol=0)
    means = torch.rand(5, 3)
    quats = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    moved, scales, turned = to_dataparser_frame(means, torch.ones(5, 3), quats, transform, scale)
    torch.testing.assert_close(moved, scale * (means @ rotation.T + transform[:, 3]))
    torch.testing.assert_close(scales, torch.full((5, 3), scale))

    # The rotated Gaussian's axes are the transform's rotation applied to the original axes.
    def matrix(q):
        w, x, y, z = q.unbind(-1)
        return torch.stack([
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ], -2)  # fmt: skip

    torch.testing.assert_close(matrix(turned), rotation @ matrix(quats), atol=1e-5, rtol=0)
    assert rotation_to_quaternion(rotation).shape == (4,)


def test_the_viewer_shows_a_prediction_as_a_queryable_scene(trained, monkeypatch):
    """ns-viewer on a semantic-splat run: the pipeline shows one predicted scene as a chorus-splat model that
    renders what the network's own renderer renders, with the context views as frustums and the query panel."""
    import sys

    from nerfstudio.utils.eval_utils import eval_setup

    from splatsem_ns.feedforward.render import render_predicted
    from splatsem_ns.viewer import prediction_view
    from splatsem_ns.viewer.query_panel import QUERY_OUTPUT

    monkeypatch.setattr(sys, "argv", ["ns-eval"])  # not a viewer: the network itself
    _, network_pipeline, _, _ = eval_setup(trained / "config.yml", test_mode="test")
    assert type(network_pipeline.model).__name__ == "SemanticSplatModel"
    gaussians, scene, context = network_pipeline.predict_scene("room_4", [0, 3])

    monkeypatch.setattr(sys, "argv", ["ns-viewer", "--load-config", str(trained / "config.yml")])
    monkeypatch.setitem(prediction_view.REQUEST, "scene", "room_4")
    monkeypatch.setitem(prediction_view.REQUEST, "context_views", (0, 3))
    monkeypatch.setitem(prediction_view.REQUEST, "min_opacity", 0.0)  # every Gaussian, for the comparison
    _, pipeline, _, _ = eval_setup(trained / "config.yml", test_mode="test")
    model = pipeline.model
    assert type(model).__name__ == "ChorusSplatModel"
    assert model.num_points == 2 * 48 * 64
    views = pipeline.datamanager.train_dataset
    assert len(views) == 2 and views[1]["image"].shape == (48, 64, 3)

    camera = views.cameras[1:2]
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(camera)
        own = render_predicted(
            gaussians,
            gaussians.means.new_tensor(camera.get_intrinsics_matrices())[None],
            torch.cat([camera.camera_to_worlds, torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])], dim=1)[None],
            64,
            48,
            render_latent=False,
        )
    assert outputs["rgb"].shape == (48, 64, 3)
    assert torch.allclose(outputs["rgb"], own.rgb[0, 0], atol=2e-3)

    panel = pipeline.semantic_query
    panel.positives.value = "wall"
    with torch.no_grad():
        queried = model.get_outputs_for_camera(camera)
    assert QUERY_OUTPUT in queried and queried[QUERY_OUTPUT].shape == (48, 64, 3), panel.last_message


def test_unlabelled_scenes_train_geometry_only(collection, tmp_path):
    """With ``unlabelled_scenes="geometry"`` a scene the label proxies cannot read is kept: its teacher features are
    zeros marked absent, so its samples distil nothing and still train colour and depth; "drop" leaves it out."""
    import shutil

    from splatsem_ns.data.collection_cli import BuildCollection

    root = tmp_path / "scenes"
    for name in ("room_0", "room_1"):
        shutil.copytree(collection.parent / name, root / name)
    unlabelled = root / "room_1"
    meta = json.loads((unlabelled / "transforms.json").read_text())
    for frame in meta["frames"]:
        frame.pop("semantic_file_path"), frame.pop("instance_file_path")
    meta.pop("labeled_ply_file_path")
    (unlabelled / "points_labeled.ply").unlink()
    (unlabelled / "transforms.json").write_text(json.dumps(meta))
    mixed = tmp_path / "collection.json"
    BuildCollection(scenes=(root,), out=mixed, val_fraction=0.0, test_fraction=0.0).main()

    dropped = _pipeline(mixed, tmp_path / "cache")
    assert [s.name for s in dropped.datamanager.train_scenes] == ["room_0"]
    pipeline = _pipeline(mixed, tmp_path / "cache", datamanager={"unlabelled_scenes": "geometry"})
    manager = pipeline.datamanager
    assert sorted(s.name for s in manager.train_scenes) == ["room_0", "room_1"]
    samples = {}
    for i in range(4):
        sample = manager.train_dataset[i]
        samples[sample["scene"]] = sample
    absent = samples["room_1"]["target"]
    assert not bool(absent["teacher_available"]["labels"].any()) and not bool(absent["has_labels"])
    assert float(absent["teacher_features"]["labels"].abs().sum()) == 0.0
    assert bool(samples["room_0"]["target"]["teacher_available"]["labels"].all())
    from splatsem_ns.data.scene_gaussians import collate_samples

    batch = collate_samples([samples["room_1"]])
    model = pipeline.model
    losses = model.get_loss_dict(model(batch), batch)
    assert float(losses["distill_labels"]) == 0.0 and float(losses["distill_context_labels"]) == 0.0
    assert float(losses["rgb"]) > 0.0
    both = collate_samples([samples["room_0"], samples["room_1"]])
    assert float(model.get_loss_dict(model(both), both)["distill_labels"]) > 0.0


def test_the_context_latent_is_scored_pixel_by_pixel_before_rendering():
    """``semantic_2d_context_latent``: each context pixel's own latent (the prediction holds one per pixel, views
    then rows then columns) decoded and scored against that pixel's label. A latent that is the one-hot of each
    pixel's class scores 100%; the rendered source views (here: a wrong constant) do not change it."""
    from types import SimpleNamespace

    from splatsem_ns.evaluation.metrics import ConfusionMatrix
    from splatsem_ns.evaluation.protocol import SemanticEvalConfig
    from splatsem_ns.feedforward.gaussians import PredictedGaussians
    from splatsem_ns.pipelines.semantic_splat_pipeline import _Segmentation

    ids, views, height, width = [1, 2, 5], 2, 6, 8
    labels = torch.from_numpy(np.random.default_rng(0).choice(ids, size=(1, views, height, width)))
    one_hot = torch.eye(len(ids))[torch.searchsorted(torch.tensor(ids), labels)]  # [1, V, H, W, K]
    gaussians = PredictedGaussians(
        **{k: torch.zeros(1, 0) for k in ("means", "quats", "scales", "opacities", "features_dc")},
        features_rest=torch.zeros(1, 0),
        latent=one_hot.flatten(1, 3),
        depth=torch.zeros(1, views, height, width),
        confidence=torch.zeros(1, views, height, width),
    )
    wrong = torch.zeros(1, views, height, width, len(ids))
    wrong[..., 0] = 1.0
    segmentation = object.__new__(_Segmentation)
    segmentation.pipeline = SimpleNamespace(
        model=SimpleNamespace(
            projector_heads={"labels": torch.nn.Identity()},
            render=lambda gaussians, views: SimpleNamespace(latent=wrong),
        ),
        config=SimpleNamespace(eval_views="both"),
    )
    segmentation.teacher_name, segmentation.text, segmentation.ids = "labels", torch.eye(len(ids)), ids
    segmentation.names, segmentation.cfg = ["a", "b", "c"], SemanticEvalConfig()
    segmentation.scene_matrix = None
    segmentation.matrices = {key: ConfusionMatrix(len(ids)) for key in ("source", "context_latent")}
    segmentation.add_targets = lambda target, latents: None
    segmentation._warped_teacher = lambda gaussians, batch, size: torch.zeros(0)
    context = {"images": torch.zeros(1, views, height, width, 3), "labels": labels}
    segmentation.add({"target": {"images": torch.zeros(1, 0, height, width, 3)}, "context": context},
                     {"gaussians": gaussians, "rendered": SimpleNamespace(latent=torch.zeros(1, 0))})  # fmt: skip
    scores = segmentation.scores()
    assert scores["semantic_2d_context_latent"]["miou"] == pytest.approx(1.0)
    assert scores["semantic_2d_source"]["miou"] < 0.5
