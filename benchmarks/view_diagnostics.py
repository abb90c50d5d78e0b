"""Diagnostics of where a trained chorus-splat scene's 2D segmentation errors come from (used by semantic_report).

- ``geometry_oracle``: every Gaussian near a labelled point takes that point's ground-truth class, and these
  one-hot labels are rendered through the trained geometry at the protocol's views and scored like the model:
  roughly what a perfect semantic latent would reach on this geometry. Where it is wrong, the Gaussians in
  front (floaters, holes, misplaced surfaces) are wrong, not their features.
- ``dump_views``: per-view arrays (ground truth, model and teacher classes, RGB, depth, opacity) for offline
  inspection.
- ``heldout_vote``: lifting the teacher by multi-view voting (of its labels, and of its features: the soft vote),
  scored at the held-out views, and (with a dump) the model's scores on the held-out pixels that training views
  see and on those they do not, and the soft vote at the model's rendered depth.

Run as a script, it builds the scene's pipeline without training and writes ``heldout_vote``'s scores:

    python benchmarks/view_diagnostics.py --data SCENE --out DIR [--dump views_eval.npz]
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from scipy.spatial import cKDTree

from splatsem_ns.data.dataparser import DATAPARSER_SCALE_KEY, LABELED_POINTS_KEY, scene_depth_scale
from splatsem_ns.data.depth import backproject_depth
from splatsem_ns.data.ply_io import read_point_cloud
from splatsem_ns.evaluation.metrics import ConfusionMatrix, remap_labels
from splatsem_ns.evaluation.protocol import accumulate_2d, class_queries, classify_map, score, upsample_labels
from splatsem_ns.evaluation.voting import backproject_mean, backproject_vote, classify_by_text
from splatsem_ns.pipelines.chorus_pipeline import (
    _ground_truth_reference,
    _query_class_names,
    _teacher_features,
    _teacher_labels,
    _to_dataparser_frame,
)
from splatsem_ns.teachers.labels_teacher import read_depth_image

_MM_PER_UNIT = 1000.0
"""Dumped rendered depth is stored in millimetres of the dataset's original frame (metres for ScanNet)."""


def _depth_to_mm(depth: torch.Tensor, scale: float) -> np.ndarray:
    """Rendered depth in scene units -> uint16 millimetres of the original frame (``scale``: the dataparser's)."""
    return (depth / scale * _MM_PER_UNIT).clamp(0, 65535).cpu().numpy().astype(np.uint16)


def _depth_from_mm(depth_mm: np.ndarray, scale: float) -> torch.Tensor:
    """The inverse of ``_depth_to_mm`` (up to its rounding): scene units."""
    return torch.from_numpy(depth_mm.astype(np.float32) * (scale / _MM_PER_UNIT))


def _scene(pipeline):
    """Views, metadata, class ids/names, the labelled cloud (dataparser frame) and the clean reference."""
    cfg, dm = pipeline.config.semantic_eval, pipeline.datamanager
    metadata = dm.scene_metadata()
    cloud = read_point_cloud(Path(metadata[LABELED_POINTS_KEY]))
    ids, names = class_queries(_query_class_names(metadata, cloud, cfg.class_table))
    views = dm.scene_views()
    reference = _ground_truth_reference(views, metadata, cfg.class_table)
    return views, metadata, ids, names, cloud, _to_dataparser_frame(cloud.xyz, metadata), reference


def _cameras(pipeline, split: str):
    dm = pipeline.datamanager
    return dm.eval_dataset.cameras if split == "eval" else dm.train_dataset.cameras


