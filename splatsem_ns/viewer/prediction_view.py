"""The viewer on a semantic-splat run: the Gaussians predicted for one scene from chosen context views.

    ns-viewer --load-config outputs/.../semantic-splat/.../config.yml        # the first held-out scene
    splatsem-viewer --load-config .../config.yml --scene proc_000123 --context-views 3 7

A semantic-splat run is a network, not a scene. Restored by a viewer, its pipeline predicts one scene of its
collection (``--scene``, default the first held-out one) from context views (``--context-views``, default the
datamanager's seeded choice) and shows the prediction as a chorus-splat model seeded with it: the same seeding as
feed-forward init (``pipelines/feedforward_init.py``), here in the scene's metric frame and without optimisation.
So the viewer, the semantic query panel, click-to-segment and "Export selection" work exactly as on a chorus-splat
run; the camera frustums are the context views.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor, nn

from splatsem_ns.data.dataparser import CLASS_NAMES_KEY
from splatsem_ns.export.semantic_ply import GaussianColumns
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY, Teacher, TeacherConfig

VIEWER_COMMANDS = ("ns-viewer", "splatsem-viewer")
"""Commands whose restored semantic-splat pipeline shows a prediction (``ns-eval`` scores the network instead)."""

REQUEST: Dict[str, Any] = {}
"""``scene`` and ``context_views`` chosen on splatsem-viewer's command line (ns-viewer has no such options)."""


@dataclass
class PredictionViewConfig:
    """Which prediction a viewer shows of a semantic-splat run."""

    scene: Optional[str] = None
    """Scene of the run's collection (default: the first held-out scene, else the first training scene)."""
    context_views: Tuple[int, ...] = ()
    """Context view indices of that scene (default: the datamanager's choice, seeded by the scene)."""
    min_opacity: float = 0.05
    """Predicted Gaussians below this opacity are left out of the view (one Gaussian per pixel is mostly
    transparent where views overlap)."""


def launched_by_viewer(argv: Sequence[str] = ()) -> bool:
    """Whether this process is one of ``VIEWER_COMMANDS``."""
    argv = argv or sys.argv
    return bool(argv) and Path(argv[0]).name in VIEWER_COMMANDS


class ContextViews:
    """What nerfstudio's viewer reads of a training dataset (its camera frustums): length, images and cameras."""

    def __init__(self, images: Tensor, cameras: Cameras) -> None:
        self.images = images  # uint8 [V, H, W, 3]
        self.cameras = cameras

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return {"image": self.images[index].float() / 255.0, "image_idx": torch.tensor(index)}


class PredictionViewDataManager(nn.Module):
    """What the viewer and the query panel read of a datamanager, for one predicted scene."""

    includes_time = False

    def __init__(
        self,
        scene_path: Path,
        views: ContextViews,
        teacher_configs: Sequence[TeacherConfig],
        class_names: Dict[int, str],
    ) -> None:
        super().__init__()
        self.scene_path = scene_path
        self.train_dataset = views
        self.eval_dataset = None
        self._teacher_configs = list(teacher_configs)
        self.train_dataparser_outputs = SimpleNamespace(metadata={CLASS_NAMES_KEY: dict(class_names)})

    def get_datapath(self) -> Path:
        return self.scene_path

    def teacher_configs(self) -> List[TeacherConfig]:
        return list(self._teacher_configs)

    def build_teacher(self, config: TeacherConfig) -> Teacher:
        return config.setup()


def context_cameras(intrinsics: Tensor, camera_to_world: Tensor, height: int, width: int) -> Cameras:
    """nerfstudio cameras of served views (pixel intrinsics [V, 3, 3], OpenGL camera-to-world [V, 4, 4])."""
    return Cameras(
        camera_to_worlds=camera_to_world[:, :3, :4].float().cpu(),
        fx=intrinsics[:, 0, 0:1].float().cpu(),
        fy=intrinsics[:, 1, 1:2].float().cpu(),
        cx=intrinsics[:, 0, 2:3].float().cpu(),
        cy=intrinsics[:, 1, 2:3].float().cpu(),
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    )


