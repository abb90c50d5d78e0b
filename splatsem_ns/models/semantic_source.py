"""Where each Gaussian's semantic latent comes from: a swappable part of the model.

Today the latent is a free parameter per Gaussian. A feed-forward 3D encoder over the Gaussians
(a sparse-conv UNet on their positions and colours, as in Chorus) plugs in as another source: it
computes the latent from the Gaussian parameters and owns network weights instead of per-Gaussian
parameters. The model only calls the three methods below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Type

import torch
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn
from torch.nn import Parameter


@dataclass
class SemanticSourceConfig(InstantiateConfig):
    """Base config of a semantic latent source."""

    _target: Type = field(default_factory=lambda: SemanticSource)
    latent_dim: int = 32
    """Channels of the per-Gaussian semantic latent. gsplat compiles its rasterizer for 1-5, 8, 9, 16, 17,
    32, 33, 64, ... channels; other counts are padded up, so pick one of those."""


class SemanticSource(nn.Module):
    """Produces an ``[N, latent_dim]`` latent for the N Gaussians of a model."""

    config: SemanticSourceConfig

    def __init__(self, config: SemanticSourceConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def gaussian_params(self, num_points: int) -> Dict[str, Parameter]:
        """Per-Gaussian parameters to add to the model's ``gauss_params``: they are densified, pruned and
        optimised together with the Gaussians (each needs an optimizer of the same name)."""
        return {}

    def param_groups(self) -> Dict[str, List[Parameter]]:
        """Other trainable parameters (network weights), by optimizer name."""
        return {}

    def forward(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        raise NotImplementedError


@dataclass
class LearnedLatentSourceConfig(SemanticSourceConfig):
    """A free latent vector per Gaussian, optimised directly (feature-splatting style)."""

    _target: Type = field(default_factory=lambda: LearnedLatentSource)
    init_std: float = 0.1
    """Standard deviation of the random initial latents; non-zero so every head gets a gradient at step 0."""


class LearnedLatentSource(SemanticSource):
    """``latent = gauss_params["semantic_latent"]``."""

    config: LearnedLatentSourceConfig
    PARAM_NAME = "semantic_latent"

    def gaussian_params(self, num_points: int) -> Dict[str, Parameter]:
        return {self.PARAM_NAME: Parameter(torch.randn(num_points, self.latent_dim) * self.config.init_std)}

    def forward(self, gauss_params: nn.ParameterDict) -> Float[Tensor, "N D"]:
        return gauss_params[self.PARAM_NAME]
