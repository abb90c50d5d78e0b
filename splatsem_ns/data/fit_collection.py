"""``splatsem-fit-collection``: fit every scene of a collection with a short 3DGS run and write its Gaussians.

::

    splatsem-fit-collection --collection generated/collection.json --steps 2000
    splatsem-fit-collection --collection mixed/collection.json --method chorus-splat --teachers labels --steps 3000

The Chorus encoder trains on scenes' Gaussians (``ns-train chorus-pretrain``, with
``--pipeline.datamanager.gaussians ply`` or ``auto``). This tool makes them: for each scene of the collection (or
of ``--splits``) it trains ``--method`` (splatfacto by default; it needs CUDA) for ``--steps`` steps in this
process, and writes the Gaussians to ``<scene>/gaussians.ply`` in the scene's own frame (the frame of its
transforms.json, so the encoder's voxels are in the capture's units), as any 3DGS PLY; chorus-splat fits also keep
their latents and heads (``sem_*`` columns and a ``gaussians.semantic.pt`` sidecar), which the linear probe reads as
its per-scene baseline.

Nothing is lost on interruption: every scene's file is written under a temporary name and renamed into place
once complete, and scenes that already have one are skipped unless ``--overwrite``. A scene that fails (a broken
image, training diverging) is reported with the reason and left without a file; the others go on. A summary of
every scene (steps, Gaussians, seconds, error) is written to ``fit_collection.json`` beside the index.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import tyro
from jaxtyping import Float
from torch import Tensor

from splatsem_ns.data.collection import SPLITS, SceneCollection, SceneEntry
from splatsem_ns.data.frames import to_scene_frame
from splatsem_ns.progress import logged_progress

SUMMARY_FILE = "fit_collection.json"


@dataclass
class FitCollection:
    """Fit each scene of a collection and write ``<scene>/<output-name>`` (see the module docstring)."""

    collection: Path
    """The collection index (collection.json, or its folder)."""
    method: str = "splatfacto"
    """The nerfstudio method that fits each scene: splatfacto (CUDA only) or chorus-splat (also on a CPU)."""
    steps: int = 2000
    """Training steps per scene."""
    splits: Tuple[str, ...] = SPLITS
    """Which splits' scenes to fit."""
    teachers: Tuple[str, ...] = ("labels",)
    """With ``--method chorus-splat``: the teachers it distils (their features are extracted per scene)."""
    output_name: str = "gaussians.ply"
    """File written in each scene's folder (what ``--pipeline.datamanager.gaussians-file`` reads)."""
    overwrite: bool = False
    """Fit again scenes that already have the file."""
    max_scenes: Optional[int] = None
    """Fit at most this many scenes (in index order), e.g. to try the settings."""

    def main(self) -> Dict[str, Dict]:
        collection = SceneCollection.load(self.collection)
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise SystemExit(f"splatsem-fit-collection: unknown splits {unknown}; use some of {SPLITS}")
        if self.method == "splatfacto" and not torch.cuda.is_available():
            raise SystemExit(
                "splatsem-fit-collection: splatfacto runs on CUDA only (it places its Gaussians with .cuda()); "
                "on this machine use --method chorus-splat"
            )
        scenes = [s for s in collection.scenes if s.split in self.splits][: self.max_scenes]
        summary_path = collection.root / SUMMARY_FILE
        summary: Dict[str, Dict] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        todo = [
            s for s in scenes if self.overwrite or not (collection.scene_path(s) / self.output_name).is_file()
        ]
        print(
            f"{len(scenes)} scenes, {len(scenes) - len(todo)} already fitted, {len(todo)} to fit.", flush=True
        )
        # Each scene's run (config, events) goes to a throw-away folder; the fitted Gaussians go to the scene.
        with tempfile.TemporaryDirectory(prefix="fit_collection_") as runs:
            for entry in logged_progress(
                todo, f"fitting scenes ({self.method}, {self.steps} steps)", unit="scenes"
            ):
                summary[entry.name] = self._fit(collection, entry, Path(runs))
                _write_json(summary_path, summary)
        failed = {name: r["error"] for name, r in summary.items() if r.get("error")}
        print(
            f"Fitted {sum(1 for s in todo if not summary[s.name].get('error'))} of {len(todo)} scenes; summary in "
            f"{summary_path}." + (f" Failed: {failed}" if failed else ""),
            flush=True,
        )
        return summary

    def _fit(self, collection: SceneCollection, entry: SceneEntry, runs: Path) -> Dict:
        """Train one scene and write its Gaussians; a failure is returned as ``{"error": ...}``, not raised."""
        from splatsem_ns.engine.one_scene import own_event_writers
        from splatsem_ns.models.compile_options import release_held_options

        folder = collection.scene_path(entry)
        start = time.perf_counter()
        try:
            with own_event_writers():  # this scene's events go to its own run only, and stop with it
                trainer = _trainer(self.method, folder, runs / entry.name, self.steps, self.teachers)
                trainer.train()
            model = trainer.pipeline.model
            outputs = trainer.pipeline.datamanager.train_dataparser_outputs
            count = write_scene_gaussians(
                folder / self.output_name,
                model,
                outputs.dataparser_transform,
                float(outputs.dataparser_scale),
            )
            return {"steps": self.steps, "gaussians": count, "seconds": round(time.perf_counter() - start, 1)}
        except Exception as err:  # noqa: BLE001 (one broken scene must not stop the collection)
            traceback.print_exc()
            return {"error": f"{type(err).__name__}: {err}", "seconds": round(time.perf_counter() - start, 1)}
        finally:
            release_held_options()  # a scene that failed inside an iteration must not leave its compile options held


