"""The chorus-pretrain pipeline: scene collections with their Gaussians, the Chorus encoder, held-out scoring.

Training is semantic-splat's loop (``SemanticSplatPipeline``: multi-scene batches, DistributedDataParallel with
per-rank sample streams under ``--machine.num-devices N``); only the model and the scoring differ. ``ns-eval``
scores the held-out scenes' samples, one each: per teacher the mean cosine between the decoded rendered latent and
the teacher's features, beside the best mean cosine any single constant feature reaches on the same pixels
(``constant_cosine_NAME``: teacher features share a common direction, so a high cosine alone says little), and,
where the scenes have labels and a teacher has a text encoder, 2D mIoU at the target views with semantic-splat's
segmentation protocol (the same query teacher and classes), beside the teacher run on those views, and in 3D:
every labelled point takes the class of its nearest served Gaussians' decoded latents (chorus-splat's 25-NN vote;
``semantic_3d``), the encoder's zero-shot score, and the same vote through the scene's compact tokens
(``semantic_3d_tokens_K``). Beside them, what the scene's views support in 3D: the teacher's per-pixel classes on
the scene's views voted onto the labelled points they see (``semantic_3d_teacher_backprojected``, chorus-splat's
"2D teacher back-projected" baseline), and the encoder's vote over those seen points alone
(``semantic_3d_in_views``): labelled points no view sees (a ceiling above every camera) are in ``semantic_3d`` but
no teacher ever spoke of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type

import numpy as np
import torch
from torch import Tensor

from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
from splatsem_ns.data.scene_frames import SceneFrames
from splatsem_ns.evaluation.metrics import ConfusionMatrix
from splatsem_ns.evaluation.protocol import (
    accumulate_points,
    classify_map,
    score,
    vote_points_from_gaussians,
)
from splatsem_ns.evaluation.voting import ViewLabels, backproject_vote, classify_by_text
from splatsem_ns.export.loader import SemanticScene
from splatsem_ns.export.tokens import encoder_tokens
from splatsem_ns.models.chorus_pretrain import ChorusPretrainModelConfig
from splatsem_ns.pipelines.semantic_splat_pipeline import (
    SemanticSplatPipeline,
    SemanticSplatPipelineConfig,
    _Segmentation,
    _to_batch,
)


@dataclass
class ChorusPretrainPipelineConfig(SemanticSplatPipelineConfig):
    """Multi-scene data with each scene's Gaussians, the Chorus encoder, held-out scoring."""

    _target: Type = field(default_factory=lambda: ChorusPretrainPipeline)
    datamanager: MultiSceneDataManagerConfig = field(
        default_factory=lambda: MultiSceneDataManagerConfig(gaussians="auto")
    )
    """Samples of scene collections, with each scene's Gaussians (fitted where there are, else its points)."""
    model: ChorusPretrainModelConfig = field(default_factory=ChorusPretrainModelConfig)
    """The encoder, its heads and the render-and-distill loss."""
    eval_tokens: Tuple[int, ...] = (512,)
    """ns-eval also scores the 3D vote through this many scene tokens of each held-out scene (``splatsem-tokens``'
    tokens of the encoder's coarsest stage, every Gaussian's latent decoded back from its nearest tokens):
    ``semantic_3d_tokens_K``, what compact tokens lose against the per-Gaussian latents. Empty: not scored."""
    eval_backprojection_views: int = 24
    """Views of each held-out scene (evenly spread over its frames) whose teacher classes are back-projected onto
    the labelled points (``semantic_3d_teacher_backprojected`` and ``semantic_3d_in_views``); 0: not scored."""


