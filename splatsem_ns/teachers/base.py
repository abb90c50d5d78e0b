"""One interface for every 2D teacher: language-aligned, generalist, object-aware, or label proxies.

A teacher turns images into dense feature maps (and, if it has one, text into the same space). The
rest of the package only ever talks to this interface, so adding a teacher is one subclass plus one
config dataclass.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, List, Optional, Sequence, Tuple, Type, Union

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn


class TeacherWeightsUnavailable(RuntimeError):
    """Raised when a teacher's weights can neither be found locally nor downloaded.

    The message always names the teacher and says how to point it at a local checkpoint.
    """


@dataclass
class TeacherConfig(InstantiateConfig):
    """Base config of a 2D teacher. Subclasses set ``_target`` and their model fields."""

    _target: Type = field(default_factory=lambda: Teacher)
    name: str = "teacher"
    """Key of this teacher in losses, caches and the viewer; unique within one run."""
    model_name: str = ""
    """The real model identifier (hub id or architecture name) that is loaded."""
    checkpoint: Optional[Path] = None
    """Local weights to load instead of downloading (a file or a hub snapshot folder)."""
    random_weights: bool = False
    """Build the architecture with random weights and load nothing. Only for tests and speed benchmarks:
    the features carry no meaning."""
    input_size: int = 448
    """Length in pixels of the longer image side fed to the network (rounded to the patch size)."""

    NOT_IN_FEATURES: ClassVar[Tuple[str, ...]] = ("name",)
    """Fields that do not change the image features (the name is only a key; subclasses add text-side options):
    the feature cache's key leaves them out, so changing them reuses cached features."""

    def fingerprint(self) -> str:
        """Stable hash of what changes this teacher's image features: its class, model, weights (the checkpoint's
        content, wherever it lies), resolution and other feature settings; not ``NOT_IN_FEATURES``."""
        left_out = set(self.NOT_IN_FEATURES) | {"checkpoint"}
        payload = {
            k: str(v) for k, v in sorted(asdict(self).items()) if not k.startswith("_") and k not in left_out
        }
        payload["class"] = type(self).__qualname__
        if self.checkpoint is not None:
            payload["checkpoint"] = weights_identity(Path(self.checkpoint))
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def weights_identity(path: Path, sample: int = 1 << 20) -> str:
    """What identifies a checkpoint's content cheaply: per file (a folder's files in order, e.g. a hub snapshot),
    its size and a hash of its first and last ``sample`` bytes. A moved or copied checkpoint keeps its identity; a
    different one of the same size almost surely does not. A missing path is identified by its name (loading it
    fails with its own message)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not path.exists() or not files:
        return f"missing:{path.name}"
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{size}".encode())
        with open(file, "rb") as stream:
            digest.update(stream.read(sample))
            if size > 2 * sample:
                stream.seek(size - sample)
                digest.update(stream.read(sample))
    return digest.hexdigest()


@dataclass
class SceneView:
    """One posed view of the scene, for teachers that read the scene itself (the label proxies)."""

    image: Tensor
    """``[H, W, 3]`` uint8 or float image exactly as the model sees it (after undistortion)."""
    intrinsics: Tensor
    """``[3, 3]`` pinhole matrix for this image size."""
    camera_to_world: Tensor
    """``[3, 4]`` or ``[4, 4]`` camera-to-world pose, nerfstudio (OpenGL) convention, in the dataparser's frame."""
    split: str = "train"
    """"train" or "eval"."""
    label_path: Optional[Path] = None
    """Per-pixel class-id image (e.g. ScanNet label-filt), if the scene has one."""
    instance_path: Optional[Path] = None
    """Per-pixel instance-id image, if the scene has one."""
    depth_path: Optional[Path] = None
    """Depth image, if the scene has one (read with ``depth_unit_scale_factor``)."""