def _trainer(method: str, scene: Path, out: Path, steps: int, teachers: Tuple[str, ...]):
    """A set-up trainer of ``method`` on one scene, on all of its views: no viewer, no evaluation, no checkpoints."""
    from splatsem_ns.engine.one_scene import one_scene_config, setup_trainer

    try:
        config = one_scene_config(method, scene, out, steps, teachers, eval_mode="all")
    except ValueError as err:
        raise SystemExit(f"splatsem-fit-collection: {err}") from err
    return setup_trainer(config)


@torch.no_grad()
def write_scene_gaussians(path: Path, model, transform: Float[Tensor, "3 4"], scale: float) -> int:
    """Write a trained model's Gaussians (dataparser frame) to ``path`` in the scene's own frame; returns how many
    were written. A chorus-splat model's latents and heads come along (``sem_*`` columns and the
    ``.semantic.pt`` sidecar, as ``splatsem-export`` writes them), so the probe can read its features; the pair is
    written atomically (``SemanticScene.save``)."""
    from dataclasses import replace

    from splatsem_ns.export.loader import SemanticScene

    scene = SemanticScene.from_model(model)
    means, log_scales, quats = to_scene_frame(
        scene.means.float().cpu(),
        scene.scales.float().cpu(),
        torch.nn.functional.normalize(scene.quats.float().cpu(), dim=-1),
        torch.as_tensor(transform).float(),
        scale,
    )
    moved = replace(
        scene,
        means=means,
        scales=log_scales,
        quats=quats,
        opacities=scene.opacities.float().cpu(),
        features_dc=scene.features_dc.float().cpu(),
        # Higher SH bands are left out: rotating them into the scene's frame is not needed by the encoder, which
        # reads colour from the DC term only.
        features_rest=scene.features_rest.float().cpu()[:, :0],
        latent=None if scene.latent is None else scene.latent.float().cpu(),
        sh_degree=0,
    )
    return int(moved.save(Path(path)).num_written)


def _write_json(path: Path, record: Dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def main() -> None:
    """Entry point of ``splatsem-fit-collection``."""
    tyro.cli(FitCollection).main()


if __name__ == "__main__":
    main()


__all__: List[str] = ["FitCollection", "write_scene_gaussians"]
