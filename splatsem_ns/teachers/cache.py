"""On-disk cache of teacher features: extracted once, stored in fp16, streamed back during training.

Layout: ``<root>/format-2/<teacher name>-<teacher fingerprint>/<image key>.npy``, one ``[h, w, C]``
float16 array per image, followed by a 48-byte checksum footer.

- The image key hashes the exact pixels the model trains on (after undistortion) plus the teacher's
  fingerprint (model, weights, input resolution), so a second run reuses features and any change to
  the image, the teacher or its resolution invalidates them.
- ``format-2`` is the version of the file format. Caches of the first format (``<root>/<teacher>-<fp>/``,
  plain ``.npy`` without a footer) are not read at all: their images are extracted again into
  ``format-2`` rather than warned about file by file, and the old folders can be deleted.
- Each file is a standard ``.npy`` payload (header + C-order data) and then the footer: the 16 bytes
  ``SPLATSEM/BLAKE2B`` and the 32-byte BLAKE2b digest of the whole payload. ``np.load`` reads exactly
  the bytes the header announces and ignores what follows, so the memory maps see only the features.
  The footer lives in the same file so that the features and their checksum are replaced in one
  atomic rename; a second checksum file could disagree with its entry after a crash.
- Every entry is verified once per run, before it is used: ``TeacherFeatureCache.missing`` (the step
  that decides which images still need extraction) reads each file once and checks the header, the
  length and the digest. A bad entry (truncated, no footer, unreadable header, or contents that changed
  after writing, e.g. overwritten in place with NaNs of the same size) is deleted with a warning that
  names it and the reason, and is extracted again. Verification runs at about 0.9 GB/s on one core
  (BLAKE2b, file in the page cache), about a second per GB of features, and it warms the page cache
  for training. Without it, a same-size overwrite would be served as-is and training would go NaN later.
- Features are checked to be finite (in fp16) before they are written, and the error names the
  teacher and the image, so the checksum vouches for finite features.
- Each file is written to a unique hidden ``.<key>.npy.partial-*`` name and renamed into place, so an interrupted
  extraction leaves only whole files behind and the next run resumes with the images that are missing.
  Files are created with mode 0o666 minus the umask (not ``mkstemp``'s 0o600) so a cache can be shared
  between users, and no ``fsync`` is needed: a file cut short by a power loss fails its checksum.
- Reading needs no write access: a read-only cache that holds every needed entry works. When one must
  be written and cannot be, ``FeatureCacheNotWritable`` (a ``PermissionError``) names the cache and
  says how to move it.
- Reading goes through ``np.load(mmap_mode="r")``: training touches one image's features at a time and
  the OS page cache holds what is hot, so there is never a second full copy of the features in RAM.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, UInt8
from nerfstudio.utils.rich_utils import CONSOLE
from rich.markup import escape
from torch import Tensor

from splatsem_ns.files import remove_quietly, stage_file, write_atomically
from splatsem_ns.progress import ProgressLog
from splatsem_ns.teachers.base import AnyTeacher, DeferredTeacher, image_to_float_chw

FORMAT_VERSION = 2
"""Version of the file format; part of the folder name, so caches of another format are never read."""
FOOTER_MAGIC = b"SPLATSEM/BLAKE2B"
DIGEST_SIZE = 32
FOOTER_SIZE = len(FOOTER_MAGIC) + DIGEST_SIZE
_READ_CHUNK = 4 << 20
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class FeatureCacheWarning(UserWarning):
    """A cached entry was bad and is extracted again."""


class FeatureCacheNotWritable(PermissionError):
    """The teacher feature cache needs a write (a missing or bad entry) and its folder refuses it.

    A ``PermissionError`` also for EROFS, because for the user the remedy is the same: move the cache.
    """


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


def _payload_digest() -> hashlib._Hash:
    # BLAKE2b rather than SHA-256: about 1 GB/s on any x86 or ARM core, where SHA-256 is as fast only
    # on CPUs with SHA instructions and about 3x slower elsewhere.
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def entry_problem(path: Path) -> Optional[str]:
    """Why the cache file ``path`` cannot be trusted, or None when it is whole and unchanged.

    Reads the file once: the ``.npy`` header gives the payload length, so truncation and missing footers
    are told apart before the digest of the payload is compared with the footer's.
    """
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    return f"unreadable .npy header: format version {version}"
            except ValueError as err:
                return f"unreadable .npy header: {err}"
            if dtype != np.float16 or len(shape) != 3 or fortran_order:
                return f"not [h, w, C] float16 features (dtype {dtype}, shape {shape})"
            payload = f.tell() + int(np.prod(shape)) * dtype.itemsize
            expected = payload + FOOTER_SIZE
            if size == payload:
                return "no checksum footer"
            if size < expected:
                return f"truncated: {size} of {expected} bytes"
            if size > expected:
                return f"{size - expected} unexpected bytes after the checksum footer"
            f.seek(0)
            digest = _payload_digest()
            buffer = memoryview(bytearray(_READ_CHUNK))
            left = payload
            while left:
                n = f.readinto(buffer[: min(left, _READ_CHUNK)])
                if not n:
                    return f"truncated while reading ({payload - left} of {expected} bytes)"
                digest.update(buffer[:n])
                left -= n
            footer = f.read(FOOTER_SIZE)
    except OSError as err:
        return f"unreadable: {err}"
    if footer[: len(FOOTER_MAGIC)] != FOOTER_MAGIC:
        return "no checksum footer"
    if footer[len(FOOTER_MAGIC) :] != digest.digest():
        return "checksum mismatch: the contents changed after they were written"
    return None


class TeacherFeatureCache:
    """Feature files of one teacher for one list of images."""

    def __init__(self, root: Path, teacher_name: str, teacher_fingerprint: str) -> None:
        self.teacher_name = teacher_name
        self.fingerprint = teacher_fingerprint
        self.root = Path(root)
        self.folder = self.root / f"format-{FORMAT_VERSION}" / f"{teacher_name}-{teacher_fingerprint}"
        if not self.folder.is_dir():
            # The fingerprint leaves the teacher's name out: a renamed teacher reuses its features.
            same = sorted(self.folder.parent.glob(f"*-{teacher_fingerprint}"))
            if same:
                self.folder = same[0]
        # Keys checked (or written) by this object: each file is hashed at most once per run.
        self._verified: set[str] = set()

    def path_for(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def missing(self, keys: Sequence[str]) -> List[int]:
        """Indices of the keys whose features still need extraction.

        Verifies every cached entry (once per run); a bad one is deleted with a warning and counted as
        missing, so it is extracted again. Only deleting needs write access.
        """
        todo = []
        for i, key in enumerate(keys):
            if key in self._verified:
                continue
            path = self.path_for(key)
            if not path.is_file():
                todo.append(i)
                continue
            problem = entry_problem(path)
            if problem is None:
                self._verified.add(key)
                continue
            message = (
                f"Teacher features: cached file {path} of teacher '{self.teacher_name}' is bad ({problem}); "
                "deleting it and extracting it again."
            )
            CONSOLE.log(f"[yellow]{escape(message)}")  # escape: paths may hold rich markup like [..]
            warnings.warn(message, FeatureCacheWarning, stacklevel=2)
            with self._writing():
                # A concurrent run may have replaced it with a good file meanwhile: deleting that costs
                # one extraction, never a bad entry.
                path.unlink(missing_ok=True)
            todo.append(i)
        return todo

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn "cannot write here" into an error that names the cache and says how to move it."""
        try:
            yield
        except OSError as err:
            if isinstance(err, FeatureCacheNotWritable) or err.errno not in _NOT_WRITABLE:
                raise
            raise FeatureCacheNotWritable(
                f"The teacher feature cache {self.root} is not writable ({err}). Point it at a writable "
                "folder with --pipeline.datamanager.feature-cache-dir DIR or the SPLATSEM_CACHE "
                "environment variable (a read-only cache works only while it holds every image's features)."
            ) from err

    def check_writable(self) -> None:
        """Create the folder and one temporary file, so a read-only cache fails before extraction starts."""
        with self._writing():
            remove_quietly(stage_file(self.folder / "probe", lambda stream: None, durable=False))

    def write(self, key: str, features: Float[Tensor, "h w C"], image_name: Optional[str] = None) -> None:
        """Store one image's features as fp16 with their checksum, atomically.

        Refuses non-finite features (also values beyond the fp16 range, which become inf), naming the
        teacher and ``image_name``: a cached NaN would only surface much later, as a NaN loss.
        """
        features = features.detach()
        array = np.ascontiguousarray(features.to(torch.float16).cpu().numpy())
        finite = np.isfinite(array)
        if not finite.all():
            nonfinite = int((~torch.isfinite(features)).sum())
            overflow = int((~finite).sum()) - nonfinite
            counts = ", ".join(
                part
                for part in (
                    f"{nonfinite} NaN/inf" if nonfinite else "",
                    f"{overflow} beyond the fp16 range ±65504" if overflow else "",
                )
                if part
            )
            raise FloatingPointError(
                f"Teacher '{self.teacher_name}' produced non-finite features"
                + (f" for {image_name}" if image_name is not None else "")
                + f" ({counts}, of {array.size} values); nothing was cached for this image."
            )
        buffer = io.BytesIO()
        np.save(buffer, array)
        payload = buffer.getbuffer()
        digest = _payload_digest()
        digest.update(payload)
        footer = FOOTER_MAGIC + digest.digest()
        with self._writing():
            # No fsync (thousands of files per scene): a file a power loss cuts short fails its checksum.
            write_atomically(
                self.path_for(key),
                lambda stream: (stream.write(payload), stream.write(footer)),
                durable=False,
            )
        self._verified.add(key)

    def open(self, key: str) -> np.memmap:
        """Memory-mapped ``[h, w, C]`` fp16 features of one image (verified first if not yet this run)."""
        path = self.path_for(key)
        if key not in self._verified:
            problem = entry_problem(path)
            if problem is not None:
                raise RuntimeError(
                    f"Cached features {path} of teacher '{self.teacher_name}' are unusable ({problem}). "
                    "The next feature extraction deletes and extracts them again."
                )
            self._verified.add(key)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"Cached features {path} of teacher '{self.teacher_name}' are unreadable ({err})."
            ) from err


