"""Linear probe of the Chorus encoder's frozen features on a collection's labelled points.

    python benchmarks/linear_probe.py --collection COLL/collection.json --checkpoint PRETRAIN/config.yml --out DIR

The probe (``splatsem_ns.evaluation.linear_probe``) is fitted on the labelled points of the training split's scenes
and scored on the held-out split's, at 1, 5, 20 and 100% of the training points, for each kind of feature:
- ``encoder``: the pretrained encoder's latent of each point's nearest Gaussian (each scene's Gaussians as
  chorus-pretrain is served them, ``--gaussians``: by default its fitted gaussians.ply, else its seed points);
- ``raw``: that Gaussian's colour and position relative to the scene's centre (the probe's floor).
- ``chorus-splat``: per-scene chorus-splat latents, decoded into one teacher's space (``--chorus-teacher``, a
  space every scene shares) by each scene's own head: read from the scenes' gaussians.ply where
  ``splatsem-fit-collection --method chorus-splat`` wrote them with their heads; the row is left out unless every
  scene has them.
Without ``--checkpoint`` the encoder row is left out. Class ids are the collection's (scenes with their own class
table are mapped by name). The JSON (``"benchmark": "linear_probe"``) and markdown are written at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_point_shape_argument, device_name, write_markdown  # noqa: E402


def scene_points(scene: Path, classes: Dict[int, str], max_points: int, rng) -> Tuple[np.ndarray, np.ndarray]:
    """A scene's labelled points (at most ``max_points``) and their labels as collection class ids."""
    from splatsem_ns.data.scene_frames import SceneFrames

    found = SceneFrames.load(scene).labelled_points(classes)
    if found is None:
        raise ValueError(f"{scene} has no labelled points")
    xyz, labels = found
    if len(labels) > max_points:
        keep = np.sort(rng.choice(len(labels), size=max_points, replace=False))
        xyz, labels = xyz[keep], labels[keep]
    return xyz, labels


