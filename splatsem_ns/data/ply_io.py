"""Point clouds with colour, semantic labels and instance ids, read and written as PLY through plyfile.

open3d is deliberately not used: it is slow to import, drops every column it does not know (labels,
instances), and is not installed everywhere nerfstudio runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
from jaxtyping import Float, Int, UInt8
from plyfile import PlyData, PlyElement

DEFAULT_LABEL_COLUMNS: tuple[str, ...] = ("label", "nyu40_label")
"""Column names tried, in order, for per-point semantic labels."""
DEFAULT_INSTANCE_COLUMNS: tuple[str, ...] = ("instance_id", "instance")
"""Column names tried, in order, for per-point instance ids."""


class PointCloudError(ValueError):
    """A point cloud file is missing, unreadable, or holds unusable data. The message names the file."""


@dataclass
class PointCloud:
    """Points with optional colour, semantic label and instance id per point."""

    xyz: Float[np.ndarray, "N 3"]
    """Positions, float32."""
    rgb: Optional[UInt8[np.ndarray, "N 3"]] = None
    """Colours in 0..255, or None when the file has no ``red green blue`` columns."""
    labels: Optional[Int[np.ndarray, " N"]] = None
    """Semantic class id per point (int64; 0 conventionally means unlabelled), or None."""
    instance_ids: Optional[Int[np.ndarray, " N"]] = None
    """Instance id per point (int64), or None."""

    def __len__(self) -> int:
        return int(self.xyz.shape[0])


def _first_present(names: Sequence[str], available: Sequence[str]) -> Optional[str]:
    for name in names:
        if name in available:
            return name
    return None


def read_point_cloud(
    path: Union[str, Path],
    label_column: Union[str, Sequence[str], None] = None,
    instance_column: Union[str, Sequence[str], None] = None,
) -> PointCloud:
    """Read a PLY point cloud (ASCII or binary) into a :class:`PointCloud`.

    Args:
        path: The ``.ply`` file.
        label_column: Column (or columns, tried in order) holding semantic labels. Defaults to
            ``label`` then ``nyu40_label``. A column named explicitly that is absent is an error;
            with the default, a file without labels gives ``labels=None``.
        instance_column: Same for instance ids; defaults to ``instance_id`` then ``instance``.

    Raises:
        PointCloudError: missing or corrupt file, no ``vertex`` element, no ``x y z`` columns, zero
            points, non-finite coordinates, or an explicitly requested column that is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise PointCloudError(f"point cloud {path} does not exist")
    try:
        ply = PlyData.read(str(path))
    except Exception as err:  # plyfile raises several unrelated types for malformed files
        raise PointCloudError(f"point cloud {path} is not a readable PLY file: {err}") from err

    if "vertex" not in [element.name for element in ply.elements]:
        raise PointCloudError(f"point cloud {path} has no 'vertex' element")
    vertex = ply["vertex"]
    names = [prop.name for prop in vertex.properties]
    missing = [axis for axis in ("x", "y", "z") if axis not in names]
    if missing:
        raise PointCloudError(f"point cloud {path} has no {'/'.join(missing)} column (columns: {names})")
    if vertex.count == 0:
        raise PointCloudError(f"point cloud {path} has no points")

    data = vertex.data
    xyz = np.stack([np.asarray(data[axis], dtype=np.float32) for axis in ("x", "y", "z")], axis=-1)
    finite = np.isfinite(xyz).all(axis=-1)
    if not finite.all():
        raise PointCloudError(
            f"point cloud {path} has {int((~finite).sum())} points with non-finite coordinates "
            f"(first at index {int(np.argmin(finite))})"
        )

    rgb = None
    if all(channel in names for channel in ("red", "green", "blue")):
        colours = np.stack([np.asarray(data[c]) for c in ("red", "green", "blue")], axis=-1)
        if np.issubdtype(colours.dtype, np.floating):
            # Some writers store colours as floats in [0, 1].
            scale = 255.0 if colours.size and float(np.nanmax(colours)) <= 1.0 else 1.0
            colours = np.clip(np.round(colours * scale), 0, 255)
        rgb = colours.astype(np.uint8)

    labels = _read_int_column(path, data, names, label_column, DEFAULT_LABEL_COLUMNS, "label")
    instance_ids = _read_int_column(path, data, names, instance_column, DEFAULT_INSTANCE_COLUMNS, "instance")
    return PointCloud(xyz=xyz, rgb=rgb, labels=labels, instance_ids=instance_ids)


