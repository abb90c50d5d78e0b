"""What the feed-forward benchmarks share: one run of a feed-forward method (semantic-splat, chorus-pretrain) with
its ``ns-train`` configuration within a time budget, an optional profile of its step, and ns-eval's protocol on
held-out scenes."""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from common import device_name, peak_memory_gib, seed_everything, set_field, sync, write_markdown


def _semantic_splat():
    from splatsem_ns.method_configs.semantic_splat import semantic_splat

    return semantic_splat


def _chorus_pretrain():
    from splatsem_ns.method_configs.chorus_pretrain import chorus_pretrain

    return chorus_pretrain


METHODS = {"semantic-splat": _semantic_splat, "chorus-pretrain": _chorus_pretrain}
"""The feed-forward methods, imported when used (their method configs import nerfstudio)."""
TINY = {"semantic-splat": "tiny_network", "chorus-pretrain": "tiny_encoder"}
"""Each method's model flag for its few-channel CPU variant (``--tiny``)."""


def training_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the options of one training run (``add_training_arguments``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_arguments(parser)
    return parser


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of one training run (collection, teachers, loader, budget, profile)."""
    parser.add_argument("--collection", type=Path, required=True)
    parser.add_argument(
        "--real-collection", type=Path, action="append", default=[], help="evaluated separately"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teachers", nargs="+", default=["labels", "labels-instance"])
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--size", type=int, nargs=2, default=(240, 320), help="4:3, as ScanNet's frames")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument(
        "--minutes",
        type=float,
        default=5.0,
        help="training wall time, counted from the end of the first step",
    )
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--extraction-workers", type=int, default=1)
    parser.add_argument(
        "--feature-cache",
        type=Path,
        help="teacher feature cache folder (default OUT/feature_cache); runs over the same scenes can share one",
    )
    parser.add_argument("--max-scenes", type=int, help="use only the first N scenes of each split")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tiny", action="store_true", help="the few-channel network (CPU smoke runs)")
    parser.add_argument(
        "--decay-steps",
        type=int,
        help="end the learning-rate decay at this step and warm up over at most its first tenth (default: the "
        "method's schedule, whose 500-step warm-up takes all of a run of a few hundred steps)",
    )
    parser.add_argument("--save-checkpoint", action="store_true", help="keep the trained run's checkpoint")
    parser.add_argument(
        "--profile-at",
        type=int,
        default=0,
        help="profile the training step (step_regions.py) from this step on; write OUT/profile_METHOD.txt",
    )
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument(
        "--unlabelled-scenes",
        default="drop",
        choices=("drop", "geometry"),
        help="scenes the label proxies cannot read: left out, or trained on geometry and appearance only",
    )
    parser.add_argument(
        "--real-share",
        type=float,
        help="share of the training samples drawn from the collection's real captures (default: each scene "
        "equally often)",
    )
    parser.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a model config field (repeatable; dotted for nested ones), e.g. latent_render_scale=0.5 or "
        "encoder.input_variant=point",
    )


def train_config(args, out: Path, method: str):
    """``ns-train METHOD``'s configuration for a benchmark run: the collection, teachers and loader of ``args``, no
    periodic eval or saving, the learning-rate decay ending at ``--decay-steps`` where given."""
    config = copy.deepcopy(METHODS[method]().config)
    dm = config.pipeline.datamanager
    dm.data = Path(args.collection)
    dm.teachers = tuple(args.teachers)
    dm.teacher_random_weights = args.random_weights
    dm.image_size = tuple(args.size)
    dm.batch_size = args.batch_size
    dm.num_workers = args.loader_workers
    dm.eval_split = "test"
    dm.extraction_workers = args.extraction_workers
    dm.feature_cache_dir = getattr(args, "feature_cache", None) or out / "feature_cache"
    dm.max_scenes = args.max_scenes
    setattr(config.pipeline.model, TINY[method], args.tiny)
    for item in getattr(args, "model_set", []):
        key, _, value = item.partition("=")
        set_field(config.pipeline.model, key, value)
    if getattr(args, "gaussians", None):
        dm.gaussians = args.gaussians
    dm.unlabelled_scenes = getattr(args, "unlabelled_scenes", "drop")
    dm.real_share = getattr(args, "real_share", None)
    if getattr(args, "point_shape", None):
        dm.point_shape = args.point_shape
    if getattr(args, "max_gaussians", None):
        dm.max_gaussians = args.max_gaussians
    if getattr(args, "gaussian_subset", None):
        dm.gaussian_subset = args.gaussian_subset
    config.max_num_iterations = args.steps
    if args.decay_steps:  # let the schedule fit a short run: warm up over at most its first tenth, then decay
        if args.decay_steps < 2:  # nerfstudio's cosine schedule divides by the steps after the warm-up
            raise SystemExit(
                f"--decay-steps must be at least 2 (a warm-up step and a decay step), got {args.decay_steps}"
            )
        for group in config.optimizers.values():
            scheduler = group["scheduler"]
            scheduler.max_steps = args.decay_steps
            scheduler.warm_up_end = min(scheduler.warm_up_end, max(1, args.decay_steps // 10))
    config.steps_per_save = 10**9
    config.steps_per_eval_image = config.steps_per_eval_batch = config.steps_per_eval_all_images = 10**9
    config.save_every_minutes = 0
    config.output_dir = out / "runs"
    config.timestamp = "bench"
    config.machine.device_type = "cuda" if torch.cuda.is_available() else "cpu"
    config.vis = "tensorboard"
    return config


class StepClock:
    """Attached to a set-up trainer: the end time of every training step (after a device sync) and, every
    ``every`` steps, its losses (each term, or with ``terms=False`` their total); ``budget_s`` seconds after the
    first step ends it stops the training. The budget starts there, not at set-up, because the first step pays
    one-off costs (on a fresh GPU machine, gsplat's CUDA compilation: minutes) that are not training."""

    def __init__(
        self, trainer, every: int = 50, budget_s: Optional[float] = None, terms: bool = True
    ) -> None:
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        self.trainer, self.every, self.budget_s, self.terms = trainer, every, budget_s, terms
        self.stamps: List[float] = []
        self.losses: List[Dict[str, float]] = []
        self.data_waits: List[float] = []
        self._last: Optional[tuple] = None
        original = trainer.train_iteration
        datamanager = trainer.pipeline.datamanager
        next_train = datamanager.next_train

        def timed_next_train(step: int):
            # The host waits here for the loader's next batch (and queues its copy to the device); the GPU is idle
            # by then, since each step ends with a sync (_record), so this is time the loader did not keep up.
            start = time.perf_counter()
            served = next_train(step)
            self.data_waits.append(time.perf_counter() - start)
            return served

        datamanager.next_train = timed_next_train

        def train_iteration(step: int):
            loss, loss_dict, metrics = original(step)
            self._last = (loss, loss_dict)
            return loss, loss_dict, metrics

        trainer.train_iteration = train_iteration
        trainer.callbacks.append(
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self._record)
        )

    def _record(self, step: int) -> None:
        sync()
        self.stamps.append(time.perf_counter())
        if step % self.every == 0 and self._last is not None:
            loss, terms = self._last
            values = terms.items() if self.terms else [("loss", loss)]
            self.losses.append({"step": step, **{k: round(float(v), 5) for k, v in values}})
        if self.budget_s is not None and time.perf_counter() > self.stamps[0] + self.budget_s:
            self.trainer.stop_training = True

    def step_seconds(self) -> List[float]:
        """Seconds between consecutive steps' ends."""
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]

    def data_wait(self, skip: int = 0) -> Dict[str, Optional[float]]:
        """Past the first ``skip`` timed steps: the median ms a step waited for its batch, and the share of the
        steps' time spent waiting (near 0: loading keeps up; the step's own work sets the pace)."""
        steps = self.step_seconds()[skip:]
        # step_seconds()[i] is step i + 1's time, which includes data_waits[i + 1].
        waits = self.data_waits[1 + skip : 1 + skip + len(steps)]
        if not steps or not waits:
            return {"data_wait_ms_median": None, "data_wait_share": None}
        return {
            "data_wait_ms_median": round(1000 * statistics.median(waits), 2),
            "data_wait_share": round(sum(waits) / sum(steps), 4),
        }