@torch.no_grad()
def geometry_oracle(pipeline, max_distance_m: float = 0.05) -> Dict:
    """Gaussians labelled with the class of their nearest labelled point within ``max_distance_m`` (metres),
    rendered at the protocol's scale and scored against the same ground truth. The others (off the labelled
    surfaces: floaters, or surfaces without labelled points) are counted two ways, from one render:

    - ``oracle_2d`` / ``oracle_2d_train_views``: transparent. The score of the labelled-surface Gaussians alone;
      it ignores whatever floats in front of them.
    - ``oracle_2d_blocking`` / ``oracle_2d_blocking_train_views``: opaque and of no class. A pixel whose largest
      compositing weight is theirs is wrong, so floaters in front count against the geometry.

    Also ``oracle_labelled_fraction``: the share of Gaussians within ``max_distance_m``."""
    model, cfg = pipeline.model, pipeline.config.semantic_eval
    views, metadata, ids, names, cloud, points, reference = _scene(pipeline)
    means = model.means.detach().cpu().numpy()
    distance, nearest = cKDTree(points).query(means, k=1)
    classes = remap_labels(cloud.labels[nearest], ids)
    off_surface = len(ids)  # the channel of the Gaussians farther than max_distance_m
    classes[distance > max_distance_m * metadata[DATAPARSER_SCALE_KEY]] = off_surface
    classes[classes < 0] = off_surface  # near an unlabelled point, or one of a class not queried
    channels = 32 if len(ids) < 32 else 64 * ((len(ids) + 64) // 64)  # a channel count gsplat compiles
    onehot = torch.zeros(len(classes), channels, device=model.device)
    onehot[torch.arange(len(classes), device=model.device), torch.as_tensor(classes, device=model.device)] = (
        1.0
    )
    out: Dict = {"oracle_labelled_fraction": float(np.mean(classes < off_surface))}
    id_array = np.asarray(list(ids) + [0])  # 0: no class
    for split in ("eval", "train"):
        positions = pipeline.scored_view_positions(views)[split]
        cameras = _cameras(pipeline, split)
        matrices = {mode: ConfusionMatrix(len(ids), ignore_index=-1) for mode in ("", "_blocking")}
        for j, gt in zip(positions, reference.label_maps(split=split, positions=positions), strict=True):
            rendered = model.render_features(
                cameras[j : j + 1], onehot, scale=cfg.render_scale, normalize=False
            )[..., : off_surface + 1].cpu()
            surface = rendered[..., :off_surface]
            transparent = torch.where(surface.sum(-1) > 1e-6, surface.argmax(-1), off_surface)
            for mode, index in (("", transparent), ("_blocking", rendered.argmax(-1))):
                predicted = torch.as_tensor(id_array[index.numpy()])
                accumulate_2d(matrices[mode], upsample_labels(predicted, tuple(gt.shape)), gt, ids)
        for mode, cm in matrices.items():
            out["oracle_2d" + mode + ("" if split == "eval" else "_train_views")] = score(cm, names, cfg)
    return out


@torch.no_grad()
def dump_views(pipeline, out: Path) -> Dict:
    """``out/views_<split>.npz``: per scored view (``positions`` within its split) the ground-truth, model and
    teacher class ids (uint8 indices into ``names``, 255 = none), the RGB render, rendered depth (mm) and
    accumulation (0-255); the images and sensor depth stay with the scene. ``out/gaussians.npz``: every
    Gaussian's position and largest scale (metres, the dataparser's axes), opacity and predicted class index."""
    out.mkdir(parents=True, exist_ok=True)
    pipeline.eval()  # nerfstudio's image metrics leave the pipeline in training mode
    model, cfg = pipeline.model, pipeline.config.semantic_eval
    views, metadata, ids, names, _, _, reference = _scene(pipeline)
    teacher = pipeline._query_teacher()
    teacher.prepare_scene(views, metadata)
    text = teacher.encode_text(names).to(model.device)
    scale = metadata[DATAPARSER_SCALE_KEY]

    def index_map(labels) -> np.ndarray:
        return remap_labels(torch.as_tensor(labels).cpu().numpy(), ids, ignore_index=255).astype(np.uint8)

    for split in ("eval", "train"):
        positions = pipeline.scored_view_positions(views)[split]
        cameras = _cameras(pipeline, split)
        split_views = [v for v in views if v.split == split]
        arrays: Dict[str, list] = {}
        for j, gt in zip(positions, reference.label_maps(split=split, positions=positions), strict=True):
            size = tuple(gt.shape)
            camera = cameras[j : j + 1].to(model.device)
            outputs = model.get_outputs(camera)
            latent = model.render_semantic_latent(cameras[j : j + 1], scale=cfg.render_scale)
            predicted = classify_map(model.decode_features(latent, teacher.name), text, ids)
            taught = _teacher_labels(teacher, split_views[j], text, ids)
            entries = {
                "gt": index_map(gt),
                "model": index_map(upsample_labels(predicted, size)),
                "teacher": index_map(upsample_labels(taught, size)),
                "rgb": (outputs["rgb"].clamp(0, 1) * 255).byte().cpu().numpy(),
                "depth_mm": _depth_to_mm(outputs["depth"][..., 0], scale),
                "accumulation": (outputs["accumulation"][..., 0].clamp(0, 1) * 255).byte().cpu().numpy(),
            }
            for key, value in entries.items():
                arrays.setdefault(key, []).append(value)
        np.savez_compressed(
            out / f"views_{split}.npz",
            names=np.asarray(names),
            positions=np.asarray(positions),
            **{k: np.stack(v) for k, v in arrays.items()},
        )
    labels = classify_by_text(model.gaussian_features(teacher.name), text, ids)
    np.savez_compressed(
        out / "gaussians.npz",
        means=(model.means.detach().cpu().numpy() / scale).astype(np.float16),
        opacity=torch.sigmoid(model.opacities.detach()).squeeze(-1).cpu().numpy().astype(np.float16),
        max_scale=(torch.exp(model.scales.detach()).amax(-1).cpu().numpy() / scale).astype(np.float16),
        label=index_map(labels),
        names=np.asarray(names),
    )
    return {"views_dumped_to": str(out)}


@torch.no_grad()
def heldout_vote(pipeline, stride: int = 4, dump: Optional[Path] = None) -> Dict:
    """Lifting without optimisation, scored at the held-out views: every ``stride``-th pixel of each held-out view
    is placed in 3D with that view's sensor depth and labelled from the training views that see it (the "2D
    teacher back-projected" baseline's depth test). Keys, each a score dict:

    - ``vote_2d``: the plain majority of the teacher's labels (pixels no training view sees count as wrong);
      ``vote_2d_seen``: the same, only the pixels some training view sees;
    - ``soft_vote_2d_seen``: the mean of the teacher's unit features over those views (one vote per view),
      classified afterwards, on the same pixels;
    - ``teacher_2d``: the teacher run on the held-out view itself; ``teacher_2d_seen`` / ``teacher_2d_unseen``: on
      the pixels some training view sees / on the others;
    - ``vote_2d_seen_consistent`` / ``soft_vote_2d_seen_consistent``: the two votes without the training views'
      cells that the datamanager's cross-view consistency check gives weight 0 (when it ran), on the same pixels.

    and ``seen_fraction``. Given a ``dump`` (``views_eval.npz`` of ``dump_views``), also ``model_2d_seen`` /
    ``model_2d_unseen`` (the trained model on the pixels training views see and on the others),
    ``soft_vote_seen_model_unseen_2d`` (all pixels: the soft vote where training views see, the model elsewhere),
    ``soft_vote_rendered_depth_2d_seen`` (the soft vote with each pixel placed at the model's rendered depth
    instead, on the same pixels; a pixel whose rendered point no training view sees counts as wrong) and
    ``rendered_depth_within_tolerance`` (the fraction of measured held-out pixels whose rendered depth is within
    the protocol's depth tolerance of the sensor's). The sensor depth of held-out views is evaluation data, so
    this is a diagnostic only."""
    cfg = pipeline.config.semantic_eval
    views, metadata, ids, names, _, _, reference = _scene(pipeline)
    teacher = pipeline._query_teacher()
    teacher.prepare_scene(views, metadata)
    text = teacher.encode_text(names).to(pipeline.model.device)
    # Each training view is encoded once: its features vote in the soft vote, their classes in the plain one.
    encoded = [_teacher_features(teacher, v) for v in views if v.split == "train"]
    voters = pipeline._teacher_view_labels(teacher, views, text, ids, metadata, features=encoded)
    voter_features = [f.float().cpu().numpy() for f in encoded]
    # The training views' cells that the cross-view consistency check dropped (the weights training uses).
    checked = [
        weights.get(teacher.name)
        for weights in (pipeline.datamanager.teacher_weights(i) for i in range(len(voters)))
    ]
    if all(w is not None for w in checked):
        checked = [
            dataclasses.replace(v, labels=np.where(w.cpu().numpy() > 0, v.labels, -1))
            for v, w in zip(voters, checked, strict=True)
        ]
    else:
        checked = None
    depth_scale = scene_depth_scale(metadata)
    held_out = [v for v in views if v.split == "eval"]
    if any(v.depth_path is None for v in held_out):
        raise ValueError("heldout_vote needs sensor depth for the held-out views")
    dumped = np.load(dump) if dump is not None else None
    if dumped is not None and list(dumped["names"]) != list(names):
        raise ValueError(f"{dump} was written for other classes than this scene's queries")
    keys = (
        "vote_2d",
        "vote_2d_seen",
        "soft_vote_2d_seen",
        "teacher_2d",
        "teacher_2d_seen",
        "teacher_2d_unseen",
    )
    if dumped is not None:
        keys += (
            "model_2d_seen",
            "model_2d_unseen",
            "soft_vote_rendered_depth_2d_seen",
            "soft_vote_seen_model_unseen_2d",
        )
    if checked is not None:
        keys += ("vote_2d_seen_consistent", "soft_vote_2d_seen_consistent")
    matrices = {key: ConfusionMatrix(len(ids), ignore_index=-1) for key in keys}
    seen_pixels = labelled_pixels = depth_ok = depth_measured = 0

    def place(depth: torch.Tensor, view) -> tuple:
        """Every ``stride``-th pixel with a depth, in 3D: (world points [M, 3], mask of those pixels [P])."""
        k = view.intrinsics
        fxfycxcy = (float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2]))
        world, _ = backproject_depth(depth, view.image, fxfycxcy, view.camera_to_world, stride)
        return world.numpy(), (depth[::stride, ::stride] > 0).numpy().reshape(-1)

    def soft_labels(world: np.ndarray, placed: np.ndarray, views=voters) -> np.ndarray:
        """Class ids of the soft vote at the placed pixels, -2 (wrong) where no training view sees the point."""
        mean, votes = backproject_mean(world, views, voter_features, cfg.depth_tolerance)
        labels = np.full(placed.shape, -2, dtype=np.int64)
        classes = classify_by_text(torch.from_numpy(mean), text.cpu(), ids)
        labels[placed] = np.where(votes > 0, remap_labels(np.asarray(classes), ids), -2)
        return labels

    for j, (view, gt) in enumerate(zip(held_out, reference.label_maps(split="eval"), strict=True)):
        size = tuple(gt.shape)
        rows, cols = np.mgrid[0 : size[0] : stride, 0 : size[1] : stride]
        depth = torch.from_numpy(read_depth_image(Path(view.depth_path), size, depth_scale))
        # The pixels with a measurement, in 3D, in the order of depth[::stride, ::stride][measured].
        world, measured = place(depth, view)
        labels = np.full(measured.shape, -1, dtype=np.int64)
        votes = np.zeros(measured.shape, dtype=np.int64)
        labels[measured], votes[measured] = backproject_vote(world, voters, cfg.depth_tolerance)
        seen = votes > 0
        truth = remap_labels(gt.numpy()[rows, cols].reshape(-1), ids)
        truth_seen = np.where(seen, truth, -1)
        taught = upsample_labels(_teacher_labels(teacher, view, text, ids), size).cpu().numpy()[rows, cols]
        taught = remap_labels(taught.reshape(-1), ids)
        matrices["vote_2d"].update(remap_labels(np.where(seen, labels, 0), ids), truth)
        matrices["vote_2d_seen"].update(remap_labels(labels, ids), truth_seen)
        soft = soft_labels(world, measured)
        matrices["soft_vote_2d_seen"].update(soft, truth_seen)
        matrices["teacher_2d"].update(taught, truth)
        matrices["teacher_2d_seen"].update(taught, truth_seen)
        matrices["teacher_2d_unseen"].update(taught, np.where(seen, -1, truth))
        if checked is not None:
            consistent = np.full(measured.shape, -1, dtype=np.int64)
            consistent[measured], _ = backproject_vote(world, checked, cfg.depth_tolerance)
            matrices["vote_2d_seen_consistent"].update(remap_labels(consistent, ids), truth_seen)
            matrices["soft_vote_2d_seen_consistent"].update(soft_labels(world, measured, checked), truth_seen)
        if dumped is not None:
            model = dumped["model"][j][rows, cols].reshape(-1).astype(np.int64)
            model = np.where(model < len(ids), model, -2)  # 255 (no class) counts as wrong
            matrices["model_2d_seen"].update(model, truth_seen)
            matrices["model_2d_unseen"].update(model, np.where(seen, -1, truth))
            matrices["soft_vote_seen_model_unseen_2d"].update(np.where(seen, soft, model), truth)
            rendered = _depth_from_mm(dumped["depth_mm"][j], metadata[DATAPARSER_SCALE_KEY])
            matrices["soft_vote_rendered_depth_2d_seen"].update(
                soft_labels(*place(rendered, view)), truth_seen
            )
            sensor = depth[::stride, ::stride].numpy().reshape(-1)
            off = np.abs(rendered[::stride, ::stride].numpy().reshape(-1) - sensor)
            depth_ok += int((measured & (off < cfg.depth_tolerance)).sum())
            depth_measured += int(measured.sum())
        seen_pixels += int((seen & (truth >= 0)).sum())
        labelled_pixels += int((truth >= 0).sum())
    out = {key: score(cm, names, cfg) for key, cm in matrices.items()}
    out["seen_fraction"] = seen_pixels / max(labelled_pixels, 1)
    if dumped is not None:
        out["rendered_depth_within_tolerance"] = depth_ok / max(depth_measured, 1)
    return out


