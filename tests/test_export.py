"""Export of semantic Gaussians (3DGS PLY + sem_* columns + sidecar) and the queryable scene loaded back."""

from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import traceback
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from support import command, offline_env, train_synthetic

from splatsem_ns.export import (
    SemanticExportError,
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
    assert record["format_version"] == 2 and record["num_gaussians"] == NUM_POINTS
    # The fingerprint hashes the positions exactly as the PLY stores them (little-endian float32, file order).
    positions = np.stack([_ply_table(written.path)[1][c] for c in "xyz"], axis=1).astype("<f4")
    assert record["ply_fingerprint"] == {
        "num_gaussians": NUM_POINTS,
        "positions_sha256": hashlib.sha256(positions.tobytes()).hexdigest(),
    }
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


def _other_scene(scene: SemanticScene) -> SemanticScene:
    """Another export's scene: as many Gaussians, other positions and other head weights."""
    heads = {name: copy.deepcopy(head) for name, head in scene.heads.items()}
    with torch.no_grad():
        for head in heads.values():
            for param in head.parameters():
                param.add_(1.0)
    return dataclasses.replace(scene, means=scene.means + 0.25, heads=heads)


def _fail_os_replace_onto(monkeypatch, name: str) -> None:
    """Make renaming a finished file onto ``name`` fail as an unwritable destination does."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_torch_save(monkeypatch) -> None:
    """Make writing the sidecar fail as a full disk does."""

    def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize(
    "failure, failing_file, reason",
    [
        ("sidecar_write", "scene.semantic.pt", "No space left on device. The export was abandoned"),
        ("sidecar_rename", "scene.semantic.pt", "Permission denied .*The export was abandoned"),
        (
            "ply_rename",
            "scene.ply",
            r"Permission denied .*scene\.semantic\.pt was put back as it was, so the earlier export there "
            r"is unchanged",
        ),
    ],
    ids=["sidecar_write_fails", "sidecar_rename_fails", "ply_rename_fails"],
)
def test_failed_re_export_leaves_the_previous_pair_unchanged(
    saved, tmp_path, monkeypatch, failure, failing_file, reason
):
    """A re-export that fails at any step (the sidecar cannot be written or cannot replace the old one, or the
    PLY cannot) leaves the earlier PLY and sidecar byte-identical and no temporary file: never a new PLY
    beside the old sidecar, whose heads would then decode another export's latents."""
    scene, written = saved
    side = sidecar_path(written.path)
    before = {path: path.read_bytes() for path in (written.path, side)}
    if failure == "sidecar_write":
        _fail_torch_save(monkeypatch)
    else:
        _fail_os_replace_onto(monkeypatch, failing_file)

    with pytest.raises(SemanticExportError, match=f"Could not write .*{failing_file}: {reason}") as caught:
        _other_scene(scene).save(written.path)
    assert isinstance(caught.value, OSError) and str(tmp_path / failing_file) in str(caught.value)
    assert {path: path.read_bytes() for path in (written.path, side)} == before
    assert sorted(os.listdir(tmp_path)) == ["scene.ply", "scene.semantic.pt"]
    # The same failure on a first export leaves nothing at all behind (a sidecar already renamed is removed).
    with pytest.raises(SemanticExportError, match=failing_file):
        scene.save(tmp_path / "fresh" / "scene.ply")
    assert os.listdir(tmp_path / "fresh") == []

    monkeypatch.undo()
    loaded = load_semantic_scene(written.path)
    assert torch.equal(loaded.means, scene.means)
    torch.testing.assert_close(loaded.decode("labels"), scene.decode("labels"), rtol=0, atol=0)


def test_export_onto_an_unwritable_sidecar_path_keeps_the_earlier_ply(saved, tmp_path):
    """No monkeypatching: the sidecar's path is a folder, so the sidecar cannot be written there. The PLY
    already at the destination must stay as it was rather than be replaced by one without its sidecar."""
    scene, _ = saved
    folder = tmp_path / "out"
    plain = dataclasses.replace(scene, latent=None, heads={}, teachers={})
    plain.save(folder / "scene.ply")
    before = (folder / "scene.ply").read_bytes()
    (folder / "scene.semantic.pt").mkdir()
    with pytest.raises(
        SemanticExportError, match=r"Could not write .*out/scene\.semantic\.pt: Is a directory"
    ):
        scene.save(folder / "scene.ply")
    assert (folder / "scene.ply").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["scene.ply", "scene.semantic.pt"]
    assert load_semantic_scene(folder / "scene.ply").latent is None


def test_plain_export_removes_a_stale_sidecar(saved, tmp_path):
    """Saving a scene without semantics over a semantic export deletes the old sidecar: a plain PLY must not
    sit beside another export's heads."""
    scene, written = saved
    plain = dataclasses.replace(_other_scene(scene), latent=None, heads={}, teachers={})
    result = plain.save(written.path)
    assert result.sidecar is None and not sidecar_path(written.path).exists()
    assert sorted(os.listdir(tmp_path)) == ["scene.ply"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_semantic_scene(written.path)
    assert loaded.latent is None and loaded.heads == {} and torch.equal(loaded.means, plain.means)


def test_export_files_respect_the_umask(saved, tmp_path):
    """The temporary files become the export, so they are created 0o666 minus the umask, as any file the user
    writes (tempfile.mkstemp's 0o600 would make the export private)."""
    scene, _ = saved
    for umask in (0o022, 0o027):
        previous = os.umask(umask)
        try:
            written = scene.save(tmp_path / f"umask{umask:o}" / "scene.ply")
        finally:
            os.umask(previous)
        for path in (written.path, written.sidecar):
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))


