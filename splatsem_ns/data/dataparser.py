"""A nerfstudio-format dataparser that checks the dataset first and carries semantic annotations.

nerfstudio's own parser fails late and vaguely on a broken dataset (an ``AssertionError`` deep in a
worker, a NaN loss after minutes, a ``KeyError`` on a frame). This one inspects ``transforms.json``,
the images (decoded once), the depth image sizes and the seed point cloud before nerfstudio touches them and raises a
:class:`DatasetError` naming the file (and frame) and the problem. It also reads point clouds with
plyfile instead of open3d, and passes per-image semantic/instance label files, class names and the
labelled point cloud on to the datamanager through ``DataparserOutputs.metadata``.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE
from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image
from torch import Tensor

from splatsem_ns.data.depth import check_depth_size, depth_seed_points
from splatsem_ns.data.ply_io import PointCloud, PointCloudError, read_point_cloud

SEMANTIC_FILENAMES_KEY = "semantic_filenames"
"""Metadata key: per-image class-id label images (``List[Path]``, aligned with ``image_filenames``)."""
INSTANCE_FILENAMES_KEY = "instance_filenames"
"""Metadata key: per-image instance-id images (``List[Path]``, aligned with ``image_filenames``)."""
CLASS_NAMES_KEY = "class_names"
"""Metadata key: ``Dict[int, str]`` from ``classes.json`` (class id -> name; 0 is unlabelled)."""
LABELED_POINTS_KEY = "labeled_points_path"
"""Metadata key: ``Path`` of the labelled point cloud (in the dataset's original, untransformed frame)."""
DATAPARSER_TRANSFORM_KEY = "dataparser_transform"
"""Metadata key: ``[3, 4]`` (or ``[4, 4]``) transform from the dataset's original frame to the cameras'
frame."""
DATAPARSER_SCALE_KEY = "dataparser_scale"
"""Metadata key: scale applied after ``dataparser_transform`` (nerfstudio's ``dataparser_scale``)."""
DEPTH_SCALE_KEY = "depth_unit_scale_factor"
"""Metadata key: depth image units -> metres of the original frame (nerfstudio's key; default 0.001)."""


def scene_depth_scale(metadata: Dict) -> float:
    """Depth image units -> scene (cameras') units: ``DEPTH_SCALE_KEY`` (default 0.001) times
    ``DATAPARSER_SCALE_KEY`` (default 1)."""
    return float(metadata.get(DEPTH_SCALE_KEY, 1e-3)) * float(metadata.get(DATAPARSER_SCALE_KEY, 1.0))


_FRAME_FILE_KEYS = {
    "depth_file_path": "depth",
    "semantic_file_path": "semantic label",
    "instance_file_path": "instance",
    "mask_path": "mask",
}
_INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
_MAX_LISTED = 5
_LOG_CHECK_FROM = 200
"""Captures with at least this many images say how long checking them took (a visible step of start-up)."""


def _cameras_coincide(meta: Dict[str, Any]) -> bool:
    """Whether every frame's camera centre is the same point (one frame, or all taken from one spot)."""
    centres = np.array([np.asarray(f["transform_matrix"], dtype=np.float64)[:3, 3] for f in meta["frames"]])
    return len(centres) < 2 or float(np.ptp(centres, axis=0).max()) <= 1e-9


class DatasetError(ValueError):
    """The dataset cannot be used as it is. The message names the file (and frame) and the problem."""


@dataclass
class SplatsemDataParserConfig(NerfstudioDataParserConfig):
    """nerfstudio-format data (``transforms.json``), validated up front, with optional semantic labels."""

    _target: Type = field(default_factory=lambda: SplatsemDataParser)
    """Target class to instantiate."""
    load_3D_points: bool = True
    """Give the model seed points to start its Gaussians from (see ``seed_points``)."""
    seed_points: Literal["auto", "ply", "depth"] = "auto"
    """Where seed points come from. "ply": the ``ply_file_path`` named in transforms.json; "depth": the
    training views' sensor depth, back-projected (RGB-D captures); "auto": the PLY when transforms.json names
    one, else depth when the frames have ``depth_file_path``, else none (splatfacto then starts at random)."""
    depth_seed_stride: int = 4
    """Depth seeds: every this-many-th pixel of each training view's depth (at its colour image's size)."""
    depth_seed_voxel: float = 0.02
    """Depth seeds: one point per cube of this side, in the dataset's metres (before dataparser scaling)."""
    validate_images: bool = True
    """Decode every image once before training, to check that it is whole and has the size transforms.json
    states (and that each depth image has its colour image's aspect ratio). Runs in threads: ScanNet's 150
    648 x 484 JPEGs took 0.13 s on 2 cores. Turn off for very large datasets on slow storage; a broken image
    then fails while loading."""
    classes_file: str = "classes.json"
    """Class-name file (``{"1": "wall", ...}``) looked up next to transforms.json when transforms.json
    has no ``classes_file_path``. Optional."""
    labeled_points_file: str = "points_labeled.ply"
    """Labelled point cloud looked up next to transforms.json when transforms.json has no
    ``labeled_ply_file_path``. Optional; used for 3D evaluation."""


@dataclass
class SplatsemDataParser(Nerfstudio):
    """nerfstudio's parser behind a validation pass, reading point clouds with plyfile."""

    config: SplatsemDataParserConfig

    def __post_init__(self) -> None:
        self._validated_for: Optional[Path] = None
        self._point_clouds: Dict[Path, PointCloud] = {}

    # ------------------------------------------------------------------------------------------------
    # nerfstudio hooks

    def _generate_dataparser_outputs(self, split: str = "train"):
        transforms_path, meta = self._validate()
        data_dir = transforms_path.parent
        depth_seeds = split == "train" and self._wants_depth_seeds(meta)
        if depth_seeds:
            # nerfstudio's parser would warn that splatfacto starts at random (or offer a COLMAP conversion);
            # its "already asked" flags keep it quiet, the seeds come from depth below.
            self.prompted_user, self.create_pc = True, False
        fraction, auto_scale = self.config.train_split_fraction, self.config.auto_scale_poses
        self.config.train_split_fraction = self._train_split_fraction(meta)
        # nerfstudio scales the poses by 1 / their largest centred camera offset, which is zero (or rounding noise,
        # depending on the torch build) when every camera stands at one point, e.g. a capture of one view: leave
        # such poses unscaled.
        self.config.auto_scale_poses = auto_scale and not _cameras_coincide(meta)
        try:
            outputs = super()._generate_dataparser_outputs(split)
        finally:  # the saved config keeps the user's values
            self.config.train_split_fraction, self.config.auto_scale_poses = fraction, auto_scale
        if split == "train":
            self._report_split(transforms_path, meta, outputs.image_filenames, data_dir)

        frames_by_image = {self._get_fname(Path(f["file_path"]), data_dir): f for f in meta["frames"]}
        frames = [frames_by_image[Path(name)] for name in outputs.image_filenames]
        extra: Dict[str, Any] = {}
        for key, metadata_key in (
            ("semantic_file_path", SEMANTIC_FILENAMES_KEY),
            ("instance_file_path", INSTANCE_FILENAMES_KEY),
        ):
            if key in meta["frames"][0]:
                extra[metadata_key] = [self._aux_fname(Path(frame[key]), data_dir) for frame in frames]
        class_names = self._read_class_names(meta, data_dir)
        if class_names is not None:
            extra[CLASS_NAMES_KEY] = class_names
        labeled = data_dir / meta.get("labeled_ply_file_path", self.config.labeled_points_file)
        if labeled.is_file():
            extra[LABELED_POINTS_KEY] = labeled
        if depth_seeds:
            xyz, rgb = depth_seed_points(
                outputs.cameras,
                outputs.image_filenames,
                outputs.metadata["depth_filenames"],
                depth_scale=scene_depth_scale(
                    {**outputs.metadata, DATAPARSER_SCALE_KEY: outputs.dataparser_scale}
                ),
                stride=self.config.depth_seed_stride,
                voxel=self.config.depth_seed_voxel * outputs.dataparser_scale,
            )
            extra.update(points3D_xyz=xyz, points3D_rgb=rgb)
        outputs.metadata.update(extra)
        return outputs

    def _train_split_fraction(self, meta: Dict[str, Any]) -> float:
        """The training fraction to split with. nerfstudio's default 90% holds out no view of a capture with fewer
        than 10 images (it rounds the training count up); then one view is held out instead, so ns-eval has
        something to score. A fraction of exactly 1 (train on everything) is respected."""
        fraction = self.config.train_split_fraction
        n = len(meta["frames"])
        uses_split_files = any(f"{name}_filenames" in meta for name in ("train", "val", "test"))
        if self.config.eval_mode != "fraction" or uses_split_files or fraction >= 1.0 or n < 2:
            return fraction
        if math.ceil(n * fraction) < n:
            return fraction
        return (n - 1.5) / n  # ceil(n * this) = n - 1 training views, whatever the rounding

    def _report_split(
        self, transforms_path: Path, meta: Dict[str, Any], train_images: List[Path], data_dir: Path
    ) -> None:
        """Say at start-up what is held out when the split is not the usual one; no training view is an error."""
        names = {self._get_fname(Path(f["file_path"]), data_dir) for f in meta["frames"]}
        held_out = sorted(str(p.name) for p in names - {Path(p) for p in train_images})
        n = len(meta["frames"])
        if not train_images:
            raise DatasetError(
                f"{transforms_path}: the evaluation split ({self.config.eval_mode}) leaves no training view of "
                f"{n}; use --pipeline.datamanager.dataparser.eval-mode fraction, or add views."
            )
        if not held_out:
            CONSOLE.log(
                f"[yellow]No view of {n} is held out for evaluation (eval mode {self.config.eval_mode}, train "
                f"fraction {self.config.train_split_fraction}): ns-eval will have no held-out view to score."
            )
        elif (
            self.config.eval_mode == "fraction"
            and self._train_split_fraction(meta) != self.config.train_split_fraction
        ):
            CONSOLE.log(
                f"{n} views: the {self.config.train_split_fraction:.0%} training split would hold out none, so one "
                f"view is held out for evaluation ({held_out[0]}) and {n - 1} train. Train on every view with "
                "--pipeline.datamanager.dataparser.train-split-fraction 1."
            )

    def _wants_depth_seeds(self, meta: Dict[str, Any]) -> bool:
        """Whether the training split's seed points come from depth (see ``SplatsemDataParserConfig.seed_points``)."""
        mode = self.config.seed_points
        if not self.config.load_3D_points or mode == "ply" or (mode == "auto" and "ply_file_path" in meta):
            return False
        has_depth = all("depth_file_path" in f for f in meta["frames"])
        if mode == "depth" and not has_depth:
            raise DatasetError(
                "seed_points='depth' needs depth_file_path on every frame of transforms.json; "
                "use seed_points='auto' or 'ply' for this dataset."
            )
        return has_depth

    def _load_3D_points(
        self, ply_file_path: Path, transform_matrix: Float[Tensor, "3 4"], scale_factor: float
    ) -> Dict[str, Tensor]:
        """Seed points in dataparser coordinates: ``points3D_xyz`` [N, 3] float and ``points3D_rgb`` [N, 3] uint8."""
        cloud = self._point_cloud(Path(ply_file_path))
        xyz = torch.from_numpy(cloud.xyz)
        xyz = torch.cat([xyz, torch.ones_like(xyz[:, :1])], dim=-1) @ transform_matrix.T.to(xyz.dtype)
        xyz = xyz * scale_factor
        if cloud.rgb is None:
            # Without colours, start every seed at mid grey rather than failing: geometry is what matters.
            rgb = torch.full((len(cloud), 3), 128, dtype=torch.uint8)
        else:
            rgb = torch.from_numpy(cloud.rgb)
        return {"points3D_xyz": xyz, "points3D_rgb": rgb}

    # ------------------------------------------------------------------------------------------------
    # Validation

    def _validate(self) -> Tuple[Path, Dict[str, Any]]:
        """Check the dataset and return (transforms.json path, parsed JSON). Raises DatasetError."""
        data = Path(self.config.data)
        if not data.exists():
            raise DatasetError(f"data path {data} does not exist")
        transforms_path = data if data.suffix == ".json" else data / "transforms.json"
        if not transforms_path.is_file():
            raise DatasetError(
                f"{transforms_path} does not exist: expected a nerfstudio transforms.json in {data} "
                "(see `ns-process-data`, or `splatsem-synthetic` for a test scene)"
            )
        try:
            meta = json.loads(transforms_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{transforms_path} is not valid JSON: {err}") from err
        if self._validated_for == transforms_path:
            return transforms_path, meta

        if not isinstance(meta, dict):
            raise DatasetError(f"{transforms_path} must hold a JSON object, got {type(meta).__name__}")
        frames = meta.get("frames")
        if not isinstance(frames, list) or len(frames) == 0:
            raise DatasetError(f"{transforms_path} has no frames")
        if "camera_model" in meta and meta["camera_model"] not in CAMERA_MODEL_TO_TYPE:
            raise DatasetError(
                f"{transforms_path}: unknown camera_model {meta['camera_model']!r} "
                f"(known: {sorted(CAMERA_MODEL_TO_TYPE)})"
            )

        data_dir = transforms_path.parent
        for index, frame in enumerate(frames):
            self._check_frame(transforms_path, meta, index, frame)
        self._check_files(transforms_path, data_dir, meta, frames)
        if self.config.load_3D_points and "ply_file_path" in meta:
            self._point_cloud(data_dir / meta["ply_file_path"], referenced_by=transforms_path)
        self._read_class_names(meta, data_dir)
        self._validated_for = transforms_path
        return transforms_path, meta

    @staticmethod
    def _frame_name(index: int, frame: Dict[str, Any]) -> str:
        return f"frame {index} ({frame['file_path']})" if "file_path" in frame else f"frame {index}"

    def _check_frame(self, transforms_path: Path, meta: Dict[str, Any], index: int, frame: Any) -> None:
        if not isinstance(frame, dict):
            raise DatasetError(f"{transforms_path}: frame {index} is not a JSON object")
        name = self._frame_name(index, frame)
        for key in ("file_path", "transform_matrix"):
            if key not in frame:
                raise DatasetError(f"{transforms_path}: {name} has no '{key}'")
        try:
            matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{transforms_path}: {name} has a malformed transform_matrix: {err}") from err
        if matrix.shape != (4, 4):
            raise DatasetError(
                f"{transforms_path}: {name} transform_matrix must be 4x4, got shape {matrix.shape}"
            )
        if not np.isfinite(matrix).all():
            raise DatasetError(f"{transforms_path}: {name} has a non-finite transform_matrix")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-6:
            raise DatasetError(f"{transforms_path}: {name} has a singular transform_matrix (rotation part)")
        for key in _INTRINSICS:
            value = frame.get(key, meta.get(key))
            if value is None:
                raise DatasetError(f"{transforms_path}: {name} has no '{key}' and there is no global '{key}'")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DatasetError(f"{transforms_path}: {name} has an invalid '{key}': {value!r}")
            if key in ("fl_x", "fl_y", "w", "h") and value <= 0:
                raise DatasetError(f"{transforms_path}: {name} has a non-positive '{key}': {value!r}")

    def _check_files(
        self, transforms_path: Path, data_dir: Path, meta: Dict[str, Any], frames: List[Dict[str, Any]]
    ) -> None:
        downscale = self.config.downscale_factor
        full_resolution = downscale is None or downscale == 1

        def image_path(frame: Dict[str, Any]) -> Path:
            path = Path(frame["file_path"])
            return data_dir / path if full_resolution else data_dir / f"images_{downscale}" / path.name

        missing = [image_path(f) for f in frames if not image_path(f).is_file()]
        if missing:
            raise DatasetError(
                f"{transforms_path}: {len(missing)} of {len(frames)} image files are missing: "
                f"{', '.join(str(p) for p in missing[:_MAX_LISTED])}{' ...' if len(missing) > _MAX_LISTED else ''}"
            )
        for key, what in _FRAME_FILE_KEYS.items():
            having = [i for i, f in enumerate(frames) if key in f]
            if not having:
                continue
            if len(having) != len(frames):
                lacking = next(i for i, f in enumerate(frames) if key not in f)
                raise DatasetError(
                    f"{transforms_path}: '{key}' is given for {len(having)} of {len(frames)} frames; "
                    f"{self._frame_name(lacking, frames[lacking])} has none (give it for every frame or none)"
                )
            if not full_resolution:
                continue  # nerfstudio reads downscaled copies from other folders; they are checked on load
            missing = [data_dir / f[key] for f in frames if not (data_dir / f[key]).is_file()]
            if missing:
                raise DatasetError(
                    f"{transforms_path}: {len(missing)} of {len(frames)} {what} files ('{key}') are missing: "
                    f"{', '.join(str(p) for p in missing[:_MAX_LISTED])}"
                    f"{' ...' if len(missing) > _MAX_LISTED else ''}"
                )

        if not self.config.validate_images:
            return
        start = time.perf_counter()

        def check_image(index: int) -> None:
            frame = frames[index]
            path = image_path(frame)
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    # Decoding, not just the header: a truncated file has a valid header and would otherwise fail
                    # later inside nerfstudio's loader threads, with no file name.
                    image.load()
            except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
                raise DatasetError(
                    f"image {path} ({self._frame_name(index, frame)}) cannot be read as an image: {err}"
                ) from err
            expected_w, expected_h = frame.get("w", meta.get("w")), frame.get("h", meta.get("h"))
            if full_resolution and (width, height) != (int(expected_w), int(expected_h)):
                raise DatasetError(
                    f"image {path} ({self._frame_name(index, frame)}) is {width}x{height} but "
                    f"{transforms_path} gives w={expected_w}, h={expected_h}"
                )
            if full_resolution and "depth_file_path" in frame:
                self._check_depth_header(data_dir / frame["depth_file_path"], index, frame, (height, width))

        # PIL decodes outside the GIL, so threads check a large capture in a fraction of the time.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(check_image, range(len(frames))))
        if len(frames) >= _LOG_CHECK_FROM:
            CONSOLE.log(
                f"Checked {len(frames)} images (decoded each once) in {time.perf_counter() - start:.1f} s."
            )

    def _check_depth_header(
        self, path: Path, index: int, frame: Dict[str, Any], image_size: Tuple[int, int]
    ) -> None:
        """A depth image must cover its colour image: the same aspect ratio (header only; see check_depth_size)."""
        try:
            with Image.open(path) as depth:
                width, height = depth.size
        except Exception as err:
            raise DatasetError(
                f"depth image {path} ({self._frame_name(index, frame)}) cannot be read as an image: {err}"
            ) from err
        try:
            check_depth_size(path, (height, width), image_size)
        except ValueError as err:
            raise DatasetError(f"{err} ({self._frame_name(index, frame)})") from None

    def _point_cloud(self, path: Path, referenced_by: Optional[Path] = None) -> PointCloud:
        """Read (once) and return the point cloud at ``path``; errors become DatasetError."""
        if path not in self._point_clouds:
            source = f" (ply_file_path in {referenced_by})" if referenced_by is not None else ""
            try:
                self._point_clouds[path] = read_point_cloud(path)
            except PointCloudError as err:
                raise DatasetError(f"{err}{source}") from err
        return self._point_clouds[path]

    def _read_class_names(self, meta: Dict[str, Any], data_dir: Path) -> Optional[Dict[int, str]]:
        if "classes_file_path" in meta:
            path = data_dir / meta["classes_file_path"]
            if not path.is_file():
                raise DatasetError(
                    f"class-name file {path} (classes_file_path in transforms.json) does not exist"
                )
        else:
            path = data_dir / self.config.classes_file
            if not path.is_file():
                return None
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object of id -> name, got {type(raw).__name__}")
            return {int(class_id): str(name) for class_id, name in raw.items()}
        except (ValueError, UnicodeDecodeError) as err:
            raise DatasetError(f"class-name file {path} is invalid: {err}") from err

    def _aux_fname(self, path: Path, data_dir: Path) -> Path:
        """A per-image annotation file at the resolution nerfstudio loads the images at, if such a copy
        exists (``<folder>_<factor>/<name>``, like nerfstudio's ``depths_2``), else the full-resolution
        file. Label images must be resized with nearest-neighbour sampling by whoever reads them."""
        factor = self.downscale_factor or 1
        if factor > 1:
            scaled = data_dir / f"{path.parent.name}_{factor}" / path.name
            if scaled.is_file():
                return scaled
        return data_dir / path
