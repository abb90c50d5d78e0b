"""The Chorus encoder on the GPU: one chorus-pretrain run within a time budget, its zero-shot scores on scenes it
never saw, and the linear probe of its frozen features.

    python benchmarks/chorus_encoder.py --collection COLL/collection.json --out DIR --minutes 5 \\
        [--real-collection REAL/collection.json] [--gaussians labeled_points]

1. Training: ``ns-train chorus-pretrain``'s configuration on the collection's training split, for ``--minutes`` of
   wall time or ``--steps``; scenes per second and peak memory.
2. Zero-shot: chorus-pretrain's ns-eval on the collection's held-out (test) scenes and separately on each real
   collection: per-teacher cosine, target-view 2D mIoU beside the teacher on those views, and 3D mIoU / fg-mIoU
   of the 25-NN vote of the decoded Gaussians onto the labelled points; beside them the same vote over the points
   the scene's views see, and the teacher back-projected from those views (what the views support in 3D).
3. The linear probe (``linear_probe.py``) on the same collection: the trained encoder's frozen features against
   raw colour and position, at 1, 5, 20 and 100% of the training points.

The encoder's speed on 1M Gaussians is ``encoder_speed.py``'s report. With the labels proxy teachers the scores say
how well the encoder lifts such a teacher, not how a real CLIP or SigLIP2 would do. The JSON
(``"benchmark": "chorus_encoder"``) and markdown are rewritten after each stage, so a cut run keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_point_shape_argument  # noqa: E402
from feedforward_training import (  # noqa: E402
    evaluate_all,
    header_lines,
    new_report,
    train,
    training_parser,
    write_report,
)
from linear_probe import probe_lines, probe_report  # noqa: E402


def write(report: Dict[str, Any], out: Path) -> None:
    lines = header_lines(report, "Chorus encoder: pretraining, zero-shot scores and linear probe", "encoder")
    lines += [
        "",
        "| zero-shot on | scenes | cosine (query teacher) | best constant's cosine | target 2D mIoU "
        "| teacher on the target | 3D mIoU | 3D fg-mIoU | 3D fg-mIoU through tokens "
        "| 3D fg-mIoU, points the views see | teacher back-projected, 3D fg-mIoU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(r: Dict[str, Any], key: str, field: str = "miou") -> str:
        value = (r.get(key) or {}).get(field)
        return "-" if value is None else f"{100 * value:.1f}"

    def through_tokens(r: Dict[str, Any]) -> str:
        counts = sorted(int(key.rsplit("_", 1)[1]) for key in r if key.startswith("semantic_3d_tokens_"))
        return ", ".join(f"{pct(r, f'semantic_3d_tokens_{k}', 'fg_miou')} ({k})" for k in counts) or "-"

    teacher = report["teachers"][0]
    for label, r in report.get("evaluation", {}).items():
        cosine, constant = r.get(f"cosine_{teacher}"), r.get(f"constant_cosine_{teacher}")
        lines.append(
            f"| {label} | {r.get('num_scenes')} | {'-' if cosine is None else f'{cosine:.3f}'} | "
            f"{'-' if constant is None else f'{constant:.3f}'} | "
            f"{pct(r, 'semantic_2d_target')} | {pct(r, 'semantic_2d_teacher_target')} | "
            f"{pct(r, 'semantic_3d')} | {pct(r, 'semantic_3d', 'fg_miou')} | {through_tokens(r)} | "
            f"{pct(r, 'semantic_3d_in_views', 'fg_miou')} | "
            f"{pct(r, 'semantic_3d_teacher_backprojected', 'fg_miou')} |"
        )
    if "probe" in report:
        lines += ["", "## Linear probe", ""] + probe_lines(report["probe"])
    write_report(report, out, "chorus_encoder", lines)


def main() -> None:
    parser = training_parser(__doc__)
    parser.add_argument(
        "--gaussians",
        default="labeled_points",
        choices=("auto", "ply", "points", "labeled_points"),
        help="each scene's Gaussians (--pipeline.datamanager.gaussians); the labelled cloud is the densest a "
        "generated scene offers without a fit",
    )
    parser.add_argument(
        "--max-gaussians",
        type=int,
        help="at most this many Gaussians per sample (default: the datamanager's)",
    )
    parser.add_argument(
        "--gaussian-subset",
        choices=("random", "views"),
        help="which Gaussians a scene above --max-gaussians serves (default: the datamanager's)",
    )
    add_point_shape_argument(parser, "as --pipeline.datamanager.point-shape")
    parser.add_argument("--probe-max-scenes", type=int, default=50, help="scenes per split in the probe")
    parser.add_argument("--probe-max-points", type=int, default=20000, help="labelled points per scene")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = new_report("chorus_encoder", args)
    report["gaussians"] = args.gaussians
    report["point_shape"] = args.point_shape
    trainer = train(args, args.out, report, "chorus-pretrain")
    write(report, args.out)
    evaluate_all(trainer.pipeline, args, report, lambda: write(report, args.out))
    probe_args = argparse.Namespace(
        collection=args.collection,
        checkpoint=report.get("run_config"),
        chorus_teacher=args.teachers[0],
        train_split="train",
        test_split="test",
        max_scenes=args.probe_max_scenes,
        max_points=args.probe_max_points,
        max_distance=0.1,
        gaussians=args.gaussians,
        point_shape=args.point_shape,
        device=str(trainer.pipeline.model.device),
        note=["the encoder of this run, frozen"],
    )
    try:
        report["probe"] = probe_report(trainer.pipeline.model.eval(), probe_args)
    except Exception as err:
        traceback.print_exc()
        report["notes"].append(f"linear probe failed: {type(err).__name__}: {err}")
    write(report, args.out)


if __name__ == "__main__":
    main()
