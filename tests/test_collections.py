"""Scene collections: the index and its splits, view overlap and choice, and the multi-scene datamanager
(determinism, sharding by rank, resume, bounded memory, collection-wide feature extraction)."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import numpy as np
import pytest
import torch

from splatsem_ns.data.collection import SceneCollection, SceneEntry, split_of
from splatsem_ns.data.collection_cli import BuildCollection
from splatsem_ns.data.multiscene import (
    MultiSceneDataManagerConfig,
    SceneSampleDataset,
    ShardedSampleSampler,
    extract_collection_features,
    source_weights,
)
from splatsem_ns.data.scene_frames import SceneFrames
from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene
from splatsem_ns.data.view_sampling import ViewChoiceConfig, choose_views, view_overlap
from splatsem_ns.teachers.base import Teacher, TeacherConfig
from splatsem_ns.teachers.cache import TeacherFeatureCache

NUM_SCENES = 4
NUM_VIEWS = 12


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Four small rooms (different seeds) and one scene with a truncated image, under one folder."""
    root = tmp_path_factory.mktemp("scenes")
    for seed in range(NUM_SCENES):
        config = SyntheticSceneConfig(
            seed=seed, num_views=NUM_VIEWS, width=64, height=48, num_seed_points=300
        )
        generate_synthetic_scene(root / f"room_{seed}", config)
    broken = root / "broken_room"
    generate_synthetic_scene(broken, SyntheticSceneConfig(seed=9, num_views=4, width=64, height=48))
    image = broken / "images" / "0001.png"
    image.write_bytes(image.read_bytes()[:200])
    return root


