"""Named teacher presets: ``make_teacher_config("siglip2-b16")`` and ``register_teacher`` for new ones.

Each preset is a factory returning a fresh config, so callers can change it without touching the
preset. Presets default their ``name`` to a short family key ("siglip2", "dinov2", "sam", ...) so loss
and cache names read well; two teachers of one family in the same run need distinct names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from splatsem_ns.teachers.base import TeacherConfig
from splatsem_ns.teachers.dino_teacher import DINOTeacherConfig
from splatsem_ns.teachers.labels_teacher import LabelsTeacherConfig
from splatsem_ns.teachers.open_clip_teacher import OpenCLIPTeacherConfig
from splatsem_ns.teachers.sam_teacher import SAMTeacherConfig
from splatsem_ns.teachers.siglip_teacher import SigLIP2TeacherConfig

TeacherFactory = Callable[[], TeacherConfig]

_PRESETS: Dict[str, TeacherFactory] = {
    # Real weights (downloaded on first use, or given with a checkpoint).
    "clip-vit-b16": lambda: OpenCLIPTeacherConfig(
        name="clip", model_name="ViT-B-16", pretrained="laion2b_s34b_b88k"
    ),
    "siglip2-b16": lambda: SigLIP2TeacherConfig(name="siglip2", model_name="google/siglip2-base-patch16-512"),
    "dinov2-s14": lambda: DINOTeacherConfig(
        name="dinov2", model_name="facebook/dinov2-small", input_size=448
    ),
    "dinov2-b14": lambda: DINOTeacherConfig(name="dinov2", model_name="facebook/dinov2-base", input_size=448),
    "dinov3-s16": lambda: DINOTeacherConfig(
        name="dinov3", model_name="facebook/dinov3-vits16-pretrain-lvd1689m", input_size=512
    ),
    "sam-vit-b": lambda: SAMTeacherConfig(name="sam", model_name="vit_b"),
    "sam-vit-l": lambda: SAMTeacherConfig(name="sam", model_name="vit_l"),
    "sam-vit-h": lambda: SAMTeacherConfig(name="sam", model_name="vit_h"),
    # Tiny random-weight architectures: tests and the offline demo. Their features mean nothing.
    "tiny-clip": lambda: OpenCLIPTeacherConfig(
        name="clip", model_name="tiny-clip", pretrained="", random_weights=True, input_size=64
    ),
    "tiny-siglip2": lambda: SigLIP2TeacherConfig(
        name="siglip2", model_name="tiny-siglip2", random_weights=True, input_size=64, tokenizer="bytes"
    ),
    "tiny-dinov2": lambda: DINOTeacherConfig(
        name="dinov2", model_name="tiny-dinov2", random_weights=True, input_size=64
    ),
    "tiny-dinov3": lambda: DINOTeacherConfig(
        name="dinov3", model_name="tiny-dinov3", random_weights=True, input_size=64
    ),
    "tiny-sam": lambda: SAMTeacherConfig(
        name="sam", model_name="tiny-sam", random_weights=True, input_size=128
    ),
    # Proxies built from the scene's ground-truth labels (benchmarking without loadable 2D models).
    "labels": lambda: LabelsTeacherConfig(name="labels", variant="semantic"),
    "labels-instance": lambda: LabelsTeacherConfig(name="instances", variant="instance"),
}

DEFAULT_TEACHERS: Tuple[str, ...] = ("siglip2-b16", "dinov2-s14", "sam-vit-b")
"""One teacher per family: language-aligned, generalist, object-aware. DINOv2 rather than DINOv3 because
DINOv3's weights are gated on the hub."""

TINY_TEACHERS: Tuple[str, ...] = ("tiny-siglip2", "tiny-dinov2", "tiny-sam")
"""The same three families as tiny random-weight models, buildable offline in milliseconds."""


def available_teachers() -> List[str]:
    """Names of every registered preset, sorted."""
    return sorted(_PRESETS)


def register_teacher(name: str, factory: TeacherFactory, overwrite: bool = False) -> None:
    """Add a preset. ``factory()`` must return a new ``TeacherConfig`` on every call."""
    if not name:
        raise ValueError("A teacher preset needs a non-empty name.")
    if name in _PRESETS and not overwrite:
        raise ValueError(f"Teacher preset '{name}' already exists; pass overwrite=True to replace it.")
    if not callable(factory):
        raise TypeError(
            f"The factory of teacher preset '{name}' must be callable, got {type(factory).__name__}."
        )
    _PRESETS[name] = factory


def make_teacher_config(preset: str, **overrides: object) -> TeacherConfig:
    """A fresh config of ``preset`` with ``overrides`` applied to its fields."""
    if preset not in _PRESETS:
        raise KeyError(f"Unknown teacher preset '{preset}'. Available: {', '.join(available_teachers())}.")
    config = _PRESETS[preset]()
    if not isinstance(config, TeacherConfig):
        raise TypeError(f"Teacher preset '{preset}' returned {type(config).__name__}, not a TeacherConfig.")
    fields = {f.name for f in dataclasses.fields(config) if f.init and not f.name.startswith("_")}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"Teacher preset '{preset}' ({type(config).__name__}) has no field(s) {unknown}; "
            f"fields: {', '.join(sorted(fields))}."
        )
    return dataclasses.replace(config, **overrides)


class UnknownTeacherError(ValueError):
    """A teacher name that no preset has (raised while a configuration is built, before any data loads)."""


def check_teacher_names(presets: Sequence[str], flag: str = "--pipeline.datamanager.teachers") -> None:
    """Raise ``UnknownTeacherError`` naming every unknown preset in ``presets`` and the available ones."""
    unknown = [name for name in presets if name not in _PRESETS]
    if unknown:
        raise UnknownTeacherError(
            f"Unknown teacher preset(s) {', '.join(map(repr, unknown))} in {flag}. "
            f"Available: {', '.join(available_teachers())}. (Your own teachers need a register_teacher call in "
            "a module that your method config imports.)"
        )


def configured_teachers(
    presets: Sequence[str], checkpoints: Mapping[str, Path], random_weights: bool
) -> List[TeacherConfig]:
    """Configs of the teacher ``presets``, with local ``checkpoints`` (by teacher name) and the random-weights
    switch applied: what a datamanager's ``teachers``, ``teacher_checkpoints`` and ``teacher_random_weights``
    settings mean."""
    configs = [make_teacher_config(p) for p in presets]
    names = [c.name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"Teachers {duplicated} appear twice; each teacher needs a distinct name.")
    unknown = set(checkpoints) - set(names)
    if unknown:
        raise ValueError(
            f"teacher-checkpoints names {sorted(unknown)}, which are not among the teachers {names}."
        )
    for cfg in configs:
        if cfg.name in checkpoints:
            cfg.checkpoint = Path(checkpoints[cfg.name])
        if random_weights:
            cfg.random_weights = True
    return configs
