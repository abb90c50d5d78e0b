"""Procedural scene collections (``splatsem_ns.data.procedural``): determinism, variety, ground truth, cameras,
the index, resuming, and the ``splatsem-synthetic --num-scenes`` command.

Scenes are tiny (8 views of 64 x 48) so the whole file runs in well under a minute on two cores. The geometric
checks read only what is written to disk and use their own projection code (OpenGL camera-to-world, pixel
centres at i + 0.5), so a convention error in the generator would show.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splatsem_ns.data.class_tables import NYU40
from splatsem_ns.data.collection import INDEX_FILE, CollectionError, SceneCollection, split_of
from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.procedural.generate import LOCK_FILE, CollectionConfig, generate_collection, scene_name
from splatsem_ns.data.procedural.primitives import cast_view
from splatsem_ns.data.procedural.scene import ProceduralSceneConfig, build_scene, write_scene

TINY = dict(num_views=8, width=64, height=48, num_seed_points=300, labeled_points_per_m2=60.0)
NUM_SCENES = 12


class _Quiet:
    """A console that records what the generator logs instead of printing it."""

    is_terminal = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, text, *args, **kwargs) -> None:
        self.lines.append(str(text))


def _config(num_scenes: int, workers: int = 1, seed: int = 0, **scene) -> CollectionConfig:
    return CollectionConfig(
        num_scenes=num_scenes, seed=seed, workers=workers, scene=ProceduralSceneConfig(**{**TINY, **scene})
    )


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _index_without_timing(path: Path) -> dict:
    record = json.loads((path / INDEX_FILE).read_text())
    record["statistics"].pop("timing")
    return record


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("procedural")
    start = time.perf_counter()
    generate_collection(out, _config(NUM_SCENES), console=_Quiet())
    return out, time.perf_counter() - start


def _load_views(root: Path) -> tuple[dict, list[dict]]:
    meta = json.loads((root / "transforms.json").read_text())
    views = []
    for frame in meta["frames"]:
        views.append(
            {
                "c2w": np.asarray(frame["transform_matrix"], dtype=np.float64),
                "depth": np.asarray(Image.open(root / frame["depth_file_path"])).astype(np.float64)
                * meta["depth_unit_scale_factor"],
                "labels": np.asarray(Image.open(root / frame["semantic_file_path"])).astype(np.int64),
                "instances": np.asarray(Image.open(root / frame["instance_file_path"])).astype(np.int64),
            }
        )
    return meta, views


def _backproject(meta: dict, c2w: np.ndarray, depth: np.ndarray) -> np.ndarray:
    h, w = depth.shape
    v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    cam = np.stack(
        [(u - meta["cx"]) / meta["fl_x"] * depth, -(v - meta["cy"]) / meta["fl_y"] * depth, -depth], axis=-1
    ).reshape(-1, 3)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def _project(meta: dict, c2w: np.ndarray, world: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cam = (world - c2w[:3, 3]) @ c2w[:3, :3]
    depth = -cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = meta["fl_x"] * cam[:, 0] / depth + meta["cx"]
        v = -meta["fl_y"] * cam[:, 1] / depth + meta["cy"]
    return u, v, depth


def overlap(meta: dict, a: dict, b: dict, tolerance: float = 0.03) -> float:
    """Fraction of view a's pixels whose back-projected point lands inside view b at b's own depth there (within
    ``tolerance`` relative): surfaces both views see."""
    world = _backproject(meta, a["c2w"], a["depth"])
    u, v, depth = _project(meta, b["c2w"], world)
    h, w = b["depth"].shape
    inside = np.isfinite(u) & (depth > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    col = np.clip(np.floor(np.where(inside, u, 0)).astype(int), 0, w - 1)
    row = np.clip(np.floor(np.where(inside, v, 0)).astype(int), 0, h - 1)
    consistent = np.abs(b["depth"][row, col] - depth) <= tolerance * depth + 0.01
    return float((inside & consistent).mean())


# ----------------------------------------------------------------------------------------------------


def test_generation_is_fast_enough(collection: tuple[Path, float]) -> None:
    _, seconds = collection
    assert seconds < 25, f"{NUM_SCENES} tiny scenes took {seconds:.1f} s"


def test_deterministic_and_independent_of_workers(collection: tuple[Path, float], tmp_path: Path) -> None:
    root, _ = collection
    parallel, serial = tmp_path / "parallel", tmp_path / "serial"
    generate_collection(parallel, _config(3, workers=2), console=_Quiet())
    generate_collection(serial, _config(3, workers=1), console=_Quiet())
    for index in range(3):
        name = scene_name(index)
        expected = _files(root / name)
        assert _files(parallel / name) == expected, f"{name} differs with 2 workers"
        assert _files(serial / name) == expected
    # Same arguments, same index (the timing of the run aside: it is the one thing measured, not generated).
    assert _index_without_timing(parallel) == _index_without_timing(serial)
    assert json.loads((parallel / INDEX_FILE).read_text())["statistics"]["timing"]["workers"] == 2
    # Another seed gives other scenes.
    other = tmp_path / "other"
    generate_collection(other, _config(1, seed=1), console=_Quiet())
    assert _files(other / scene_name(0))["transforms.json"] != expected["transforms.json"]


def test_variety(collection: tuple[Path, float]) -> None:
    root, _ = collection
    index = SceneCollection.load(root)
    stats = [entry.stats for entry in index.scenes]
    shapes = {s["room_shape"] for s in stats}
    assert shapes == {"rectangle", "l_shape", "two_rooms"}
    assert len({t for s in stats for t in s["room_types"]}) >= 4
    assert len({s["num_objects"] for s in stats}) >= 5
    classes = {name for s in stats for name in s["instances_per_class"]}
    assert len(classes) >= 25, sorted(classes)
    visible = {name for s in stats for name in s["visible_classes"]}
    assert len(visible) >= 15, sorted(visible)
    assert sum(s["rotated_instances"] > 0 for s in stats) >= NUM_SCENES // 2
    assert len({p for s in stats for p in s["photo_textures"]}) >= 4
    # Composite objects: a bed is several primitives (frame, mattress, headboard) and its pillows are their own
    # instances; every scene has dozens of primitives.
    assert all(s["num_primitives"] >= 20 for s in stats)
    assert any(s["instances_per_class"].get("pillow", 0) >= 2 for s in stats)


def test_every_scene_passes_the_dataparser(collection: tuple[Path, float]) -> None:
    from splatsem_ns.data.dataparser import (
        LABELED_POINTS_KEY,
        SEMANTIC_FILENAMES_KEY,
        SplatsemDataParserConfig,
    )

    root, _ = collection
    for entry in SceneCollection.load(root).scenes:
        parser = SplatsemDataParserConfig(data=root / entry.path).setup()
        assert parser.config.validate_images
        outputs = parser.get_dataparser_outputs("train")
        assert len(outputs.image_filenames) >= 6
        assert len(outputs.metadata[SEMANTIC_FILENAMES_KEY]) == len(outputs.image_filenames)
        assert outputs.metadata[LABELED_POINTS_KEY].is_file()
        assert outputs.metadata["class_names"] == NYU40


def test_files_and_labels(collection: tuple[Path, float]) -> None:
    root, _ = collection
    for entry in SceneCollection.load(root).scenes[:4]:
        scene = root / entry.path
        meta, views = _load_views(scene)
        assert meta["depth_unit_scale_factor"] == 0.001
        assert (
            meta["labeled_ply_file_path"] == "points_labeled.ply"
            and meta["classes_file_path"] == "classes.json"
        )
        assert json.loads((scene / "classes.json").read_text()) == {str(k): v for k, v in NYU40.items()}
        cloud = read_point_cloud(scene / "points_labeled.ply")
        seeds = read_point_cloud(scene / "points3D.ply")
        assert len(seeds) == TINY["num_seed_points"] and seeds.labels is None
        point_instances = set(np.unique(cloud.instance_ids).tolist())
        instance_class = {}
        for view in views:
            assert (view["labels"] > 0).all() and (view["instances"] > 0).all()  # every pixel labelled
            assert view["depth"].min() > 0.1
            for instance, label in zip(view["instances"].ravel(), view["labels"].ravel(), strict=True):
                assert instance_class.setdefault(int(instance), int(label)) == int(label)
        assert set(instance_class) <= point_instances
        for instance in point_instances:  # every instance is one class, in points too
            assert len(np.unique(cloud.labels[cloud.instance_ids == instance])) == 1


def test_floor_ceiling_and_walls_face_the_way_their_names_say(collection: tuple[Path, float]) -> None:
    # z is up: a room's floor points lie on its lowest plane, its ceiling on its highest, and its walls stand
    # upright; the points of those planes carry those labels (furniture standing on the floor aside).
    root, _ = collection
    ids = {name: class_id for class_id, name in NYU40.items()}
    for entry in SceneCollection.load(root).scenes[:4]:
        cloud = read_point_cloud(root / entry.path / "points_labeled.ply")
        xyz, labels = cloud.xyz, cloud.labels
        low, high = xyz[:, 2].min(), xyz[:, 2].max()
        floor, ceiling, wall = (xyz[labels == ids[name]] for name in ("floor", "ceiling", "wall"))
        assert len(floor) and len(ceiling) and len(wall)
        assert np.abs(floor[:, 2] - low).max() < 0.01 and np.abs(ceiling[:, 2] - high).max() < 0.01
        assert np.ptp(wall[:, 2]) > 0.9 * (high - low)  # from floor to ceiling
        on_floor = labels[np.abs(xyz[:, 2] - low) < 0.005]
        assert np.mean(on_floor == ids["floor"]) > 0.9, entry.path


def test_depth_lies_on_the_labelled_surfaces(tmp_path: Path) -> None:
    """Back-projected depth lands on the labelled point cloud, on points of the pixel's class and instance."""
    from scipy.spatial import cKDTree

    config = ProceduralSceneConfig(**{**TINY, "labeled_points_per_m2": 2500.0, "num_views": 4})
    for index in (0, 1):
        write_scene(tmp_path / str(index), config, seed=3, index=index)
        meta, views = _load_views(tmp_path / str(index))
        cloud = read_point_cloud(tmp_path / str(index) / "points_labeled.ply")
        tree = cKDTree(cloud.xyz)
        for view in views:
            world = _backproject(meta, view["c2w"], view["depth"])
            distance, nearest = tree.query(world)
            close = distance < 0.03
            assert close.mean() > 0.85, f"only {close.mean():.2f} of the pixels lie on a labelled surface"
            same_label = cloud.labels[nearest[close]] == view["labels"].ravel()[close]
            same_instance = cloud.instance_ids[nearest[close]] == view["instances"].ravel()[close]
            assert same_label.mean() > 0.93 and same_instance.mean() > 0.9, (
                same_label.mean(),
                same_instance.mean(),
            )


