"""nerfstudio's VanillaPipeline plus open-vocabulary segmentation metrics in ``ns-eval``.

``ns-eval`` calls ``get_average_eval_image_metrics``: this pipeline returns nerfstudio's image
metrics (PSNR, SSIM, LPIPS when available) and, for scenes with labels, the 2D and 3D segmentation
scores of ``splatsem_ns.evaluation.protocol`` with its two baselines.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Type

import numpy as np
import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image

from splatsem_ns.data.class_tables import class_names
from splatsem_ns.data.dataparser import (
    CLASS_NAMES_KEY,
    DATAPARSER_SCALE_KEY,
    DATAPARSER_TRANSFORM_KEY,
    LABELED_POINTS_KEY,
    scene_depth_scale,
)
from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.evaluation.clicks import ClickEvalConfig, score_clicks
from splatsem_ns.evaluation.metrics import ConfusionMatrix
from splatsem_ns.evaluation.protocol import (
    SemanticEvalConfig,
    accumulate_2d,
    backprojected_teacher_labels,
    class_queries,
    classify_map,
    points_confusion,
    score,
    upsample_labels,
    vote_points_from_gaussians,
)
from splatsem_ns.evaluation.voting import ViewLabels, classify_by_text
from splatsem_ns.pipelines.feedforward_init import FeedforwardInitConfig, predict_seeds, seed_chorus_model
from splatsem_ns.teachers.base import SceneView, Teacher, declared_text_encoder, image_to_float_chw
from splatsem_ns.teachers.labels_teacher import LabelsTeacherConfig, transform_points
from splatsem_ns.viewer.address import exposure_notice
from splatsem_ns.viewer.query_panel import OBJECT_TEACHERS, SemanticQueryPanel


class NoHeldOutViewError(ValueError):
    """ns-eval on a run whose scene holds out no view."""


@dataclass
class ChorusPipelineConfig(VanillaPipelineConfig):
    """VanillaPipeline with semantic evaluation."""

    _target: Type = field(default_factory=lambda: ChorusPipeline)
    semantic_eval: SemanticEvalConfig = field(default_factory=SemanticEvalConfig)
    """Open-vocabulary segmentation protocol used by ns-eval on scenes with labels."""
    click_eval: ClickEvalConfig = field(default_factory=ClickEvalConfig)
    """Click-to-segment protocol used by ns-eval on scenes with instance labels and an object-aware teacher."""
    semantic_eval_during_training: bool = False
    """Also run the segmentation protocol at training's full evaluations (it builds the query teacher)."""
    feedforward_init: Optional[Path] = None
    """A semantic-splat run's config.yml: start from its network's prediction on the training views (Gaussians,
    latents, shared heads) instead of the seed points (splatsem_ns.pipelines.feedforward_init). Off by default:
    whether it helps has not been measured yet."""
    feedforward: FeedforwardInitConfig = field(default_factory=FeedforwardInitConfig)
    """How the prediction seeds the scene (image size, views per prediction, opacity floor, budget)."""


