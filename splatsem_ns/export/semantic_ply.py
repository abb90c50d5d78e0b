"""On-disk format of a semantic Gaussian scene: a standard 3DGS PLY plus a sidecar.

**The PLY** is what INRIA's 3DGS and nerfstudio's ``ns-export gaussian-splat`` write (binary little
endian, float32), so any 3DGS viewer opens it::

    x y z nx ny nz f_dc_0..2 f_rest_0..{3K-1} opacity scale_0..2 rot_0..3 sem_0..{D-1}

``f_rest`` is channel-major as in INRIA's files (all K red coefficients, then green, then blue), opacity
is a logit, scales are logs and ``rot`` is a wxyz quaternion, exactly the values splatfacto optimises.
The per-Gaussian semantic latent follows as extra ``sem_*`` columns; viewers ignore columns they do not
know.

**The sidecar** ``<name>.semantic.pt`` holds what turns the latent into teacher features and answers
text queries: each teacher's projector head (weights and architecture), teacher metadata with the
config needed to rebuild its text encoder (as a class path and plain field values, never pickled
objects), the latent size, the semantic render scale and SH degree. It is a ``torch.save`` of plain
tensors, strings, numbers, lists and dicts only, so ``torch.load(..., weights_only=True)`` reads it.
Since format version 2 it also records a fingerprint of its PLY (``PlyFingerprint``: the Gaussian count
and a hash of the positions), so a sidecar beside another export's PLY is refused rather than silently
decoding that PLY's latents with the wrong heads.

**Writing** is atomic per pair (``write_semantic_export``): both files are written under hidden temporary
names in the destination folder and renamed into place only once both are complete, so a failed or
interrupted export leaves the previous one as it was instead of a new PLY beside an old sidecar.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import os
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from jaxtyping import Bool, Float
from plyfile import PlyData, PlyElement
from torch import Tensor, nn

from splatsem_ns.checkpoints import load_torch_file
from splatsem_ns.files import Writer, hidden_sibling, os_reason, remove_quietly, stage_file, sync_folder
from splatsem_ns.models.heads import ProjectorHead
from splatsem_ns.teachers.base import declared_text_encoder

FORMAT_NAME = "splatsem_ns.semantic_splat"
"""``format`` entry of every sidecar."""
FORMAT_VERSION = 2
"""Sidecar layout version; readers refuse newer versions rather than misread them. 2 added
``ply_fingerprint``; version-1 sidecars still load, with a warning that their pairing cannot be checked."""
SIDECAR_SUFFIX = ".semantic.pt"
"""``scene.ply`` -> ``scene.semantic.pt``."""
LATENT_PREFIX = "sem_"
"""Prefix of the semantic latent columns in the PLY."""

ArrayLike = Union[Tensor, np.ndarray]
_GEOMETRY_HEAD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
_GEOMETRY_TAIL = ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


class SemanticSplatFileError(ValueError):
    """A semantic PLY or its sidecar is missing, malformed, or inconsistent. The message names the file."""


class SemanticExportError(OSError):
    """An export could not be written. The message names the file and the reason, and says what became of
    the files an earlier export left at those paths (normally: unchanged)."""


# ----------------------------------------------------------------------------------------------- PLY


def sidecar_path(ply_path: Union[str, Path]) -> Path:
    """Where the sidecar of ``ply_path`` lives: ``scene.ply`` -> ``scene.semantic.pt``."""
    return Path(ply_path).with_suffix(SIDECAR_SUFFIX)


def gaussian_columns(num_rest_coeffs: int, latent_dim: int = 0) -> List[str]:
    """PLY property names, in file order, for ``num_rest_coeffs`` SH coefficients beyond DC per colour
    channel (15 for degree 3) and a ``latent_dim``-channel semantic latent (0: none)."""
    rest = [f"f_rest_{i}" for i in range(3 * num_rest_coeffs)]
    latent = [f"{LATENT_PREFIX}{i}" for i in range(latent_dim)]
    return _GEOMETRY_HEAD + rest + _GEOMETRY_TAIL + latent


@dataclass(frozen=True)
class PlyFingerprint:
    """What identifies the Gaussians of one exported PLY, recorded in its sidecar so that the loader can tell
    whether a PLY is the one the sidecar was written with. The count alone cannot: two exports of a run (other
    training steps, another ``--query`` selection of as many Gaussians) differ in their positions, not
    necessarily in their number."""

    num_gaussians: int
    """Gaussians in the PLY."""
    positions_sha256: str
    """sha256 (hex) of the PLY's x, y, z as little-endian float32, Gaussian after Gaussian in file order:
    exactly the position bytes written (after the selection and after dropping non-finite Gaussians)."""

    @classmethod
    def of_positions(cls, means: Float[ArrayLike, "N 3"]) -> "PlyFingerprint":
        """The fingerprint of a PLY holding these positions (as ``read_semantic_ply`` returns them, or as
        ``write_semantic_ply`` writes them). Positions are hashed as float32, as the PLY stores them."""
        values = np.ascontiguousarray(_as_numpy(means, "means"), dtype="<f4")
        if values.ndim != 2 or values.shape[1] != 3:
            raise ValueError(
                f"PlyFingerprint.of_positions needs positions of shape (N, 3), got {values.shape}."
            )
        return cls(int(values.shape[0]), hashlib.sha256(values.tobytes()).hexdigest())

    def to_record(self) -> Dict[str, Any]:
        return {"num_gaussians": self.num_gaussians, "positions_sha256": self.positions_sha256}

    @classmethod
    def from_record(cls, record: Any, source: Path) -> "PlyFingerprint":
        """Read back ``to_record``'s dict from the sidecar ``source``; a malformed entry is an error that
        names the file."""
        digest = record.get("positions_sha256") if isinstance(record, dict) else None
        count = record.get("num_gaussians") if isinstance(record, dict) else None
        if (
            not isinstance(count, int)
            or not isinstance(digest, str)
            or re.fullmatch(r"[0-9a-f]{64}", digest) is None
        ):
            raise SemanticSplatFileError(
                f"{source}: its ply_fingerprint entry is malformed ({str(record)[:120]}); the file was "
                "altered or not written by splatsem-export. Export the scene again."
            )
        return cls(count, digest)


@dataclass
class WrittenPly:
    """What ``write_semantic_ply`` (or ``write_semantic_export``) wrote."""

    path: Path
    """The PLY file."""
    kept: Bool[np.ndarray, " N"]
    """Which of the input Gaussians are in the file, in file order (the selection minus non-finite ones)."""
    num_non_finite: int
    """Selected Gaussians dropped because one of their values was NaN or infinite."""
    fingerprint: PlyFingerprint
    """The written PLY's fingerprint (what its sidecar records)."""
    sidecar: Optional[Path] = None
    """The sidecar written with the PLY by ``write_semantic_export``; None for a PLY alone."""

    @property
    def num_written(self) -> int:
        return int(self.kept.sum())


