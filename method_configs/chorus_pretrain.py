"""``chorus-pretrain``: the Chorus scene encoder over 3D Gaussians, pretrained across scene collections.

    ns-train chorus-pretrain --data COLLECTION            # each scene's gaussians.ply, else its seed points
    ns-train chorus-pretrain --data COLLECTION --machine.num-devices 4   # DistributedDataParallel over 4 GPUs
    ns-eval --load-config outputs/.../config.yml --output-path eval.json   # held-out scenes

Adam at 1e-3 for the encoder and the projector heads (chorus-splat's head rate), 500 warm-up steps, cosine decay.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import CosineDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints
from splatsem_ns.engine.trainer import ChorusTrainerConfig
from splatsem_ns.pipelines.chorus_pretrain_pipeline import ChorusPretrainPipelineConfig
from splatsem_ns.viewer.address import LOOPBACK

allow_numpy_scalars_in_checkpoints()

MAX_STEPS = 100000
LEARNING_RATES = {"encoder": 1e-3, "projector_heads": 1e-3}
"""Peak learning rate of each parameter group (``ChorusPretrainModel.get_param_groups``)."""


chorus_pretrain = MethodSpecification(
    config=ChorusTrainerConfig(
        method_name="chorus-pretrain",
        steps_per_eval_image=1000,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=100000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,
        pipeline=ChorusPretrainPipelineConfig(),
        optimizers={
            name: {
                "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
                "scheduler": CosineDecaySchedulerConfig(
                    warm_up_end=500, learning_rate_alpha=0.05, max_steps=MAX_STEPS
                ),
            }
            for name, lr in LEARNING_RATES.items()
        },
        viewer=ViewerConfig(websocket_host=LOOPBACK),
        vis="tensorboard",
    ),
    description="The Chorus scene encoder: a sparse 3D network over Gaussians, pretrained across scene collections "
    "by rendering its latents into views and distilling 2D teachers through per-teacher projectors.",
)
