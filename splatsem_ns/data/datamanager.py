"""Full-image datamanager that also serves cached teacher features for every training image.

On training set-up it runs each teacher once over the (undistorted) training images, with a progress
bar, into the on-disk fp16 cache, then frees the teachers. Each training batch carries
``batch["teacher_features"][name]``: that image's ``[h, w, C]`` features, read from a memory map, and, where
every training view has depth, ``batch["teacher_weights"][name]``: the ``[h, w]`` cross-view consistency weights
of those features (0 on regions the other views contradict; ``splatsem_ns.teachers.consistency``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from nerfstudio.data.datamanagers.full_images_datamanager import (
    FullImageDatamanager,
    FullImageDatamanagerConfig,
)
from nerfstudio.utils.rich_utils import CONSOLE

from splatsem_ns.data.dataparser import (
    DATAPARSER_SCALE_KEY,
    DATAPARSER_TRANSFORM_KEY,
    DEPTH_SCALE_KEY,
    INSTANCE_FILENAMES_KEY,
    SEMANTIC_FILENAMES_KEY,
    SplatsemDataParserConfig,
    scene_depth_scale,
)
from splatsem_ns.data.depth import DEPTH_SERVED_KEY, load_depth_image
from splatsem_ns.data.host_camera import HOST_CAMERA_KEY, HostCameraCache
from splatsem_ns.evaluation.voting import ViewLabels
from splatsem_ns.teachers.base import (
    TEACHER_SPECS_KEY,
    DeferredTeacher,
    SceneView,
    Teacher,
    TeacherConfig,
    TeacherSpec,
    reads_the_scene,
    teachers_to_extract,
)
from splatsem_ns.teachers.cache import default_cache_root, extract_teacher_features
from splatsem_ns.teachers.consistency import ConsistencyConfig, consistency_weights
from splatsem_ns.teachers.consistency_cache import ConsistencyCache, consistency_key, views_digest
from splatsem_ns.teachers.registry import DEFAULT_TEACHERS, check_teacher_names, configured_teachers


def startup_step(what: str) -> None:
    """Log that a step of training's start-up begins."""
    CONSOLE.log(f"Start-up: {what}...")


@dataclass
class ChorusDataManagerConfig(FullImageDatamanagerConfig):
    """Full images plus teacher features."""

    _target: Type = field(default_factory=lambda: ChorusDataManager)
    dataparser: SplatsemDataParserConfig = field(
        default_factory=lambda: SplatsemDataParserConfig(load_3D_points=True)
    )
    """Reads nerfstudio transforms.json scenes and checks them (files, poses, point cloud) before training."""
    cache_images_type: Literal["uint8", "float32"] = "uint8"
    """Training images are kept in memory as uint8 (a quarter of float32's footprint)."""
    teachers: Tuple[str, ...] = DEFAULT_TEACHERS
    """Teacher presets to distill (names from splatsem_ns.teachers.registry, or ones you registered)."""
    teacher_checkpoints: Dict[str, Path] = field(default_factory=dict)
    """Local weights per teacher name, e.g. ``--pipeline.datamanager.teacher-checkpoints sam /path/sam_vit_b.pth``."""
    teacher_random_weights: bool = False
    """Build every teacher with random weights (tests and speed benchmarks only: the features mean nothing)."""
    teacher_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where teachers run during extraction; "auto" follows the training device."""
    feature_cache_dir: Optional[Path] = None
    """Feature cache folder; default ``$SPLATSEM_CACHE`` or ``~/.cache/splatsem_ns/teacher_features``. It also
    holds the cross-view consistency weights (``teachers.consistency_cache``)."""
    extraction_batch_size: int = 4
    """Images per teacher forward pass during extraction."""
    pinned_features_gib: float = 2.0
    """On CUDA, hold what a step serves per view (the teachers' features, then the depth images, then the
    consistency weights, each kind whole) in pinned host memory while the total fits in this many GiB (ScanNet's
    50 frames with three full-size teachers: about 0.25 of features and 0.03 of depth), so a step copies them to
    the GPU directly instead of first copying them into a staging buffer. What does not fit is staged every step.
    0: stage everything."""
    teacher_consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    """Before training, each teacher's regions that the other training views contradict get weight 0 in the
    distillation loss (needs a depth image for every training view; splatsem_ns.teachers.consistency)."""
    load_depth: Literal["off", "on", "auto"] = "off"
    """Serve each training image's sensor depth (scene units, 0 = no measurement) as ``batch["depth_image"]``:
    "on" requires depth images, "auto" serves them when every training view has one. Set by the pipeline from
    the model's depth loss weight."""

    def __post_init__(self) -> None:
        # Checked when the command line is parsed, before any data loads (a typo should cost seconds, not the
        # image loading and feature extraction that come first in set-up).
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_teacher_names(self.teachers)


