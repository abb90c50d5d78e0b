"""Multi-GPU scaling of a feed-forward trainer: the same global batch and seed on 1, 2, 4 ... GPUs.

    python benchmarks/ddp_scaling.py --collection COLL/collection.json --out DIR --gpus 1 2 4 \\
        --global-batch 8 --steps 2000 [--method semantic-splat|chorus-pretrain]

Each GPU count runs ``ns-train METHOD``'s configuration through nerfstudio's own launcher (``launch``, as
``--machine.num-devices N`` does) with ``global-batch / N`` samples per rank, so every step sees the same number of
scenes. Every rank records the wall time of each step, the time it waited for its loader's batch, its peak GPU
memory and its loss. The report (``"benchmark": "ddp_scaling"``) has a row per GPU count, rewritten after each run:
training scenes per second (global batch / median step time past the warm-up), the speed-up over the 1-GPU row,
peak memory per GPU, each rank's share of step time spent waiting for data, and the loss curve (the ranks' mean,
the global batch's loss) with its gap to the 1-GPU curve. ``--seed-noise-runs K`` adds K 1-GPU runs with other
seeds, whose gaps to the 1-GPU curve are the seed noise each row's gap is held to. GPU counts above what the
machine has are skipped with a note. With ``--device cpu`` each "GPU" is a process on the gloo backend, up to the
CPU count (a check of the script and its multi-process path, not a measurement).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, peak_memory_gib, write_markdown  # noqa: E402
from feedforward_training import StepClock, profile_training, train_config, training_parser  # noqa: E402


def timed_worker(local_rank: int, world_size: int, config, global_rank: int = 0) -> None:
    """One rank (nerfstudio's ``main_func``): train, recording each step's end time and every 50th step's loss;
    writes ``config.rank_log_dir/rank{R}.json``."""
    from splatsem_ns.engine.trainer import ChorusTrainer

    trainer = ChorusTrainer(config, local_rank=local_rank, world_size=world_size)
    trainer.setup()
    profile = getattr(config, "profile", None)
    if profile is not None and global_rank == 0:
        # Rank 0's step by region, under torch.profiler and with its syncs counted (the other ranks wait for it at
        # each all-reduce): where a multi-GPU step's time goes, NCCL's kernels included. Before the clock, so that
        # its wrappers do not time the clock's sync.
        profile_training(
            trainer,
            SimpleNamespace(**profile),
            Path(config.rank_log_dir).parent,
            f"{config.method_name}_{world_size}gpus",
        )
    clock = StepClock(trainer, terms=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = {
        "rank": global_rank,
        "steps": len(clock.stamps),
        "step_s": clock.step_seconds(),
        "data_wait": clock.data_wait(config.warmup_steps),  # type: ignore[attr-defined]
        "peak_gpu_memory_gib": peak_memory_gib(),
        "loss_curve": clock.losses,
    }
    folder = Path(config.rank_log_dir)  # type: ignore[attr-defined]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{global_rank}.json").write_text(json.dumps(result))


def run(gpus: int, args, report: Dict[str, Any], seed_offset: int = 0) -> Dict[str, Any]:
    """One GPU count: train through nerfstudio's launcher and summarise the ranks' logs. ``seed_offset`` > 0 moves
    both seeds (the weights' and the sample stream's) for a seed-noise run."""
    from nerfstudio.scripts.train import launch

    from splatsem_ns.engine.distributed import spawn_on_gloo

    args.batch_size = args.global_batch // gpus
    out = args.out / (f"gpus{gpus}" if not seed_offset else f"gpus{gpus}_seed{args.seed + seed_offset}")
    config = train_config(args, out, args.method)
    config.machine.num_devices = gpus
    config.machine.device_type = args.device
    config.machine.seed = args.seed + seed_offset
    config.pipeline.datamanager.seed += seed_offset
    config.rank_log_dir = str(out / "ranks")  # type: ignore[attr-defined]
    config.warmup_steps = args.warmup  # type: ignore[attr-defined]
    config.profile = (  # type: ignore[attr-defined]
        {"profile_at": args.profile_at, "profile_steps": args.profile_steps, "batch_size": args.batch_size}
        if args.profile_at > 0
        else None
    )
    config.save_config()
    if args.device == "cpu" and gpus > 1:
        # nerfstudio's launcher asserts CUDA for more than one process: on the CPU the ranks are spawned as it
        # spawns them, on gloo.
        spawn_on_gloo(timed_worker, gpus, config)
    else:
        launch(timed_worker, gpus, 1, 0, "auto", config=config, device_type=args.device)
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in range(gpus)]
    # A step ends when its slowest rank's does; DDP keeps them in step, so rank 0's times stand for all. Steps that
    # the profile's windows slowed (region timers, the profiler, the sync count: see step_regions.ProfileWindows)
    # are left out; step_s[i] is step i + 1's time.
    slowed = range(args.profile_at - args.profile_steps, args.profile_at + args.profile_steps + 5)
    steps = ranks[0]["step_s"]
    steady = [
        t for i, t in enumerate(steps) if i >= args.warmup and not (args.profile_at > 0 and i + 1 in slowed)
    ]
    steady = steady or steps
    median = statistics.median(steady) if steady else None
    return {
        "gpus": gpus,
        "seed": args.seed + seed_offset,
        "per_gpu_batch": args.batch_size,
        "global_batch": args.global_batch,
        "steps": ranks[0]["steps"],
        "ms_per_step_median": None if median is None else round(1000 * median, 2),
        "scenes_per_s": None if median is None else round(args.global_batch / median, 2),
        "peak_gpu_memory_gib_per_rank": [r["peak_gpu_memory_gib"] for r in ranks],
        # Each rank's own loader: the share of its steps spent waiting for a batch says whether loading keeps up.
        "data_wait_share_per_rank": [r["data_wait"]["data_wait_share"] for r in ranks],
        "data_wait_ms_median_per_rank": [r["data_wait"]["data_wait_ms_median"] for r in ranks],
        "loss_curve": global_batch_curve([r["loss_curve"] for r in ranks]),
    }


def global_batch_curve(curves: List[List[Dict[str, float]]]) -> List[Dict[str, float]]:
    """The ranks' logged losses averaged step by step: each rank's is the mean over its share of the global batch,
    so their mean is the global batch's loss, as the 1-GPU run logs it (rank 0's alone averages fewer samples and
    is noisier)."""
    steps = [point["step"] for point in curves[0]]
    by_rank = [{point["step"]: point["loss"] for point in curve} for curve in curves]
    return [
        {"step": step, "loss": round(statistics.fmean(rank[step] for rank in by_rank), 5)}
        for step in steps
        if all(step in rank for rank in by_rank)
    ]


def curve_gap(curve: List[Dict[str, float]], reference: List[Dict[str, float]]) -> Optional[float]:
    """Mean absolute difference of two loss curves over the steps both logged, relative to the reference's mean
    loss there; None when they share no step."""
    theirs = {point["step"]: point["loss"] for point in reference}
    pairs = [(point["loss"], theirs[point["step"]]) for point in curve if point["step"] in theirs]
    if not pairs:
        return None
    scale = statistics.fmean(abs(b) for _, b in pairs) or 1.0
    return round(statistics.fmean(abs(a - b) for a, b in pairs) / scale, 4)


def write(report: Dict[str, Any], out: Path) -> None:
    rows = report["rows"]
    base = next((r for r in rows if r["gpus"] == 1 and r["scenes_per_s"]), None)
    # Seed noise: how far 1-GPU runs with other seeds land from the 1-GPU run, the yardstick for the other counts.
    noise = (
        [curve_gap(r["loss_curve"], base["loss_curve"]) for r in report.get("seed_noise_runs", [])]
        if base
        else []
    )
    noise = [n for n in noise if n is not None]
    report["seed_noise_gap"] = max(noise) if noise else None
    for r in rows:
        r["speedup"] = (
            round(r["scenes_per_s"] / base["scenes_per_s"], 2) if base and r["scenes_per_s"] else None
        )
        r["loss_gap_to_1gpu"] = (
            curve_gap(r["loss_curve"], base["loss_curve"]) if base and r is not base else None
        )
        r["loss_within_seed_noise"] = (
            r["loss_gap_to_1gpu"] <= report["seed_noise_gap"]
            if r["loss_gap_to_1gpu"] is not None and report["seed_noise_gap"] is not None
            else None
        )
    (out / "ddp_scaling.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# {report['method']}: DistributedDataParallel scaling",
        "",
        f"- device: {report['device']}; collection `{report['collection']}`; global batch {report['global_batch']}, "
        f"seed {report['seed']}, {report['steps']} steps; step times past the first {report['warmup']}",
        "- targets: at least 1.8x on 2 GPUs and 3.4x on 4, loss curves within seed noise of the 1-GPU run",
        "",
        "- loss curves: each row's mean absolute gap to the 1-GPU curve over the steps both logged, relative to the "
        "1-GPU curve's mean loss there; seed noise is the largest such gap of 1-GPU runs with other seeds "
        f"({len(report.get('seed_noise_runs', []))} run(s): {report.get('seed_noise_gap')})",
        "",
        "| GPUs | samples per GPU | ms / step (median) | scenes / s | speed-up | peak memory per GPU (GiB) "
        "| waiting for data, share of step per GPU | loss gap to 1 GPU | within seed noise | last logged loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        last = r["loss_curve"][-1]["loss"] if r["loss_curve"] else None
        waits = r.get("data_wait_share_per_rank")  # reports from before the loader was timed have none
        lines.append(
            f"| {r['gpus']} | {r['per_gpu_batch']} | {r['ms_per_step_median']} | {r['scenes_per_s']} | "
            f"{r['speedup'] if r['speedup'] is not None else '-'} | "
            f"{', '.join(str(m) for m in r['peak_gpu_memory_gib_per_rank'])} | "
            f"{', '.join(str(w) for w in waits) if waits else '-'} | {_cell(r.get('loss_gap_to_1gpu'))} | "
            f"{_cell(r.get('loss_within_seed_noise'))} | {last} |"
        )
    lines += [f"\n- note: {n}" for n in report["notes"]]
    write_markdown(out / "ddp_scaling.md", lines)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def main() -> None:
    parser = training_parser(__doc__)
    parser.add_argument("--method", default="semantic-splat", choices=("semantic-splat", "chorus-pretrain"))
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--global-batch", type=int, default=8, help="samples per step over all GPUs")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the timing")
    parser.add_argument(
        "--seed-noise-runs",
        type=int,
        default=0,
        help="1-GPU runs with other seeds (weights and sample stream) after the 1-GPU row: how far their loss "
        "curves land from it is the seed noise that the other counts' curves are held to",
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu")
    )
    parser.add_argument(
        "--gaussians",
        default="labeled_points",
        help="chorus-pretrain: each scene's Gaussians (datamanager.gaussians)",
    )
    parser.set_defaults(steps=2000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method != "chorus-pretrain":
        args.gaussians = None
    # On the CPU each "GPU" is a gloo process: a check of the script's multi-process path, not a measurement.
    available = torch.cuda.device_count() if args.device == "cuda" else (os.cpu_count() or 1)
    report: Dict[str, Any] = {
        "benchmark": "ddp_scaling",
        "method": args.method,
        "device": device_name(),
        "torch": torch.__version__,
        "collection": str(args.collection),
        "global_batch": args.global_batch,
        "seed": args.seed,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": [],
        "seed_noise_runs": [],
        "notes": [],
    }
    for gpus in args.gpus:
        if gpus > available:
            report["notes"].append(f"{gpus} GPUs asked for, {available} here: not run")
            continue
        if args.global_batch % gpus:
            report["notes"].append(f"{gpus} GPUs do not divide the global batch {args.global_batch}: not run")
            continue
        try:
            report["rows"].append(run(gpus, args, report))
        except Exception as err:  # a failed count must not lose the others
            traceback.print_exc()
            report["notes"].append(f"{gpus} GPUs failed: {type(err).__name__}: {err}")
        write(report, args.out)
        if gpus == 1:
            for offset in range(1, args.seed_noise_runs + 1):
                try:
                    report["seed_noise_runs"].append(run(1, args, report, seed_offset=offset))
                except Exception as err:
                    traceback.print_exc()
                    report["notes"].append(f"seed-noise run {offset} failed: {type(err).__name__}: {err}")
                write(report, args.out)
    write(report, args.out)


if __name__ == "__main__":
    main()
