"""Seed points from sensor depth: back-projection, voxel merging, and the dataparser's choice of seeds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree
from support import SCANNET

from splatsem_ns.data.dataparser import DatasetError, SplatsemDataParserConfig
from splatsem_ns.data.depth import backproject_depth, voxel_downsample
from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene


def test_backprojection_follows_nerfstudio_camera_convention() -> None:
    depth = torch.full((4, 6), 2.0)
    depth[0, 0] = 0.0  # no measurement: skipped
    rgb = torch.arange(4 * 6 * 3, dtype=torch.uint8).reshape(4, 6, 3)
    camera_to_world = torch.eye(4)[:3]
    camera_to_world[:, 3] = torch.tensor([1.0, 2.0, 3.0])
    xyz, colours = backproject_depth(depth, rgb, (2.0, 4.0, 3.0, 2.0), camera_to_world, stride=1)
    assert xyz.shape == (23, 3) and torch.equal(colours, rgb.reshape(-1, 3)[1:])
    # Pixel (u=5, v=3), the last one: x = (5.5 - 3) / 2 * 2, y = -(3.5 - 2) / 4 * 2, z = -2 (looking down -z).
    torch.testing.assert_close(xyz[-1], torch.tensor([2.5, -0.75, -2.0]) + camera_to_world[:, 3])
    # A rotated camera: the same point turned by the rotation.
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    turned, _ = backproject_depth(
        depth, rgb, (2.0, 4.0, 3.0, 2.0), torch.cat([rotation, torch.zeros(3, 1)], 1), stride=1
    )
    torch.testing.assert_close(turned[-1], rotation @ torch.tensor([2.5, -0.75, -2.0]))
    strided, _ = backproject_depth(depth, rgb, (2.0, 4.0, 3.0, 2.0), camera_to_world, stride=2)
    assert strided.shape == (5, 3)  # 2 x 3 samples, the one at (0, 0) unmeasured


def test_voxel_downsample_averages_each_cell() -> None:
    xyz = torch.tensor([[0.01, 0.01, 0.01], [0.03, 0.03, 0.03], [0.5, 0.5, 0.5]])
    rgb = torch.tensor([[0, 0, 0], [100, 200, 255], [7, 7, 7]], dtype=torch.uint8)
    points, colours = voxel_downsample(xyz, rgb, voxel=0.1)
    order = torch.argsort(points[:, 0])
    torch.testing.assert_close(points[order], torch.tensor([[0.02, 0.02, 0.02], [0.5, 0.5, 0.5]]))
    assert colours[order].tolist() == [[50, 100, 128], [7, 7, 7]]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scene")
    generate_synthetic_scene(out, SyntheticSceneConfig(num_views=10, num_seed_points=500))
    return out


def _train_outputs(data: Path, eval_interval: int = 5, **kwargs):
    config = SplatsemDataParserConfig(data=data, eval_mode="interval", eval_interval=eval_interval, **kwargs)
    return config.setup().get_dataparser_outputs("train")


def _labelled_points(outputs, data: Path) -> np.ndarray:
    cloud = read_point_cloud(data / "points_labeled.ply")
    homogeneous = np.concatenate([cloud.xyz, np.ones_like(cloud.xyz[:, :1])], 1)
    return homogeneous @ outputs.dataparser_transform.numpy().T * outputs.dataparser_scale


def test_depth_seeds_lie_on_the_scene_surfaces(synthetic: Path) -> None:
    outputs = _train_outputs(synthetic, seed_points="depth", depth_seed_voxel=0.05)
    xyz, rgb = outputs.metadata["points3D_xyz"], outputs.metadata["points3D_rgb"]
    assert len(xyz) > 1000 and rgb.dtype == torch.uint8 and rgb.shape == xyz.shape
    distance, _ = cKDTree(_labelled_points(outputs, synthetic)).query(xyz.numpy())
    # The labelled points sample the same surfaces; back-projected depth must land on them (scene units).
    voxel = 0.05 * outputs.dataparser_scale
    assert np.median(distance) < 2 * voxel
    # A finer voxel keeps more points.
    finer = _train_outputs(synthetic, seed_points="depth", depth_seed_voxel=0.02).metadata["points3D_xyz"]
    assert len(finer) > len(xyz)


def test_depth_seeds_never_read_held_out_views(synthetic: Path, tmp_path: Path) -> None:
    scene = Path(shutil.copytree(synthetic, tmp_path / "scene"))
    before = _train_outputs(scene, seed_points="depth").metadata["points3D_xyz"]
    meta = json.loads((scene / "transforms.json").read_text())
    held_out = sorted(meta["frames"], key=lambda f: f["file_path"])[::5]
    for frame in held_out:  # a wall 10 cm in front of every held-out camera
        path = scene / frame["depth_file_path"]
        shape = np.asarray(Image.open(path)).shape
        Image.fromarray(np.full(shape, 100, dtype=np.uint16)).save(path)
    after = _train_outputs(scene, seed_points="depth").metadata["points3D_xyz"]
    assert torch.equal(before, after)


def test_seed_point_source_choice(synthetic: Path, tmp_path: Path) -> None:
    # auto: the scene names a PLY, which wins over depth.
    assert len(_train_outputs(synthetic).metadata["points3D_xyz"]) == 500
    assert "points3D_xyz" not in _train_outputs(synthetic, load_3D_points=False).metadata
    scene = Path(shutil.copytree(synthetic, tmp_path / "scene"))
    meta = json.loads((scene / "transforms.json").read_text())
    del meta["ply_file_path"]
    (scene / "transforms.json").write_text(json.dumps(meta))
    assert len(_train_outputs(scene).metadata["points3D_xyz"]) > 1000  # auto: depth
    for frame in meta["frames"]:
        del frame["depth_file_path"]
    (scene / "transforms.json").write_text(json.dumps(meta))
    assert "points3D_xyz" not in _train_outputs(scene).metadata  # auto: nothing (random start)
    with pytest.raises(DatasetError, match="depth_file_path"):
        _train_outputs(scene, seed_points="depth")


@pytest.mark.skipif(not SCANNET.is_dir(), reason=f"real data not found at {SCANNET}")
def test_depth_seeds_on_scannet() -> None:
    outputs = _train_outputs(SCANNET, eval_interval=8)
    xyz = outputs.metadata["points3D_xyz"].numpy()
    assert 100_000 < len(xyz) < 1_000_000
    metres = 1.0 / outputs.dataparser_scale
    distance, _ = cKDTree(_labelled_points(outputs, SCANNET)).query(xyz)
    # The labelled points are ScanNet's mesh vertices, subsampled to 81k (a few cm apart).
    assert np.median(distance) * metres < 0.05 and np.percentile(distance, 90) * metres < 0.1
