"""Cross-view consistency of teachers: segmenting a view's features, finding the regions other views contradict,
and the distillation loss ignoring them."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from support import tiny_chorus_model

from splatsem_ns.data.datamanager import ChorusDataManager
from splatsem_ns.evaluation.voting import ViewLabels
from splatsem_ns.teachers.consistency import ConsistencyConfig, consistency_weights, segment_view

SIZE = 40  # image edge, pixels
GRID = 8  # feature grid edge, cells
PLANE = 2.0  # depth of the wall every camera faces


def _basis(index: int, dim: int = 8) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(index), dim).float()


def _views(offsets=(-0.2, 0.0, 0.2)) -> list:
    """Cameras side by side (x = offset) facing a wall at z = -PLANE (nerfstudio: looking down -z)."""
    K = np.array([[SIZE, 0, SIZE / 2], [0, SIZE, SIZE / 2], [0, 0, 1]], dtype=np.float64)
    views = []
    for x in offsets:
        pose = np.eye(4)[:3]
        pose[0, 3] = x
        views.append(
            ViewLabels(
                labels=np.zeros((1, 1), dtype=np.int64),
                K=K,
                camera_to_world=pose,
                image_size=(SIZE, SIZE),
                depth=np.full((SIZE, SIZE), PLANE, dtype=np.float32),
            )
        )
    return views


def _wall_features(view: ViewLabels, left: int = 0, right: int = 1) -> torch.Tensor:
    """What a perfect teacher sees: feature ``left`` where the wall's world x < 0, ``right`` elsewhere. [h, w, 8]"""
    cols = (np.arange(GRID) + 0.5) * (SIZE / GRID)
    world_x = (cols - SIZE / 2) / SIZE * PLANE + view.camera_to_world[0, 3]
    row = torch.stack([_basis(left) if x < 0 else _basis(right) for x in world_x])
    return row[None].expand(GRID, GRID, -1).clone()


def test_segment_view_separates_distinct_features_deterministically():
    features = torch.zeros(4, 6, 8)
    features[:, :3] = _basis(0)
    features[:, 3:] = _basis(1) + 0.01 * torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    segments, centroids = segment_view(features, segments=2)
    assert segments.shape == (4, 6) and centroids.shape == (2, 8)
    assert len(segments[:, :3].unique()) == 1 and len(segments[:, 3:].unique()) == 1
    assert segments[0, 0] != segments[0, 5]
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(2))
    again, _ = segment_view(features, segments=2)
    assert torch.equal(segments, again)
    # More segments than cells: one per cell at most.
    assert segment_view(features[:1, :1], segments=5)[1].shape == (1, 8)


def test_consistent_views_keep_every_cell():
    views = _views()
    weights = consistency_weights([_wall_features(v) for v in views], views, ConsistencyConfig(), 0.05)
    assert len(weights) == 3
    for w in weights:
        assert w.shape == (GRID, GRID) and w.dtype == np.float32
        np.testing.assert_array_equal(w, 1.0)


def test_a_region_the_other_views_contradict_gets_weight_zero():
    views = _views()
    features = [_wall_features(v) for v in views]
    features[1] = _wall_features(
        views[1], left=2
    )  # the middle view mistakes the left half for something else
    weights = consistency_weights(features, views, ConsistencyConfig(), 0.05)
    confused = features[1][..., 2] > 0
    assert confused.any() and (~confused).any()
    np.testing.assert_array_equal(weights[1][confused.numpy()], 0.0)
    np.testing.assert_array_equal(weights[1][~confused.numpy()], 1.0)
    # The views it contradicts are outvoted by each other, not dropped.
    np.testing.assert_array_equal(weights[0], 1.0)
    np.testing.assert_array_equal(weights[2], 1.0)


def test_a_view_nobody_else_sees_is_kept_and_a_similar_feature_agrees():
    views = _views()
    features = [_wall_features(v) for v in views]
    far = _views((50.0,))[0]  # sees a part of the wall no other view sees
    weights = consistency_weights(
        features + [_wall_features(far, left=3, right=3)], views + [far], ConsistencyConfig(), 0.05
    )
    np.testing.assert_array_equal(weights[3], 1.0)
    # A feature within the margin of the others' (cosine 0.99) is the same content, not a contradiction.
    near = 0.99 * _basis(0) + (1 - 0.99**2) ** 0.5 * _basis(4)
    features[1] = torch.where(features[1][..., :1] > 0, near, features[1])
    weights = consistency_weights(features, views, ConsistencyConfig(), 0.05)
    np.testing.assert_array_equal(weights[1], 1.0)


