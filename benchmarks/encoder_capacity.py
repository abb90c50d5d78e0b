"""Can the Gaussian encoder tell a room's classes apart at all? A diagnostic, not a training recipe.

The encoder (``splatsem_ns.encoders``) and a linear classifier on its latent are fitted by per-point cross-entropy
on the labelled points of a few generated rooms, served as chorus-pretrain serves them (``labeled_points``: each
point a ball-shaped Gaussian), with no rendering and no teacher in between. ``--loss cosine`` (or ``centred``)
fits a projector head (``models/heads.py``) on the latent to each point's class embedding as the labels proxy
gives it (the MiniLM embedding of the class name, before the proxy's pooling, swaps, blur and noise) with
chorus-pretrain's plain (and centred) cosine, and classifies by the nearest class embedding: the distillation's
loss on clean per-point targets. mIoU and accuracy over the points of
the training rooms say whether the backbone can represent the classes from the inputs it is given; the same on
rooms it never saw says how far a few rooms generalise. ``--real-scenes`` scores real captures beside them (any scene
folder with a labelled point cloud, e.g. ScanNet's): trained on generated rooms with clean per-point labels, the
score on a real room is what procedural supervision could give it at best, with no distillation in the way.
A random subset (``--max-points``) thins every surface, so the Gaussians' sizes and the voxels' occupancy no longer
look like a whole room's; to compare with a real room scored whole, load rooms whole and train on ``--crop`` pieces
at full density instead. ``--augment`` transforms each training room as chorus-pretrain does
(``encoders/augment.py``: a turn about the vertical, a shift, a scale, jitter, colour changes). Unlabelled points
(class 0) are neither trained on nor scored.

``--real-train-half`` asks the other question, how much labelled real data would give: each real room is cut in two
at the median of its longer horizontal axis, one half joins the training rooms (drawn at ``--real-share`` of the
steps; ``--train-scenes 0`` trains on it alone) and the real rows score the other half only. Both halves are one
room, so this is an upper bound on what a different real room would get from it.

If the encoder fits its rooms here but chorus-pretrain's render-and-distill leaves it near the best constant, the
training signal, not the network, is what holds it back.

    python benchmarks/encoder_capacity.py --collection COLL --out DIR [--preset default] [--variant gaussian]
        [--train-scenes 1] [--test-scenes 2] [--steps 300] [--max-points 40000] [--loss ce|cosine|centred]
        [--augment] [--real-scenes SCENE ...] [--real-train-half] [--real-share 0.5] [--use-splits] [--crop 20000]
        [--note TEXT ...]

Writes ``DIR/encoder_capacity.json`` and ``.md`` after every scoring point (``--score-every``), so a run that is cut
short keeps what it measured. CPU or GPU (``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name  # noqa: E402

from splatsem_ns.data.class_tables import NYU40  # noqa: E402
from splatsem_ns.data.collection import SceneCollection  # noqa: E402
from splatsem_ns.data.ply_io import read_point_cloud  # noqa: E402
from splatsem_ns.data.scene_frames import labelled_points_path  # noqa: E402
from splatsem_ns.data.scene_gaussians import points_as_gaussians  # noqa: E402
from splatsem_ns.encoders.augment import InputAugmentationConfig, augment_inputs  # noqa: E402
from splatsem_ns.encoders.encoder import GaussianEncoder, GaussianEncoderConfig  # noqa: E402
from splatsem_ns.evaluation.metrics import (  # noqa: E402
    ConfusionMatrix,
    per_class_table,
    segmentation_scores,
)
from splatsem_ns.models.heads import (  # noqa: E402
    ProjectorHead,
    centred_cosine_distillation_loss,
    cosine_distillation_loss,
)

NUM_CLASSES = max(NYU40) + 1  # NYU40 ids 1..40, 0 unlabelled
NYU40_NAMES = {0: "unlabelled", **NYU40}
Room = Tuple[Dict[str, Tensor], Tensor]


def load_room(scene: Path, max_points: int, rng: np.random.Generator, device: torch.device) -> Room:
    """A room's labelled points (at most ``max_points``, drawn at random) as Gaussians, and their class ids."""
    path = labelled_points_path(scene)
    if path is None:
        raise SystemExit(f"{scene} has no labelled point cloud (points_labeled.ply)")
    cloud = read_point_cloud(path)
    if cloud.labels is None:
        raise SystemExit(f"{path} has no label column")
    keep = rng.permutation(len(cloud.xyz))[:max_points]
    gaussians = points_as_gaussians(cloud.xyz[keep], None if cloud.rgb is None else cloud.rgb[keep])
    labels = torch.as_tensor(cloud.labels[keep].astype(np.int64)).clamp(0, NUM_CLASSES - 1)
    return {k: v.to(device) for k, v in gaussians.items()}, labels.to(device)


