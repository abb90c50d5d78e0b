"""semantic-splat: feed-forward semantic Gaussians from a few posed views (SemanticSplat's cost-volume branch).

A network trained across scene collections (``splatsem_ns.feedforward``) turns context views into per-pixel
Gaussians with a semantic latent in one pass. This model wraps it for nerfstudio: per batch of
``MultiSceneDataManager`` samples it predicts the Gaussians of each scene, renders them into the target views, and
decodes the rendered latent with the same per-teacher ``ProjectorHead``s chorus-splat uses, so a prediction is a
chorus-splat-like scene (export, queries and the viewer treat both alike).

Losses, per batch:
- photometric: MSE (or L1) between rendered and real target images, plus LPIPS where its weights load (MVSplat's
  recipe, weight 0.05);
- depth, where the scene has depth: relative L1 between the predicted context depth and the sensor's, and between
  the rendered target depth and the sensor's;
- distillation: for every teacher, ``1 - cos`` between the decoded latent and the teacher's features of the
  target views, at ``distill_pixels`` random pixels per view (bilinear in the teacher's grid); and the same at the
  context views on each pixel's own latent, before rendering (``context_distill_weight``).

SemanticSplat's two stages are ``stage``: "object" distils the object-aware teachers only; "language" freezes the
object part of the semantic branch and distils the others; "joint" (default) does all at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor, nn
from torch.nn import Parameter

from splatsem_ns.feedforward.constants import device_constant
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.feedforward.network import SemanticSplatNetworkConfig, network_inputs
from splatsem_ns.feedforward.render import RenderedViews, render_predicted
from splatsem_ns.models.heads import (
    ProjectorHead,
    centred_cosine_distillation_loss,
    heads_from_state_dict,
    masked_cosine_distillation_loss,
    mean_direction,
    unit_direction_sum,
)
from splatsem_ns.models.optional_lpips import optional_lpips
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, TeacherSpec

OBJECT_TEACHERS: Tuple[str, ...] = ("sam", "instances")
"""Teachers SemanticSplat's first stage distils (object-aware: SAM, or the instance labels proxy)."""


