"""What the feed-forward network produces: per-pixel 3D Gaussians with a semantic latent, per scene of a batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class PredictedGaussians:
    """One Gaussian per context pixel: N = V * H * W per scene, ordered view, row, column.

    Activations are already applied (what ``rasterize_gaussians`` takes): ``scales`` are positive standard
    deviations, ``opacities`` lie in (0, 1), ``quats`` are unit wxyz. Colours are SH coefficients in world space
    shaped like splatfacto's ``features_dc`` / ``features_rest`` (K = (sh_degree + 1)^2 - 1 rest coefficients).
    """

    means: Float[Tensor, "B N 3"]
    """Centres in the world frame of the input cameras."""
    quats: Float[Tensor, "B N 4"]
    """Unit quaternions, wxyz, rotating the Gaussian's axes into the world frame."""
    scales: Float[Tensor, "B N 3"]
    """Per-axis standard deviations in world units (positive)."""
    opacities: Float[Tensor, "B N"]
    """Opacities in (0, 1)."""
    features_dc: Float[Tensor, "B N 3"]
    """Degree-0 SH coefficients (RGB2SH of the colour)."""
    features_rest: Float[Tensor, "B N K 3"]
    """Higher-order SH coefficients in world space (K = 0 for degree 0)."""
    latent: Float[Tensor, "B N D"]
    """Per-Gaussian semantic latent, decoded by the per-teacher ``ProjectorHead``s after rendering."""
    depth: Float[Tensor, "B V H W"]
    """Predicted z-depth of every context pixel (the Gaussians' depth along each camera's axis)."""
    confidence: Float[Tensor, "B V H W"]
    """Largest matching probability of the cost volume at every context pixel."""

    @property
    def sh_degree(self) -> int:
        """SH degree the colours carry."""
        return int(round(math.sqrt(self.features_rest.shape[-2] + 1))) - 1

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    def splatfacto_parameters(self, index: int) -> Dict[str, Tensor]:
        """Scene ``index`` in splatfacto's parameter names and raw (pre-activation) form: log ``scales``, logit
        ``opacities`` [N, 1]; so exporters and viewers that read a splatfacto model can take predicted scenes."""
        return {
            "means": self.means[index],
            "scales": torch.log(self.scales[index]),
            "quats": self.quats[index],
            "opacities": torch.logit(self.opacities[index], eps=1e-6)[:, None],
            "features_dc": self.features_dc[index],
            "features_rest": self.features_rest[index],
        }
