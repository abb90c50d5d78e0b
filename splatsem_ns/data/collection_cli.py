"""``splatsem-collection``: turn folders of nerfstudio scenes into a scene collection (an index with splits).

::

    splatsem-collection --scenes ../shared/data --out real/collection.json
    splatsem-collection --scenes ~/scannet_export --include generated/collection.json --out mixed/collection.json
    splatsem-collection --scenes ~/scannet_export --test-scenes scene0000_00 --out scannet/collection.json

Every folder holding a ``transforms.json`` under ``--scenes`` becomes a scene, after the ``splatsem-data``
dataparser checks it (every image decoded, poses, depth sizes, point clouds). A scene that fails is reported
with the reason and left out; the index is written with the others. Scenes keep their place on disk: the index
records their paths (relative to the index where possible). ``--include`` adds the scenes of existing indexes
(e.g. a generated collection), keeping their splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import tyro

from splatsem_ns.data.class_tables import NYU40
from splatsem_ns.data.collection import (
    CollectionError,
    SceneCollection,
    describe_scene,
    find_scenes,
    split_of,
    unique_names,
)
from splatsem_ns.progress import logged_progress


@dataclass
class BuildCollection:
    """Index folders of nerfstudio scenes as a scene collection (see the module docstring)."""

    scenes: Tuple[Path, ...] = ()
    """Folders to search for scenes (each folder holding a transforms.json, at any depth)."""
    out: Path = Path("collection/collection.json")
    """The index to write (its folder is created)."""
    include: Tuple[Path, ...] = ()
    """Existing collection indexes whose scenes are added as they are (splits kept)."""
    val_fraction: float = 0.05
    """Fraction of the found scenes held out for validation (chosen by a hash of each scene's name)."""
    test_fraction: float = 0.05
    """Fraction held out for testing."""
    test_scenes: Tuple[str, ...] = ()
    """Scene names that go to the test split whatever the hash says (e.g. scenes kept back for evaluation)."""
    source: str = "real"
    """What the found scenes are: "real" captures or "procedural"."""
    salt: str = ""
    """Reshuffles the hash-based splits (all at once)."""
    classes: dict = field(default_factory=lambda: dict(NYU40))
    """Class table of the collection (default NYU40, as ScanNet's labels and the generator use)."""

    def main(self) -> SceneCollection:
        out = self.out if self.out.suffix == ".json" else self.out / "collection.json"
        root = out.parent.resolve()
        folders = find_scenes(self.scenes)
        names = unique_names(folders)
        entries, failed = [], []
        for folder, name in logged_progress(
            list(zip(folders, names, strict=True)), "Checking scenes", unit="scenes"
        ):
            split = (
                "test"
                if name in self.test_scenes
                else split_of(name, self.val_fraction, self.test_fraction, self.salt)
            )
            try:
                entry = describe_scene(folder, name, split, self.source)
            except (ValueError, OSError) as err:  # DatasetError is a ValueError
                failed.append((folder, str(err)))
                print(f"skipped {folder}: {err}", flush=True)
                continue
            entry.path = _relative(folder, root)
            entries.append(entry)
        for index in self.include:
            included = SceneCollection.load(index)
            for entry in included.scenes:
                entry.path = _relative(included.scene_path(entry), root)
                entries.append(entry)
        if not entries:
            raise CollectionError(
                f"no usable scene under {', '.join(map(str, self.scenes)) or '(no --scenes)'}"
                + (f"; {len(failed)} failed validation" if failed else "")
            )
        collection = SceneCollection(
            root=root,
            scenes=entries,
            classes={int(k): str(v) for k, v in self.classes.items()},
            statistics={
                "scenes_found": len(folders),
                "scenes_skipped": [{"path": str(f), "reason": r} for f, r in failed],
                "splits": {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")},
            },
        )
        path = collection.save(out)
        counts = collection.statistics["splits"]
        print(
            f"wrote {path}: {len(entries)} scenes (train {counts['train']}, val {counts['val']}, test {counts['test']})"
            + (f"; skipped {len(failed)} that failed validation" if failed else ""),
            flush=True,
        )
        return collection


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when that stays inside a common tree, else absolute."""
    path = Path(path).resolve()
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return str(path)


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of ``splatsem-collection``."""
    tyro.cli(BuildCollection, args=args).main()


if __name__ == "__main__":
    main()