class ChorusDataManager(FullImageDatamanager):
    """See the module docstring."""

    config: ChorusDataManagerConfig

    def __init__(self, config: ChorusDataManagerConfig, device="cpu", test_mode="val", **kwargs) -> None:
        if not torch.cuda.is_available() and config.cache_images == "cpu":
            # nerfstudio pins "cpu"-cached images, which needs CUDA; on a CPU machine "gpu" means the device.
            config.cache_images = "gpu"
        if not config.teachers:
            raise ValueError(
                "No teachers given: pass at least one, e.g. --pipeline.datamanager.teachers tiny-dinov2"
            )
        start = time.perf_counter()
        # Each step of start-up says that it began, in plain log lines: on a busy machine one can take minutes.
        startup_step("checking the scene and loading its images")
        super().__init__(config, device=device, test_mode=test_mode, **kwargs)
        self._features: Dict[str, List[np.memmap]] = {}
        self._depths: List[torch.Tensor] = []
        self._weights: Dict[str, List[np.ndarray]] = {}
        self.serves_teachers_at: Optional[Callable[[int], bool]] = None
        """Set by the pipeline: whether a training step needs the teachers' features (None: every step)."""
        self._host_cameras: Optional[HostCameraCache] = None  # built on the first training step
        if test_mode == "val":  # training; ns-eval and ns-viewer restore heads from the checkpoint instead
            startup_step(f"teacher features ({', '.join(config.teachers)})")
            self._prepare_teacher_features()
            if config.load_depth == "on" or (config.load_depth == "auto" and self._every_view_has_depth()):
                startup_step("depth images")
                self._depths = self._load_train_depths()
            elif config.load_depth == "auto":
                CONSOLE.log("Not every training view has a depth image: training without the depth loss.")
            self.train_dataset.metadata[DEPTH_SERVED_KEY] = bool(self._depths)
            self._weights = self._consistency_weights()
            self._pin_host_inputs()
            CONSOLE.log(f"Start-up: data ready in {time.perf_counter() - start:.1f} s.")
        # Lets the model express settings in the dataset's own units (metres for depth-sensor captures).
        self.train_dataset.metadata[DATAPARSER_SCALE_KEY] = float(
            self.train_dataparser_outputs.dataparser_scale
        )

    def teacher_configs(self) -> List[TeacherConfig]:
        """The configured teachers, with their local checkpoints and the random-weights switch applied."""
        return configured_teachers(
            self.config.teachers, self.config.teacher_checkpoints, self.config.teacher_random_weights
        )

    def build_teacher(self, config: TeacherConfig) -> Teacher:
        device = self.device if self.config.teacher_device == "auto" else self.config.teacher_device
        return config.setup().to(device).eval()

    def scene_views(self) -> List[SceneView]:
        """Every train and eval view as the model sees it (undistorted images and their cameras)."""
        views = []
        for split, dataset, images in (
            ("train", self.train_dataset, self.cached_train),
            ("eval", self.eval_dataset, self.cached_eval),
        ):
            meta = dataset.metadata
            labels = meta.get(SEMANTIC_FILENAMES_KEY) or [None] * len(dataset)
            instances = meta.get(INSTANCE_FILENAMES_KEY) or [None] * len(dataset)
            depths = meta.get("depth_filenames") or [None] * len(dataset)
            for i, data in enumerate(images):
                # Cameras are read after the images are cached: caching undistorts and updates intrinsics.
                camera = dataset.cameras[i]
                views.append(
                    SceneView(
                        image=data["image"],
                        intrinsics=camera.get_intrinsics_matrices(),
                        camera_to_world=camera.camera_to_worlds,
                        split=split,
                        label_path=labels[i],
                        instance_path=instances[i],
                        depth_path=depths[i],
                    )
                )
        return views

    def scene_metadata(self) -> dict:
        """Dataparser metadata plus the transform that maps the dataset's original frame into the cameras' frame
        (annotations such as labelled point clouds are stored in the original frame)."""
        outputs = self.train_dataparser_outputs
        return {
            **outputs.metadata,
            DATAPARSER_TRANSFORM_KEY: outputs.dataparser_transform,
            DATAPARSER_SCALE_KEY: float(outputs.dataparser_scale),
            DEPTH_SCALE_KEY: float(outputs.metadata.get(DEPTH_SCALE_KEY, 1e-3)),
        }

    def _prepare_teacher_features(self) -> None:
        cache_root = self.config.feature_cache_dir or default_cache_root()
        teachers = teachers_to_extract(self.teacher_configs(), self.build_teacher)
        scene_readers = [t for t in teachers if reads_the_scene(t)]
        if scene_readers:
            views, metadata = self.scene_views(), self.scene_metadata()
            for teacher in scene_readers:
                teacher.prepare_scene(views, metadata)
        images = self.cached_train
        self._features = extract_teacher_features(
            teachers,
            num_images=len(images),
            get_image=lambda i: images[i]["image"],
            cache_root=cache_root,
            image_names=[str(p) for p in self.train_dataset.image_filenames],
            batch_size=self.config.extraction_batch_size,
        )
        specs = {}
        height, width = images[0]["image"].shape[:2]
        for teacher in teachers:
            first = self._features[teacher.name][0]
            specs[teacher.name] = TeacherSpec(
                name=teacher.name,
                feature_dim=int(first.shape[-1]),
                feature_grid=(int(first.shape[0]), int(first.shape[1])),
                image_size=(int(height), int(width)),
                has_text_encoder=teacher.has_text_encoder,
                config=teacher.config,
            )
        self.train_dataset.metadata[TEACHER_SPECS_KEY] = specs
        unloaded = [t.name for t in teachers if isinstance(t, DeferredTeacher) and not t.built]
        CONSOLE.log(
            f"Teacher features ready in {cache_root}: "
            + ", ".join(
                f"{s.name} {s.feature_dim}x{s.feature_grid[0]}x{s.feature_grid[1]}" for s in specs.values()
            )
            + (f" (all cached; not loaded: {', '.join(unloaded)})" if unloaded else "")
        )
        # Teachers are not needed while training; give their memory back to the Gaussians.
        del teachers
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _every_view_has_depth(self) -> bool:
        paths = self.train_dataset.metadata.get("depth_filenames")
        return bool(paths) and len(paths) == len(self.train_dataset) and all(p is not None for p in paths)

    def _load_train_depths(self) -> List[torch.Tensor]:
        """Every training view's depth image at its colour image's size, in scene units, float16 [H, W]."""
        meta = self.train_dataset.metadata
        paths = meta.get("depth_filenames")
        if not paths:
            raise ValueError(
                "The depth loss is on (--pipeline.model.depth-loss-weight > 0) but this scene has no depth "
                "images: give depth_file_path per frame in transforms.json, or set the weight to 0."
            )
        scale = scene_depth_scale(self.scene_metadata())
        depths = []
        for path, data in zip(paths, self.cached_train, strict=True):
            height, width = data["image"].shape[:2]
            depths.append(load_depth_image(Path(path), (height, width), scale))
        CONSOLE.log(f"Loaded {len(depths)} depth images for the depth loss.")
        return depths

    def _consistency_weights(self) -> Dict[str, List[np.ndarray]]:
        """Per teacher, one ``[h, w]`` float16 weight map per training view (see ``teacher_consistency``); empty
        when that check is off or a training view has no depth image."""
        cfg = self.config.teacher_consistency
        if not cfg.enabled:
            return {}
        if not self._every_view_has_depth():
            CONSOLE.log(
                "Not every training view has a depth image: no cross-view consistency check of teachers."
            )
            return {}
        startup_step("cross-view consistency check of the teachers' features")
        depths = self._depths or self._load_train_depths()
        cameras = self.train_dataset.cameras
        views = [
            ViewLabels(
                labels=np.zeros((1, 1), dtype=np.int64),  # unused: the check segments the features itself
                K=cameras[i].get_intrinsics_matrices().numpy(),
                camera_to_world=cameras.camera_to_worlds[i].numpy(),
                image_size=tuple(data["image"].shape[:2]),
                depth=depths[i].float().numpy(),
            )
            for i, data in enumerate(self.cached_train)
        ]
        # The tolerance is given in the dataset's original units; the cameras and depths are in scene units.
        tolerance = cfg.depth_tolerance * float(self.train_dataparser_outputs.dataparser_scale)
        # Stored beside the features: the check is deterministic, and its inputs are all in the key.
        cache = ConsistencyCache(self.config.feature_cache_dir or default_cache_root())
        shared = views_digest(views, cfg, tolerance)
        result = {}
        for name, maps in self._features.items():
            features = [torch.from_numpy(np.asarray(m)) for m in maps]
            key = consistency_key(features, shared)
            weights = cache.load(name, key, [tuple(f.shape[:2]) for f in features])
            stored = weights is not None
            if weights is None:
                weights = consistency_weights(
                    features, views, cfg, tolerance, progress=f"Cross-view consistency: {name}"
                )
                weights = [w.astype(np.float16) for w in weights]
                cache.save(name, key, weights)
            dropped = float(np.mean([1.0 - w.astype(np.float32).mean() for w in weights]))
            touched = sum(bool((w == 0).any()) for w in weights)
            CONSOLE.log(
                f"Cross-view consistency: {name}: weight 0 on {dropped:.1%} of the feature cells, in {touched} "
                f"of {len(weights)} views" + (" (stored by an earlier run)." if stored else ".")
            )
            result[name] = weights
        return result

    def teacher_weights(self, image_idx: int) -> Dict[str, torch.Tensor]:
        """``{teacher: [h, w] float16}`` cross-view consistency weights of one training image (empty when off)."""
        return {name: self._to_device(maps[image_idx]) for name, maps in self._weights.items()}

    def _pin_host_inputs(self) -> None:
        """On CUDA, the teachers' features, the depth images and the consistency weights into pinned host memory,
        in that order, each kind whole while the running total fits ``pinned_features_gib``."""
        if torch.device(self.device).type != "cuda":
            return
        budget, used = self.config.pinned_features_gib * 2**30, 0

        def fits(arrays: Sequence) -> bool:
            nonlocal used
            size = sum(int(a.nbytes) for a in arrays)
            if not 0 < size <= budget - used:
                return False
            used += size
            return True

        if fits([m for maps in self._features.values() for m in maps]):
            self._features = {
                name: [torch.from_numpy(np.array(m)).pin_memory() for m in maps] for name, maps in self._features.items()
            }  # fmt: skip
        if fits(self._depths):
            self._depths = [depth.pin_memory() for depth in self._depths]
        if fits([w for maps in self._weights.values() for w in maps]):
            self._weights = {
                name: [torch.from_numpy(w).pin_memory() for w in maps] for name, maps in self._weights.items()
            }

    def _to_device(self, host) -> torch.Tensor:
        """A copy of a host array (a read-only memory map, say) on the training device.

        On CUDA the array is read once into pinned host memory and copied to the GPU asynchronously: a copy from
        pageable memory would block the host until the GPU has drained every queued kernel, every step. torch's
        pinned-memory allocator keeps a block out of reuse until the copy that reads it has finished, so the
        staging buffers need no bookkeeping here.
        """
        if isinstance(host, torch.Tensor):
            if host.is_pinned():  # pinned at start-up (_pin_host_inputs), and never written again
                return host.to(self.device, non_blocking=True)
            host = host.numpy()
        if torch.device(self.device).type != "cuda":
            return torch.from_numpy(np.array(host)).to(self.device)  # copy: the array may be read-only
        dtype = torch.from_numpy(np.empty(0, dtype=host.dtype)).dtype
        pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
        np.copyto(pinned.numpy(), host, casting="no")
        return pinned.to(self.device, non_blocking=True)

    def teacher_features(self, image_idx: int) -> Dict[str, torch.Tensor]:
        """``{teacher: [h, w, C] float16}`` of one training image, on the training device."""
        return {name: self._to_device(maps[image_idx]) for name, maps in self._features.items()}

    def next_train(self, step: int):
        camera, data = super().next_train(step)
        # The dataset's own cameras, on the host, as set-up left them (undistorted).
        if self._host_cameras is None:
            self._host_cameras = HostCameraCache(self.train_dataset.cameras, self.device)
        camera.metadata[HOST_CAMERA_KEY] = self._host_cameras.for_camera(int(camera.metadata["cam_idx"]))
        # Not on the steps where the model skips its semantic half (ChorusSplatModelConfig.semantic_every).
        teachers = self.serves_teachers_at is None or self.serves_teachers_at(step)
        if teachers and self._features:
            data["teacher_features"] = self.teacher_features(int(camera.metadata["cam_idx"]))
        if teachers and self._weights:
            data["teacher_weights"] = self.teacher_weights(int(camera.metadata["cam_idx"]))
        if self._depths:
            data["depth_image"] = self._to_device(self._depths[int(camera.metadata["cam_idx"])])
        return camera, data
