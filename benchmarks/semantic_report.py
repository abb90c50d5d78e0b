"""Train chorus-splat on one scene, evaluate reconstruction and open-vocabulary segmentation, write a report.

splatfacto is trained alongside for the same number of steps as the reconstruction baseline (CUDA only:
stock splatfacto cannot run without it). The segmentation scores come with their two baselines: the
2D teacher run on each held-out view, and the 2D teacher back-projected onto the labelled points.

With the ``labels`` teacher, the numbers measure a PROXY: a teacher built from the scene's ground-truth
labels plus degradations that mimic a real 2D model, so the protocol can be run where no pretrained
model can be loaded. They are not results of a real foundation model.

    python benchmarks/semantic_report.py --data SCENE --out DIR [--iterations 15000] [--teachers labels labels-instance]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from splatsem_ns.models.optional_lpips import NaNMetric
from splatsem_ns.pipelines.chorus_pipeline import _diagnostic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_trainer,
    device_name,
    parse_method,
    peak_memory_gib,
    release_earlier_runs,
    scene_run_parser,
    seed_everything,
    trainer_config,
)
from view_diagnostics import dump_views, geometry_oracle  # noqa: E402

PROXY_NOTE = (
    "Teachers named 'labels'/'instances' are proxies built from ground-truth labels with degradations "
    "(see splatsem_ns.teachers.labels_teacher); their scores measure the pipeline, not a real 2D model."
)


def train_and_evaluate(spec: str, args, out: Path) -> dict:
    label, method, overrides = parse_method(spec)
    seed_everything(args.seed)
    cfg = trainer_config(
        method,
        args.data,
        out,
        args.iterations,
        args.teachers,
        args.random_weights,
        overrides,
        full_resolution=False,
        eval_mode=args.eval_mode,
    )
    cfg.timestamp = label
    if args.diagnostic_render_scales and hasattr(cfg.pipeline, "semantic_eval"):
        cfg.pipeline.semantic_eval.diagnostic_render_scales = tuple(args.diagnostic_render_scales)
    resident = release_earlier_runs()
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    # Inside the training time, and reported on its own as well: the first run of a process pays one-off costs there
    # (the scene's teacher features, which later runs over the same scene read from the cache; a feed-forward seed).
    setup_s = time.perf_counter() - start
    curve: list = []
    paused = [0.0]  # seconds spent scoring the curve's points, left out of the training time
    if args.eval_at and method == "chorus-splat":
        _score_along_the_way(trainer, sorted(set(args.eval_at)), curve, start, paused)
    trainer.train()
    train_s = time.perf_counter() - start - paused[0]
    pipeline = trainer.pipeline
    pipeline.eval()
    if getattr(pipeline.model, "lpips", "absent") is None:
        # Stock splatfacto evaluates LPIPS unconditionally; offline its weights are missing (NaN, dropped below).
        pipeline.model.lpips = NaNMetric()
    result = {
        "method": label,
        "base_method": method,
        "model_overrides": overrides,
        "iterations": args.iterations,
        "train_wall_s": round(train_s, 1),
        "setup_wall_s": round(setup_s, 1),
        **({"curve": curve} if curve else {}),
        "peak_gpu_mem_gib": peak_memory_gib(resident),
        "num_gaussians": int(pipeline.model.num_points),
        "image_metrics": {
            k: float(v)
            for k, v in pipeline.get_average_eval_image_metrics(get_std=False).items()
            if isinstance(v, (int, float)) and not math.isnan(v)
        },
    }
    if method == "chorus-splat":
        start = time.perf_counter()
        try:
            result["segmentation"] = pipeline.semantic_metrics()
        except Exception:  # keep the (expensive) training's image metrics in the report
            result["segmentation_error"] = traceback.format_exc()
            print(result["segmentation_error"], file=sys.stderr, flush=True)
        result["segmentation_wall_s"] = round(time.perf_counter() - start, 1)
        if args.geometry_oracle and "segmentation" in result:
            _diagnostic(result["segmentation"], "geometry_oracle", geometry_oracle, pipeline)
        if args.dump_views is not None:
            _diagnostic(result, "dump_views", dump_views, pipeline, args.dump_views / label)
        result["teachers"] = {c.name: repr(c) for c in pipeline.datamanager.teacher_configs()}
    del trainer, pipeline
    release_earlier_runs()
    return result


def _score_along_the_way(trainer, steps: list, curve: list, start: float, paused: list) -> None:
    """Score the segmentation protocol (2D and 3D, without clicks) before the given training steps: a learning or
    adaptation curve in one run (``--eval-at``). Each point records the training wall time so far, scoring
    excluded."""
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    def score(step: int) -> None:
        if step not in steps:
            return
        began = time.perf_counter()
        pipeline = trainer.pipeline
        pipeline.eval()
        point = {"step": step, "train_wall_s": round(began - start - paused[0], 1)}
        try:
            scores = pipeline.semantic_metrics(clicks=False)
            for key, field in (("semantic_2d", "miou"), ("semantic_3d", "fg_miou")):
                point[f"{key}_{field}"] = (scores.get(key) or {}).get(field)
        except Exception:  # a failed point must not stop the training run
            point["error"] = traceback.format_exc()
            print(point["error"], file=sys.stderr, flush=True)
        finally:
            pipeline.train()
        curve.append(point)
        paused[0] += time.perf_counter() - began
        print(f"curve point {point}", flush=True)

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], score))


_SUMMARY_KEYS = (("semantic_2d", "miou"), ("semantic_2d_train_views", "miou"), ("semantic_3d", "fg_miou"))
_TEACHER_SUMMARY_KEYS = (
    ("semantic_2d_teacher_per_view", "miou"),
    ("semantic_2d_teacher_per_view_train_views", "miou"),
    ("semantic_3d_teacher_backprojected", "fg_miou"),
)


def _fmt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    lines = [
        f"# Semantic benchmark: `{report['data']}`",
        "",
        f"- device: {report['device']}; torch {report['torch']}; {report['iterations']} iterations; "
        f"eval mode {report['eval_mode']}",
        f"- teachers: {', '.join(report['teachers'])} (random weights: {report['random_weights']})",
        f"- {PROXY_NOTE}",
        *[f"- note: {n}" for n in report.get("notes", [])],
        "",
        "## Reconstruction (held-out views)",
        "",
        "| method | PSNR | SSIM | LPIPS | Gaussians | train time (s), set-up included | of which set-up (s) "
        "| peak GPU memory (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        m = r["image_metrics"]
        lpips = f"{m['lpips']:.3f}" if "lpips" in m else "n/a"
        lines.append(
            f"| {r['method']} | {m.get('psnr', float('nan')):.2f} | {m.get('ssim', float('nan')):.3f} | {lpips} "
            f"| {r['num_gaussians']} | {r['train_wall_s']} | {r.get('setup_wall_s', '-')} | {r['peak_gpu_mem_gib']} |"
        )
    segmented = [r for r in report["runs"] if "segmentation" in r]
    if len(segmented) > 1:
        lines += [
            "",
            "## Segmentation summary (details per run below)",
            "",
            "| method | config overrides | 2D mIoU held-out | 2D mIoU training views | 3D fg mIoU |",
            "|---|---|---|---|---|",
        ]
        for r in segmented:
            seg = r["segmentation"]
            overrides = ", ".join(f"{k}={v}" for k, v in r.get("model_overrides", {}).items()) or "-"
            cells = [_fmt(seg.get(k, {}).get(m)) for k, m in _SUMMARY_KEYS]
            lines.append(f"| {r['method']} | {overrides} | " + " | ".join(cells) + " |")
        first = segmented[0]["segmentation"]
        teacher = [_fmt(first.get(k, {}).get(m)) for k, m in _TEACHER_SUMMARY_KEYS]
        lines.append("| 2D teacher (per view; back-projected for 3D) | - | " + " | ".join(teacher) + " |")
    lines += click_lines(segmented)
    lines += curve_lines(report["runs"])
    for run in (r for r in report["runs"] if "segmentation_error" in r):
        lines += [
            "",
            f"**{run['method']}: segmentation failed**",
            "",
            "```",
            run["segmentation_error"].strip(),
            "```",
        ]
    for run in segmented:
        seg = run["segmentation"]
        lines += [
            "",
            f"## Open-vocabulary segmentation, {run['method']} (query teacher: {seg.get('semantic_query_teacher')}; "
            f"{len(seg.get('semantic_classes', []))} classes queried by name)",
            "",
            "| scored in | method | mIoU | mAcc | fg mIoU | fg mAcc |",
            "|---|---|---|---|---|---|",
        ]
        rows = [
            ("2D, held-out views", run["method"], "semantic_2d"),
            ("2D, held-out views", "2D teacher per view", "semantic_2d_teacher_per_view"),
            ("3D, labelled points", f"{run['method']} (25-NN vote)", "semantic_3d"),
            ("3D, labelled points", "2D teacher back-projected", "semantic_3d_teacher_backprojected"),
            ("diagnostic: 2D, training views", run["method"], "semantic_2d_train_views"),
            (
                "diagnostic: 2D, training views",
                "2D teacher per view",
                "semantic_2d_teacher_per_view_train_views",
            ),
            (
                "diagnostic: 3D, labelled points",
                f"{run['method']} (vote of trained Gaussians)",
                "semantic_3d_seen",
            ),
        ]
        rows += [
            (f"diagnostic: 2D, {where}", f"ground-truth labels on the trained Gaussians, {others}", key)
            for where, suffix in (("held-out views", ""), ("training views", "_train_views"))
            for others, key in (
                ("off-surface ones transparent", f"oracle_2d{suffix}"),
                ("off-surface ones opaque", f"oracle_2d_blocking{suffix}"),
            )
        ]
        rows += [
            (f"diagnostic: 2D, held-out, render scale {key.rsplit('_', 1)[1]}", run["method"], key)
            for key in seg
            if key.startswith("semantic_2d_scale_")
        ]
        for where, name, key in rows:
            if key in seg:
                s = seg[key]
                lines.append(
                    f"| {where} | {name} | {_fmt(s['miou'])} | {_fmt(s['macc'])} | {_fmt(s['fg_miou'])} "
                    f"| {_fmt(s['fg_macc'])} |"
                )
        lines += [f"- diagnostic {k} failed: {v}" for k, v in seg.get("diagnostic_errors", {}).items()]
        lines += ["", "### Targets", "", *target_lines(report, run)]
        for key in ("semantic_3d", "semantic_2d"):
            if key in seg:
                lines += [
                    "",
                    f"### Per-class IoU, {key}",
                    "",
                    "| class | IoU | acc | ground-truth count |",
                    "|---|---|---|---|",
                ]
                for cls, v in seg[key]["per_class"].items():
                    lines.append(f"| {cls} | {_fmt(v['iou'])} | {_fmt(v['acc'])} | {v['gt_count']} |")
    return "\n".join(lines) + "\n"


def curve_lines(runs: list[dict]) -> list[str]:
    """The segmentation scores along training (``--eval-at``) of the runs that have them."""
    rows = [(r["method"], p) for r in runs for p in r.get("curve", [])]
    if not rows:
        return []
    lines = [
        "",
        "## Along training (`--eval-at`: 2D held-out mIoU and 3D fg mIoU before the step; training time so far)",
        "",
        "| method | step | train time (s) | 2D mIoU | 3D fg mIoU |",
        "|---|---|---|---|---|",
    ]
    for method, p in rows:
        lines.append(
            f"| {method} | {p['step']} | {p['train_wall_s']} | {_fmt(p.get('semantic_2d_miou'))} | "
            f"{_fmt(p.get('semantic_3d_fg_miou'))} |"
        )
    return lines


def click_lines(runs: list[dict]) -> list[str]:
    """Click-to-segment summary (splatsem_ns.evaluation.clicks) of the runs that have it."""
    clicked = [r for r in runs if "click_segmentation" in r["segmentation"]]
    if not clicked:
        return []
    # Columns: the field's click ("feature"), any other rule a run scored, then the teacher's own click.
    rules = ["feature"] + sorted(
        {
            k
            for r in clicked
            for k, v in r["segmentation"]["click_segmentation"].items()
            if isinstance(v, dict)
        }
        - {"feature", "teacher_per_view"}
    )
    columns = (
        [(rule, "2d") for rule in rules] + [("teacher_per_view", "2d")] + [(rule, "3d") for rule in rules]
    )
    lines = [
        "",
        "## Click-to-segment (one click at the centre of each object of each held-out view)",
        "",
        "Mean IoU over clicks (in brackets: the fraction of clicks with IoU >= 0.5). 2D: the selection's render"
        " against the object's mask at the clicked view; 3D: the labelled points whose 25 nearest Gaussians are"
        " mostly selected. 'feature' selects the Gaussians whose feature matches the clicked pixel's (the"
        " viewer's rule); the teacher per view clicks its own features on the held-out image.",
        "",
        "| method | teacher | clicks (empty) | "
        + " | ".join(f"{dim.upper()} {rule}" for rule, dim in columns)
        + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for r in clicked:
        c = r["segmentation"]["click_segmentation"]
        cells = [_click_cell(c, rule, dim) for rule, dim in columns]
        lines.append(
            f"| {r['method']} | {c.get('teacher')} | {c['clicks']} ({c['empty_clicks']}) | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _click_cell(scores: dict, rule: str, dim: str) -> str:
    rule_scores = scores.get(rule, {})
    if f"miou_{dim}" not in rule_scores:
        return "-"
    return f"{_fmt(rule_scores[f'miou_{dim}'])} ({_fmt(rule_scores[f'success_{dim}'])})"


def target_lines(report: dict, run: dict) -> list[str]:
    """The three goals of the benchmark for one chorus-splat run, checked against this report's numbers."""
    runs = {r["method"]: r for r in report["runs"]}
    seg = run.get("segmentation", {})
    lines = []
    if "semantic_2d" in seg and "semantic_2d_teacher_per_view" in seg:
        ours, theirs = seg["semantic_2d"]["miou"], seg["semantic_2d_teacher_per_view"]["miou"]
        lines.append(
            f"- 2D mIoU at held-out views above the 2D teacher's own: {_fmt(ours)} vs {_fmt(theirs)}: "
            f"**{'met' if ours > theirs else 'not met'}**"
        )
    if "semantic_3d" in seg and "semantic_3d_teacher_backprojected" in seg:
        ours, theirs = seg["semantic_3d"]["fg_miou"], seg["semantic_3d_teacher_backprojected"]["fg_miou"]
        lines.append(
            f"- 3D foreground mIoU at most 2 points below the back-projected teacher: {_fmt(ours)} vs "
            f"{_fmt(theirs)}: **{'met' if 100 * (theirs - ours) <= 2.0 else 'not met'}**"
        )
    if "splatfacto" in runs:
        ours = run["image_metrics"].get("psnr")
        theirs = runs["splatfacto"]["image_metrics"].get("psnr")
        if ours is not None and theirs is not None:
            lines.append(
                f"- held-out PSNR within 0.3 dB of splatfacto: {ours:.2f} vs {theirs:.2f} dB: "
                f"**{'met' if ours >= theirs - 0.3 else 'not met'}**"
            )
    return lines or ["- not enough runs in this report to check them"]