class ChorusPipeline(VanillaPipeline):
    config: ChorusPipelineConfig

    def __init__(self, config: ChorusPipelineConfig, device: str, test_mode="val", **kwargs) -> None:
        # One switch for users: the model's depth loss makes the datamanager serve depth images.
        # None (the default) is "where the scene has depth".
        depth_weight = getattr(config.model, "depth_loss_weight", 0.0)
        if hasattr(config.datamanager, "load_depth"):
            config.datamanager.load_depth = (
                "auto" if depth_weight is None else ("on" if depth_weight > 0 else "off")
            )
        super().__init__(config, device, test_mode, **kwargs)
        # The viewer's semantic query panel: nerfstudio's viewer installs the controls it finds on the pipeline
        # (in ns-viewer and while training); its hook adds the query outputs to eval-mode renders.
        if config.feedforward_init is not None and test_mode == "val":
            self._seed_from_feedforward(Path(config.feedforward_init))
        if hasattr(self.datamanager, "serves_teachers_at") and hasattr(self.model, "is_semantic_step"):
            self.datamanager.serves_teachers_at = self.model.is_semantic_step  # semantic_every
        if hasattr(self.model, "training_image_names") and self.datamanager.train_dataset is not None:
            self.model.training_image_names = [str(p) for p in self.datamanager.train_dataset.image_filenames]
        self.semantic_query = SemanticQueryPanel.for_pipeline(self)
        self.model.output_hooks.append(self.semantic_query.output_hook)
        notice = exposure_notice(sys.argv)  # ns-viewer's address comes from its command line, not this config
        if notice is not None:
            CONSOLE.print(f"[bold yellow]{notice}", soft_wrap=True)

    def _seed_from_feedforward(self, run: Path) -> None:
        """Replace the model's initial Gaussians with a semantic-splat prediction (``feedforward_init``)."""
        dm = self.datamanager
        cameras = dm.train_dataset.cameras
        outputs = dm.train_dataparser_outputs
        seeds, heads = predict_seeds(
            run,
            [np.asarray(data["image"].cpu()) for data in dm.cached_train],
            cameras.get_intrinsics_matrices(),
            cameras.camera_to_worlds,
            outputs.dataparser_transform,
            float(outputs.dataparser_scale),
            self.config.feedforward,
            str(self.model.device),
        )
        seed_chorus_model(self.model, seeds, heads)

    # Evaluation renders the model as trained, whatever the query panel shows or hides.
    def get_eval_loss_dict(self, step: int):
        with self.semantic_query.suspended():
            return super().get_eval_loss_dict(step)

    def get_eval_image_metrics_and_images(self, step: int):
        with self.semantic_query.suspended():
            return super().get_eval_image_metrics_and_images(step)

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        if not self.datamanager.eval_dataset:  # nerfstudio would fail with a bare IndexError
            raise NoHeldOutViewError(
                "This run has no held-out view to evaluate: its scene's split put every view in training (a "
                "capture with a single view, --pipeline.datamanager.dataparser.train-split-fraction 1, or split "
                "files without a val/test list). Train again with at least one held-out view."
            )
        with self.semantic_query.suspended():
            metrics = super().get_average_eval_image_metrics(step, output_path, get_std)
        if self.test_mode == "val" and not self.config.semantic_eval_during_training:
            return metrics
        metrics.update(self.semantic_metrics())
        return metrics

    # ------------------------------------------------------------------ protocol
    def _query_teacher(self) -> Teacher:
        configs = self.datamanager.teacher_configs()
        wanted = self.config.semantic_eval.query_teacher
        for cfg in configs:
            # Teachers whose class declares no text encoder are never built just to find that out.
            if cfg.name == wanted or (wanted is None and declared_text_encoder(cfg) is not False):
                teacher = self.datamanager.build_teacher(cfg)
                if teacher.has_text_encoder:
                    return teacher
                if wanted is not None:
                    raise ValueError(f"Teacher '{wanted}' has no text encoder and cannot answer queries.")
        raise ValueError(
            f"None of the teachers {[c.name for c in configs]} has a text encoder"
            + (f" or is named '{wanted}'" if wanted else "")
            + "; open-vocabulary segmentation needs one."
        )

    @torch.no_grad()
    def semantic_metrics(self, clicks: bool = True) -> Dict:
        """Scores of the protocol (see splatsem_ns.evaluation.protocol), keyed for ns-eval's JSON; ``clicks``:
        also click-to-segment (the slowest part)."""
        cfg = self.config.semantic_eval
        dm, model = self.datamanager, self.model
        metadata = dm.scene_metadata()
        points_path = metadata.get(LABELED_POINTS_KEY)
        cloud = read_point_cloud(Path(points_path)) if points_path is not None else None
        class_names = _query_class_names(metadata, cloud, cfg.class_table)
        if not class_names:
            CONSOLE.log("This scene has no class names or labelled points: skipping segmentation metrics.")
            return {}
        teacher = self._query_teacher()
        views = dm.scene_views()
        teacher.prepare_scene(views, metadata)
        ids, names = class_queries(class_names)
        text = teacher.encode_text(names).to(model.device)
        out: Dict = {"semantic_query_teacher": teacher.name, "semantic_classes": names}

        reference = _ground_truth_reference(views, metadata, cfg.class_table)
        picked = self.scored_view_positions(views)
        if reference is None or not picked["eval"]:
            CONSOLE.log("Held-out views have no labels: skipping 2D segmentation metrics.")
        if reference is not None:
            out.update(self._score_2d("eval", picked["eval"], views, reference, teacher, text, ids, names))
            # A failing diagnostic is reported, and never costs the protocol's own scores.
            _diagnostic(
                out,
                "semantic_2d_train_views",
                self._score_2d,
                "train",
                picked["train"],
                views,
                reference,
                teacher,
                text,
                ids,
                names,
            )

        points = _to_dataparser_frame(cloud.xyz, metadata) if cloud is not None else None
        if cloud is not None and cloud.labels is not None:
            gaussian_labels = torch.as_tensor(
                classify_by_text(model.gaussian_features(teacher.name), text, ids)
            ).cpu()
            predicted = vote_points_from_gaussians(model.means, gaussian_labels, points, cfg.knn)
            out["semantic_3d"] = score(points_confusion(predicted, cloud.labels, ids), names, cfg)
            lifted = backprojected_teacher_labels(
                points,
                self._teacher_view_labels(teacher, views, text, ids, metadata),
                cfg.depth_tolerance,
            )
            out["semantic_3d_teacher_backprojected"] = score(
                points_confusion(lifted, cloud.labels, ids), names, cfg
            )
            _diagnostic(
                out,
                "semantic_3d_seen",
                self._score_3d_seen,
                gaussian_labels,
                points,
                cloud.labels,
                ids,
                names,
            )
        if (
            clicks
            and reference is not None
            and cloud is not None
            and cloud.instance_ids is not None
            and picked["eval"]
        ):
            skip = {i for i, name in class_names.items() if name.strip().lower() in cfg.background_names}
            _diagnostic(
                out,
                "click_segmentation",
                self._score_clicks,
                views,
                metadata,
                reference,
                points,
                cloud.instance_ids,
                picked["eval"],
                skip,
            )
        return out

    def _score_clicks(
        self,
        views: List[SceneView],
        metadata: Dict,
        reference,
        points: np.ndarray,
        point_instances: np.ndarray,
        positions: List[int],
        skip: set,
    ) -> Dict:
        """``click_segmentation``: click-to-segment at the held-out views (splatsem_ns.evaluation.clicks), with
        the first object-aware teacher the model has a head for; nothing without one. ``points`` are the labelled
        points in the cameras' frame, ``point_instances`` their instance ids."""
        teacher = next((name for name in OBJECT_TEACHERS if name in self.model.projector_heads), None)
        if teacher is None:
            return {}
        instances = _ground_truth_reference(views, metadata, None, variant="instance")
        # The baseline: the same teacher clicked on each held-out image itself.
        clicker = self.datamanager.build_teacher(
            next(c for c in self.datamanager.teacher_configs() if c.name == teacher)
        )
        clicker.prepare_scene(views, metadata)
        eval_views = [v for v in views if v.split == "eval"]
        scores = score_clicks(
            self.model,
            teacher,
            self.datamanager.eval_dataset.cameras[torch.tensor(positions)],
            instances.label_maps(split="eval", positions=positions),
            reference.label_maps(split="eval", positions=positions),
            points,
            point_instances,
            skip,
            # Configs saved before the click protocol existed load without the field.
            getattr(self.config, "click_eval", None) or ClickEvalConfig(),
            knn=self.config.semantic_eval.knn,
            render_scale=self.config.semantic_eval.render_scale,
            teacher_features=[_teacher_features(clicker, eval_views[j]) for j in positions],
        )
        return {"click_segmentation": {"teacher": teacher, **scores}}

    def scored_view_positions(self, views: List[SceneView]) -> Dict[str, List[int]]:
        """Positions within each split of the views that 2D scoring renders: every held-out view ("eval"), and
        an even sample of ``train_views_scored`` training views ("train"), scored as a diagnostic."""
        count = {split: sum(v.split == split for v in views) for split in ("eval", "train")}
        spread = np.linspace(
            0, count["train"] - 1, min(self.config.semantic_eval.train_views_scored, count["train"])
        )
        return {"eval": list(range(count["eval"])), "train": sorted({int(round(i)) for i in spread})}

    def _score_2d(
        self,
        split: str,
        positions: List[int],
        views: List[SceneView],
        reference,
        teacher: Teacher,
        text: torch.Tensor,
        ids: List[int],
        names: List[str],
    ) -> Dict:
        """2D scores of the model and of the teacher per view at the ``positions``-th views of ``split``: keys
        ``semantic_2d`` and ``semantic_2d_teacher_per_view`` (suffixed ``_train_views`` for training views), and
        at held-out views one ``semantic_2d_scale_<s>`` per diagnostic render scale."""
        if not positions:
            return {}
        cfg, dm, model = self.config.semantic_eval, self.datamanager, self.model
        cameras = dm.eval_dataset.cameras if split == "eval" else dm.train_dataset.cameras
        suffix = "" if split == "eval" else "_train_views"
        split_views = [v for v in views if v.split == split]
        ground_truth = reference.label_maps(split=split, positions=positions)
        # The protocol's render scale first; the diagnostic ones at held-out views only.
        scales = [cfg.render_scale] + (list(cfg.diagnostic_render_scales) if split == "eval" else [])
        cm_model = [ConfusionMatrix(len(ids), ignore_index=-1) for _ in scales]
        cm_teacher = ConfusionMatrix(len(ids), ignore_index=-1)
        for j, gt in zip(positions, ground_truth, strict=True):
            size = tuple(gt.shape)
            for cm, scale in zip(cm_model, scales, strict=True):
                latent = model.render_semantic_latent(cameras[j : j + 1], scale=scale)
                features = model.decode_features(latent, teacher.name)
                accumulate_2d(cm, upsample_labels(classify_map(features, text, ids), size), gt, ids)
            teacher_labels = _teacher_labels(teacher, split_views[j], text, ids)
            accumulate_2d(cm_teacher, upsample_labels(teacher_labels, size), gt, ids)
        out = {
            f"semantic_2d{suffix}": score(cm_model[0], names, cfg),
            f"semantic_2d_teacher_per_view{suffix}": score(cm_teacher, names, cfg),
        }
        for cm, scale in zip(cm_model[1:], scales[1:], strict=True):
            out[f"semantic_2d_scale_{scale:g}"] = score(cm, names, cfg)
        return out

    def _score_3d_seen(
        self,
        gaussian_labels: torch.Tensor,
        points: np.ndarray,
        point_labels: np.ndarray,
        ids: List[int],
        names: List[str],
    ) -> Dict:
        """Diagnostic ``semantic_3d_seen``: the 3D vote among the Gaussians that training views supervised.
        ``gaussian_labels`` are the host-side class ids of every Gaussian."""
        cfg, model = self.config.semantic_eval, self.model
        seen = (
            model.gaussian_view_weights(self.datamanager.train_dataset.cameras) >= cfg.min_vote_weight
        ).cpu()
        seen_labels = torch.where(seen, gaussian_labels, torch.tensor(-1))
        predicted = vote_points_from_gaussians(model.means, seen_labels, points, cfg.knn)
        scores = score(points_confusion(predicted, point_labels, ids), names, cfg)
        scores["voting_gaussians_fraction"] = float(seen.float().mean())
        return {"semantic_3d_seen": scores}

    def _teacher_view_labels(
        self,
        teacher: Teacher,
        views: List[SceneView],
        text: torch.Tensor,
        ids: List[int],
        metadata: Dict,
        features: Optional[List[torch.Tensor]] = None,
    ) -> List[ViewLabels]:
        """The teacher's per-pixel classes on every training view, with each view's camera and depth.
        ``features``: the teacher's features of the training views, in order, when the caller has them already
        (else the teacher encodes each view)."""
        result = []
        depth_scale = scene_depth_scale(metadata)
        train = [view for view in views if view.split == "train"]
        if features is not None and len(features) != len(train):
            raise ValueError(f"{len(features)} feature maps for {len(train)} training views")
        for i, view in enumerate(train):
            if features is None:
                labels = _teacher_labels(teacher, view, text, ids)
            else:
                labels = classify_map(features[i].to(text), text, ids)
            depth = None
            if view.depth_path is not None:
                depth = np.asarray(Image.open(view.depth_path), dtype=np.float32) * depth_scale
            result.append(
                ViewLabels(
                    labels=labels.cpu().numpy(),
                    K=view.intrinsics.cpu().numpy(),
                    camera_to_world=view.camera_to_world.cpu().numpy(),
                    image_size=tuple(view.image.shape[:2]),
                    depth=depth,
                )
            )
        return result


