"""chorus-pretrain: the Chorus scene encoder over 3D Gaussians, pretrained across scenes by render-and-distill.

Per batch of ``MultiSceneDataManager`` samples (served with ``gaussians`` on): the encoder
(``splatsem_ns.encoders.GaussianEncoder``) turns each scene's Gaussians into one latent per Gaussian in one pass;
the latents are rendered with the Gaussians' own geometry into the sample's views (context and target views alike:
here they are only views of a scene whose Gaussians are given), and each teacher's projector head (the same
``ProjectorHead`` as chorus-splat) decodes the rendered latent at ``distill_pixels`` random pixels per view, compared
with the teacher's cached features by cosine. The Gaussians themselves are inputs, not trained.

The latent has chorus-splat's size and is decoded by the same heads, so the encoder can replace chorus-splat's
learned per-Gaussian latent on a new scene (zero-shot), or start it (adaptation).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type

import torch
from jaxtyping import Float
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor, nn
from torch.nn import Parameter

from splatsem_ns.encoders.augment import InputAugmentationConfig, augment_inputs
from splatsem_ns.encoders.encoder import GaussianEncoder, GaussianEncoderConfig
from splatsem_ns.encoders.lifted_targets import LiftedTargets, lift_teacher_features
from splatsem_ns.feedforward.cameras import world_to_camera_viewmat
from splatsem_ns.models.heads import (
    ProjectorHead,
    centred_cosine_distillation_loss,
    heads_from_state_dict,
    masked_cosine_distillation_loss,
    mean_direction,
    unit_direction_sum,
)
from splatsem_ns.models.semantic_splat import random_pixels, sample_feature_maps
from splatsem_ns.rendering import rasterize_gaussians
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec

VIEW_PARTS = ("context", "target")
"""The parts of a sample whose views the latents are rendered into."""


@dataclass
class ChorusPretrainModelConfig(ModelConfig):
    """The Chorus encoder, its projector heads and the render-and-distill loss (see the module docstring)."""

    _target: Type = field(default_factory=lambda: ChorusPretrainModel)
    encoder: GaussianEncoderConfig = field(default_factory=GaussianEncoderConfig)
    """The sparse 3D encoder (backbone, voxel size, input variant, latent size)."""
    tiny_encoder: bool = False
    """Use the backbone's "tiny" preset and narrow layers instead of ``encoder``'s sizes: CPU tests and smoke runs."""
    projector_hidden_dim: int = 256
    """Hidden width of each teacher's projector MLP (as chorus-splat)."""
    projector_num_layers: int = 2
    """Linear layers of each projector MLP."""
    distill_pixels: int = 4096
    """Random pixels per view where the heads decode the rendered latent; 0: all."""
    teacher_loss_weights: Dict[str, float] = field(default_factory=dict)
    """Per-teacher weights of the cosine loss (default 1)."""
    centred_loss_weight: float = 1.0
    """Weight of a second cosine term per teacher (``heads.centred_cosine_distillation_loss``): decoded and
    teacher features compared with the batch's mean teacher direction taken from both. Teacher features share a
    common direction (one constant feature reaches a cosine of 0.78 with the labels proxy), so the plain loss is
    mostly met by that direction and separates classes by small angles. On the H200 with 856 steps on 300
    generated rooms it took held-out target-view mIoU from 5.7 to 13.3 and 3D mIoU from 4.4 to 11.7
    (benchmarks/results/chorus_encoder_h200_centred_856_steps.md). 0: off."""
    augment: InputAugmentationConfig = field(default_factory=InputAugmentationConfig)
    """Random per-scene transforms of the encoder's inputs in training (a turn about the vertical, a shift, a small
    scale change, position jitter, colour changes; ``splatsem_ns.encoders.augment``). The latents are still rendered
    with the true geometry. Generated rooms put their surfaces at exact coordinates, which the encoder's
    voxel-relative positions could key on and real scans never show. ``--pipeline.model.augment.enabled False``:
    off."""
    near_plane: float = 0.01
    """Gaussians nearer than this to a camera are not rendered (scene units)."""
    point_loss_weight: float = 0.0
    """Weight of a per-Gaussian distillation term (``splatsem_ns.encoders.lifted_targets``): each head decodes the
    latent of Gaussians whose centre a view sees (its sensor depth agrees), compared by cosine with the teacher's
    feature at that position, plus the centred term at ``centred_loss_weight``. The rendered loss supervises blends
    of Gaussians; this one supervises each Gaussian, which is what the 3D votes score. Views without depth give it
    nothing. 0: off."""
    point_loss_pairs: int = 4096
    """Random (Gaussian, view) pairs per scene and view part for ``point_loss_weight``."""
    point_depth_tolerance: float = 0.05
    """A view sees a Gaussian's centre when its sensor depth there is within this fraction of the centre's depth."""


