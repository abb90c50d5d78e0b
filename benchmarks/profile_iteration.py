"""Where a training iteration spends its time: host time per region, torch.profiler, and the lines that sync.

    python benchmarks/profile_iteration.py --data SCENE --out DIR --random-weights [--method splatfacto chorus-splat]

For each method (``LABEL=METHOD:field=value`` sets model fields, as in train_speed.py): trains ``--start``
iterations (so densification has begun); over the ``--steps`` before ``--start`` records the host time of each
named region of the step (``step_regions.py``) and the wall time; then profiles ``--steps`` iterations; then
counts the host-device synchronisations of ``--sync-steps`` iterations by source line. Writes
``DIR/profile_<label>.txt`` (regions, syncs, operator tables by GPU and by CPU time) as soon as a method is done.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_trainer, parse_method, scene_run_parser, seed_everything, trainer_config  # noqa: E402
from step_regions import ProfileWindows, StepRegions, trainer_regions, wrap_callbacks  # noqa: E402


def main() -> None:
    parser = scene_run_parser(__doc__)
    parser.add_argument("--method", nargs="+", default=["chorus-splat"])
    parser.add_argument("--start", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sync-steps", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # One folder for every method's run: nerfstudio's event writer is process-global and still points at the
    # previous run's folder when the next trainer is set up, so that folder must outlive its run.
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.method):
            profile_method(spec, args, Path(tmp) / str(i))


def profile_method(spec: str, args, run_dir: Path) -> None:
    label, method, overrides = parse_method(spec)
    seed_everything(args.seed)
    iterations = args.start + args.steps + args.sync_steps + 1
    cfg = trainer_config(
        method, args.data, run_dir, iterations, args.teachers, args.random_weights, overrides
    )
    trainer = build_trainer(cfg)
    regions = StepRegions()
    regions.wrap_all(trainer_regions(trainer))
    wrap_callbacks(regions, trainer.callbacks)
    profile = ProfileWindows(trainer, args.start, args.steps, args.sync_steps, regions)
    trainer.train()
    text = profile.report(f"# {label}: {args.steps} profiled iterations after {args.start} ({spec})")
    (args.out / f"profile_{label}.txt").write_text(text + "\n")
    print(text[:5000], flush=True)


if __name__ == "__main__":
    main()
