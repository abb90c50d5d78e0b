"""A semantic Gaussian scene you can decode and query, from an exported file or from a live model.

``load_semantic_scene("scene.ply")`` and ``SemanticScene.from_model(model)`` give the same object: the
Gaussians, their semantic latents, the projector heads and what is known of each teacher. ``decode``
turns the latents into a teacher's feature space; ``query`` scores every Gaussian against a text with
LERF's relevancy, using the language teacher's own text encoder rebuilt from the stored config.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from splatsem_ns.export.semantic_ply import (
    GaussianColumns,
    PlyFingerprint,
    SemanticSplatFileError,
    TeacherInfo,
    WrittenPly,
    read_semantic_ply,
    read_semantic_sidecar,
    sidecar_path,
    write_semantic_export,
)
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.models.relevancy import DEFAULT_NEGATIVES, LERF_TEMPERATURE, lerf_relevancy


@dataclass
class SemanticScene(GaussianColumns):
    """Semantic Gaussians: splatfacto's parameters, a latent per Gaussian and the heads that decode it."""

    heads: Dict[str, ProjectorHead] = field(default_factory=dict)
    """One projector head per teacher: latent -> that teacher's features."""
    teachers: Dict[str, TeacherInfo] = field(default_factory=dict)
    """What is known of each teacher (feature size, text encoder, the config to rebuild it)."""
    semantic_scale: Optional[float] = None
    """Resolution of the model's semantic render relative to its images (None when unknown)."""
    sh_degree: int = 3
    """Spherical-harmonics degree of the colours."""
    source: str = ""
    """Where the scene came from (a PLY path, or the model's class)."""
    source_config: Optional[str] = None
    """The training run's config.yml, when the export recorded it."""
    _text_teachers: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Text teachers built so far, by name (loading one costs seconds)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, teacher_configs: Iterable[Any] = ()) -> "SemanticScene":
        """Snapshot a (chorus-splat or splatfacto) model. Heads are copied, so later training does not change
        the snapshot.

        Args:
            model: A ``ChorusSplatModel`` (or any ``SplatfactoModel``: it gives a scene without semantics).
            teacher_configs: Configs of the run's teachers, for teachers the model has no ``TeacherSpec``
                of (a model restored from a checkpoint knows its heads but not its teachers).
        """
        gauss = model.gauss_params
        source = getattr(model, "semantic_source", None)
        latent = source(gauss).detach() if source is not None else None
        heads = {
            name: copy.deepcopy(head).eval().requires_grad_(False)
            for name, head in getattr(model, "projector_heads", {}).items()
        }
        teachers = _teacher_infos(model, heads, teacher_configs)
        scale = getattr(model, "semantic_scale", None)
        return cls(
            means=gauss["means"].detach(),
            scales=gauss["scales"].detach(),
            quats=gauss["quats"].detach(),
            opacities=gauss["opacities"].detach(),
            features_dc=gauss["features_dc"].detach(),
            features_rest=gauss["features_rest"].detach(),
            latent=latent,
            heads=heads,
            teachers=teachers,
            semantic_scale=None if scale is None else float(scale),
            sh_degree=int(model.config.sh_degree),
            source=type(model).__name__,
        )

    @classmethod
    def from_prediction(
        cls,
        model: nn.Module,
        gaussians: Any,
        index: int = 0,
        source: str = "",
        teacher_configs: Iterable[Any] = (),
    ) -> "SemanticScene":
        """Scene ``index`` of a feed-forward prediction (``splatsem_ns.feedforward.PredictedGaussians`` of a
        ``SemanticSplatModel``): the same Gaussians, latent and heads a chorus-splat export holds, so it saves,
        loads, decodes and answers queries alike. Heads are copied; ``teacher_configs`` describe the teachers the
        model has no ``TeacherSpec`` of (a model restored without extracting features)."""
        params = gaussians.splatfacto_parameters(index)
        heads = {
            name: copy.deepcopy(head).eval().requires_grad_(False)
            for name, head in getattr(model, "projector_heads", {}).items()
        }
        return cls(
            means=params["means"].detach(),
            scales=params["scales"].detach(),
            quats=params["quats"].detach(),
            opacities=params["opacities"].detach(),
            features_dc=params["features_dc"].detach(),
            features_rest=params["features_rest"].detach(),
            latent=gaussians.latent[index].detach(),
            heads=heads,
            teachers=_teacher_infos(model, heads, teacher_configs),
            sh_degree=int(gaussians.sh_degree),
            source=source or type(model).__name__,
        )

    # ------------------------------------------------------------------ basics
    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    @property
    def latent_dim(self) -> Optional[int]:
        return None if self.latent is None else int(self.latent.shape[1])

    @property
    def device(self) -> torch.device:
        return self.means.device

    def to(self, device: Union[str, torch.device]) -> "SemanticScene":
        """A copy on ``device`` (heads included); built text teachers are dropped."""
        moved = {name: None if t is None else t.to(device) for name, t in self.columns().items()}
        return replace(
            self,
            **moved,
            heads={n: copy.deepcopy(h).to(device) for n, h in self.heads.items()},
            _text_teachers={},
        )

    def select(self, mask: Bool[Tensor, " N"]) -> "SemanticScene":
        """The Gaussians where ``mask`` is True (heads and teachers shared)."""
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (self.num_gaussians,):
            raise ValueError(
                f"select needs a bool mask of shape ({self.num_gaussians},), got {mask.dtype} {tuple(mask.shape)}."
            )
        return replace(
            self,
            means=self.means[mask],
            scales=self.scales[mask],
            quats=self.quats[mask],
            opacities=self.opacities[mask],
            features_dc=self.features_dc[mask],
            features_rest=self.features_rest[mask],
            latent=None if self.latent is None else self.latent[mask],
        )

    # ------------------------------------------------------------------ semantics
    def _require_latent(self, what: str) -> Tensor:
        if self.latent is None:
            raise ValueError(
                f"Cannot {what}: {self.source or 'this scene'} is a plain 3DGS scene without a semantic latent "
                "(no sem_* columns). Export it with splatsem-export from a chorus-splat run."
            )
        return self.latent

    def _require_head(self, teacher: str) -> ProjectorHead:
        if teacher not in self.heads:
            raise KeyError(
                f"Teacher '{teacher}' has no projector head in {self.source or 'this scene'}; "
                f"available: {', '.join(sorted(self.heads)) or 'none'}."
            )
        return self.heads[teacher]

    @torch.no_grad()
    def decode(self, teacher: str, chunk: int = 1 << 16) -> Float[Tensor, "N C"]:
        """Every Gaussian's latent decoded into ``teacher``'s feature space (the model's ``gaussian_features``)."""
        latent = self._require_latent(f"decode features for '{teacher}'")
        head = self._require_head(teacher)
        head_device = next(head.parameters()).device
        return torch.cat(
            [
                head(latent[i : i + chunk].to(head_device)).to(latent.device)
                for i in range(0, len(latent), chunk)
            ]
        )

    def text_teacher(self, teacher: Optional[str] = None, **overrides: Any):
        """The language teacher rebuilt from its stored config (weights load as in training; offline, a
        teacher without local weights fails with its own message). ``overrides`` change config fields,
        e.g. ``checkpoint=Path("~/weights/siglip2")``.

        With ``teacher=None``: the first teacher known to have a text encoder, else the first that turns
        out to have one once built.
        """
        if teacher is not None:
            return self._build_text_teacher(teacher, overrides)
        if not self.teachers:
            raise ValueError(f"{self.source or 'This scene'} records no teachers, so it has no text encoder.")
        known = [n for n, t in self.teachers.items() if t.has_text_encoder]
        unknown = [n for n, t in self.teachers.items() if t.has_text_encoder is None and t.config_class]
        for name in known + unknown:
            built = self._build_text_teacher(name, overrides, require=name in known)
            if built is not None:
                return built
        raise ValueError(
            f"None of the teachers of {self.source or 'this scene'} ({', '.join(self.teachers)}) has a text "
            "encoder; text queries need a language-aligned teacher (e.g. siglip2, clip or labels)."
        )

    def _build_text_teacher(self, name: str, overrides: Dict[str, Any], require: bool = True):
        if name not in self.teachers:
            raise KeyError(
                f"Teacher '{name}' is not recorded in {self.source or 'this scene'}; "
                f"available: {', '.join(sorted(self.teachers)) or 'none'}."
            )
        if name in self._text_teachers and not overrides:
            return self._text_teachers[name]
        info = self.teachers[name]
        if info.has_text_encoder is False:
            raise ValueError(f"Teacher '{name}' has no text encoder and cannot answer text queries.")
        built = info.build_config(**overrides).setup().to(self.device).eval()
        if not built.has_text_encoder:
            if require:
                raise ValueError(f"Teacher '{name}' has no text encoder and cannot answer text queries.")
            return None
        self._text_teachers[name] = built
        return built

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], teacher: Optional[str] = None) -> Float[Tensor, "T C"]:
        """Texts embedded by ``teacher``'s text encoder (default: the scene's language teacher)."""
        built = self.text_teacher(teacher)
        embeddings = built.encode_text(list(texts)).float().to(self.device)
        expected = self.teachers[built.name].feature_dim
        if embeddings.shape[-1] != expected:
            raise ValueError(
                f"Teacher '{built.name}' embeds text in {embeddings.shape[-1]} channels but its head outputs "
                f"{expected}: the rebuilt teacher is not the one the scene was trained with."
            )
        return embeddings

    @torch.no_grad()
    def query(
        self,
        text: str,
        teacher: Optional[str] = None,
        negatives: Sequence[str] = DEFAULT_NEGATIVES,
        temperature: float = LERF_TEMPERATURE,
        chunk: int = 1 << 16,
    ) -> Float[Tensor, " N"]:
        """LERF relevancy of every Gaussian to ``text`` (see ``lerf_relevancy``), in [0, 1].

        Args:
            text: The query, e.g. "couch".
            teacher: Language teacher whose space is queried (default: the scene's first one with text).
            negatives: Canonical phrases the query must beat (LERF's by default).
            temperature: Softmax temperature over cosine similarities (LERF: 10).
            chunk: Gaussians decoded at once, bounding memory.
        """
        self._require_latent(f"answer the query {text!r}")
        if not negatives:
            raise ValueError("query needs at least one negative phrase.")
        built = self.text_teacher(teacher)
        embeddings = self.encode_text([text, *negatives], built.name)
        latent, head = self.latent, self.heads[built.name]
        assert latent is not None
        head_device = next(head.parameters()).device
        return torch.cat(
            [
                lerf_relevancy(
                    head(latent[i : i + chunk].to(head_device)), embeddings[:1], embeddings[1:], temperature
                )[:, 0].to(latent.device)
                for i in range(0, len(latent), chunk)
            ]
        )

    # ------------------------------------------------------------------ saving
    def save(
        self,
        ply_path: Union[str, Path],
        selection: Optional[Bool[Tensor, " N"]] = None,
        source_config: Optional[Union[str, Path]] = None,
    ) -> WrittenPly:
        """Write the PLY and, for a scene with semantics (a latent or heads), its sidecar, as one atomic pair
        (``write_semantic_export``): both are written under temporary names and renamed into place only once
        both are complete, so a failure leaves an earlier export at ``ply_path`` unchanged.

        A scene without semantics writes the PLY alone and deletes the sidecar an earlier export left at
        ``<stem>.semantic.pt`` once the new PLY is in place: a plain PLY never sits beside another export's
        heads.

        Raises:
            SemanticExportError: a file could not be written; the message names it and says why.
        """
        return write_semantic_export(
            ply_path,
            self,
            heads=self.heads,
            teachers=self.teachers,
            semantic_scale=self.semantic_scale,
            sh_degree=self.sh_degree,
            selection=selection,
            source_config=source_config if source_config is not None else self.source_config,
        )