@pytest.fixture(scope="module")
def collection(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("collection") / "collection.json"
    BuildCollection(
        scenes=(scenes,), out=out, val_fraction=0.0, test_fraction=0.0, test_scenes=("room_3",)
    ).main()
    return out


def test_index_lists_valid_scenes_and_reports_broken_ones(collection, scenes):
    loaded = SceneCollection.load(collection.parent)  # the folder works as well as the file
    assert sorted(s.name for s in loaded.scenes) == [f"room_{i}" for i in range(NUM_SCENES)]
    assert [s.name for s in loaded.split("test")] == ["room_3"]
    assert len(loaded.split("train")) == NUM_SCENES - 1
    skipped = loaded.statistics["scenes_skipped"]
    assert len(skipped) == 1 and "broken_room" in skipped[0]["path"] and "0001.png" in skipped[0]["reason"]
    entry = loaded.split("train")[0]
    assert entry.num_views == NUM_VIEWS and entry.image_size == (48, 64)
    assert entry.has_depth and entry.has_labels and entry.has_instances and entry.has_labeled_points
    assert not Path(entry.path).is_absolute(), "paths are relative to the index, so a collection can move"
    assert (loaded.scene_path(entry) / "transforms.json").is_file()
    assert loaded.classes[1] == "wall" and loaded.classes[40] == "otherprop"


def test_splits_depend_on_the_name_only():
    names = [f"scene{i:04d}_00" for i in range(2000)]
    splits = [split_of(n, 0.1, 0.05) for n in names]
    assert splits == [split_of(n, 0.1, 0.05) for n in reversed(names)][::-1]  # order does not matter
    assert abs(splits.count("val") / 2000 - 0.1) < 0.02 and abs(splits.count("test") / 2000 - 0.05) < 0.015
    assert [split_of(n, 0.1, 0.05, salt="x") for n in names] != splits
    with pytest.raises(ValueError):
        split_of("a", 0.6, 0.5)


def test_including_an_index_keeps_its_scenes_and_splits(collection, tmp_path):
    mixed = BuildCollection(include=(collection,), out=tmp_path / "mixed" / "collection.json").main()
    original = SceneCollection.load(collection)
    assert [(s.name, s.split) for s in mixed.scenes] == [(s.name, s.split) for s in original.scenes]
    assert all((mixed.scene_path(s) / "transforms.json").is_file() for s in mixed.scenes)


def test_neighbouring_views_overlap_more_than_opposite_ones(scenes):
    frames = SceneFrames.load(scenes / "room_0")
    overlap = view_overlap(frames)
    assert overlap.shape == (NUM_VIEWS, NUM_VIEWS) and np.allclose(np.diag(overlap), 1.0)
    # The ring: view k and k + 1 look at much of the same room, view k and k + 6 at the opposite side.
    neighbours = np.mean([overlap[k, (k + 1) % NUM_VIEWS] for k in range(NUM_VIEWS)])
    opposite = np.mean([overlap[k, (k + NUM_VIEWS // 2) % NUM_VIEWS] for k in range(NUM_VIEWS)])
    assert neighbours > 0.3 and neighbours > opposite + 0.1, (neighbours, opposite)


def test_context_and_target_views_overlap_and_never_coincide(scenes):
    overlap = view_overlap(SceneFrames.load(scenes / "room_1"))
    config = ViewChoiceConfig(
        num_context_views=3, num_target_views=4, min_overlap=0.2, target_min_overlap=0.2
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        context, targets = choose_views(overlap, config, rng)
        assert len(set(context)) == 3 and len(set(targets)) == 4
        assert not set(context) & set(targets)
        mutual = np.minimum(overlap, overlap.T)
        for k in range(1, len(context)):  # each context view links to one chosen before it
            assert mutual[context[k], context[:k]].max() >= config.min_overlap
        assert overlap[targets][:, context].max(axis=1).min() >= config.target_min_overlap
    with pytest.raises(ValueError, match="needs 8 views"):
        choose_views(overlap[:5, :5], ViewChoiceConfig(num_context_views=4, num_target_views=4), rng)


def _manager(collection, tmp_path, world_size: int = 1, local_rank: int = 0, **overrides):
    config = MultiSceneDataManagerConfig(
        data=collection,
        image_size=(48, 64),
        teachers=("tiny-dinov2",),
        feature_cache_dir=tmp_path / "cache",
        num_workers=0,
        batch_size=2,
        seed=3,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config.setup(device="cpu", test_mode="val", world_size=world_size, local_rank=local_rank)


def _stream(manager, steps, start=0):
    return [manager.next_train(step)[1] for step in range(start, start + steps)]


def test_samples_are_deterministic_whatever_the_workers(collection, tmp_path):
    first = _stream(_manager(collection, tmp_path), 4)
    again = _stream(_manager(collection, tmp_path, num_workers=2), 4)
    for a, b in zip(first, again, strict=True):
        assert a["scene"] == b["scene"] and a["sample_id"].tolist() == b["sample_id"].tolist()
        for part in ("context", "target"):
            assert torch.equal(a[part]["view_indices"], b[part]["view_indices"])
            assert torch.equal(a[part]["images"], b[part]["images"])
            assert torch.equal(a[part]["teacher_features"]["dinov2"], b[part]["teacher_features"]["dinov2"])
    batch = first[0]
    context, target = batch["context"], batch["target"]
    assert context["images"].shape == (2, 2, 48, 64, 3) and target["images"].shape == (2, 4, 48, 64, 3)
    assert context["intrinsics"].shape == (2, 2, 3, 3) and context["camera_to_world"].shape == (2, 2, 4, 4)
    assert (
        bool(context["has_depth"].all()) and float(context["depth"].min()) > 0
    )  # a closed room: depth everywhere
    assert bool(context["has_labels"].all()) and int(context["labels"].min()) >= 1
    assert context["teacher_features"]["dinov2"].dtype == torch.float16
    ids = [v.tolist() for v in context["view_indices"]] + [v.tolist() for v in target["view_indices"]]
    assert all(len(set(c) & set(t)) == 0 for c, t in zip(ids[:2], ids[2:], strict=True))
    assert set(sum((b["scene"] for b in first), [])) <= {"room_0", "room_1", "room_2"}  # room_3 is test


def test_ranks_draw_disjoint_samples_that_make_up_the_one_rank_stream():
    single = list(_take(ShardedSampleSampler(6, 0, 1), 18))
    ranks = [list(_take(ShardedSampleSampler(6, r, 3), 6)) for r in range(3)]
    assert sorted(sum(ranks, [])) == single
    assert all(not set(a) & set(b) for i, a in enumerate(ranks) for b in ranks[i + 1 :])
    resumed = list(_take(ShardedSampleSampler(7, 1, 3, skip=4), 3))
    assert resumed == list(_take(ShardedSampleSampler(7, 1, 3), 7))[4:]


def test_real_share_gives_real_captures_that_share_of_the_stream(tmp_path):
    scenes = [SceneEntry(f"gen_{i}", f"gen_{i}", "train", source="procedural") for i in range(30)]
    scenes += [SceneEntry("scan_a", "scan_a", "train"), SceneEntry("scan_b", "scan_b", "train")]
    config = MultiSceneDataManagerConfig(teachers=(), real_share=0.25)

    def drawn(weights):
        dataset = SceneSampleDataset(None, scenes, config, {}, tmp_path, tmp_path, 32, weights=weights)
        return [scenes[dataset.scene_of(k)].name for k in range(4000)]

    mixed = drawn(source_weights(scenes, 0.25))
    real = sum(name.startswith("scan") for name in mixed) / len(mixed)
    assert 0.22 < real < 0.28, real
    assert abs(mixed.count("scan_a") - mixed.count("scan_b")) < 0.2 * mixed.count("scan_a")
    assert mixed == drawn(source_weights(scenes, 0.25))  # seeded: the same stream again
    plain = drawn(None)  # unset: each scene once per pass, 2 of 32 real
    assert sum(name.startswith("scan") for name in plain) == 2 * 4000 // 32 == 250
    with pytest.raises(ValueError, match="both real captures and generated scenes"):
        source_weights(scenes[:30], 0.25)
    with pytest.raises(ValueError, match="real_share"):
        MultiSceneDataManagerConfig(teachers=(), real_share=1.0)


def _take(iterable, n):
    for _, item in zip(range(n), iterable, strict=False):
        yield item


def test_a_resumed_run_continues_the_stream_and_ranks_shard_it(collection, tmp_path):
    stream = _stream(_manager(collection, tmp_path), 4)
    resumed = _stream(_manager(collection, tmp_path), 2, start=2)
    assert [b["sample_id"].tolist() for b in resumed] == [b["sample_id"].tolist() for b in stream[2:]]
    rank1 = _stream(_manager(collection, tmp_path, world_size=2, local_rank=1), 2)
    assert all(i % 2 == 1 for b in rank1 for i in b["sample_id"].tolist())


def test_memory_stays_bounded_while_streaming(collection, tmp_path):
    manager = _manager(collection, tmp_path, batch_size=1)
    _stream(manager, 3)  # warm: scene overlaps cached, loaders built
    tracemalloc.start()
    _stream(manager, 5, start=3)
    _, short = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    _stream(manager, 30, start=8)
    _, long = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Six times the samples, not six times the memory: nothing of a sample outlives it.
    assert long < 2 * short + (1 << 20), (short, long)


@dataclass
class _CountingConfig(TeacherConfig):
    _target: Type = field(default_factory=lambda: _CountingTeacher)
    name: str = "count"
    model_name: str = "counting"
    input_size: int = 32


class _CountingTeacher(Teacher):
    """Mean colour per 8x8 patch; counts the images it encodes and can stop part-way (an interruption)."""

    stop_after = -1
    built = 0  # teachers constructed (a network load, for a real teacher)

    def __init__(self, config) -> None:
        super().__init__(config)
        self.feature_dim, self.feature_stride, self.encoded = 3, 8, 0
        _CountingTeacher.built += 1

    def encode_image(self, images):
        if 0 <= _CountingTeacher.stop_after <= self.encoded:
            raise KeyboardInterrupt
        self.encoded += images.shape[0]
        _CountingTeacher.total += images.shape[0]
        return torch.nn.functional.adaptive_avg_pool2d(images, self.feature_grid(*images.shape[-2:]))

    total = 0


def test_collection_extraction_resumes_after_an_interruption(collection, tmp_path):
    loaded = SceneCollection.load(collection)
    scenes = [(s.name, str(loaded.scene_path(s))) for s in loaded.scenes]
    _CountingTeacher.stop_after, _CountingTeacher.total = 20, 0
    with pytest.raises(KeyboardInterrupt):
        extract_collection_features(scenes, [_CountingConfig()], (48, 64), tmp_path, batch_size=4)
    assert _CountingTeacher.total == 20
    _CountingTeacher.stop_after, _CountingTeacher.total = -1, 0
    fingerprints = extract_collection_features(scenes, [_CountingConfig()], (48, 64), tmp_path, batch_size=4)
    assert _CountingTeacher.total == NUM_SCENES * NUM_VIEWS - 20, "only what was missing is extracted"
    assert set(fingerprints["count"]) == {name for name, _ in scenes}
    folder = TeacherFeatureCache(tmp_path, "count", _CountingConfig().setup().fingerprint()).folder
    assert len(list(folder.glob("*.npy"))) == NUM_SCENES * NUM_VIEWS
    _CountingTeacher.total = _CountingTeacher.built = 0
    again = extract_collection_features(scenes, [_CountingConfig()], (48, 64), tmp_path, batch_size=4)
    assert _CountingTeacher.total == 0
    assert _CountingTeacher.built == 0, "with every image cached, the teacher is never loaded"
    assert again == fingerprints


@pytest.mark.slow
def test_extraction_in_several_processes_gives_the_same_cache(collection, tmp_path, capsys):
    loaded = SceneCollection.load(collection)
    scenes = [(s.name, str(loaded.scene_path(s))) for s in loaded.scenes]
    from splatsem_ns.teachers.registry import make_teacher_config

    teachers = [make_teacher_config("tiny-dinov2"), make_teacher_config("labels")]
    one = extract_collection_features(scenes, teachers, (48, 64), tmp_path / "one", workers=1)
    two = extract_collection_features(scenes, teachers, (48, 64), tmp_path / "two", workers=2)
    assert one == two
    files = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.npy")}
    assert files == {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.npy")}
    assert len(files) == 2 * NUM_SCENES * NUM_VIEWS
    assert len(set(one["labels"].values())) == NUM_SCENES, "the label proxy is prepared per scene"
    out = " ".join(capsys.readouterr().out.split())
    assert "Teacher features (collection): 96 images done in" in out  # one display over both processes
    assert json.loads((collection).read_text())["format"] == "splatsem_ns.scene_collection"


def test_a_scene_without_label_images_is_scored_on_its_projected_labelled_points(scenes, tmp_path):
    """A capture with labelled points but no label images (ScanNet as distributed) gets the label proxy's clean
    class maps in its samples, close to what label images would have said."""
    import shutil

    root = tmp_path / "scenes"
    for name in ("room_0", "room_1"):
        shutil.copytree(scenes / name, root / name)
    transforms = root / "room_1" / "transforms.json"
    meta = json.loads(transforms.read_text())
    for frame in meta["frames"]:
        frame.pop("semantic_file_path")
    transforms.write_text(json.dumps(meta))
    assert (root / "room_1" / "points_labeled.ply").is_file()
    out = tmp_path / "collection.json"
    BuildCollection(
        scenes=(root,), out=out, val_fraction=0.0, test_fraction=0.0, test_scenes=("room_1",)
    ).main()
    manager = _manager(out, tmp_path, teachers=("labels",), eval_split="test")
    sample = manager.eval_dataset[0]
    assert sample["scene"] == "room_1"
    projected = sample["target"]["labels"]
    assert bool(sample["target"]["has_labels"]) and int((projected > 0).sum()) > 0.5 * projected.numel()
    frames = SceneFrames.load(scenes / "room_1")
    truth = torch.stack(
        [
            torch.from_numpy(frames.load_view(int(i), (48, 64)).labels)
            for i in sample["target"]["view_indices"]
        ]
    )
    both = (projected > 0) & (truth > 0)
    agree = float((projected[both] == truth[both]).float().mean())
    # 79% in these 64x48 rooms (sparse points, boundaries); a map in the wrong frame agrees about as often as
    # "every pixel is wall" would, under 50%.
    assert agree > 0.7, f"projected labels agree with the label images on {agree:.0%} of pixels"
    # Scenes with label images keep them, and nothing is served as labelled without a label proxy.
    assert bool(manager.train_dataset[0]["target"]["has_labels"])
    no_proxy = _manager(out, tmp_path, teachers=("tiny-dinov2",), eval_split="test")
    assert not bool(no_proxy.eval_dataset[0]["target"]["has_labels"])
