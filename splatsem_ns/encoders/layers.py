"""Per-voxel layers the backbones share: feature normalisation and stochastic depth per scene."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

FeatureNorm = Literal["batch", "layer"]


def feature_norm(kind: FeatureNorm, channels: int) -> nn.Module:
    """Normalisation over voxel feature rows.

    "batch" is Pointcept's sparse-conv choice (BatchNorm1d, eps 1e-3: statistics over every voxel of the batch, so
    it needs more than one voxel per channel in training), with PyTorch's momentum 0.1 rather than Pointcept's 0.01:
    at 0.01 the running statistics that evaluation uses trail the weights by about a hundred steps, and after 150
    steps on one generated scene the encoder's eval-mode cosine was 0.81 against 0.86 in train mode on the same
    batch (0.86 in both at 0.1). "layer" normalises each voxel alone, so training and evaluation compute the same
    function whatever the batch (0.83 in that run).
    """
    if kind == "batch":
        return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.1)
    if kind == "layer":
        return nn.LayerNorm(channels)
    raise ValueError(f"Unknown feature norm '{kind}': use batch or layer.")


class SceneDropPath(nn.Module):
    """Stochastic depth per scene: in training, a residual branch is dropped for whole scenes at rate ``p``
    (kept ones are scaled by ``1 / (1 - p)``). Per scene rather than per voxel, as per image in 2D: dropping a
    branch for random voxels of a scene would only add noise."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(
        self, branch: Float[Tensor, "M C"], batch_index: Int[Tensor, " M"], batch_size: int
    ) -> Float[Tensor, "M C"]:
        if not self.training or self.p == 0.0:
            return branch
        keep = torch.rand(batch_size, device=branch.device) >= self.p
        scale = keep.to(branch.dtype) / (1.0 - self.p)
        return branch * scale[batch_index, None]

    def extra_repr(self) -> str:
        return f"p={self.p}"
