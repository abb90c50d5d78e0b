"""Semantic Gaussian scenes on disk: a 3DGS PLY with ``sem_*`` columns, its sidecar, and the loader.

Names are imported on first use, so ``import splatsem_ns.export`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SemanticScene": "loader",
    "load_semantic_scene": "loader",
    "GaussianArrays": "semantic_ply",
    "PlyFingerprint": "semantic_ply",
    "SemanticExportError": "semantic_ply",
    "SemanticSplatFileError": "semantic_ply",
    "TeacherInfo": "semantic_ply",
    "WrittenPly": "semantic_ply",
    "gaussian_columns": "semantic_ply",
    "read_semantic_ply": "semantic_ply",
    "read_semantic_sidecar": "semantic_ply",
    "sidecar_path": "semantic_ply",
    "write_semantic_export": "semantic_ply",
    "write_semantic_ply": "semantic_ply",
    "write_semantic_sidecar": "semantic_ply",
}

__all__ = [
    "GaussianArrays",
    "PlyFingerprint",
    "SemanticExportError",
    "SemanticScene",
    "SemanticSplatFileError",
    "TeacherInfo",
    "WrittenPly",
    "gaussian_columns",
    "load_semantic_scene",
    "read_semantic_ply",
    "read_semantic_sidecar",
    "sidecar_path",
    "write_semantic_export",
    "write_semantic_ply",
    "write_semantic_sidecar",
]

if TYPE_CHECKING:
    from splatsem_ns.export.loader import (
        SemanticScene,
        load_semantic_scene,
    )
    from splatsem_ns.export.semantic_ply import (
        GaussianArrays,
        PlyFingerprint,
        SemanticExportError,
        SemanticSplatFileError,
        TeacherInfo,
        WrittenPly,
        gaussian_columns,
        read_semantic_ply,
        read_semantic_sidecar,
        sidecar_path,
        write_semantic_export,
        write_semantic_ply,
        write_semantic_sidecar,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
