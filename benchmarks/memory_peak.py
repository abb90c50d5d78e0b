"""What a training step's peak GPU memory holds: the persistent per-Gaussian state, and the step's own tensors alive at
its peak, by the line that allocated them.

    python benchmarks/memory_peak.py --data SCENE --out DIR --random-weights [--method splatfacto chorus-splat]
                                     [--start 1500] [--steps 3] [--device cuda|cpu]

For each method (``LABEL=METHOD:field=value`` sets model fields, as in train_speed.py): trains ``--start``
iterations (so the Gaussians have grown), then records the CUDA caching allocator's history
(``torch.cuda.memory._record_memory_history``, Python stacks) over ``--steps`` iterations and replays it:

- persistent: what was allocated when the recording began (parameters, optimizer states, densification statistics,
  cached inputs), split into per-Gaussian state by kind (parameter, gradient, optimizer state, strategy) and the
  rest;
- transient: the tensors allocated inside the recorded steps that were alive at the moment allocated memory peaked,
  summed by the first line of project, nerfstudio or gsplat code on their allocation stack (tensors allocated by
  autograd's engine in backward are charged to the Python frame that called ``backward``, unless a Python autograd
  function, such as gsplat's, allocated them).

Writes ``DIR/memory_peak.json`` and ``.md`` as soon as each method is done. ``--device cpu`` (the default without
a GPU) records the same events from the operators themselves (``HostRecorder``): the path the GPU run takes, on the
PyTorch rasterizer, whose memory is not gsplat's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    build_trainer,
    device_name,
    parse_method,
    release_earlier_runs,
    scene_run_parser,
    seed_everything,
    trainer_config,
    write_markdown,
)
from live_bytes import LiveBytes  # noqa: E402

OWN_CODE = ("splatsem_ns", "nerfstudio", "gsplat")
"""Path parts of the code a transient tensor is charged to (its first such frame, innermost first)."""
MIB = 2**20


def persistent_inventory(
    model: torch.nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    strategy_state: Optional[Mapping] = None,
) -> Dict[str, Any]:
    """Bytes of the model's parameters, their gradients, the optimizers' states and the densification strategy's
    state; those whose first dimension is the Gaussian count also per Gaussian. Each storage is counted once."""
    count = int(model.num_points) if hasattr(model, "num_points") else 0
    seen: Dict[int, Tuple[str, int, bool]] = {}

    def add(kind: str, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.numel() == 0:
            return
        per_gaussian = count > 0 and tensor.dim() > 0 and tensor.shape[0] == count
        seen.setdefault(
            tensor.untyped_storage().data_ptr(), (kind, tensor.untyped_storage().nbytes(), per_gaussian)
        )

    for parameter in model.parameters():
        add("parameters", parameter)
        add("gradients", parameter.grad)
    for buffer in model.buffers():
        add("buffers", buffer)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add("optimizer states", value)
    for value in (strategy_state or {}).values():
        add("densification statistics", value)
    per_gaussian: Counter = Counter()
    other: Counter = Counter()
    for kind, nbytes, is_per_gaussian in seen.values():
        (per_gaussian if is_per_gaussian else other)[kind] += nbytes
    return {
        "gaussians": count,
        "per_gaussian_bytes": {k: round(v / count, 1) for k, v in per_gaussian.items()} if count else {},
        "per_gaussian_mib": {k: round(v / MIB, 1) for k, v in per_gaussian.items()},
        "other_mib": {k: round(v / MIB, 2) for k, v in other.items()},
    }


def _site(frames: Sequence[Mapping[str, Any]]) -> str:
    """``file:line function`` of the first frame (innermost first) in OWN_CODE, else the innermost frame."""
    for frame in frames:
        name = str(frame.get("filename", ""))
        if any(f"/{part}/" in name for part in OWN_CODE):
            short = name.split("site-packages/")[-1]
            for part in OWN_CODE:
                if f"/{part}/" in short:
                    short = part + "/" + short.split(f"/{part}/", 1)[1]
                    break
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    if frames:
        return f"{frames[0].get('filename')}:{frames[0].get('line')} {frames[0].get('name')}"
    return "(no stack)"


def peak_breakdown(events: Sequence[Mapping[str, Any]], top: int = 25) -> Dict[str, Any]:
    """Replays one device's allocator trace (``snapshot["device_traces"][d]``): the largest net growth of allocated
    bytes over the recording, and the blocks allocated during it that were alive at that moment, summed by site.
    ``alloc`` adds a block; ``free_completed`` (the allocator's free, after pending stream uses; ``free`` in older
    torch) removes it."""
    live: Dict[int, Tuple[int, str]] = {}
    level = peak = 0
    at_peak: Dict[int, Tuple[int, str]] = {}
    for event in events:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = (int(event["size"]), _site(event.get("frames") or []))
            level += int(event["size"])
            if level > peak:
                peak, at_peak = level, dict(live)
        elif action in ("free_completed", "free") and event["addr"] in live:
            level -= live.pop(event["addr"])[0]
    by_site: Counter = Counter()
    for size, site in at_peak.values():
        by_site[site] += size
    return {
        "transient_peak_mib": round(peak / MIB, 1),
        "sites_mib": [(site, round(size / MIB, 1)) for site, size in by_site.most_common(top)],
    }


class CudaRecorder:
    """The CUDA caching allocator's own statistics and history (``torch.cuda.memory._record_memory_history``)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries

    @staticmethod
    def allocated_bytes() -> Optional[int]:
        return torch.cuda.memory_allocated()

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")

    def stop(self) -> Tuple[Optional[int], List[Dict[str, Any]]]:
        """The peak allocated bytes since ``start`` and the allocator's events, in order."""
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return peak, snapshot["device_traces"][torch.cuda.current_device()]


