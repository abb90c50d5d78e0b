"""Feed-forward encoder over 3D Gaussians: splatfacto parameters in, one semantic latent per Gaussian out.

    Gaussians -> per-Gaussian inputs (inputs.py) -> voxelise (mean of the inputs per voxel)
              -> sparse backbone (registry: SpUNet-v1, PTv3-lite-v1) -> per-voxel features
              -> each Gaussian: its voxel's feature + a small MLP of its own inputs -> latent [N, latent_dim]

The per-Gaussian MLP matters at 2 cm voxels: several Gaussians often share a voxel, and without their own
inputs they would all get the same latent. Several scenes go through in one call (``batch``): each has its own
grid and never sees another's voxels. The output has the shape of ``SemanticSource``'s latent, so the same
per-teacher projector heads decode it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Mapping, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from splatsem_ns.encoders.inputs import (
    INPUT_CHANNELS,
    InputVariant,
    gaussian_input_features,
    point_input_features,
    sh_dc_to_rgb,
)
from splatsem_ns.encoders.registry import BackboneConfig, build_backbone
from splatsem_ns.encoders.sparse_tensor import coordinate_keys
from splatsem_ns.encoders.voxelize import Voxelization, scene_origins, voxelize


@dataclass
class GaussianEncoderConfig:
    """A sparse 3D encoder producing the per-Gaussian semantic latent."""

    backbone: str = "SpUNet-v1"
    """Registered backbone name (``available_backbones()``): "SpUNet-v1" or "PTv3-lite-v1"."""
    backbone_preset: str = "default"
    """Named size of the backbone ("default", or "tiny" for tests)."""
    backbone_config: Optional[BackboneConfig] = None
    """A full config of the backbone's class; replaces the preset when given."""
    voxel_size: float = 0.02
    """Grid cell edge in scene units (2 cm for metric indoor scenes, as SceneSplat and Chorus)."""
    input_variant: InputVariant = "gaussian"
    """"gaussian": position, colour, opacity, log-scales, rotation (14 channels); "point": position, colour,
    normal (9 channels), for point clouds or Gaussians read as coloured points."""
    position_reference: Literal["voxel", "scene"] = "voxel"
    """Position channels relative to the Gaussian's voxel centre (voxel units; translation invariant) or to the
    scene's bounding-box centre (scene units)."""
    out_channels: int = 64
    """Width of the per-voxel features handed to the Gaussians (a projection of the backbone's output)."""
    latent_dim: int = 32
    """Channels of the per-Gaussian latent (chorus-splat's latent has 32)."""
    point_hidden_dim: int = 32
    """Width of the MLP on each Gaussian's own inputs."""
    normal_neighbours: int = 16
    """Neighbours for PCA normals in the "point" variant when no normals are given."""


@dataclass
class CoarsestStage:
    """An encoded scene's latents and the encoder's coarsest stage (``GaussianEncoder.coarsest_stage``)."""

    latent: Float[Tensor, "N D"]
    """Every Gaussian's latent (the encoder's output)."""
    features: Float[Tensor, "M C"]
    """The coarsest stage's features, one row per site (a voxel ``coarsest_stride`` times the input's)."""
    centres: Float[Tensor, "M 3"]
    """Each site's centre, in the Gaussians' frame."""
    site: Int[Tensor, " N"]
    """The site of each Gaussian."""