def train(args, out: Path, report: Dict[str, Any], method: str):
    """Train ``method`` within the time budget; returns the trainer (its pipeline is evaluated next)."""
    from splatsem_ns.engine.trainer import ChorusTrainer

    seed_everything(args.seed)
    config = train_config(args, out, method)
    start = time.perf_counter()
    trainer = ChorusTrainer(config, local_rank=0, world_size=1)
    trainer.setup()
    if args.save_checkpoint:  # ns-train writes the run's config.yml; the checkpoint is useless without it
        config.save_config()
    report["setup_s"] = round(time.perf_counter() - start, 1)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start_training = time.perf_counter()
    if args.profile_at > 0:
        profile_training(trainer, args, out, method)
    # After the profile's wrappers, so they do not time its sync; --minutes counts from the first step's end.
    clock = StepClock(trainer, budget_s=60 * args.minutes)
    trainer.train()
    if args.save_checkpoint:  # for ns-eval, the viewer, export and the README picture
        trainer.save_checkpoint(trainer.step)
        report["run_config"] = str(trainer.base_dir / "config.yml")
    deltas = clock.step_seconds()
    skip = 20 if len(deltas) > 40 else 1  # past the warm-up, where there is one
    deltas = deltas[skip:]
    batch = args.batch_size
    report["training"] = {
        "steps": len(clock.stamps),
        "batch_size": batch,
        "first_step_s": round(clock.stamps[0] - start_training, 1) if clock.stamps else None,
        "ms_per_step_median": round(1000 * statistics.median(deltas), 1) if deltas else None,
        "scenes_per_s": round(batch / statistics.median(deltas), 2) if deltas else None,
        **clock.data_wait(skip),
        "peak_gpu_memory_gib": peak_memory_gib(),
        "loss_curve": clock.losses,
    }
    warm_up = max(group["scheduler"].warm_up_end for group in config.optimizers.values())
    if len(clock.stamps) <= warm_up:
        report.setdefault("notes", []).append(
            f"all {len(clock.stamps)} steps were inside the {warm_up}-step learning-rate warm-up: the network never "
            "trained at its peak rate (--decay-steps fits the schedule to a short run)"
        )
    return trainer


