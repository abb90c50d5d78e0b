"""The chorus-pretrain pipeline: scene collections with their Gaussians, the Chorus encoder, held-out scoring.

Training is semantic-splat's loop (``SemanticSplatPipeline``: multi-scene batches, DistributedDataParallel with
per-rank sample streams under ``--machine.num-devices N``); only the model and the scoring differ. ``ns-eval``
scores the held-out scenes' samples, one each: per teacher the mean cosine between the decoded rendered latent and
the teacher's features, and, where the scenes have labels and a teacher has a text encoder, 2D mIoU at the target
views with the confusion-matrix protocol of chorus-splat, beside the teacher run on those views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

import numpy as np
import torch

from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
from splatsem_ns.evaluation.metrics import ConfusionMatrix
from splatsem_ns.evaluation.protocol import accumulate_2d, class_queries, classify_map, score
from splatsem_ns.models.chorus_pretrain import ChorusPretrainModelConfig
from splatsem_ns.models.heads import resize_feature_map
from splatsem_ns.pipelines.semantic_splat_pipeline import (
    SemanticSplatPipeline,
    SemanticSplatPipelineConfig,
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
        teacher_name = next((n for n, s in model.teacher_specs.items() if s.has_text_encoder), None)
        classes = self.datamanager.collection.classes
        segment = teacher_name is not None and bool(classes)
        if segment:
            ids, names = class_queries(classes)
            teacher = model.teacher_specs[teacher_name].config.setup().to(model.device).eval()
            text = teacher.encode_text(names).float().to(model.device)
            matrices = {key: ConfusionMatrix(len(ids)) for key in ("target", "teacher_target")}
        per_scene: List[Dict[str, Any]] = []
        for sample_id in range(count):  # sample i of epoch 0 is scene i of the eval order: every scene once
            sample = dataset[sample_id]
            batch = _to_batch(sample, model.device)
            outputs = model(batch)
            scores: Dict[str, Any] = {"scene": sample["scene"], **model.cosine_scores(outputs, batch)}
            scores["num_gaussians"] = int(len(batch["gaussians"]["means"]))
            per_scene.append(scores)
            target = batch["target"]
            if segment and bool(target["has_labels"].all()):
                size = tuple(target["images"].shape[2:4])
                head = model.projector_heads[teacher_name]
                for v in range(target["images"].shape[1]):
                    truth = target["labels"][0, v].long()
                    decoded = head(outputs["target"]["rendered"][0, v])
                    accumulate_2d(matrices["target"], classify_map(decoded, text, ids), truth, ids)
                    own = resize_feature_map(target["teacher_features"][teacher_name][0, v].float(), size)
                    accumulate_2d(matrices["teacher_target"], classify_map(own, text, ids), truth, ids)
        self.train()
        numeric = sorted({k for s in per_scene for k, v in s.items() if isinstance(v, (int, float))})
        result: Dict[str, Any] = {k: float(np.mean([s[k] for s in per_scene])) for k in numeric}
        result["num_scenes"] = len(per_scene)
        result["per_scene"] = per_scene
        if segment:
            result["semantic_query_teacher"] = teacher_name
            for key, matrix in matrices.items():
                if matrix.matrix.sum() > 0:
                    result[f"semantic_2d_{key}"] = score(matrix, names, self.config.semantic_eval)
        return result