def test_depth_is_required_and_counts_must_match():
    views = _views()
    features = [_wall_features(v) for v in views]
    with pytest.raises(ValueError, match="feature maps for"):
        consistency_weights(features[:2], views, ConsistencyConfig(), 0.05)
    views[0].depth = None
    with pytest.raises(ValueError, match="needs a depth image"):
        consistency_weights(features, views, ConsistencyConfig(), 0.05)


@pytest.mark.parametrize("distill_at", ["teacher", "render"])
def test_distillation_ignores_cells_of_weight_zero(distill_at):
    model = tiny_chorus_model(distill_at=distill_at, distill_pixels=0)
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(8, 8, 32, generator=generator).requires_grad_()
    targets = {"sam": torch.randn(8, 8, 16, generator=generator).half()}
    plain = model.distillation_losses(latent, targets)["distill_sam"]
    ones = model.distillation_losses(latent, targets, target_weights={"sam": torch.ones(8, 8)})["distill_sam"]
    torch.testing.assert_close(ones, plain)
    zeros = model.distillation_losses(latent, targets, target_weights={"sam": torch.zeros(8, 8)})[
        "distill_sam"
    ]
    assert float(zeros.detach()) == 0.0
    # Half the cells dropped: no gradient reaches the rendered pixels there.
    kept = torch.ones(8, 8)
    kept[:, :4] = 0
    latent.grad = None
    model.distillation_losses(latent, targets, target_weights={"sam": kept})["distill_sam"].backward()
    assert latent.grad[:, :3].abs().max() == 0 and latent.grad[:, 5:].abs().max() > 0


def test_datamanager_serves_each_views_weights():
    maps = [np.full((2, 3), i, dtype=np.float16) for i in range(2)]
    manager = types.SimpleNamespace(_weights={"t": maps}, device="cpu")
    manager._to_device = lambda host: ChorusDataManager._to_device(manager, host)
    served = ChorusDataManager.teacher_weights(manager, 1)["t"]
    assert served.dtype == torch.float16 and served.shape == (2, 3) and float(served[0, 0]) == 1.0
    assert ChorusDataManager.teacher_weights(types.SimpleNamespace(_weights={}), 0) == {}


def _synthetic_manager(root, enabled: bool = True, num_views: int = 10):
    """The datamanager of a synthetic room distilling the labels proxy teacher (the room has depth)."""
    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    config = SyntheticSceneConfig(num_views=num_views, width=48, height=36)
    generate_synthetic_scene(root / "scene", config)
    return _scene_manager(root, enabled=enabled)