def extract_teacher_features(
    teachers: Sequence[AnyTeacher],
    num_images: int,
    get_image: Callable[[int], Tensor],
    cache_root: Path,
    batch_size: int = 4,
    image_names: Optional[Sequence[str]] = None,
) -> Dict[str, List[np.memmap]]:
    """Make sure every image has valid cached features for every teacher; return memory maps of all of them.

    Args:
        teachers: the teachers to run (already on their device), or ``DeferredTeacher`` s, built only if some
            image's features are missing.
        num_images: number of training images.
        get_image: index -> ``[H, W, 3]`` image, uint8 or float in [0, 1] (what the model trains on).
        cache_root: cache folder shared between runs.
        batch_size: images per forward pass.
        image_names: one name per image (e.g. its file path), for error messages; default "image <index>".

    Returns:
        teacher name -> list (one per image) of ``[h, w, C]`` fp16 memory maps.

    Raises:
        FloatingPointError: a teacher produced NaN/inf features (or beyond fp16) for an image; the message
            names the teacher and the image.
        FeatureCacheNotWritable: features must be written and the cache folder refuses it.
    """
    result: Dict[str, List[np.memmap]] = {}
    for teacher in teachers:
        cache = TeacherFeatureCache(cache_root, teacher.name, teacher.fingerprint())
        keys = [image_key(get_image(i), cache.fingerprint) for i in range(num_images)]
        cache_teacher_features(teacher, cache, keys, get_image, batch_size, image_names)
        result[teacher.name] = [cache.open(key) for key in keys]
    return result


