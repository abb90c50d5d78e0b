"""The chorus-pretrain pipeline: scene collections with their Gaussians, the Chorus encoder, held-out scoring.

Training is semantic-splat's loop (``SemanticSplatPipeline``: multi-scene batches, DistributedDataParallel with
per-rank sample streams under ``--machine.num-devices N``); only the model and the scoring differ. ``ns-eval``
scores the held-out scenes' samples, one each: per teacher the mean cosine between the decoded rendered latent and
the teacher's features, and, where the scenes have labels and a teacher has a text encoder, 2D mIoU at the target
views with semantic-splat's segmentation protocol (the same query teacher and classes), beside the teacher run on
those views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type

import numpy as np
import torch

from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
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
        per_scene: List[Dict[str, Any]] = []
        for sample_id in range(count):  # sample i of epoch 0 is scene i of the eval order: every scene once
            sample = dataset[sample_id]
            batch = _to_batch(sample, model.device)
            outputs = model(batch)
            scores: Dict[str, Any] = {"scene": sample["scene"], **model.cosine_scores(outputs, batch)}
            scores["num_gaussians"] = int(len(batch["gaussians"]["means"]))
            per_scene.append(scores)
            if segmentation is not None and bool(batch["target"]["has_labels"].all()):
                segmentation.add_targets(batch["target"], outputs["target"]["rendered"][0])
        self.train()
        numeric = sorted({k for s in per_scene for k, v in s.items() if isinstance(v, (int, float))})
        result: Dict[str, Any] = {k: float(np.mean([s[k] for s in per_scene])) for k in numeric}
        result["num_scenes"] = len(per_scene)
        result["per_scene"] = per_scene
        if segmentation is not None:
            result.update(segmentation.scores())
        return result