class ChorusPretrainPipeline(SemanticSplatPipeline):
    """See the module docstring."""

    config: ChorusPretrainPipelineConfig

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        self.model.update_to_step(step)
        self.load_state_dict(loaded_state)

    @torch.no_grad()
    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ) -> Dict[str, Any]:
        dataset, count = self.scenes_to_score()
        model = self.model
        self.eval()
        segmentation = _Segmentation(self, ("target", "teacher_target")) if self._can_segment() else None
        points3d = _PointVote(self, segmentation) if segmentation is not None else None
        per_scene: List[Dict[str, Any]] = []
        directions: Dict[str, List[Any]] = {}  # teacher -> [sum of unit teacher features, count]
        for sample_id in range(count):  # sample i of epoch 0 is scene i of the eval order: every scene once
            sample = dataset[sample_id]
            batch = _to_batch(sample, model.device)
            outputs = model(batch)
            scores: Dict[str, Any] = {"scene": sample["scene"], **model.cosine_scores(outputs, batch)}
            scores["num_gaussians"] = int(len(batch["gaussians"]["means"]))
            per_scene.append(scores)
            for name, (total, n) in model.target_direction_sums(outputs, batch).items():
                entry = directions.setdefault(name, [0.0, 0])
                entry[0], entry[1] = entry[0] + total, entry[1] + n
            if segmentation is not None and bool(batch["target"]["has_labels"].all()):
                segmentation.add_targets(batch["target"], outputs["target"]["rendered"][0])
            if segmentation is not None:
                points3d.add(sample["scene"], batch["gaussians"], outputs["latent"], dataset)
        self.train()
        numeric = sorted({k for s in per_scene for k, v in s.items() if isinstance(v, (int, float))})
        result: Dict[str, Any] = {k: float(np.mean([s[k] for s in per_scene])) for k in numeric}
        for name, (total, n) in directions.items():
            if n:  # the best constant feature's mean cosine on these pixels: the reference for cosine_NAME
                result[f"constant_cosine_{name}"] = float(torch.linalg.vector_norm(total) / n)
        result["num_scenes"] = len(per_scene)
        result["per_scene"] = per_scene
        if segmentation is not None:
            result.update(segmentation.scores())
            result.update(points3d.scores())  # type: ignore[union-attr]
        return result


