"""``splatsem-encode``: semantic features for any 3DGS scene from a pretrained Chorus encoder, in one forward pass.

::

    splatsem-encode --scene scene.ply --checkpoint outputs/.../chorus-pretrain/<timestamp>/config.yml
    splatsem-encode --scene outputs/.../splatfacto/<timestamp>/config.yml --checkpoint .../config.yml

``--scene`` is a 3DGS PLY (INRIA's, nerfstudio's, this package's) or a trained run's config.yml (splatfacto,
chorus-splat). The encoder (restored from its run's checkpoint alone, without its collection) gives every Gaussian
a latent, and the result is written as splatsem-export writes a chorus-splat scene: ``<name>.ply`` with ``sem_*``
columns and the ``<name>.semantic.pt`` sidecar holding the encoder's projector heads, so the loader, queries and
the viewer treat it like any exported scene.

The encoder's voxels are metric (2 cm by default), so the Gaussians are encoded in metres: a PLY is taken to be in
metres unless ``--metres-per-unit`` says otherwise; a run's Gaussians live in nerfstudio's normalised frame and are
scaled back by its dataparser scale. The written file keeps the scene's own frame and units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import tyro

from splatsem_ns.export.loader import SemanticScene, _teacher_infos, load_semantic_scene
from splatsem_ns.export.semantic_ply import SemanticExportError, WrittenPly


@dataclass
class EncodeScene:
    """Encode a 3DGS scene with a pretrained Chorus encoder and write it as a semantic PLY + sidecar."""

    scene: Path
    """A 3DGS .ply, or a trained splatfacto / chorus-splat run's config.yml."""
    checkpoint: Path
    """The chorus-pretrain run's config.yml (its latest checkpoint is used)."""
    output_dir: Path = Path("exports")
    """Folder for the PLY and its sidecar (created if needed)."""
    name: str = "scene"
    """File stem: writes ``<name>.ply`` and ``<name>.semantic.pt``."""
    metres_per_unit: Optional[float] = None
    """Metres per unit of the scene's coordinates (default: 1 for a PLY; for a run, from its dataparser scale)."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the encoder runs."""

    def main(self) -> WrittenPly:
        import yaml
        from nerfstudio.utils.rich_utils import CONSOLE

        from splatsem_ns.models.semantic_splat import restore_network_model
        from splatsem_ns.teachers.registry import configured_teachers

        start = time.perf_counter()
        scene, unit = self._load_scene()
        if self.metres_per_unit is not None:
            unit = self.metres_per_unit
        if not unit > 0:
            raise SystemExit(f"splatsem-encode: --metres-per-unit must be positive, got {unit}")
        model = restore_network_model(self.checkpoint, "ns-train chorus-pretrain", self.device)
        if not hasattr(model, "encoder"):
            raise SystemExit(f"splatsem-encode: {self.checkpoint} is not a chorus-pretrain run")
        run = yaml.load(Path(self.checkpoint).read_text(), Loader=yaml.Loader)
        dm = run.pipeline.datamanager
        teacher_configs = configured_teachers(dm.teachers, dm.teacher_checkpoints, dm.teacher_random_weights)
        with torch.no_grad():
            latent = model.encoder(
                scene.means.to(self.device) * unit,
                scene.features_dc.to(self.device),
                scene.opacities.to(self.device),
                scene.scales.to(self.device) + math.log(unit),
                scene.quats.to(self.device),
            ).cpu()
        heads = {name: head.cpu().eval() for name, head in model.projector_heads.items()}
        encoded = replace(
            scene,
            latent=latent,
            heads=heads,
            teachers=_teacher_infos(model, heads, teacher_configs),
            source=f"{self.scene} encoded by {self.checkpoint}",
        )
        CONSOLE.print(
            f"Encoded {encoded.num_gaussians} Gaussians ({unit:g} m per unit) in {time.perf_counter() - start:.1f} s; "
            f"heads: {', '.join(heads) or 'none'}."
        )
        ply = self.output_dir / f"{self.name}.ply"
        try:
            written = encoded.save(ply, source_config=self.checkpoint)
        except SemanticExportError as err:
            raise SystemExit(f"splatsem-encode: {err}") from err
        CONSOLE.print(f"Wrote {written.num_written} Gaussians to {ply} and {written.sidecar}.")
        return written

    def _load_scene(self) -> "tuple[SemanticScene, float]":
        """The scene's Gaussians and its metres per unit (1 for a PLY; a run's from its dataparser scale)."""
        path = Path(self.scene)
        if not path.exists():
            raise SystemExit(f"splatsem-encode: {path} does not exist")
        if path.suffix == ".ply":
            return load_semantic_scene(path), 1.0
        from nerfstudio.utils.eval_utils import eval_setup

        import splatsem_ns.method_configs.chorus_splat  # noqa: F401 (allow-lists the checkpoint's numpy scalars)

        _, pipeline, _, _ = eval_setup(path, test_mode="inference")
        scene = SemanticScene.from_model(pipeline.model)
        scale = float(pipeline.datamanager.train_dataparser_outputs.dataparser_scale)
        return scene, 1.0 / scale


def main() -> None:
    """Entry point of ``splatsem-encode``."""
    tyro.cli(EncodeScene).main()


if __name__ == "__main__":
    main()
