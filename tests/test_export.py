"""Export of semantic Gaussians (3DGS PLY + sem_* columns + sidecar) and the queryable scene loaded back."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from support import command, offline_env, train_synthetic

from splatsem_ns.export import (
    SemanticScene,
    SemanticSplatFileError,
    TeacherInfo,
    gaussian_columns,
    load_semantic_scene,
    read_semantic_ply,
    sidecar_path,
    write_semantic_ply,
)
from splatsem_ns.models.relevancy import lerf_relevancy
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec, declared_text_encoder
from splatsem_ns.teachers.registry import available_teachers, make_teacher_config

NUM_POINTS = 300
CLASSES = ["sofa", "table", "chair", "bed", "wall", "floor", "lamp", "window"]


@pytest.fixture(scope="module")
def model():
    from nerfstudio.data.scene_box import SceneBox

    from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig

    torch.manual_seed(0)
    specs = {
        "labels": TeacherSpec("labels", 384, (4, 5), (48, 64), True, make_teacher_config("labels")),
        "instances": TeacherSpec(
            "instances", 64, (4, 5), (48, 64), False, make_teacher_config("labels-instance")
        ),
    }
    points = torch.rand(NUM_POINTS, 3) * 2 - 1
    colors = (torch.rand(NUM_POINTS, 3) * 255).to(torch.uint8)
    with warnings.catch_warnings():  # offline, LPIPS's AlexNet weights are missing; the model still builds
        warnings.simplefilter("ignore")
        m = ChorusSplatModelConfig(projector_hidden_dim=32).setup(
            scene_box=SceneBox(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])),
            num_train_data=4,
            metadata={TEACHER_SPECS_KEY: specs},
            seed_points=(points, colors),
        )
    with torch.no_grad():  # trained-looking values rather than the initial constants
        for name in ("scales", "opacities", "features_rest", "quats"):
            m.gauss_params[name].add_(0.1 * torch.randn_like(m.gauss_params[name]))
    return m.eval()


@pytest.fixture()
def saved(model, tmp_path):
    scene = SemanticScene.from_model(model)
    written = scene.save(tmp_path / "scene.ply", source_config="outputs/x/config.yml")
    return scene, written


def _ply_table(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    vertex = PlyData.read(str(path))["vertex"]
    names = list(vertex.data.dtype.names)
    return names, {n: np.asarray(vertex[n]) for n in names}


# ------------------------------------------------------------------------------------------ PLY layout


def test_columns_and_values_match_nerfstudio_exporter(model, tmp_path, monkeypatch):
    """Run nerfstudio's own ``ns-export gaussian-splat`` code on the same model and compare column by column."""
    try:
        import open3d  # noqa: F401
    except ImportError:  # open3d needs libusb; the Gaussian-splat exporter never touches it
        monkeypatch.setitem(sys.modules, "open3d", types.ModuleType("open3d"))
    from nerfstudio.scripts import exporter

    pipeline = types.SimpleNamespace(model=model)
    monkeypatch.setattr(exporter, "eval_setup", lambda *a, **k: (None, pipeline, None, None))
    exporter.ExportGaussianSplat(load_config=Path("unused.yml"), output_dir=tmp_path / "ns").main()
    theirs_names, theirs = _ply_table(tmp_path / "ns" / "splat.ply")

    written = SemanticScene.from_model(model).save(tmp_path / "ours.ply")
    ours_names, ours = _ply_table(written.path)
    assert written.num_written == NUM_POINTS == len(theirs["x"])
    assert ours_names == theirs_names + [f"sem_{i}" for i in range(32)]
    assert ours_names == gaussian_columns(15, 32)
    for name in theirs_names:
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    latent = np.stack([ours[f"sem_{i}"] for i in range(32)], axis=1)
    np.testing.assert_array_equal(latent, model.gauss_params["semantic_latent"].detach().numpy())
    header = written.path.read_bytes()[:200]
    assert header.startswith(b"ply\nformat binary_little_endian 1.0\n")