class Teacher(nn.Module, ABC):
    """A frozen 2D model that produces dense per-patch features.

    Subclasses fill ``feature_dim``, ``feature_stride`` and ``has_text_encoder`` in ``__init__``.
    Images come in as float RGB in [0, 1]; preprocessing (resize, normalisation) is the teacher's job.
    """

    config: TeacherConfig
    feature_dim: int
    """Channels of the feature maps (and of text embeddings, when there is a text encoder)."""
    feature_stride: int
    """Input pixels per feature cell along each axis (the ViT patch size)."""
    has_text_encoder: bool = False

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def fingerprint(self) -> str:
        return self.config.fingerprint()

    def network_input_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H', W') the network sees: longer side ``input_size``, both sides multiples of the stride."""
        scale = self.config.input_size / max(height, width)
        s = self.feature_stride
        return max(s, round(height * scale / s) * s), max(s, round(width * scale / s) * s)

    def feature_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the feature map for an image of ``height`` x ``width``; it covers the whole image."""
        h, w = self.network_input_size(height, width)
        return h // self.feature_stride, w // self.feature_stride

    def prepare_scene(self, views: Sequence[SceneView], metadata: dict) -> None:
        """Called once before extraction with every view of the scene (train and eval) and the dataparser
        metadata. Model teachers ignore it; teachers built from the scene's own annotations use it."""

    @abstractmethod
    def encode_image(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B C h w"]:
        """Dense features; (h, w) == ``feature_grid(H, W)``."""

    def encode_text(self, texts: Sequence[str]) -> Float[Tensor, "N C"]:
        """Text embeddings in the image feature space (language-aligned teachers only)."""
        raise NotImplementedError(f"Teacher '{self.name}' has no text encoder.")

    @property
    def device(self) -> torch.device:
        return module_device(self)


def reads_the_scene(teacher: Union[Teacher, "DeferredTeacher", type]) -> bool:
    """Whether a teacher (or teacher class) depends on the scene it encodes (the label proxies): it is then prepared
    per scene, and its fingerprint, so its cache folder, differs per scene. Never a ``DeferredTeacher``."""
    if isinstance(teacher, DeferredTeacher):
        return False  # only teachers that do not read the scene are deferred
    klass = teacher if isinstance(teacher, type) else type(teacher)
    return klass.prepare_scene is not Teacher.prepare_scene


class DeferredTeacher:
    """A teacher known by its config until its network is needed: the feature cache looks its images up by the
    config's fingerprint, so a run whose features are all cached never loads the network (its weights from disk
    or the hub, and its memory on the device). ``get`` builds it on first use, with ``build``.

    Only for teachers whose fingerprint is their config's (``defers_loading``); the label proxies read the scene
    before they have one, and are cheap to build."""

    def __init__(self, config: TeacherConfig, build: Callable[[TeacherConfig], Teacher]) -> None:
        if not defers_loading(config):
            raise ValueError(
                f"Teacher '{config.name}': its features depend on more than its config (it reads the scene, or "
                "fingerprints itself)."
            )
        self.config = config
        self._build = build
        self._teacher: Optional[Teacher] = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def built(self) -> bool:
        """Whether ``get`` has built the network."""
        return self._teacher is not None

    def fingerprint(self) -> str:
        return self.config.fingerprint()

    @property
    def has_text_encoder(self) -> bool:
        """As the teacher class declares it; a class that decides it when built is built to say."""
        declared = declared_text_encoder(self.config)
        return bool(self.get().has_text_encoder) if declared is None else declared

    def get(self) -> Teacher:
        """The teacher, built on the first call."""
        if self._teacher is None:
            self._teacher = self._build(self.config)
        return self._teacher


AnyTeacher = Union[Teacher, DeferredTeacher]
"""A built teacher, or one that is built only if an image's features are missing from the cache."""


def teachers_to_extract(
    configs: Sequence[TeacherConfig], build: Callable[[TeacherConfig], Teacher]
) -> List[AnyTeacher]:
    """One teacher per config for feature extraction: the networks deferred until an image's features are missing
    from the cache (``DeferredTeacher``), the others (the label proxies, which read the scene before they have a
    cache key) built now with ``build``."""
    return [DeferredTeacher(cfg, build) if defers_loading(cfg) else build(cfg) for cfg in configs]


def defers_loading(config: TeacherConfig) -> bool:
    """Whether ``config``'s teacher can stay unbuilt until it must extract features (``DeferredTeacher``): its class
    neither reads the scene nor fingerprints itself otherwise than by its config."""
    klass = getattr(config, "_target", None)
    return (
        isinstance(klass, type)
        and issubclass(klass, Teacher)
        and not reads_the_scene(klass)
        and klass.fingerprint is Teacher.fingerprint
    )


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def image_to_float_chw(image: Tensor) -> Float[Tensor, "3 H W"]:
    """A stored ``[H, W, 3|4]`` uint8 or float image as the ``[3, H, W]`` float in [0, 1] that teachers take."""
    image = image[..., :3]
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return image.float().permute(2, 0, 1)


TEACHER_SPECS_KEY = "teacher_specs"
"""Key of ``Dict[str, TeacherSpec]`` in the training dataset's metadata, filled by the datamanager."""


@dataclass(frozen=True)
class TeacherSpec:
    """What the model needs to know of a teacher without loading it: the datamanager fills these after
    extracting features, and the model builds one projector head per spec."""

    name: str
    feature_dim: int
    feature_grid: Tuple[int, int]
    """(h, w) of the cached feature maps for the training images."""
    image_size: Tuple[int, int]
    """(H, W) of the training images those grids cover."""
    has_text_encoder: bool
    config: TeacherConfig
    """The config that produced the features (used later to load the text encoder for queries)."""


def declared_text_encoder(config: TeacherConfig) -> Optional[bool]:
    """``has_text_encoder`` as the teacher class declares it, or None when instances decide it at build
    time (e.g. the labels proxy, by variant)."""
    target = getattr(config, "_target", None)
    if not isinstance(target, type):
        return None
    for klass in inspect.getmro(target):
        if klass is Teacher:
            break
        if "has_text_encoder" in vars(klass):
            return bool(vars(klass)["has_text_encoder"])
    return None
