"""The procedural scene: determinism, file formats, and agreement of depth, poses, labels and points.

The geometric checks below use only what is written to disk (transforms.json, PNGs, PLYs) and their
own projection code in nerfstudio's conventions (OpenGL camera-to-world, pixel centres at i + 0.5), so
they would catch a pose, intrinsics or depth convention error in the generator.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.synthetic import CLASS_NAMES, SyntheticSceneConfig, generate_synthetic_scene, main

SMALL = dict(num_views=4, width=48, height=36, num_seed_points=400, labeled_points_per_m2=50.0)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("synthetic_room")
    start = time.perf_counter()
    generate_synthetic_scene(out, SyntheticSceneConfig())
    return out, time.perf_counter() - start


def _load_views(root: Path) -> tuple[dict, list[dict]]:
    meta = json.loads((root / "transforms.json").read_text())
    views = []
    for frame in meta["frames"]:
        views.append(
            {
                "c2w": np.asarray(frame["transform_matrix"], dtype=np.float64),
                "rgb": np.asarray(Image.open(root / frame["file_path"])),
                "depth": np.asarray(Image.open(root / frame["depth_file_path"])).astype(np.float64)
                * meta["depth_unit_scale_factor"],
                "labels": np.asarray(Image.open(root / frame["semantic_file_path"])).astype(np.int64),
                "instances": np.asarray(Image.open(root / frame["instance_file_path"])).astype(np.int64),
            }
        )
    return meta, views


def _project(meta: dict, c2w: np.ndarray, world: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points -> (pixel column, pixel row, z-depth) for an OpenGL camera-to-world pose."""
    cam = (world - c2w[:3, 3]) @ c2w[:3, :3]  # R^T (p - t), row-vector form
    depth = -cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = meta["fl_x"] * cam[:, 0] / depth + meta["cx"]
        v = -meta["fl_y"] * cam[:, 1] / depth + meta["cy"]
    return u, v, depth