@dataclass
class SemanticSplatModelConfig(ModelConfig):
    """The feed-forward network, its projector heads and losses (see the module docstring)."""

    _target: Type = field(default_factory=lambda: SemanticSplatModel)
    network: SemanticSplatNetworkConfig = field(default_factory=SemanticSplatNetworkConfig)
    """The network (backbone, cost volume, Gaussian and semantic heads). Teacher channels are filled from the
    datamanager's features."""
    tiny_network: bool = False
    """Use the few-channel network (``SemanticSplatNetworkConfig.tiny``) instead of ``network``: CPU tests and
    smoke runs."""
    projector_hidden_dim: int = 256
    """Hidden width of each teacher's projector MLP (as chorus-splat)."""
    projector_num_layers: int = 2
    """Linear layers of each projector MLP."""
    rgb_loss: Literal["mse", "l1"] = "mse"
    """Photometric loss on the target views (MVSplat: MSE)."""
    lpips_weight: float = 0.05
    """Weight of LPIPS on the target views where its weights load (MVSplat: 0.05); 0: off."""
    depth_loss_weight: float = 0.5
    """Weight of the relative L1 depth loss (predicted context depth and rendered target depth against the
    sensor), on scenes with depth; 0: off."""
    distill_weight: float = 1.0
    """Weight of each teacher's cosine distillation loss."""
    teacher_loss_weights: Dict[str, float] = field(default_factory=dict)
    """Per-teacher weights replacing ``distill_weight``."""
    distill_pixels: int = 4096
    """Random pixels per target view where the heads decode the rendered latent; 0: all."""
    latent_render_scale: float = 1.0
    """Resolution of the target views' latent render in training, relative to the image (evaluation renders at
    full resolution). The 32-channel rasterizer backward of that render was the largest cost of a step once the
    predicted Gaussians had grown (34 ms per scene at step 1000 of a run, against 10 ms for the RGB pass;
    benchmarks/results/profile_semantic_splat_h200_step1000.txt); 0.5 renders a quarter of the pixels, still finer
    than any teacher's grid."""
    context_distill_weight: float = 1.0
    """Weight of the distillation at the context views, on the latent of the Gaussian each context pixel becomes
    (no rendering), relative to the target views' (``distill_pixels`` pixels per view). While the predicted depth
    is still wrong, target renders blend unrelated surfaces and their distillation gradient is mostly noise: with
    target views alone the network first learns the teacher's mean (every pixel decoded as the most common class);
    a pixel's own latent against its own teacher feature is a clean signal from the first step. 0: off."""
    centred_loss_weight: float = 0.0
    """Weight of the centred cosine term beside each distillation loss (``heads.centred_cosine_distillation_loss``,
    centred on the mean teacher direction of the batch's views), which pulls the prediction away from the
    teacher's mean. It lifted the Chorus encoder's held-out mIoU from 5.7 to 13.3 (chorus-pretrain's default);
    on semantic-splat only a CPU pair with the tiny network has run (target-view mIoU 5.9 against 2.5), so it is
    off until a GPU run. 0: off."""
    stage: Literal["joint", "object", "language"] = "joint"
    """SemanticSplat's stages: "object" distils only the object-aware teachers (``OBJECT_TEACHERS``); "language"
    freezes the object part of the semantic branch and distils the others; "joint": everything together."""
    freeze_reconstruction: bool = False
    """Freeze the geometry and appearance branches (semantic training on a trained reconstruction network)."""
    depth_range_from_sensor: bool = True
    """Where context views have depth, choose each scene's depth candidates from it (5th/95th percentiles with a
    margin) instead of the network's fixed near/far."""
    bf16: bool = True
    """Run the network in bfloat16 autocast on CUDA (rendering stays float32)."""
    background_color: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Colour behind the Gaussians in renders."""


class SemanticSplatModel(Model):
    """See the module docstring."""

    config: SemanticSplatModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        specs: Dict[str, TeacherSpec] = (self.kwargs.get("metadata") or {}).get(TEACHER_SPECS_KEY, {}) or {}
        self.teacher_specs = dict(specs)
        channels = {name: spec.feature_dim for name, spec in specs.items()}
        if self.config.tiny_network:
            network_config = SemanticSplatNetworkConfig.tiny(channels)
        else:
            network_config = self.config.network
            network_config.semantic.teacher_channels = channels
        self.network = network_config.setup()
        latent_dim = network_config.semantic.latent_dim
        self.projector_heads = nn.ModuleDict(
            {
                name: ProjectorHead(
                    latent_dim,
                    spec.feature_dim,
                    self.config.projector_hidden_dim,
                    self.config.projector_num_layers,
                )
                for name, spec in specs.items()
            }
        )
        if self.config.freeze_reconstruction:
            self.network.freeze("geometry", "appearance")
        if self.config.stage == "language":
            self.network.freeze("semantic_object")
            for name in OBJECT_TEACHERS:
                if name in self.projector_heads:
                    self.projector_heads[name].requires_grad_(False)
        with optional_lpips():
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(normalize=True)
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        # Restored without teachers (ns-eval, export): the heads exist only in the checkpoint.
        for name, head in heads_from_state_dict(state_dict, "projector_heads.").items():
            if name not in self.projector_heads:
                self.projector_heads[name] = head.to(self.device)
        return super().load_state_dict(state_dict, **kwargs)

    @property
    def latent_dim(self) -> int:
        return self.network.config.semantic.latent_dim

    def distilled_teachers(self) -> List[str]:
        """The teachers whose losses this stage trains."""
        names = list(self.projector_heads)
        if self.config.stage == "object":
            return [n for n in names if n in OBJECT_TEACHERS]
        if self.config.stage == "language":
            return [n for n in names if n not in OBJECT_TEACHERS]
        return names

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = {f"network_{k}": v for k, v in self.network.parameter_groups().items()}
        groups["projector_heads"] = list(self.projector_heads.parameters())
        return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}

    # ------------------------------------------------------------------ prediction
    def depth_range(self, context: Mapping[str, Any]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Per-scene (near, far) of the depth candidates: from the context views' sensor depth where they have it
        (``depth_range_from_sensor``), else the network's defaults (None)."""
        if not self.config.depth_range_from_sensor or "depth" not in context:
            return None, None
        depth = context["depth"].flatten(1).float()  # [B, V*H*W]
        defaults = self.network.config.depth
        # On the device for the whole batch at once: reading a quantile per scene back to the host made it wait for
        # the GPU several times per step. Pixels without a measurement are NaN, which nanquantile skips.
        step = max(1, depth.shape[1] // 20000)
        sampled = depth[:, ::step]
        measured = torch.where(sampled > 0, sampled, torch.full_like(sampled, float("nan")))
        lo, hi = torch.nanquantile(measured, device_constant((0.05, 0.95), depth.device), dim=1)
        usable = (depth > 0).sum(dim=1) >= 100
        has = context.get("has_depth")
        if has is not None:
            usable = usable & has.to(device=depth.device, dtype=torch.bool).reshape(-1)
        near = torch.where(usable, (0.5 * lo).clamp_min(0.1), torch.full_like(lo, defaults.near))
        far = torch.where(usable, torch.maximum(1.5 * hi, 2.0 * near), torch.full_like(hi, defaults.far))
        return near, far

    def predict(self, context: Mapping[str, Any]) -> PredictedGaussians:
        """The Gaussians of each scene of a batch's context views (float32)."""
        inputs = network_inputs(context)
        near, far = self.depth_range(context)
        use_bf16 = self.config.bf16 and inputs["images"].is_cuda  # type: ignore[union-attr]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with autocast:
            predicted = self.network(**inputs, near=near, far=far)
        if use_bf16:  # the rasterizer and the losses work in float32
            predicted = PredictedGaussians(**{k: v.float() for k, v in vars(predicted).items()})
        return predicted

    def render(
        self,
        gaussians: PredictedGaussians,
        views: Mapping[str, Any],
        latent: bool = True,
        latent_scale: float = 1.0,
    ) -> RenderedViews:
        """Renders of ``gaussians`` into ``views`` (a batch's "target" or "context" views) at their size (the latent
        at ``latent_scale`` of it)."""
        height, width = views["images"].shape[2:4]
        return render_predicted(
            gaussians,
            views["intrinsics"],
            views["camera_to_world"],
            int(width),
            int(height),
            background=device_constant(tuple(self.config.background_color), gaussians.means.device),
            render_latent=latent and bool(self.projector_heads),
            latent_scale=latent_scale,
        )

    def forward(self, batch: Mapping[str, Any]) -> Dict[str, Any]:  # type: ignore[override]
        """Predict and render one batch (what DistributedDataParallel wraps); see ``get_outputs``."""
        return self.get_outputs(batch)

    def get_outputs(self, batch: Mapping[str, Any]) -> Dict[str, Any]:  # type: ignore[override]
        """``gaussians`` (the prediction), ``rendered`` (the target views), and, for the distillation losses,
        ``decoded`` ({teacher: [B, T, n, C]}) at ``pixels`` ([B, T, n] flat indices into the target images)."""
        gaussians = self.predict(batch["context"])
        scale = self.config.latent_render_scale if self.training else 1.0
        rendered = self.render(gaussians, batch["target"], latent_scale=scale)
        outputs: Dict[str, Any] = {"gaussians": gaussians, "rendered": rendered}
        if rendered.latent is not None and self.distilled_teachers():
            latent = rendered.latent.flatten(2, 3)  # [B, T, H*W, D]
            count = latent.shape[2]
            n = self.config.distill_pixels if 0 < self.config.distill_pixels < count else count
            pixels = random_pixels(latent.shape[0], latent.shape[1], count, n, latent.device)
            picked = torch.gather(latent, 2, pixels[..., None].expand(-1, -1, -1, latent.shape[-1]))
            outputs["pixels"] = pixels
            outputs["latent_size"] = tuple(rendered.latent.shape[2:4])  # where ``pixels`` index
            outputs["decoded"] = {
                name: self.projector_heads[name](picked) for name in self.distilled_teachers()
            }
            if self.config.context_distill_weight > 0:
                context = batch["context"]["images"]
                own = gaussians.latent.unflatten(1, (context.shape[1], -1))  # [B, V, H*W, D]
                pixels = random_pixels(
                    own.shape[0], own.shape[1], own.shape[2], min(n, own.shape[2]), own.device
                )
                picked = torch.gather(own, 2, pixels[..., None].expand(-1, -1, -1, own.shape[-1]))
                outputs["context_pixels"] = pixels
                outputs["context_decoded"] = {
                    name: self.projector_heads[name](picked) for name in self.distilled_teachers()
                }
        return outputs

    # ------------------------------------------------------------------ losses and metrics
    def get_metrics_dict(self, outputs, batch) -> Dict[str, Tensor]:
        target = batch["target"]["images"].float() / 255.0
        rgb = outputs["rendered"].rgb
        return {"psnr": psnr_from_mse(F.mse_loss(rgb.detach(), target))}

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, Tensor]:
        rendered: RenderedViews = outputs["rendered"]
        target = batch["target"]
        real = target["images"].float() / 255.0  # [B, T, H, W, 3]
        losses: Dict[str, Tensor] = {}
        if self.config.rgb_loss == "mse":
            losses["rgb"] = F.mse_loss(rendered.rgb, real)
        else:
            losses["rgb"] = (rendered.rgb - real).abs().mean()
        if self.config.lpips_weight > 0 and self.lpips is not None and not self.config.freeze_reconstruction:
            pred = rendered.rgb.flatten(0, 1).permute(0, 3, 1, 2).clamp(0, 1)
            losses["lpips"] = self.config.lpips_weight * self.lpips(
                pred, real.flatten(0, 1).permute(0, 3, 1, 2)
            )
        if self.config.depth_loss_weight > 0 and not self.config.freeze_reconstruction:
            depth = self._depth_loss(outputs["gaussians"].depth, batch["context"])
            depth = depth + self._depth_loss(rendered.depth, target)
            losses["depth"] = self.config.depth_loss_weight * depth
        for name, decoded in (outputs.get("decoded") or {}).items():
            features = target["teacher_features"][name]  # [B, T, h, w, C]
            wanted = sample_feature_maps(features, outputs["pixels"], outputs["latent_size"])
            weight = self.config.teacher_loss_weights.get(name, self.config.distill_weight)
            # [B, T]: False for the views of a scene this teacher cannot read (unlabelled_scenes="geometry").
            available = (target.get("teacher_available") or {}).get(name)
            losses[f"distill_{name}"] = weight * masked_cosine_distillation_loss(decoded, wanted, available)
            centred = self.config.centred_loss_weight
            centre = None
            if centred > 0:
                centre = mean_direction(*unit_direction_sum(wanted, available), across_ranks=self.training)
                losses[f"distill_centred_{name}"] = (
                    weight * centred * centred_cosine_distillation_loss(decoded, wanted, centre, available)
                )
            if name in outputs.get("context_decoded", {}):
                context = batch["context"]
                wanted = sample_feature_maps(
                    context["teacher_features"][name],
                    outputs["context_pixels"],
                    tuple(context["images"].shape[2:4]),
                )
                available = (context.get("teacher_available") or {}).get(name)
                context_decoded = outputs["context_decoded"][name]
                context_weight = weight * self.config.context_distill_weight
                losses[f"distill_context_{name}"] = context_weight * masked_cosine_distillation_loss(
                    context_decoded, wanted, available
                )
                if centre is not None:
                    losses[f"distill_context_centred_{name}"] = (
                        context_weight
                        * centred
                        * centred_cosine_distillation_loss(context_decoded, wanted, centre, available)
                    )
        return losses

    @staticmethod
    def _depth_loss(predicted: Float[Tensor, "B V H W"], views: Mapping[str, Any]) -> Tensor:
        """Mean |predicted - sensor| / sensor over the pixels with a measurement (0 where none)."""
        sensor = views["depth"].to(predicted.dtype)
        valid = (sensor > 0).to(predicted.dtype)
        # A masked mean (0 where nothing is measured) rather than boolean indexing, which reads the count back to
        # the host every step.
        error = (predicted - sensor).abs() / sensor.clamp_min(1e-3)
        return (error * valid).sum() / valid.sum().clamp_min(1.0)

    @torch.no_grad()
    def image_metrics(self, outputs, batch) -> Dict[str, float]:
        """PSNR, SSIM, LPIPS (when available) at the target views; depth AbsRel and delta < 1.25 of the rendered
        target depth and of the predicted context depth against the sensor (scenes with depth)."""
        rendered: RenderedViews = outputs["rendered"]
        real = (batch["target"]["images"].float() / 255.0).flatten(0, 1).permute(0, 3, 1, 2)
        pred = rendered.rgb.flatten(0, 1).permute(0, 3, 1, 2).clamp(0, 1)
        metrics = {
            "psnr": float(self.psnr(pred, real)),
            "ssim": float(self.ssim(pred, real)),
        }
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips(pred, real))
        for name, predicted, views in (
            ("target", rendered.depth, batch["target"]),
            ("context", outputs["gaussians"].depth, batch["context"]),
        ):
            metrics.update({f"{name}_{k}": v for k, v in depth_metrics(predicted, views["depth"]).items()})
        metrics.update(covered_depth_metrics(rendered.depth, rendered.alpha, batch["target"]["depth"]))
        return metrics

    def get_image_metrics_and_images(self, outputs, batch):
        metrics = self.image_metrics(outputs, batch)
        rendered: RenderedViews = outputs["rendered"]
        real = batch["target"]["images"][0, 0].float() / 255.0
        return metrics, {"img": torch.cat([real, rendered.rgb[0, 0]], dim=1)}


