"""Per-scene chorus-splat trained on the context views alone: semantic-splat's third baseline.

    python benchmarks/context_baseline.py --collection COLL/collection.json --out DIR --scenes 10 --steps 1000

For each of the first N held-out scenes, the sample that semantic-splat's ns-eval scores (the same context and
target views: the datamanager's seeded choice, at the same image size) becomes a small capture: its context views
train chorus-splat, seeded from their own depth so that it sees nothing the network does not; its target views are
held out. chorus-splat's renders at the targets are then scored with semantic-splat's protocol on the same pixels:
PSNR, depth AbsRel against the sensor, and target-view 2D mIoU over the collection's classes with the same query
teacher (the labels proxy by default: the scores say how well per-scene optimisation lifts that proxy).

The JSON (``"benchmark": "semantic_splat_context_baseline"``) and a markdown table are rewritten after each scene,
so a cut run keeps what it measured. ``--compare semantic_splat.json`` adds the network's own per-scene PSNR and
AbsRel on the same scenes (from benchmarks/semantic_splat.py's report of the same collection); ``--rewrite`` only
re-renders the markdown of an existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_trainer, device_name, seed_everything, trainer_config, write_markdown  # noqa: E402

LINKED = ("images", "depth", "labels", "instances", "classes.json")
"""What a capture of a collection scene borrows from the scene's folder (symbolic links)."""


def context_capture(scene: Path, context: Sequence[int], targets: Sequence[int], out: Path) -> Path:
    """A capture folder holding ``scene``'s context views for training and its target views held out
    (transforms.json split lists), without the scene's point clouds: seeds come from the context views' depth."""
    meta = json.loads((scene / "transforms.json").read_text())
    frames = meta["frames"]
    out.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if (scene / name).exists() and not (out / name).exists():
            os.symlink((scene / name).resolve(), out / name)
    for key in ("ply_file_path", "labeled_ply_file_path"):
        meta.pop(key, None)
    meta["frames"] = [frames[i] for i in [*context, *targets]]
    meta["train_filenames"] = [frames[i]["file_path"] for i in context]
    meta["val_filenames"] = meta["test_filenames"] = [frames[i]["file_path"] for i in targets]
    (out / "transforms.json").write_text(json.dumps(meta, indent=1))
    return out


@torch.no_grad()
def score_targets(
    pipeline,
    sample: Dict[str, Any],
    target_files: Sequence[str],
    text: torch.Tensor,
    ids: List[int],
    teacher: str,
    matrix,
):
    """PSNR and depth AbsRel of chorus-splat's renders at the sample's target views (``target_files``: their
    images), and their 2D segmentation added to ``matrix``."""
    from splatsem_ns.evaluation.protocol import accumulate_2d, classify_map
    from splatsem_ns.models.heads import resize_feature_map
    from splatsem_ns.models.semantic_splat import depth_metrics, psnr_from_mse

    model = pipeline.model.eval()
    dataset = pipeline.datamanager.eval_dataset
    scale = float(pipeline.datamanager.train_dataparser_outputs.dataparser_scale)
    target = sample["target"]
    names = [Path(p).name for p in dataset.image_filenames]
    psnrs, rels = [], []
    for v, file in enumerate(target_files):
        wanted = Path(file).name
        if wanted not in names:
            raise RuntimeError(f"target view {wanted} is not among the held-out views {names}")
        i = names.index(wanted)
        outputs = model.get_outputs_for_camera(dataset.cameras[i : i + 1].to(model.device))
        real = target["images"][v].float().to(model.device) / 255.0
        if tuple(outputs["rgb"].shape[:2]) != tuple(real.shape[:2]):
            raise RuntimeError(
                f"render {tuple(outputs['rgb'].shape)} and served view {tuple(real.shape)} differ"
            )
        psnrs.append(float(psnr_from_mse(((outputs["rgb"] - real) ** 2).mean())))
        depth = outputs["depth"][..., 0] / scale  # back in the scene's metres
        rels.append(depth_metrics(depth.cpu(), target["depth"][v]).get("depth_abs_rel", float("nan")))
        features = model.decode_features(outputs["semantic_latent"], teacher)
        features = resize_feature_map(features, tuple(real.shape[:2]))
        accumulate_2d(matrix, classify_map(features, text, ids), target["labels"][v].long(), ids)
    return float(np.mean(psnrs)), float(np.nanmean(rels))


def network_rows(report: Dict[str, Any], network_report: Path) -> List[str]:
    """The semantic-splat network's per-scene scores on the scenes of ``report`` (the same samples: ns-eval's
    seeded choice), as markdown rows."""
    network = json.loads(network_report.read_text())
    rows = []
    for label, evaluation in network.get("evaluation", {}).items():
        scored = {s["scene"]: s for s in evaluation.get("per_scene", [])}
        scenes = [s["scene"] for s in report["per_scene"] if s["scene"] in scored]
        if not scenes:
            continue
        psnr = np.mean([scored[n]["psnr"] for n in scenes])
        rel = np.mean([scored[n]["target_depth_abs_rel"] for n in scenes])
        counts = [scored[n].get("target_confusion") for n in scenes]
        if all(c is not None for c in counts):  # the network's own counts on exactly these scenes
            from splatsem_ns.evaluation.metrics import ConfusionMatrix

            pooled = ConfusionMatrix.from_counts(counts[0])
            for c in counts[1:]:
                pooled.merge(ConfusionMatrix.from_counts(c))
            miou_text = f"{100 * pooled.miou():.1f}"
        else:  # reports from before per-scene counts were kept: only the mIoU over every scored scene
            miou = evaluation.get("semantic_2d_target", {}).get("miou")
            miou_text = (
                f"{100 * miou:.1f} (all {evaluation.get('num_scenes')} scenes)" if miou is not None else "-"
            )
        rows.append(
            f"| semantic-splat network, {label} ({network_report.name}) | {len(scenes)} | {psnr:.2f} | {rel:.3f} | "
            f"{miou_text} | one forward |"
        )
    return rows


