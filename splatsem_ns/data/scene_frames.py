"""One scene's frames as a feed-forward model consumes them: images, cameras, depth and labels at a fixed size.

nerfstudio's dataparser normalises every scene (re-centred, re-oriented, rescaled into a unit cube) and its
datamanagers cache every image of one scene. A model trained across thousands of scenes needs the opposite:
cameras in each scene's own metric frame (depth candidates and voxel sizes are in metres), and any few views of
any scene loaded on demand, at one common resolution so that samples stack into batches. ``SceneFrames`` reads a
scene's ``transforms.json`` (the same files the ``splatsem-data`` dataparser validates) and loads single views:

- cameras: OpenGL camera-to-world matrices as stored (metres for RGB-D captures), pinhole intrinsics per frame;
- ``load_view(i, size)``: the image resized to cover ``size`` and centre-cropped (the aspect ratio is kept, the
  intrinsics follow), depth in metres (0 = no measurement) and class / instance ids (0 = unlabelled) resampled
  with nearest-neighbour sampling onto the same pixels.

Lens distortion is not undone here: scenes with distortion coefficients are refused with a message (undistort
them first, as ``ns-process-data`` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image

from splatsem_ns.data.depth import check_depth_size

_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


class SceneFramesError(ValueError):
    """A scene cannot be served as it is; the message names the file."""


@dataclass
class LoadedView:
    """One view at the served size."""

    image: UInt8[np.ndarray, "H W 3"]
    """Colour."""
    intrinsics: Float[np.ndarray, "3 3"]
    """Pinhole intrinsics at the served size (pixel centres at +0.5)."""
    camera_to_world: Float[np.ndarray, "4 4"]
    """OpenGL camera-to-world (x right, y up, looking down -z), in the scene's own frame."""
    depth: Optional[Float[np.ndarray, "H W"]] = None
    """z-depth in the scene's units (metres for depth sensors); 0 where there is no measurement."""
    labels: Optional[Int[np.ndarray, "H W"]] = None
    """Class id per pixel (0: unlabelled)."""
    instances: Optional[Int[np.ndarray, "H W"]] = None
    """Instance id per pixel (0: none)."""


def labelled_points_path(scene: Path) -> Optional[Path]:
    """The labelled point cloud of the scene in folder ``scene``: the file its transforms.json names
    (``labeled_ply_file_path``), else ``points_labeled.ply`` beside it; None when there is none."""
    meta = json.loads((Path(scene) / "transforms.json").read_text())
    path = Path(scene) / meta.get("labeled_ply_file_path", "points_labeled.ply")
    return path if path.is_file() else None