def prediction_columns(gaussians: PredictedGaussians, min_opacity: float) -> GaussianColumns:
    """Scene 0 of a prediction as splatfacto-shaped columns (log scales, logit opacities), its transparent
    Gaussians left out."""
    keep = gaussians.opacities[0] >= min_opacity
    if not bool(keep.any()):
        raise ValueError(f"The prediction has no Gaussian above opacity {min_opacity}.")
    return GaussianColumns(
        means=gaussians.means[0][keep],
        scales=torch.log(gaussians.scales[0][keep]),
        quats=gaussians.quats[0][keep],
        opacities=torch.logit(gaussians.opacities[0][keep], eps=1e-6)[:, None],
        features_dc=gaussians.features_dc[0][keep],
        features_rest=gaussians.features_rest[0][keep][:, :0],
        latent=gaussians.latent[0][keep],
    )


def prediction_model(
    network_model: nn.Module, gaussians: PredictedGaussians, min_opacity: float
) -> nn.Module:
    """A chorus-splat model (eval mode, in the scene's metric frame) holding a semantic-splat prediction and the
    network's projector heads."""
    from splatsem_ns.models.chorus_splat import ChorusSplatModelConfig
    from splatsem_ns.pipelines.feedforward_init import seed_chorus_model

    columns = prediction_columns(gaussians, min_opacity)
    # SH colours (chorus-splat's degree-0 mode would read features_dc as a sigmoid logit instead); the higher
    # bands are zero, as the network predicts degree 0 by default.
    config = ChorusSplatModelConfig(background_color="black")
    config.semantic_source.latent_dim = int(columns.latent.shape[1])
    means = columns.means.detach().cpu()
    low, high = means.min(dim=0).values, means.max(dim=0).values
    model = config.setup(
        scene_box=SceneBox(aabb=torch.stack([low, high])),
        num_train_data=1,
        metadata={TEACHER_SPECS_KEY: dict(network_model.teacher_specs)},
        seed_points=(means, torch.zeros(0, 3, dtype=torch.uint8)),
        device=str(network_model.device),
    )
    seed_chorus_model(model, columns, dict(network_model.projector_heads.items()))
    # Behind the Gaussians, the colour the network was trained to render over.
    model.set_background(torch.tensor(network_model.config.background_color, dtype=torch.float32))
    return model.to(network_model.device).eval()


def show_prediction(pipeline: Any, view: PredictionViewConfig) -> Tuple[str, List[int]]:
    """Replace a restored semantic-splat pipeline's model and datamanager by the prediction view (see the module
    docstring). Returns the scene and context views shown."""
    from splatsem_ns.viewer.query_panel import SemanticQueryPanel

    network_model, datamanager = pipeline.model, pipeline.datamanager
    served, scene, context, folder = pipeline.context_views(view.scene, list(view.context_views) or None)
    gaussians = pipeline.predict_views(served)
    height, width = served["images"].shape[1:3]
    cameras = context_cameras(served["intrinsics"], served["camera_to_world"], int(height), int(width))
    specs = network_model.teacher_specs
    shown = PredictionViewDataManager(
        folder,
        ContextViews(served["images"], cameras),
        [spec.config for spec in specs.values() if spec.config is not None],
        datamanager.collection.classes,
    )
    model = prediction_model(network_model, gaussians, view.min_opacity)
    pipeline._model = model
    pipeline.datamanager = shown
    pipeline.semantic_query = SemanticQueryPanel.for_pipeline(pipeline)
    model.output_hooks.append(pipeline.semantic_query.output_hook)
    CONSOLE.log(
        f"Showing the semantic-splat prediction for scene {scene} from context views {context} "
        f"({model.num_points} Gaussians above opacity {view.min_opacity}). Another one: splatsem-viewer "
        "--load-config CONFIG --scene NAME --context-views I J"
    )
    return scene, context