def write(report: Dict[str, Any], out: Path) -> None:
    (out / "context_baseline.json").write_text(json.dumps(report, indent=1, default=str))
    r = report.get("summary", {})
    lines = [
        "# semantic-splat's per-scene baseline: chorus-splat trained on the context views alone",
        "",
        f"- device: {report['device']}; collection `{report['collection']}`; {report['steps']} steps per scene; "
        f"teachers {', '.join(report['teachers'])} (labels proxy: the scores say how per-scene optimisation lifts "
        "that proxy)",
        "",
        "| method | held-out scenes | PSNR | depth AbsRel | target 2D mIoU | time per scene |",
        "|---|---|---|---|---|---|",
        f"| chorus-splat on the context views, {report['steps']} steps | {r.get('scenes', 0)} | "
        f"{r.get('psnr', float('nan')):.2f} | {r.get('depth_abs_rel', float('nan')):.3f} | "
        f"{100 * r.get('miou_2d_target', float('nan')):.1f} | {r.get('seconds_per_scene', float('nan')):.1f} s |",
    ]
    if report.get("compare"):
        lines += network_rows(report, Path(report["compare"]))
    write_markdown(out / "context_baseline.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenes", type=int, default=10, help="the first N held-out scenes")
    parser.add_argument("--steps", type=int, default=1000, help="chorus-splat steps per scene")
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), help="as semantic-splat was scored")
    parser.add_argument("--split", default="test")
    parser.add_argument("--teachers", nargs="+", default=["labels", "labels-instance"])
    parser.add_argument("--query-teacher", default="labels")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--compare", type=Path, help="benchmarks/semantic_splat.py's JSON of the same collection"
    )
    parser.add_argument("--rewrite", action="store_true", help="re-render OUT/context_baseline.md only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rewrite:
        report = json.loads((args.out / "context_baseline.json").read_text())
        report["compare"] = str(args.compare) if args.compare else report.get("compare")
        write(report, args.out)
        return

    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig
    from splatsem_ns.evaluation.metrics import ConfusionMatrix
    from splatsem_ns.evaluation.protocol import SemanticEvalConfig, class_queries, score
    from splatsem_ns.teachers.registry import make_teacher_config

    # No teachers here: only the seeded choice of views and the served pixels are needed, as ns-eval draws them.
    manager = MultiSceneDataManagerConfig(
        data=args.collection, image_size=tuple(args.size), teachers=(), eval_split=args.split, num_workers=0
    ).setup(device="cpu", test_mode="test")
    dataset = manager.eval_dataset
    collection = manager.collection
    ids, names = class_queries(collection.classes)
    text = make_teacher_config(args.query_teacher).setup().encode_text(names).float()
    matrix = ConfusionMatrix(len(ids))
    report: Dict[str, Any] = {
        "benchmark": "semantic_splat_context_baseline",
        "device": device_name(),
        "collection": str(args.collection),
        "steps": args.steps,
        "teachers": list(args.teachers),
        "compare": str(args.compare) if args.compare else None,
        "per_scene": [],
    }
    count = min(args.scenes, len(dataset.scenes))
    for sample_id in range(count):  # sample i of epoch 0 is scene i of the eval order, as in ns-eval
        seed_everything(args.seed)
        sample = dataset[sample_id]
        entry = dataset.scenes[dataset.scene_of(sample_id)]
        context = sample["context"]["view_indices"].tolist()
        targets = sample["target"]["view_indices"].tolist()
        capture = context_capture(
            collection.scene_path(entry), context, targets, args.out / "captures" / entry.name
        )
        start = time.perf_counter()
        cfg = trainer_config(
            "chorus-splat",
            capture,
            args.out / "runs" / entry.name,
            args.steps,
            teachers=args.teachers,
            overrides={"dataparser.seed_points": "depth"},
        )
        trainer = build_trainer(cfg)
        trainer.train()
        text_device = text.to(trainer.pipeline.model.device)
        frames = json.loads((capture / "transforms.json").read_text())["frames"]
        target_files = [f["file_path"] for f in frames[len(context) :]]
        psnr, rel = score_targets(
            trainer.pipeline, sample, target_files, text_device, ids, args.query_teacher, matrix
        )
        seconds = time.perf_counter() - start
        report["per_scene"].append(
            {"scene": entry.name, "context": context, "targets": targets, "psnr": psnr, "depth_abs_rel": rel,
             "seconds": round(seconds, 1)}
        )  # fmt: skip
        scores = score(matrix, names, SemanticEvalConfig())
        per = report["per_scene"]
        report["summary"] = {
            "scenes": len(per),
            "psnr": float(np.mean([s["psnr"] for s in per])),
            "depth_abs_rel": float(np.nanmean([s["depth_abs_rel"] for s in per])),
            "miou_2d_target": scores["miou"],
            "macc_2d_target": scores.get("macc"),
            "seconds_per_scene": statistics.median(s["seconds"] for s in per),
        }
        write(report, args.out)


if __name__ == "__main__":
    main()
