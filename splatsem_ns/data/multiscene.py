"""A datamanager that trains across a scene collection: (scene, context views, target views) samples, streamed.

Every feed-forward model of this package (the image-to-Gaussians network, the encoder over Gaussians) learns from
many scenes at once. ``MultiSceneDataManager`` serves them from a collection (``splatsem_ns.data.collection``):
real, generated or both.

- **Samples.** Sample ``k`` of the stream is a function of (``seed``, ``k``) only: the epoch's scene order is a
  seeded permutation of the split (with ``real_share``, a seeded draw that gives real captures that share), and
  the views are chosen by ``view_sampling.choose_views`` from the scene's view overlap (computed from depth once
  per scene, then cached on disk). So a run is reproducible, a resumed run continues the same stream at its
  step, and the worker count does not change what is served.
- **Ranks.** Under DistributedDataParallel each rank draws the samples ``k`` with ``k % world_size == rank``:
  disjoint streams, together the one-rank stream (the epoch is rounded up to a multiple of the rank count).
- **Content.** Per sample, for the context and the target views: uint8 images at ``image_size``, pinhole
  intrinsics at that size, OpenGL camera-to-world in the scene's own (metric) frame, depth in the scene's units
  (0 = none), class ids in the collection's class table (a scene with its own ``classes.json`` is mapped by
  name) and instance ids (0 = unlabelled), flags saying which the scene has, and each teacher's
  fp16 features of exactly these pixels. Scenes without depth or labels serve zeros and a False flag, so mixed
  collections stack into batches.
- **Teacher features** use the per-image cache of ``splatsem_ns.teachers.cache`` (same key, same checksums). Set-up
  makes sure every image of the splits in use is cached: one progress display per teacher across the whole
  collection, resumable, optionally in several processes (``extraction_workers``, e.g. one per GPU).
- **Memory** stays bounded: nothing of a scene is held beyond the sample being built; DataLoader worker
  processes decode views, and pinned memory with prefetching overlaps that with the GPU.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
)

import numpy as np
import torch
from nerfstudio.data.datamanagers.base_datamanager import DataManager, DataManagerConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch.utils.data import DataLoader, Dataset, Sampler

from splatsem_ns.data.collection import SceneCollection, SceneEntry
from splatsem_ns.data.dataparser import (
    CLASS_NAMES_KEY,
    DATAPARSER_SCALE_KEY,
    DATAPARSER_TRANSFORM_KEY,
    DEPTH_SCALE_KEY,
    LABELED_POINTS_KEY,
)
from splatsem_ns.data.scene_frames import SceneFrames, labelled_points_path
from splatsem_ns.data.scene_gaussians import (
    GaussianSource,
    GaussianSubset,
    PointShape,
    collate_samples,
    load_scene_gaussians,
    subsample,
    subset_in_views,
)
from splatsem_ns.data.view_sampling import ViewChoiceConfig, choose_views, sample_overlap, view_overlap
from splatsem_ns.files import write_atomically
from splatsem_ns.progress import ProgressLog, logged_progress
from splatsem_ns.teachers.base import (
    SceneView,
    Teacher,
    TeacherConfig,
    TeacherSpec,
    declared_text_encoder,
    reads_the_scene,
    teachers_to_extract,
)
from splatsem_ns.teachers.cache import (
    TeacherFeatureCache,
    cache_teacher_features,
    default_cache_root,
    image_key,
)
from splatsem_ns.teachers.labels_teacher import LabelsTeacher, LabelsTeacherConfig
from splatsem_ns.teachers.registry import DEFAULT_TEACHERS, check_teacher_names, configured_teachers

OVERLAP_VERSION = 1
"""Part of the overlap cache key: bump when ``view_overlap`` changes."""


@dataclass
class MultiSceneDataManagerConfig(DataManagerConfig):
    """Samples of (scene, context views, target views) across a scene collection (see the module docstring)."""

    _target: Type = field(default_factory=lambda: MultiSceneDataManager)
    data: Optional[Path] = None
    """The collection: its ``collection.json`` or the folder holding it."""
    train_split: Literal["train", "val", "test"] = "train"
    """Split trained on."""
    eval_split: Literal["train", "val", "test"] = "val"
    """Split evaluated on."""
    image_size: Tuple[int, int] = (256, 320)
    """(height, width) every view is served at: resized to cover it and centre-cropped, intrinsics to match."""
    views: ViewChoiceConfig = field(default_factory=ViewChoiceConfig)
    """How many context and target views a sample has, and how they are chosen."""
    batch_size: int = 1
    """Samples per batch (per rank)."""
    samples_per_epoch: Optional[int] = None
    """Samples per epoch across all ranks; None: one per training scene (each scene once per epoch). Rounded up to
    a multiple of the number of ranks."""
    real_share: Optional[float] = None
    """Share of the training samples drawn from real captures (scenes whose ``source`` is not "procedural"), the
    rest from generated scenes, each scene equally often within its group; None: every scene equally often. A few
    real captures among hundreds of generated rooms are otherwise a fraction of a percent of the stream."""
    seed: int = 0
    """Seed of the sample stream (scene order and view choice)."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0: build samples in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = True
    """Page-locked batches, so the copy to the GPU overlaps compute (ignored without CUDA)."""
    max_scenes: Optional[int] = None
    """Use only the first this-many scenes of each split (quick runs and tests)."""
    teachers: Tuple[str, ...] = DEFAULT_TEACHERS
    """Teacher presets whose features are served (empty: none)."""
    teacher_checkpoints: Dict[str, Path] = field(default_factory=dict)
    """Local weights per teacher name."""
    unlabelled_scenes: Literal["drop", "geometry"] = "drop"
    """Scenes a label proxy teacher cannot read (no label images, no labelled points) when one is among the
    teachers: "drop" leaves them out; "geometry" keeps them, with that teacher's features marked absent
    (``teacher_available``), so they train geometry and appearance only (real captures without labels mixed into a
    generated collection). Other teachers are served for them as for any scene."""
    teacher_random_weights: bool = False
    """Build every teacher with random weights (tests and speed benchmarks only)."""
    teacher_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where teachers run during extraction; "auto": CUDA when available."""
    feature_cache_dir: Optional[Path] = None
    """Feature cache folder; default ``$SPLATSEM_CACHE`` or ``~/.cache/splatsem_ns/teacher_features``."""
    overlap_cache_dir: Optional[Path] = None
    """Where each scene's view overlap is kept; default ``view_overlap`` beside the feature cache."""
    extraction_batch_size: int = 8
    """Images per teacher forward pass during extraction."""
    extraction_workers: int = 1
    """Processes extracting teacher features at set-up (each with its own teachers; on CUDA, process i uses GPU
    i modulo the GPU count)."""
    gaussians: GaussianSource = "off"
    """Also serve each scene's 3D Gaussians (the encoder's input; ``scene_gaussians.py``): "ply" a fitted 3DGS file
    in the scene folder, "points" the seed point cloud as small Gaussians, "auto" the file where there is one, else
    the points, "labeled_points" the labelled point cloud as small Gaussians (denser; captures without seed points);
    "off": views only."""
    gaussians_file: str = "gaussians.ply"
    """File name of a scene's fitted Gaussians, in its folder (scene frame)."""
    point_shape: PointShape = "ball"
    """Shape of the Gaussians made from a point cloud ("points", "labeled_points"): "ball" isotropic, "surfel" a
    flat disc along the local surface, its normal facing the room (``points_as_gaussians``)."""
    max_gaussians: int = 200_000
    """At most this many Gaussians per sample (``gaussian_subset`` says which, in larger scenes)."""
    gaussian_subset: GaussianSubset = "random"
    """Which Gaussians a scene larger than ``max_gaussians`` serves: "random" a seeded random subset (every surface
    thinned alike); "views" those inside the sample's context and target views first, at full density, then their
    surroundings (``subset_in_views``): for fitted scenes of many more Gaussians than the limit, whose thinned
    surfaces would look unlike the whole scene that ``splatsem-encode`` sees."""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_teacher_names(self.teachers)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.real_share is not None and not 0.0 < self.real_share < 1.0:
            raise ValueError(f"real_share must be in (0, 1) or None, got {self.real_share}")