def test_labelled_points_seen_only_keeps_what_the_views_see(tmp_path: Path) -> None:
    """``labeled_points_seen_only`` keeps exactly the labelled points some view sees (as a scan's reconstruction):
    the same samples as the full cloud, less the unseen ones, and every depth pixel still lands on a kept point."""
    from scipy.spatial import cKDTree

    from splatsem_ns.data.view_sampling import views_seeing

    base = {**TINY, "labeled_points_per_m2": 1000.0, "num_views": 4}
    full_dir, seen_dir = tmp_path / "full", tmp_path / "seen"
    write_scene(full_dir, ProceduralSceneConfig(**base), seed=3, index=0)
    write_scene(seen_dir, ProceduralSceneConfig(**base, labeled_points_seen_only=True), seed=3, index=0)
    full = read_point_cloud(full_dir / "points_labeled.ply")
    seen = read_point_cloud(seen_dir / "points_labeled.ply")
    meta, views = _load_views(seen_dir)
    intrinsics = np.array([[meta["fl_x"], 0, meta["cx"]], [0, meta["fl_y"], meta["cy"]], [0, 0, 1.0]])
    cameras = [(intrinsics, view["c2w"], view["depth"]) for view in views]
    # The same samples (the filter draws nothing from the scene's random stream), the unseen ones left out. Read
    # back from the files (depth in whole millimetres, points in float32), a point on the tolerance's edge may flip.
    distance, index = cKDTree(full.xyz).query(seen.xyz)
    assert distance.max() < 1e-5 and len(np.unique(index)) == len(index)  # a subset of the full cloud
    assert np.array_equal(seen.labels, full.labels[index])
    kept = np.zeros(len(full.xyz), dtype=bool)
    kept[index] = True
    assert 0.1 < kept.mean() < 0.9, kept.mean()  # 4 views of a room see part of it
    seen_here = views_seeing(full.xyz, cameras) > 0
    assert (seen_here != kept).mean() < 1e-3, (seen_here != kept).sum()
    # What a view shows is still covered: its back-projected depth lands on kept points of the pixel's class.
    tree = cKDTree(seen.xyz)
    for view in views:
        distance, nearest = tree.query(_backproject(meta, view["c2w"], view["depth"]))
        close = distance < 0.05
        assert close.mean() > 0.85, close.mean()
        assert (seen.labels[nearest[close]] == view["labels"].ravel()[close]).mean() > 0.9
    record = json.loads((seen_dir / "transforms.json").read_text())["procedural_scene"]["generator"]
    assert record["settings"]["labeled_points_seen_only"] is True