def split_room(room: Room) -> Tuple[Room, Room]:
    """A room cut at the median of its longer horizontal axis (x or y; z is up): the lower and the upper half. The
    Gaussians keep the sizes they were given on the whole room."""
    gaussians, labels = room
    means = gaussians["means"]
    extent = means.amax(0) - means.amin(0)
    axis = int(extent[:2].argmax())
    lower = means[:, axis] < means[:, axis].median()

    def part(mask: Tensor) -> Room:
        return {k: v[mask] for k, v in gaussians.items()}, labels[mask]

    return part(lower), part(~lower)


def sphere_crop(room: Room, count: int, generator: torch.Generator) -> Room:
    """The ``count`` points of ``room`` nearest to one of its points drawn at random (Pointcept's SphereCrop): a
    piece of the room at its full density, unlike a random subset, which thins every surface. The Gaussians keep the
    sizes they were given on the whole room."""
    gaussians, labels = room
    means = gaussians["means"]
    if count >= len(means):
        return room
    centre = means[torch.randint(len(means), (1,), generator=generator, device=means.device)]
    keep = torch.topk((means - centre).square().sum(-1), count, largest=False).indices
    return {k: v[keep] for k, v in gaussians.items()}, labels[keep]


def class_embeddings(device: torch.device) -> Tensor:
    """``[NUM_CLASSES, C]``: each NYU40 class name's embedding as the labels proxy gives its pixels (row 0 zero)."""
    from splatsem_ns.teachers.text_encoders import MiniLMTextEncoder

    table = MiniLMTextEncoder().encode([NYU40[i] for i in range(1, NUM_CLASSES)]).float()
    return torch.cat([torch.zeros(1, table.shape[1]), table.cpu()]).to(device)


def scores(confusion: ConfusionMatrix) -> Dict[str, float]:
    """mIoU over the classes present and overall accuracy, in percent (ns-eval's rules, ``ConfusionMatrix``)."""
    return {
        "miou": round(confusion.miou() * 100, 2),
        "accuracy": round(confusion.overall_accuracy() * 100, 2),
        "classes": int((confusion.gt_counts() > 0).sum()),
    }


