"""Label transfer baselines: text classification, k-NN votes, projection and back-projection."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from support import SCANNET

from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.data.synthetic import (
    CLASS_NAMES,
    SyntheticSceneConfig,
    generate_synthetic_scene,
    look_at_opengl,
)
from splatsem_ns.evaluation import (
    ConfusionMatrix,
    ViewLabels,
    backproject_mean,
    backproject_vote,
    classify_by_text,
    knn_vote,
    project_points,
    remap_labels,
    segmentation_scores,
)

SCANNET_POINTS = SCANNET / "points_labeled.ply"


# ----------------------------------------------------------------------------------------------------
# classify_by_text


def test_classify_by_text_uses_cosine_similarity() -> None:
    # A long text embedding wins the raw dot product but not the cosine.
    text = np.array([[10.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    features = np.array([[0.6, 0.8], [5.0, 0.1], [-0.1, 0.0], [0.0, 3.0]])
    np.testing.assert_array_equal(classify_by_text(features, text), [1, 0, 2, 1])
    np.testing.assert_array_equal(classify_by_text(features, text, labels=[4, 7, 9]), [7, 4, 9, 7])


def test_classify_by_text_recovers_noisy_class_embeddings() -> None:
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(20, 32, generator=gen)
    truth = torch.randint(0, 20, (500,), generator=gen)
    scale = torch.rand(500, 1, generator=gen) * 5 + 0.1  # feature norms must not matter
    features = scale * (
        torch.nn.functional.normalize(text, dim=-1)[truth] + 0.05 * torch.randn(500, 32, generator=gen)
    )
    pred = classify_by_text(features, text)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.int64
    torch.testing.assert_close(pred, truth)


def test_classify_by_text_chunking_and_dtypes_agree() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1000, 16)).astype(np.float32)
    text = rng.normal(size=(37, 16))
    full = classify_by_text(features, text)
    assert isinstance(full, np.ndarray) and full.dtype == np.int64 and full.shape == (1000,)
    np.testing.assert_array_equal(classify_by_text(features, text, chunk_size=7), full)
    np.testing.assert_array_equal(classify_by_text(features, text, chunk_size=1000), full)
    half = classify_by_text(torch.from_numpy(features).half(), torch.from_numpy(text), chunk_size=64)
    # Half-precision features round slightly; nearly every argmax must survive.
    assert (half.numpy() == full).mean() > 0.98


def test_classify_by_text_errors() -> None:
    with pytest.raises(ValueError, match="8 channels but text embeddings have 4"):
        classify_by_text(np.zeros((3, 8)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="3 labels for 2 text embeddings"):
        classify_by_text(np.zeros((3, 4)), np.ones((2, 4)), labels=[1, 2, 3])


# ----------------------------------------------------------------------------------------------------
# knn_vote


def _brute_force_knn_vote(src: np.ndarray, labels: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    out = []
    for q in query:
        order = np.argsort(np.linalg.norm(src - q, axis=-1), kind="stable")[:k]
        counts = Counter(labels[order].tolist())
        best = max(counts.values())
        out.append(next(int(labels[i]) for i in order if counts[int(labels[i])] == best))
    return np.array(out)


def test_knn_vote_clusters() -> None:
    rng = np.random.default_rng(0)
    src = np.concatenate([rng.normal(0.0, 0.1, (40, 3)), rng.normal([5.0, 0, 0], 0.1, (40, 3))])
    labels = np.repeat([3, 8], 40)
    labels[5] = 8  # one stray label inside cluster 3 is outvoted
    query = np.array([[0.05, 0.0, 0.0], [4.9, 0.1, 0.0], [0.0, 0.0, 0.0]])
    query[2] = src[5]
    np.testing.assert_array_equal(knn_vote(src, labels, query, k=9), [3, 8, 3])
    # k = 1 follows the nearest source, stray label included.
    nearest = np.argmin(np.linalg.norm(query[:, None] - src[None], axis=-1), axis=1)
    np.testing.assert_array_equal(knn_vote(src, labels, query, k=1), labels[nearest])
    assert labels[nearest[2]] == 8


def test_knn_vote_k1_is_nearest_and_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    src = rng.random((300, 3))
    labels = rng.integers(0, 4, 300)
    query = rng.random((200, 3))
    nearest = np.argmin(np.linalg.norm(query[:, None] - src[None], axis=-1), axis=1)
    np.testing.assert_array_equal(knn_vote(src, labels, query, k=1), labels[nearest])
    for k in (2, 5, 8):
        np.testing.assert_array_equal(
            knn_vote(src, labels, query, k=k), _brute_force_knn_vote(src, labels, query, k)
        )
    torch_out = knn_vote(
        torch.from_numpy(src).float(), torch.from_numpy(labels), torch.from_numpy(query), k=5
    )
    np.testing.assert_array_equal(torch_out, _brute_force_knn_vote(src, labels, query, 5))


def test_knn_vote_ties_go_to_the_nearest_label() -> None:
    src = np.array([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0]])
    query = np.zeros((1, 3))
    # 7 at 1, 5 at 2: a 1-1 tie goes to 7, the larger id, because it is nearer.
    assert knn_vote(src[:2], np.array([7, 5]), query, k=2)[0] == 7
    assert knn_vote(src[:2], np.array([5, 7]), query, k=2)[0] == 5
    # 7 at 1, then 5, 5: the majority wins over the nearest.
    assert knn_vote(src[:3], np.array([7, 5, 5]), query, k=3)[0] == 5
    # A 2-2 tie: 7's nearest source (at 1) is closer than 5's (at 2).
    assert knn_vote(src, np.array([7, 5, 7, 5]), query, k=4)[0] == 7


def test_knn_vote_ignores_sources_and_handles_k_above_g() -> None:
    src = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0]])
    query = np.array([[0.0, 0, 0], [2.9, 0, 0]])
    labels = np.array([-1, 4, 6, 6])
    # The ignored source at the query itself neither votes nor takes a neighbour slot.
    np.testing.assert_array_equal(knn_vote(src, labels, query, k=1), [4, 6])
    np.testing.assert_array_equal(knn_vote(src, labels, query, k=25), [6, 6])
    np.testing.assert_array_equal(knn_vote(src, np.array([0, 4, 6, 6]), query, k=1, ignore_label=0), [4, 6])
    np.testing.assert_array_equal(knn_vote(src, np.full(4, -1), query, k=3), [-1, -1])
    assert knn_vote(src, labels, np.zeros((0, 3))).shape == (0,)


def test_knn_vote_errors() -> None:
    with pytest.raises(ValueError, match="3 source labels for 4 source points"):
        knn_vote(np.zeros((4, 3)), np.zeros(3, dtype=int), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="finite"):
        knn_vote(np.full((2, 3), np.nan), np.zeros(2, dtype=int), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="k must be"):
        knn_vote(np.zeros((2, 3)), np.zeros(2, dtype=int), np.zeros((1, 3)), k=0)


@pytest.mark.skipif(not SCANNET_POINTS.is_file(), reason="needs ../shared/data/scannet_scene0000_00")
def test_knn_vote_transfers_real_scannet_labels() -> None:
    cloud = read_point_cloud(SCANNET_POINTS)
    rng = np.random.default_rng(0)
    half = rng.random(len(cloud)) < 0.5
    pred = knn_vote(cloud.xyz[half], cloud.labels[half], cloud.xyz[~half], k=5, ignore_label=0)
    truth = cloud.labels[~half]
    annotated = truth != 0
    assert (pred[annotated] == truth[annotated]).mean() > 0.9


# ----------------------------------------------------------------------------------------------------
# project_points


def test_project_points_known_camera() -> None:
    K = np.array([[100.0, 0.0, 32.0], [0.0, 120.0, 24.0], [0.0, 0.0, 1.0]])
    c2w = np.eye(4)
    points = np.array([[0.0, 0.0, -2.0], [1.0, 0.5, -2.0], [0.0, 0.0, 2.0], [0.2, -0.1, -4.0]])
    uv, z, mask = project_points(points, K, c2w, image_size=(48, 64))
    np.testing.assert_allclose(uv[0], [32.0, 24.0])
    np.testing.assert_allclose(z[[0, 1, 2, 3]], [2.0, 2.0, -2.0, 4.0])
    # OpenGL y up is image v down: +0.5 m in y moves 30 px up, out of the 48-pixel image.
    np.testing.assert_allclose(uv[1], [82.0, -6.0])
    np.testing.assert_allclose(uv[3], [37.0, 27.0])
    np.testing.assert_array_equal(mask, [True, False, False, True])
    _, _, in_front = project_points(points, K, c2w[:3])
    np.testing.assert_array_equal(in_front, [True, True, False, True])

    moved = np.eye(4)
    moved[:3, 3] = [1.0, 2.0, 3.0]
    uv_t, z_t, _ = project_points(
        torch.tensor(points + [1.0, 2.0, 3.0]), torch.tensor(K), torch.tensor(moved)
    )
    assert isinstance(uv_t, torch.Tensor)
    torch.testing.assert_close(uv_t, torch.from_numpy(uv))
    torch.testing.assert_close(z_t, torch.from_numpy(z))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_project_points_inverts_nerfstudio_rays() -> None:
    from nerfstudio.cameras.cameras import Cameras, CameraType

    rng = np.random.default_rng(3)
    c2w = np.concatenate([_random_rotation(rng), rng.normal(size=(3, 1))], axis=1)
    height, width = 30, 40
    fx, fy, cx, cy = 35.0, 38.0, 19.0, 16.5
    cameras = Cameras(
        camera_to_worlds=torch.tensor(c2w, dtype=torch.float32)[None],
        fx=fx,
        fy=fy,
        cx=cx,
        cy=cy,
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    )
    rays = cameras.generate_rays(camera_indices=0, keep_shape=True)
    depth = torch.from_numpy(rng.uniform(0.5, 5.0, size=(height, width, 1))).float()
    points = rays.origins + rays.directions * depth * rays.metadata["directions_norm"]
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    uv, z, mask = project_points(points.reshape(-1, 3).double().numpy(), K, c2w, image_size=(height, width))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    expected = np.stack([cols + 0.5, rows + 0.5], axis=-1).reshape(-1, 2)
    np.testing.assert_allclose(uv, expected, atol=2e-3)
    np.testing.assert_allclose(z, depth.reshape(-1).numpy(), rtol=1e-5)
    assert mask.all()


# ----------------------------------------------------------------------------------------------------
# backproject_vote on hand-built scenes: a small square (label 1) at z = -2 in front of a large square
# (label 2) at z = -4, seen by pinhole cameras.

FRONT_HALF, FRONT_Z, BACK_HALF, BACK_Z = 0.3, -2.0, 1.5, -4.0
SIZE = 64
K64 = np.array([[50.0, 0.0, 32.0], [0.0, 50.0, 32.0], [0.0, 0.0, 1.0]])


def _ray_cast(c2w: np.ndarray, K: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Label and z-depth maps of the two squares (0 / inf where a ray hits neither)."""
    rows, cols = np.meshgrid(np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5, indexing="ij")
    d_cam = np.stack([(cols - K[0, 2]) / K[0, 0], -(rows - K[1, 2]) / K[1, 1], -np.ones_like(cols)], axis=-1)
    d = d_cam @ c2w[:3, :3].T
    o = c2w[:3, 3]
    labels = np.zeros(size, dtype=np.int64)
    depth = np.full(size, np.inf)
    for plane_z, half, label in ((BACK_Z, BACK_HALF, 2), (FRONT_Z, FRONT_HALF, 1)):
        t = (plane_z - o[2]) / d[..., 2]
        hit = o + t[..., None] * d
        inside = (t > 0) & (np.abs(hit[..., 0]) <= half) & (np.abs(hit[..., 1]) <= half) & (t < depth)
        labels[inside], depth[inside] = label, t[inside]
    return labels, depth


