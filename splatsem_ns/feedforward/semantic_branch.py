"""The semantic branch: one per-pixel latent per Gaussian from multi-view features and monocular teacher features.

SemanticSplat's multi-conditioned aggregation: the backbone's multi-view features know where things are and which
pixels of different views are the same surface; monocular teacher features (SigLIP2, DINO, SAM, ...) know what
things are. Each teacher's features are normalised, projected to a common width and resized to the backbone's 1/4
grid; at every pixel an attention over {multi-view, teacher_1, ..., teacher_T} (query: the multi-view feature)
mixes them. Teachers can be absent: a missing teacher is masked out of that attention, and the multi-view token is
always there, so the branch also runs with no teacher at all (at inference a user may not run the teachers; training
drops teachers at random so that this case is learnt, not extrapolated).

Beside the aggregation, each teacher also reaches the latent directly (``teacher_skip``): its normalised features are
mapped linearly to the latent channels at the teacher's grid and upsampled to full resolution. Through the 1/4
grid and two encoders alone, a network learns slowly to carry a teacher's per-pixel meaning through: trained on
the labels proxy, the tiny network still decoded every pixel as the most common class ("wall") after 400 steps,
although the teacher's features were its input. The skip makes carrying the teacher through the easy start, and
the encoders learn the corrections (edges, views where the teacher is wrong, views without the teacher).

Two parts, for SemanticSplat's two-stage distillation: the *object* part (projections, aggregation, object encoder)
is trained first against an object-aware teacher (SAM) and then frozen, while the *language* part (language encoder
and latent head) learns the open-vocabulary teacher on top of it. With ``object_latent_dim > 0`` the first latent
channels come from the object part alone, so freezing it keeps them, and what the object-aware head reads, fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from splatsem_ns.feedforward.unet import ResidualBlock


@dataclass
class SemanticBranchConfig:
    """Teacher-conditioned semantic latent per pixel."""

    latent_dim: int = 32
    """Channels of the per-Gaussian semantic latent (chorus-splat's latent has 32)."""
    hidden_dim: int = 64
    """Width of the branch at 1/4 resolution (teacher projections, aggregation, encoders)."""
    teacher_channels: Dict[str, int] = field(default_factory=dict)
    """Feature channels of each teacher the branch can be conditioned on, by the name the batches use as the key of
    ``teacher_features`` (e.g. {"siglip2": 768, "dinov2": 384, "sam": 256}). Empty: multi-view features only."""
    teacher_dropout: float = 0.3
    """In training, each teacher of each view is hidden with this probability, so the network learns to work with
    any subset of teachers, none included."""
    num_blocks: int = 2
    """Residual blocks in each of the object and language encoders."""
    object_latent_dim: int = 0
    """Leading latent channels produced by the object part only (0: every channel mixes both parts)."""
    head_channels: int = 32
    """Hidden channels of the full-resolution latent head(s)."""
    teacher_skip: bool = True
    """Add each present teacher's features, mapped linearly to the latent channels and upsampled to full
    resolution, to the latent (see the module docstring). Part of the language part: with ``object_latent_dim``
    the skip feeds only the channels the language part owns."""

    def __post_init__(self) -> None:
        if not 0 <= self.object_latent_dim < self.latent_dim:
            raise ValueError(
                f"object_latent_dim must be in [0, latent_dim) = [0, {self.latent_dim}), got {self.object_latent_dim}"
            )
        if not 0.0 <= self.teacher_dropout < 1.0:
            raise ValueError(f"teacher_dropout must be in [0, 1), got {self.teacher_dropout}")


def module_key(teacher: str) -> str:
    """A teacher name as an ``nn.ModuleDict`` key (those cannot contain dots)."""
    return teacher.replace(".", "_")


class TeacherProjection(nn.Module):
    """One teacher's features -> the branch width: LayerNorm over channels (teachers' feature norms differ by orders
    of magnitude), then a linear map (a 1x1 convolution), applied at the teacher's own grid before resizing."""

    def __init__(self, channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = nn.LayerNorm(channels)
        self.linear = nn.Linear(channels, hidden_dim)

    def forward(
        self, features: Float[Tensor, "N h w C"], size: tuple[int, int]
    ) -> Float[Tensor, "N D h2 w2"]:
        projected = self.linear(self.norm(features.to(self.linear.weight.dtype))).permute(0, 3, 1, 2)
        if tuple(projected.shape[-2:]) == tuple(size):
            return projected
        shrinking = size[0] <= projected.shape[-2] and size[1] <= projected.shape[-1]
        if shrinking:
            return F.interpolate(projected, size=size, mode="area")
        return F.interpolate(projected, size=size, mode="bilinear", align_corners=False)


class MultiConditionAggregation(nn.Module):
    """Per-pixel attention of the multi-view feature over itself and the present teachers' features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(
        self,
        multiview: Float[Tensor, "N D h w"],
        conditions: List[Float[Tensor, "N D h w"]],
        present: Bool[Tensor, "N T"],
    ) -> Float[Tensor, "N D h w"]:
        tokens = torch.stack([multiview, *conditions], dim=1)  # [N, 1 + T, D, h, w]
        flat = tokens.flatten(0, 1)
        keys = self.key(flat).unflatten(0, tokens.shape[:2])
        values = self.value(flat).unflatten(0, tokens.shape[:2])
        query = self.query(multiview)
        logits = (query[:, None] * keys).sum(dim=2) / math.sqrt(query.shape[1])  # [N, 1 + T, h, w]
        # The multi-view token is always present, so every softmax row has a finite entry.
        available = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)
        logits = logits.masked_fill(~available[:, :, None, None], float("-inf"))
        weights = torch.softmax(logits, dim=1)
        return multiview + self.out((weights[:, :, None] * values).sum(dim=1))


class LatentHead(nn.Module):
    """1/4-resolution semantic features, upsampled and joined with the full-resolution refinement features (which
    carry image edges), -> per-pixel latent channels."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(
        self, semantic: Float[Tensor, "N D h w"], full_resolution: Float[Tensor, "N F H W"]
    ) -> Float[Tensor, "N L H W"]:
        upsampled = F.interpolate(
            semantic, size=full_resolution.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.net(torch.cat([upsampled, full_resolution], dim=1))


class SemanticBranch(nn.Module):
    """Multi-view features (+ teacher features) -> per-pixel semantic latent. See the module docstring."""

    def __init__(self, config: SemanticBranchConfig, feature_dim: int, full_resolution_channels: int) -> None:
        super().__init__()
        self.config = config
        keys = [module_key(name) for name in config.teacher_channels]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"Teacher names collide once dots are replaced: {sorted(config.teacher_channels)}"
            )
        hidden = config.hidden_dim
        # --- object part (stage one of SemanticSplat's distillation; frozen in stage two)
        self.multiview_projection = nn.Conv2d(feature_dim, hidden, 1)
        self.teacher_projections = nn.ModuleDict(
            {module_key(name): TeacherProjection(c, hidden) for name, c in config.teacher_channels.items()}
        )
        self.aggregation = MultiConditionAggregation(hidden)
        self.object_encoder = nn.Sequential(
            *[ResidualBlock(hidden, hidden) for _ in range(config.num_blocks)]
        )
        self.object_latent_head = (
            LatentHead(hidden + full_resolution_channels, config.head_channels, config.object_latent_dim)
            if config.object_latent_dim
            else None
        )
        # --- language part
        self.language_encoder = nn.Sequential(
            nn.Conv2d(2 * hidden, hidden, 1),
            *[ResidualBlock(hidden, hidden) for _ in range(config.num_blocks)],
        )
        self.latent_head = LatentHead(
            hidden + full_resolution_channels,
            config.head_channels,
            config.latent_dim - config.object_latent_dim,
        )
        self.teacher_skips = nn.ModuleDict(
            {
                module_key(name): TeacherProjection(c, config.latent_dim - config.object_latent_dim)
                for name, c in config.teacher_channels.items()
            }
            if config.teacher_skip
            else {}
        )

    def object_modules(self) -> List[nn.Module]:
        """The object-aware part (what ``freeze("semantic_object")`` freezes)."""
        modules = [self.multiview_projection, self.teacher_projections, self.aggregation, self.object_encoder]
        return modules + ([self.object_latent_head] if self.object_latent_head is not None else [])

    def language_modules(self) -> List[nn.Module]:
        """The open-vocabulary part trained on top of the object part."""
        return [self.language_encoder, self.latent_head, self.teacher_skips]

    def teacher_inputs(
        self,
        teacher_features: Optional[Mapping[str, Float[Tensor, "B V ht wt C"]]],
        teacher_available: Optional[Mapping[str, Bool[Tensor, "B V"]]],
        batch: int,
        views: int,
        size: tuple[int, int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[List[Tensor], Tensor, Dict[str, Tensor]]:
        """Projected teacher features at 1/4 resolution ([B*V, D, h, w] each, zeros where absent), which are
        present ([B*V, T]), in the order of ``config.teacher_channels``, and the given teachers' features as
        [B*V, ht, wt, C] by name (for the skips)."""
        teacher_features = dict(teacher_features or {})
        unknown = sorted(set(teacher_features) - set(self.config.teacher_channels))
        if unknown:
            raise ValueError(
                f"Teacher features {unknown} are not among the teachers the network was built for "
                f"({sorted(self.config.teacher_channels)}); set SemanticBranchConfig.teacher_channels."
            )
        projected, present, given = [], [], {}
        for name, channels in self.config.teacher_channels.items():
            features = teacher_features.get(name)
            if features is None:
                projected.append(
                    torch.zeros(batch * views, self.config.hidden_dim, *size, device=device, dtype=dtype)
                )
                present.append(torch.zeros(batch * views, dtype=torch.bool, device=device))
                continue
            if features.shape[:2] != (batch, views) or features.shape[-1] != channels:
                raise ValueError(
                    f"Teacher '{name}': features of shape {tuple(features.shape)}, expected [{batch}, {views}, h, w, "
                    f"{channels}]"
                )
            available = torch.ones(batch, views, dtype=torch.bool, device=device)
            if teacher_available is not None and name in teacher_available:
                available = teacher_available[name].to(device=device, dtype=torch.bool)
            if self.training and self.config.teacher_dropout > 0:
                keep = torch.rand(batch, views, device=device) >= self.config.teacher_dropout
                available = available & keep
            available = available.flatten()
            given[name] = features.flatten(0, 1).to(device)
            features = self.teacher_projections[module_key(name)](given[name], size)
            # Zeroed where absent, so that nothing of a hidden teacher leaks through the mask-free convolutions.
            projected.append(features * available[:, None, None, None].to(features.dtype))
            present.append(available)
        if not present:
            return [], torch.zeros(batch * views, 0, dtype=torch.bool, device=device), given
        return projected, torch.stack(present, dim=1), given

    def forward(
        self,
        features: Float[Tensor, "B V C h w"],
        full_resolution: Float[Tensor, "B V F H W"],
        teacher_features: Optional[Mapping[str, Float[Tensor, "B V ht wt Ct"]]] = None,
        teacher_available: Optional[Mapping[str, Bool[Tensor, "B V"]]] = None,
    ) -> Float[Tensor, "B V L H W"]:
        """``features``: the backbone's multi-view features; ``full_resolution``: the depth refinement's features;
        ``teacher_features``: any subset of the configured teachers (channels last, any grid covering the image);
        ``teacher_available``: per view, whether each given teacher's features are real (default: all)."""
        batch, views = features.shape[:2]
        size = tuple(features.shape[-2:])
        multiview = self.multiview_projection(features.flatten(0, 1))
        conditions, present, given = self.teacher_inputs(
            teacher_features, teacher_available, batch, views, size, features.device, multiview.dtype
        )
        fused = self.aggregation(multiview, conditions, present)
        objects = self.object_encoder(fused)
        language = self.language_encoder(torch.cat([objects, fused], dim=1))
        full = full_resolution.flatten(0, 1)
        latent = self.latent_head(language, full)
        for index, name in enumerate(self.config.teacher_channels):
            if name in given and module_key(name) in self.teacher_skips:
                skip = self.teacher_skips[module_key(name)](given[name], tuple(full.shape[-2:]))
                latent = latent + skip * present[:, index, None, None, None].to(skip.dtype)
        if self.object_latent_head is not None:
            latent = torch.cat([self.object_latent_head(objects, full), latent], dim=1)
        return latent.unflatten(0, (batch, views))