def _footprint(placed) -> np.ndarray:
    """World corners [4, 2] of a placed model's footprint rectangle."""
    lo, hi = placed.model.bounds()
    local = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    c, s = np.cos(placed.yaw), np.sin(placed.yaw)
    return placed.position + local @ np.array([[c, s], [-s, c]])


def _rectangles_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Separating-axis test of two convex quadrilaterals."""
    for quad in (a, b):
        for k in range(4):
            edge = quad[(k + 1) % 4] - quad[k]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() <= pb.min() or pb.max() <= pa.min():
                return False
    return True


def test_furniture_stands_apart_inside_the_walls() -> None:
    from splatsem_ns.data.procedural.layout import LayoutConfig, make_layout
    from splatsem_ns.data.procedural.scene import scene_rng

    rotated = 0
    for index in range(20):
        layout = make_layout(scene_rng(0, index, 0), LayoutConfig())
        plan = layout.plan
        floor = [p for p in layout.placed if p.where in ("wall", "free")]
        rects = [_footprint(p) for p in floor]
        for i in range(len(rects)):
            corners = rects[i]
            assert (corners >= plan.lo[:2]).all() and (corners <= plan.hi[:2]).all(), floor[i].model.name
            for block in plan.blocks:
                if block.lo[2] <= 0:
                    block_quad = np.array([[block.lo[0], block.lo[1]], [block.hi[0], block.lo[1]],
                                           [block.hi[0], block.hi[1]], [block.lo[0], block.hi[1]]])  # fmt: skip
                    assert not _rectangles_overlap(corners, block_quad), floor[i].model.name
            for j in range(i):
                assert not _rectangles_overlap(rects[i], rects[j]), (floor[i].model.name, floor[j].model.name)
        rotated += sum(abs(np.degrees(p.yaw) % 90 - 45) < 40 for p in floor if p.where == "free")
    assert rotated >= 5  # free-standing furniture at arbitrary angles


def test_screen_space_culling_changes_nothing() -> None:
    config = ProceduralSceneConfig(**{**TINY, "num_views": 6, "width": 96, "height": 72})
    scene = build_scene(config, seed=0, index=5)
    for c2w in scene.path.poses:
        culled = cast_view(scene.room, scene.solids, c2w, config.pinhole(), tile=8)
        full = cast_view(scene.room, scene.solids, c2w, config.pinhole(), cull=False)
        np.testing.assert_array_equal(culled.depth, full.depth)
        np.testing.assert_array_equal(culled.primitive, full.primitive)
        assert culled.tested_pairs < full.tested_pairs


def test_neighbouring_views_overlap(collection: tuple[Path, float]) -> None:
    root, _ = collection
    next_view, four_apart, steps, turns, near = [], [], [], [], []
    for entry in SceneCollection.load(root).scenes:
        meta, views = _load_views(root / entry.path)
        for k in range(len(views) - 1):
            next_view.append(overlap(meta, views[k], views[k + 1]))
            a, b = views[k]["c2w"], views[k + 1]["c2w"]
            steps.append(np.linalg.norm(a[:3, 3] - b[:3, 3]))
            turns.append(np.degrees(np.arccos(np.clip(a[:3, 2] @ b[:3, 2], -1, 1))))
        four_apart += [overlap(meta, views[k], views[k + 4]) for k in range(len(views) - 4)]
        near += [np.percentile(v["depth"], 20) for v in views]
        heights = [v["c2w"][2, 3] for v in views]
        assert 1.2 - 1e-6 <= min(heights) and max(heights) <= 1.7 + 1e-6
        pitches = [np.degrees(np.arcsin(-v["c2w"][2, 2])) for v in views]
        assert -30 - 1e-6 <= min(pitches) and max(pitches) <= 10 + 1e-6
    assert np.median(next_view) >= 0.5, np.median(next_view)
    assert np.median(four_apart) >= 0.15, np.median(four_apart)
    assert np.mean(np.array(four_apart) > 0.02) > 0.8
    assert 0.15 <= np.median(steps) <= 0.4 and np.max(steps) <= 0.45
    assert 3 <= np.median(turns) <= 20
    # No view is a close-up of a wall: 80% of a view lies more than 0.8 m away in almost every view, and more
    # than 25 cm in all (cameras keep 0.3 m from walls and furniture; in small bathrooms a curtain or a door
    # can still fill the side of a view).
    assert np.mean(np.array(near) > 0.8) > 0.9 and min(near) > 0.25, (
        np.mean(np.array(near) > 0.8),
        min(near),
    )


def test_index_and_stable_splits(collection: tuple[Path, float], tmp_path: Path) -> None:
    root, _ = collection
    index = SceneCollection.load(root)
    names = [s.name for s in index.scenes]
    assert names == [scene_name(i) for i in range(NUM_SCENES)]
    for entry in index.scenes:
        assert entry.split == split_of(entry.name, 0.05, 0.05)
        assert entry.source == "procedural" and entry.has_depth and entry.has_labels and entry.has_instances
        assert entry.image_size == (TINY["height"], TINY["width"]) and entry.num_views == TINY["num_views"]
        assert (index.scene_path(entry) / "transforms.json").is_file()
    assert index.classes == NYU40
    stats = index.statistics
    assert stats["generator"]["seed"] == 0 and stats["generator"]["num_scenes"] == NUM_SCENES
    assert sum(stats["room_shapes"].values()) == NUM_SCENES
    assert stats["objects_per_scene"]["min"] <= stats["objects_per_scene"]["max"]
    assert sum(c["pixels"] for c in stats["classes"].values()) == NUM_SCENES * TINY["num_views"] * 48 * 64
    assert stats["timing"]["scenes_generated"] == NUM_SCENES

    # Growing a collection keeps the scenes (and their splits) it had.
    grow = tmp_path / "grow"
    generate_collection(grow, _config(2), console=_Quiet())
    before = {scene_name(i): (grow / scene_name(i) / "transforms.json").stat().st_mtime_ns for i in range(2)}
    first = SceneCollection.load(grow).scenes
    generate_collection(grow, _config(4), console=_Quiet())
    grown = SceneCollection.load(grow).scenes
    assert [s.name for s in grown] == [scene_name(i) for i in range(4)]
    assert [s.to_record() for s in grown[:2]] == [s.to_record() for s in first]
    assert {n: (grow / n / "transforms.json").stat().st_mtime_ns for n in before} == before


def test_resume_after_interruption(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    generate_collection(out, _config(3), console=_Quiet())
    kept = {scene_name(i): (out / scene_name(i) / "transforms.json").stat().st_mtime_ns for i in (0, 2)}
    complete = _files(out / scene_name(1))
    # An interrupted run: one scene never finished, a partial folder left behind, no index.
    for path in sorted((out / scene_name(1)).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (out / scene_name(1)).rmdir()
    partial = out / f".{scene_name(1)}.partial-0123456789abcdef"
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "0000.png").write_bytes(b"half a PNG")
    (out / INDEX_FILE).unlink()

    # A generator still running in the folder is not disturbed; the lock of a killed one is taken over.
    lock = out / LOCK_FILE
    lock.write_text(f"{os.getppid()}\n")
    with pytest.raises(CollectionError, match="being generated"):
        generate_collection(out, _config(3), console=_Quiet())
    assert partial.exists()
    lock.write_text("999999999\n")

    console = _Quiet()
    generate_collection(out, _config(3), console=console)
    assert not partial.exists() and not lock.exists()
    assert any("partial" in line for line in console.lines)
    assert {n: (out / n / "transforms.json").stat().st_mtime_ns for n in kept} == kept  # not regenerated
    assert _files(out / scene_name(1)) == complete
    index = SceneCollection.load(out)
    assert [s.name for s in index.scenes] == [scene_name(i) for i in range(3)]
    assert index.statistics["timing"]["scenes_generated"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # Finished scenes of other settings are not silently mixed in; --overwrite regenerates them.
    with pytest.raises(CollectionError, match="other settings"):
        generate_collection(out, _config(3, seed=7), console=_Quiet())
    config = _config(3, seed=7)
    config.overwrite = True
    generate_collection(out, config, console=_Quiet())
    assert _files(out / scene_name(1)) != complete
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene, main

    out = tmp_path / "collection"
    args = ["--num-views", "4", "--width", "32", "--height", "24", "--num-seed-points", "100"]
    monkeypatch.setattr(
        sys, "argv", ["splatsem-synthetic", "--out", str(out), "--num-scenes", "2", "--workers", "1", *args]
    )
    main()
    index = SceneCollection.load(out)
    assert (
        len(index.scenes) == 2 and index.scenes[0].image_size == (24, 32) and index.scenes[0].num_views == 4
    )
    assert index.statistics["generator"]["settings"]["supersample"] == 1

    monkeypatch.setattr(
        sys,
        "argv",
        ["splatsem-synthetic", "--out", str(out), "--num-scenes", "2", "--room-size", "5", "4", "3"],
    )
    with pytest.raises(SystemExit, match="room-size"):
        main()

    # Without --num-scenes: the single demo room, byte for byte what generate_synthetic_scene writes.
    single = tmp_path / "single"
    monkeypatch.setattr(sys, "argv", ["splatsem-synthetic", "--out", str(single), "--seed", "3", *args])
    main()
    reference = tmp_path / "reference"
    generate_synthetic_scene(
        reference, SyntheticSceneConfig(seed=3, num_views=4, width=32, height=24, num_seed_points=100)
    )
    assert _files(single) == _files(reference)
    assert json.loads((single / "transforms.json").read_text())["synthetic_scene_config"]["supersample"] == 2


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_default_workers_is_the_cpu_count() -> None:
    from splatsem_ns.data.procedural.generate import default_workers

    assert default_workers() == len(os.sched_getaffinity(0))