def _teacher_infos(
    model: nn.Module, heads: Mapping[str, ProjectorHead], teacher_configs: Iterable[Any]
) -> Dict[str, TeacherInfo]:
    """What is known of the teacher of each head: from the model's ``TeacherSpec`` where it has one, else from the
    run's teacher configs, else only its feature size."""
    specs = getattr(model, "teacher_specs", {}) or {}
    configs = {c.name: c for c in teacher_configs}
    teachers = {}
    for name, head in heads.items():
        spec = specs.get(name)
        # A model restored from its checkpoint alone has specs without configs: the run's configs fill them in.
        config = (spec.config if spec is not None else None) or configs.get(name)
        has_text = spec.has_text_encoder if spec is not None and spec.config is not None else None
        if config is not None:
            teachers[name] = TeacherInfo.from_config(config, head.feature_dim, has_text)
        else:
            teachers[name] = TeacherInfo(name=name, feature_dim=head.feature_dim)
    return teachers


def load_semantic_scene(
    ply_path: Union[str, Path], device: Union[str, torch.device] = "cpu"
) -> SemanticScene:
    """Read a PLY written by ``SemanticScene.save`` / ``splatsem-export`` and its ``.semantic.pt`` sidecar.

    A plain 3DGS PLY (no ``sem_*`` columns) loads too, with ``latent=None``; decoding or querying it then
    says so.

    Raises:
        SemanticSplatFileError: a broken file, or a PLY and sidecar from different exports (the sidecar's
            fingerprint of its PLY does not match this PLY). A version-1 sidecar, which records no
            fingerprint, loads with a warning instead.
    """
    ply_path = Path(ply_path)
    arrays = read_semantic_ply(ply_path)
    side = sidecar_path(ply_path)
    record: Optional[Dict[str, Any]] = None
    if arrays.latent is not None:
        if not side.is_file():
            raise FileNotFoundError(
                f"{ply_path} has {arrays.latent.shape[1]} semantic columns but its sidecar {side} (projector "
                "heads and teachers) is missing; keep the two files together."
            )
        record = read_semantic_sidecar(side)
    elif side.is_file():
        record = read_semantic_sidecar(side)
        warnings.warn(
            f"{ply_path} has no sem_* columns: loaded as a plain 3DGS scene without latents.", stacklevel=2
        )

    if record is not None:
        n = arrays.means.shape[0]
        if record["num_gaussians"] != n:
            raise SemanticSplatFileError(
                f"{side} describes {record['num_gaussians']} Gaussians but {ply_path} holds {n}: the two files "
                "come from different exports. Export again, and keep the PLY and its sidecar together."
            )
        # The count alone misses a sidecar from another export of as many Gaussians (another run, another
        # step or selection), whose heads would decode this PLY's latents into nonsense without any error.
        expected: Optional[PlyFingerprint] = record["ply_fingerprint"]
        if expected is None:
            warnings.warn(
                f"{side} is a version-{record['format_version']} sidecar without a fingerprint of its PLY, "
                f"so whether it belongs to {ply_path} cannot be checked beyond their Gaussian counts. "
                "Export again to add one.",
                stacklevel=2,
            )
        elif expected != (actual := PlyFingerprint.of_positions(arrays.means)):
            raise SemanticSplatFileError(
                f"{ply_path} and {side} come from different exports: the sidecar was written for a PLY with "
                f"other Gaussian positions (sha256 {expected.positions_sha256[:12]}..., this PLY's "
                f"{actual.positions_sha256[:12]}...), so its heads do not belong to these Gaussians. Export "
                "again (splatsem-export), and keep the PLY and its sidecar together."
            )
        if arrays.latent is not None and record["latent_dim"] != arrays.latent.shape[1]:
            raise SemanticSplatFileError(
                f"{side} records a {record['latent_dim']}-channel latent but {ply_path} has "
                f"{arrays.latent.shape[1]} sem_* columns."
            )
        for name, head in record["heads"].items():
            if arrays.latent is not None and head.latent_dim != arrays.latent.shape[1]:
                raise SemanticSplatFileError(
                    f"{side}: projector head '{name}' takes {head.latent_dim} channels, the latent has "
                    f"{arrays.latent.shape[1]}."
                )
    scene = SemanticScene(
        **arrays.columns(),
        heads=record["heads"] if record else {},
        teachers=record["teachers"] if record else {},
        semantic_scale=record["semantic_scale"] if record else None,
        sh_degree=record["sh_degree"] if record else arrays.sh_degree,
        source=str(ply_path),
        source_config=record["source_config"] if record else None,
    )
    return scene if torch.device(device) == torch.device("cpu") else scene.to(device)