class GaussianEncoder(nn.Module):
    """Gaussians of one or several scenes -> ``[N, latent_dim]`` latents."""

    def __init__(self, config: GaussianEncoderConfig) -> None:
        super().__init__()
        if config.input_variant not in INPUT_CHANNELS:
            raise ValueError(
                f"Unknown input variant '{config.input_variant}': use {', '.join(INPUT_CHANNELS)}."
            )
        self.config = config
        in_channels = len(INPUT_CHANNELS[config.input_variant])
        self.backbone = build_backbone(
            config.backbone, in_channels, preset=config.backbone_preset, config=config.backbone_config
        )
        self.voxel_proj = nn.Linear(self.backbone.out_channels, config.out_channels)
        hidden = config.point_hidden_dim
        self.point_mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(
            nn.Linear(config.out_channels + hidden, config.out_channels),
            nn.GELU(),
            nn.Linear(config.out_channels, config.latent_dim),
        )

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def in_channels(self) -> int:
        return len(INPUT_CHANNELS[self.config.input_variant])

    def input_features(
        self,
        voxels: Voxelization,
        means: Float[Tensor, "N 3"],
        features_dc: Optional[Float[Tensor, "N ..."]] = None,
        opacities: Optional[Float[Tensor, "N ..."]] = None,
        scales: Optional[Float[Tensor, "N 3"]] = None,
        quats: Optional[Float[Tensor, "N 4"]] = None,
        colors: Optional[Float[Tensor, "N 3"]] = None,
        normals: Optional[Float[Tensor, "N 3"]] = None,
        batch: Optional[Int[Tensor, " N"]] = None,
    ) -> Float[Tensor, "N C"]:
        """Per-Gaussian input features (channel layout in ``inputs.py``)."""
        if self.config.position_reference == "voxel":
            reference, scale = voxels.point_voxel_centres(), voxels.voxel_size
        else:
            scene = batch if batch is not None else torch.zeros_like(voxels.point_to_voxel)
            low = scene_origins(means, scene, voxels.batch_size)
            high = -scene_origins(-means, scene, voxels.batch_size)
            reference, scale = ((low + high) / 2)[scene], 1.0
        if self.config.input_variant == "gaussian":
            given = {"features_dc": features_dc, "opacities": opacities, "scales": scales, "quats": quats}
            missing = [name for name, value in given.items() if value is None]
            if missing:
                raise ValueError(f"The gaussian input variant needs {', '.join(missing)}.")
            return gaussian_input_features(means, features_dc, opacities, scales, quats, reference, scale)
        if colors is None:
            if features_dc is None:
                raise ValueError("The point input variant needs colors (RGB in [0, 1]) or features_dc.")
            colors = sh_dc_to_rgb(features_dc)
        return point_input_features(
            means, colors, normals, reference, scale, batch, num_neighbours=self.config.normal_neighbours
        )

    def forward(
        self,
        means: Float[Tensor, "N 3"],
        features_dc: Optional[Float[Tensor, "N ..."]] = None,
        opacities: Optional[Float[Tensor, "N ..."]] = None,
        scales: Optional[Float[Tensor, "N 3"]] = None,
        quats: Optional[Float[Tensor, "N 4"]] = None,
        *,
        colors: Optional[Float[Tensor, "N 3"]] = None,
        normals: Optional[Float[Tensor, "N 3"]] = None,
        batch: Optional[Int[Tensor, " N"]] = None,
        batch_size: Optional[int] = None,
    ) -> Float[Tensor, "N D"]:
        """Latent of every Gaussian.

        Args:
            means, features_dc, opacities, scales, quats: splatfacto's parameters (opacity logits, log-scales,
                quaternions w-first); the "point" variant needs only ``means`` and ``colors`` or ``features_dc``.
            colors: RGB in [0, 1] (point variant; replaces ``features_dc``).
            normals: unit normals (point variant; estimated when missing).
            batch: scene index of each Gaussian, for several scenes in one call (default: one scene).
            batch_size: number of scenes (default ``batch.max() + 1``).
        """
        latent, _ = self._encode(
            means, features_dc, opacities, scales, quats, colors, normals, batch, batch_size
        )
        return latent

    def _encode(self, means, features_dc, opacities, scales, quats, colors, normals, batch, batch_size):
        """``forward``'s latents and the voxelisation they were computed on."""
        voxels = voxelize(means.detach(), self.config.voxel_size, batch, batch_size)
        inputs = self.input_features(
            voxels, means, features_dc, opacities, scales, quats, colors, normals, batch
        )
        features = self.backbone(voxels.sparse_tensor(voxels.pool(inputs))).features
        return self.decode(voxels.unpool(self.voxel_proj(features)), inputs), voxels

    def decode(
        self, projected: Float[Tensor, "N C_out"], inputs: Float[Tensor, "N C_in"]
    ) -> Float[Tensor, "N D"]:
        """The per-Gaussian layers after the backbone: each Gaussian's projected voxel feature and its own inputs
        -> its latent."""
        return self.head(torch.cat([projected, self.point_mlp(inputs)], dim=1))

    def _one_scene_inputs(self, *gaussians: Optional[Tensor]) -> Tuple[Voxelization, Float[Tensor, "N C_in"]]:
        """The voxelisation and per-Gaussian inputs of one scene's ``means, features_dc, opacities, scales, quats``
        (as ``forward`` takes them)."""
        voxels = voxelize(gaussians[0].detach(), self.config.voxel_size, None, None)
        return voxels, self.input_features(voxels, *gaussians)

    @torch.no_grad()
    def backbone_features(self, *gaussians: Optional[Tensor]) -> Float[Tensor, "N C"]:
        """One scene's backbone output at every Gaussian's voxel (before ``voxel_proj``), without gradients, from
        its ``means, features_dc, opacities, scales, quats``: what ``latent_from_backbone`` decodes. The backbone is
        nearly all of the encoder's cost, so adapting only the layers after it can run it once and reuse the result
        while the Gaussians barely move."""
        voxels, inputs = self._one_scene_inputs(*gaussians)
        return voxels.unpool(self.backbone(voxels.sparse_tensor(voxels.pool(inputs))).features)

    def latent_from_backbone(
        self, backbone_features: Float[Tensor, "N C"], *gaussians: Optional[Tensor]
    ) -> Float[Tensor, "N D"]:
        """``forward``'s latents from ``backbone_features`` (given, e.g. cached) and the Gaussians' own current
        ``means, features_dc, opacities, scales, quats``: equal to ``forward`` when the features are of these
        Gaussians."""
        _, inputs = self._one_scene_inputs(*gaussians)
        return self.decode(self.voxel_proj(backbone_features), inputs)

    @torch.no_grad()
    def coarsest_stage(
        self,
        means: Float[Tensor, "N 3"],
        features_dc: Optional[Float[Tensor, "N ..."]] = None,
        opacities: Optional[Float[Tensor, "N ..."]] = None,
        scales: Optional[Float[Tensor, "N 3"]] = None,
        quats: Optional[Float[Tensor, "N 4"]] = None,
    ) -> CoarsestStage:
        """One scene's latents together with the backbone's coarsest stage: its features, each site's centre and
        the site of every Gaussian (what scene tokens are pooled from)."""
        backbone = self.backbone
        backbone.keep_coarsest = True
        try:
            latent, voxels = self._encode(
                means, features_dc, opacities, scales, quats, None, None, None, None
            )
            coarse = backbone.coarsest
        finally:
            backbone.keep_coarsest, backbone.coarsest = False, None
        assert coarse is not None
        stride = backbone.coarsest_stride
        fine = voxels.coords.index_select(0, voxels.point_to_voxel).long()  # [N, 4] (batch, x, y, z)
        wanted = torch.cat([fine[:, :1], torch.div(fine[:, 1:], stride, rounding_mode="floor")], dim=1)
        keys = coordinate_keys(coarse.coords)
        order = torch.argsort(keys)
        found = torch.searchsorted(keys[order], coordinate_keys(wanted)).clamp_max(len(keys) - 1)
        site = order[found]
        if not torch.equal(coarse.coords[site].long(), wanted):
            raise RuntimeError(
                "a Gaussian's voxel has no coarsest-stage site: the backbone's stride is not as declared"
            )
        corner = voxels.origins[coarse.coords[:, 0].long()]
        centres = corner + (coarse.coords[:, 1:].to(corner.dtype) + 0.5) * (self.config.voxel_size * stride)
        return CoarsestStage(latent=latent, features=coarse.features, centres=centres, site=site)

    def forward_gauss_params(
        self, gauss_params: Mapping[str, Tensor], batch: Optional[Int[Tensor, " N"]] = None
    ) -> Float[Tensor, "N D"]:
        """Latents from a splatfacto ``gauss_params`` mapping (means, features_dc, opacities, scales, quats)."""
        return self(
            gauss_params["means"],
            gauss_params["features_dc"],
            gauss_params["opacities"],
            gauss_params["scales"],
            gauss_params["quats"],
            batch=batch,
        )

    def encode_scenes(self, scenes: Sequence[Mapping[str, Tensor]]) -> List[Float[Tensor, "n D"]]:
        """Latents of several scenes (each a ``gauss_params``-like mapping) in one backbone pass."""
        if not scenes:
            return []
        keys = ("means", "features_dc", "opacities", "scales", "quats")
        if self.config.input_variant == "point":
            keys = tuple(k for k in ("means", "features_dc", "colors", "normals") if k in scenes[0])
        joined = {k: torch.cat([s[k] for s in scenes]) for k in keys}
        sizes = [s["means"].shape[0] for s in scenes]
        device = joined["means"].device
        batch = torch.repeat_interleave(
            torch.arange(len(scenes), device=device), torch.tensor(sizes, device=device)
        )
        means = joined.pop("means")
        latent = self(means, **joined, batch=batch, batch_size=len(scenes))
        return list(torch.split(latent, sizes))