def main() -> None:
    parser = scene_run_parser(__doc__, teachers=("labels", "labels-instance"))
    parser.add_argument("--iterations", type=int, default=15000)
    parser.add_argument(
        "--eval-mode", default="interval", help="dataparser eval_mode (interval: every 8th view)"
    )
    parser.add_argument(
        "--diagnostic-render-scales",
        nargs="*",
        type=float,
        default=[],
        help="also score held-out 2D with the semantic render at these scales of the image (diagnostic rows)",
    )
    parser.add_argument(
        "--geometry-oracle",
        action="store_true",
        help="diagnostic rows: Gaussians labelled with their nearest labelled point's class, rendered and scored "
        "like the model (what the trained geometry allows)",
    )
    parser.add_argument(
        "--dump-views",
        type=Path,
        help="diagnostic: write per-view arrays of each chorus-splat run under DIR/LABEL",
    )
    parser.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train splatfacto too (default: on CUDA)",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        help="methods to train: METHOD or LABEL=METHOD:field=value,... (model overrides, e.g. "
        "chorus-depth=chorus-splat:depth_loss_weight=0.1); default chorus-splat, plus splatfacto per --baseline. "
        "A report is written after each run",
    )
    parser.add_argument(
        "--eval-at",
        nargs="*",
        type=int,
        default=[],
        help="chorus-splat runs: also score 2D and 3D segmentation (no clicks) before these steps (0: the start), "
        "e.g. an encoder's adaptation curve",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="only combine the runs of saved semantic_report.json files (same scene and settings) into one report",
    )
    parser.add_argument("--note", default="", help="with --merge: a note on how the runs were made")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        write_report(merge_reports([json.loads(p.read_text()) for p in args.merge], args.note), args.out)
        return
    baseline = torch.cuda.is_available() if args.baseline is None else args.baseline
    runs = args.runs or ["chorus-splat"] + (["splatfacto"] if baseline else [])
    report = {
        "benchmark": "semantic_report",
        "data": str(args.data),
        "device": device_name(),
        "torch": torch.__version__,
        "iterations": args.iterations,
        "eval_mode": args.eval_mode,
        "teachers": list(args.teachers),
        "random_weights": args.random_weights,
        "runs": [],
        "notes": []
        if "splatfacto" in runs
        else [_NO_BASELINE_NOTE + ("." if torch.cuda.is_available() else " (it needs CUDA).")],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in runs:
            report["runs"].append(train_and_evaluate(method, args, Path(tmp)))
            write_report(report, args.out)  # after each run, so a cut-off job keeps what finished


def write_report(report: dict, out: Path) -> None:
    (out / "semantic_report.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "semantic_report.md").write_text(text)
    print(text, flush=True)


_NO_BASELINE_NOTE = "splatfacto baseline not run"


def merge_reports(reports: list[dict], note: str = "") -> dict:
    """One report from several with the same scene and settings (runs made in separate processes)."""
    keys = ("data", "iterations", "eval_mode", "teachers", "random_weights", "device")
    first = reports[0]
    for other in reports[1:]:
        differing = [k for k in keys if other.get(k) != first.get(k)]
        if differing:
            raise ValueError(f"Reports differ in {differing}; only runs of the same settings can be merged.")
    merged = dict(first)
    merged["runs"] = [run for r in reports for run in r["runs"]]
    methods = {run["method"] for run in merged["runs"]}
    merged["notes"] = [
        n for n in first.get("notes", []) if not (n.startswith(_NO_BASELINE_NOTE) and "splatfacto" in methods)
    ]
    if len(reports) > 1:
        merged["notes"].append(
            "runs trained in separate processes on the same device model" + (f"; {note}" if note else "")
        )
    elif note:  # one report: --merge only annotates it
        merged["notes"].append(note)
    return merged


if __name__ == "__main__":
    main()