def features_of_split(model, collection, split: str, args, rng) -> Dict[str, List[torch.Tensor]]:
    """Per feature kind, the points' features, and their labels, over the split's scenes."""
    from scipy.spatial import cKDTree

    from splatsem_ns.data.scene_gaussians import load_scene_gaussians
    from splatsem_ns.encoders.inputs import sh_dc_to_rgb
    from splatsem_ns.evaluation.linear_probe import nearest_gaussian_features
    from splatsem_ns.export.loader import load_semantic_scene

    out: Dict[str, List[torch.Tensor]] = {
        "encoder": [],
        "raw": [],
        "chorus-splat": [],
        "labels": [],
        "dropped_far": [],
    }
    scenes = collection.split(split)[: args.max_scenes]
    for entry in scenes:
        path = collection.scene_path(entry)
        gaussians = load_scene_gaussians(path, args.gaussians, "gaussians.ply", args.point_shape)
        means = gaussians["means"].numpy()
        xyz, labels = scene_points(path, collection.classes, args.max_points, rng)
        # Only points the Gaussians reach: a capture's labelled cloud covers the whole room, its views (and so its
        # Gaussians) often not, and a point metres from any Gaussian would be probed on a stranger's features.
        distance, _ = cKDTree(means).query(xyz)
        near = distance <= args.max_distance
        out["dropped_far"].append(torch.tensor([int((~near).sum()), len(near)]))
        xyz, labels = xyz[near], labels[near]
        if model is not None:
            with torch.no_grad():
                latent = model.encoder(
                    *(
                        gaussians[k].to(args.device)
                        for k in ("means", "features_dc", "opacities", "scales", "quats")
                    )
                ).cpu()
            out["encoder"].append(nearest_gaussian_features(xyz, means, latent))
        fitted = path / "gaussians.ply"
        if fitted.is_file():
            scene = load_semantic_scene(fitted)
            if scene.latent is not None and args.chorus_teacher in scene.heads:
                decoded = scene.decode(args.chorus_teacher).float()
                out["chorus-splat"].append(nearest_gaussian_features(xyz, scene.means.numpy(), decoded))
        centre = (means.min(axis=0) + means.max(axis=0)) / 2
        raw = torch.cat(
            [sh_dc_to_rgb(gaussians["features_dc"]), gaussians["means"] - torch.as_tensor(centre)], dim=1
        )
        out["raw"].append(nearest_gaussian_features(xyz, means, raw))
        out["labels"].append(torch.as_tensor(labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument(
        "--checkpoint", type=Path, help="the chorus-pretrain run's config.yml (no encoder row without)"
    )
    parser.add_argument(
        "--chorus-teacher", default="labels", help="teacher space of the per-scene chorus-splat row"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--max-scenes", type=int, default=50, help="scenes per split")
    parser.add_argument("--max-points", type=int, default=20000, help="labelled points per scene")
    parser.add_argument(
        "--max-distance",
        type=float,
        default=0.1,
        help="probe only labelled points this close to a Gaussian (scene units: metres for depth captures)",
    )
    parser.add_argument(
        "--gaussians",
        default="auto",
        choices=("auto", "ply", "points", "labeled_points"),
        help="each scene's Gaussians, as chorus-pretrain was served them (--pipeline.datamanager.gaussians)",
    )
    add_point_shape_argument(parser, "as chorus-pretrain was served them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--note", action="append", default=[], help="a line on how the run was made (repeatable)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from splatsem_ns.models.semantic_splat import restore_network_model

    model = (
        None
        if args.checkpoint is None
        else restore_network_model(args.checkpoint, "ns-train chorus-pretrain", args.device)
    )
    report = probe_report(model, args)
    (args.out / "linear_probe.json").write_text(json.dumps(report, indent=1))
    write_markdown(
        args.out / "linear_probe.md",
        ["# Linear probe on frozen per-Gaussian features", ""] + probe_lines(report),
    )


def probe_report(model, args) -> dict:
    """The probe of every kind of feature the scenes offer (the module docstring), on ``args.collection``'s train
    and test splits; ``model``: a chorus-pretrain model (its ``encoder``), or None for no encoder row."""
    from splatsem_ns.data.collection import SceneCollection
    from splatsem_ns.evaluation.linear_probe import LinearProbeConfig, linear_probe

    start = time.perf_counter()
    collection = SceneCollection.load(args.collection)
    rng = np.random.default_rng(0)
    train = features_of_split(model, collection, args.train_split, args, rng)
    test = features_of_split(model, collection, args.test_split, args, rng)
    ids = sorted(int(i) for i in collection.classes if int(i) != 0)
    index = {c: i for i, c in enumerate(ids)}
    names = [collection.classes[c] for c in ids]

    def as_index(labels: List[torch.Tensor]) -> torch.Tensor:
        return torch.as_tensor([index.get(int(c), -1) for c in torch.cat(labels).tolist()])

    config = LinearProbeConfig()
    report = {
        "benchmark": "linear_probe",
        "device": device_name(),
        "collection": str(args.collection),
        "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
        "gaussians": args.gaussians,
        "chorus_teacher": args.chorus_teacher,
        "fractions": list(config.fractions),
        "train_points": int(sum(len(t) for t in train["labels"])),
        "test_points": int(sum(len(t) for t in test["labels"])),
        "points_dropped_beyond_max_distance": {
            split: f"{int(sum(d[0] for d in part['dropped_far']))} of {int(sum(d[1] for d in part['dropped_far']))}"
            for split, part in (("train", train), ("test", test))
        },
        "max_distance": args.max_distance,
        "results": {},
    }
    report["notes"] = list(args.note)
    kinds = []
    for kind in ("encoder", "chorus-splat", "raw"):
        complete = len(train[kind]) == len(train["labels"]) and len(test[kind]) == len(test["labels"])
        if kind == "chorus-splat" and not complete and (train[kind] or test[kind]):
            report["notes"].append(
                "chorus-splat row left out: not every scene has fitted latents with the head"
            )
        if complete:
            kinds.append(kind)
    for kind in kinds:
        scores = linear_probe(
            torch.cat(train[kind]), as_index(train["labels"]), torch.cat(test[kind]), as_index(test["labels"]),
            names, config,
        )  # fmt: skip
        report["results"][kind] = {
            str(f): {k: s[k] for k in ("train_points", "miou", "macc")} for f, s in scores.items()
        }
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def probe_lines(report: dict) -> List[str]:
    """The probe's markdown: settings, then one row per kind of feature and a column per data fraction."""
    fractions = report["fractions"]
    lines = [
        f"- device: {report['device']}; collection `{report['collection']}`; encoder `{report['checkpoint']}`; "
        f"Gaussians `{report['gaussians']}`; chorus-splat row decoded to `{report['chorus_teacher']}`",
        *[f"- note: {n}" for n in report["notes"]],
        f"- {report['train_points']} training points, {report['test_points']} held-out points; labelled points "
        f"farther than {report['max_distance']} from every Gaussian left out (train, test): "
        f"{report['points_dropped_beyond_max_distance']}",
        "",
        "| features | " + " | ".join(f"{100 * f:g}% mIoU / mAcc" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for kind, rows in report["results"].items():
        cells = [f"{100 * r['miou']:.1f} / {100 * r['macc']:.1f}" for r in rows.values()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