class HostRecorder(LiveBytes):
    """The same events on the CPU, from the operators themselves: an ``alloc`` with the Python stack for each new
    storage an operator returns, a ``free_completed`` when it is freed. Slow (a stack per operator) and blind to
    what was allocated before ``start``; for checking this script, and as a rough picture where no GPU is."""

    def __init__(self) -> None:
        super().__init__()
        self.events: List[Dict[str, Any]] = []

    def allocated(self, key: int, nbytes: int) -> None:
        frames = [
            {"filename": f.filename, "line": f.lineno, "name": f.name}
            for f in reversed(traceback.extract_stack())
        ]
        self.events.append({"action": "alloc", "addr": key, "size": nbytes, "frames": frames})

    def freed(self, key: int, nbytes: int) -> None:
        super().freed(key, nbytes)
        self.events.append({"action": "free_completed", "addr": key, "size": nbytes})

    def start(self) -> None:
        self.__enter__()

    def stop(self) -> Tuple[Optional[int], List[Dict[str, Any]]]:
        self.__exit__(None, None, None)
        return None, self.events

    @staticmethod
    def allocated_bytes() -> Optional[int]:
        return None


def measure(spec: str, args, run_dir: Path) -> Dict[str, Any]:
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    label, method, overrides = parse_method(spec)
    seed_everything(args.seed)
    cfg = trainer_config(
        method, args.data, run_dir, args.start + args.steps + 1, args.teachers, args.random_weights, overrides
    )
    if args.device == "cpu":
        cfg.machine.device_type = "cpu"
    # What earlier runs of this process still hold is subtracted from this run's numbers (and reported), as in
    # train_speed.py: a second method measured after the first would otherwise count its leftovers.
    resident = release_earlier_runs()
    trainer = build_trainer(cfg)
    recorder = CudaRecorder(args.max_entries) if args.device == "cuda" else HostRecorder()
    result: Dict[str, Any] = {
        "label": label, "method": method, "overrides": overrides, "held_by_earlier_runs_mib": round(resident / MIB, 1)
    }  # fmt: skip

    def mib(nbytes: Optional[int]) -> Optional[float]:
        return None if nbytes is None else round((nbytes - resident) / MIB, 1)

    def before(step: int) -> None:
        if step == args.start:
            model = trainer.pipeline.model
            result["allocated_at_start_mib"] = mib(recorder.allocated_bytes())
            result["persistent"] = persistent_inventory(
                model, trainer.optimizers.optimizers.values(), getattr(model, "strategy_state", None)
            )
            recorder.start()
        elif step == args.start + args.steps:
            peak, events = recorder.stop()
            result["peak_allocated_mib"] = mib(peak)
            result["transient"] = peak_breakdown(events)

    trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))
    trainer.train()
    if "transient" not in result:
        raise RuntimeError(f"training stopped before step {args.start + args.steps}: nothing was recorded")
    return result


