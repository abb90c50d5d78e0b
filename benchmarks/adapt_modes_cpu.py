"""The Chorus encoder's adaptation modes on the synthetic room, on the CPU: a small check of what the GPU run on ScanNet
(``semantic_report_scannet_adapt_h200.md``) found, cheap enough to repeat.

    python benchmarks/adapt_modes_cpu.py --out DIR [--iterations 300] [--from DIR]

1. A tiny chorus-pretrain run (the tiny encoder, 40 steps) on the test suite's tiny generated collection (3 rooms).
2. chorus-splat on the synthetic room for ``--iterations`` steps, once per row (``--only`` picks rows): from scratch,
   and with the encoder as its latent source (``adapt latents``, with the pretrained or fresh heads; ``adapt head``
   with and without the voxel prior and at 10 and 100 times its learning rate).
3. ns-eval of each run: held-out 2D mIoU and 3D foreground mIoU (labels proxy).

``--from DIR`` only rebuilds the report from the ns-eval JSONs (``LABEL.json``) an earlier run left in DIR. It uses the
test suite's helpers (``tests/support.py``) for the collection and the synthetic room, so it runs from a checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import write_markdown  # noqa: E402

ENCODER = ("--pipeline.model.semantic-source.kind", "encoder")
RUNS = {
    "scratch": (),
    "latents": ("--pipeline.model.semantic-source.adapt", "latents"),
    "latents, fresh heads": (
        "--pipeline.model.semantic-source.adapt", "latents", "--pipeline.model.semantic-source.heads", "fresh",
    ),
    "head": ("--pipeline.model.semantic-source.adapt", "head"),
    "head, no voxel prior": (
        "--pipeline.model.semantic-source.adapt", "head", "--pipeline.model.semantic-smoothness-weight", "0",
    ),
    "head, lr x10": ("--pipeline.model.semantic-source.adapt", "head", "--optimizers.semantic-encoder.optimizer.lr", "1e-3"),
    "head, lr x100": ("--pipeline.model.semantic-source.adapt", "head", "--optimizers.semantic-encoder.optimizer.lr", "1e-2"),
}  # fmt: skip


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label)


def run_all(out: Path, iterations: int, only: list) -> None:
    from support import ns_eval, tiny_collection, train_synthetic, trained_on_collection

    collection = tiny_collection(out / "collection", rooms=4, test_room=3, seed_points=300)
    pretrained = trained_on_collection(
        "chorus-pretrain", collection, out / "pretrain", 40, "pre", "--pipeline.model.tiny-encoder", "True"
    )
    for label, extra in RUNS.items():
        if only and label not in only:
            continue
        source = () if label == "scratch" else (*ENCODER, "--pipeline.model.semantic-source.encoder-checkpoint",
                                                 str(pretrained / "config.yml"))  # fmt: skip
        run = train_synthetic(
            out / slug(label), iterations=iterations, num_views=16,
            extra=(*source, *extra, "--pipeline.model.sh-degree", "0"),
        )  # fmt: skip
        ns_eval(run, out / f"{slug(label)}.json")
        print(f"{label}: done", flush=True)


def report(folder: Path, out: Path, iterations: int, notes: list) -> None:
    rows, results = [], {}
    for label in RUNS:
        path = folder / f"{slug(label)}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())["results"]
        results[label] = {
            "miou_2d": r["semantic_2d"]["miou"],
            "fg_miou_3d": r["semantic_3d"]["fg_miou"],
            "teacher_miou_2d": r["semantic_2d_teacher_per_view"]["miou"],
            "psnr": r["psnr"],
        }
        v = results[label]
        rows.append(f"| {label} | {100 * v['miou_2d']:.1f} | {100 * v['fg_miou_3d']:.1f} | {v['psnr']:.2f} |")
    report_json = {
        "benchmark": "adapt_modes_cpu",
        "iterations": iterations,
        "device": "cpu",
        "runs": results,
        "notes": notes,
    }
    (out / "adapt_modes_cpu.json").write_text(json.dumps(report_json, indent=2))
    write_markdown(
        out / "adapt_modes_cpu.md",
        [
            "# Encoder adaptation modes on the synthetic room (CPU)",
            "",
            f"- chorus-splat, {iterations} steps at 64x48, labels proxy teachers (scores measure the pipeline, not a "
            "real 2D model); the encoder: chorus-pretrain's tiny encoder, 40 steps on 3 generated rooms",
            *(f"- note: {n}" for n in notes),
            "",
            "| run | held-out 2D mIoU | 3D fg-mIoU | PSNR |",
            "|---|---|---|---|",
            *rows,
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument(
        "--from", dest="source", type=Path, help="only report the ns-eval JSONs left in this folder"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    parser.add_argument("--only", nargs="+", default=[], choices=list(RUNS), help="run these rows only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.source is None:
        run_all(args.out, args.iterations, args.only)
    report(args.source or args.out, args.out, args.iterations, args.note)


if __name__ == "__main__":
    main()