class ChorusPretrainModel(Model):
    """See the module docstring."""

    config: ChorusPretrainModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        specs: Dict[str, TeacherSpec] = (self.kwargs.get("metadata") or {}).get(TEACHER_SPECS_KEY, {}) or {}
        self.teacher_specs = dict(specs)
        encoder_config = self.config.encoder
        if self.config.tiny_encoder:
            # only the sizes shrink: inputs, voxel size and position reference stay as configured
            encoder_config = replace(
                encoder_config,
                backbone_preset="tiny",
                backbone_config=None,
                out_channels=16,
                latent_dim=8,
                point_hidden_dim=8,
            )
        self.encoder = GaussianEncoder(encoder_config)
        self.projector_heads = nn.ModuleDict(
            {
                name: ProjectorHead(
                    self.encoder.latent_dim,
                    spec.feature_dim,
                    self.config.projector_hidden_dim,
                    self.config.projector_num_layers,
                )
                for name, spec in specs.items()
            }
        )

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        # Restored without teachers: the heads exist only in the checkpoint.
        for name, head in heads_from_state_dict(state_dict, "projector_heads.").items():
            if name not in self.projector_heads:
                self.projector_heads[name] = head.to(self.device)
        return super().load_state_dict(state_dict, **kwargs)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return {
            "encoder": list(self.encoder.parameters()),
            "projector_heads": list(self.projector_heads.parameters()),
        }

    # ------------------------------------------------------------------ forward
    def encode(self, gaussians: Mapping[str, Tensor]) -> Float[Tensor, "N D"]:
        """The latent of every served Gaussian (``gaussians``: a batch's joined Gaussians with ``batch``); in training,
        of randomly transformed inputs (``augment``)."""
        batch = gaussians["batch"].long()
        batch_size = int(batch.max()) + 1 if batch.numel() else 1
        # A config.yml written before ``augment`` existed lacks the field: such a run resumes as it was trained.
        augment = getattr(self.config, "augment", None)
        if self.training and augment is not None and augment.enabled:
            gaussians = augment_inputs(gaussians, batch, batch_size, augment)
        return self.encoder(
            gaussians["means"].float(),
            gaussians["features_dc"].float(),
            gaussians["opacities"].float(),
            gaussians["scales"].float(),
            gaussians["quats"].float(),
            batch=batch,
            batch_size=batch_size,
        )

    def render_latent(
        self, gaussians: Mapping[str, Tensor], latent: Tensor, views: Mapping[str, Any]
    ) -> Float[Tensor, "B V H W D"]:
        """The latents rendered into every view of every scene of the batch (zero where no Gaussian is)."""
        height, width = views["images"].shape[2:4]
        viewmats = world_to_camera_viewmat(views["camera_to_world"].float())
        rendered = []
        for b in range(views["images"].shape[0]):
            mine = gaussians["batch"] == b
            image, _, _ = rasterize_gaussians(
                means=gaussians["means"][mine].float(),
                quats=gaussians["quats"][mine].float(),
                scales=torch.exp(gaussians["scales"][mine].float()),
                opacities=torch.sigmoid(gaussians["opacities"][mine].float()).squeeze(-1),
                colors=latent[mine],
                viewmats=viewmats[b],
                Ks=views["intrinsics"][b].float(),
                width=int(width),
                height=int(height),
                near_plane=self.config.near_plane,
            )
            rendered.append(image)
        return torch.stack(rendered)

    def forward(self, batch: Mapping[str, Any]) -> Dict[str, Any]:  # type: ignore[override]
        return self.get_outputs(batch)

    def get_outputs(self, batch: Mapping[str, Any]) -> Dict[str, Any]:  # type: ignore[override]
        """``latent`` (per Gaussian), and per view part: ``rendered`` latents, ``pixels`` sampled and ``decoded``
        teacher features there."""
        if "gaussians" not in batch:
            raise ValueError(
                "chorus-pretrain needs each scene's Gaussians: --pipeline.datamanager.gaussians auto (or ply, points)"
            )
        gaussians = batch["gaussians"]
        latent = self.encode(gaussians)
        outputs: Dict[str, Any] = {"latent": latent}
        for part in VIEW_PARTS:
            rendered = self.render_latent(gaussians, latent, batch[part])
            flat = rendered.flatten(2, 3)  # [B, V, H*W, D]
            count = flat.shape[2]
            n = self.config.distill_pixels if 0 < self.config.distill_pixels < count else count
            pixels = random_pixels(flat.shape[0], flat.shape[1], count, n, flat.device)
            picked = torch.gather(flat, 2, pixels[..., None].expand(-1, -1, -1, flat.shape[-1]))
            outputs[part] = {
                "rendered": rendered,
                "pixels": pixels,
                "decoded": {name: head(picked) for name, head in self.projector_heads.items()},
            }
            if self.training and getattr(self.config, "point_loss_weight", 0.0) > 0:
                lifted = lift_teacher_features(
                    gaussians["means"], gaussians["batch"], batch[part], list(self.projector_heads),
                    self.config.point_loss_pairs, self.config.point_depth_tolerance, self.config.near_plane,
                )  # fmt: skip
                if lifted is not None:
                    outputs[part]["lifted"] = lifted
                    at = latent[lifted.gaussians]
                    outputs[part]["lifted_decoded"] = {
                        name: head(at) for name, head in self.projector_heads.items()
                    }
        return outputs

    # ------------------------------------------------------------------ losses and metrics
    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        return {}

    def distillation(self, outputs, batch) -> Dict[str, Tensor]:
        """Per teacher, ``1 - cos`` between decoded and cached teacher features at the sampled pixels of every
        view (unweighted)."""
        terms: Dict[str, Tensor] = {}
        for name in self.projector_heads:
            per_part = []
            for part in VIEW_PARTS:
                wanted, available = self._sampled_targets(outputs, batch, name, part)
                per_part.append(
                    masked_cosine_distillation_loss(outputs[part]["decoded"][name], wanted, available)
                )
            terms[name] = torch.stack(per_part).mean()
        return terms

    @staticmethod
    def _sampled_targets(outputs, batch, name: str, part: str) -> Tuple[Tensor, Optional[Tensor]]:
        """Teacher ``name``'s cached features at the pixels sampled for ``part`` ([B, V, n, C]), and which views
        have them ([B, V] bool, None for all). Sampled once per forward and kept in ``outputs``: the plain and the
        centred losses and the constant reference all read them."""
        kept = outputs[part].setdefault("targets", {})
        if name not in kept:
            views = batch[part]
            wanted = sample_feature_maps(
                views["teacher_features"][name], outputs[part]["pixels"], tuple(views["images"].shape[2:4])
            )
            kept[name] = (wanted, (views.get("teacher_available") or {}).get(name))
        return kept[name]

    @torch.no_grad()
    def target_direction_sums(self, outputs, batch) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Per teacher, the sum of the unit teacher features at the sampled pixels of the views that have them,
        and their count. Over a set of scenes ``|sum| / count`` is the mean cosine of the best single constant
        feature (the normalised sum): what a network that ignores its input reaches, the reference an encoder's
        cosine has to beat."""
        sums: Dict[str, Tuple[Tensor, Tensor]] = {}
        for name in self.projector_heads:
            parts = [
                unit_direction_sum(*self._sampled_targets(outputs, batch, name, part)) for part in VIEW_PARTS
            ]
            sums[name] = (
                torch.stack([total for total, _ in parts]).sum(0),
                torch.stack([count for _, count in parts]).sum(),
            )
        return sums

    def centres(self, outputs, batch) -> Dict[str, Tensor]:
        """Per teacher, the mean teacher direction at the sampled pixels of the whole batch (all parts; in DDP
        training, of every rank's batch): what the centred terms subtract."""
        return {
            name: mean_direction(total, count, across_ranks=self.training)
            for name, (total, count) in self.target_direction_sums(outputs, batch).items()
        }

    def centred_distillation(
        self, outputs, batch, centres: Optional[Dict[str, Tensor]] = None
    ) -> Dict[str, Tensor]:
        """Per teacher, ``centred_cosine_distillation_loss`` at the sampled pixels of every view, centred on
        ``centres`` (default: ``self.centres``)."""
        terms: Dict[str, Tensor] = {}
        for name, centre in (self.centres(outputs, batch) if centres is None else centres).items():
            per_part = []
            for part in VIEW_PARTS:
                wanted, available = self._sampled_targets(outputs, batch, name, part)
                per_part.append(
                    centred_cosine_distillation_loss(
                        outputs[part]["decoded"][name], wanted, centre, available
                    )
                )
            terms[name] = torch.stack(per_part).mean()
        return terms

    def point_distillation(self, outputs, centres: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Per teacher, ``1 - cos`` between the decoded latents of the lifted (Gaussian, view) pairs and the teacher's
        features there, over the pairs whose view has that teacher, plus ``centred_loss_weight`` times the same on
        unit features minus ``centres`` (teachers without centres: no centred part)."""
        terms: Dict[str, Tensor] = {}
        for name in self.projector_heads:
            per_part = []
            for part in VIEW_PARTS:
                lifted: Optional[LiftedTargets] = outputs[part].get("lifted")
                if lifted is None:
                    continue
                # Each pair as a one-pixel view ([P, 1, 1, C]), so the rendered term's losses weigh them alike.
                decoded = outputs[part]["lifted_decoded"][name][:, None, None]
                target = lifted.features[name][:, None, None]
                available = lifted.available[name][:, None]
                loss = masked_cosine_distillation_loss(decoded, target, available)
                if name in centres and self.config.centred_loss_weight > 0:
                    loss = loss + self.config.centred_loss_weight * centred_cosine_distillation_loss(
                        decoded, target, centres[name], available
                    )
                per_part.append(loss)
            if per_part:
                terms[name] = torch.stack(per_part).mean()
        return terms

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        weights = self.config.teacher_loss_weights
        losses = {
            f"distill_{name}": weights.get(name, 1.0) * loss
            for name, loss in self.distillation(outputs, batch).items()
        }
        centres = self.centres(outputs, batch) if self.config.centred_loss_weight > 0 else {}
        for name, loss in self.centred_distillation(outputs, batch, centres).items():
            losses[f"distill_centred_{name}"] = (
                self.config.centred_loss_weight * weights.get(name, 1.0) * loss
            )
        # A config.yml written before the per-Gaussian term existed lacks its fields: such a run resumes without it.
        if getattr(self.config, "point_loss_weight", 0.0) > 0:
            for name, loss in self.point_distillation(outputs, centres).items():
                losses[f"distill_points_{name}"] = (
                    self.config.point_loss_weight * weights.get(name, 1.0) * loss
                )
        return losses

    @torch.no_grad()
    def cosine_scores(self, outputs, batch) -> Dict[str, float]:
        """Mean cosine similarity between decoded and teacher features at the sampled pixels, per teacher."""
        return {
            f"cosine_{name}": 1.0 - float(loss) for name, loss in self.distillation(outputs, batch).items()
        }

    def get_image_metrics_and_images(self, outputs, batch) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
        return self.cosine_scores(outputs, batch), {}
