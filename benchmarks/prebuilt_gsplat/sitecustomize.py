"""Serve gsplat's compiled CUDA extension from a saved copy instead of compiling it (1-4 minutes) on every fresh
machine: with this folder on ``PYTHONPATH`` and ``GSPLAT_PREBUILT`` naming a ``gsplat_cuda.so`` (or ``.so.gz``)
built earlier for the same gsplat, torch and GPU architecture, ``from gsplat import csrc`` (which gsplat tries
before its JIT build) finds it. ``chain.sh``'s ``gsplat`` step writes such a file after its first build.
"""

import gzip
import importlib.abc
import importlib.util
import os
import shutil
import sys
import tempfile

_SAVED = os.environ.get("GSPLAT_PREBUILT", "")


def unpacked_path(packed: str) -> str:
    """``packed`` (a gzipped build) unpacked once per machine and per file (its size and time name the folder, so
    a newer build is not shadowed by an older one), atomically: several processes may race to it."""
    info = os.stat(packed)
    folder = os.path.join(tempfile.gettempdir(), f"gsplat_prebuilt-{info.st_size}-{info.st_mtime_ns}")
    library = os.path.join(folder, "gsplat_cuda.so")
    if not os.path.exists(library):
        os.makedirs(folder, exist_ok=True)
        partial = f"{library}.{os.getpid()}"
        with gzip.open(packed) as source, open(partial, "wb") as target:
            shutil.copyfileobj(source, target)
        os.replace(partial, library)
    return library


class _PrebuiltGsplat(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name != "gsplat.csrc" or not os.path.isfile(_SAVED):
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        library = _SAVED if not _SAVED.endswith(".gz") else unpacked_path(_SAVED)
        # The module's init function is named after the file it was built as, so load it under that name.
        inner = importlib.util.spec_from_file_location("gsplat_cuda", library)
        module = importlib.util.module_from_spec(inner)
        inner.loader.exec_module(module)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _PrebuiltGsplat())