def _backproject(meta: dict, c2w: np.ndarray, depth: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cam = np.stack(
        [(u - meta["cx"]) / meta["fl_x"] * depth, -(v - meta["cy"]) / meta["fl_y"] * depth, -depth], axis=-1
    ).reshape(-1, 3)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _lookup(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values at the pixels containing (u, v), and which (u, v) fall inside the image."""
    h, w = image.shape[:2]
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    col = np.clip(np.floor(np.where(inside, u, 0)).astype(int), 0, w - 1)
    row = np.clip(np.floor(np.where(inside, v, 0)).astype(int), 0, h - 1)
    return image[row, col], inside


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate_synthetic_scene(tmp_path / "a", SyntheticSceneConfig(seed=3, **SMALL))
    generate_synthetic_scene(tmp_path / "b", SyntheticSceneConfig(seed=3, **SMALL))
    generate_synthetic_scene(tmp_path / "c", SyntheticSceneConfig(seed=4, **SMALL))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert "transforms.json" in a and "points_labeled.ply" in a and "images/0003.png" in a
    assert a == b
    assert a.keys() == c.keys()
    assert a["images/0000.png"] != c["images/0000.png"]
    assert a["points_labeled.ply"] != c["points_labeled.ply"]


def test_overwrite_removes_stale_frames(tmp_path: Path) -> None:
    generate_synthetic_scene(tmp_path, SyntheticSceneConfig(**{**SMALL, "num_views": 3}))
    with pytest.raises(FileExistsError, match="transforms.json"):
        generate_synthetic_scene(tmp_path, SyntheticSceneConfig(**{**SMALL, "num_views": 2}))
    generate_synthetic_scene(tmp_path, SyntheticSceneConfig(**{**SMALL, "num_views": 2}), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0000.png", "0001.png"]
    assert len(json.loads((tmp_path / "transforms.json").read_text())["frames"]) == 2


def test_default_generation_is_fast(scene: tuple[Path, float]) -> None:
    # The default is meant for CPU tests (about 1.5 s on two cores); a generous bound against regressions.
    assert scene[1] < 10.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="num_views"):
        SyntheticSceneConfig(num_views=0)
    with pytest.raises(ValueError, match="supersample"):
        SyntheticSceneConfig(supersample=0)


def test_files_shapes_and_dtypes(scene: tuple[Path, float]) -> None:
    root, _ = scene
    config = SyntheticSceneConfig()
    meta = json.loads((root / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV"
    assert (meta["w"], meta["h"]) == (config.width, config.height)
    assert meta["fl_x"] == meta["fl_y"] == pytest.approx(config.focal_length)
    assert (meta["cx"], meta["cy"]) == (config.width / 2, config.height / 2)
    assert all(meta[k] == 0.0 for k in ("k1", "k2", "p1", "p2"))
    assert meta["depth_unit_scale_factor"] == 0.001
    assert (root / meta["ply_file_path"]).is_file()
    assert len(meta["frames"]) == config.num_views
    assert json.loads((root / "classes.json").read_text()) == {str(k): v for k, v in CLASS_NAMES.items()}

    for frame in meta["frames"][:3]:
        rgb = Image.open(root / frame["file_path"])
        assert rgb.mode == "RGB" and rgb.size == (config.width, config.height)
        for key in ("depth_file_path", "semantic_file_path", "instance_file_path"):
            image = Image.open(root / frame[key])
            assert image.mode == "I;16", key
            assert image.size == (config.width, config.height)
            assert np.asarray(image).dtype == np.uint16
        depth = np.asarray(Image.open(root / frame["depth_file_path"]))
        assert depth.min() > 100 and depth.max() < 8000  # millimetres inside a 4 x 3.2 x 2.4 m room
        c2w = np.asarray(frame["transform_matrix"])
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[3], [0, 0, 0, 1])
        np.testing.assert_allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3), atol=1e-9)
        assert np.linalg.det(c2w[:3, :3]) == pytest.approx(1.0)
    images = np.stack([np.asarray(Image.open(root / f["file_path"])) for f in meta["frames"]])
    assert images.std() > 20  # textured, not flat


def _reprojection_stats(meta: dict, views: list[dict], flip: np.ndarray) -> np.ndarray:
    """Per neighbouring pair (A, B): fraction of A's depth pixels that land in B and agree with B's depth,
    fraction where B sees *farther* than the point (impossible for consistent data, apart from pixel
    quantisation at silhouettes), and fraction landing in B. Points B sees behind something closer are
    occlusions."""
    stats = []
    for a in range(len(views)):
        b = (a + 1) % len(views)
        world = _backproject(meta, views[a]["c2w"] @ flip, views[a]["depth"])
        u, v, z = _project(meta, views[b]["c2w"] @ flip, world)
        depth_b, inside = _lookup(views[b]["depth"], u, v)
        valid = inside & (z > 0.05)
        diff, tolerance = depth_b[valid] - z[valid], 0.01 + 0.02 * z[valid]
        stats.append(((np.abs(diff) < tolerance).mean(), (diff > tolerance).mean(), valid.mean()))
    return np.asarray(stats)


def test_depth_reprojects_consistently_between_views(scene: tuple[Path, float]) -> None:
    meta, views = _load_views(scene[0])
    stats = _reprojection_stats(meta, views, np.eye(4))
    agree, see_through, overlap = stats.T
    assert overlap.min() > 0.15, overlap
    assert np.median(agree) > 0.9 and agree.min() > 0.75, agree
    assert see_through.max() < 0.03, see_through

    # Reading the poses as OpenCV instead of OpenGL must fail the same check: the test can tell.
    wrong = _reprojection_stats(meta, views, np.diag([1.0, -1.0, -1.0, 1.0]))
    assert np.median(wrong[:, 0]) < 0.3 and np.median(wrong[:, 1]) > 0.2, wrong


def test_labeled_points_land_on_matching_labels(scene: tuple[Path, float]) -> None:
    root = scene[0]
    meta, views = _load_views(root)
    cloud = read_point_cloud(root / "points_labeled.ply")
    assert cloud.labels is not None and cloud.instance_ids is not None and cloud.rgb is not None
    tested = np.zeros(len(cloud), dtype=bool)
    label_hits, instance_hits, colour_errors, count = 0, 0, [], 0
    for view in views:
        u, v, z = _project(meta, view["c2w"], cloud.xyz.astype(np.float64))
        depth, inside = _lookup(view["depth"], u, v)
        visible = inside & (z > 0.05) & (np.abs(depth - z) < 0.015)
        labels, _ = _lookup(view["labels"], u, v)
        instances, _ = _lookup(view["instances"], u, v)
        rgb, _ = _lookup(view["rgb"], u, v)
        label_hits += int((labels[visible] == cloud.labels[visible]).sum())
        instance_hits += int((instances[visible] == cloud.instance_ids[visible]).sum())
        colour_errors.append(np.abs(rgb[visible].astype(int) - cloud.rgb[visible].astype(int)).mean(axis=-1))
        count += int(visible.sum())
        tested |= visible
    assert tested.mean() > 0.5  # most points are seen by some view
    assert label_hits / count > 0.95
    assert instance_hits / count > 0.95
    # Point colours are the texture at the point; pixels average the texture over their footprint.
    assert np.median(np.concatenate(colour_errors)) < 10


def test_every_class_and_instance_present(scene: tuple[Path, float]) -> None:
    root = scene[0]
    _, views = _load_views(root)
    seen = set(np.unique(np.concatenate([v["labels"].ravel() for v in views])).tolist())
    assert seen == set(CLASS_NAMES)  # every class visible somewhere, no unlabelled pixels
    cloud = read_point_cloud(root / "points_labeled.ply")
    assert set(np.unique(cloud.labels).tolist()) == set(CLASS_NAMES)
    chair = next(k for k, v in CLASS_NAMES.items() if v == "chair")
    assert len(np.unique(cloud.instance_ids[cloud.labels == chair])) == 2
    # Every instance belongs to exactly one class.
    for instance in np.unique(cloud.instance_ids):
        assert len(np.unique(cloud.labels[cloud.instance_ids == instance])) == 1
    pixel_instances = np.unique(np.concatenate([v["instances"].ravel() for v in views]))
    assert set(pixel_instances.tolist()) <= set(np.unique(cloud.instance_ids).tolist())


def test_seed_points(scene: tuple[Path, float]) -> None:
    config = SyntheticSceneConfig()
    cloud = read_point_cloud(scene[0] / "points3D.ply")
    assert len(cloud) == config.num_seed_points
    assert cloud.rgb is not None and cloud.rgb.dtype == np.uint8 and cloud.labels is None
    half = np.array([config.room_size[0] / 2, config.room_size[1] / 2])
    margin = 5 * config.seed_point_noise
    assert (np.abs(cloud.xyz[:, :2]) <= half + margin).all()
    assert (cloud.xyz[:, 2] >= -margin).all() and (cloud.xyz[:, 2] <= config.room_size[2] + margin).all()
    assert cloud.rgb.astype(float).std() > 10


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "room"
    argv = ["splatsem-synthetic", "--out", str(out), "--num-views", "2", "--width", "32", "--height", "24"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == 2 and meta["w"] == 32 and meta["h"] == 24
    with pytest.raises(FileExistsError):
        main()
    monkeypatch.setattr(sys, "argv", [*argv[:3], "--num-views", "3", "--overwrite"])
    main()
    assert len(json.loads((out / "transforms.json").read_text())["frames"]) == 3
