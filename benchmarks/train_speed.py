"""Training speed and memory of chorus-splat against plain splatfacto, measured in one process.

Both methods train on the same scene with the same dataparser, seed, iteration count and resolution
(``num_downscales=0``, so every step is at full resolution). Per-iteration time is taken from a
callback that synchronises the GPU after each full iteration (forward, backward, optimizer steps and
densification); the report gives the median over the steps after warm-up, and peak GPU memory over
the training loop. chorus-splat's one-off teacher feature extraction is timed separately.

Full-size teacher architectures with random weights (``--random-weights``) cost the same compute as
trained ones; the features are meaningless, which does not matter for speed.

    python benchmarks/train_speed.py --data ../shared/data/scannet_scene0000_00 --out /tmp/speed --random-weights

A shared machine's speed drifts by tens of percent over minutes, more than the levers being compared, and runs made
one after another see different machines. ``--interleave K`` adds one more round in which every method's trainer is
built first and they then train in turns of K steps (one thread each, only one running at a time), so neighbouring
blocks of the methods see the same machine; the report gives each method's ratio per pair of neighbouring blocks
(its block against splatfacto's), median and spread. Peak memory comes from the sequential rounds only: the
interleaved trainers share the GPU.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    build_trainer,
    compile_counts,
    device_name,
    parse_method,
    peak_memory_gib,
    release_earlier_runs,
    scene_run_parser,
    seed_everything,
    sync,
    trainer_config,
    write_markdown,
)  # noqa: E402


def run_config(method: str, args, out: Path, label: str, overrides: dict):
    """One run's trainer config (the seed set first), as every round, interleaved or not, builds it."""
    seed_everything(args.seed)
    cfg = trainer_config(
        method, args.data, out, args.iterations, args.teachers, args.random_weights, overrides
    )
    cfg.timestamp = label
    return cfg


def run_method(method: str, args, out: Path, label: str, overrides: dict) -> dict:
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    cfg = run_config(method, args, out, label, overrides)
    resident = release_earlier_runs()
    t0 = time.perf_counter()
    trainer = build_trainer(cfg)
    sync()
    setup_s = time.perf_counter() - t0
    setup_peak = peak_memory_gib(resident)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    stamps: list[float] = []

    def record(step: int) -> None:
        sync()
        stamps.append(time.perf_counter())

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], record))
    sync()
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    deltas_ms = [1000 * (b - a) for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    steady = deltas_ms[args.warmup :]
    model = trainer.pipeline.model
    result = {
        "method": label,
        "model_overrides": overrides,
        "setup_s": round(setup_s, 2),
        "train_s": round(train_s, 2),
        # The first step holds the losses' compiles (its backward's too), which the steady statistics leave out.
        "first_step_s": round(stamps[0] - t1, 2) if stamps else None,
        "iterations": len(stamps),
        "ms_per_iter_median": round(statistics.median(steady), 3),
        "ms_per_iter_mean": round(statistics.fmean(steady), 3),
        "ms_per_iter_p90": round(float(np.percentile(steady, 90)), 3),
        "peak_gpu_mem_gib_train": peak_memory_gib(resident),
        "peak_gpu_mem_gib_setup": setup_peak,
        "gpu_mem_gib_held_before": round(resident / 2**30, 3),
        "num_gaussians_final": int(model.num_points),
        "compile": compile_counts(),
    }
    if method == "chorus-splat":
        result["teachers"] = {
            name: {
                "feature_dim": s.feature_dim,
                "feature_grid": list(s.feature_grid),
                "model": s.config.model_name,
            }
            for name, s in model.teacher_specs.items()
        }
        result["semantic_render_scale"] = float(model.semantic_scale)
        result["latent_dim"] = model.semantic_source.latent_dim
    del trainer, model
    return result


class Baton:
    """Strict turns between threads: only the thread holding the turn runs. ``pass_on`` hands the turn to the next
    thread still running and waits until it comes back; ``finish`` hands it on for good."""

    def __init__(self, count: int) -> None:
        self.turn = 0
        self.done = [False] * count
        self.condition = threading.Condition()

    def _next(self, index: int) -> int:
        count = len(self.done)
        for offset in range(1, count + 1):
            candidate = (index + offset) % count
            if not self.done[candidate]:
                return candidate
        return index

    def wait_turn(self, index: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == index)

    def pass_on(self, index: int) -> None:
        with self.condition:
            self.turn = self._next(index)
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.turn == index)

    def finish(self, index: int) -> None:
        with self.condition:
            self.done[index] = True
            self.turn = self._next(index)
            self.condition.notify_all()