def _read_int_column(
    path: Path,
    data: np.ndarray,
    names: Sequence[str],
    requested: Union[str, Sequence[str], None],
    defaults: Sequence[str],
    what: str,
) -> Optional[np.ndarray]:
    candidates = defaults if requested is None else ([requested] if isinstance(requested, str) else requested)
    column = _first_present(candidates, names)
    if column is None:
        if requested is not None:
            raise PointCloudError(
                f"point cloud {path} has no {what} column {list(candidates)} (columns: {list(names)})"
            )
        return None
    return np.asarray(data[column]).astype(np.int64)


def write_point_cloud(
    path: Union[str, Path],
    xyz: Float[np.ndarray, "N 3"],
    rgb: Optional[UInt8[np.ndarray, "N 3"]] = None,
    labels: Optional[Int[np.ndarray, " N"]] = None,
    instance_ids: Optional[Int[np.ndarray, " N"]] = None,
    extra: Optional[Dict[str, np.ndarray]] = None,
    label_column: str = "label",
    text: bool = False,
) -> Path:
    """Write points as a binary little-endian PLY (``x y z`` float32, ``red green blue`` uint8,
    ``label``/``instance_id`` int32, then each ``extra`` column with its own dtype).

    The output depends only on the arrays, so equal inputs give byte-identical files.

    Raises:
        PointCloudError: shapes disagree, coordinates are not finite, or a column name repeats.
    """
    path = Path(path)
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise PointCloudError(f"cannot write {path}: xyz must have shape [N, 3], got {xyz.shape}")
    if not np.isfinite(xyz).all():
        raise PointCloudError(f"cannot write {path}: xyz has non-finite coordinates")
    count = xyz.shape[0]

    columns: list[tuple[str, np.ndarray]] = [
        (axis, xyz[:, i].astype(np.float32)) for i, axis in enumerate("xyz")
    ]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.shape != (count, 3):
            raise PointCloudError(f"cannot write {path}: rgb must have shape {(count, 3)}, got {rgb.shape}")
        if np.issubdtype(rgb.dtype, np.floating):
            raise PointCloudError(f"cannot write {path}: rgb must be integer 0..255, got {rgb.dtype}")
        columns += [(c, rgb[:, i].astype(np.uint8)) for i, c in enumerate(("red", "green", "blue"))]
    for name, values in ((label_column, labels), ("instance_id", instance_ids)):
        if values is not None:
            columns.append((name, _column(path, name, values, count).astype(np.int32)))
    for name, values in (extra or {}).items():
        columns.append((name, _column(path, name, values, count)))

    seen = [name for name, _ in columns]
    duplicates = sorted({name for name in seen if seen.count(name) > 1})
    if duplicates:
        raise PointCloudError(f"cannot write {path}: repeated column names {duplicates}")

    vertex = np.empty(count, dtype=[(name, values.dtype) for name, values in columns])
    for name, values in columns:
        vertex[name] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=text, byte_order="<").write(str(path))
    return path


def _column(path: Path, name: str, values: np.ndarray, count: int) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (count,):
        raise PointCloudError(
            f"cannot write {path}: column {name!r} must have shape ({count},), got {values.shape}"
        )
    if values.dtype == np.float16 or values.dtype.kind not in "biuf":
        raise PointCloudError(f"cannot write {path}: column {name!r} has unsupported dtype {values.dtype}")
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    if values.dtype.kind in "iu" and values.dtype.itemsize == 8:
        # PLY has no 64-bit integer type.
        narrow = np.int32 if values.dtype.kind == "i" else np.uint32
        info = np.iinfo(narrow)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise PointCloudError(f"cannot write {path}: column {name!r} does not fit in {np.dtype(narrow)}")
        values = values.astype(narrow)
    return values