def markdown(report: Dict[str, Any]) -> List[str]:
    lines = [
        "# What peak training memory holds",
        "",
        f"- data: `{report['data']}`; device: {report['device']}; torch {report['torch']}",
        f"- recorded over steps {report['start']}-{report['start'] + report['steps'] - 1}; teachers "
        f"{', '.join(report['teachers'])} (random weights: {report['random_weights']})",
        "- persistent: allocated when the recording began; transient: allocated inside the recorded steps and alive "
        "at their peak, by the first line of splatsem_ns, nerfstudio or gsplat on the allocation stack",
        "",
    ]
    for run in report["runs"]:
        if "error" in run:
            lines += [f"## {run['label']}", "", f"failed: {run['error']}", ""]
            continue
        persistent = run["persistent"]
        lines += [
            f"## {run['label']} ({persistent['gaussians']:,} Gaussians)",
            "",
            f"peak allocated {run['peak_allocated_mib']} MiB; allocated at the start {run['allocated_at_start_mib']}"
            f" MiB; allocated inside the steps and alive at the peak {run['transient']['transient_peak_mib']} MiB"
            f" (earlier runs' leftovers, {run.get('held_by_earlier_runs_mib', 0.0)} MiB, left out of all three). The"
            " steps also free tensors that existed at the start (e.g. optimizer states that densification replaces),"
            " so the last two do not add up to the first."
            if run["peak_allocated_mib"] is not None
            else f"transient peak {run['transient']['transient_peak_mib']} MiB (counted from the operators on the CPU, "
            "the PyTorch rasterizer's included: not gsplat's memory)",
            "",
            "| persistent, per Gaussian | bytes / Gaussian | MiB |",
            "|---|---|---|",
        ]
        for kind, per in persistent["per_gaussian_bytes"].items():
            lines.append(f"| {kind} | {per} | {persistent['per_gaussian_mib'][kind]} |")
        lines += [
            "",
            f"other persistent (MiB): {persistent['other_mib']}",
            "",
            "| transient at the peak | MiB |",
            "|---|---|",
        ]
        lines += [f"| `{site}` | {mib} |" for site, mib in run["transient"]["sites_mib"]]
        lines.append("")
    return lines


def main() -> None:
    parser = scene_run_parser(__doc__)
    parser.add_argument("--method", nargs="+", default=["splatfacto", "chorus-splat"])
    parser.add_argument("--start", type=int, default=1500, help="steps trained before the recording")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded")
    parser.add_argument("--max-entries", type=int, default=500_000, help="allocator events kept")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
        help="cpu: the same report from the operators' own allocations (slow; a check of the script, and of the CPU "
        "rasterizer's memory, not gsplat's)",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "benchmark": "memory_peak", "data": str(args.data), "device": device_name(), "torch": torch.__version__,
        "start": args.start, "steps": args.steps, "teachers": args.teachers, "random_weights": args.random_weights,
        "runs": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.method):
            try:
                report["runs"].append(measure(spec, args, Path(tmp) / str(i)))
            except Exception as err:  # noqa: BLE001 (the next method still runs; the report says what failed)
                report["runs"].append({"label": spec, "error": f"{type(err).__name__}: {err}"})
            (args.out / "memory_peak.json").write_text(json.dumps(report, indent=2) + "\n")
            write_markdown(args.out / "memory_peak.md", markdown(report))
            print("\n".join(markdown(report)), flush=True)


if __name__ == "__main__":
    main()