def _squares(spacing: float) -> Tuple[np.ndarray, np.ndarray]:
    def grid(half: float, z: float) -> np.ndarray:
        ticks = np.arange(-half, half + 1e-9, spacing)
        x, y = np.meshgrid(ticks, ticks, indexing="ij")
        return np.stack([x.ravel(), y.ravel(), np.full(x.size, z)], axis=-1)

    front, back = grid(FRONT_HALF, FRONT_Z), grid(BACK_HALF, BACK_Z)
    return np.concatenate([front, back]), np.repeat([1, 2], [len(front), len(back)])


def _hidden_from_origin(points: np.ndarray, margin: float) -> np.ndarray:
    """Back-square points whose line of sight from the origin crosses the front square, with a margin."""
    at_front = points[:, :2] * (FRONT_Z / points[:, 2:3])
    return (points[:, 2] == BACK_Z) & (np.abs(at_front) < FRONT_HALF - margin).all(axis=-1)


def _visible_from_origin(points: np.ndarray, margin: float) -> np.ndarray:
    at_front = points[:, :2] * (FRONT_Z / points[:, 2:3])
    return (points[:, 2] == FRONT_Z) | (np.abs(at_front) > FRONT_HALF + margin).any(axis=-1)


def test_backproject_depth_test_hides_occluded_points() -> None:
    points, truth = _squares(0.05)
    labels, depth = _ray_cast(np.eye(4), K64, (SIZE, SIZE))
    # Depth at half resolution: its intrinsics are the image's scaled by 1/2.
    _, depth_half = _ray_cast(np.eye(4), K64 * [[0.5], [0.5], [1.0]], (SIZE // 2, SIZE // 2))
    view = ViewLabels(
        labels, K64, np.eye(4), (SIZE, SIZE), depth=np.where(np.isinf(depth_half), 0.0, depth_half)
    )
    pred, votes = backproject_vote(points, [view], depth_tolerance=0.1, ignore_label=0)
    hidden = _hidden_from_origin(points, margin=0.03)
    # Away from the back square's rim, whose depth pixels may miss the square.
    seen = _visible_from_origin(points, margin=0.03) & (np.abs(points[:, :2]).max(-1) < BACK_HALF - 0.1)
    assert hidden.sum() > 20 and seen.sum() > 100
    np.testing.assert_array_equal(votes[hidden], 0)
    np.testing.assert_array_equal(pred[hidden], 0)
    np.testing.assert_array_equal(votes[seen], 1)
    np.testing.assert_array_equal(pred[seen], truth[seen])

    # A second camera to the side sees most of the hidden points; with both views they are labelled.
    side = look_at_opengl(
        np.array([2.5, 0.0, 0.0]), np.array([0.0, 0.0, BACK_Z]), up=np.array([0.0, 1.0, 0.0])
    )
    side_labels, side_depth = _ray_cast(side, K64, (SIZE, SIZE))
    side_view = ViewLabels(
        side_labels, K64, side, (SIZE, SIZE), depth=np.where(np.isinf(side_depth), 0, side_depth)
    )
    pred2, votes2 = backproject_vote(points, [view, side_view], depth_tolerance=0.1, ignore_label=0)
    newly_seen = hidden & (votes2 > 0)
    assert newly_seen.sum() > 0.5 * hidden.sum()
    np.testing.assert_array_equal(pred2[newly_seen], 2)
    voted = votes2 > 0
    assert (pred2[voted] == truth[voted]).mean() > 0.97


def test_backproject_without_depth_uses_a_point_zbuffer() -> None:
    points, truth = _squares(0.05)
    labels, _ = _ray_cast(np.eye(4), K64, (SIZE, SIZE))
    view = ViewLabels(labels, K64, np.eye(4), (SIZE, SIZE))
    # The front square's points are 1.25 px apart at 64x64: a 16x16 buffer has no gaps between them.
    pred, votes = backproject_vote(points, [view], ignore_label=0, zbuffer_grid=(16, 16))
    hidden = _hidden_from_origin(points, margin=0.05)
    seen = _visible_from_origin(points, margin=0.1) & (np.abs(points[:, :2]).max(-1) < BACK_HALF - 0.1)
    np.testing.assert_array_equal(votes[hidden], 0)
    np.testing.assert_array_equal(pred[seen], truth[seen])


def test_backproject_coarse_label_grid() -> None:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(-2.5, 2.5, (500, 2)), np.full((500, 1), -3.0)], axis=1)
    # An 8x8 grid over a 64x64 image; cell (r, c) holds label 10 * r + c.
    grid = 10 * np.arange(8)[:, None] + np.arange(8)[None, :]
    view = ViewLabels(torch.from_numpy(grid), torch.from_numpy(K64), torch.eye(4)[:3], (SIZE, SIZE))
    pred, votes = backproject_vote(torch.from_numpy(points), [view])
    uv, _, inside = project_points(points, K64, np.eye(4), (SIZE, SIZE))
    expected = np.where(inside, 10 * np.floor(uv[:, 1] / 8) + np.floor(uv[:, 0] / 8), -1)
    np.testing.assert_array_equal(pred, expected)
    np.testing.assert_array_equal(votes, inside.astype(int))
    assert 0 < inside.sum() < len(points)


