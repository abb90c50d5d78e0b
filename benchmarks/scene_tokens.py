"""What scene tokens cost: ns-eval's segmentation scores of a chorus-splat run with its own per-Gaussian latents,
and with latents decoded back from K tokens.

    python benchmarks/scene_tokens.py --load-config outputs/.../chorus-splat/<timestamp>/config.yml --out DIR \\
        [--tokens 256 512 2048]

The run is restored as ns-eval restores it; for each K the scene's tokens are made (``splatsem_ns.export.tokens``),
every Gaussian's latent is replaced by the one decoded from its nearest tokens, and the pipeline's own protocol
(3D 25-NN vote and fg-mIoU on the labelled points, 2D mIoU at the held-out views) scores it. The JSON
(``"benchmark": "scene_tokens"``) and a markdown table are written at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_markdown  # noqa: E402


def headline(scores: Dict[str, Any]) -> Dict[str, Any]:
    """3D fg-mIoU and mIoU, 2D held-out mIoU of a ``semantic_metrics`` result."""
    out = {}
    for key, name in (("semantic_3d", "3d"), ("semantic_2d", "2d")):
        if key in scores:
            out[f"{name}_miou"] = scores[key].get("miou")
            out[f"{name}_fg_miou"] = scores[key].get("fg_miou")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load-config", type=Path, required=True, help="a chorus-splat run's config.yml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 2048])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from nerfstudio.utils.eval_utils import eval_setup

    import splatsem_ns.method_configs.chorus_splat  # noqa: F401 (allow-lists the checkpoint's numpy scalars)
    from splatsem_ns.export.loader import SemanticScene
    from splatsem_ns.export.tokens import scene_tokens

    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="test")
    model = pipeline.model
    latent = model.gauss_params["semantic_latent"]
    own = latent.data.clone()
    rows = {"per-Gaussian latents": {"tokens": None, **headline(pipeline.semantic_metrics())}}
    scene = SemanticScene.from_model(model)
    for k in args.tokens:
        start = time.perf_counter()
        tokens = scene_tokens(scene, k)
        seconds = time.perf_counter() - start
        latent.data = tokens.decode_latent(model.means.detach().cpu()).to(own)
        try:
            rows[f"{k} tokens"] = {
                "tokens": k,
                "seconds": round(seconds, 2),
                **headline(pipeline.semantic_metrics()),
            }
        finally:
            latent.data = own.clone()
    report = {
        "benchmark": "scene_tokens",
        "device": device_name(),
        "run": str(args.load_config),
        "num_gaussians": int(own.shape[0]),
        "rows": rows,
    }
    (args.out / "scene_tokens.json").write_text(json.dumps(report, indent=1))

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [
        "# Scene tokens: segmentation through K tokens against the per-Gaussian latents",
        "",
        f"- device: {report['device']}; run `{report['run']}`; {report['num_gaussians']} Gaussians",
        "",
        "| latents | 3D fg-mIoU | 3D mIoU | 2D held-out mIoU | tokenising time |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        seconds = f"{row['seconds']} s" if "seconds" in row else "-"
        lines.append(
            f"| {label} | {pct(row.get('3d_fg_miou'))} | {pct(row.get('3d_miou'))} | {pct(row.get('2d_miou'))} | {seconds} |"
        )
    write_markdown(args.out / "scene_tokens.md", lines)


if __name__ == "__main__":
    main()