@dataclass
class GaussianColumns:
    """A semantic 3DGS scene's per-Gaussian tensors, shaped like splatfacto's ``gauss_params``."""

    means: Float[Tensor, "N 3"]
    """Centres (x, y, z)."""
    scales: Float[Tensor, "N 3"]
    """Log scales."""
    quats: Float[Tensor, "N 4"]
    """Rotations, wxyz, as stored (not renormalised)."""
    opacities: Float[Tensor, "N 1"]
    """Opacity logits."""
    features_dc: Float[Tensor, "N 3"]
    """DC SH coefficient per colour channel (splatfacto's ``features_dc``)."""
    features_rest: Float[Tensor, "N K 3"]
    """Higher SH coefficients, coefficient-major as in splatfacto (K = 0 for degree 0)."""
    latent: Optional[Float[Tensor, "N D"]]
    """Semantic latent per Gaussian (the ``sem_*`` columns); None for a plain 3DGS scene."""

    def columns(self) -> Dict[str, Optional[Tensor]]:
        """The per-Gaussian tensors above, by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GaussianColumns)}


@dataclass
class GaussianArrays(GaussianColumns):
    """The columns of a 3DGS PLY, plus its header's comments."""

    comments: List[str] = field(default_factory=list)
    """The PLY header's comment lines."""

    @property
    def sh_degree(self) -> int:
        return int(round((self.features_rest.shape[1] + 1) ** 0.5)) - 1


