"""The semantic-splat pipeline: a multi-scene datamanager feeding the feed-forward model, and its evaluation.

Training steps take a batch of (scene, context, target) samples; under DistributedDataParallel (``ns-train
semantic-splat --machine.num-devices N``) the model is wrapped as nerfstudio wraps its models and each rank draws
its own share of the sample stream (the datamanager shards by rank).

``ns-eval`` scores held-out scenes (the datamanager's eval split), one fixed sample each:
- image and depth: PSNR / SSIM / LPIPS at the target views, depth AbsRel and delta < 1.25 of the rendered target
  depth and of the predicted context depth against the sensor;
- 2D segmentation where the scenes have per-pixel labels, with the confusion-matrix protocol of chorus-splat, at the
  target and at the source (context) views, against two baselines computed on the same pixels: the teacher run on
  the view itself (its cached features), and the teacher's context-view features carried to the target by the
  predicted geometry (each predicted Gaussian rendered with its context pixel's teacher feature). Also, at the
  context views, each pixel's own latent decoded before rendering (``semantic_2d_context_latent``): the semantic
  branch's score with geometry taken out, so a low source-view score splits into what the branch gets wrong and
  what the predicted depth then blends away.
- ceilings of the chosen views, with the network taken out (scenes whose context views have depth;
  ``feedforward.sensor_depth``): the context pixels placed at their sensor depth and rendered into the targets give
  ``sensor_depth_psnr`` and ``sensor_depth_coverage`` (and the network's PSNR over the covered pixels alone,
  ``psnr_where_views_see``), and, carrying their teacher features, the teacher warped by the sensor's depth
  (``semantic_2d_teacher_sensor_warped_target``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes
from nerfstudio.pipelines.base_pipeline import Pipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from torch.nn import Parameter
from torch.nn.parallel import DistributedDataParallel as DDP

from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
from splatsem_ns.data.view_sampling import choose_views
from splatsem_ns.evaluation.metrics import ConfusionMatrix
from splatsem_ns.evaluation.protocol import (
    SemanticEvalConfig,
    accumulate_2d,
    class_queries,
    classify_map,
    score,
)
from splatsem_ns.feedforward.gaussians import PredictedGaussians
from splatsem_ns.feedforward.render import RenderedViews, render_predicted
from splatsem_ns.feedforward.sensor_depth import sensor_depth_gaussians
from splatsem_ns.models.heads import resize_feature_map
from splatsem_ns.models.semantic_splat import SemanticSplatModelConfig, psnr_from_mse
from splatsem_ns.teachers.base import TEACHER_SPECS_KEY
from splatsem_ns.viewer import prediction_view
from splatsem_ns.viewer.prediction_view import PredictionViewConfig


@dataclass
class SemanticSplatPipelineConfig(VanillaPipelineConfig):
    """Multi-scene data, the feed-forward model, and held-out evaluation."""

    _target: Type = field(default_factory=lambda: SemanticSplatPipeline)
    datamanager: MultiSceneDataManagerConfig = field(default_factory=MultiSceneDataManagerConfig)
    """Samples of scene collections."""
    model: SemanticSplatModelConfig = field(default_factory=SemanticSplatModelConfig)
    """The feed-forward network and its losses."""
    semantic_eval: SemanticEvalConfig = field(default_factory=SemanticEvalConfig)
    """Segmentation protocol (class table, query teacher)."""
    eval_scenes: Optional[int] = None
    """Score at most this many held-out scenes in ns-eval (None: all of the eval split)."""
    eval_views: Literal["target", "both"] = "both"
    """Segmentation at the target views only, or at the source (context) views too."""
    viewer: PredictionViewConfig = field(default_factory=PredictionViewConfig)
    """The prediction ns-viewer shows of this run (splatsem-viewer's --scene and --context-views override it)."""


class SemanticSplatPipeline(Pipeline):
    """See the module docstring."""

    config: SemanticSplatPipelineConfig

    def __init__(
        self,
        config: SemanticSplatPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.test_mode = test_mode
        self.world_size = world_size
        self.datamanager = config.datamanager.setup(
            device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank
        )
        specs = self.datamanager.teacher_specs() if self.datamanager.fingerprints else {}
        self._model = config.model.setup(
            scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])),
            num_train_data=len(self.datamanager.train_scenes),
            metadata={TEACHER_SPECS_KEY: specs},
            device=device,
            grad_scaler=grad_scaler,
        )
        self.model.to(device)
        if world_size > 1:
            ids = [local_rank] if torch.device(device).type == "cuda" else None
            self._model = DDP(self._model, device_ids=ids, find_unused_parameters=True)

    # ------------------------------------------------------------------ training
    def get_train_loss_dict(self, step: int):
        _, batch = self.datamanager.next_train(step)
        outputs = self._model(batch)  # through DDP when distributed, so the gradients are averaged
        metrics = self.model.get_metrics_dict(outputs, batch)
        return outputs, self.model.get_loss_dict(outputs, batch, metrics), metrics

    @torch.no_grad()
    def get_eval_loss_dict(self, step: int):
        self.eval()
        _, batch = self.datamanager.next_eval(step)
        outputs = self.model(batch)
        metrics = self.model.get_metrics_dict(outputs, batch)
        losses = self.model.get_loss_dict(outputs, batch, metrics)
        self.train()
        return outputs, losses, metrics

    @torch.no_grad()
    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        _, batch = self.datamanager.next_eval(step)
        metrics, images = self.model.get_image_metrics_and_images(self.model(batch), batch)
        self.train()
        return metrics, images

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        return self.model.get_training_callbacks(training_callback_attributes)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        return self.model.get_param_groups()

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        # Pipeline.load_state_dict drops the "module." prefix of checkpoints written under DDP, so a multi-GPU
        # checkpoint loads on one GPU or the CPU.
        self.model.update_to_step(step)
        self.load_state_dict(loaded_state)
        if self.test_mode == "test" and prediction_view.launched_by_viewer():
            # ns-viewer restores the network; what it can show is one predicted scene (viewer/prediction_view.py).
            request = {k: v for k, v in prediction_view.REQUEST.items() if v is not None and v != ()}
            view = PredictionViewConfig(**{**vars(self.config.viewer), **request})
            prediction_view.show_prediction(self, view)

    # ------------------------------------------------------------------ one scene
    def context_views(
        self, scene: Optional[str] = None, context: Optional[Sequence[int]] = None
    ) -> Tuple[Dict[str, Any], str, List[int], Path]:
        """The served context views of one scene of the collection: (views as the datamanager serves them, scene
        name, context view indices, the scene's folder). ``scene``: a scene name (default: the first of the eval
        split, else of the training split); ``context``: view indices (default: the datamanager's choice, seeded by
        the scene)."""
        dm = self.datamanager
        datasets = [d for d in (dm.eval_dataset, dm.train_dataset) if d is not None]
        found = [(d, i) for d in datasets for i, e in enumerate(d.scenes) if scene is None or e.name == scene]
        if not found:
            names = sorted({e.name for d in datasets for e in d.scenes})
            raise ValueError(f"scene {scene!r} is not in this run's collection splits; scenes: {names[:20]}")
        dataset, index = found[0]
        if context is None:
            rng = np.random.default_rng([dm.config.seed, index])
            chosen, _ = choose_views(dataset.overlap(index), dm.config.views, rng)
            context = [int(i) for i in chosen]
        entry = dataset.scenes[index]
        return dataset.views(index, list(context)), entry.name, list(context), dm.collection.scene_path(entry)

    @torch.no_grad()
    def predict_views(self, views: Mapping[str, Any]) -> PredictedGaussians:
        """The prediction from served context views (``context_views``)."""
        self.eval()
        return self.model.predict(_to_batch({"context": views}, self.model.device)["context"])

    def predict_scene(
        self, scene: Optional[str] = None, context: Optional[Sequence[int]] = None
    ) -> Tuple[PredictedGaussians, str, List[int]]:
        """The prediction for one scene of the collection from chosen context views: (Gaussians, scene name,
        context view indices); see ``context_views``."""
        views, name, context, _ = self.context_views(scene, context)
        return self.predict_views(views), name, context

    # ------------------------------------------------------------------ evaluation
    def scenes_to_score(self) -> Tuple[Any, int]:
        """The held-out dataset and how many of its scenes ns-eval scores (sample i of epoch 0 is scene i)."""
        dataset = self.datamanager.eval_dataset
        if dataset is None:
            raise ValueError(
                f"{self.datamanager.config.data} has no usable '{self.datamanager.config.eval_split}' scenes to score"
            )
        limit = self.config.eval_scenes
        return dataset, len(dataset.scenes) if limit is None else min(limit, len(dataset.scenes))

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, Any]:
        """Image, depth and segmentation scores over the held-out scenes (see the module docstring)."""
        dataset, count = self.scenes_to_score()
        self.eval()
        segmentation = _Segmentation(self) if self._can_segment() else None
        per_scene: List[Dict[str, float]] = []
        for sample_id in range(count):  # sample i of epoch 0 is scene i of the eval order: every scene once
            sample = dataset[sample_id]
            batch = _to_batch(sample, self.model.device)
            outputs = self.model(batch)
            scores = self.model.image_metrics(outputs, batch)
            sensor = self._sensor_depth_render(batch, segmentation)
            if sensor is not None:
                scores.update(sensor_depth_scores(sensor, batch["target"], outputs["rendered"]))
            scores["scene"] = sample["scene"]  # type: ignore[assignment]
            per_scene.append(scores)
            if segmentation is not None and bool(batch["target"]["has_labels"].all()):
                segmentation.begin_scene()
                segmentation.add(batch, outputs, sensor)
                # This scene's own counts, so a report can score any subset of scenes exactly (the per-scene
                # baseline of benchmarks/context_baseline.py pools the same scenes).
                scores["target_confusion"] = segmentation.scene_matrix.counts()  # type: ignore[union-attr]
        self.train()
        numeric = sorted({k for s in per_scene for k, v in s.items() if isinstance(v, float)})
        result: Dict[str, Any] = {k: float(np.mean([s[k] for s in per_scene if k in s])) for k in numeric}
        if get_std:
            result.update({f"{k}_std": float(np.std([s[k] for s in per_scene if k in s])) for k in numeric})
        result["num_scenes"] = len(per_scene)
        result["per_scene"] = per_scene
        if segmentation is not None:
            result.update(segmentation.scores())
        return result

    def _sensor_depth_render(
        self, batch: Mapping[str, Any], segmentation: Optional["_Segmentation"]
    ) -> Optional[RenderedViews]:
        """The target views rendered from the context pixels at their sensor depth (``feedforward.sensor_depth``),
        with the query teacher's per-pixel features as the latent when segmenting; None without context depth."""
        context, target = batch["context"], batch["target"]
        has_depth = context.get("has_depth")
        if has_depth is None or not bool(torch.as_tensor(has_depth).all()):
            return None
        height, width = (int(s) for s in target["images"].shape[2:4])
        latent = None
        if segmentation is not None:
            latent = segmentation.teacher_per_pixel(context, tuple(context["images"].shape[2:4]))[None]
        return render_predicted(
            sensor_depth_gaussians(context, latent),
            target["intrinsics"],
            target["camera_to_world"],
            width,
            height,
            render_latent=latent is not None,
        )

    def _can_segment(self) -> bool:
        specs = getattr(self.model, "teacher_specs", {}) or {}
        return bool(self.datamanager.collection.classes) and any(s.has_text_encoder for s in specs.values())


