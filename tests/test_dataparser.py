"""The validating dataparser and PLY I/O: parsing real and synthetic scenes, and one clear error per defect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from support import SCANNET

from splatsem_ns.data.dataparser import (
    CLASS_NAMES_KEY,
    INSTANCE_FILENAMES_KEY,
    LABELED_POINTS_KEY,
    SEMANTIC_FILENAMES_KEY,
    DatasetError,
    SplatsemDataParserConfig,
)
from splatsem_ns.data.ply_io import PointCloudError, read_point_cloud, write_point_cloud
from splatsem_ns.data.synthetic import CLASS_NAMES, SyntheticSceneConfig, generate_synthetic_scene

NUM_VIEWS = 10


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    generate_synthetic_scene(out, SyntheticSceneConfig(num_views=NUM_VIEWS, num_seed_points=500))
    return out


@pytest.fixture
def scene_copy(synthetic: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synthetic, tmp_path / "scene"))


def _parse(data: Path, split: str = "train", **kwargs):
    return SplatsemDataParserConfig(data=data, **kwargs).setup().get_dataparser_outputs(split)


def _edit_transforms(root: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads((root / "transforms.json").read_text())
    edit(meta)
    (root / "transforms.json").write_text(json.dumps(meta))


def _to_dataparser_frame(outputs, xyz: np.ndarray) -> torch.Tensor:
    transform = outputs.dataparser_transform.to(torch.float64)
    homogeneous = torch.cat(
        [torch.from_numpy(xyz).double(), torch.ones(len(xyz), 1, dtype=torch.float64)], -1
    )
    return (homogeneous @ transform.T) * outputs.dataparser_scale


# ------------------------------------------------------------------------------------------------
# Parsing


def test_parses_synthetic_scene(synthetic: Path) -> None:
    train = _parse(synthetic, "train", eval_mode="interval", eval_interval=5)
    val = _parse(synthetic, "val", eval_mode="interval", eval_interval=5)
    assert len(train.image_filenames) == 8 and len(val.image_filenames) == 2
    assert {p.name for p in val.image_filenames} == {"0000.png", "0005.png"}
    meta = json.loads((synthetic / "transforms.json").read_text())
    assert train.cameras.shape == (8,)
    assert float(train.cameras.fx[0]) == pytest.approx(meta["fl_x"])
    assert int(train.cameras.width[0]) == meta["w"] and int(train.cameras.height[0]) == meta["h"]

    # Semantic and instance files follow nerfstudio's (sorted, split) image order.
    for key, folder in ((SEMANTIC_FILENAMES_KEY, "labels"), (INSTANCE_FILENAMES_KEY, "instances")):
        files = train.metadata[key]
        assert [p.name for p in files] == [p.name for p in train.image_filenames]
        assert all(p.parent.name == folder and p.is_file() for p in files)
    assert train.metadata[CLASS_NAMES_KEY] == CLASS_NAMES
    assert train.metadata[LABELED_POINTS_KEY] == synthetic / "points_labeled.ply"
    assert len(train.metadata["depth_filenames"]) == 8

    # Seed points go through the same transform as the cameras.
    seed = read_point_cloud(synthetic / "points3D.ply")
    xyz, rgb = train.metadata["points3D_xyz"], train.metadata["points3D_rgb"]
    assert xyz.shape == (500, 3) and rgb.dtype == torch.uint8
    torch.testing.assert_close(
        xyz.double(), _to_dataparser_frame(train, seed.xyz.astype(np.float64)), atol=1e-5, rtol=0
    )
    assert torch.equal(rgb, torch.from_numpy(seed.rgb))
    ordered = sorted(meta["frames"], key=lambda f: f["file_path"])
    train_frames = [f for i, f in enumerate(ordered) if i % 5 != 0]
    centres = np.array([np.asarray(f["transform_matrix"])[:3, 3] for f in train_frames])
    torch.testing.assert_close(
        train.cameras.camera_to_worlds[:, :3, 3].double(),
        _to_dataparser_frame(train, centres)[:, :3],
        atol=1e-5,
        rtol=0,
    )


def test_points_optional_and_colourless(scene_copy: Path) -> None:
    outputs = _parse(scene_copy, load_3D_points=False)
    assert "points3D_xyz" not in outputs.metadata
    cloud = read_point_cloud(scene_copy / "points3D.ply")
    write_point_cloud(scene_copy / "points3D.ply", cloud.xyz)  # no colour columns
    outputs = _parse(scene_copy)
    assert (outputs.metadata["points3D_rgb"] == 128).all()


def test_dataset_without_semantic_files(scene_copy: Path) -> None:
    def strip(meta: dict) -> None:
        for frame in meta["frames"]:
            del frame["semantic_file_path"], frame["instance_file_path"]
        del meta["classes_file_path"], meta["labeled_ply_file_path"]

    _edit_transforms(scene_copy, strip)
    (scene_copy / "classes.json").unlink()
    (scene_copy / "points_labeled.ply").unlink()
    outputs = _parse(scene_copy)
    for key in (SEMANTIC_FILENAMES_KEY, INSTANCE_FILENAMES_KEY, CLASS_NAMES_KEY, LABELED_POINTS_KEY):
        assert key not in outputs.metadata


# ------------------------------------------------------------------------------------------------
# One clear error per defect


def _rm(relative: str) -> Callable[[Path], None]:
    return lambda root: (root / relative).unlink()


def _write(relative: str, content: bytes) -> Callable[[Path], None]:
    return lambda root: (root / relative).write_bytes(content)


def _set_matrix(index: int, value: list) -> Callable[[Path], None]:
    def edit(meta: dict) -> None:
        sorted(meta["frames"], key=lambda f: f["file_path"])[index]["transform_matrix"] = value

    return lambda root: _edit_transforms(root, edit)


def _remove_two_images(root: Path) -> None:
    (root / "images" / "0002.png").unlink()
    (root / "images" / "0007.png").unlink()


def _empty_ply(root: Path) -> None:
    vertex = np.empty(0, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(root / "points3D.ply"))


SINGULAR = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
NAN_MATRIX = [[float("nan")] * 4] * 4

FAILURES = {
    "transforms_missing": (_rm("transforms.json"), ["transforms.json", "does not exist"]),
    "invalid_json": (_write("transforms.json", b'{"frames": [ oops'), ["transforms.json", "not valid JSON"]),
    "no_frames": (
        lambda r: _edit_transforms(r, lambda m: m.update(frames=[])),
        ["transforms.json", "no frames"],
    ),
    "images_missing": (_remove_two_images, ["2 of 10 image files are missing", "0002.png", "0007.png"]),
    "corrupt_image": (
        _write("images/0004.png", b"not a png at all"),
        ["0004.png", "frame 4", "cannot be read"],
    ),
    "nonfinite_pose": (
        _set_matrix(3, NAN_MATRIX),
        ["frame 3", "images/0003.png", "non-finite transform_matrix"],
    ),
    "singular_pose": (_set_matrix(6, SINGULAR), ["frame 6", "singular transform_matrix"]),
    "bad_pose_shape": (_set_matrix(1, [[1.0, 0.0], [0.0, 1.0]]), ["frame 1", "4x4"]),
    "size_mismatch": (
        lambda r: _edit_transforms(r, lambda m: m.update(w=100)),
        ["0000.png", "is 96x72", "w=100"],
    ),
    "missing_intrinsic": (lambda r: _edit_transforms(r, lambda m: m.pop("fl_y")), ["frame 0", "'fl_y'"]),
    "ply_missing": (_rm("points3D.ply"), ["points3D.ply", "does not exist", "ply_file_path"]),
    "ply_empty": (_empty_ply, ["points3D.ply", "has no points"]),
    "ply_corrupt": (
        _write("points3D.ply", b"ply\nformat nonsense\n"),
        ["points3D.ply", "not a readable PLY"],
    ),
    "label_image_missing": (_rm("labels/0005.png"), ["semantic label files", "labels/0005.png"]),
    "classes_invalid": (_write("classes.json", b'{"wall": 1}'), ["classes.json", "invalid"]),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_defect_gives_dataset_error(scene_copy: Path, case: str) -> None:
    damage, expected = FAILURES[case]
    damage(scene_copy)
    with pytest.raises(DatasetError) as info:
        _parse(scene_copy)
    assert isinstance(info.value, ValueError)
    for text in expected:
        assert text in str(info.value), f"{text!r} not in: {info.value}"


def test_missing_data_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        _parse(tmp_path / "nowhere")


def test_partial_frame_keys_are_rejected(scene_copy: Path) -> None:
    _edit_transforms(scene_copy, lambda m: m["frames"][2].pop("depth_file_path"))
    with pytest.raises(DatasetError, match="'depth_file_path' is given for 9 of 10 frames"):
        _parse(scene_copy)


# ------------------------------------------------------------------------------------------------
# PLY I/O


def test_ply_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 257
    xyz = rng.normal(size=(n, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    labels = rng.integers(0, 41, n)
    instances = rng.integers(0, 1000, n)
    extra = {"opacity": rng.random(n).astype(np.float32), "flag": rng.random(n) > 0.5}
    path = write_point_cloud(tmp_path / "pc.ply", xyz, rgb, labels, instances, extra=extra)
    cloud = read_point_cloud(path)
    assert len(cloud) == n
    np.testing.assert_array_equal(cloud.xyz, xyz)
    np.testing.assert_array_equal(cloud.rgb, rgb)
    np.testing.assert_array_equal(cloud.labels, labels)
    np.testing.assert_array_equal(cloud.instance_ids, instances)
    assert cloud.xyz.dtype == np.float32 and cloud.labels.dtype == np.int64
    vertex = PlyData.read(str(path))["vertex"]
    np.testing.assert_array_equal(vertex["opacity"], extra["opacity"])
    np.testing.assert_array_equal(vertex["flag"], extra["flag"].astype(np.uint8))
    # Same arrays, same bytes.
    again = write_point_cloud(tmp_path / "again.ply", xyz, rgb, labels, instances, extra=extra)
    assert again.read_bytes() == path.read_bytes()


def test_ply_label_columns_and_formats(tmp_path: Path) -> None:
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_point_cloud(tmp_path / "nyu.ply", xyz, labels=np.array([1, 2, 3, 4]), label_column="nyu40_label")
    assert read_point_cloud(tmp_path / "nyu.ply").labels.tolist() == [1, 2, 3, 4]
    assert read_point_cloud(tmp_path / "nyu.ply", label_column="nyu40_label").labels.tolist() == [1, 2, 3, 4]
    with pytest.raises(PointCloudError, match="no label column"):
        read_point_cloud(tmp_path / "nyu.ply", label_column="semantic")
    plain = read_point_cloud(write_point_cloud(tmp_path / "plain.ply", xyz, text=True))
    assert plain.rgb is None and plain.labels is None and plain.instance_ids is None
    np.testing.assert_array_equal(plain.xyz, xyz)

    # Float colours in [0, 1], as some exporters write them.
    vertex = np.empty(2, dtype=[(c, "f4") for c in ("x", "y", "z", "red", "green", "blue")])
    for c in ("x", "y", "z"):
        vertex[c] = 0.0
    vertex["red"], vertex["green"], vertex["blue"] = [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "float_rgb.ply"))
    assert read_point_cloud(tmp_path / "float_rgb.ply").rgb.tolist() == [[0, 128, 255], [255, 128, 0]]


def test_ply_errors(tmp_path: Path) -> None:
    with pytest.raises(PointCloudError, match="does not exist"):
        read_point_cloud(tmp_path / "missing.ply")
    face = np.empty(1, dtype=[("vertex_indices", "i4", (3,))])
    PlyData([PlyElement.describe(face, "face")]).write(str(tmp_path / "faces.ply"))
    with pytest.raises(PointCloudError, match="no 'vertex' element"):
        read_point_cloud(tmp_path / "faces.ply")
    xy = np.zeros(3, dtype=[("x", "f4"), ("y", "f4")])
    PlyData([PlyElement.describe(xy, "vertex")]).write(str(tmp_path / "xy.ply"))
    with pytest.raises(PointCloudError, match="no z column"):
        read_point_cloud(tmp_path / "xy.ply")
    bad = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    bad["y"][1] = np.inf
    PlyData([PlyElement.describe(bad, "vertex")]).write(str(tmp_path / "inf.ply"))
    with pytest.raises(PointCloudError, match="1 points with non-finite coordinates"):
        read_point_cloud(tmp_path / "inf.ply")
    with pytest.raises(PointCloudError, match="rgb must have shape"):
        write_point_cloud(tmp_path / "w.ply", np.zeros((3, 3)), rgb=np.zeros((2, 3), dtype=np.uint8))
    with pytest.raises(PointCloudError, match="repeated column"):
        write_point_cloud(tmp_path / "w.ply", np.zeros((3, 3)), extra={"x": np.zeros(3)})
    with pytest.raises(PointCloudError, match="does not fit"):
        write_point_cloud(tmp_path / "w.ply", np.zeros((1, 3)), labels=np.array([2**40]))


# ------------------------------------------------------------------------------------------------
# nerfstudio integration and real data


def test_entry_point_registers_without_cycles() -> None:
    code = (
        "import sys\n"
        "import splatsem_ns.data.dataparser_entry\n"
        "heavy = [m for m in sys.modules if m.startswith(('nerfstudio.engine', 'nerfstudio.pipelines',"
        " 'nerfstudio.data.datamanagers', 'open3d'))]\n"
        "assert not heavy, heavy\n"
        "from nerfstudio.configs.dataparser_configs import all_dataparsers\n"
        "print(type(all_dataparsers['splatsem-data']).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("SplatsemDataParserConfig")


@pytest.mark.skipif(not SCANNET.is_dir(), reason=f"real data not found at {SCANNET}")
def test_real_scannet_scene() -> None:
    train = _parse(SCANNET, "train", eval_mode="interval", eval_interval=8)
    val = _parse(SCANNET, "val", eval_mode="interval", eval_interval=8)
    assert len(train.image_filenames) + len(val.image_filenames) == 50
    assert len(val.image_filenames) == 7
    assert int(train.cameras.width[0]) == 648 and int(train.cameras.height[0]) == 484
    assert len(train.metadata["depth_filenames"]) == len(train.image_filenames)
    assert len(train.metadata["points3D_xyz"]) > 0  # no ply_file_path: seeds from depth (test_depth_seeds.py)
    assert train.metadata[LABELED_POINTS_KEY] == SCANNET / "points_labeled.ply"
    assert SEMANTIC_FILENAMES_KEY not in train.metadata

    cloud = read_point_cloud(SCANNET / "points_labeled.ply")
    assert len(cloud) == 81369
    assert cloud.rgb is not None and cloud.labels is not None and cloud.instance_ids is not None
    assert len(np.unique(cloud.instance_ids)) == 68
    counts = np.bincount(cloud.labels, minlength=41)
    assert counts[1] == 13899 and counts[2] == 10234 and counts[0] == 4357  # wall, floor, unannotated


# ------------------------------------------------------------------------------------------------
# Images that look whole, depth that does not fit, splits without a held-out view


def test_truncated_image_is_caught_at_validation_naming_it(scene_copy: Path) -> None:
    """A truncated PNG keeps a valid header; only decoding it finds the damage (else nerfstudio's loader thread
    dies later without a file name)."""
    image = scene_copy / "images" / "0003.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"0003\.png.*cannot be read as an image"):
        _parse(scene_copy)


def _rewrite_depth(root: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    from PIL import Image

    path = root / "depth" / name
    Image.fromarray(np.ascontiguousarray(change(np.asarray(Image.open(path))))).save(path)
    return path


def test_depth_of_another_aspect_ratio_is_an_error_naming_the_file(scene_copy: Path) -> None:
    _rewrite_depth(scene_copy, "0004.png", lambda d: d.T)  # transposed: 72 x 96 beside 96 x 72 colour
    with pytest.raises(DatasetError, match=r"0004\.png is 72x96 .* colour image is 96x72"):
        _parse(scene_copy)


def test_depth_at_another_scale_is_resampled_with_one_warning(
    scene_copy: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from splatsem_ns.data import depth as depth_module

    monkeypatch.setattr(depth_module, "_warned_scales", set())  # "once" is per run; this test is a run
    for i in range(NUM_VIEWS):
        _rewrite_depth(scene_copy, f"{i:04d}.png", lambda d: d[::2, ::2])  # 48 x 36, as a depth sensor might
    outputs = _parse(scene_copy)
    for path in outputs.metadata["depth_filenames"][:3]:
        loaded = depth_module.load_depth_image(path, (72, 96), 1e-3)
        assert loaded.shape == (72, 96)
    out = capsys.readouterr().out
    assert out.count("depth is resampled") == 1, out


@pytest.mark.parametrize(
    ("frames", "fraction", "train", "held_out", "message"),
    [
        (6, 0.9, 5, 1, "so one view is held out"),  # nerfstudio's 90% would train on all 6
        (6, 1.0, 6, 0, "No view of 6 is held out"),  # asked for explicitly: respected, and said
        (1, 0.9, 1, 0, "No view of 1 is held out"),
        (10, 0.9, 9, 1, None),  # the usual split is left alone
    ],
)
def test_small_scenes_hold_out_one_view(
    scene_copy: Path, capsys: pytest.CaptureFixture, frames, fraction, train, held_out, message
) -> None:
    _edit_transforms(scene_copy, lambda meta: meta.update(frames=meta["frames"][:frames]))
    config = {"train_split_fraction": fraction}
    assert len(_parse(scene_copy, "train", **config).image_filenames) == train
    assert len(_parse(scene_copy, "val", **config).image_filenames) == held_out
    out = " ".join(capsys.readouterr().out.split())
    if message is None:
        assert "held out" not in out
    else:
        assert message in out


def test_a_split_without_training_views_is_an_error(scene_copy: Path) -> None:
    _edit_transforms(scene_copy, lambda meta: meta.update(frames=meta["frames"][:1]))
    with pytest.raises(DatasetError, match="leaves no training view"):
        _parse(scene_copy, "train", eval_mode="interval", eval_interval=8)  # frame 0 is always held out


def test_ns_eval_without_a_held_out_view_says_so() -> None:
    from types import SimpleNamespace

    from splatsem_ns.pipelines.chorus_pipeline import ChorusPipeline, NoHeldOutViewError

    pipeline = SimpleNamespace(datamanager=SimpleNamespace(eval_dataset=[]))
    with pytest.raises(NoHeldOutViewError, match="no held-out view"):
        ChorusPipeline.get_average_eval_image_metrics(pipeline)  # type: ignore[arg-type]