def _as_numpy(value: ArrayLike, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a tensor or a numpy array, got {type(value).__name__}.")
    return value


def write_semantic_ply(
    path: Union[str, Path],
    means: Float[ArrayLike, "N 3"],
    scales_log: Float[ArrayLike, "N 3"],
    quats: Float[ArrayLike, "N 4"],
    opacities_logit: Union[Float[ArrayLike, "N 1"], Float[ArrayLike, " N"]],
    features_dc: Float[ArrayLike, "N 3"],
    features_rest: Float[ArrayLike, "N K 3"],
    latent: Optional[Float[ArrayLike, "N D"]] = None,
    selection: Optional[Bool[ArrayLike, " N"]] = None,
) -> WrittenPly:
    """Write Gaussians as a 3DGS PLY (nerfstudio's ``ns-export gaussian-splat`` layout) with ``sem_*`` columns.

    Values are written as float32, exactly as given (log scales, logit opacities, raw SH coefficients).
    Gaussians with any non-finite value are dropped with a warning, as nerfstudio's exporter does; unlike
    it, low-opacity Gaussians are kept (pass a ``selection`` to drop them).

    Args:
        path: Output file (parent folders are created).
        means: Centres. [N, 3]
        scales_log: Log scales. [N, 3]
        quats: Rotations, wxyz. [N, 4]
        opacities_logit: Opacity logits. [N, 1] or [N]
        features_dc: DC SH coefficient per colour channel. [N, 3]
        features_rest: Higher SH coefficients, coefficient-major as in splatfacto. [N, K, 3]
        latent: Semantic latent per Gaussian, or None for a plain 3DGS PLY. [N, D]
        selection: Which Gaussians to write (default all). [N] bool

    Returns:
        The path, which input Gaussians were written, how many were dropped as non-finite, and the PLY's
        fingerprint.

    Raises:
        SemanticExportError: the file could not be written (the message says why); a file already at
            ``path`` is then unchanged, since the PLY is written under a temporary name and renamed onto it.
    """
    data, written = _prepare_ply(
        path,
        means,
        scales_log,
        quats,
        opacities_logit,
        features_dc,
        features_rest,
        latent,
        selection,
        stacklevel=3,
    )
    _write_together([(written.path, data.write)])
    return written


def _prepare_ply(
    path: Union[str, Path],
    means: Float[ArrayLike, "N 3"],
    scales_log: Float[ArrayLike, "N 3"],
    quats: Float[ArrayLike, "N 4"],
    opacities_logit: Union[Float[ArrayLike, "N 1"], Float[ArrayLike, " N"]],
    features_dc: Float[ArrayLike, "N 3"],
    features_rest: Float[ArrayLike, "N K 3"],
    latent: Optional[Float[ArrayLike, "N D"]],
    selection: Optional[Bool[ArrayLike, " N"]],
    *,
    stacklevel: int,
) -> Tuple[PlyData, WrittenPly]:
    """``write_semantic_ply``'s checks, selection and table, without writing: what to write and what the
    file will hold, so that a sidecar can record the PLY's fingerprint before either file exists.
    ``stacklevel`` points the non-finite warning at the exporter's caller."""
    path = Path(path)
    arrays = {
        "means": _as_numpy(means, "means"),
        "scales_log": _as_numpy(scales_log, "scales_log"),
        "quats": _as_numpy(quats, "quats"),
        "opacities_logit": _as_numpy(opacities_logit, "opacities_logit"),
        "features_dc": _as_numpy(features_dc, "features_dc"),
        "features_rest": _as_numpy(features_rest, "features_rest"),
    }
    n = arrays["means"].shape[0] if arrays["means"].ndim == 2 else -1
    if arrays["opacities_logit"].ndim == 1:
        arrays["opacities_logit"] = arrays["opacities_logit"][:, None]
    if (
        arrays["features_dc"].ndim == 3 and arrays["features_dc"].shape[1] == 1
    ):  # [N, 1, 3], as some code keeps it
        arrays["features_dc"] = arrays["features_dc"][:, 0]
    expected = {
        "means": (n, 3),
        "scales_log": (n, 3),
        "quats": (n, 4),
        "opacities_logit": (n, 1),
        "features_dc": (n, 3),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"Writing {path}: {name} must have shape {shape}, got {arrays[name].shape}.")
    rest = arrays["features_rest"]
    if rest.ndim != 3 or rest.shape[0] != n or rest.shape[2] != 3:
        raise ValueError(f"Writing {path}: features_rest must have shape ({n}, K, 3), got {rest.shape}.")
    columns = [
        arrays["means"],
        np.zeros((n, 3), dtype=np.float32),  # normals: unused by 3DGS, present in its files
        arrays["features_dc"],
        rest.transpose(0, 2, 1).reshape(n, -1),  # channel-major, as INRIA writes f_rest
        arrays["opacities_logit"],
        arrays["scales_log"],
        arrays["quats"],
    ]
    latent_dim = 0
    if latent is not None:
        latent_np = _as_numpy(latent, "latent")
        if latent_np.ndim != 2 or latent_np.shape[0] != n or latent_np.shape[1] < 1:
            raise ValueError(f"Writing {path}: latent must have shape ({n}, D), got {latent_np.shape}.")
        latent_dim = latent_np.shape[1]
        columns.append(latent_np)
    table = np.concatenate([c.astype(np.float32, copy=False) for c in columns], axis=1)
    names = gaussian_columns(rest.shape[1], latent_dim)
    assert table.shape[1] == len(names)

    if selection is None:
        keep = np.ones(n, dtype=bool)
    else:
        keep = _as_numpy(selection, "selection")
        if keep.dtype != np.bool_ or keep.shape != (n,):
            raise ValueError(
                f"Writing {path}: selection must be a bool mask of shape ({n},), got {keep.dtype} {keep.shape}."
            )
        keep = keep.copy()
    finite = np.isfinite(table).all(axis=1)
    num_non_finite = int((keep & ~finite).sum())
    if num_non_finite:
        bad = sorted({names[j] for j in np.nonzero(~np.isfinite(table[keep & ~finite]))[1]})
        warnings.warn(
            f"{path}: dropped {num_non_finite} of {int(keep.sum())} Gaussians with NaN/Inf values "
            f"(in {', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}).",
            stacklevel=stacklevel,
        )
    keep &= finite
    if not keep.any():
        raise ValueError(
            f"Writing {path}: no Gaussians left to write (selection empty or every value non-finite)."
        )

    kept_table = table[keep]
    records = np.ascontiguousarray(kept_table).view(np.dtype([(c, "<f4") for c in names])).reshape(-1)
    comments = [f"Generated by splatsem_ns (semantic latent: {latent_dim} channels)", "Vertical Axis: z"]
    data = PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<", comments=comments)
    fingerprint = PlyFingerprint.of_positions(kept_table[:, :3])  # x, y, z are the table's first columns
    return data, WrittenPly(path=path, kept=keep, num_non_finite=num_non_finite, fingerprint=fingerprint)


def _indexed_columns(names: List[str], prefix: str, path: Path) -> List[str]:
    """``prefix0 .. prefix{M-1}`` in index order; an error if the indices have gaps."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    indices = sorted(int(m.group(1)) for m in map(pattern.match, names) if m)
    if indices != list(range(len(indices))):
        raise SemanticSplatFileError(f"{path}: the {prefix}* columns are not numbered 0..{len(indices) - 1}.")
    return [f"{prefix}{i}" for i in indices]


def read_semantic_ply(path: Union[str, Path]) -> GaussianArrays:
    """Read a 3DGS PLY (with or without ``sem_*`` columns) into splatfacto-shaped tensors.

    Any 3DGS PLY with SH colours works (INRIA's, nerfstudio's, this package's), in any PLY encoding.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gaussian PLY {path} does not exist.")
    try:
        ply = PlyData.read(str(path))
        vertex = ply["vertex"]
    except Exception as err:  # plyfile raises several types for broken files
        raise SemanticSplatFileError(f"{path} is not a readable PLY with a vertex element: {err}") from err
    names = list(vertex.data.dtype.names or ())
    missing = [c for c in _GEOMETRY_HEAD + _GEOMETRY_TAIL if c not in names and c not in ("nx", "ny", "nz")]
    if missing:
        raise SemanticSplatFileError(
            f"{path} is not a 3DGS PLY with SH colours: it lacks the columns {missing} (it has {names[:12]}"
            f"{' ...' if len(names) > 12 else ''})."
        )
    rest_names = _indexed_columns(names, "f_rest_", path)
    if len(rest_names) % 3:
        raise SemanticSplatFileError(f"{path}: {len(rest_names)} f_rest columns is not a multiple of 3.")
    latent_names = _indexed_columns(names, LATENT_PREFIX, path)

    def stack(columns: List[str]) -> np.ndarray:
        n = len(vertex.data)
        if not columns:
            return np.zeros((n, 0), dtype=np.float32)
        return np.stack([np.asarray(vertex[c], dtype=np.float32) for c in columns], axis=1)

    n, k = len(vertex.data), len(rest_names) // 3
    rest = stack(rest_names).reshape(n, 3, k).transpose(0, 2, 1)
    return GaussianArrays(
        means=torch.from_numpy(stack(["x", "y", "z"])),
        scales=torch.from_numpy(stack(["scale_0", "scale_1", "scale_2"])),
        quats=torch.from_numpy(stack(["rot_0", "rot_1", "rot_2", "rot_3"])),
        opacities=torch.from_numpy(stack(["opacity"])),
        features_dc=torch.from_numpy(stack(["f_dc_0", "f_dc_1", "f_dc_2"])),
        features_rest=torch.from_numpy(np.ascontiguousarray(rest)),
        latent=torch.from_numpy(stack(latent_names)) if latent_names else None,
        comments=list(ply.comments),
    )


# ------------------------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class TeacherInfo:
    """What a semantic scene knows of one teacher without loading it."""

    name: str
    """The teacher's key (the name of its projector head)."""
    feature_dim: int
    """Channels of the teacher's features (the head's output)."""
    has_text_encoder: Optional[bool] = None
    """Whether the teacher embeds text; None where only building the teacher can tell."""
    config_class: Optional[str] = None
    """``module:QualName`` of the teacher's config class; None when the config is unknown."""
    config_fields: Dict[str, Any] = field(default_factory=dict)
    """The config's field values as plain data (paths as strings, tuples as lists)."""

    @classmethod
    def from_config(
        cls, config: Any, feature_dim: int, has_text_encoder: Optional[bool] = None
    ) -> "TeacherInfo":
        """Describe ``config`` (a ``TeacherConfig``). ``has_text_encoder=None`` asks the teacher class."""
        if has_text_encoder is None:
            has_text_encoder = declared_text_encoder(config)
        klass = type(config)
        return cls(
            name=str(config.name),
            feature_dim=int(feature_dim),
            has_text_encoder=has_text_encoder,
            config_class=f"{klass.__module__}:{klass.__qualname__}",
            config_fields={
                f.name: _plain(getattr(config, f.name))
                for f in dataclasses.fields(config)
                if f.init and not f.name.startswith("_")
            },
        )

    def to_record(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "feature_dim": self.feature_dim,
            "has_text_encoder": self.has_text_encoder,
            "config_class": self.config_class,
            "config_fields": dict(self.config_fields),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "TeacherInfo":
        return cls(
            name=str(record["name"]),
            feature_dim=int(record["feature_dim"]),
            has_text_encoder=record.get("has_text_encoder"),
            config_class=record.get("config_class"),
            config_fields=dict(record.get("config_fields") or {}),
        )

    def build_config(self, **overrides: Any) -> Any:
        """The teacher's config rebuilt from the stored class path and fields, with ``overrides`` applied
        (e.g. ``checkpoint=Path(...)`` where the weights live elsewhere on this machine)."""
        from splatsem_ns.teachers.base import TeacherConfig

        if self.config_class is None:
            raise ValueError(
                f"Teacher '{self.name}': the scene does not record its config, so it cannot be rebuilt."
            )
        module_name, _, qualname = self.config_class.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"Teacher '{self.name}': its config class {self.config_class} cannot be imported ({err}). "
                "Install or import the package that defines it."
            ) from err
        if not (isinstance(target, type) and issubclass(target, TeacherConfig)):
            raise ValueError(f"Teacher '{self.name}': {self.config_class} is not a TeacherConfig subclass.")
        known = {f.name: f for f in dataclasses.fields(target) if f.init and not f.name.startswith("_")}
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # unresolvable annotations: fall back to the raw values
            hints = {}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"Teacher '{self.name}': {target.__name__} has no field(s) {unknown}.")
        kwargs = {}
        for name, value in self.config_fields.items():
            if name not in known:
                warnings.warn(
                    f"Teacher '{self.name}': stored field {name!r} no longer exists in {target.__name__}; "
                    "ignored.",
                    stacklevel=2,
                )
                continue
            kwargs[name] = _restore(value, hints.get(name))
        kwargs.update(overrides)
        return target(**kwargs)


def _plain(value: Any) -> Any:
    """A config value as data that ``torch.load(weights_only=True)`` reads back."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _restore(value: Any, hint: Any) -> Any:
    """Undo ``_plain`` for the types configs use: paths and tuples (lists inside them stay lists)."""
    if value is None or hint is None:
        return value
    options = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if isinstance(value, str) and isinstance(origin, type) and issubclass(origin, Path):
            return Path(value)
        if isinstance(value, list) and origin is tuple:
            return tuple(value)
    return value


# ----------------------------------------------------------------------------------------------- heads


def head_architecture(name: str, head: nn.Module) -> Dict[str, int]:
    """``latent_dim, feature_dim, hidden_dim, num_layers`` of a ``ProjectorHead``."""
    if not isinstance(head, ProjectorHead):
        raise TypeError(f"Projector head '{name}' is a {type(head).__name__}, not a ProjectorHead.")
    linears = [m for m in head.net if isinstance(m, nn.Linear)]
    return {
        "latent_dim": int(head.latent_dim),
        "feature_dim": int(head.feature_dim),
        "hidden_dim": int(linears[0].out_features) if len(linears) > 1 else 0,
        "num_layers": len(linears),
    }


def head_to_record(name: str, head: nn.Module) -> Dict[str, Any]:
    return {
        "architecture": head_architecture(name, head),
        "state_dict": {k: v.detach().cpu().clone().contiguous() for k, v in head.state_dict().items()},
    }


def head_from_record(name: str, record: Mapping[str, Any], source: Path) -> ProjectorHead:
    arch = record["architecture"]
    head = ProjectorHead(
        int(arch["latent_dim"]),
        int(arch["feature_dim"]),
        max(1, int(arch["hidden_dim"])),
        int(arch["num_layers"]),
    )
    try:
        head.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as err:
        raise SemanticSplatFileError(
            f"{source}: the weights of projector head '{name}' do not fit its recorded architecture {arch}: {err}"
        ) from err
    return head.eval()


# --------------------------------------------------------------------------------------------- sidecar


def _sidecar_record(
    ply_path: Path,
    *,
    fingerprint: PlyFingerprint,
    latent_dim: Optional[int],
    heads: Mapping[str, nn.Module],
    teachers: Mapping[str, TeacherInfo],
    semantic_scale: Optional[float],
    sh_degree: int,
    source_config: Optional[Union[str, Path]],
) -> Dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ply_file": ply_path.name,
        "num_gaussians": fingerprint.num_gaussians,
        "ply_fingerprint": fingerprint.to_record(),
        "latent_dim": None if latent_dim is None else int(latent_dim),
        "semantic_scale": None if semantic_scale is None else float(semantic_scale),
        "sh_degree": int(sh_degree),
        "source_config": None if source_config is None else str(source_config),
        "heads": {name: head_to_record(name, head) for name, head in heads.items()},
        "teachers": {name: info.to_record() for name, info in teachers.items()},
    }


def write_semantic_sidecar(
    ply_path: Union[str, Path],
    *,
    num_gaussians: int,
    latent_dim: Optional[int],
    heads: Mapping[str, nn.Module],
    teachers: Mapping[str, TeacherInfo],
    semantic_scale: Optional[float],
    sh_degree: int,
    source_config: Optional[Union[str, Path]] = None,
    fingerprint: Optional[PlyFingerprint] = None,
) -> Path:
    """Write ``<ply stem>.semantic.pt`` next to ``ply_path`` (see the module docstring); returns its path.

    The sidecar alone, for a PLY that is already written; ``write_semantic_export`` writes the pair
    atomically and is what exporters should use. ``fingerprint=None`` fingerprints the PLY now at
    ``ply_path`` (reading it back), so the sidecar is bound to that file.

    Raises:
        SemanticExportError: the sidecar could not be written; a sidecar already there is unchanged.
    """
    ply_path = Path(ply_path)
    if fingerprint is None:
        fingerprint = PlyFingerprint.of_positions(read_semantic_ply(ply_path).means)
    if fingerprint.num_gaussians != int(num_gaussians):
        raise ValueError(
            f"Writing the sidecar of {ply_path}: num_gaussians={num_gaussians} but the PLY's fingerprint "
            f"counts {fingerprint.num_gaussians} Gaussians."
        )
    record = _sidecar_record(
        ply_path,
        fingerprint=fingerprint,
        latent_dim=latent_dim,
        heads=heads,
        teachers=teachers,
        semantic_scale=semantic_scale,
        sh_degree=sh_degree,
        source_config=source_config,
    )
    path = sidecar_path(ply_path)
    _write_together([(path, lambda stream: torch.save(record, stream))])
    return path


def write_semantic_export(
    ply_path: Union[str, Path],
    gaussians: GaussianColumns,
    *,
    heads: Mapping[str, nn.Module],
    teachers: Mapping[str, TeacherInfo],
    semantic_scale: Optional[float],
    sh_degree: int,
    selection: Optional[Bool[ArrayLike, " N"]] = None,
    source_config: Optional[Union[str, Path]] = None,
) -> WrittenPly:
    """Write a scene as its PLY and, when it has semantics (a latent or heads), its sidecar, atomically.

    Both files are written under hidden temporary names in the destination folder and renamed into place
    only once both are complete: the sidecar first, then the PLY. The PLY goes last because it is the file
    everything opens (viewers, ``load_semantic_scene``, whoever checks that the export is there), so when
    it appears its sidecar is already the matching one; if the PLY's rename fails, the previous sidecar is
    put back from a hard link taken beforehand. Any failure thus leaves an earlier export at these paths as
    it was (where the file system has hard links) and no temporary file behind.

    A scene without semantics gets no sidecar, and a sidecar an earlier export left at
    ``<stem>.semantic.pt`` is deleted once the new PLY is in place, so a plain PLY never sits beside
    another export's heads.

    Args:
        ply_path: The PLY to write; the sidecar is ``sidecar_path(ply_path)``.
        gaussians: The Gaussians (a ``SemanticScene`` or any ``GaussianColumns``).
        heads: Projector heads by teacher name.
        teachers: What is known of each teacher.
        semantic_scale: Resolution of the semantic render relative to the images (None when unknown).
        sh_degree: Spherical-harmonics degree of the colours.
        selection: Which Gaussians to write (default all). [N] bool
        source_config: The training run's config.yml, recorded in the sidecar.

    Raises:
        SemanticExportError: a file could not be written; the message names it, says why, and says what
            became of the earlier files (normally: unchanged).
    """
    ply_path = Path(ply_path)
    g = gaussians
    data, written = _prepare_ply(
        ply_path,
        g.means,
        g.scales,
        g.quats,
        g.opacities,
        g.features_dc,
        g.features_rest,
        g.latent,
        selection,
        stacklevel=4,
    )
    side = sidecar_path(ply_path)
    if g.latent is None and not heads:
        stale = side if side.is_file() or side.is_symlink() else None
        _write_together([(ply_path, data.write)], stale=stale)
        return written
    record = _sidecar_record(
        ply_path,
        fingerprint=written.fingerprint,
        latent_dim=None if g.latent is None else int(g.latent.shape[1]),
        heads=heads,
        teachers=teachers,
        semantic_scale=semantic_scale,
        sh_degree=sh_degree,
        source_config=source_config,
    )
    # Sidecar first, PLY last (see above): the PLY's appearance is what completes the export.
    _write_together([(side, lambda stream: torch.save(record, stream)), (ply_path, data.write)])
    return dataclasses.replace(written, sidecar=side)


def _load_sidecar_file(path: Path) -> Any:
    """The sidecar's content, read with ``weights_only=True``; errors say what is wrong with the file (never
    torch's advice to retry with ``weights_only=False``: a genuine sidecar never needs it, and it is unsafe)."""
    return load_torch_file(
        path,
        what="semantic sidecar",
        remedy="Export the scene again (splatsem-export) to rewrite the PLY and its sidecar.",
        not_written_by="splatsem-export",
        error=SemanticSplatFileError,
    )


def read_semantic_sidecar(path: Union[str, Path]) -> Dict[str, Any]:
    """The sidecar's record, read with ``weights_only=True``; heads are rebuilt as ``ProjectorHead``\\ s,
    teachers as ``TeacherInfo``\\ s and ``ply_fingerprint`` as a ``PlyFingerprint`` (None for a version-1
    sidecar, which has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Semantic sidecar {path} does not exist.")
    record = _load_sidecar_file(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise SemanticSplatFileError(
            f"{path} is not a splatsem_ns semantic sidecar (no format '{FORMAT_NAME}')."
        )
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SemanticSplatFileError(
            f"{path} has sidecar format version {version}; this splatsem_ns reads versions up to "
            f"{FORMAT_VERSION}. Update splatsem_ns."
        )
    record = dict(record)
    record["heads"] = {n: head_from_record(n, r, path) for n, r in (record.get("heads") or {}).items()}
    record["teachers"] = {n: TeacherInfo.from_record(r) for n, r in (record.get("teachers") or {}).items()}
    record["ply_fingerprint"] = (
        PlyFingerprint.from_record(record.get("ply_fingerprint"), path) if version >= 2 else None
    )
    return record


# ------------------------------------------------------------------------------------- atomic writing


@dataclass
class _Replaced:
    """A file about to be replaced, and how to put it back."""

    final: Path
    existed: bool
    """Whether something was at ``final`` before."""
    backup: Optional[Path] = None
    """A hard link to the earlier file (None: there was none, or the file system refused the link)."""


def _write_together(files: Sequence[Tuple[Path, Writer]], stale: Optional[Path] = None) -> None:
    """Write ``files`` so that each ends up either complete and new or untouched, and all of them or none.

    Every file is written under a temporary name first; only once all are written are they renamed onto
    their paths, in the order given (callers put the file that marks the export complete last). A rename
    that fails undoes the ones before it, restoring the files they replaced from hard links taken just
    before. ``stale`` is deleted after all files are in place.

    Raises:
        SemanticExportError: naming the file that could not be written, why, and what became of the earlier
            files. No temporary file or backup link is left behind.
    """
    targets = " and ".join(str(final) for final, _ in files)
    untouched = (
        f"The export was abandoned before any file was replaced: anything already at {targets} is unchanged."
    )
    staged: List[Path] = []
    links: List[Path] = []
    replaced: List[_Replaced] = []
    try:
        for final, write in files:
            try:
                staged.append(stage_file(final, write))
            except OSError as err:
                raise SemanticExportError(f"Could not write {final}: {os_reason(err)}. {untouched}") from err
        for index, (temporary, (final, _)) in enumerate(zip(staged, files, strict=True)):
            entry = _Replaced(final, existed=final.exists() or final.is_symlink())
            if entry.existed and index < len(files) - 1 and final.is_file():
                # Only files renamed before the last one may have to be put back.
                backup = hidden_sibling(final, "previous")
                try:
                    os.link(final, backup)
                    entry.backup = backup
                    links.append(backup)
                except OSError:  # a file system without hard links: the file cannot be put back
                    pass
            try:
                os.replace(temporary, final)
            except OSError as err:
                outcome = _undo(replaced) if replaced else untouched
                raise SemanticExportError(
                    f"Could not write {final}: {os_reason(err)} (moving the finished file into place). "
                    f"{outcome}"
                ) from err
            replaced.append(entry)
    finally:  # the temporaries that were renamed, and the links that were put back, are gone already
        for temporary in staged + links:
            remove_quietly(temporary)
    sync_folder(files[-1][0].parent)
    if stale is not None:
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise SemanticExportError(
                f"Wrote {targets}, but could not remove {stale}, which an earlier export left there: "
                f"{os_reason(err)}. Delete it, so that it is not taken for the new export's sidecar."
            ) from err


def _undo(replaced: Sequence[_Replaced]) -> str:
    """Put back what the ``replaced`` paths held before (newest first); says how that went."""
    done: List[str] = []
    lost: List[str] = []
    for entry in reversed(replaced):
        try:
            if entry.backup is not None:
                os.replace(entry.backup, entry.final)
                entry.backup = None
                done.append(
                    f"{entry.final} was put back as it was, so the earlier export there is unchanged."
                )
            elif not entry.existed:
                entry.final.unlink()
                done.append(f"The new {entry.final} was removed again, so nothing of this export is left.")
            else:
                lost.append(f"{entry.final} (no hard link to the earlier file could be made to keep it)")
        except OSError as err:
            lost.append(f"{entry.final} ({os_reason(err)})")
    if not lost:
        return " ".join(done)
    return (
        f"The earlier file could not be put back at {', '.join(lost)}, which now holds the new export's "
        "file: loading refuses such a mismatched pair. Export again."
    )