def present_classes(scored: Dict) -> Dict:
    """``segmentation_scores`` with only the classes that have points."""
    return {**scored, "per_class": {k: v for k, v in scored["per_class"].items() if v["gt_count"] > 0}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collection", type=Path, required=True, help="collection.json or its folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="default", help="backbone preset: default or tiny")
    parser.add_argument("--backbone", default="SpUNet-v1")
    parser.add_argument("--variant", default="gaussian", choices=["gaussian", "point"])
    parser.add_argument("--position-reference", default="voxel", choices=["voxel", "scene"])
    parser.add_argument("--train-scenes", type=int, default=1)
    parser.add_argument("--test-scenes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--score-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--max-points", type=int, default=40000, help="labelled points per room (random subset)"
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=0,
        help="train on a piece of this many points of a room per step (the points nearest a random one, at the room's "
        "full density); 0: the whole room. Rooms are scored whole.",
    )
    parser.add_argument(
        "--score-train-scenes",
        type=int,
        default=0,
        help="score only the first this many training rooms (0: all)",
    )
    parser.add_argument("--loss", default="ce", choices=["ce", "cosine", "centred"])
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    parser.add_argument(
        "--use-splits",
        action="store_true",
        help="training rooms from the collection's training split, held-out rooms from its test split (default: "
        "the first scenes in index order, then the next ones)",
    )
    parser.add_argument(
        "--augment", action="store_true", help="transform each training room as chorus-pretrain does"
    )
    parser.add_argument(
        "--real-scenes", type=Path, nargs="*", default=[],
        help="scene folders with a labelled point cloud (points_labeled.ply), scored beside the held-out rooms",
    )  # fmt: skip
    parser.add_argument(
        "--real-train-half",
        action="store_true",
        help="train on one half of each real room (cut at the median of its longer horizontal axis) and score the "
        "other half",
    )
    parser.add_argument(
        "--real-share",
        type=float,
        default=0.5,
        help="with --real-train-half: share of the steps that train on a real half (1 with --train-scenes 0)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.train_scenes < 0 or (args.train_scenes == 0 and not args.real_train_half):
        parser.error("--steps must be at least 1, and --train-scenes too unless --real-train-half")
    if args.real_train_half and not args.real_scenes:
        parser.error("--real-train-half needs --real-scenes")
    if not 0.0 <= args.real_share <= 1.0:
        parser.error(f"--real-share must be in [0, 1], got {args.real_share}")
    if args.train_scenes == 0:
        args.real_share = 1.0

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    collection = SceneCollection.load(args.collection)
    if args.use_splits:
        # Training rooms from the training split, held-out rooms from the test split: the held-out rooms of
        # chorus_encoder.py's zero-shot rows.
        training, testing = collection.split("train"), collection.split("test")
        chosen = training[: args.train_scenes] + testing[: args.test_scenes]
        available = f"{len(training)} training and {len(testing)} test scenes"
    else:
        chosen = list(collection.scenes)
        available = f"{len(chosen)} scenes"
    if len(chosen) < args.train_scenes + args.test_scenes:
        raise SystemExit(f"{available}; --train-scenes and --test-scenes ask for more")
    scenes = [collection.scene_path(entry) for entry in chosen]
    rng = np.random.default_rng(args.seed)
    train = [load_room(s, args.max_points, rng, device) for s in scenes[: args.train_scenes]]
    test = [
        load_room(s, args.max_points, rng, device) for s in scenes[args.train_scenes :][: args.test_scenes]
    ]
    # Real rooms are scored on all their labelled points: their size is what a user's scan gives.
    real = [load_room(s, sys.maxsize, rng, device) for s in args.real_scenes]
    real_train: List[Room] = []
    if args.real_train_half:
        real_train, real = (list(halves) for halves in zip(*(split_room(room) for room in real), strict=True))
    augmentation = InputAugmentationConfig()
    generator = torch.Generator(device=device).manual_seed(args.seed)

    encoder = GaussianEncoder(
        GaussianEncoderConfig(
            backbone=args.backbone, backbone_preset=args.preset, input_variant=args.variant,
            position_reference=args.position_reference,
        )
    ).to(device)  # fmt: skip
    embeddings = class_embeddings(device) if args.loss != "ce" else None
    classifier = (
        torch.nn.Linear(encoder.latent_dim, NUM_CLASSES)
        if embeddings is None
        else ProjectorHead(encoder.latent_dim, embeddings.shape[1])
    ).to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *classifier.parameters()], lr=args.lr)

    def outputs(room: Room, augment: bool = False) -> Tensor:
        """Class logits (ce), or decoded features in the embeddings' space."""
        g = room[0]
        if augment:
            batch = torch.zeros(len(g["means"]), dtype=torch.long, device=device)
            g = augment_inputs(g, batch, 1, augmentation, generator)
        if args.variant == "gaussian":
            latent = encoder(g["means"], g["features_dc"], g["opacities"], g["scales"], g["quats"])
        else:
            latent = encoder(g["means"], g["features_dc"])
        return classifier(latent)

    def logits(room: Room) -> Tensor:
        out = outputs(room)
        if embeddings is None:
            return out
        # The nearest class embedding by cosine; row 0 (unlabelled) is never predicted.
        scores = F.normalize(out, dim=-1) @ F.normalize(embeddings, dim=-1).T
        return scores.index_fill(1, torch.tensor([0], device=device), -2.0)

    def loss_of(room: Room) -> Tensor:
        out, labels = outputs(room, augment=args.augment), room[1]
        if embeddings is None:
            return F.cross_entropy(out, labels, ignore_index=0)  # 0: unlabelled
        labelled = labels > 0
        out, target = out[labelled], embeddings[labels[labelled]]
        loss = cosine_distillation_loss(out, target)
        if args.loss == "centred":
            # chorus-pretrain's second term, centred on the batch's mean target direction
            centre = F.normalize(target, dim=-1).mean(0)
            loss = loss + centred_cosine_distillation_loss(out[None, None], target[None, None], centre, None)
        return loss

    confusions: Dict[str, ConfusionMatrix] = {}  # the latest scoring's, by row key

    @torch.no_grad()
    def score(rooms: List[Room], key: str) -> Dict[str, float]:
        encoder.eval()
        confusion = confusions[key] = ConfusionMatrix(NUM_CLASSES, ignore_index=0)  # unlabelled: not scored
        for room in rooms:
            confusion.update(logits(room).argmax(-1).cpu().numpy(), room[1].cpu().numpy())
        encoder.train()
        return scores(confusion)

    report = {
        "benchmark": "encoder_capacity",
        "device": device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "note"},
        "train_scenes": [s.name for s in scenes[: args.train_scenes]],
        "test_scenes": [s.name for s in scenes[args.train_scenes :][: args.test_scenes]],
        "real_scenes": [s.name for s in args.real_scenes],
        "points_per_real_room": [int(room[1].numel()) for room in real],
        "points_per_real_training_half": [int(room[1].numel()) for room in real_train],
        "points_per_room": [int(room[1].numel()) for room in train + test],
        "curve": [],
        "notes": list(args.note),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.score_every == 0 or step == args.steps:
            row = {
                "step": step,
                "seconds": round(time.perf_counter() - began, 1),
                "train": score(train[: args.score_train_scenes or None], "train") if train else None,
            }
            if test:
                row["held_out"] = score(test, "held_out")
            if real:
                row["real"] = score(real, "real")
            if real_train:
                row["real_train_half"] = score(real_train, "real_train_half")
            report["curve"].append(row)
            # Per class at the latest scoring, with ns-eval's foreground mIoU (wall, floor, ceiling left out)
            report["latest_per_class"] = {
                key: present_classes(segmentation_scores(confusion, NYU40_NAMES))
                for key, confusion in confusions.items()
                if key != "train"
            }
            print(json.dumps(row), flush=True)
            write(report, args.out)
        if step == args.steps:
            break
        if real_train and (
            not train or float(torch.rand((), generator=generator, device=device)) < args.real_share
        ):
            room = real_train[step % len(real_train)]
        else:
            room = train[step % len(train)]
        loss = loss_of(sphere_crop(room, args.crop, generator) if args.crop else room)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def write(report: Dict, out: Path) -> None:
    (out / "encoder_capacity.json").write_text(json.dumps(report, indent=2))
    s = report["settings"]
    lines = [
        "# Encoder capacity: a per-point fit to labelled points",
        "",
        f"- device: {report['device']}; torch {report['torch']}; backbone {s['backbone']} ({s['preset']}), input "
        f"variant {s['variant']}, positions relative to the {s['position_reference']}; loss {s.get('loss', 'ce')}",
        f"- training rooms {report['train_scenes']}, held-out rooms {report['test_scenes']}; points per room "
        f"{report['points_per_room']} (at most {s['max_points']}); Adam lr {s['lr']}, one room per step"
        + (f", a crop of {s['crop']} points of it" if s.get("crop", "0") != "0" else "")
        + (
            f"; the first {s['score_train_scenes']} training rooms scored"
            if s.get("score_train_scenes", "0") != "0"
            else ""
        )
        + "; "
        f"training rooms augmented as in chorus-pretrain: {s.get('augment', 'False')}",
        "- no rendering and no teacher's maps (cosine losses: each point's clean class embedding): whether the network"
        " can represent the classes from its inputs",
        "",
    ]
    real = report.get("real_scenes") or []
    halves = report.get("points_per_real_training_half") or []
    if real and halves:
        lines.insert(
            -1,
            f"- real rooms {real}, each cut in two at the median of its longer horizontal axis: one half trained on "
            f"({halves} points; {s['real_share']} of the steps), the other scored ({report['points_per_real_room']} "
            "points)",
        )
    elif real:
        lines.insert(
            -1, f"- real rooms, all their labelled points: {real}, {report['points_per_real_room']} points"
        )
    lines += [
        "| step | seconds | training rooms mIoU / acc | held-out rooms mIoU / acc |"
        + (" real rooms mIoU / acc |" if real and not halves else "")
        + (
            " real rooms, half not trained on mIoU / acc | real rooms, half trained on (real share) mIoU / acc |"
            if halves
            else ""
        ),
        "|---|---|---|---|" + ("---|" if real else "") + ("---|" if halves else ""),
    ]

    def cell(scored: Dict | None) -> str:
        return f" {scored['miou']} / {scored['accuracy']} |" if scored else " - |"

    for row in report["curve"]:
        lines.append(
            f"| {row['step']} | {row['seconds']} |"
            + cell(row["train"])
            + cell(row.get("held_out"))
            + (cell(row.get("real")) if real else "")
            + (cell(row.get("real_train_half")) if halves else "")
        )
    latest = report.get("latest_per_class", {})
    titles = {
        "held_out": "held-out rooms",
        "real": "real rooms, the half not trained on" if halves else "real rooms",
        "real_train_half": "real rooms, the half trained on (at the real share of the steps)",
    }
    for key, scored in latest.items():
        lines += ["", f"## Per class at step {report['curve'][-1]['step']}: {titles.get(key, key)}", ""]
        lines.append(per_class_table(scored))
    if report.get("notes"):
        lines += [""] + [f"- note: {note}" for note in report["notes"]]
    (out / "encoder_capacity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
