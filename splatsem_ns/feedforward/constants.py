"""Small constant tensors on the training device, made once.

``torch.tensor([...], device="cuda")`` (or ``x.new_tensor([...])``) copies from pageable host memory, which makes
the host wait for every kernel queued before it: in a feed-forward training step a handful of such constants
(sign flips, index lists, a background colour) each stalled the host once per step
(benchmarks/results/profile_semantic_splat_h200.txt). Each constant is copied once per device and dtype and
shared after that; callers must not modify it in place.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Union

import torch
from torch import Tensor


def device_constant(
    values: Sequence, device: Union[str, torch.device], dtype: torch.dtype = torch.float32
) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, made on the first call and shared after it (values
    must be hashable: numbers or nested tuples of numbers)."""
    return _cached(_frozen(values), str(torch.device(device)), dtype)


@lru_cache(maxsize=256)
def _cached(values, device: str, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _frozen(values):
    if isinstance(values, (list, tuple)):
        return tuple(_frozen(v) for v in values)
    return values