class _PointVote:
    """The 3D protocol of chorus-splat's ns-eval on the encoder's zero-shot features: each served Gaussian's latent
    decoded by the query teacher's head and classified by text, then every labelled point of the scene takes the
    vote of its ``knn`` nearest Gaussians (``semantic_3d``: mIoU and fg-mIoU over all held-out scenes' points); the
    same through each ``eval_tokens`` count of scene tokens (``semantic_3d_tokens_K``); the teacher back-projected
    from the scene's views (``semantic_3d_teacher_backprojected``) and the vote over the points those views see
    (``semantic_3d_in_views``)."""

    def __init__(self, pipeline: ChorusPretrainPipeline, segmentation: _Segmentation) -> None:
        self.pipeline = pipeline
        self.segmentation = segmentation
        classes = len(segmentation.ids)
        self.matrix = ConfusionMatrix(classes, ignore_index=-1)
        self.token_matrices = {
            k: ConfusionMatrix(classes, ignore_index=-1) for k in pipeline.config.eval_tokens
        }
        self.teacher_matrix = ConfusionMatrix(classes, ignore_index=-1)
        self.in_views_matrix = ConfusionMatrix(classes, ignore_index=-1)
        self.scenes = 0

    def add(
        self, scene: str, gaussians: Dict[str, Tensor], latent: Tensor, dataset: Optional[Any] = None
    ) -> None:
        """Score one held-out scene; ``dataset`` (a ``SceneSampleDataset`` holding it) serves its views for the
        back-projected teacher (None: not scored)."""
        collection = self.pipeline.datamanager.collection
        entry = next(e for e in collection.scenes if e.name == scene)
        found = SceneFrames.load(collection.scene_path(entry)).labelled_points(collection.classes)
        means = gaussians["means"]
        if found is None or len(found[1]) == 0 or len(means) == 0:
            return
        xyz, labels = found
        voted = self._vote(self.matrix, means, latent, xyz, labels)
        for k, matrix in self.token_matrices.items():
            self._vote(matrix, means, self._through_tokens(gaussians, latent, k), xyz, labels)
        lifted = self._backprojected(dataset, scene, xyz) if dataset is not None else None
        if lifted is not None:
            teacher_labels, votes = lifted
            ids = self.segmentation.ids
            accumulate_points(self.teacher_matrix, teacher_labels, labels, ids)
            seen = votes > 0
            accumulate_points(self.in_views_matrix, voted[seen], labels[seen], ids)
        self.scenes += 1

    def _vote(self, matrix: ConfusionMatrix, means: Tensor, latent: Tensor, xyz, labels) -> np.ndarray:
        """Each labelled point's class by the ``knn`` vote of the decoded Gaussians, counted into ``matrix``."""
        seg = self.segmentation
        head = self.pipeline.model.projector_heads[seg.teacher_name]
        classes = classify_by_text(head(latent), seg.text, seg.ids)
        voted = vote_points_from_gaussians(means, classes, xyz, k=seg.cfg.knn)
        accumulate_points(matrix, voted, labels, seg.ids)
        return np.asarray(voted)

    def _backprojected(
        self, dataset: Any, scene: str, xyz: np.ndarray
    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(labels, votes) of ``backproject_vote``: the query teacher's per-pixel classes on up to
        ``eval_backprojection_views`` of the scene's views, voted onto its labelled points; None where the teacher
        has no features of the scene or nothing is asked."""
        limit = self.pipeline.config.eval_backprojection_views
        seg = self.segmentation
        index = next((i for i, e in enumerate(dataset.scenes) if e.name == scene), None)
        if limit <= 0 or index is None:
            return None
        count = len(dataset.frames(index))
        chosen = np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(np.int64))
        views = dataset.views(index, chosen)
        available = views.get("teacher_available", {}).get(seg.teacher_name)
        if available is None or not bool(available.all()):
            return None
        features = views["teacher_features"][seg.teacher_name]  # [V, h, w, C] at the teacher's grid
        size = tuple(views["images"].shape[1:3])
        view_labels = [
            ViewLabels(
                labels=classify_map(features[v].float().to(seg.text.device), seg.text, seg.ids).cpu().numpy(),
                K=views["intrinsics"][v].numpy(),
                camera_to_world=views["camera_to_world"][v].numpy(),
                image_size=size,
                depth=views["depth"][v].numpy() if views["has_depth"] else None,
            )
            for v in range(len(chosen))
        ]
        return backproject_vote(xyz, view_labels, depth_tolerance=seg.cfg.depth_tolerance)

    def _through_tokens(self, gaussians: Dict[str, Tensor], latent: Tensor, k: int) -> Tensor:
        """Every Gaussian's latent decoded back from ``k`` tokens of the encoder's coarsest stage."""
        columns = {key: gaussians[key].float().cpu() for key in ("means", "scales", "quats", "opacities")}
        scene = SemanticScene(
            **columns,
            features_dc=gaussians["features_dc"].float().cpu().reshape(-1, 3),
            features_rest=torch.zeros(len(columns["means"]), 0, 3),
            latent=latent.cpu(),
        )
        tokens = encoder_tokens(scene, self.pipeline.model.encoder, k)
        return tokens.decode_latent(columns["means"]).to(latent)

    def scores(self) -> Dict[str, Any]:
        if not self.scenes:
            return {}
        cfg, names = self.segmentation.cfg, self.segmentation.names
        result: Dict[str, Any] = {"semantic_3d": {**score(self.matrix, names, cfg), "scenes": self.scenes}}
        for k, matrix in self.token_matrices.items():
            result[f"semantic_3d_tokens_{k}"] = {**score(matrix, names, cfg), "scenes": self.scenes}
        for key, matrix in (
            ("semantic_3d_teacher_backprojected", self.teacher_matrix),
            ("semantic_3d_in_views", self.in_views_matrix),
        ):
            if matrix.matrix.sum() > 0:
                result[key] = score(matrix, names, cfg)
        return result