def test_backproject_majority_ties_and_unseen_points() -> None:
    points = np.array([[0.0, 0.0, -2.0], [0.1, 0.1, -2.0], [0.0, 0.0, 2.0], [50.0, 0.0, -2.0]])
    depth = np.full((SIZE, SIZE), 2.0)

    def view(label: int) -> ViewLabels:
        return ViewLabels(np.full((4, 4), label), K64, np.eye(4), (SIZE, SIZE), depth=depth)

    pred, votes = backproject_vote(points, [view(5), view(3), view(5)])
    # Points 2 (behind the camera) and 3 (out of frame) are never seen.
    np.testing.assert_array_equal(pred, [5, 5, -1, -1])
    np.testing.assert_array_equal(votes, [3, 3, 0, 0])
    pred, votes = backproject_vote(points, [view(9), view(4), view(-1)])
    np.testing.assert_array_equal(pred, [4, 4, -1, -1])  # a tie goes to the smaller id; -1 casts no vote
    np.testing.assert_array_equal(votes, [2, 2, 0, 0])
    # A wrong depth hides everything: the views' depth says 2 m, the points are at 3 m.
    pred, votes = backproject_vote(points * [1, 1, 1.5], [view(5)], depth_tolerance=0.1)
    np.testing.assert_array_equal(votes, 0)
    pred, votes = backproject_vote(points, [])
    np.testing.assert_array_equal(pred, -1)