def cache_teacher_features(
    teacher: AnyTeacher,
    cache: TeacherFeatureCache,
    keys: Sequence[str],
    get_image: Callable[[int], Tensor],
    batch_size: int = 4,
    image_names: Optional[Sequence[str]] = None,
    on_progress: Optional[Callable[[int], None]] = None,
    show_progress: bool = True,
) -> int:
    """Verify the cached features of the images with ``keys`` (each image's ``image_key`` for this teacher) and
    extract the missing or bad ones; returns how many were extracted. Opens nothing, so it scales to collections
    of any size (each memory map holds a file descriptor).

    Args:
        teacher: the teacher (on its device), or a ``DeferredTeacher``, built here only if an image is missing.
        cache: its cache (``TeacherFeatureCache(root, teacher.name, teacher.fingerprint())``).
        keys: one key per image.
        get_image: index -> ``[H, W, 3]`` image, only called for the images to extract.
        batch_size: images per forward pass.
        image_names: one name per image, for error messages; default "image <index>".
        on_progress: called with the number of images just extracted (e.g. a shared counter across processes).
        show_progress: show this call's own progress (a bar, or log lines when stdout is not a terminal).
    """
    num_images = len(keys)
    if image_names is None:
        image_names = [f"image {i}" for i in range(num_images)]
    elif len(image_names) != num_images:
        raise ValueError(f"image_names has {len(image_names)} names for {num_images} images.")
    todo = cache.missing(keys)
    if not todo:
        return 0
    cache.check_writable()
    if isinstance(teacher, DeferredTeacher):
        teacher = teacher.get()
    done = num_images - len(todo)
    if show_progress:
        CONSOLE.log(
            escape(
                f"Teacher features: {teacher.name}: extracting {len(todo)} of {num_images} images"
                + (f" (resuming; {done} already cached)" if done else "")
                + f" into {cache.folder}"
            )
        )
    progress = ProgressLog(f"Teacher features: {teacher.name}", len(todo), "images")
    with progress if show_progress else nullcontext():
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = torch.stack([image_to_float_chw(get_image(i)).cpu() for i in chunk]).to(teacher.device)
            features = teacher.encode_image(images)  # [B, C, h, w]
            for i, feats in zip(chunk, features, strict=True):
                cache.write(keys[i], feats.permute(1, 2, 0), image_name=image_names[i])
            if show_progress:
                progress.advance(len(chunk))
            if on_progress is not None:
                on_progress(len(chunk))
    return len(todo)
