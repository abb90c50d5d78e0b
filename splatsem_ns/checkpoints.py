"""Checkpoints that load under ``torch.load``'s ``weights_only=True`` default (PyTorch >= 2.6).

nerfstudio 1.1.5 saves optimizer and scheduler state holding numpy scalars (learning rates computed
with numpy), and its ``ns-eval``/``ns-viewer``/``--load-dir`` call ``torch.load`` without
``weights_only=False``, so its own checkpoints fail to load on current PyTorch. Allow-listing numpy's
scalar and dtype types keeps the safe loader (no arbitrary code) and makes those checkpoints load.

``load_torch_file`` is the one place this package reads torch files (sidecars, teacher weights): under
``weights_only``, with errors that say what is wrong with the file rather than how to load it unsafely.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch


def numpy_scalar_globals() -> list:
    """The numpy callables a pickled numpy scalar refers to."""
    try:  # numpy >= 2 moved the module; nerfstudio 1.1.5 pins numpy < 2 but users may differ
        from numpy._core.multiarray import scalar
    except ImportError:  # pragma: no cover - depends on the numpy version
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [scalar, np.dtype, *dtype_classes]


def allow_numpy_scalars_in_checkpoints() -> None:
    """Register numpy scalars as safe for ``torch.load(weights_only=True)``. Idempotent."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # PyTorch < 2.4 has no weights_only default to satisfy
        add(numpy_scalar_globals())


# torch.load's advice to retry with weights_only=False (misleading for files this package reads, which never
# need it, and unsafe) or to allow-list globals: a reason quoted from torch must not carry it.
_TORCH_ADVICE = re.compile(r"weights.only|safe_globals", re.IGNORECASE)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_torch_file(
    path: Path,
    what: str,
    remedy: str,
    not_written_by: str,
    error: Callable[[str], Exception] = ValueError,
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what is wrong with the file.

    torch's own messages advise retrying with ``weights_only=False``: for the files this package reads (exports,
    checkpoints, teacher weights) that advice is both wrong (a genuine file never needs it) and unsafe (it runs
    whatever the file pickles). So it is neither shown nor chained into the traceback (``from None``); the error
    keeps torch's reason and says what is wrong instead.

    Args:
        path: The file.
        what: What the file should be, for messages ("semantic sidecar", "checkpoint").
        remedy: What the user can do about a broken file (a sentence).
        not_written_by: What writes genuine files of this kind ("splatsem-export").
        error: Makes the exception to raise from the message (an exception type, say).
    """
    try:  # opened here first, so that torch's errors below are about the content, not about access
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as err:
        raise error(f"{path} cannot be read: {err.strerror or err}.") from err
    if not head:
        raise error(
            f"{path} is empty (0 bytes): whatever wrote it was interrupted, or the disk was full. {remedy}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors of many kinds (a truncated zip can be an OSError)
        unsupported = next(filter(None, map(_UNSUPPORTED_GLOBAL.search, _chained_messages(err))), None)
        if unsupported is not None:
            raise error(
                f"{path} holds pickled Python objects (GLOBAL {unsupported.group(1)}), which a {what} never "
                f"contains: it was not written by {not_written_by}, or it was altered. It is not loaded because "
                "unpickling it could run arbitrary code."
            ) from None
        raise error(
            f"{path} is not a readable {what}: {_describe_unreadable(path, head)} (torch: {_torch_detail(err)}). "
            f"{remedy}"
        ) from None


def _chained_messages(err: BaseException) -> List[str]:
    """The messages of ``err`` and of every exception it was raised from or while handling."""
    messages: List[str] = []
    seen = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        messages.append(str(current))
        current = current.__cause__ or current.__context__
    return messages


def _torch_detail(err: BaseException) -> str:
    """torch.load's reason for refusing a file, without its advice: the weights-only unpickler's own error
    where torch wraps one, else the message's first sentence."""
    text = str(err)
    inner = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", text, re.DOTALL)
    if inner and inner.group(1).strip():
        text = inner.group(1).strip()
    detail = re.split(r"(?<=[^.]\.)\s|\n", text.strip(), maxsplit=1)[0].rstrip(".")
    if not detail or _TORCH_ADVICE.search(detail):
        return type(err).__name__
    return detail


def _describe_unreadable(path: Path, head: bytes) -> str:
    """What is wrong with a file that torch.load cannot read, judged from its bytes (``head``: the first four):
    the torch format is a zip archive, whose directory sits at its end, so a zip start without that end is a
    truncated file."""
    if head == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            return "it is a truncated torch file (a zip archive without its end), as when a write or a copy is cut short"
        return "it is a damaged torch file: a complete zip archive whose contents torch cannot read"
    return "it is truncated or not a torch file"
