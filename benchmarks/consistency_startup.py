"""Start-up cost of the cross-view consistency check on large captures: every pair of views against each view's
nearest cameras.

    python benchmarks/consistency_startup.py --out DIR [--views 150 400 1000] [--size 96 128]

For each view count, one procedural scene is filmed along a walk of that many views (``splatsem-synthetic``'s
generator), and ``consistency_weights`` runs on it twice: with every pair of views checked (the rule up to
``all_pairs_up_to``), and with each view checked against its ``nearest_views`` nearest cameras (the rule past it).
The features are the scene's own labels pooled on a 14-pixel grid and mapped to 384 channels by a fixed random
matrix: the check's cost depends on the grid and the channels, not on what the features mean. Reports the seconds
of each, the projections made and the share of cells given weight 0. The JSON (``"benchmark":
"consistency_startup"``) and markdown are rewritten after each measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_markdown  # noqa: E402


def scene_views(count: int, size, root: Path, seed: int):
    """The ``ViewLabels`` (cameras and depth) and the pooled label features of a generated scene of ``count``
    views."""
    import torch.nn.functional as F

    from splatsem_ns.data.procedural.generate import CollectionConfig, generate_collection
    from splatsem_ns.data.procedural.scene import ProceduralSceneConfig
    from splatsem_ns.data.scene_frames import SceneFrames
    from splatsem_ns.evaluation.voting import ViewLabels

    height, width = size
    scene = ProceduralSceneConfig(num_views=count, width=width, height=height)
    collection = generate_collection(root, CollectionConfig(num_scenes=1, seed=seed, workers=2, scene=scene))
    frames = SceneFrames.load(collection.scene_path(collection.scenes[0]))
    projection = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    views, features = [], []
    for i in range(len(frames)):
        view = frames.load_view(i, (height, width))
        views.append(
            ViewLabels(
                labels=np.zeros((1, 1), dtype=np.int64),
                K=view.intrinsics.astype(np.float64),
                camera_to_world=view.camera_to_world[:3].astype(np.float64),
                image_size=(height, width),
                depth=view.depth.astype(np.float32),
            )
        )
        one_hot = F.one_hot(torch.from_numpy(view.labels.astype(np.int64)) % 64, 64).float()  # [H, W, 64]
        grid = F.adaptive_avg_pool2d(one_hot.permute(2, 0, 1)[None], (height // 14, width // 14))[0]
        features.append(grid.permute(1, 2, 0) @ projection)
    return views, features


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--views", type=int, nargs="+", default=[150, 400, 1000])
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import splatsem_ns.teachers.consistency as consistency
    from splatsem_ns.teachers.consistency import ConsistencyConfig, consistency_weights

    projections = {"count": 0}
    original = consistency.visible_cells

    def counted(*a, **k):
        projections["count"] += 1
        return original(*a, **k)

    consistency.visible_cells = counted
    report: Dict[str, Any] = {
        "benchmark": "consistency_startup",
        "device": device_name(),
        "torch_threads": torch.get_num_threads(),
        "size": list(args.size),
        "rows": [],
    }
    rows: List[Dict[str, Any]] = report["rows"]
    for count in args.views:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            views, features = scene_views(count, tuple(args.size), Path(tmp) / "scene", args.seed)
            generated = time.perf_counter() - start
        for rule, config in (
            ("nearest cameras", ConsistencyConfig(all_pairs_up_to=0)),
            ("every pair", ConsistencyConfig(all_pairs_up_to=10**9)),
        ):
            projections["count"] = 0
            start = time.perf_counter()
            weights = consistency_weights(features, views, config, depth_tolerance=0.1)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "views": len(views),
                    "rule": rule,
                    "seconds": round(seconds, 2),
                    "projections": projections["count"],
                    "dropped": round(float(np.mean([1.0 - w.mean() for w in weights])), 4),
                    "scene_generation_s": round(generated, 1),
                }
            )
            write(report, args.out)


def write(report: Dict[str, Any], out: Path) -> None:
    (out / "consistency_startup.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Cross-view consistency at start-up: every pair against the nearest cameras",
        "",
        f"- device: {report['device']} ({report['torch_threads']} threads); views of "
        f"{report['size'][0]}x{report['size'][1]}, features on a 14-pixel grid, 384 channels",
        "",
        "| views | rule | seconds | projections | cells given weight 0 |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['views']} | {r['rule']} | {r['seconds']} | {r['projections']} | {100 * r['dropped']:.1f}% |"
        )
    write_markdown(out / "consistency_startup.md", lines)


if __name__ == "__main__":
    main()