def _to_batch(sample: Mapping[str, Any], device) -> Dict[str, Any]:
    """One dataset sample as a batch of one, on ``device``."""
    from splatsem_ns.data.multiscene import to_device
    from splatsem_ns.data.scene_gaussians import collate_samples

    return to_device(collate_samples([sample]), device)


class _Segmentation:
    """The 2D segmentation protocol over held-out samples: the model at target (and source) views, the teacher on
    the target view itself, and the teacher's context features carried to the target by the predicted Gaussians."""

    def __init__(
        self,
        pipeline: SemanticSplatPipeline,
        keys: Tuple[str, ...] = (
            "target",
            "source",
            "context_latent",
            "teacher_target",
            "teacher_warped_target",
            "teacher_sensor_warped_target",
        ),
    ) -> None:
        self.pipeline = pipeline
        model = pipeline.model
        cfg = pipeline.config.semantic_eval
        specs = model.teacher_specs
        wanted = cfg.query_teacher
        names = [n for n, s in specs.items() if s.has_text_encoder and (wanted is None or n == wanted)]
        if not names:
            raise ValueError(
                f"no teacher with a text encoder{f' named {wanted}' if wanted else ''} to segment with"
            )
        self.teacher_name = names[0]
        teacher = specs[self.teacher_name].config.setup().to(model.device).eval()
        classes = pipeline.datamanager.collection.classes
        self.ids, self.names = class_queries(classes)
        self.text = teacher.encode_text(self.names).float().to(model.device)
        self.cfg = cfg
        k = len(self.ids)
        self.matrices = {key: ConfusionMatrix(k) for key in keys}
        self.scene_matrix: Optional[ConfusionMatrix] = None
        """The "target" counts of the current scene alone (``begin_scene``)."""
        CONSOLE.log(f"Segmentation with teacher '{self.teacher_name}' over {k} classes.")

    def begin_scene(self) -> None:
        """Start counting the next scene's "target" views on their own as well (``scene_matrix``)."""
        self.scene_matrix = ConfusionMatrix(len(self.ids))

    def add_view(self, key: str, features: torch.Tensor, truth: torch.Tensor) -> None:
        """One view's ``[H, W, C]`` features (in the query teacher's space) classified against its labels, into the
        ``key`` confusion matrix (and, for "target", the current scene's)."""
        predicted = classify_map(features, self.text, self.ids)
        accumulate_2d(self.matrices[key], predicted, truth.long(), self.ids)
        if key == "target" and self.scene_matrix is not None:
            accumulate_2d(self.scene_matrix, predicted, truth.long(), self.ids)

    def add_targets(self, target: Mapping[str, Any], latents: torch.Tensor) -> None:
        """The target views of a batch of one: the model's rendered ``[T, H, W, D]`` latents decoded by the query
        teacher's head ("target"), and the teacher's own features of those views ("teacher_target")."""
        head = self.pipeline.model.projector_heads[self.teacher_name]
        size = tuple(target["images"].shape[2:4])
        for v in range(target["images"].shape[1]):
            truth = target["labels"][0, v]
            self.add_view("target", head(latents[v]), truth)
            own = target["teacher_features"][self.teacher_name][0, v].float()
            self.add_view("teacher_target", resize_feature_map(own, size), truth)

    def add(
        self, batch: Mapping[str, Any], outputs: Mapping[str, Any], sensor: Optional[RenderedViews] = None
    ) -> None:
        """One held-out sample: the model's renders (``outputs``) and the baselines; ``sensor``: the targets rendered
        from the context pixels at their sensor depth, carrying the query teacher's features (scored as
        "teacher_sensor_warped_target")."""
        model = self.pipeline.model
        target = batch["target"]
        gaussians: PredictedGaussians = outputs["gaussians"]
        self.add_targets(target, outputs["rendered"].latent[0])
        warped = self._warped_teacher(gaussians, batch, tuple(target["images"].shape[2:4]))
        for v in range(warped.shape[0]):
            self.add_view("teacher_warped_target", warped[v], target["labels"][0, v])
        if sensor is not None and sensor.latent is not None:
            for v in range(sensor.latent.shape[1]):
                self.add_view("teacher_sensor_warped_target", sensor.latent[0, v], target["labels"][0, v])
        if self.pipeline.config.eval_views == "both":
            context = batch["context"]
            source = model.render(gaussians, context)
            head = model.projector_heads[self.teacher_name]
            # Each context pixel's own latent (one Gaussian per pixel, in pixel order): no rendering, no geometry.
            own = gaussians.latent[0].unflatten(0, tuple(context["images"].shape[1:4]))  # [V, H, W, D]
            for v in range(context["images"].shape[1]):
                self.add_view("source", head(source.latent[0, v]), context["labels"][0, v])
                self.add_view("context_latent", head(own[v]), context["labels"][0, v])

    def _warped_teacher(self, gaussians: PredictedGaussians, batch: Mapping[str, Any], size) -> torch.Tensor:
        """The context views' teacher features carried to the target views by the predicted geometry: each
        Gaussian (one per context pixel) rendered with its pixel's teacher feature instead of its latent."""
        context, target = batch["context"], batch["target"]
        per_pixel = self.teacher_per_pixel(context, size).flatten(0, 2)  # [V*H*W, C]
        carried = PredictedGaussians(**{**vars(gaussians), "latent": per_pixel[None]})
        rendered = render_predicted(
            carried, target["intrinsics"], target["camera_to_world"], size[1], size[0], render_latent=True
        )
        return rendered.latent[0]  # [T, H, W, C]

    def teacher_per_pixel(self, views: Mapping[str, Any], size: Tuple[int, int]) -> torch.Tensor:
        """The query teacher's features of the first scene's views, resized to ``size``: [V, H, W, C]."""
        features = views["teacher_features"][self.teacher_name][0].float()  # [V, h, w, C]
        return torch.stack([resize_feature_map(f, size) for f in features])

    def scores(self) -> Dict[str, Any]:
        names = self.names
        out: Dict[str, Any] = {"semantic_query_teacher": self.teacher_name, "semantic_classes": names}
        for key, matrix in self.matrices.items():
            if matrix.matrix.sum() > 0:
                out[f"semantic_2d_{key}"] = score(matrix, names, self.cfg)
        return out


def sensor_depth_scores(
    sensor: RenderedViews, target: Mapping[str, Any], predicted: Optional[RenderedViews] = None
) -> Dict[str, float]:
    """PSNR of the targets rendered from the context pixels at their sensor depth, and the fraction of target pixels
    they cover (accumulated opacity above 0.5): what the chosen views allow, network aside. With the network's own
    renders (``predicted``), also its PSNR over those covered pixels alone (``psnr_where_views_see``): how well it
    renders what the context could show, apart from the target pixels nothing in the context reaches."""
    real = target["images"].float()[..., :3] / 255.0

    def psnr(rendered: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
        error = (rendered.clamp(0, 1) - real) ** 2
        if mask is None:
            mse = error.mean()
        else:  # the mean over the masked pixels' channels
            weight = mask[..., None].to(error.dtype)
            mse = (error * weight).sum() / (3.0 * weight.sum()).clamp_min(1.0)
        return float(psnr_from_mse(mse))

    covered = sensor.alpha > 0.5
    scores = {"sensor_depth_psnr": psnr(sensor.rgb), "sensor_depth_coverage": float(covered.float().mean())}
    if predicted is not None and bool(covered.any()):
        scores["psnr_where_views_see"] = psnr(predicted.rgb, covered)
    return scores
