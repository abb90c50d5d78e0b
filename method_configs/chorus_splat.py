"""``chorus-splat``: splatfacto's recipe plus multi-teacher semantic distillation.

The optimizer settings are splatfacto's (nerfstudio 1.1.5) for the Gaussians, plus one group for the
per-Gaussian semantic latent and one for the projector heads. Every group uses torch's fused Adam (same
algorithm and hyperparameters, one kernel per group; see splatsem_ns.engine.optimizers).
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints
from splatsem_ns.data.datamanager import ChorusDataManagerConfig
from splatsem_ns.engine.optimizers import FusedAdamOptimizerConfig as AdamConfig
from splatsem_ns.engine.trainer import ChorusTrainerConfig
from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig
from splatsem_ns.pipelines.chorus_pipeline import ChorusPipelineConfig
from splatsem_ns.viewer.address import LOOPBACK

# Every ns-* command imports this module through the entry point, before any checkpoint is read.
allow_numpy_scalars_in_checkpoints()

MAX_STEPS = 30000


def _gaussian_optimizers() -> dict:
    """splatfacto's per-parameter optimizers, plus the semantic latent and the projector heads."""
    return {
        "means": {
            "optimizer": AdamConfig(lr=1.6e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=MAX_STEPS),
        },
        "features_dc": {"optimizer": AdamConfig(lr=0.0025, eps=1e-15), "scheduler": None},
        "features_rest": {"optimizer": AdamConfig(lr=0.0025 / 20, eps=1e-15), "scheduler": None},
        "opacities": {"optimizer": AdamConfig(lr=0.05, eps=1e-15), "scheduler": None},
        "scales": {"optimizer": AdamConfig(lr=0.005, eps=1e-15), "scheduler": None},
        "quats": {"optimizer": AdamConfig(lr=0.001, eps=1e-15), "scheduler": None},
        "camera_opt": {
            "optimizer": AdamConfig(lr=1e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=5e-7, max_steps=MAX_STEPS, warmup_steps=1000, lr_pre_warmup=0
            ),
        },
        "bilateral_grid": {
            "optimizer": AdamConfig(lr=2e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(
                lr_final=1e-4, max_steps=MAX_STEPS, warmup_steps=1000, lr_pre_warmup=0
            ),
        },
        # The latent is a free embedding, so it takes a feature-splatting-like rate, far above colour's.
        "semantic_latent": {"optimizer": AdamConfig(lr=0.01, eps=1e-15), "scheduler": None},
        "projector_heads": {
            "optimizer": AdamConfig(lr=1e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=MAX_STEPS),
        },
        # Only with --pipeline.model.semantic-source.kind encoder: fine-tuning a pretrained encoder, gently.
        "semantic_encoder": {
            "optimizer": AdamConfig(lr=1e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-5, max_steps=MAX_STEPS),
        },
    }


chorus_splat = MethodSpecification(
    config=ChorusTrainerConfig(
        method_name="chorus-splat",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=ChorusPipelineConfig(
            datamanager=ChorusDataManagerConfig(),
            model=ChorusSplatModelConfig(),
        ),
        optimizers=_gaussian_optimizers(),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host=LOOPBACK),  # not nerfstudio's 0.0.0.0
        vis="viewer",
    ),
    description="Gaussian splatting with a per-Gaussian semantic latent distilled from several 2D teachers "
    "(language: SigLIP2/CLIP, generalist: DINOv2/v3, object-aware: SAM).",
)
