"""Scene collections: many ordinary nerfstudio scenes plus one index file, the unit feed-forward models train on.

A collection is a folder (or several) of scenes that the ``splatsem-data`` dataparser reads, each a folder with a
``transforms.json``, and an index, ``collection.json``::

    {
      "format": "splatsem_ns.scene_collection", "format_version": 1,
      "classes": {"1": "wall", ...},               # the class table label images and points use (NYU40 ids)
      "scenes": [
        {"name": "proc_000000", "path": "proc_000000", "split": "train", "source": "procedural",
         "num_views": 24, "image_size": [256, 320], "has_depth": true, "has_labels": true,
         "has_instances": true, "has_labeled_points": true, "stats": {...}},
        {"name": "scannet_scene0000_00", "path": "/data/scannet/scene0000_00", "split": "test", ...}
      ],
      "statistics": {...}                           # collection-wide, free-form (generator settings, counts)
    }

``path`` is relative to the index's folder or absolute, so an index can point at real scenes where they already
are (nothing is copied) and a generated collection stays relocatable. Splits are a function of the scene's name
(a hash), not of the order or number of scenes: adding scenes never moves an existing one to another split.
``splatsem-collection`` builds an index from folders of scenes, checking each with the real dataparser; a scene
that fails is reported and left out, never fatal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

from splatsem_ns.files import write_atomically

FORMAT_NAME = "splatsem_ns.scene_collection"
"""``format`` entry of every collection index."""
FORMAT_VERSION = 1
"""Index layout version; readers refuse newer versions rather than misread them."""
INDEX_FILE = "collection.json"
"""The index's usual name inside a collection folder."""
SPLITS: Tuple[str, ...] = ("train", "val", "test")

Split = Literal["train", "val", "test"]


class CollectionError(ValueError):
    """A collection index is missing, malformed or inconsistent. The message names the file."""


@dataclass
class SceneEntry:
    """One scene of a collection, as its index records it."""

    name: str
    """Unique name within the collection (also what decides its split)."""
    path: str
    """Folder holding ``transforms.json``: relative to the index's folder, or absolute."""
    split: Split
    """Which split the scene belongs to."""
    source: str = "real"
    """Where it comes from: "procedural" (generated) or "real" (a capture)."""
    num_views: int = 0
    """Frames in its transforms.json."""
    image_size: Tuple[int, int] = (0, 0)
    """(height, width) of its images."""
    has_depth: bool = False
    """Every frame has a depth image."""
    has_labels: bool = False
    """Every frame has a per-pixel class-label image."""
    has_instances: bool = False
    """Every frame has a per-pixel instance image."""
    has_labeled_points: bool = False
    """A labelled point cloud is present (3D evaluation)."""
    stats: Dict[str, Any] = field(default_factory=dict)
    """Free-form per-scene statistics (room shape, classes present, ...)."""

    def to_record(self) -> Dict[str, Any]:
        record = asdict(self)
        record["image_size"] = list(self.image_size)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any], where: Path) -> "SceneEntry":
        try:
            entry = cls(**{**record, "image_size": tuple(record.get("image_size", (0, 0)))})
        except TypeError as err:
            raise CollectionError(f"{where}: malformed scene entry {dict(record)!r}: {err}") from err
        if entry.split not in SPLITS:
            raise CollectionError(
                f"{where}: scene '{entry.name}' has split {entry.split!r}; use one of {SPLITS}"
            )
        return entry