def random_pixels(batch: int, views: int, count: int, n: int, device) -> Tensor:
    """[batch, views, n] distinct random flat pixel indices below ``count`` per view."""
    return torch.stack([torch.randperm(count, device=device)[:n] for _ in range(batch * views)]).reshape(
        batch, views, n
    )


def psnr_from_mse(mse: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from their mean squared error (floored so a perfect render stays finite)."""
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def depth_metrics(predicted: Tensor, sensor: Tensor) -> Dict[str, float]:
    """AbsRel (mean |d - d*| / d*) and the fraction with max(d/d*, d*/d) < 1.25, over pixels with d* > 0."""
    valid = sensor > 0
    if not bool(valid.any()):
        return {}
    d, gt = predicted[valid].float().clamp_min(1e-6), sensor[valid].float()
    ratio = torch.maximum(d / gt, gt / d)
    return {
        "depth_abs_rel": float(((d - gt).abs() / gt).mean()),
        "depth_delta1": float((ratio < 1.25).float().mean()),
    }


def covered_depth_metrics(
    predicted: Tensor, alpha: Tensor, sensor: Tensor, threshold: float = 0.5
) -> Dict[str, float]:
    """How much of the measured target pixels the prediction covers (accumulated opacity above ``threshold``:
    ``target_coverage``), and the depth scores over those pixels alone (``target_covered_*``). A pixel no Gaussian
    reaches renders depth 0, an AbsRel of 1 in ``depth_metrics``: these separate what the context views never saw
    from how well the depth of what they saw is predicted."""
    measured = sensor > 0
    if not bool(measured.any()):
        return {}
    covered = alpha > threshold
    scores = {"target_coverage": float((covered & measured).sum() / measured.sum())}
    inside = depth_metrics(predicted, torch.where(covered, sensor, torch.zeros_like(sensor)))
    scores.update({f"target_covered_{k}": v for k, v in inside.items()})
    return scores


def sample_feature_maps(
    features: Float[Tensor, "B T h w C"], pixels: Tensor, image_size: Tuple[int, int]
) -> Float[Tensor, "B T n C"]:
    """Teacher features at image pixels (flat indices into ``image_size``), bilinear in the teacher's grid (pixel
    centres; the grid covers the whole image)."""
    batch, views, h, w, channels = features.shape
    height, width = image_size
    rows, cols = pixels // width, pixels % width
    grid = torch.stack(((cols + 0.5) * (2.0 / width) - 1.0, (rows + 0.5) * (2.0 / height) - 1.0), dim=-1)
    maps = features.flatten(0, 1).permute(0, 3, 1, 2).float()  # [B*T, C, h, w]
    sampled = F.grid_sample(
        maps, grid.flatten(0, 1)[:, None].float(), mode="bilinear", padding_mode="border", align_corners=False
    )  # [B*T, C, 1, n]
    return sampled[:, :, 0].permute(0, 2, 1).reshape(batch, views, -1, channels)


def restore_semantic_splat(config_path: Path, device: str = "cpu") -> SemanticSplatModel:
    """A trained semantic-splat model from its run's ``config.yml`` and latest checkpoint, without its collection
    (predicting on a new scene needs neither the datamanager nor its data)."""
    return restore_network_model(config_path, "ns-train semantic-splat", device)  # type: ignore[return-value]


def restore_network_model(config_path: Path, trained_by: str, device: str = "cpu") -> Model:
    """The model of a feed-forward run (semantic-splat, chorus-pretrain) from its ``config.yml`` and latest
    checkpoint, without its collection: the teachers, their channels and the heads come from the checkpoint itself
    (each head's output size is its teacher's channel count). ``trained_by`` names the command for messages."""
    import yaml
    from nerfstudio.data.scene_box import SceneBox

    from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints, load_torch_file

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} does not exist: give the run's config.yml (from {trained_by})"
        )
    trainer_config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    folder = config_path.parent / "nerfstudio_models"
    checkpoints = sorted(folder.glob("step-*.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"{folder} holds no checkpoint of the run {config_path} ({trained_by})")
    allow_numpy_scalars_in_checkpoints()
    state = load_torch_file(
        checkpoints[-1], what="checkpoint", remedy="Train the run again.", not_written_by=trained_by
    )["pipeline"]
    prefix = "_model.module." if any(k.startswith("_model.module.") for k in state) else "_model."
    model_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    specs = {
        name: TeacherSpec(name, head.feature_dim, (0, 0), (0, 0), False, None)  # type: ignore[arg-type]
        for name, head in heads_from_state_dict(model_state, "projector_heads.").items()
    }
    model = trainer_config.pipeline.model.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])),
        num_train_data=0,
        metadata={TEACHER_SPECS_KEY: specs},
        device=device,
    )
    model.load_state_dict(model_state)
    return model.to(device).eval()
