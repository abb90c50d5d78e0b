"""Set-up time of a chorus-splat run, first with an empty teacher-feature cache, then again with it full.

    python benchmarks/startup.py --data ../shared/data/scannet_scene0000_00 --out DIR [--runs 3] [--random-weights]
                                 [--feature-cache DIR]

Each run builds the whole trainer (dataparser, images, teacher features, depth, the cross-view consistency check,
the model) in one process, as ``ns-train`` does before its first step; with an empty feature cache (the default,
DIR/feature_cache on the first call) the first run extracts the features and the later ones find them cached.
Reports each run's seconds, which teacher networks it built (``ChorusDataManager.build_teacher`` calls) and for how
many teachers it ran the cross-view consistency check (the others read the weights an earlier run stored). The
first run also pays the process's first imports. The JSON (``"benchmark": "startup"``) and markdown are rewritten
after each run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_trainer,
    device_name,
    release_earlier_runs,
    scene_run_parser,
    seed_everything,
    sync,
    trainer_config,
    write_markdown,
)


def timed_setup(args, index: int, built: List[str], checked: List[int]) -> Dict[str, Any]:
    """Set up one trainer; its seconds, the teacher networks it built and the consistency checks it ran."""
    seed_everything(args.seed)
    cfg = trainer_config(
        "chorus-splat", Path(args.data), args.out, 100, args.teachers, args.random_weights, {}
    )
    cfg.timestamp = f"run{index}"
    if args.feature_cache is not None:
        cfg.pipeline.datamanager.feature_cache_dir = args.feature_cache
    if args.cpu:
        cfg.machine.device_type = "cpu"
    release_earlier_runs()
    built.clear()
    checked.clear()
    start = time.perf_counter()
    trainer = build_trainer(cfg)
    sync()
    seconds = time.perf_counter() - start
    del trainer
    return {
        "run": index,
        "setup_s": round(seconds, 2),
        "teachers_built": list(built),
        "consistency_checks_run": len(checked),
    }


def markdown(report: Dict[str, Any]) -> List[str]:
    lines = [
        "# chorus-splat set-up time with a teacher-feature cache",
        "",
        f"- data: `{report['data']}`; device: {report['device']}; teachers: {', '.join(report['teachers'])} "
        f"(random weights: {report['random_weights']})",
        f"- feature cache: `{report['feature_cache']}`; run 0 also pays the process's first imports; a run that built"
        " a teacher network extracted features with it",
        "",
        "| run | set-up (s) | teacher networks built | consistency checks run |",
        "|---|---|---|---|",
    ]
    for row in report["runs"]:
        lines.append(
            f"| {row['run']} | {row['setup_s']} | {', '.join(row['teachers_built']) or 'none'} "
            f"| {row['consistency_checks_run']} |"
        )
    return lines


def record_calls(owner: Any, name: str, record: Callable[..., Any]) -> None:
    """Replace ``owner.name`` by a wrapper that calls ``record`` with the positional arguments, then the original."""
    original = getattr(owner, name)

    def recorded(*call_args, **kwargs):
        record(*call_args)
        return original(*call_args, **kwargs)

    setattr(owner, name, recorded)


def main() -> None:
    import splatsem_ns.data.datamanager as datamanager
    from splatsem_ns.data.datamanager import ChorusDataManager

    parser = scene_run_parser(__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="set up on the CPU even where CUDA is present")
    parser.add_argument(
        "--feature-cache", type=Path, help="teacher-feature cache (default: OUT/feature_cache)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    built: List[str] = []
    record_calls(ChorusDataManager, "build_teacher", lambda manager, config: built.append(config.name))
    checked: List[int] = []
    record_calls(datamanager, "consistency_weights", lambda *check_args: checked.append(1))
    report: Dict[str, Any] = {
        "benchmark": "startup",
        "data": args.data,
        "device": "cpu" if args.cpu else device_name(),
        "teachers": list(args.teachers),
        "random_weights": args.random_weights,
        "feature_cache": str(args.feature_cache or args.out / "feature_cache"),
        "runs": [],
    }
    for index in range(args.runs):
        report["runs"].append(timed_setup(args, index, built, checked))
        (args.out / "startup.json").write_text(json.dumps(report, indent=2))
        write_markdown(args.out / "startup.md", markdown(report))


if __name__ == "__main__":
    main()