@dataclass
class SceneCollection:
    """A collection index: its scenes, their splits and the class table (see the module docstring)."""

    root: Path
    """Folder of the index; relative scene paths are resolved against it."""
    scenes: List[SceneEntry]
    """Every scene, in index order."""
    classes: Dict[int, str] = field(default_factory=dict)
    """Class id -> name of the label images and labelled points (0 is unlabelled and never listed)."""
    statistics: Dict[str, Any] = field(default_factory=dict)
    """Collection-wide statistics and settings (free-form)."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.scenes]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise CollectionError(f"collection at {self.root}: scene names {duplicated[:5]} appear twice")

    def split(self, name: Split) -> List[SceneEntry]:
        """The scenes of one split, in index order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return [s for s in self.scenes if s.split == name]

    def scene_path(self, entry: SceneEntry) -> Path:
        """The folder holding the scene's transforms.json."""
        path = Path(entry.path).expanduser()
        return path if path.is_absolute() else self.root / path

    def to_record(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            "scenes": [s.to_record() for s in self.scenes],
            "statistics": self.statistics,
        }

    def save(self, path: Optional[Path] = None) -> Path:
        """Write the index (atomically) to ``path`` (default: ``root / collection.json``)."""
        path = Path(path) if path is not None else self.root / INDEX_FILE
        text = json.dumps(self.to_record(), indent=1) + "\n"
        write_atomically(path, lambda stream: stream.write(text.encode()))
        return path

    @classmethod
    def load(cls, path: Path) -> "SceneCollection":
        """Read an index: a ``collection.json`` file, or a folder holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_FILE
        if not path.is_file():
            raise CollectionError(
                f"{path} does not exist: expected a scene collection index (make one with `splatsem-collection` or "
                "`splatsem-synthetic --num-scenes N`)"
            )
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CollectionError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
            raise CollectionError(f"{path} is not a scene collection index (no format '{FORMAT_NAME}')")
        version = record.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CollectionError(
                f"{path} has collection format version {version}; this splatsem_ns reads versions up to "
                f"{FORMAT_VERSION}. Update splatsem_ns."
            )
        scenes = [SceneEntry.from_record(r, path) for r in record.get("scenes", [])]
        try:
            classes = {int(k): str(v) for k, v in (record.get("classes") or {}).items()}
        except ValueError as err:
            raise CollectionError(f"{path}: class ids must be integers: {err}") from err
        return cls(
            root=path.parent, scenes=scenes, classes=classes, statistics=record.get("statistics") or {}
        )


def split_of(name: str, val_fraction: float, test_fraction: float, salt: str = "") -> Split:
    """The split of a scene, from a hash of its name: stable when scenes are added or removed, and the same on
    every machine (``salt`` reshuffles every assignment at once)."""
    if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must leave a training split"
        )
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def describe_scene(
    scene_dir: Path, name: str, split: Split, source: str, stats: Optional[dict] = None
) -> SceneEntry:
    """An index entry for the scene in ``scene_dir`` after checking it with the ``splatsem-data`` dataparser (every
    image decoded, depth sizes, poses, point clouds). Raises the dataparser's ``DatasetError`` for a broken scene."""
    from splatsem_ns.data.dataparser import SplatsemDataParserConfig

    parser = SplatsemDataParserConfig(data=Path(scene_dir), load_3D_points=False).setup()
    transforms_path, meta = parser._validate()
    frames = meta["frames"]
    first = frames[0]
    height = int(first.get("h", meta.get("h", 0)))
    width = int(first.get("w", meta.get("w", 0)))
    labeled = transforms_path.parent / meta.get("labeled_ply_file_path", parser.config.labeled_points_file)
    return SceneEntry(
        name=name,
        path=str(scene_dir),
        split=split,
        source=source,
        num_views=len(frames),
        image_size=(height, width),
        has_depth=all("depth_file_path" in f for f in frames),
        has_labels=all("semantic_file_path" in f for f in frames),
        has_instances=all("instance_file_path" in f for f in frames),
        has_labeled_points=labeled.is_file(),
        stats=dict(stats or {}),
    )


def find_scenes(roots: Iterable[Path]) -> List[Path]:
    """Every folder holding a ``transforms.json`` under ``roots`` (a root may itself be a scene), sorted."""
    found = set()
    for root in roots:
        root = Path(root)
        if (root / "transforms.json").is_file():
            found.add(root)
        found.update(p.parent for p in root.rglob("transforms.json"))
    return sorted(found)


def unique_names(folders: Sequence[Path]) -> List[str]:
    """A name per scene folder: its folder name, prefixed by its parent's where two would collide."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}_{f.name}" if names.count(f.name) > 1 else f.name for f in folders]
