"""semantic-splat on the GPU: forward time, one training run within a time budget, and held-out evaluation.

    python benchmarks/semantic_splat.py --collection COLL/collection.json --out DIR --minutes 5 \\
        [--real-collection REAL/collection.json] [--teachers labels labels-instance]

1. ``forward_ms``: one forward of the full-size network on 2 context views at the training resolution (bf16
   autocast, as training runs it), median of 50 after warm-up.
2. Training: ``ns-train semantic-splat``'s configuration (the method config, its optimizers and trainer) on the
   collection's training split, for ``--minutes`` of wall time or ``--steps``; scenes per second and peak memory.
3. Evaluation: the pipeline's ns-eval protocol on the collection's held-out (test) scenes, which the network
   never saw, and separately on each real collection given: PSNR, depth AbsRel / delta < 1.25, and target-view 2D
   mIoU with the teacher on the target view and the teacher warped by the predicted depth.

With the labels proxy teachers the semantic scores say how well the network lifts such a teacher, not how a real
CLIP or SigLIP2 would do. The report is JSON (``"benchmark": "semantic_splat"``) plus a markdown table; the JSON
is rewritten after each stage, so a cut run keeps what it measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync  # noqa: E402
from feedforward_training import (  # noqa: E402
    evaluate_all,
    header_lines,
    new_report,
    train,
    training_parser,
    write_report,
)


def forward_ms(
    size, views: int, repeats: int, teacher_channels: Dict[str, int], tiny: bool = False
) -> Dict[str, Any]:
    """Median forward time of the full-size network (no teachers' own cost: their features are inputs)."""
    from splatsem_ns.feedforward.network import SemanticSplatNetworkConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = SemanticSplatNetworkConfig.tiny(teacher_channels) if tiny else SemanticSplatNetworkConfig()
    config.semantic.teacher_channels = dict(teacher_channels)
    network = config.setup().to(device).eval()
    height, width = size
    images = torch.rand(1, views, 3, height, width, device=device)
    K = torch.tensor([[0.8 * width, 0, width / 2], [0, 0.8 * width, height / 2], [0, 0, 1.0]], device=device)
    intrinsics = K.expand(1, views, 3, 3).contiguous()
    c2w = torch.eye(4, device=device).expand(1, views, 4, 4).clone()
    c2w[0, 1:, 0, 3] = torch.linspace(0.2, 0.4, views - 1, device=device)  # a baseline between the views
    features = {
        name: torch.rand(1, views, height // 14, width // 14, c, device=device, dtype=torch.float16)
        for name, c in teacher_channels.items()
    }
    times = []
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), autocast:
        for i in range(repeats + 10):
            sync()
            start = time.perf_counter()
            network(images, intrinsics, c2w, features)
            sync()
            if i >= 10:
                times.append(1000 * (time.perf_counter() - start))
    parameters = sum(p.numel() for p in network.parameters())
    return {
        "forward_ms": round(statistics.median(times), 2),
        "forward_ms_p90": round(sorted(times)[int(0.9 * len(times))], 2),
        "views": views,
        "size": list(size),
        "parameters": parameters,
        "dtype": "bf16 autocast" if device == "cuda" else "float32",
    }


def write(report: Dict[str, Any], out: Path) -> None:
    lines = header_lines(report, "semantic-splat: forward time, training and held-out evaluation", "network")
    if "forward" in report:
        f = report["forward"]
        lines.append(
            f"- forward of {f['views']} context views at {f['size'][0]}x{f['size'][1]} ({f['dtype']}, "
            f"{f['parameters'] / 1e6:.2f}M parameters): **{f['forward_ms']} ms** median (p90 {f['forward_ms_p90']} ms); "
            "target <= 50 ms; LSM 108 ms, Uni3R about 150 ms"
        )

    def num(r: Dict[str, Any], key: str, digits: int) -> str:
        return f"{r[key]:.{digits}f}" if key in r else "-"

    def miou(r: Dict[str, Any], key: str) -> str:
        return f"{100 * r[key]['miou']:.1f}" if key in r else "-"

    evaluation = report.get("evaluation", {})
    lines += [
        "",
        "Images and depth at the target views; the sensor-depth columns render the context pixels at their measured "
        "depth (no network): what these views allow.",
        "",
        "| held-out scenes | scenes | PSNR | PSNR where the context sees | PSNR at sensor depth "
        "| covered at sensor depth | depth AbsRel | depth δ<1.25 | covered pixels | AbsRel where covered "
        "| context-view AbsRel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in evaluation.items():
        lines.append(
            f"| {label} | {r.get('num_scenes')} | {num(r, 'psnr', 2)} | {num(r, 'psnr_where_views_see', 2)} | "
            f"{num(r, 'sensor_depth_psnr', 2)} | "
            f"{num(r, 'sensor_depth_coverage', 3)} | {num(r, 'target_depth_abs_rel', 3)} | "
            f"{num(r, 'target_depth_delta1', 3)} | {num(r, 'target_coverage', 3)} | "
            f"{num(r, 'target_covered_depth_abs_rel', 3)} | {num(r, 'context_depth_abs_rel', 3)} |"
        )
    lines += [
        "",
        "2D mIoU; the teacher baselines classify the teacher's own features: on the target view, and carried from the "
        "context views by the predicted and by the sensor's depth.",
        "",
        "| held-out scenes | target | teacher on the target | teacher warped by predicted depth "
        "| teacher warped by sensor depth | source (rendered) | source pixels' own latent |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in evaluation.items():
        lines.append(
            f"| {label} | {miou(r, 'semantic_2d_target')} | {miou(r, 'semantic_2d_teacher_target')} | "
            f"{miou(r, 'semantic_2d_teacher_warped_target')} | {miou(r, 'semantic_2d_teacher_sensor_warped_target')} | "
            f"{miou(r, 'semantic_2d_source')} | {miou(r, 'semantic_2d_context_latent')} |"
        )
    write_report(report, out, "semantic_splat", lines)


def main() -> None:
    parser = training_parser(__doc__)
    parser.add_argument("--skip-training", action="store_true", help="forward time only")
    parser.add_argument("--forward-repeats", type=int, default=50)
    parser.add_argument(
        "--figure", type=Path, help="write the README's prediction picture (assets/make_assets.py) here"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = new_report("semantic_splat", args)
    channels = (
        {"labels": 384, "instances": 384}
        if "labels" in args.teachers
        else {"siglip2": 768, "dinov2": 384, "sam": 256}
    )
    report["forward"] = forward_ms(tuple(args.size), 2, args.forward_repeats, channels, args.tiny)
    write(report, args.out)
    if args.skip_training:
        return
    trainer = train(args, args.out, report, "semantic-splat")
    write(report, args.out)
    evaluate_all(trainer.pipeline, args, report, lambda: write(report, args.out))
    if args.figure is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "assets"))
        from make_assets import make_prediction

        args.figure.mkdir(parents=True, exist_ok=True)
        print(f"wrote {make_prediction(args.figure, trainer.pipeline)}", flush=True)


if __name__ == "__main__":
    main()