def _teacher_features(teacher: Teacher, view: SceneView) -> torch.Tensor:
    """The teacher's features for one view, on its feature grid. [h, w, C]"""
    return teacher.encode_image(image_to_float_chw(view.image)[None].to(teacher.device))[0].permute(1, 2, 0)


def _teacher_labels(teacher: Teacher, view: SceneView, text: torch.Tensor, ids: List[int]) -> torch.Tensor:
    """The teacher's per-cell class ids for one view, on its feature grid."""
    return classify_map(_teacher_features(teacher, view).to(text), text, ids)


def _query_class_names(metadata: Dict, cloud, table: Optional[str]) -> Dict[int, str]:
    """Classes to query: the scene's own names (classes.json) or, without them, ``table`` (NYU40 by default)
    restricted to the classes present in the labelled points."""
    if table is None and metadata.get(CLASS_NAMES_KEY):
        return dict(metadata[CLASS_NAMES_KEY])
    names = class_names(table or "nyu40")
    if cloud is not None and cloud.labels is not None:
        present = set(np.unique(cloud.labels).tolist())
        names = {i: n for i, n in names.items() if i in present}
    return names


def _ground_truth_reference(
    views: List[SceneView], metadata: Dict, table: Optional[str], variant: str = "semantic"
):
    """An undegraded labels teacher whose ``label_maps(split)`` are the clean id maps at image size (class ids,
    or instance ids for the "instance" ``variant``): the label images where the scene has them, else the
    labelled point cloud projected with a depth test and hole filling. None where the scene has neither."""
    semantic = variant == "semantic"
    if (
        not any(v.label_path if semantic else v.instance_path for v in views)
        and LABELED_POINTS_KEY not in metadata
    ):
        return None
    reference = LabelsTeacherConfig(
        name="ground-truth" if semantic else "ground-truth-instances",
        variant=variant,
        degrade=False,
        class_table=table or "nyu40",
    ).setup()
    reference.prepare_scene(views, metadata)
    return reference


def _to_dataparser_frame(xyz: np.ndarray, metadata: Dict) -> np.ndarray:
    """Points from the dataset's original frame into the cameras' (dataparser) frame."""
    transformed = transform_points(xyz, metadata[DATAPARSER_TRANSFORM_KEY], metadata[DATAPARSER_SCALE_KEY])
    return transformed.astype(np.float32)


def _diagnostic(out: Dict, name: str, function, *args) -> None:
    """Add the scores ``function(*args)`` returns to ``out``; if it fails, log it and note the error under
    ``out["diagnostic_errors"][name]`` instead."""
    try:
        out.update(function(*args))
    except Exception as err:  # noqa: BLE001 (any failure: the protocol's own scores must still come out)
        CONSOLE.log(f"[yellow]Diagnostic {name} failed: {err!r}")
        out.setdefault("diagnostic_errors", {})[name] = repr(err)
