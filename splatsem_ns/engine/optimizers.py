"""Optimizer configs for nerfstudio's ``Optimizers``.

nerfstudio builds one ``torch.optim.Adam`` per parameter group and gsplat's densification needs one group
per Gaussian attribute, so a Gaussian-splatting step runs about ten optimizers on small tensors. With
torch's default multi-tensor ("foreach") Adam each of them launches a handful of element-wise kernels and
pays their Python dispatch; on a GPU that host work, not the arithmetic, sets the step time. The fused
implementation does the whole update of a group in one kernel, with the same algorithm and
hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Type

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """nerfstudio's Adam config with torch's single-kernel ("fused") update."""

    _target: Type = torch.optim.Adam
    fused: Optional[bool] = True
    """Use torch's fused Adam (CUDA and CPU float tensors). None leaves the choice to torch (foreach)."""


def _adam_settings(config: AdamOptimizerConfig) -> dict:
    return {
        "lr": config.lr,
        "eps": config.eps,
        "max_norm": config.max_norm,
        "weight_decay": config.weight_decay,
    }


def fused_adam(config: AdamOptimizerConfig) -> FusedAdamOptimizerConfig:
    """The same optimizer settings with the fused update."""
    return FusedAdamOptimizerConfig(**_adam_settings(config))


def with_optimizer_implementation(optimizers: dict, fused: bool) -> dict:
    """A copy of a nerfstudio ``optimizers`` dict whose Adam groups use the fused (or torch's default)
    update; learning rates, schedules and everything else are kept."""
    result = {}
    for name, group in optimizers.items():
        group = dict(group)
        optimizer = group["optimizer"]
        if isinstance(optimizer, AdamOptimizerConfig):
            settings = _adam_settings(optimizer)
            group["optimizer"] = (
                FusedAdamOptimizerConfig(**settings) if fused else AdamOptimizerConfig(**settings)
            )
        result[name] = group
    return result