def test_backproject_mean_averages_unit_features_one_vote_per_view() -> None:
    points = np.array([[0.0, 0.0, -2.0], [0.1, 0.1, -2.0], [0.0, 0.0, 2.0], [50.0, 0.0, -2.0]])
    depth = np.full((SIZE, SIZE), 2.0)

    def view(label: int) -> ViewLabels:
        return ViewLabels(np.full((4, 4), label), K64, np.eye(4), (SIZE, SIZE), depth=depth)

    # Three views: two say "a" ([1, 0, 0] at scale 5 and 0.5: the norm must not matter), one says "b".
    grids = [np.zeros((4, 4, 3)) for _ in range(4)]
    grids[0][..., 0], grids[1][..., 0], grids[2][..., 1] = 5.0, 0.5, 1.0
    mean, votes = backproject_mean(points, [view(1), view(1), view(1)], grids[:3])
    np.testing.assert_allclose(mean[:2], [[2 / 3, 1 / 3, 0.0]] * 2, atol=1e-6)
    np.testing.assert_array_equal(mean[2:], 0.0)  # behind the camera, out of frame
    np.testing.assert_array_equal(votes, [3, 3, 0, 0])
    # An ignored cell and an all-zero feature (no target) cast no vote; with the labels' vote it agrees.
    mean, votes = backproject_mean(points, [view(1), view(-1), view(1)], [grids[0], grids[2], grids[3]])
    np.testing.assert_allclose(mean[:2], [[1.0, 0.0, 0.0]] * 2, atol=1e-6)
    np.testing.assert_array_equal(votes, [1, 1, 0, 0])
    # Visibility is the vote's: a wrong depth hides everything.
    _, votes = backproject_mean(points * [1, 1, 1.5], [view(1)], grids[:1], depth_tolerance=0.1)
    np.testing.assert_array_equal(votes, 0)
    with pytest.raises(ValueError, match="one feature grid per view"):
        backproject_mean(points, [view(1)], grids[:2])
    with pytest.raises(ValueError, match="do not match"):
        backproject_mean(points, [view(1)], [np.zeros((2, 2, 3))])