def profile_training(trainer, args, out: Path, method: str) -> None:
    """Time the step by region, profile it and count its syncs (step_regions.py) from ``--profile-at`` on; the
    report is written as soon as its windows are over, and training goes on."""
    from step_regions import ProfileWindows, StepRegions, network_regions, wrap_callbacks

    regions = StepRegions()
    regions.wrap_all(network_regions(trainer))
    wrap_callbacks(regions, trainer.callbacks)

    def write_profile(windows: ProfileWindows) -> None:
        title = f"# {method}: {args.profile_steps} profiled steps after {args.profile_at} (batch {args.batch_size})"
        path = out / f"profile_{method.replace('-', '_')}.txt"
        path.write_text(windows.report(title))
        print(f"wrote {path}", flush=True)

    ProfileWindows(trainer, args.profile_at, args.profile_steps, 5, regions, write_profile)


def evaluate(pipeline, collection: Optional[Path], label: str, report: Dict[str, Any]) -> None:
    """ns-eval's protocol on ``collection``'s test split (or the pipeline's own held-out scenes)."""
    if collection is not None:
        from splatsem_ns.data.multiscene import MultiSceneDataManagerConfig

        dm_config = copy.deepcopy(pipeline.datamanager.config)
        assert isinstance(dm_config, MultiSceneDataManagerConfig)
        dm_config.data = collection
        dm_config.num_workers = 0
        manager = dm_config.setup(device=pipeline.model.device, test_mode="test")
        original, pipeline.datamanager = pipeline.datamanager, manager
    try:
        results = pipeline.get_average_eval_image_metrics(get_std=True)
    finally:
        if collection is not None:
            pipeline.datamanager = original
    keep = {k: v for k, v in results.items() if k not in ("semantic_classes",)}
    report["evaluation"][label] = keep


def new_report(benchmark: str, args) -> Dict[str, Any]:
    """The fields every feed-forward report starts with."""
    return {
        "benchmark": benchmark,
        "device": device_name(),
        "torch": torch.__version__,
        "collection": str(args.collection),
        "teachers": list(args.teachers),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "evaluation": {},
        "notes": [],
    }


def evaluate_all(pipeline, args, report: Dict[str, Any], write: Callable[[], None]) -> None:
    """ns-eval's protocol on the training collection's held-out scenes, then on each ``--real-collection``; the
    report is written after each, and one that fails is noted without losing the others."""
    for label, collection in [("procedural (never seen)", None)] + [
        (f"real: {Path(c).parent.name}", Path(c)) for c in args.real_collection
    ]:
        try:
            evaluate(pipeline, collection, label, report)
        except Exception as err:  # one failed evaluation must not lose the others
            traceback.print_exc()
            report["notes"].append(f"evaluation '{label}' failed: {type(err).__name__}: {err}")
        write()


def header_lines(report: Dict[str, Any], title: str, what: str) -> List[str]:
    """A report's title, device, teachers (with the proxy's caveat) and training summary; ``what`` names the
    trained model in the caveat ("network", "encoder")."""
    lines = [
        f"# {title}",
        "",
        f"- device: {report['device']}; torch {report['torch']}; teachers: {', '.join(report['teachers'])}"
        + (
            f" (labels proxy: scores say how the {what} lifts that teacher, not how a real CLIP would do)"
            if "labels" in report["teachers"]
            else ""
        ),
        f"- collection: `{report['collection']}`"
        + (f"; each scene's Gaussians: `{report['gaussians']}`" if "gaussians" in report else ""),
    ]
    if "training" in report:
        t = report["training"]
        lines.append(
            f"- training: {t['steps']} steps of {t['batch_size']} samples, {t['ms_per_step_median']} ms per step, "
            f"{t['scenes_per_s']} scenes/s, peak GPU memory {t['peak_gpu_memory_gib']} GiB "
            f"(set-up {report.get('setup_s')} s)"
        )
    return lines


def write_report(report: Dict[str, Any], out: Path, stem: str, lines: List[str]) -> None:
    """``OUT/STEM.json`` and ``OUT/STEM.md`` (``lines`` then the report's notes)."""
    text = json.dumps(report, indent=1, default=str)
    # Innermost lists of numbers (per-scene confusion counts) on one line each: readable, and a tenth of the size.
    text = re.sub(r"\[\s+([-\d.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (out / f"{stem}.json").write_text(text)
    write_markdown(out / f"{stem}.md", lines + [f"\n- note: {note}" for note in report.get("notes", [])])
