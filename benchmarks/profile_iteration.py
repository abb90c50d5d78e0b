"""Where a chorus-splat training iteration spends its time: torch.profiler over a window of steps.

    python benchmarks/profile_iteration.py --data SCENE --out DIR --random-weights [--method chorus-splat]

Trains ``--start`` iterations unprofiled (so densification has begun), then profiles ``--steps`` iterations
and writes the operator table sorted by GPU time and by CPU time to ``DIR/profile_<method>.txt``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_trainer, parse_method, seed_everything, sync, trainer_config  # noqa: E402


def main() -> None:
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    from splatsem_ns.teachers.registry import DEFAULT_TEACHERS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", default="chorus-splat")
    parser.add_argument("--start", type=int, default=600)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--teachers", nargs="+", default=list(DEFAULT_TEACHERS))
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    args.iterations = args.start + args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    label, method, overrides = parse_method(args.method)
    seed_everything(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trainer_config(
            method, args.data, Path(tmp), args.iterations, args.teachers, args.random_weights, overrides
        )
        trainer = build_trainer(cfg)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities)

        marks: dict[int, float] = {}

        def toggle(step: int) -> None:
            # The steps just before the profiled window are timed without the profiler's own overhead.
            if step in (args.start - args.steps, args.start):
                sync()
                marks[step] = time.perf_counter()
            if step == args.start:
                prof.start()
            elif step == args.start + args.steps - 1:
                prof.stop()

        trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], toggle))
        trainer.train()
    sort_gpu = "self_cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    unprofiled_ms = 1000 * (marks[args.start] - marks[args.start - args.steps]) / args.steps
    text = (
        f"# {label}: {args.steps} profiled iterations after {args.start}\n\n"
        f"Unprofiled wall time of the {args.steps} steps before them: {unprofiled_ms:.2f} ms/iter\n\n"
        + prof.key_averages().table(sort_by=sort_gpu, row_limit=40)
        + "\n\n"
        + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    )
    (args.out / f"profile_{label}.txt").write_text(text)
    print(text[:6000])


if __name__ == "__main__":
    main()