# ---------------------------------------------------------------------------------------------- sampling


class ShardedSampleSampler(Sampler[int]):
    """Sample ids ``k = epoch * epoch_length + i`` without end, ``i`` stepping by the world size from the rank,
    starting after ``skip`` of this rank's samples (a resumed run continues its stream)."""

    def __init__(self, epoch_length: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> None:
        if epoch_length < 1:
            raise ValueError("an epoch needs at least one sample")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.epoch_length, self.rank, self.world_size, self.skip = epoch_length, rank, world_size, skip

    def __iter__(self) -> Iterator[int]:
        served = 0
        for epoch in count():
            for i in range(self.rank, self.epoch_length, self.world_size):
                if served >= self.skip:
                    yield epoch * self.epoch_length + i
                served += 1


def source_weights(scenes: Sequence[SceneEntry], real_share: Optional[float]) -> Optional[np.ndarray]:
    """Per-scene sampling probabilities giving real captures ``real_share`` of the samples (see
    ``MultiSceneDataManagerConfig.real_share``); None where every scene is to be drawn equally often."""
    if real_share is None:
        return None
    real = np.array([s.source != "procedural" for s in scenes])
    if real.all() or not real.any():
        kind = "real captures" if real.all() else "generated scenes"
        # The usual way to get here: a label proxy among the teachers left the unlabelled captures out.
        hint = "" if real.all() else " (captures without labels stay only with unlabelled_scenes='geometry')"
        raise ValueError(
            f"real_share={real_share} needs both real captures and generated scenes among the training scenes, "
            f"but all {len(scenes)} are {kind}{hint}; or leave real_share unset"
        )
    weights = np.where(real, real_share / real.sum(), (1.0 - real_share) / (~real).sum())
    return weights / weights.sum()


class SceneSampleDataset(Dataset):
    """Sample id -> one sample (see the module docstring); built in DataLoader workers."""

    def __init__(
        self,
        collection: SceneCollection,
        scenes: Sequence[SceneEntry],
        config: MultiSceneDataManagerConfig,
        fingerprints: Fingerprints,
        feature_root: Path,
        overlap_root: Path,
        epoch_length: int,
        label_teacher: Optional[str] = None,
        weights: Optional[np.ndarray] = None,
    ) -> None:
        self.collection = collection
        self.weights = weights
        """Per-scene sampling probabilities (None: each scene once per pass of the scene list)."""
        self.label_teacher = label_teacher
        self.scenes = list(scenes)
        self.config = config
        self.fingerprints = fingerprints
        self.feature_root = feature_root
        self.overlap_root = overlap_root
        self.epoch_length = epoch_length
        self._orders: Dict[int, np.ndarray] = {}
        self._frames: Dict[int, SceneFrames] = {}
        self._overlaps: Dict[int, np.ndarray] = {}
        self._feature_shapes: Dict[str, Tuple[int, ...]] = {}

    def __len__(self) -> int:
        return self.epoch_length

    def scene_of(self, sample_id: int) -> int:
        """Index (into ``scenes``) of the scene of sample ``sample_id``: the epoch's seeded order, cycled."""
        epoch, i = divmod(int(sample_id), self.epoch_length)
        if epoch not in self._orders:
            rng = np.random.default_rng([self.config.seed, epoch])
            if self.weights is None:
                order = rng.permutation(len(self.scenes))
            else:
                order = rng.choice(len(self.scenes), size=self.epoch_length, p=self.weights)
            self._orders = {epoch: order}
        order = self._orders[epoch]
        return int(order[i % len(order)])

    def frames(self, scene: int) -> SceneFrames:
        if scene not in self._frames:
            if len(self._frames) > 64:  # a worker touches every scene of an epoch: keep only recent ones
                self._frames.clear()
                self._overlaps.clear()
            self._frames[scene] = SceneFrames.load(self.collection.scene_path(self.scenes[scene]))
        return self._frames[scene]

    def overlap(self, scene: int) -> np.ndarray:
        """The scene's view overlap, from the on-disk cache or computed (and cached) now."""
        if scene not in self._overlaps:
            self._overlaps[scene] = cached_view_overlap(
                self.frames(scene), self.overlap_root, self.config.views.depth_tolerance
            )
        return self._overlaps[scene]

    def __getitem__(self, sample_id: int) -> Dict[str, Any]:
        scene = self.scene_of(sample_id)
        rng = np.random.default_rng([self.config.seed, 1 << 20, int(sample_id)])
        context, targets = choose_views(self.overlap(scene), self.config.views, rng)
        sample = {
            "scene": self.scenes[scene].name,
            "sample_id": int(sample_id),
            "overlap": sample_overlap(self.overlap(scene), context, targets) or 0.0,
            "context": self.views(scene, context),
            "target": self.views(scene, targets),
        }
        if self.config.gaussians != "off":
            gaussians = load_scene_gaussians(
                self.collection.scene_path(self.scenes[scene]),
                self.config.gaussians,
                self.config.gaussians_file,
                self.config.point_shape,
            )
            if self.config.gaussian_subset == "views":
                views = [sample["context"], sample["target"]]
                sample["gaussians"] = subset_in_views(
                    gaussians,
                    self.config.max_gaussians,
                    torch.cat([v["camera_to_world"] for v in views]),
                    torch.cat([v["intrinsics"] for v in views]),
                    tuple(sample["target"]["images"].shape[1:3]),
                    rng,
                )
            else:
                sample["gaussians"] = subsample(gaussians, self.config.max_gaussians, rng)
        return sample

    def views(self, scene: int, indices: Sequence[int]) -> Dict[str, Any]:
        """Stacked views of one scene (see the module docstring for what is in them)."""
        frames = self.frames(scene)
        size = tuple(self.config.image_size)
        loaded = [frames.load_view(int(i), size) for i in indices]
        keys: Dict[Tuple[str, int], str] = {}

        def key(fingerprint: str, position: int) -> str:
            # One content hash per (teacher, view): the label proxy's features and its label map share it.
            if (fingerprint, position) not in keys:
                keys[fingerprint, position] = image_key(torch.from_numpy(loaded[position].image), fingerprint)
            return keys[fingerprint, position]

        has_labels = frames.has_labels
        if not has_labels and self.scenes[scene].name in self.fingerprints.get(self.label_teacher, {}):
            has_labels = self._projected_labels(self.scenes[scene].name, loaded, key)
        lookup = frames.label_lookup(self.collection.classes) if self.collection.classes else None
        if lookup is not None:  # the scene's own class ids -> the collection's, by name
            for view in loaded:
                if view.labels is not None:
                    view.labels = lookup[np.clip(view.labels, 0, len(lookup) - 1)]
        zeros_f = np.zeros(size, dtype=np.float32)
        zeros_i = np.zeros(size, dtype=np.int32)
        out: Dict[str, Any] = {
            "view_indices": torch.as_tensor(np.asarray(indices, dtype=np.int64)),
            "images": torch.from_numpy(np.stack([v.image for v in loaded])),
            "intrinsics": torch.from_numpy(np.stack([v.intrinsics for v in loaded]).astype(np.float32)),
            "camera_to_world": torch.from_numpy(
                np.stack([v.camera_to_world for v in loaded]).astype(np.float32)
            ),
            "depth": torch.from_numpy(np.stack([zeros_f if v.depth is None else v.depth for v in loaded])),
            "labels": torch.from_numpy(
                np.stack([zeros_i if v.labels is None else v.labels.astype(np.int32) for v in loaded])
            ),
            "instances": torch.from_numpy(
                np.stack([zeros_i if v.instances is None else v.instances.astype(np.int32) for v in loaded])
            ),
            "has_depth": frames.has_depth,
            "has_labels": has_labels,
        }
        if self.fingerprints:
            scene_name = self.scenes[scene].name
            # A teacher with no features of this scene (a label proxy on an unlabelled one): zeros, marked absent.
            available = {name: scene_name in found for name, found in self.fingerprints.items()}
            out["teacher_features"] = {
                name: torch.from_numpy(
                    np.stack(
                        [
                            self._features(name, scene_name, key, position, frames, i)
                            if available[name]
                            else np.zeros(self._feature_shape(name), dtype=np.float16)
                            for position, i in enumerate(indices)
                        ]
                    )
                )
                for name in self.fingerprints
            }
            out["teacher_available"] = {
                name: torch.full((len(loaded),), present, dtype=torch.bool)
                for name, present in available.items()
            }
        return out

    def _feature_shape(self, name: str) -> Tuple[int, ...]:
        """(h, w, C) of teacher ``name``'s cached features (read from one cached entry, once per worker)."""
        if name not in self._feature_shapes:
            shape = cached_feature_shape(self.feature_root, name, self.fingerprints[name])
            if shape is None:
                raise RuntimeError(f"no cached features of teacher '{name}' to size its absent features from")
            self._feature_shapes[name] = shape
        return self._feature_shapes[name]

    def _projected_labels(self, scene: str, loaded: Sequence[Any], key: Callable[[str, int], str]) -> bool:
        """Give views of a scene without label images the class maps its labelled points project to, where the set-up
        pass cached them (``cache_label_maps``); whether every view got one. ``key(fingerprint, position)``: the
        cache key of ``loaded[position]``."""
        fingerprint = self.fingerprints[self.label_teacher][scene]  # type: ignore[index]
        folder = TeacherFeatureCache(self.feature_root, self.label_teacher, fingerprint).folder  # type: ignore[arg-type]
        paths = [label_map_path(folder, key(fingerprint, position)) for position in range(len(loaded))]
        if not all(p.is_file() for p in paths):
            return False
        for view, path in zip(loaded, paths, strict=True):
            with np.load(path) as stored:
                view.labels = stored["labels"].astype(np.int64)
        return True

    def _features(
        self,
        name: str,
        scene: str,
        key: Callable[[str, int], str],
        position: int,
        frames: SceneFrames,
        index: int,
    ) -> np.ndarray:
        """Teacher ``name``'s cached features of the view at ``position`` of the sample (frame ``index``)."""
        fingerprint = self.fingerprints[name][scene]
        folder = TeacherFeatureCache(self.feature_root, name, fingerprint).folder
        path = folder / f"{key(fingerprint, position)}.npy"
        try:
            # Verified (checksum) by the set-up pass of this run; a plain read here.
            return np.array(np.load(path, mmap_mode="r"))
        except OSError as err:
            raise RuntimeError(
                f"Teacher features of '{name}' for {frames.image_paths[index]} at {self.config.image_size} are not "
                f"cached ({path}): the datamanager's set-up extracts every image of the splits in use; was it run "
                "with other teachers or another image size?"
            ) from err


def cached_view_overlap(frames: SceneFrames, root: Path, tolerance: float) -> np.ndarray:
    """``view_overlap`` of a scene, kept under ``root`` by a hash of its transforms.json (any change recomputes)."""
    digest = hashlib.sha1((frames.root / "transforms.json").read_bytes())
    digest.update(f"v{OVERLAP_VERSION}:{tolerance}".encode())
    path = Path(root) / f"{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            overlap = np.load(path)
            if overlap.shape == (len(frames), len(frames)):
                return overlap
        except (OSError, ValueError):
            pass  # unreadable: computed again below
    overlap = view_overlap(frames, tolerance)
    write_atomically(path, lambda stream: np.save(stream, overlap), durable=False)
    return overlap


# ------------------------------------------------------------------------------------------ datamanager


class MultiSceneDataManager(DataManager):
    """See the module docstring. ``next_train(step)`` returns ``(context, batch)``: what a model consumes at
    inference, and the whole batch (context and target views) for its losses, on the training device."""

    config: MultiSceneDataManagerConfig

    def __init__(
        self,
        config: MultiSceneDataManagerConfig,
        device: str = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ) -> None:
        self.config = config
        self.device = device
        self.test_mode = test_mode
        self.world_size = world_size
        self.local_rank = local_rank
        # The share of the sample stream is the global rank's: several machines each have a local rank 0.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else local_rank
        if config.data is None:
            raise ValueError(
                "MultiSceneDataManager needs a collection: --data COLLECTION (its collection.json)"
            )
        self.collection = SceneCollection.load(config.data)
        self.teacher_configs = configured_teachers(
            config.teachers, config.teacher_checkpoints, config.teacher_random_weights
        )
        self.label_teacher = next(
            (
                c.name
                for c in self.teacher_configs
                if isinstance(c, LabelsTeacherConfig) and c.variant == "semantic"
            ),
            None,
        )
        """The semantic label proxy, whose clean maps of labelled points stand in for missing label images."""
        self.train_scenes = self._usable(config.train_split)
        self.eval_scenes = self._usable(config.eval_split)
        if not self.train_scenes and test_mode == "val":
            raise ValueError(
                f"{config.data}: no scene of the '{config.train_split}' split has the "
                f"{config.views.views_per_sample} views a sample needs"
            )
        self.feature_root = Path(config.feature_cache_dir or default_cache_root())
        self.overlap_root = Path(config.overlap_cache_dir or self.feature_root.parent / "view_overlap")
        self.fingerprints: Fingerprints = {}
        if self.teacher_configs and test_mode != "inference":
            self.fingerprints = self.prepare_teacher_features()
        epoch = config.samples_per_epoch or len(self.train_scenes)
        self.train_dataset = (
            self._dataset(self.train_scenes, epoch, source_weights(self.train_scenes, config.real_share))
            if self.train_scenes
            else None
        )
        self.eval_dataset = (
            self._dataset(self.eval_scenes, len(self.eval_scenes)) if self.eval_scenes else None
        )
        self._train_iterator: Optional[Iterator] = None
        # Sample ids of every training batch served so far, in order: the share of the stream this rank took.
        self.served_sample_ids: List[int] = []
        self._eval_iterator: Optional[Iterator] = None
        super().__init__()

    def _usable(self, split: str) -> List[SceneEntry]:
        """The split's scenes with enough views for a sample (the others are reported once)."""
        scenes = self.collection.split(split)[: self.config.max_scenes]
        need = self.config.views.views_per_sample
        usable = [s for s in scenes if s.num_views >= need]
        if len(usable) < len(scenes):
            CONSOLE.log(
                f"[yellow]{len(scenes) - len(usable)} scene(s) of the '{split}' split have fewer than the {need} views "
                f"a sample needs and are left out (e.g. {next(s.name for s in scenes if s.num_views < need)})."
            )
        proxies = [c.name for c in self.teacher_configs if reads_the_scene(c._target)]
        if proxies:  # a label proxy has nothing to say about an unlabelled scene
            labelled = [s for s in usable if s.has_labels or s.has_labeled_points]
            if len(labelled) < len(usable) and self.config.unlabelled_scenes == "geometry":
                CONSOLE.log(
                    f"{len(usable) - len(labelled)} scene(s) of the '{split}' split have no labels for the label "
                    f"proxy teacher(s) {proxies}: they train geometry and appearance only."
                )
                return usable
            if len(labelled) < len(usable):
                CONSOLE.log(
                    f"[yellow]{len(usable) - len(labelled)} scene(s) of the '{split}' split have no labels for the "
                    f"label proxy teacher(s) {proxies} and are left out (e.g. "
                    f"{next(s.name for s in usable if not (s.has_labels or s.has_labeled_points))})."
                )
            usable = labelled
        return usable

    def _dataset(
        self, scenes: Sequence[SceneEntry], epoch_length: int, weights: Optional[np.ndarray] = None
    ) -> SceneSampleDataset:
        # Every rank takes as many samples per epoch, so that the ranks stay in step with one another.
        epoch_length = -(-max(epoch_length, 1) // self.world_size) * self.world_size
        return SceneSampleDataset(
            self.collection,
            scenes,
            self.config,
            self.fingerprints,
            self.feature_root,
            self.overlap_root,
            epoch_length,
            self.label_teacher,
            weights,
        )

    # ------------------------------------------------------------------ teacher features
    def prepare_teacher_features(self) -> Fingerprints:
        """Make sure every image of the train and eval splits has cached features of every teacher (at
        ``image_size``); returns each teacher's fingerprint per scene. Under DistributedDataParallel rank 0 extracts
        while the other ranks wait for its fingerprints."""
        scenes = [
            (s.name, str(self.collection.scene_path(s)))
            for s in {s.name: s for s in self.train_scenes + self.eval_scenes}.values()
        ]

        def extract() -> Fingerprints:
            return extract_collection_features(
                scenes,
                self.teacher_configs,
                tuple(self.config.image_size),
                self.feature_root,
                self.config.extraction_batch_size,
                self.config.extraction_workers,
                self.config.teacher_device,
                self.collection.classes,
            )

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed:
            return extract()
        found = [extract() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(found, src=0)  # the other ranks wait here meanwhile
        return found[0]

    def teacher_specs(self) -> Dict[str, TeacherSpec]:
        """What a model needs of each teacher to build its projector head: feature size and grid (read from one
        cached entry), whether it embeds text, and its config."""
        specs = {}
        for cfg in self.teacher_configs:
            shape = cached_feature_shape(self.feature_root, cfg.name, self.fingerprints.get(cfg.name) or {})
            if shape is None:
                raise RuntimeError(f"no cached features of teacher '{cfg.name}' to size its head from")
            h, w, channels = shape
            text = declared_text_encoder(cfg)
            if text is None:  # decided when built (the label proxies, by variant); cheap for those
                text = bool(cfg.setup().has_text_encoder)
            specs[cfg.name] = TeacherSpec(
                name=cfg.name,
                feature_dim=int(channels),
                feature_grid=(int(h), int(w)),
                image_size=tuple(self.config.image_size),
                has_text_encoder=text,
                config=cfg,
            )
        return specs

    # ------------------------------------------------------------------ loading
    def _loader(self, dataset: SceneSampleDataset, skip: int) -> Iterator:
        config = self.config
        workers = config.num_workers
        return iter(
            DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=ShardedSampleSampler(dataset.epoch_length, self.rank, self.world_size, skip),
                num_workers=workers,
                prefetch_factor=config.prefetch_factor if workers > 0 else None,
                pin_memory=config.pin_memory and torch.cuda.is_available(),
                persistent_workers=workers > 0,
                collate_fn=collate_samples,
            )
        )

    def setup_train(self) -> None:
        """Nothing to do ahead: the loader starts at the first ``next_train``, at that step's place in the stream."""

    def setup_eval(self) -> None:
        """As ``setup_train``."""

    def next_train(self, step: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        if self.train_dataset is None:
            raise RuntimeError("this datamanager has no training scenes")
        if self._train_iterator is None:  # first call, or a resumed run: continue the stream at this step
            self._train_iterator = self._loader(self.train_dataset, step * self.config.batch_size)
        self.train_count += 1
        host = next(self._train_iterator)
        self.served_sample_ids.extend(int(i) for i in host["sample_id"])  # read on the host, before the copy
        batch = to_device(host, self.device)
        return batch["context"], batch

    def next_eval(self, step: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        if self.eval_dataset is None:
            raise RuntimeError(f"this collection has no usable '{self.config.eval_split}' scenes to evaluate")
        if self._eval_iterator is None:
            self._eval_iterator = self._loader(self.eval_dataset, 0)
        self.eval_count += 1
        batch = to_device(next(self._eval_iterator), self.device)
        return batch["context"], batch

    def next_eval_image(self, step: int) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        return self.next_eval(step)

    def get_train_rays_per_batch(self) -> int:
        height, width = self.config.image_size
        return self.config.batch_size * self.config.views.num_target_views * height * width

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

    def get_datapath(self) -> Path:
        return Path(self.config.data)

    def get_param_groups(self) -> Dict[str, List[torch.nn.Parameter]]:
        return {}


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor on ``device`` (non-blocking: pinned batches copy while the GPU works)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ------------------------------------------------------------------------------- collection extraction


def _teacher_device(choice: str, worker: int) -> str:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{worker % max(torch.cuda.device_count(), 1)}"


Fingerprints = Dict[str, Dict[str, str]]
"""teacher name -> scene name -> the teacher's fingerprint for that scene (its cache folder and keys)."""


def scene_views(frames: SceneFrames, size: Tuple[int, int]) -> List[SceneView]:
    """A scene's views as served, for teachers that read the scene (``Teacher.prepare_scene``). Those teachers
    resize label and depth images to the image size without cropping, so the served size must keep the stored
    aspect ratio (within 1%)."""
    height, width = (int(v) for v in frames.sizes[0])
    if abs((size[1] / size[0]) / (width / height) - 1.0) > 0.01:
        raise ValueError(
            f"{frames.root}: a teacher that reads the scene (a label proxy) needs the served image_size {size} to "
            f"keep the images' aspect ratio ({height}x{width}); choose e.g. ({size[0]}, "
            f"{round(size[0] * width / height)})."
        )
    return [
        SceneView(
            image=torch.from_numpy(frames.load_image(i, size)),
            intrinsics=torch.from_numpy(frames.served_intrinsics(i, size)).float(),
            camera_to_world=torch.from_numpy(frames.camera_to_world[i, :3]).float(),
            label_path=None if frames.label_paths is None else frames.label_paths[i],
            instance_path=None if frames.instance_paths is None else frames.instance_paths[i],
            depth_path=None if frames.depth_paths is None else frames.depth_paths[i],
        )
        for i in range(len(frames))
    ]


def scene_metadata(frames: SceneFrames, labeled_points: Optional[Path], classes: Dict[int, str]) -> dict:
    """What ``Teacher.prepare_scene`` reads of a scene served in its own frame (no dataparser transform); the class
    table is the scene's own where it has one, else ``classes``."""
    metadata = {
        DATAPARSER_TRANSFORM_KEY: torch.eye(4)[:3],
        DATAPARSER_SCALE_KEY: 1.0,
        DEPTH_SCALE_KEY: frames.depth_scale,
        CLASS_NAMES_KEY: dict(frames.class_names or classes),  # the ids its label images hold
    }
    if labeled_points is not None and labeled_points.is_file():
        metadata[LABELED_POINTS_KEY] = labeled_points
    return metadata


def _extract_shard(
    scenes: Sequence[Tuple[str, str]],
    teacher_configs: Sequence[TeacherConfig],
    size: Tuple[int, int],
    cache_root: Path,
    batch_size: int,
    device: str,
    classes: Dict[int, str],
    counter: Optional[Any] = None,
    show_progress: bool = True,
) -> Fingerprints:
    """Verify and extract the features of every view of ``scenes`` ((name, folder) pairs) for every teacher;
    returns each teacher's fingerprint per scene. ``counter``: a shared ``multiprocessing.Value`` advanced per
    image done (all teachers count)."""

    def build(cfg: TeacherConfig) -> Teacher:
        return cfg.setup().to(device).eval()

    # The networks are loaded only if some image's features are missing (a resumed or repeated run loads none).
    teachers = teachers_to_extract(teacher_configs, build)
    fingerprints: Fingerprints = {t.name: {} for t in teachers}

    def advance(n: int) -> None:
        if counter is not None:
            with counter.get_lock():
                counter.value += n

    # Teachers that read the scene are prepared, and cached, scene by scene; the others see the whole shard at
    # once (one progress display, full batches).
    per_scene = [t for t in teachers if reads_the_scene(t)]
    shared = [t for t in teachers if not reads_the_scene(t)]
    all_frames = {name: SceneFrames.load(Path(folder)) for name, folder in scenes}
    images = [(name, view) for name, frames in all_frames.items() for view in range(len(frames))]

    def get_image(i: int) -> torch.Tensor:
        name, view = images[i]
        return torch.from_numpy(all_frames[name].load_image(view, size))

    names = [str(all_frames[name].image_paths[view]) for name, view in images]
    with torch.no_grad():
        if shared:
            caches = [TeacherFeatureCache(cache_root, t.name, t.fingerprint()) for t in shared]
            # One decode per image for every teacher's key; decoding runs outside the GIL, so threads share it.
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                keys = list(
                    pool.map(
                        lambda i: [image_key(get_image(i), c.fingerprint) for c in caches], range(len(images))
                    )
                )
            for t, (teacher, cache) in enumerate(zip(shared, caches, strict=True)):
                cache_teacher_features(
                    teacher, cache, [k[t] for k in keys], get_image, batch_size, names, advance, show_progress
                )
                fingerprints[teacher.name] = {name: cache.fingerprint for name in all_frames}
        if per_scene:
            labeled = dict(scenes)
            for name, frames in (
                logged_progress(
                    list(all_frames.items()), "Teacher features of scene-reading teachers", unit="scenes"
                )
                if show_progress
                else all_frames.items()
            ):
                points = labelled_points_path(Path(labeled[name]))
                if frames.label_paths is None and points is None:
                    advance(len(frames) * len(per_scene))
                    continue  # nothing for a label proxy to read: its features stay absent (unlabelled_scenes)
                views = scene_views(frames, size)
                metadata = scene_metadata(frames, points, classes)
                for teacher in per_scene:
                    teacher.prepare_scene(views, metadata)
                    cache = TeacherFeatureCache(cache_root, teacher.name, teacher.fingerprint())
                    view_keys = [image_key(v.image, cache.fingerprint) for v in views]
                    cache_teacher_features(
                        teacher,
                        cache,
                        view_keys,
                        lambda i, views=views: views[i].image,
                        batch_size,
                        [str(p) for p in frames.image_paths],
                        advance,
                        show_progress=False,
                    )
                    fingerprints[teacher.name][name] = cache.fingerprint
                    if frames.label_paths is None:  # then it has labelled points (see above)
                        cache_label_maps(teacher, cache.folder, view_keys)
    return fingerprints


def cached_feature_shape(
    feature_root: Path, name: str, fingerprints: Mapping[str, str]
) -> Optional[Tuple[int, ...]]:
    """(h, w, C) of teacher ``name``'s cached features, read from one entry of one of its scenes' cache folders
    (``fingerprints``: scene -> fingerprint); None when nothing is cached."""
    fingerprint = next(iter(fingerprints.values()), None)
    if fingerprint is None:
        return None
    entry = next(TeacherFeatureCache(feature_root, name, fingerprint).folder.glob("*.npy"), None)
    return None if entry is None else tuple(np.load(entry, mmap_mode="r").shape)


LABEL_MAP_SUFFIX = ".labels.npz"
"""Beside a label proxy's cached features: the clean class map of the same image (``.npz``, so that the feature
folder's ``*.npy`` stay features alone)."""


def label_map_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"{key}{LABEL_MAP_SUFFIX}"


def cache_label_maps(teacher: Teacher, folder: Path, keys: Sequence[str]) -> None:
    """Cache the clean class maps of a prepared semantic label proxy (the labelled points projected into each view,
    ``LabelsTeacher.label_maps``) for a scene without label images: its held-out views are then scored in 2D like
    those of a scene with label images. Resumable: maps already cached are kept."""
    if not isinstance(teacher, LabelsTeacher) or teacher.config.variant != "semantic":
        return
    todo = [i for i, key in enumerate(keys) if not label_map_path(folder, key).is_file()]
    if not todo:
        return
    for i, labels in zip(todo, teacher.label_maps(positions=todo), strict=True):
        array = labels.numpy()
        array = array.astype(np.uint16 if array.size == 0 or int(array.max()) < 2**16 else np.int32)
        write_atomically(
            label_map_path(folder, keys[i]),
            lambda f, a=array: np.savez_compressed(f, labels=a),
            durable=False,
        )


def _extraction_worker(worker: int, args: tuple) -> None:
    scenes, configs, size, root, batch_size, device_choice, classes, workers, counter, results = args
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    device = _teacher_device(device_choice, worker)
    found = _extract_shard(
        scenes[worker::workers],
        configs,
        size,
        root,
        batch_size,
        device,
        classes,
        counter,
        show_progress=False,
    )
    results.put(found)


def extract_collection_features(
    scenes: Sequence[Tuple[str, str]],
    teacher_configs: Sequence[TeacherConfig],
    size: Tuple[int, int],
    cache_root: Path,
    batch_size: int = 8,
    workers: int = 1,
    device: str = "auto",
    classes: Optional[Dict[int, str]] = None,
) -> Fingerprints:
    """Make sure every view of ``scenes`` ((name, folder) pairs), served at ``size``, has cached features of every
    teacher; returns each teacher's fingerprint per scene (what the samples look features up by). Resumable:
    finished images are verified, not redone. With ``workers`` > 1, that many processes share the scenes, each
    with its own teachers, and one progress display counts them all."""
    if not teacher_configs or not scenes:
        return {cfg.name: {} for cfg in teacher_configs}
    start = time.perf_counter()
    classes = dict(classes or {})
    num_images = sum(len(SceneFrames.load(Path(folder))) for _, folder in scenes)
    CONSOLE.log(
        f"Teacher features for the collection: {len(scenes)} scenes, {num_images} images x "
        f"{len(teacher_configs)} teacher(s) at {size[0]}x{size[1]}, in {workers} process(es)."
    )
    if workers <= 1:
        fingerprints = _extract_shard(
            scenes, teacher_configs, size, cache_root, batch_size, _teacher_device(device, 0), classes
        )
    else:
        context = mp.get_context("spawn")  # CUDA cannot be used in forked children
        counter, results = context.Value("q", 0), context.SimpleQueue()
        shared = (list(scenes), list(teacher_configs), size, cache_root, batch_size, device, classes, workers)
        processes = [
            context.Process(target=_extraction_worker, args=(w, (*shared, counter, results)))
            for w in range(workers)
        ]
        for p in processes:
            p.start()
        fingerprints = {cfg.name: {} for cfg in teacher_configs}
        try:
            with ProgressLog(
                "Teacher features (collection)", num_images * len(teacher_configs), "images"
            ) as progress:
                while any(p.is_alive() for p in processes):
                    time.sleep(0.2)
                    progress.advance(counter.value - progress.done)
                    while not results.empty():
                        for name, found in results.get().items():
                            fingerprints[name].update(found)
                progress.advance(counter.value - progress.done)
        finally:
            for p in processes:
                p.join()
        while not results.empty():
            for name, found in results.get().items():
                fingerprints[name].update(found)
        failed = [w for w, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise RuntimeError(
                f"Teacher feature extraction failed in worker process(es) {failed} (see their errors above); "
                "what they finished is cached, and the next run resumes."
            )
    CONSOLE.log(f"Teacher features for the collection ready in {time.perf_counter() - start:.1f} s.")
    return fingerprints