@dataclass
class SceneFrames:
    """The frames of one scene (see the module docstring)."""

    root: Path
    """The scene folder."""
    image_paths: List[Path]
    depth_paths: Optional[List[Path]]
    label_paths: Optional[List[Path]]
    instance_paths: Optional[List[Path]]
    intrinsics: Float[np.ndarray, "N 3 3"]
    """Per-frame pinhole intrinsics at each image's stored size."""
    sizes: Int[np.ndarray, "N 2"]
    """Per-frame stored image size (height, width)."""
    camera_to_world: Float[np.ndarray, "N 4 4"]
    """Per-frame OpenGL camera-to-world, as stored in transforms.json."""
    depth_scale: float
    """Depth image units -> the scene's units (``depth_unit_scale_factor``, default 0.001)."""
    class_names: Optional[Dict[int, str]] = None
    """The scene's class table (``classes.json``: id -> name) when it has one."""

    def label_lookup(self, classes: Mapping[int, str]) -> Optional[np.ndarray]:
        """A table turning this scene's class ids into the ids of ``classes`` (matched by name, case-insensitive;
        unknown names become 0, unlabelled), or None when the scene has no class table of its own (its label
        images are taken to use ``classes``' ids)."""
        if not self.class_names:
            return None
        by_name = {name.strip().lower(): int(i) for i, name in classes.items()}
        lookup = np.zeros(max(self.class_names) + 1, dtype=np.int64)
        for i, name in self.class_names.items():
            lookup[int(i)] = by_name.get(name.strip().lower(), 0)
        return lookup

    def labelled_points(
        self, classes: Mapping[int, str]
    ) -> Optional[Tuple[Float[np.ndarray, "P 3"], Int[np.ndarray, " P"]]]:
        """The scene's labelled points (transforms.json's ``labeled_ply_file_path``, else ``points_labeled.ply``) in
        its own frame and their labels as ``classes``' ids (``label_lookup``), unlabelled points left out; None when
        the scene has no labelled cloud."""
        from splatsem_ns.data.ply_io import read_point_cloud

        path = labelled_points_path(self.root)
        if path is None:
            return None
        cloud = read_point_cloud(path)
        if cloud.labels is None:
            raise SceneFramesError(f"{path}: its labelled points have no labels")
        labels = np.asarray(cloud.labels, dtype=np.int64)
        lookup = self.label_lookup(classes)
        if lookup is not None:
            labels = lookup[np.clip(labels, 0, len(lookup) - 1)]
        keep = labels > 0
        return np.asarray(cloud.xyz, dtype=np.float32)[keep], labels[keep]

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def has_depth(self) -> bool:
        return self.depth_paths is not None

    @property
    def has_labels(self) -> bool:
        return self.label_paths is not None

    @classmethod
    def load(cls, root: Path) -> "SceneFrames":
        """Read ``root/transforms.json`` (cheap: no image is opened)."""
        root = Path(root)
        path = root / "transforms.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SceneFramesError(f"{path} cannot be read: {err}") from err
        frames = meta.get("frames") or []
        if not frames:
            raise SceneFramesError(f"{path} has no frames")
        distorted = [k for k in _DISTORTION_KEYS if abs(float(meta.get(k, 0.0) or 0.0)) > 0.0]
        distorted += [k for f in frames for k in _DISTORTION_KEYS if abs(float(f.get(k, 0.0) or 0.0)) > 0.0]
        if distorted:
            raise SceneFramesError(
                f"{path} has lens distortion ({sorted(set(distorted))}); feed-forward training reads pinhole "
                "frames: undistort the images first (ns-process-data does)."
            )

        def value(frame: dict, key: str) -> float:
            return float(frame.get(key, meta.get(key)))

        intrinsics = np.zeros((len(frames), 3, 3))
        sizes = np.zeros((len(frames), 2), dtype=np.int64)
        for i, frame in enumerate(frames):
            intrinsics[i] = [
                [value(frame, "fl_x"), 0.0, value(frame, "cx")],
                [0.0, value(frame, "fl_y"), value(frame, "cy")],
                [0.0, 0.0, 1.0],
            ]
            sizes[i] = (int(value(frame, "h")), int(value(frame, "w")))

        def files(key: str) -> Optional[List[Path]]:
            if not all(key in f for f in frames):
                return None
            return [root / f[key] for f in frames]

        classes_path = root / meta.get("classes_file_path", "classes.json")
        class_names = None
        if classes_path.is_file():
            try:
                class_names = {int(k): str(v) for k, v in json.loads(classes_path.read_text()).items()}
            except (ValueError, AttributeError) as err:
                raise SceneFramesError(f"class-name file {classes_path} is invalid: {err}") from err
        return cls(
            root=root,
            class_names=class_names,
            image_paths=[root / f["file_path"] for f in frames],
            depth_paths=files("depth_file_path"),
            label_paths=files("semantic_file_path"),
            instance_paths=files("instance_file_path"),
            intrinsics=intrinsics,
            sizes=sizes,
            camera_to_world=np.asarray([f["transform_matrix"] for f in frames], dtype=np.float64),
            depth_scale=float(meta.get("depth_unit_scale_factor", 1e-3)),
        )

    # ------------------------------------------------------------------ loading
    def crop_box(self, index: int, size: Tuple[int, int]) -> Tuple[float, float, float]:
        """``cover_crop`` of frame ``index``."""
        return cover_crop(tuple(int(v) for v in self.sizes[index]), size)

    def served_intrinsics(self, index: int, size: Tuple[int, int]) -> Float[np.ndarray, "3 3"]:
        """Frame ``index``'s intrinsics at the served ``size``."""
        return cropped_intrinsics(self.intrinsics[index], self.crop_box(index, size))

    def load_image(self, index: int, size: Tuple[int, int]) -> UInt8[np.ndarray, "H W 3"]:
        """Frame ``index``'s colour at ``size`` (bilinear: it is a photograph)."""
        path = self.image_paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                return self._resample_image(image, index, size)
        except OSError as err:
            raise SceneFramesError(f"image {path} cannot be read: {err}") from err

    def load_view(
        self, index: int, size: Tuple[int, int], depth: bool = True, labels: bool = True
    ) -> LoadedView:
        """Everything of frame ``index`` at ``size`` (height, width); depth and labels where the scene has them."""
        view = LoadedView(
            image=self.load_image(index, size),
            intrinsics=self.served_intrinsics(index, size),
            camera_to_world=self.camera_to_world[index],
        )
        stored = tuple(int(v) for v in self.sizes[index])
        if depth and self.depth_paths is not None:
            raw = self._read_single_channel(self.depth_paths[index], "depth", stored)
            view.depth = self._resample_array(raw.astype(np.float32) * self.depth_scale, index, size)
        if labels and self.label_paths is not None:
            raw = self._read_single_channel(self.label_paths[index], "label", stored)
            view.labels = self._resample_array(raw.astype(np.int64), index, size)
        if labels and self.instance_paths is not None:
            raw = self._read_single_channel(self.instance_paths[index], "instance", stored)
            view.instances = self._resample_array(raw.astype(np.int64), index, size)
        return view

    def _read_single_channel(self, path: Path, what: str, image_size: Tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(path) as image:
                array = np.asarray(image)
        except OSError as err:
            raise SceneFramesError(f"{what} image {path} cannot be read: {err}") from err
        if array.ndim != 2:
            raise SceneFramesError(f"{what} image {path} has shape {array.shape}; expected a single channel")
        if what == "depth":
            check_depth_size(path, array.shape, image_size)  # another aspect ratio is an error
        return array

    def _resample_image(self, image: Image.Image, index: int, size: Tuple[int, int]) -> np.ndarray:
        """Bilinear resampling of the colour image onto the served pixels (one resize over the crop box)."""
        return _cover_resize(image, self.crop_box(index, size), size)

    def _resample_array(self, array: np.ndarray, index: int, size: Tuple[int, int]) -> np.ndarray:
        """Nearest-neighbour resampling of a single-channel map onto the served pixels: averaging would blend
        depth edges and missing measurements, or class ids, into values that are not there."""
        scale, ox, oy = self.crop_box(index, size)
        height, width = (int(v) for v in self.sizes[index])
        out_h, out_w = size
        # Served pixel centre -> stored colour pixel -> the map's own pixel (it may be stored at another scale).
        cols = ((np.arange(out_w) + 0.5 + ox) / scale) * (array.shape[1] / width)
        rows = ((np.arange(out_h) + 0.5 + oy) / scale) * (array.shape[0] / height)
        cols = np.clip(cols.astype(np.int64), 0, array.shape[1] - 1)
        rows = np.clip(rows.astype(np.int64), 0, array.shape[0] - 1)
        return array[rows[:, None], cols[None, :]]


def cover_crop(stored: Tuple[int, int], size: Tuple[int, int]) -> Tuple[float, float, float]:
    """(scale, offset_x, offset_y) mapping stored pixel coordinates (an image of ``stored`` = (height, width)) to
    served ones: the image is scaled to cover ``size`` (height, width) and centre-cropped."""
    (height, width), (out_h, out_w) = stored, size
    scale = max(out_h / height, out_w / width)
    return scale, (width * scale - out_w) / 2.0, (height * scale - out_h) / 2.0


def cropped_intrinsics(
    K: Float[np.ndarray, "3 3"], crop: Tuple[float, float, float]
) -> Float[np.ndarray, "3 3"]:
    """Intrinsics after ``cover_crop``'s scale and offsets."""
    scale, ox, oy = crop
    K = np.array(K, dtype=np.float64)
    K[:2] *= scale
    K[0, 2] -= ox
    K[1, 2] -= oy
    return K


def fit_view(
    image: UInt8[np.ndarray, "H W 3"], K: Float[np.ndarray, "3 3"], size: Tuple[int, int]
) -> Tuple[UInt8[np.ndarray, "h w 3"], Float[np.ndarray, "3 3"]]:
    """An in-memory image and its intrinsics served at ``size`` exactly as ``SceneFrames.load_view`` serves files
    (scaled to cover, centre-cropped, bilinear)."""
    crop = cover_crop(image.shape[:2], size)
    return _cover_resize(Image.fromarray(image), crop, size), cropped_intrinsics(K, crop)


def _cover_resize(image: Image.Image, crop: Tuple[float, float, float], size: Tuple[int, int]) -> np.ndarray:
    """One bilinear resize of the crop box (in stored pixels) to ``size``; a writable copy."""
    scale, ox, oy = crop
    out_h, out_w = size
    box = (ox / scale, oy / scale, (ox + out_w) / scale, (oy + out_h) / scale)
    return np.array(image.resize((out_w, out_h), Image.BILINEAR, box=box))