def test_sidecar_of_another_export_with_as_many_gaussians(saved, tmp_path):
    """Two exports of as many Gaussians pass the count check; the fingerprint of the positions tells them
    apart."""
    scene, _ = saved
    a = scene.save(tmp_path / "a" / "scene.ply")
    b = _other_scene(scene).save(tmp_path / "b" / "scene.ply")
    shutil.copy(b.sidecar, a.sidecar)
    with pytest.raises(SemanticSplatFileError) as caught:
        load_semantic_scene(a.path)
    message = str(caught.value)
    assert str(a.path) in message and str(a.sidecar) in message
    assert "come from different exports" in message and "keep the PLY and its sidecar together" in message
    assert load_semantic_scene(b.path).num_gaussians == NUM_POINTS  # B's own pair still loads


def test_version_1_sidecar_loads_with_a_warning(saved):
    """Sidecars written before the fingerprint (format version 1) still load, warning that the pair is
    unchecked."""
    scene, written = saved
    side = sidecar_path(written.path)
    record = torch.load(side, map_location="cpu", weights_only=True)
    del record["ply_fingerprint"]
    record["format_version"] = 1
    torch.save(record, side)
    with pytest.warns(UserWarning, match=r"version-1 sidecar without a fingerprint .* cannot be checked"):
        loaded = load_semantic_scene(written.path)
    torch.testing.assert_close(loaded.decode("labels"), scene.decode("labels"), rtol=0, atol=0)


@dataclasses.dataclass
class _NotPlainData:
    """What no sidecar holds: an object that only unpickling its class could rebuild."""

    value: int = 1


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            "empty",
            r"is empty \(0 bytes\): whatever wrote it was interrupted, or the disk was full\. "
            r"Export the scene again",
        ),
        (
            "truncated",
            r"is a truncated torch file \(a zip archive without its end\), as when a write or a copy is "
            r"cut short .* Export the scene again",
        ),
        ("garbage", r"is not a readable semantic sidecar: it is truncated or not a torch file"),
        (
            "pickled_object",
            r"holds pickled Python objects \(GLOBAL \S*_NotPlainData\), which a semantic sidecar never "
            r"contains: it was not written by splatsem-export, or it was altered\. It is not loaded because "
            r"unpickling it could run arbitrary code\.",
        ),
    ],
    ids=["empty", "truncated", "garbage", "pickled_object"],
)
def test_broken_sidecar_errors_say_what_is_wrong(saved, damage, expected):
    """Each broken sidecar gets a message naming it and saying what happened, never torch's advice to retry
    with weights_only=False (misleading for a sidecar, and unsafe), in the message or anywhere in the
    traceback."""
    _, written = saved
    side = sidecar_path(written.path)
    content = side.read_bytes()
    if damage == "empty":
        side.write_bytes(b"")
    elif damage == "truncated":
        side.write_bytes(content[: len(content) // 2])
    elif damage == "garbage":
        side.write_bytes(b"not a torch file")
    else:
        record = torch.load(side, map_location="cpu", weights_only=True)
        record["teachers"]["labels"]["config_fields"]["extra"] = _NotPlainData()
        torch.save(record, side)
    with pytest.raises(SemanticSplatFileError, match=expected) as caught:
        load_semantic_scene(written.path)
    message = str(caught.value)
    assert message.startswith(str(side))
    shown = "".join(traceback.format_exception(caught.value))
    for text in (message, shown):
        assert "weights_only" not in text and "Weights only" not in text and "safe_globals" not in text, text


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