def test_f_rest_is_channel_major(tmp_path):
    n, k = 2, 3
    rest = torch.arange(n * k * 3, dtype=torch.float32).reshape(n, k, 3)  # [N, coeff, channel]
    one = torch.zeros(n, 1)
    write_semantic_ply(
        tmp_path / "a.ply", one.repeat(1, 3), one.repeat(1, 3), torch.ones(n, 4), one, one.repeat(1, 3), rest
    )
    _, table = _ply_table(tmp_path / "a.ply")
    # INRIA: f_rest_{c * K + j} is coefficient j of colour channel c
    for c in range(3):
        for j in range(k):
            np.testing.assert_array_equal(table[f"f_rest_{c * k + j}"], rest[:, j, c].numpy())
    assert torch.equal(read_semantic_ply(tmp_path / "a.ply").features_rest, rest)


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_is_exact(model, saved):
    scene, written = saved
    loaded = load_semantic_scene(written.path)
    for name in ("means", "scales", "quats", "opacities", "features_dc", "features_rest", "latent"):
        a, b = getattr(scene, name), getattr(loaded, name)
        assert a.shape == b.shape and torch.equal(a, b), name
    assert loaded.features_rest.shape == (NUM_POINTS, 15, 3) and loaded.opacities.shape == (NUM_POINTS, 1)
    for teacher in ("labels", "instances"):
        torch.testing.assert_close(loaded.decode(teacher), model.gaussian_features(teacher), rtol=0, atol=0)
        torch.testing.assert_close(scene.decode(teacher), model.gaussian_features(teacher), rtol=0, atol=0)
    assert loaded.teachers == scene.teachers
    assert loaded.teachers["labels"].has_text_encoder is True
    assert loaded.teachers["instances"].has_text_encoder is False
    assert loaded.semantic_scale == pytest.approx(float(model.semantic_scale))
    assert loaded.sh_degree == 3 and loaded.latent_dim == 32
    assert loaded.source_config == "outputs/x/config.yml"
    moved = loaded.to("cpu")
    assert moved.heads["labels"] is not loaded.heads["labels"]
    torch.testing.assert_close(moved.decode("labels"), loaded.decode("labels"), rtol=0, atol=0)


def test_sidecar_is_plain_data_loadable_with_weights_only(saved):
    _, written = saved
    record = torch.load(sidecar_path(written.path), map_location="cpu", weights_only=True)

    def walk(value):
        if isinstance(value, dict):
            assert all(isinstance(k, str) for k in value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        else:
            assert value is None or isinstance(value, (str, int, float, bool, torch.Tensor)), type(value)

    walk(record)
    assert record["format_version"] == 1 and record["num_gaussians"] == NUM_POINTS
    assert record["heads"]["labels"]["architecture"] == {
        "latent_dim": 32,
        "feature_dim": 384,
        "hidden_dim": 32,
        "num_layers": 2,
    }
    config = record["teachers"]["labels"]
    assert config["config_class"] == "splatsem_ns.teachers.labels_teacher:LabelsTeacherConfig"
    assert config["config_fields"]["variant"] == "semantic"


def test_selection_exports_a_subset(saved, tmp_path):
    scene, _ = saved
    mask = torch.rand(NUM_POINTS, generator=torch.Generator().manual_seed(1)) < 0.3
    written = scene.save(tmp_path / "part.ply", selection=mask)
    assert np.array_equal(written.kept, mask.numpy()) and written.num_written == int(mask.sum())
    loaded, expected = load_semantic_scene(written.path), scene.select(mask)
    for name in ("means", "latent", "features_rest", "opacities"):
        assert torch.equal(getattr(loaded, name), getattr(expected, name)), name
    torch.testing.assert_close(loaded.decode("labels"), scene.decode("labels")[mask], rtol=0, atol=0)
    with pytest.raises(ValueError, match="bool mask"):
        scene.save(tmp_path / "bad.ply", selection=torch.ones(5, dtype=torch.bool))


def test_non_finite_gaussians_are_dropped_with_a_warning(saved, tmp_path):
    scene, _ = saved
    bad = dataclasses.replace(scene, means=scene.means.clone(), latent=scene.latent.clone())
    bad.means[3, 1] = float("nan")
    bad.latent[7, 0] = float("inf")
    bad.latent[9, 0] = float("nan")
    selection = torch.ones(NUM_POINTS, dtype=torch.bool)
    selection[9] = False  # an unselected non-finite Gaussian is not counted
    with pytest.warns(UserWarning, match=r"dropped 2 of 299 Gaussians with NaN/Inf values \(in sem_0, y\)"):
        written = bad.save(tmp_path / "nan.ply", selection=selection)
    assert written.num_non_finite == 2 and written.num_written == NUM_POINTS - 3
    assert not written.kept[[3, 7, 9]].any()
    loaded = load_semantic_scene(written.path)
    assert torch.isfinite(loaded.latent).all() and torch.isfinite(loaded.means).all()
    assert torch.equal(loaded.means, scene.means[torch.from_numpy(written.kept)])


# ------------------------------------------------------------------------------------------ errors


def test_missing_sidecar(saved):
    _, written = saved
    sidecar_path(written.path).unlink()
    with pytest.raises(FileNotFoundError, match=r"32 semantic columns but its sidecar .*scene\.semantic\.pt"):
        load_semantic_scene(written.path)


def test_sidecar_from_another_export(saved, tmp_path):
    scene, written = saved
    part = scene.save(tmp_path / "part.ply", selection=torch.arange(NUM_POINTS) < 10)
    shutil.copy(sidecar_path(part.path), sidecar_path(written.path))
    with pytest.raises(SemanticSplatFileError, match="describes 10 Gaussians but .* holds 300"):
        load_semantic_scene(written.path)


def test_corrupt_sidecar(saved):
    _, written = saved
    sidecar_path(written.path).write_bytes(b"not a torch file")
    with pytest.raises(SemanticSplatFileError, match="not a readable semantic sidecar"):
        load_semantic_scene(written.path)


def test_plain_3dgs_ply_loads_without_latent(saved, tmp_path):
    scene, _ = saved
    path = tmp_path / "plain.ply"
    write_semantic_ply(
        path, scene.means, scene.scales, scene.quats, scene.opacities, scene.features_dc, scene.features_rest
    )
    assert not sidecar_path(path).exists()
    names, _ = _ply_table(path)
    assert names == gaussian_columns(15)
    plain = load_semantic_scene(path)
    assert plain.latent is None and plain.heads == {} and torch.equal(plain.means, scene.means)
    with pytest.raises(ValueError, match="plain 3DGS scene without a semantic latent"):
        plain.query("couch")
    with pytest.raises(ValueError, match="plain 3DGS"):
        plain.decode("labels")


def test_non_gaussian_ply_and_bad_inputs(tmp_path):
    cloud = np.zeros(4, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(cloud, "vertex")]).write(str(tmp_path / "points.ply"))
    with pytest.raises(SemanticSplatFileError, match=r"points\.ply is not a 3DGS PLY.*f_dc_0"):
        read_semantic_ply(tmp_path / "points.ply")
    with pytest.raises(FileNotFoundError, match="nowhere.ply"):
        load_semantic_scene(tmp_path / "nowhere.ply")
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"quats must have shape \(4, 4\)"):
        write_semantic_ply(tmp_path / "b.ply", z, z, z, torch.zeros(4), z, torch.zeros(4, 0, 3))
    with pytest.raises(ValueError, match="latent must have shape"):
        write_semantic_ply(
            tmp_path / "b.ply",
            z,
            z,
            torch.zeros(4, 4),
            torch.zeros(4),
            z,
            torch.zeros(4, 0, 3),
            torch.zeros(3, 8),
        )


