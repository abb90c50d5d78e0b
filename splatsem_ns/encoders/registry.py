"""Versioned registry of sparse 3D backbones: a new variant is one decorated class.

    @BACKBONES.register("SpUNet-v1")
    class SpUNet(SparseBackbone): ...

    backbone = build_backbone("SpUNet-v1", in_channels=14, preset="tiny", conv_backend="torch")

Names carry a version suffix (Pointcept's habit): a change that alters a backbone's weights or outputs gets a new
name, so a checkpoint always rebuilds the network it was trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Generic, List, Optional, Type, TypeVar

from torch import nn

from splatsem_ns.encoders.sparse_conv import ConvBackend
from splatsem_ns.encoders.sparse_tensor import SparseTensor

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind, registered with a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a class under ``name`` (a name can be registered once)."""
        if not name:
            raise ValueError(f"A {self.kind} entry needs a non-empty name.")

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered ({self._entries[name]!r}).")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"Unknown {self.kind} '{name}'. Available: {known}.")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class BackboneConfig:
    """What every sparse backbone's config has."""

    conv_backend: ConvBackend = "auto"
    """Sparse convolutions: "torch" (portable), "spconv" (needs spconv), or "auto" (spconv on CUDA when it
    imports, else torch)."""

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {"default": {}}
    """Named field overrides; "default" is the dataclass defaults."""

    @classmethod
    def preset(cls, name: str = "default", **overrides: Any) -> "BackboneConfig":
        """The config of a named preset, with ``overrides`` applied on top."""
        if name not in cls.PRESETS:
            raise KeyError(
                f"Unknown preset '{name}' for {cls.__name__}. Available: {', '.join(sorted(cls.PRESETS))}."
            )
        return dataclasses.replace(cls(), **{**cls.PRESETS[name], **overrides})


class SparseBackbone(nn.Module):
    """A network from voxel features to voxel features at the same sites."""

    config_class: ClassVar[Type[BackboneConfig]] = BackboneConfig
    in_channels: int
    out_channels: int

    coarsest: Optional[SparseTensor] = None
    """The deepest encoder stage's features of the last ``forward`` (set while ``keep_coarsest``; else None)."""
    keep_coarsest: bool = False
    """Keep the coarsest stage of each forward in ``coarsest`` (scene tokens read it)."""

    @property
    def coarsest_stride(self) -> int:
        """Voxels of the input grid per coarsest-stage voxel, along each axis."""
        raise NotImplementedError

    def forward(self, x: SparseTensor) -> SparseTensor:
        raise NotImplementedError


BACKBONES: Registry[Type[SparseBackbone]] = Registry("backbone")
"""Every registered sparse backbone, by versioned name ("SpUNet-v1", "PTv3-lite-v1")."""


def available_backbones() -> List[str]:
    """Names of the registered backbones."""
    _register_builtin()
    return BACKBONES.names()


def build_backbone(
    name: str,
    in_channels: int,
    preset: str = "default",
    config: Optional[BackboneConfig] = None,
    **overrides: Any,
) -> SparseBackbone:
    """Build a registered backbone from a preset (plus field overrides) or from a full config object."""
    _register_builtin()
    cls = BACKBONES.get(name)
    if config is None:
        config = cls.config_class.preset(preset, **overrides)
    else:
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{name} takes a {cls.config_class.__name__}, got {type(config).__name__}.")
        config = dataclasses.replace(config, **overrides)
    return cls(in_channels, config)


def _register_builtin() -> None:
    # The built-in backbones register themselves on import; importing here (not at module top) keeps
    # registry.py free of a cycle with the modules that import BACKBONES.
    from splatsem_ns.encoders import ptv3, spunet  # noqa: F401