def _scene_manager(root, **consistency):
    """The datamanager of the room ``_synthetic_manager`` generated under ``root``, with these consistency
    settings, its feature cache in ``root/cache``."""
    import warnings

    from splatsem_ns.data.datamanager import ChorusDataManagerConfig
    from splatsem_ns.teachers.consistency_cache import ConsistencyCacheWarning

    cfg = ChorusDataManagerConfig(
        data=root / "scene", teachers=("labels",), feature_cache_dir=root / "cache", eval_image_indices=None
    )
    for name, value in consistency.items():
        setattr(cfg.teacher_consistency, name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter(
            "always", ConsistencyCacheWarning
        )  # the tests of the stored weights look for it
        return cfg.setup(device="cpu", test_mode="val")


@pytest.mark.parametrize("enabled", [True, False])
def test_training_batches_carry_the_weights_where_the_scene_has_depth(tmp_path, enabled):
    manager = _synthetic_manager(tmp_path, enabled)
    _, batch = manager.next_train(0)
    if not enabled:
        assert "teacher_weights" not in batch
        return
    weights, features = batch["teacher_weights"]["labels"], batch["teacher_features"]["labels"]
    assert weights.shape == features.shape[:2] and set(weights.unique().tolist()) <= {0.0, 1.0}
    # The proxy's per-view confusions give the check something to find, and most cells stay.
    dropped = np.mean(
        [
            1.0 - float(manager.teacher_weights(i)["labels"].float().mean())
            for i in range(len(manager.train_dataset))
        ]
    )
    assert 0.0 < dropped < 0.5


def test_the_cells_dropped_are_mostly_the_proxy_teachers_mistakes(tmp_path):
    """On the synthetic room, a dropped cell of the labels proxy is far more often wrong than a kept one."""
    from splatsem_ns.data.dataparser import CLASS_NAMES_KEY
    from splatsem_ns.evaluation.protocol import classify_map
    from splatsem_ns.teachers.registry import make_teacher_config

    manager = _synthetic_manager(tmp_path, num_views=24)
    teacher = manager.build_teacher(make_teacher_config("labels"))
    metadata = manager.scene_metadata()
    teacher.prepare_scene(manager.scene_views(), metadata)
    classes = dict(metadata[CLASS_NAMES_KEY])
    ids = sorted(classes)
    text = teacher.encode_text([classes[i] for i in ids])
    wrong = {True: 0, False: 0}
    cells = {True: 0, False: 0}
    for i, truth in enumerate(teacher.label_maps(split="train")):
        features = torch.from_numpy(np.asarray(manager._features["labels"][i])).float()
        h, w = features.shape[:2]
        rows = ((np.arange(h) + 0.5) * truth.shape[0] / h).astype(int)
        cols = ((np.arange(w) + 0.5) * truth.shape[1] / w).astype(int)
        truth = truth.numpy()[np.ix_(rows, cols)]
        mistaken = classify_map(features, text, ids).numpy() != truth
        dropped = manager.teacher_weights(i)["labels"].numpy() == 0
        for side in (True, False):
            where = (dropped == side) & (truth > 0)
            wrong[side] += int(mistaken[where].sum())
            cells[side] += int(where.sum())
    assert cells[True] > 0 and cells[False] > 0
    dropped_error, kept_error = wrong[True] / cells[True], wrong[False] / cells[False]
    print(f"teacher error: {dropped_error:.2f} on dropped cells, {kept_error:.2f} on kept ones")
    assert dropped_error > 3 * kept_error, (dropped_error, kept_error)


def test_start_up_says_which_step_runs_in_a_redirected_log(tmp_path, capsys):
    """Each step of start-up announces itself, and the consistency check logs its progress as plain lines (under
    pytest, as in `ns-train ... > log`, stdout is not a terminal and rich draws no bar)."""
    _synthetic_manager(tmp_path, num_views=10)
    out = " ".join(capsys.readouterr().out.split())
    steps = [
        "Start-up: checking the scene and loading its images...",
        "Start-up: teacher features (labels)...",
        "Teacher features: labels: 9 images to do",
        "Start-up: cross-view consistency check of the teachers' features...",
        "Cross-view consistency: labels: 9 views to do",
        "Cross-view consistency: labels: 9 views done in",
        "Start-up: data ready in",
    ]
    positions = [out.find(step) for step in steps]
    assert all(p >= 0 for p in positions), [s for s, p in zip(steps, positions, strict=True) if p < 0]
    assert positions == sorted(positions)


def test_large_captures_check_each_view_against_its_nearest_cameras_only(monkeypatch):
    """Past ``all_pairs_up_to`` views, each view is projected into its ``nearest_views`` nearest cameras looking the
    same way, not into every other view; below it, into all of them."""
    import splatsem_ns.teachers.consistency as consistency
    from splatsem_ns.teachers.consistency import checked_pairs

    offsets = [0.01 * i for i in range(12)]
    views = _views(offsets)
    turned = views[11].camera_to_world.copy()
    turned[:, :3] = np.diag([-1.0, 1.0, -1.0])  # the last camera looks the other way (+z)
    views[11].camera_to_world = turned
    few = ConsistencyConfig(all_pairs_up_to=20, nearest_views=3)
    assert checked_pairs(views, few)[0] == list(range(1, 12))
    many = ConsistencyConfig(all_pairs_up_to=5, nearest_views=3)
    pairs = checked_pairs(views, many)
    assert pairs[0] == [1, 2, 3]
    assert set(pairs[5][:2]) == {4, 6} and pairs[5][2] in (3, 7)  # 0.01 away, then one 0.02 away
    assert all(11 not in p for p in pairs[:10])  # it looks away: last in everyone's order

    projected = []
    original = consistency.visible_cells

    def counting(points, other, *args):
        projected.append(id(other))
        return original(points, other, *args)

    monkeypatch.setattr(consistency, "visible_cells", counting)
    consistency_weights([_wall_features(v) for v in views], views, many, depth_tolerance=0.05)
    assert len(projected) == 12 * 3


def test_the_key_covers_every_input_of_the_check():
    """The stored weights' key changes with the features, a depth image, a camera's pose or intrinsics, a setting
    of the check or the tolerance, and is the same for the same inputs."""
    import copy
    import dataclasses

    from splatsem_ns.teachers.consistency_cache import consistency_key, views_digest

    views = _views()
    features = [_wall_features(v) for v in views]
    config = ConsistencyConfig()

    def key(features=features, views=views, config=config, tolerance=0.1):
        return consistency_key(features, views_digest(views, config, tolerance))

    assert key() == key([f.clone() for f in features], copy.deepcopy(views), ConsistencyConfig())

    def changed_view(index: int, **fields):
        changed = copy.deepcopy(views)
        changed[index] = dataclasses.replace(changed[index], **fields)
        return changed

    moved = views[1].camera_to_world.copy()
    moved[0, 3] += 1e-6
    deeper = views[2].depth.copy()
    deeper[5, 5] += 0.01
    other_features = [f.clone() for f in features]
    other_features[0][3, 3, 0] += 1e-3
    variants = [
        key(features=other_features),
        key(views=changed_view(1, camera_to_world=moved)),
        key(views=changed_view(0, K=views[0].K * 1.01)),
        key(views=changed_view(2, depth=deeper)),
        key(views=changed_view(0, image_size=(SIZE, SIZE + 1))),
        key(config=ConsistencyConfig(segments=7)),
        key(tolerance=0.2),
    ]
    assert key() not in variants and len(set(variants)) == len(variants)


def _count_checks(monkeypatch) -> list:
    import splatsem_ns.data.datamanager as datamanager

    calls = []
    real = datamanager.consistency_weights

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(datamanager, "consistency_weights", counted)
    return calls


def test_a_second_start_up_reads_the_weights_an_earlier_run_stored(tmp_path, monkeypatch, capsys):
    """The check runs at the first start-up and is stored beside the features; the next start-up of the same
    scene serves the same weights without running it. A changed setting of the check runs it again."""
    checks = _count_checks(monkeypatch)
    first = _synthetic_manager(tmp_path)
    assert len(checks) == 1
    capsys.readouterr()
    second = _scene_manager(tmp_path)
    assert len(checks) == 1, "the second start-up ran the check again"
    assert "(stored by an earlier run)" in " ".join(capsys.readouterr().out.split())
    for a, b in zip(first._weights["labels"], second._weights["labels"], strict=True):
        assert a.dtype == b.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "cache" / "consistency-1").is_dir()
    _scene_manager(tmp_path, min_agreement=0.5)
    assert len(checks) == 2, "a changed setting must run the check again"