def test_unknown_teacher_and_teacher_without_text(saved):
    scene, _ = saved
    with pytest.raises(KeyError, match="Teacher 'dino' has no projector head.*instances, labels"):
        scene.decode("dino")
    with pytest.raises(ValueError, match="'instances' has no text encoder"):
        scene.query("couch", teacher="instances")


# ------------------------------------------------------------------------------------------ queries


def test_lerf_relevancy_matches_its_definition():
    torch.manual_seed(0)
    features, pos, neg = torch.randn(50, 16), torch.randn(16), torch.randn(4, 16)
    cos = torch.nn.functional.cosine_similarity
    expected = torch.stack(
        [
            min(
                torch.softmax(10 * torch.stack([cos(f, pos, dim=0), cos(f, n, dim=0)]), dim=0)[0] for n in neg
            )
            for f in features
        ]
    )
    torch.testing.assert_close(lerf_relevancy(features, pos[None], neg)[:, 0], expected)
    same = lerf_relevancy(pos[None] * 3.0, pos[None], neg)[
        :, 0
    ]  # scale-free; the query itself beats every negative
    assert same.item() > 0.5


def test_query_finds_the_sofa_for_couch(saved, tmp_path):
    """Latents that decode exactly to class-name embeddings: "couch" must rank the sofa Gaussians first, for the
    live scene and for the file alike (the text encoder is rebuilt from the stored teacher config)."""
    scene, _ = saved
    teacher = scene.text_teacher()
    assert teacher.name == "labels" and type(teacher).__name__ == "LabelsTeacher"
    embeddings = teacher.encode_text(CLASSES)  # [K, 384]
    head = scene.heads["labels"]
    with torch.no_grad():  # identity first layer (one-hot latents pass the ReLU), class embeddings second
        head.net[0].weight.copy_(torch.eye(32))
        head.net[0].bias.zero_()
        head.net[2].weight.zero_()
        head.net[2].weight[:, : len(CLASSES)] = embeddings.T
        head.net[2].bias.zero_()
    classes = torch.arange(NUM_POINTS) % len(CLASSES)
    latent = torch.nn.functional.one_hot(classes, 32).float()
    scene = dataclasses.replace(scene, latent=latent)
    torch.testing.assert_close(scene.decode("labels"), embeddings[classes])

    written = scene.save(tmp_path / "query.ply")
    loaded = load_semantic_scene(written.path)
    relevancy = loaded.query("couch")
    assert relevancy.shape == (NUM_POINTS,) and ((relevancy >= 0) & (relevancy <= 1)).all()
    torch.testing.assert_close(relevancy, scene.query("couch"))
    sofa = classes == CLASSES.index("sofa")
    assert relevancy[sofa].min() > relevancy[~sofa].max() + 0.1
    top = relevancy.topk(int(sofa.sum())).indices
    assert sofa[top].all()
    assert (relevancy[sofa] > 0.9).all()


