"""Scene collections at scale: generation speed, datamanager throughput with teacher features, host RAM, and the
realism check (simple statistics of generated scenes beside real captures).

    python benchmarks/scene_collections.py --out DIR --num-scenes 600 [--real ../shared/data/scannet_scene0000_00]
        [--teachers siglip2-b16 dinov2-s14 sam-vit-b --random-weights] [--loader-workers 8 --batch-size 4]

1. ``scenes_per_min``: ``splatsem-synthetic --num-scenes N`` with one worker per CPU (24 views at 256x320 by
   default), timed end to end (index included).
2. Teacher features: the datamanager's set-up extracts every image of the collection (timed, images/s).
3. ``samples_per_s``: batches drawn through the DataLoader (worker processes, pinned memory) after a warm-up,
   each sample 2 context + 4 target views with depth, labels and every teacher's features; against it, how many
   samples a training step of semantic-splat consumes per second at the measured step time (when given).
4. Host RAM: peak resident memory of this process and of its DataLoader workers.
5. Statistics of a sample of generated scenes and of each real scene (``splatsem_ns.data.scene_statistics``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, write_markdown  # noqa: E402


def rss_gib() -> Dict[str, float]:
    """Peak resident memory of this process and the largest of its finished or running children (GiB)."""
    children = 0.0
    try:
        import psutil

        now = psutil.Process()
        children = sum(c.memory_info().rss for c in now.children(recursive=True)) / 2**30
        current = now.memory_info().rss / 2**30
    except ImportError:  # pragma: no cover
        current = float("nan")
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "self_peak": round(peak_self, 2),
        "self_now": round(current, 2),
        "workers_now": round(children, 2),
    }


def generate(args, report: Dict[str, Any]) -> Path:
    from splatsem_ns.data.procedural.generate import CollectionConfig, generate_collection
    from splatsem_ns.data.procedural.scene import ProceduralSceneConfig

    out = args.out / "collection"
    workers = args.workers or os.cpu_count() or 1
    scene = ProceduralSceneConfig(num_views=args.views, width=args.size[1], height=args.size[0])
    start = time.perf_counter()
    generate_collection(
        out, CollectionConfig(num_scenes=args.num_scenes, seed=args.seed, workers=workers, scene=scene)
    )
    seconds = time.perf_counter() - start
    report["generation"] = {
        "scenes": args.num_scenes,
        "views_per_scene": args.views,
        "size": list(args.size),
        "workers": workers,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 1),
        "scenes_per_min": round(60 * args.num_scenes / seconds, 1),
        "seconds_per_scene_per_worker": round(seconds * workers / args.num_scenes, 2),
    }
    return out / "collection.json"


def throughput(args, index: Path, report: Dict[str, Any]) -> None:
    from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig

    config = MultiSceneDataManagerConfig(
        data=index,
        image_size=tuple(args.size),
        teachers=tuple(args.teachers),
        teacher_random_weights=args.random_weights,
        feature_cache_dir=args.out / "feature_cache",
        num_workers=args.loader_workers,
        batch_size=args.batch_size,
        extraction_workers=args.extraction_workers,
        eval_split="test",
        max_scenes=args.loader_scenes,
    )
    start = time.perf_counter()
    manager = config.setup(device="cuda" if torch.cuda.is_available() else "cpu", test_mode="val")
    setup = time.perf_counter() - start
    images = sum(
        s.num_views for s in {s.name: s for s in manager.train_scenes + manager.eval_scenes}.values()
    )
    report["features"] = {
        "teachers": list(args.teachers),
        "random_weights": args.random_weights,
        "images": images,
        "setup_s": round(setup, 1),
        "images_per_s_all_teachers": round(images / setup, 1),
        "note": "set-up = feature extraction of every image plus the collection's index and loaders",
    }
    stamps: List[float] = []
    for step in range(args.warmup + args.batches):
        manager.next_train(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    steady = np.diff(stamps[args.warmup :])
    per_batch = float(np.median(steady))
    report["loader"] = {
        "loader_workers": args.loader_workers,
        "batch_size": args.batch_size,
        "views_per_sample": config.views.views_per_sample,
        "batches_timed": len(steady),
        "ms_per_batch_median": round(1000 * per_batch, 1),
        "samples_per_s": round(args.batch_size / float(np.mean(steady)), 1),
        "samples_per_s_median_batch": round(args.batch_size / per_batch, 1),
        "host_ram_gib": rss_gib(),
    }
    if args.step_ms:
        need = args.batch_size / (args.step_ms / 1000.0)
        report["loader"]["training_consumes_samples_per_s"] = round(need, 1)
        report["loader"]["keeps_up"] = report["loader"]["samples_per_s"] >= need


def realism(args, index: Path, report: Dict[str, Any]) -> None:
    from splatsem_ns.data.class_tables import NYU40
    from splatsem_ns.data.collection import SceneCollection
    from splatsem_ns.data.scene_statistics import scene_statistics

    collection = SceneCollection.load(index)
    picked = collection.scenes[:: max(1, len(collection.scenes) // args.stat_scenes)][: args.stat_scenes]
    generated = [scene_statistics(collection.scene_path(s), NYU40) for s in picked]
    shares: Dict[str, List[float]] = {}
    for stats in generated:
        for name, share in (stats.get("class_shares") or {}).items():
            shares.setdefault(name, []).append(share)
    summary = {
        "scenes": len(generated),
        "depth_percentiles_m": {
            p: round(statistics.median(s["depth_percentiles_m"][p] for s in generated), 2)
            for p in ("5", "50", "95")
        },
        "depth_missing": round(statistics.mean(s["depth_missing"] for s in generated), 3),
        "colour_mean": np.round(np.mean([s["colour_mean"] for s in generated], axis=0), 3).tolist(),
        "colour_std": np.round(np.mean([s["colour_std"] for s in generated], axis=0), 3).tolist(),
        "saturation_mean": round(statistics.mean(s["saturation_mean"] for s in generated), 3),
        "gradient_mean": round(statistics.mean(s["gradient_mean"] for s in generated), 4),
        "views_per_point_median": statistics.median(s["views_per_point"]["50"] for s in generated),
        "points_unseen": round(statistics.mean(s["points_unseen"] for s in generated), 3),
        "class_shares": dict(
            sorted(
                ((k, round(sum(v) / len(generated), 4)) for k, v in shares.items()), key=lambda kv: -kv[1]
            )[:15]
        ),
    }
    report["realism"] = {"generated": summary, "real": {}}
    for path in args.real:
        report["realism"]["real"][Path(path).name] = scene_statistics(Path(path), NYU40)


def write(report: Dict[str, Any], out: Path) -> None:
    (out / "scene_collections.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["# Scene collections: generation, loading and realism", "", f"- device: {report['device']}"]
    g = report.get("generation")
    if g:
        lines.append(
            f"- generation: {g['scenes']} scenes of {g['views_per_scene']} views at {g['size'][0]}x{g['size'][1]}, "
            f"{g['workers']} workers on {g['cpus']} CPUs: {g['seconds']} s, **{g['scenes_per_min']} scenes/min** "
            f"({g['seconds_per_scene_per_worker']} s per scene per worker)"
        )
    f = report.get("features")
    if f:
        lines.append(
            f"- teacher features ({', '.join(f['teachers'])}, random weights: {f['random_weights']}): {f['images']} "
            f"images in {f['setup_s']} s, {f['images_per_s_all_teachers']} images/s for all teachers together"
        )
    loader = report.get("loader")
    if loader:
        lines.append(
            f"- loader: {loader['loader_workers']} workers, batches of {loader['batch_size']} samples of "
            f"{loader['views_per_sample']} views: **{loader['samples_per_s']} samples/s** "
            f"({loader['ms_per_batch_median']} ms per batch, median); host RAM {loader['host_ram_gib']}"
            + (
                f"; a training step at the measured pace consumes {loader['training_consumes_samples_per_s']} "
                f"samples/s (keeps up: {loader['keeps_up']})"
                if "keeps_up" in loader
                else ""
            )
        )
    real = report.get("realism")
    if real:
        gen = real["generated"]
        rows = [("generated", gen)] + list(real["real"].items())
        lines += [
            "",
            "| scenes | depth 5/50/95% (m) | no depth | colour mean (RGB) | colour std | saturation | gradient | "
            "views per point (median) | points unseen | top classes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, s in rows:
            depth = s.get("depth_percentiles_m", {})
            vpp = s.get("views_per_point_median", s.get("views_per_point", {}).get("50"))
            classes = ", ".join(
                f"{k} {100 * v:.0f}%" for k, v in list((s.get("class_shares") or {}).items())[:6]
            )
            lines.append(
                f"| {name}{' (' + str(s['scenes']) + ')' if 'scenes' in s else ''} | "
                f"{depth.get('5')}/{depth.get('50')}/{depth.get('95')} | {s.get('depth_missing')} | "
                f"{s.get('colour_mean')} | {s.get('colour_std')} | {s.get('saturation_mean')} | "
                f"{s.get('gradient_mean')} | {vpp} | {s.get('points_unseen')} | {classes} |"
            )
    write_markdown(out / "scene_collections.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-scenes", type=int, default=600)
    parser.add_argument("--views", type=int, default=24)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320))
    parser.add_argument("--workers", type=int, default=None, help="generation workers (default: every CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--collection", type=Path, help="skip generation: use this collection.json")
    parser.add_argument("--real", type=Path, action="append", default=[])
    parser.add_argument("--teachers", nargs="+", default=["siglip2-b16", "dinov2-s14", "sam-vit-b"])
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--extraction-workers", type=int, default=1)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument(
        "--loader-scenes",
        type=int,
        help="serve only the first N scenes of each split (bounds the extraction time)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--step-ms", type=float, help="a training step's time, to compare the loader against")
    parser.add_argument("--stat-scenes", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "benchmark": "scene_collections",
        "device": device_name(),
        "torch": torch.__version__,
    }
    index = args.collection or generate(args, report)
    write(report, args.out)
    realism(args, index, report)
    write(report, args.out)
    throughput(args, index, report)
    write(report, args.out)


if __name__ == "__main__":
    main()
