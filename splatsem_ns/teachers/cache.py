"""On-disk cache of teacher features: extracted once, stored in fp16, streamed back during training.

Layout: ``<root>/<teacher fingerprint>/<image key>.npy``, one ``[h, w, C]`` float16 array per image.

- The image key hashes the exact pixels the model trains on (after undistortion) plus the teacher's
  fingerprint (model, weights, input resolution), so a second run reuses features and any change to
  the image, the teacher or its resolution invalidates them.
- Each file is written to a temporary name and renamed into place, so an interrupted extraction leaves
  only whole files behind and the next run resumes with the images that are missing.
- Reading goes through ``np.load(mmap_mode="r")``: training touches one image's features at a time and
  the OS page cache holds what is hot, so there is never a second full copy of the features in RAM.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from jaxtyping import Float, UInt8
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from splatsem_ns.teachers.base import Teacher, image_to_float_chw


def default_cache_root() -> Path:
    """``$SPLATSEM_CACHE`` or ``$XDG_CACHE_HOME/splatsem_ns/teacher_features`` (data folders may be read-only)."""
    if os.environ.get("SPLATSEM_CACHE"):
        return Path(os.environ["SPLATSEM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "splatsem_ns" / "teacher_features"


def image_key(image: UInt8[Tensor, "H W 3"] | Float[Tensor, "H W 3"], teacher_fingerprint: str) -> str:
    """Content hash of one training image for one teacher configuration."""
    array = image.detach().cpu().contiguous().numpy()
    digest = hashlib.sha1()
    digest.update(teacher_fingerprint.encode())
    digest.update(str(array.shape).encode() + str(array.dtype).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()[:24]


class TeacherFeatureCache:
    """Feature files of one teacher for one list of images."""

    def __init__(self, root: Path, teacher_name: str, teacher_fingerprint: str) -> None:
        self.teacher_name = teacher_name
        self.fingerprint = teacher_fingerprint
        self.folder = Path(root) / f"{teacher_name}-{teacher_fingerprint}"

    def path_for(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def missing(self, keys: Sequence[str]) -> List[int]:
        """Indices of the keys whose features are not on disk yet."""
        return [i for i, key in enumerate(keys) if not self.path_for(key).is_file()]

    def write(self, key: str, features: Float[Tensor, "h w C"]) -> None:
        """Store one image's features as fp16, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        array = features.detach().to(torch.float16).cpu().numpy()
        if not np.isfinite(array).all():
            raise FloatingPointError(
                f"Teacher '{self.teacher_name}' produced non-finite features (or values beyond fp16 range)."
            )
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".partial-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array)
            os.replace(tmp, self.path_for(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> np.memmap:
        """Memory-mapped ``[h, w, C]`` fp16 features of one image."""
        path = self.path_for(key)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"Cached features {path} of teacher '{self.teacher_name}' are unreadable ({err}). "
                "Delete the file to have it extracted again."
            ) from err


def extract_teacher_features(
    teachers: Sequence[Teacher],
    num_images: int,
    get_image: Callable[[int], Tensor],
    cache_root: Path,
    batch_size: int = 4,
) -> Dict[str, List[np.memmap]]:
    """Make sure every image has cached features for every teacher; return memory maps of all of them.

    Args:
        teachers: the teachers to run (already on their device).
        num_images: number of training images.
        get_image: index -> ``[H, W, 3]`` image, uint8 or float in [0, 1] (what the model trains on).
        cache_root: cache folder shared between runs.
        batch_size: images per forward pass.

    Returns:
        teacher name -> list (one per image) of ``[h, w, C]`` fp16 memory maps.
    """
    result: Dict[str, List[np.memmap]] = {}
    for teacher in teachers:
        cache = TeacherFeatureCache(cache_root, teacher.name, teacher.fingerprint())
        keys = [image_key(get_image(i), cache.fingerprint) for i in range(num_images)]
        todo = cache.missing(keys)
        if todo:
            done = num_images - len(todo)
            CONSOLE.log(
                f"Teacher features: {teacher.name}: extracting {len(todo)} of {num_images} images"
                + (f" (resuming; {done} already cached)" if done else "")
                + f" into {cache.folder}"
            )
            with Progress(
                TextColumn(f"[bold]Teacher features: {teacher.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=CONSOLE,
            ) as progress:
                task = progress.add_task("extract", total=len(todo))
                for start in range(0, len(todo), batch_size):
                    chunk = todo[start : start + batch_size]
                    images = torch.stack([image_to_float_chw(get_image(i)).cpu() for i in chunk]).to(
                        teacher.device
                    )
                    features = teacher.encode_image(images)  # [B, C, h, w]
                    for i, feats in zip(chunk, features, strict=True):
                        cache.write(keys[i], feats.permute(1, 2, 0))
                    progress.advance(task, len(chunk))
        result[teacher.name] = [cache.open(key) for key in keys]
    return result