def test_a_damaged_stored_result_is_reported_and_computed_again(tmp_path, monkeypatch):
    from splatsem_ns.teachers.consistency_cache import ConsistencyCacheWarning

    checks = _count_checks(monkeypatch)
    first = _synthetic_manager(tmp_path)
    (stored,) = (tmp_path / "cache" / "consistency-1").glob("labels-*.npz")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a member: its CRC no longer matches
    stored.write_bytes(bytes(data))
    with pytest.warns(ConsistencyCacheWarning, match="not used"):
        second = _scene_manager(tmp_path)
    assert len(checks) == 2
    for a, b in zip(first._weights["labels"], second._weights["labels"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_stored_maps_that_do_not_fit_the_views_are_not_used(tmp_path):
    from splatsem_ns.teachers.consistency_cache import ConsistencyCache, ConsistencyCacheWarning

    cache = ConsistencyCache(tmp_path)
    cache.save("t", "k", [np.ones((2, 3), np.float16)] * 2)
    assert [m.shape for m in cache.load("t", "k", [(2, 3), (2, 3)])] == [(2, 3), (2, 3)]
    assert cache.load("t", "other", [(2, 3)]) is None  # nothing stored: no warning
    for grids, problem in [
        ([(2, 3)] * 3, "unreadable"),
        ([(2, 3)], "2 maps for 1 views"),
        ([(3, 2)] * 2, "view 0"),
    ]:
        with pytest.warns(ConsistencyCacheWarning, match=problem):
            assert cache.load("t", "k", grids) is None
    cache.save("t", "bad", [np.full((2, 3), 2.0, np.float16)])
    with pytest.warns(ConsistencyCacheWarning, match="outside"):
        assert cache.load("t", "bad", [(2, 3)]) is None


def test_a_cache_that_refuses_the_write_costs_only_the_speed_up(tmp_path, monkeypatch, capsys):
    import splatsem_ns.teachers.consistency_cache as consistency_cache

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(consistency_cache, "write_atomically", refuse)
    manager = _synthetic_manager(tmp_path)
    assert len(manager._weights["labels"]) == len(manager.train_dataset)
    assert "Could not store the consistency weights" in " ".join(capsys.readouterr().out.split())
