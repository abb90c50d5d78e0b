"""Writing files so that readers only ever see whole ones.

Every file this package writes for later runs (teacher feature caches, checkpoints, exports) is written under a
hidden temporary name and renamed into place once complete: a rename within one folder is atomic, so an
interrupted or failed write leaves the previous file (or nothing), never half a file under the final name.
Temporary files are created with mode 0o666 and left to the umask, as any file the user creates (``mkstemp``'s
0o600 would make a shared cache private).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Optional

Writer = Callable[[BinaryIO], None]
"""Writes a file's content to an open binary stream."""


def hidden_sibling(final: Path, kind: str, folder: Optional[Path] = None) -> Path:
    """A fresh name for a temporary of ``final`` that nothing takes for the real file: hidden, and ending in
    neither of the real file's suffixes (``.scene.ply.partial-1f0c...``). In ``folder`` (default: ``final``'s),
    which must be on the same file system for the rename to be atomic."""
    return (folder or final.parent) / f".{final.name}.{kind}-{secrets.token_hex(8)}"


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if it can be deleted (cleaning up after a failure must not hide the failure)."""
    try:
        path.unlink()
    except OSError:
        pass


def stage_file(final: Path, write: Writer, folder: Optional[Path] = None, durable: bool = True) -> Path:
    """Write a file under a temporary name for ``final`` (see ``hidden_sibling``) and return that name; on failure
    remove it and re-raise.

    Args:
        final: Where the file will go.
        write: Writes the content.
        folder: Folder of the temporary (default: ``final``'s); the same file system as ``final``.
        durable: fsync before returning, so that after a crash or power loss the rename publishes the new
            content and not the empty file delayed allocation can leave. Writers whose files carry their own
            checksum can skip it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = hidden_sibling(final, "partial", folder)
    # O_EXCL: never write into a file something else created.
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
    except BaseException:
        remove_quietly(temporary)
        raise
    return temporary


def write_atomically(final: Path, write: Writer, folder: Optional[Path] = None, durable: bool = True) -> None:
    """Write ``final`` whole or not at all: ``stage_file``, then an atomic rename onto ``final``."""
    temporary = stage_file(final, write, folder, durable)
    try:
        os.replace(temporary, final)
    except BaseException:
        remove_quietly(temporary)
        raise


def sync_folder(folder: Path) -> None:
    """Persist renames in ``folder`` (POSIX); skipped where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_reason(err: BaseException) -> str:
    """Why a file operation failed, without the path (messages name the file themselves)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {err}"
