"""``semantic-splat``: feed-forward semantic Gaussians from a few posed views, trained across scene collections.

    ns-train semantic-splat --data COLLECTION            # a collection.json (splatsem-synthetic --num-scenes, or
                                                         # splatsem-collection over real scenes)
    ns-train semantic-splat --data COLLECTION --machine.num-devices 4   # DistributedDataParallel over 4 GPUs
    ns-eval --load-config outputs/.../config.yml --output-path eval.json   # held-out scenes

Optimisation follows MVSplat for the reconstruction (Adam at 2e-4, linear warm-up, cosine decay), one group per
part of the network; the semantic branch and the projector heads learn at 1e-3, as chorus-splat's heads do: at
2e-4 they sit on the teacher's mean feature for hundreds of steps, decoding every pixel as the most common class
(on the labels proxy, 100 CPU steps of the tiny network reached 17.2 source-view mIoU at 3e-3 against 8.5 at
1e-3).
The warm-up is 500 steps, so that short runs are not spent warming up.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import CosineDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from splatsem_ns.checkpoints import allow_numpy_scalars_in_checkpoints
from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
from splatsem_ns.engine.trainer import ChorusTrainerConfig
from splatsem_ns.models.semantic_splat import SemanticSplatModelConfig
from splatsem_ns.pipelines.semantic_splat_pipeline import SemanticSplatPipelineConfig
from splatsem_ns.viewer.address import LOOPBACK

allow_numpy_scalars_in_checkpoints()

MAX_STEPS = 100000
LEARNING_RATES = {
    "network_geometry": 2e-4,
    "network_appearance": 2e-4,
    "network_semantic": 1e-3,
    "projector_heads": 1e-3,
}
"""Peak learning rate of each parameter group (``SemanticSplatModel.get_param_groups``)."""
WARM_UP_STEPS = 500


def _optimizers() -> dict:
    return {
        name: {
            "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
            "scheduler": CosineDecaySchedulerConfig(
                warm_up_end=WARM_UP_STEPS, learning_rate_alpha=0.05, max_steps=MAX_STEPS
            ),
        }
        for name, lr in LEARNING_RATES.items()
    }


semantic_splat = MethodSpecification(
    config=ChorusTrainerConfig(
        method_name="semantic-splat",
        steps_per_eval_image=1000,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=100000,
        max_num_iterations=MAX_STEPS,
        mixed_precision=False,  # the model runs its network in bf16 autocast itself (SemanticSplatModelConfig.bf16)
        pipeline=SemanticSplatPipelineConfig(
            datamanager=MultiSceneDataManagerConfig(),
            model=SemanticSplatModelConfig(),
        ),
        optimizers=_optimizers(),
        viewer=ViewerConfig(websocket_host=LOOPBACK),
        vis="tensorboard",
    ),
    description="Feed-forward semantic Gaussians from 2-8 posed views (SemanticSplat's cost-volume branch: MVSplat "
    "backbone, multi-teacher semantic heads), trained across scene collections.",
)
