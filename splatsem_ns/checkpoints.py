"""Checkpoints that load under ``torch.load``'s ``weights_only=True`` default (PyTorch >= 2.6).

nerfstudio 1.1.5 saves optimizer and scheduler state holding numpy scalars (learning rates computed
with numpy), and its ``ns-eval``/``ns-viewer``/``--load-dir`` call ``torch.load`` without
``weights_only=False``, so its own checkpoints fail to load on current PyTorch. Allow-listing numpy's
scalar and dtype types keeps the safe loader (no arbitrary code) and makes those checkpoints load.
"""

from __future__ import annotations

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
