"""``splatsem-export``: a trained chorus-splat run as a 3DGS PLY with semantic columns plus its sidecar.

::

    splatsem-export --load-config outputs/room/chorus-splat/<timestamp>/config.yml --output-dir exports
    splatsem-export --load-config .../config.yml --output-dir exports --name couch --query couch --threshold 0.6

The pipeline is restored as nerfstudio's ``ns-export`` restores it (``eval_setup`` in inference mode:
no teachers run, the heads come from the checkpoint). With ``--query`` only the Gaussians whose LERF
relevancy to the text exceeds ``--threshold`` are written: a text-selected piece of the scene that
opens in any 3DGS viewer.

The two files are written as a pair (``SemanticScene.save``): under temporary names first, renamed into
place only once both are complete, so a failed export (a full disk, an unwritable file) leaves an earlier
export with the same name as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import tyro

from splatsem_ns.export.loader import SemanticScene
from splatsem_ns.export.semantic_ply import SemanticExportError, WrittenPly
from splatsem_ns.models.relevancy import DEFAULT_NEGATIVES


@dataclass
class ExportSemanticSplat:
    """Export a trained chorus-splat scene: ``<name>.ply`` (3DGS + sem_* columns) and ``<name>.semantic.pt``."""

    load_config: Path
    """The run's config.yml (outputs/<experiment>/chorus-splat/<timestamp>/config.yml)."""
    output_dir: Path
    """Folder for the PLY and its sidecar (created if needed)."""
    name: str = "scene"
    """File stem: writes ``<name>.ply`` and ``<name>.semantic.pt``."""
    query: Optional[str] = None
    """Export only the Gaussians relevant to this text (LERF relevancy above ``threshold``)."""
    threshold: float = 0.5
    """Relevancy a Gaussian must exceed to be exported with ``--query`` (0.5: closer to the query than to
    every negative phrase)."""
    teacher: Optional[str] = None
    """Language teacher that answers ``--query`` (default: the run's first teacher with a text encoder)."""
    negatives: Tuple[str, ...] = DEFAULT_NEGATIVES
    """Negative phrases of the relevancy (LERF's canonical ones by default)."""
    scene: Optional[str] = None
    """Feed-forward runs (semantic-splat): the collection scene to predict (default: the first held-out one)."""
    context_views: Optional[Tuple[int, ...]] = None
    """Feed-forward runs: the context views to predict from (default: the datamanager's choice for the scene)."""

    def main(self) -> WrittenPly:
        from nerfstudio.utils.eval_utils import eval_setup
        from nerfstudio.utils.rich_utils import CONSOLE

        # Registers the numpy globals that nerfstudio's checkpoints need under torch.load's weights_only
        # (before eval_setup reads the checkpoint).
        import splatsem_ns.method_configs.chorus_splat  # noqa: F401

        start = time.perf_counter()
        # eval_setup picks CUDA when available and the CPU otherwise; checkpoints load onto the CPU first.
        _, pipeline, checkpoint, step = eval_setup(self.load_config, test_mode="inference")
        if hasattr(pipeline, "predict_scene"):  # feed-forward: one scene's prediction
            gaussians, name, context = pipeline.predict_scene(self.scene, self.context_views)
            scene = SemanticScene.from_prediction(
                pipeline.model,
                gaussians,
                source=f"{name} from views {', '.join(map(str, context))}",
                teacher_configs=pipeline.datamanager.teacher_configs,
            )
            CONSOLE.print(f"Predicted scene {name} from context views {context}.")
        else:
            teacher_configs = []
            if hasattr(pipeline.datamanager, "teacher_configs"):
                teacher_configs = pipeline.datamanager.teacher_configs()
            scene = SemanticScene.from_model(pipeline.model, teacher_configs)
        CONSOLE.print(
            f"Loaded {scene.num_gaussians} Gaussians (step {step}, {checkpoint}) in "
            f"{time.perf_counter() - start:.1f} s; heads: {', '.join(scene.heads) or 'none'}."
        )

        selection = None
        if self.query is not None:
            relevancy = scene.query(self.query, teacher=self.teacher, negatives=self.negatives)
            selection = relevancy > self.threshold
            if not bool(selection.any()):
                raise SystemExit(
                    f"No Gaussian has relevancy above {self.threshold} for {self.query!r} "
                    f"(highest: {float(relevancy.max()):.3f}); lower --threshold."
                )
            CONSOLE.print(
                f"Query {self.query!r}: {int(selection.sum())} of {scene.num_gaussians} Gaussians above "
                f"relevancy {self.threshold}."
            )

        ply = self.output_dir / f"{self.name}.ply"
        try:
            written = scene.save(ply, selection=selection, source_config=self.load_config)
        except SemanticExportError as err:  # the message names the file, the reason and what was kept
            raise SystemExit(f"splatsem-export: {err}") from err
        sizes = f"{ply.stat().st_size / 2**20:.2f} MiB"
        if written.sidecar is not None:
            sizes += f" + sidecar {written.sidecar} {written.sidecar.stat().st_size / 2**20:.2f} MiB"
        CONSOLE.print(
            f"Wrote {written.num_written} Gaussians to {ply} ({sizes}) in {time.perf_counter() - start:.1f} s."
        )
        return written


def main() -> None:
    """Entry point of ``splatsem-export``."""
    tyro.cli(ExportSemanticSplat).main()


if __name__ == "__main__":
    main()
