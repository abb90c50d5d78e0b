"""SemanticSplat-style feed-forward network: sparse posed views -> per-pixel semantic 3D Gaussians.

    images ──► MultiViewBackbone (per-view CNN, cross-view window transformer; 1/4 resolution)
                   │
                   ├──► DepthPredictor (plane-sweep cost volume, U-Nets) ──► depth, confidence, full-res features
                   │                                                              │
                   │                               GaussianHead ◄─────────────────┤ ──► means, scales, quats,
                   │                                                              │     opacities, SH colours
                   └──► SemanticBranch (+ monocular teacher features) ◄───────────┘ ──► per-pixel latent

Pure PyTorch (no nerfstudio import): a pipeline owns the training loop and the losses; it renders the prediction
for target cameras with ``render_predicted`` and decodes the rendered latent with the per-teacher
``ProjectorHead``s, the same heads every method of the package ends in.

Inputs: images as float in [0, 1] (normalised inside), intrinsics in pixels at the image size, OpenGL
camera-to-world in the scene's metric frame (what ``MultiSceneDataManager`` serves; ``network_inputs`` converts
its views). Image sides must be multiples of 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from splatsem_ns.feedforward.backbone import BackboneConfig, MultiViewBackbone
from splatsem_ns.feedforward.cost_volume import DepthPredictor, DepthPredictorConfig
from splatsem_ns.feedforward.gaussian_head import GaussianHead, GaussianHeadConfig
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.feedforward.semantic_branch import SemanticBranch, SemanticBranchConfig

PARTS = ("geometry", "appearance", "semantic", "semantic_object", "semantic_language")
"""Names ``SemanticSplatNetwork.freeze`` accepts: geometry = backbone + depth predictor; appearance = the Gaussian
head (offsets, opacity, scale, rotation, colour); semantic = the whole semantic branch, which splits into its
object-aware part (teacher projections, aggregation, object encoder) and its language part (the rest)."""

PARAMETER_GROUPS = ("geometry", "appearance", "semantic")
"""Disjoint parameter groups of ``SemanticSplatNetwork.parameter_groups`` (one optimizer group each)."""


@dataclass
class SemanticSplatNetworkConfig:
    """The whole network. Defaults: full size (MVSplat's widths, 6 transformer layers, 128 depth candidates)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """Per-view CNN and cross-view transformer."""
    depth: DepthPredictorConfig = field(default_factory=DepthPredictorConfig)
    """Cost volume and depth refinement; holds the default near / far of the depth candidates."""
    gaussians: GaussianHeadConfig = field(default_factory=GaussianHeadConfig)
    """Gaussian parameter heads (SH degree, scale range, pixel offsets)."""
    semantic: SemanticBranchConfig = field(default_factory=SemanticBranchConfig)
    """Semantic branch (latent size, teachers it is conditioned on)."""

    @classmethod
    def tiny(
        cls, teacher_channels: Optional[Mapping[str, int]] = None, **semantic: object
    ) -> "SemanticSplatNetworkConfig":
        """A few-channel network for tests and CPU smoke runs: 16 depth candidates, one transformer layer."""
        return cls(
            backbone=BackboneConfig(
                cnn_channels=(8, 12, 16), feature_dim=16, num_transformer_layers=1, num_heads=2, window_size=4
            ),
            depth=DepthPredictorConfig(
                num_depth_candidates=16,
                cost_unet_channels=(16, 16),
                refine_feature_channels=8,
                refine_unet_channels=(8, 16),
                refine_out_channels=8,
                depth_chunk=16,
            ),
            gaussians=GaussianHeadConfig(hidden_channels=16),
            semantic=SemanticBranchConfig(
                latent_dim=8,
                hidden_dim=16,
                head_channels=8,
                num_blocks=1,
                teacher_channels=dict(teacher_channels or {}),
                **semantic,  # type: ignore[arg-type]
            ),
        )

    def setup(self) -> "SemanticSplatNetwork":
        """The network this config describes (nerfstudio's config -> module pattern)."""
        return SemanticSplatNetwork(self)


class SemanticSplatNetwork(nn.Module):
    """See the module docstring. Submodules: ``backbone``, ``depth_predictor``, ``gaussian_head`` and
    ``semantic_branch`` (its parameters are a group of their own: ``parameter_groups()["semantic"]``)."""

    def __init__(self, config: SemanticSplatNetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MultiViewBackbone(config.backbone)
        self.depth_predictor = DepthPredictor(config.depth, config.backbone.feature_dim)
        self.gaussian_head = GaussianHead(config.gaussians, config.depth.refine_out_channels)
        self.semantic_branch = SemanticBranch(
            config.semantic, config.backbone.feature_dim, config.depth.refine_out_channels
        )

    def forward(
        self,
        images: Float[Tensor, "B V 3 H W"],
        intrinsics: Float[Tensor, "B V 3 3"],
        camera_to_world: Float[Tensor, "B V 4 4"],
        teacher_features: Optional[Mapping[str, Float[Tensor, "B V h w C"]]] = None,
        *,
        teacher_available: Optional[Mapping[str, Bool[Tensor, "B V"]]] = None,
        near: Union[None, float, Float[Tensor, " B"]] = None,
        far: Union[None, float, Float[Tensor, " B"]] = None,
    ) -> PredictedGaussians:
        """Predict the Gaussians of B scenes from V >= 2 context views each.

        Args:
            images: Context images, float RGB in [0, 1]; H and W multiples of 4.
            intrinsics: Pinhole intrinsics in pixels at H x W.
            camera_to_world: OpenGL camera-to-world (x right, y up, looking down -z), metric world frame.
            teacher_features: Any subset of the configured teachers' features of the context views, channels last
                at any grid covering the image (fp16 is fine); missing teachers are treated as absent.
            teacher_available: Per teacher, which views' features are real (default: all given ones).
            near: Nearest depth candidate per scene (metres); default ``config.depth.near``.
            far: Farthest depth candidate per scene; default ``config.depth.far``.
        """
        if images.dtype == torch.uint8 or not images.is_floating_point():
            raise TypeError("images must be float in [0, 1] of shape [B, V, 3, H, W]; see network_inputs().")
        batch, views, channels, height, width = images.shape
        if channels != 3:
            raise ValueError(f"images must be [B, V, 3, H, W], got {tuple(images.shape)}")
        intrinsics = intrinsics.to(images.dtype)
        camera_to_world = camera_to_world.to(images.dtype)
        near_t = self._per_scene(near, self.config.depth.near, batch, images)
        far_t = self._per_scene(far, self.config.depth.far, batch, images)

        normalised = images * 2.0 - 1.0  # zero-centred input for the convolutions
        backbone = self.backbone(normalised)
        depth = self.depth_predictor(
            normalised, backbone.features, intrinsics, camera_to_world, near_t, far_t
        )
        gaussians = self.gaussian_head(
            depth.features, images, depth.depth, depth.confidence, intrinsics, camera_to_world
        )
        latent = self.semantic_branch(backbone.features, depth.features, teacher_features, teacher_available)

        def flat(x: Tensor) -> Tensor:  # [B, V, H, W, ...] -> [B, V*H*W, ...]
            return x.flatten(1, 3)

        return PredictedGaussians(
            means=flat(gaussians["means"]),
            quats=flat(gaussians["quats"]),
            scales=flat(gaussians["scales"]),
            opacities=flat(gaussians["opacities"]),
            features_dc=flat(gaussians["features_dc"]),
            features_rest=flat(gaussians["features_rest"]),
            latent=flat(latent.permute(0, 1, 3, 4, 2)),
            depth=depth.depth,
            confidence=depth.confidence,
        )

    @staticmethod
    def _per_scene(value, default: float, batch: int, like: Tensor) -> Tensor:
        if value is None:
            value = default
        tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        return tensor.expand(batch).contiguous() if tensor.ndim == 0 else tensor.reshape(batch)

    # ------------------------------------------------------------------ training stages
    def part_modules(self, part: str) -> List[nn.Module]:
        """The submodules of one of ``PARTS``."""
        if part == "geometry":
            return [self.backbone, self.depth_predictor]
        if part == "appearance":
            return [self.gaussian_head]
        if part == "semantic":
            return [self.semantic_branch]
        if part == "semantic_object":
            return self.semantic_branch.object_modules()
        if part == "semantic_language":
            return self.semantic_branch.language_modules()
        raise ValueError(f"Unknown part {part!r}; choose from {PARTS}")

    def freeze(self, *parts: str, frozen: bool = True) -> None:
        """Stop (or, with ``frozen=False``, resume) gradients for the parameters of ``parts`` (see ``PARTS``).

        SemanticSplat's stages: ``freeze("geometry", "appearance")`` to distil semantics on a trained
        reconstruction network; then ``freeze("semantic_object")`` for the open-vocabulary stage. Frozen parameters
        keep ``requires_grad=False``, so an optimizer built over all parameters leaves them unchanged.
        """
        for part in parts:
            for module in self.part_modules(part):
                for parameter in module.parameters():
                    parameter.requires_grad_(not frozen)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Disjoint parameter lists for an optimizer, one per ``PARAMETER_GROUPS`` entry."""
        return {part: _parameters(self.part_modules(part)) for part in PARAMETER_GROUPS}


def _parameters(modules: Iterable[nn.Module]) -> List[nn.Parameter]:
    return [p for module in modules for p in module.parameters()]


def network_inputs(views: Mapping[str, object]) -> Dict[str, object]:
    """``SemanticSplatNetwork.forward`` keyword arguments from a view dict of ``MultiSceneDataManager``
    (``batch["context"]``): uint8 [B, V, H, W, 3] images -> float [B, V, 3, H, W] in [0, 1]; cameras as served;
    teacher features (when served) as they are, and which of them are there (``teacher_available``)."""
    images = views["images"]
    assert isinstance(images, Tensor)
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return {
        "images": images[..., :3].permute(0, 1, 4, 2, 3).contiguous(),
        "intrinsics": views["intrinsics"],
        "camera_to_world": views["camera_to_world"],
        "teacher_features": views.get("teacher_features"),
        "teacher_available": views.get("teacher_available"),
    }


def teacher_channels_of(views: Mapping[str, object]) -> Dict[str, int]:
    """``SemanticBranchConfig.teacher_channels`` from a served batch: each teacher's feature channels, by the name
    the datamanager serves it under."""
    features = views.get("teacher_features") or {}
    assert isinstance(features, Mapping)
    return {name: int(value.shape[-1]) for name, value in features.items()}
