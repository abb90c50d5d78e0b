"""On-disk cache of the cross-view consistency weights (``teachers.consistency``), beside the teacher features.

The check segments every view's features and compares each view with up to ``nearest_views`` others: at every
start-up it was the largest part left once the features themselves came from their cache (3.4 of 6-7 s on
ScanNet's 45 views on a CPU). Its result depends only on what is hashed into the key, and the check is
deterministic (``segment_view``'s seeding), so a stored result is the one a fresh check would give.

Layout: ``<feature cache root>/consistency-<VERSION>/<teacher name>-<key>.npz``, one float16 ``[h, w]`` map per
view, in view order.

- The key hashes the features' bytes, the depth images' bytes, every camera (intrinsics, pose, image size), the
  check's settings and the depth tolerance. Any change to one of them is a different file; nothing is overwritten
  in place, and stale files are only disk space (a few KB per view).
- ``VERSION`` changes with the check's code, so that results of an older check are never read.
- Files are written whole or not at all (``files.write_atomically``); a read that fails (a zip member's CRC, a
  shape or a value out of range) is reported and the check runs again.
- A cache folder that cannot be written costs only the speed-up: the weights are computed and used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from jaxtyping import Float
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from splatsem_ns.evaluation.voting import ViewLabels
from splatsem_ns.files import write_atomically
from splatsem_ns.teachers.consistency import ConsistencyConfig

VERSION = 1
"""Version of the consistency check's result; part of the folder name. Raise it when the check's code changes
what it computes."""


class ConsistencyCacheWarning(UserWarning):
    """A stored result was unreadable or did not fit the views, and the check runs again."""


def views_digest(views: Sequence[ViewLabels], config: ConsistencyConfig, depth_tolerance: float) -> str:
    """Hash of what every teacher's check shares: the cameras (intrinsics, pose, image size), the depth images, the
    check's settings and the depth tolerance. Computed once per start-up for all teachers."""
    digest = hashlib.blake2b(digest_size=16)
    settings = dataclasses.asdict(config)
    digest.update(repr((VERSION, sorted(settings.items()), float(depth_tolerance), len(views))).encode())
    for view in views:
        digest.update(repr(tuple(view.image_size)).encode())
        for part in (view.K, view.camera_to_world, view.depth):
            _update(digest, np.ascontiguousarray(part))
    return digest.hexdigest()


def consistency_key(features: Sequence[Float[Tensor, "h w C"]], views: str) -> str:
    """Hash of everything one teacher's weights depend on: its features' bytes and ``views_digest``."""
    digest = hashlib.blake2b(views.encode(), digest_size=16)
    for feats in features:
        _update(digest, feats.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def _update(digest, array: np.ndarray) -> None:
    digest.update(repr((array.shape, str(array.dtype))).encode())
    digest.update(array.tobytes())


class ConsistencyCache:
    """Stored consistency weights under one feature-cache root."""

    def __init__(self, cache_root: Path) -> None:
        self.folder = Path(cache_root) / f"consistency-{VERSION}"

    def path_for(self, teacher_name: str, key: str) -> Path:
        return self.folder / f"{teacher_name}-{key}.npz"

    def load(
        self, teacher_name: str, key: str, grids: Sequence[Tuple[int, int]]
    ) -> Optional[List[Float[np.ndarray, "h w"]]]:
        """The stored float16 maps, one per view of feature grid ``grids[i]``; None when there are none or they
        cannot be trusted (then with a warning naming the file and why)."""
        path = self.path_for(teacher_name, key)
        if not path.is_file():
            return None
        # A truncated zip, a CRC mismatch or a missing member all mean the same: run the check again.
        try:
            with np.load(path, allow_pickle=False) as stored:
                maps = [stored[str(i)] for i in range(len(grids))]
                extra = len(stored.files) - len(grids)
        except Exception as error:
            problem = f"unreadable: {error}"
        else:
            problem = _fit_problem(maps, grids, extra)
            if problem is None:
                return maps
        warnings.warn(
            f"Stored consistency weights {path} are not used ({problem}); the check runs again.",
            ConsistencyCacheWarning,
            stacklevel=2,
        )
        return None

    def save(self, teacher_name: str, key: str, maps: Sequence[Float[np.ndarray, "h w"]]) -> None:
        """Store ``maps`` (float16); a folder that refuses the write is reported, not raised."""
        buffer = io.BytesIO()
        np.savez(buffer, **{str(i): np.asarray(m, dtype=np.float16) for i, m in enumerate(maps)})
        path = self.path_for(teacher_name, key)
        try:
            # No fsync: a file cut short by a crash fails its zip CRCs on reading and is computed again.
            write_atomically(path, lambda f: f.write(buffer.getbuffer()), durable=False)
        except OSError as error:
            CONSOLE.log(
                f"[yellow]Could not store the consistency weights in {self.folder} ({error}); they are used "
                "this run and computed again at the next start-up."
            )


def _fit_problem(maps: Sequence[np.ndarray], grids: Sequence[Tuple[int, int]], extra: int) -> Optional[str]:
    if extra:
        return f"{len(grids) + extra} maps for {len(grids)} views"
    for i, (m, grid) in enumerate(zip(maps, grids, strict=True)):
        if m.dtype != np.float16 or tuple(m.shape) != tuple(grid):
            return f"view {i}: {m.dtype} {tuple(m.shape)}, expected float16 {tuple(grid)}"
        if not (np.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()):
            return f"view {i}: weights outside [0, 1]"
    return None