def test_view_labels_validation() -> None:
    with pytest.raises(ValueError, match="view 'frame_7': labels must be an integer"):
        ViewLabels(np.zeros((4, 4)), K64, np.eye(4), (SIZE, SIZE), name="frame_7")
    with pytest.raises(ValueError, match="camera_to_world"):
        ViewLabels(np.zeros((4, 4), dtype=int), K64, np.eye(3), (SIZE, SIZE))
    with pytest.raises(ValueError, match="depth must be"):
        ViewLabels(np.zeros((4, 4), dtype=int), K64, np.eye(4), (SIZE, SIZE), depth=np.zeros(5))
    with pytest.raises(ValueError, match="depth_tolerance"):
        backproject_vote(np.zeros((1, 3)), [], depth_tolerance=0.0)


# ----------------------------------------------------------------------------------------------------
# End to end on the synthetic room: ground-truth label images back-projected onto the labelled points


@pytest.fixture(scope="module")
def synthetic_room(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("room")
    generate_synthetic_scene(out, SyntheticSceneConfig(num_views=16, num_seed_points=200))
    return out


def _synthetic_views(root: Path, with_depth: bool) -> list:
    meta = json.loads((root / "transforms.json").read_text())
    K = np.array([[meta["fl_x"], 0, meta["cx"]], [0, meta["fl_y"], meta["cy"]], [0, 0, 1]])
    views = []
    for frame in meta["frames"]:
        labels = np.asarray(Image.open(root / frame["semantic_file_path"])).astype(np.int64)
        depth = None
        if with_depth:
            depth = np.asarray(Image.open(root / frame["depth_file_path"])) * meta["depth_unit_scale_factor"]
        views.append(
            ViewLabels(
                labels,
                K,
                np.array(frame["transform_matrix"]),
                (meta["h"], meta["w"]),
                depth,
                frame["file_path"],
            )
        )
    return views


@pytest.mark.parametrize("with_depth", [True, False])
def test_backproject_ground_truth_labels_onto_synthetic_points(
    synthetic_room: Path, with_depth: bool
) -> None:
    cloud = read_point_cloud(synthetic_room / "points_labeled.ply")
    views = _synthetic_views(synthetic_room, with_depth)
    # Without depth, a z-buffer 4x coarser than the 96x72 images closes the gaps between the points
    # (about 5 cm apart, a pixel is about 3 cm at 2 m).
    grid = None if with_depth else (18, 24)
    pred, votes = backproject_vote(cloud.xyz, views, depth_tolerance=0.05, ignore_label=0, zbuffer_grid=grid)
    seen = votes > 0
    # Some surfaces face no camera (the underside of the table top, faces against a wall): score the
    # points the views saw, and check that those are most of them.
    assert seen.mean() > (0.8 if with_depth else 0.5)
    class_ids = sorted(CLASS_NAMES)
    cm = ConfusionMatrix(len(class_ids))
    cm.update(remap_labels(pred[seen], class_ids), remap_labels(cloud.labels[seen], class_ids))
    scores = segmentation_scores(cm, [CLASS_NAMES[i] for i in class_ids])
    assert all(row["gt_count"] > 0 for row in scores["per_class"].values())
    assert scores["overall_acc"] > (0.98 if with_depth else 0.95)
    assert scores["miou"] > (0.95 if with_depth else 0.85)