def test_teacher_configs_survive_the_sidecar(tmp_path):
    for preset in available_teachers():
        config = make_teacher_config(preset, checkpoint=Path("/weights") / preset)
        info = TeacherInfo.from_config(config, feature_dim=8)
        torch.save(info.to_record(), tmp_path / "t.pt")
        back = TeacherInfo.from_record(torch.load(tmp_path / "t.pt", weights_only=True))
        rebuilt = back.build_config()
        assert rebuilt == config, preset
        assert isinstance(rebuilt.checkpoint, Path)
        assert back.build_config(input_size=224).input_size == 224
    assert declared_text_encoder(make_teacher_config("siglip2-b16")) is True
    assert declared_text_encoder(make_teacher_config("dinov2-s14")) is False
    assert declared_text_encoder(make_teacher_config("labels")) is None  # decided per variant when built
    with pytest.raises(ValueError, match="has no field"):
        back.build_config(not_a_field=1)
    with pytest.raises(ValueError, match="cannot be imported"):
        dataclasses.replace(back, config_class="no.such.module:Config").build_config()
    with pytest.raises(ValueError, match="not a TeacherConfig"):
        dataclasses.replace(back, config_class="pathlib:Path").build_config()


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_splatsem_export_on_a_trained_run(tmp_path):
    """ns-train (60 CPU steps, labels teachers) -> splatsem-export -> load; then a text-selected export."""
    from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints

    run_dir = train_synthetic(tmp_path, iterations=60)

    def export(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [command("splatsem-export"), "--load-config", str(run_dir / "config.yml"), *extra],
            capture_output=True, text=True, env=offline_env(), timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, f"splatsem-export failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        return proc

    export("--output-dir", str(tmp_path / "export"))
    loaded = load_semantic_scene(tmp_path / "export" / "scene.ply")

    allow_numpy_scalars_in_checkpoints()
    ckpt = torch.load(
        next((run_dir / "nerfstudio_models").glob("step-*.ckpt")), map_location="cpu", weights_only=True
    )
    state = ckpt["pipeline"]
    assert torch.equal(loaded.means, state["_model.gauss_params.means"])
    assert torch.equal(loaded.latent, state["_model.gauss_params.semantic_latent"])
    assert torch.equal(
        loaded.heads["labels"].net[2].weight, state["_model.projector_heads.labels.net.2.weight"]
    )
    assert set(loaded.teachers) == {"labels", "instances"}
    assert loaded.teachers["labels"].config_fields["variant"] == "semantic"
    assert loaded.source_config == str(run_dir / "config.yml")
    assert loaded.decode("instances").shape == (loaded.num_gaussians, 64)

    relevancy = loaded.query("couch")
    values = relevancy.sort().values
    gaps = values[1:] - values[:-1]
    cut = int(0.8 * len(values))  # a threshold in a gap near the 80th percentile: no ties at the boundary
    i = cut + int(torch.argmax(gaps[cut:]))
    threshold = float((values[i] + values[i + 1]) / 2)
    proc = export(
        "--output-dir",
        str(tmp_path / "sel"),
        "--name",
        "couch",
        "--query",
        "couch",
        "--threshold",
        str(threshold),
    )
    assert "Query 'couch'" in proc.stdout
    part = load_semantic_scene(tmp_path / "sel" / "couch.ply")
    expected = relevancy > threshold
    assert 0 < part.num_gaussians == int(expected.sum()) < loaded.num_gaussians
    assert torch.equal(part.means, loaded.means[expected])
    assert torch.equal(part.latent, loaded.latent[expected])