def run_interleaved(specs: list, args, out: Path) -> dict:
    """Build every method's trainer, then train them in turns of ``args.interleave`` steps (see the module's
    docstring). Returns per label the mean ms/step of each block of steps (None for blocks that reach into the
    warm-up), and any failure."""
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    release_earlier_runs()
    block = args.interleave
    labels, trainers = [], []
    for spec in specs:
        label, method, overrides = parse_method(spec)
        cfg = run_config(method, args, out, label, overrides)
        labels.append(label)
        trainers.append(build_trainer(cfg))
    baton = Baton(len(trainers))
    blocks: list = [[[]] for _ in trainers]  # per trainer, per block: the times that bound its steps
    errors: dict = {}

    def callbacks(index: int) -> list:
        def record(step: int) -> None:
            sync()
            blocks[index][-1].append(time.perf_counter())

        def hand_over(step: int) -> None:
            if (step + 1) % block == 0:
                baton.pass_on(index)
                sync()
                blocks[index].append([time.perf_counter()])  # the next block starts when the turn comes back

        where = [TrainingCallbackLocation.AFTER_TRAIN_ITERATION]
        # Last of all the trainer's callbacks: the model's own (e.g. releasing held compile options) run first.
        return [TrainingCallback(where, record), TrainingCallback(where, hand_over)]

    def train(index: int) -> None:
        baton.wait_turn(index)
        try:
            sync()
            blocks[index][0].append(time.perf_counter())
            trainers[index].train()
        except Exception as err:  # the others go on; the failure is reported
            traceback.print_exc()
            errors[labels[index]] = f"{type(err).__name__}: {err}"
        finally:
            baton.finish(index)

    for index, trainer in enumerate(trainers):
        trainer.callbacks.extend(callbacks(index))
    threads = [
        threading.Thread(target=train, args=(i,), name=f"train-{label}") for i, label in enumerate(labels)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {
        "block": block,
        "warmup_excluded": args.warmup,
        "block_ms": {},
        "block_bounds_s": {},  # each block's first and last time, from the first trainer's start: the turns
        "failed": errors,
    }
    origin = blocks[0][0][0]
    for label, runs in zip(labels, blocks, strict=True):
        means = []
        for b, stamps in enumerate(runs):
            whole = len(stamps) == block + 1 and b * block >= args.warmup
            means.append(round(1000 * (stamps[-1] - stamps[0]) / block, 3) if whole else None)
        result["block_ms"][label] = means
        result["block_bounds_s"][label] = [
            [round(stamps[0] - origin, 4), round(stamps[-1] - origin, 4)] for stamps in runs
        ]
    trainers.clear()  # the closures above hold the list: emptied, the trainers can be freed
    return result


def interleaved_ratios(interleaved: dict, baseline: str = "splatfacto") -> dict:
    """Per label: the median and the 10th-90th percentile of its block's mean ms/step over the ``baseline``'s block
    of the same index (the neighbouring one in time), with each one's median block ms/step."""
    blocks = interleaved["block_ms"]
    base = blocks.get(baseline)
    ratios = {}
    for label, means in blocks.items():
        own = [m for m in means if m is not None]
        row: dict = {"ms_per_iter_median_of_blocks": round(statistics.median(own), 3) if own else None}
        if base is not None and label != baseline:
            pairs = [m / b for m, b in zip(means, base, strict=False) if m is not None and b is not None]
            if pairs:
                row["time_per_iter"] = round(statistics.median(pairs), 3)
                row["p10_p90"] = [round(float(np.percentile(pairs, q)), 3) for q in (10, 90)]
                row["blocks"] = len(pairs)
        ratios[label] = row
    return ratios


def main() -> None:
    parser = scene_run_parser(__doc__, data_required=False)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument(
        "--warmup", type=int, default=500, help="iterations left out of the timing statistics"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["splatfacto", "chorus-splat"],
        help="METHOD or LABEL=METHOD:field=value,field=value (model config overrides), e.g. "
        "chorus-tile8=chorus-splat:semantic_tile_size=8",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of all methods, interleaved (A B A B ...): each round's ratios pair runs made minutes apart, "
        "and the report gives their median and range (one run's ratio moves by 0.1-0.2 on a shared GPU machine)",
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="K",
        help="after the rounds, one more with every method's trainer built at once, training in turns of K steps, "
        "so that neighbouring blocks see the same machine (0: off)",
    )
    parser.add_argument("--render", type=Path, help="only re-render the Markdown of a saved train_speed.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        write_report(json.loads(args.render.read_text()), args.out, stem=args.render.stem)
        return

    results, failures = [], []
    report = {
        "benchmark": "train_speed",
        "data": str(args.data),
        "device": device_name(),
        "torch": torch.__version__,
        "iterations": args.iterations,
        "warmup_excluded": args.warmup,
        "teachers": list(args.teachers),
        "random_teacher_weights": args.random_weights,
        "settings": "num_downscales=0 (full resolution every step), same seed and dataparser for both",
        "rounds": args.repeats,
        "results": results,
        "notes": failures,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.repeats):
            for spec in args.methods:
                label, method, overrides = parse_method(spec)
                try:
                    result = run_method(method, args, Path(tmp) / f"round{round_index}", label, overrides)
                except Exception as err:  # one broken variant must not lose the others' measurements
                    traceback.print_exc()
                    failures.append(f"{label} (round {round_index}) failed: {type(err).__name__}: {err}")
                    continue
                results.append({**result, "round": round_index})
                print(json.dumps(results[-1]), flush=True)
                write_report(report, args.out)  # after every run: a cut-off benchmark keeps what it measured
        if args.interleave > 0:
            try:
                report["interleaved"] = run_interleaved(args.methods, args, Path(tmp) / "interleaved")
            except Exception as err:
                traceback.print_exc()
                failures.append(f"interleaved round failed: {type(err).__name__}: {err}")
    write_report(report, args.out)


def ratios_over_baseline(results: list[dict], baseline: str = "splatfacto") -> dict:
    """Per run label: median ms/iter and peak training memory divided by the baseline's from the same round.

    With one round each value is that round's ratio. With several (``--repeats``) each is the median over the
    rounds, and ``rounds`` holds the per-round ratios: a pair measured minutes apart shares the machine's state,
    so the spread of the rounds says how far one ratio can be trusted."""
    per_round = _by_round(results)
    collected: dict = {}
    for runs in per_round.values():
        for label, values in _round_ratios(runs, baseline).items():
            for key, value in values.items():
                collected.setdefault(label, {}).setdefault(key, []).append(value)
    ratios = {}
    for label, values in collected.items():
        ratios[label] = {key: round(statistics.median(v), 3) for key, v in values.items()}
        if len(per_round) > 1:
            ratios[label]["rounds"] = values
    return ratios


def _by_round(results: list[dict]) -> dict:
    """The runs of each round, by round index (reports made before ``--repeats`` hold one round, 0)."""
    rounds: dict = {}
    for r in results:
        rounds.setdefault(r.get("round", 0), []).append(r)
    return rounds


def _round_ratios(runs: list[dict], baseline: str) -> dict:
    """One round's ratios of every run over the round's ``baseline`` run (none without one)."""
    base = next((r for r in runs if r["method"] == baseline), None)
    ratios = {}
    for r in runs:
        if base is None or r is base:
            continue
        ratios[r["method"]] = {
            "time_per_iter": round(r["ms_per_iter_median"] / base["ms_per_iter_median"], 3)
        }
        if "ms_per_iter_mean" in r and "ms_per_iter_mean" in base:
            # A run that does some work every k-th step (semantic_every) alternates cheap and dear steps, so its
            # median is not its cost; the mean is.
            ratios[r["method"]]["mean_time_per_iter"] = round(
                r["ms_per_iter_mean"] / base["ms_per_iter_mean"], 3
            )
        if base["peak_gpu_mem_gib_train"]:
            ratios[r["method"]]["peak_gpu_memory"] = round(
                r["peak_gpu_mem_gib_train"] / base["peak_gpu_mem_gib_train"], 3
            )
    return ratios


def _other_baselines(results: list[dict]) -> list[str]:
    """Labels of further splatfacto runs (e.g. with another optimizer implementation) to compare against."""
    labels = [
        r["method"] for r in results if r["method"] != "splatfacto" and r["method"].startswith("splatfacto")
    ]
    return list(dict.fromkeys(labels))


def beyond_steady_s(run: dict):
    """Seconds the run's training loop took beyond ``iterations`` steps at the steady mean (compiles, warm-up and
    saving); computable from reports made before ``first_step_s`` was recorded. "-" without a mean."""
    if "ms_per_iter_mean" not in run or "train_s" not in run:
        return "-"
    return round(run["train_s"] - run["iterations"] * run["ms_per_iter_mean"] / 1000, 1)


def write_report(report: dict, out: Path, stem: str = "train_speed") -> None:
    """Write ``{stem}.json`` and ``{stem}.md``; ratios are recomputed from the measured results."""
    results = report["results"]
    report["ratios_over_splatfacto"] = ratios = ratios_over_baseline(results)
    if report.get("interleaved"):
        report["interleaved"]["ratios"] = interleaved_ratios(report["interleaved"])
    others = {baseline: ratios_over_baseline(results, baseline) for baseline in _other_baselines(results)}
    if others:
        report["ratios_over"] = others
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# chorus-splat vs splatfacto: training speed and memory",
        "",
        f"- data: `{report['data']}`; device: {report['device']}; torch {report['torch']}",
        f"- {report['iterations']} iterations each, first {report['warmup_excluded']} left out of the timing; "
        f"{report['settings']}",
        f"- teachers: {', '.join(report.get('teachers', []))} (random weights: {report['random_teacher_weights']})",
        *[f"- note: {n}" for n in report.get("notes", [])],
        "",
        "| run | model overrides | ms/iter (median) | ms/iter (mean) | ms/iter (p90) "
        "| peak GPU memory, training (GiB) | Gaussians at end | MiB per 1M Gaussians | set-up (s) "
        "| first step (s) | beyond steady steps (s) "
        "| time / splatfacto (median) | time / splatfacto (mean) | memory / splatfacto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_round = _by_round(results)
    round_ratios = {k: _round_ratios(runs, "splatfacto") for k, runs in by_round.items()}

    def name_of(r: dict) -> str:
        return f"{r['method']} (round {r.get('round', 0)})" if len(by_round) > 1 else r["method"]

    for r in results:
        ratio = round_ratios[r.get("round", 0)].get(r["method"], {})  # the row's own round
        per_million = (
            round(1024 * r["peak_gpu_mem_gib_train"] / (r["num_gaussians_final"] / 1e6), 1)
            if r["peak_gpu_mem_gib_train"] and r["num_gaussians_final"]
            else "-"
        )
        lines.append(
            f"| {name_of(r)} | {r.get('model_overrides') or '-'} | {r['ms_per_iter_median']} "
            f"| {r.get('ms_per_iter_mean', '-')} | {r['ms_per_iter_p90']} | {r['peak_gpu_mem_gib_train']} "
            f"| {r['num_gaussians_final']} | {per_million} | {r['setup_s']} | {r.get('first_step_s') or '-'} "
            f"| {beyond_steady_s(r)} | {ratio.get('time_per_iter', '-')} "
            f"| {ratio.get('mean_time_per_iter', '-')} | {ratio.get('peak_gpu_memory', '-')} |"
        )
    lines += [
        "",
        "First step: the first training step's seconds, which hold the compiles of the losses. Beyond steady "
        "steps: the training loop's seconds less iterations x the steady mean, i.e. what compiles, warm-up and "
        "saving added to the whole run (the cost a short run pays).",
    ]
    if len(by_round) > 1:
        lines += [
            "",
            f"Over {len(by_round)} interleaved rounds (each ratio against the same round's splatfacto; median, then "
            "the range):",
            "",
            "| run | time / splatfacto (median) | time / splatfacto (mean) | memory / splatfacto |",
            "|---|---|---|---|",
        ]
        for label, ratio in ratios.items():
            cells = [
                f"{ratio[key]} ({min(ratio['rounds'][key])}-{max(ratio['rounds'][key])})"
                if key in ratio
                else "-"
                for key in ("time_per_iter", "mean_time_per_iter", "peak_gpu_memory")
            ]
            lines.append(f"| {label} | {' | '.join(cells)} |")
    if report.get("interleaved"):
        interleaved = report["interleaved"]
        ratios = interleaved["ratios"]
        lines += [
            "",
            f"Interleaved: every trainer built at once, training in turns of {interleaved['block']} steps; blocks "
            f"that reach into the first {interleaved['warmup_excluded']} steps left out. Each ratio divides a "
            "block's mean ms/step by splatfacto's block of the same index, its neighbour in time (median, then the "
            "10th-90th percentile over the blocks):",
            "",
            "| run | ms/iter (median of blocks) | time / splatfacto | 10th-90th percentile | blocks |",
            "|---|---|---|---|---|",
            *[
                f"| {label} | {row['ms_per_iter_median_of_blocks']} | {row.get('time_per_iter', '-')} "
                f"| {'-'.join(str(v) for v in row['p10_p90']) if 'p10_p90' in row else '-'} "
                f"| {row.get('blocks', '-')} |"
                for label, row in ratios.items()
            ],
            *[f"- failed: {label}: {why}" for label, why in interleaved.get("failed", {}).items()],
        ]
    compiled = [r for r in results if r.get("compile", {}).get("frames_compiled")]
    if compiled:
        lines += [
            "",
            "torch.compile in each run (from a reset: Dynamo's frames compiled, graph breaks, graphs built, and "
            "graphs that ran without the CUDA graphs they asked for):",
            "",
            "| run | frames | graph breaks | graphs | CUDA-graph skips |",
            "|---|---|---|---|---|",
            *[
                f"| {name_of(r)} | {c['frames_compiled']} | {c['graph_breaks']} | {c['unique_graphs']} "
                f"| {c['cudagraph_skips']} |"
                for r in compiled
                for c in [r["compile"]]
            ],
        ]
    for baseline, other in others.items():
        lines += [
            "",
            f"Against `{baseline}` ({next(r.get('model_overrides') for r in results if r['method'] == baseline)}):",
            "",
            "| run | time / baseline | memory / baseline |",
            "|---|---|---|",
            *[
                f"| {name} | {v['time_per_iter']} | {v.get('peak_gpu_memory', '-')} |"
                for name, v in other.items()
                if not name.startswith("splatfacto")
            ],
        ]
    write_markdown(out / f"{stem}.md", lines)


if __name__ == "__main__":
    main()