def main() -> None:
    import argparse
    import json
    import tempfile

    from common import build_trainer, trainer_config

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dump", type=Path, help="views_eval.npz written by semantic_report.py --dump-views")
    parser.add_argument("--teachers", nargs="+", default=["labels"])
    parser.add_argument("--eval-mode", default="interval")
    parser.add_argument("--stride", type=int, default=4, help="score every STRIDE-th pixel per axis")
    parser.add_argument(
        "--note", default="", help="a line for the report (for example which run the dump is from)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trainer_config(
            "chorus-splat",
            args.data,
            Path(tmp),
            1,
            args.teachers,
            full_resolution=False,
            eval_mode=args.eval_mode,
        )
        trainer = build_trainer(cfg)
        result = heldout_vote(trainer.pipeline, args.stride, args.dump)
        pipeline_tolerance = trainer.pipeline.config.semantic_eval.depth_tolerance
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "data": str(args.data),
        "dump": args.dump.name if args.dump else None,
        "note": args.note,
        "stride": args.stride,
        **result,
    }
    (args.out / "heldout_vote.json").write_text(json.dumps(report, indent=2))
    rows = [
        ("2D teacher per view", "teacher_2d"),
        ("plain vote of the training views' teacher labels (unseen pixels count as wrong)", "vote_2d"),
        ("2D teacher per view, pixels some training view sees", "teacher_2d_seen"),
        ("2D teacher per view, pixels no training view sees", "teacher_2d_unseen"),
        ("plain vote, pixels some training view sees", "vote_2d_seen"),
        (
            "plain vote without the cells the cross-view consistency check drops, same pixels",
            "vote_2d_seen_consistent",
        ),
        (
            "soft vote (mean unit feature, one vote per view), pixels some training view sees",
            "soft_vote_2d_seen",
        ),
        (
            "soft vote without the cells the consistency check drops, same pixels",
            "soft_vote_2d_seen_consistent",
        ),
        (
            "soft vote placed at the model's rendered depth instead of the sensor's, same pixels",
            "soft_vote_rendered_depth_2d_seen",
        ),
        ("trained model, pixels some training view sees", "model_2d_seen"),
        ("trained model, pixels no training view sees", "model_2d_unseen"),
        (
            "all pixels: the soft vote where training views see, the trained model elsewhere",
            "soft_vote_seen_model_unseen_2d",
        ),
    ]
    lines = [
        f"# Held-out views of `{args.data}`: multi-view voting of the teacher",
        "",
        f"- every {args.stride}th pixel per axis of each held-out view, placed in 3D with its sensor depth; "
        f"{100 * result['seen_fraction']:.1f}% of the labelled ones are seen by some training view (depth test)",
        f"- model scores from the dump `{args.dump.name}`" if args.dump else "- no model dump given",
        *(
            [
                f"- the model's rendered depth is within the depth tolerance ({pipeline_tolerance}) of the "
                f"sensor's at {100 * result['rendered_depth_within_tolerance']:.1f}% of the measured pixels"
            ]
            if "rendered_depth_within_tolerance" in result
            else []
        ),
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "| scored | mIoU | mAcc |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {100 * result[key]['miou']:.1f} | {100 * result[key]['macc']:.1f} |"
        for name, key in rows
        if key in result
    ]
    per_class = [
        "",
        "| class | teacher | teacher (seen) | vote (seen) | soft vote (seen) | model (seen) |",
        "|---|---|---|---|---|---|",
    ]
    for cls, entry in result["teacher_2d"]["per_class"].items():
        if entry["gt_count"]:
            cells = [
                result[k]["per_class"][cls]["iou"] if k in result else None
                for k in (
                    "teacher_2d",
                    "teacher_2d_seen",
                    "vote_2d_seen",
                    "soft_vote_2d_seen",
                    "model_2d_seen",
                )
            ]
            per_class.append(
                f"| {cls} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |"
            )
    (args.out / "heldout_vote.md").write_text("\n".join(lines + per_class) + "\n")
    print("\n".join(lines + per_class))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
