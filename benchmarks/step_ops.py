"""How many aten operators one chorus-splat training step dispatches, and how many host-device synchronisations it
would make on CUDA, per region of the step: a count on the CPU, not a timing.

    python benchmarks/step_ops.py [--out DIR --label NAME] [--warmup 20] [--steps 20] [--method chorus-splat]
                                  [--set FIELD=VALUE ...]

A splatting step on a large GPU is bound by the host: each dispatched operator costs Python and dispatcher time and
(for most) a kernel launch, and each synchronisation stalls the host until the GPU drains its queue. Both can be
counted without a GPU, and the counts do not vary from run to run, so they compare two versions of the code exactly.
The script generates the tests' synthetic room (16 views of 64 x 48, depth, the labels proxy teachers), trains the
method with its defaults through the real trainer for ``--warmup`` steps, then counts ``--steps`` steps under a
``TorchDispatchMode``:

- ops: every aten operator dispatched while a region runs (inclusive: nested regions count in their parents).
  Backward's operators are also charged to the forward region whose autograd node ran them
  ("backward <- losses: distillation"), found from the nodes' sequence numbers.
- syncs: the operators and calls that make the host wait for a CUDA device: ``.item()``, ``bool``/``int``/``float``
  of a tensor (``_local_scalar_dense``), ``nonzero``, boolean-mask indexing, ``unique``, ``repeat_interleave``
  without an output size, ``torch.equal``, and Python-level ``.tolist()``, ``.cpu()``, ``.numpy()``. On the CPU
  every tensor is a host tensor, so a call on a tensor that stays on the host under CUDA as well (a camera's
  CPU copy, a numpy array) also counts here; the table of source lines says which ones they are.

On the CPU the rasterizer is the PyTorch reference path (hundreds of small operators) where CUDA runs a few gsplat
kernels, so its regions are listed apart and left out of the totals marked "without the rasterizer".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step_regions import WATCHED_PACKAGES, _short, trainer_regions, wrap_callbacks  # noqa: E402

RASTERIZER = "forward: rasterize_gaussians (both passes)"
"""The region whose operators stand for gsplat's kernels on CUDA (see the module docstring)."""
ITERATION = "iteration (data, forward, losses, backward, optimizers)"
STEP = "whole step (iteration, callbacks, logging)"
BACKWARD = "backward"

_aten = torch.ops.aten
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item / bool / int / float",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}
"""Operators that wait for the device's result on CUDA, by the name the report gives them."""
_INDEX_OPS = {
    _aten.index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
}
"""Indexing operators: they synchronise when an index is a boolean mask (CUDA runs ``nonzero`` on it)."""
_HOST_READS = ("tolist", "cpu", "numpy")
"""Tensor methods that copy a device tensor to the host (not dispatched on CPU tensors: counted in Python)."""
_NO_NODE = 2**64 - 1
"""The sequence number of autograd nodes without one (gradient accumulation)."""


class StepOpCounter(TorchDispatchMode):
    """Counts dispatched operators and would-be synchronisations by region while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.stack: List[str] = []
        self.ops: Counter = Counter()
        self.views: Counter = Counter()  # operators that only make a view: dispatched, but launch no kernel
        self.syncs: Counter = Counter()
        self.sync_lines: Counter = Counter()
        self.op_names: Dict[str, Counter] = defaultdict(Counter)
        # Forward regions as intervals of autograd sequence numbers, for charging backward's operators.
        self._intervals: List[Tuple[int, int, str]] = []
        self._open: List[Tuple[int, str]] = []

    # -- regions
    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        in_backward = BACKWARD in self.stack
        if self.active and not in_backward:
            self._open.append((self._mark(), name))
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()
            if self.active and not in_backward and self._open and self._open[-1][1] == name:
                start, _ = self._open.pop()
                self._intervals.append((start, self._mark(), name))

    def wrap(self, owner: Any, attribute: str, name: str) -> bool:
        function = getattr(owner, attribute, None)
        if function is None or not callable(function):
            return False
        counter = self

        def counted(*args, **kwargs):
            with counter.region(name):
                return function(*args, **kwargs)

        setattr(owner, attribute, counted)
        return True

    def _mark(self) -> int:
        """The autograd sequence number the next node will get, from a throw-away node that is not counted."""
        self.active = False
        try:
            with torch.enable_grad():
                leaf = torch.zeros((), requires_grad=True)
                return (leaf * 1).grad_fn._sequence_nr() + 1
        finally:
            self.active = True

    def new_step(self) -> None:
        self._intervals.clear()

    # -- counting
    def _charge(self, table: Counter, amount: int = 1) -> None:
        table[STEP] += amount
        for name in dict.fromkeys(self.stack):
            table[name] += amount
        if BACKWARD in self.stack:
            node = torch._C._current_autograd_node()
            table[f"{BACKWARD} <- {self._forward_region(node)}"] += amount

    def _forward_region(self, node) -> str:
        if node is None:
            return "(no autograd node)"
        number = node._sequence_nr()
        if number == _NO_NODE:
            return "(gradient accumulation)"
        best: Optional[Tuple[int, int, str]] = None
        for interval in self._intervals:  # the innermost region: the latest start that contains the node
            if interval[0] <= number < interval[1] and (best is None or interval[0] >= best[0]):
                best = interval
        return best[2] if best else "(outside the named regions)"

    def count_sync(self, kind: str) -> None:
        if not self.active:
            return
        self._charge(self.syncs)
        frames = [f for f in traceback.extract_stack()[:-2] if any(p in f.filename for p in WATCHED_PACKAGES)]
        frames = [f for f in frames if not f.filename.endswith("step_ops.py")]
        where = f"{_short(frames[-1].filename)}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        self.sync_lines[(where, kind)] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            self._charge(self.ops)
            if func.is_view:
                self._charge(self.views)
            if self.stack:
                self.op_names[self.stack[-1]][func.__name__] += 1
            kind = _SYNC_OPS.get(func)
            if kind is None and func in _INDEX_OPS:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                    kind = "boolean-mask indexing"
            if kind is not None:
                self.count_sync(kind)
        return func(*args, **kwargs)


@contextmanager
def host_reads_counted(counter: StepOpCounter) -> Iterator[None]:
    """Count Python calls of ``_HOST_READS`` while ``counter`` is active."""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counted(name, original):
        def read(self, *args, **kwargs):
            counter.count_sync(f".{name}()")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def extra_regions(trainer) -> List[Tuple[Any, str, str]]:
    """Regions inside the loss and metrics calls that ``trainer_regions`` does not name."""
    import nerfstudio.models.splatfacto as splatfacto

    model = trainer.pipeline.model
    # chorus-splat computes splatfacto's losses itself (without splatfacto's host copy); splatfacto in its own method.
    rgb_losses = (
        (model, "_splatfacto_loss_dict")
        if hasattr(model, "_splatfacto_loss_dict")
        else (splatfacto.SplatfactoModel, "get_loss_dict")
    )
    return [(*rgb_losses, "losses: splatfacto's RGB losses"), (model.psnr, "forward", "metrics: psnr")]


def build(method: str, root: Path, iterations: int, overrides: Optional[dict] = None):
    """The tests' synthetic room and a set-up trainer of ``method`` on it, on the CPU."""
    from common import build_trainer, seed_everything, trainer_config

    from splatsem_ns.data.synthetic import SyntheticSceneConfig, generate_synthetic_scene

    scene = generate_synthetic_scene(root / "scene", SyntheticSceneConfig(num_views=16, width=64, height=48))
    seed_everything(0)
    cfg = trainer_config(
        method, scene.parent, root / "out", iterations, ("labels", "labels-instance"), overrides=overrides
    )
    cfg.machine.device_type = "cpu"
    return build_trainer(cfg)


def count_steps(trainer, warmup: int, steps: int) -> StepOpCounter:
    """Train ``warmup`` steps, then count ``steps`` steps (callbacks and logging included)."""
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

    counter = StepOpCounter()
    for owner, attribute, name in trainer_regions(trainer) + extra_regions(trainer):
        if owner is not None:
            counter.wrap(owner, attribute, name)
    wrap_callbacks(
        counter, trainer.callbacks
    )  # a region per callback function, as the timing script names them

    def before(step: int) -> None:
        counter.new_step()
        counter.active = warmup <= step < warmup + steps

    trainer.callbacks.insert(0, TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))
    with counter, host_reads_counted(counter):
        trainer.train()
    counter.active = False
    return counter


def table(counter: StepOpCounter, steps: int) -> Dict[str, Dict[str, float]]:
    """``{region: {"ops": per step, "syncs": per step}}``, regions in a fixed order, plus the rasterizer-free total."""
    names = sorted(dict.fromkeys([*counter.ops, *counter.syncs]), key=_order)
    rows = {
        n: {
            "ops": counter.ops[n] / steps,
            "views": counter.views[n] / steps,
            "syncs": counter.syncs[n] / steps,
        }
        for n in names
    }
    raster = [RASTERIZER, f"{BACKWARD} <- {RASTERIZER}"]
    rows[f"{STEP} without the rasterizer"] = {
        key: rows.get(STEP, {}).get(key, 0.0) - sum(rows.get(r, {}).get(key, 0.0) for r in raster)
        for key in ("ops", "views", "syncs")
    }
    return rows


_ORDER = (
    "whole",
    "iteration",
    "data",
    "forward",
    "metrics",
    "losses",
    "backward",
    "optimizers",
    "densification",
)


def _order(name: str) -> Tuple[int, int]:
    """Regions in the step's order (a stable sort keeps the order they were met in), backward's charges after it."""
    first = next((i for i, prefix in enumerate(_ORDER) if name.startswith(prefix)), len(_ORDER))
    return first, 0 if name == BACKWARD else 1


def markdown(rows: Dict[str, Dict[str, float]], counter: StepOpCounter, steps: int, title: str) -> List[str]:
    lines = [
        f"# {title}",
        "",
        "An operator count on the CPU, not a GPU timing: aten operators dispatched and would-be host-device",
        f"synchronisations per training step, averaged over {steps} steps (benchmarks/step_ops.py).",
        "",
        "| region | ops / step | of which views | syncs / step |",
        "|---|---|---|---|",
        *(f"| {name} | {v['ops']:.1f} | {v['views']:.1f} | {v['syncs']:.2f} |" for name, v in rows.items()),
        "",
        "Would-be synchronisations by source line:",
        "",
        "| line | kind | per step |",
        "|---|---|---|",
        *(f"| `{line}` | {kind} | {n / steps:.2f} |" for (line, kind), n in counter.sync_lines.most_common()),
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", default="chorus-splat")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a model config field (as train_speed.py)",
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write LABEL.md and LABEL.json here")
    parser.add_argument("--label", default="step_ops")
    parser.add_argument(
        "--ops-of", action="append", default=[], help="also list the operators of this region"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        # One step more, whose start ends the counting (the run's final checkpoint is not part of a step).
        overrides = dict(item.split("=", 1) for item in args.set)
        trainer = build(args.method, Path(tmp), args.warmup + args.steps + 1, overrides)
        counter = count_steps(trainer, args.warmup, args.steps)
    rows = table(counter, args.steps)
    settings = f" ({', '.join(args.set)})" if args.set else ""
    lines = markdown(
        rows, counter, args.steps, f"{args.method}{settings}: operators and synchronisations per step (CPU)"
    )
    for region in args.ops_of:
        lines += ["", f"Operators of `{region}` (its own calls, not nested regions'):", ""]
        lines += [f"- {op}: {n / args.steps:.1f}" for op, n in counter.op_names[region].most_common()]
    print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.label}.md").write_text("\n".join(lines) + "\n")
        sync_lines = [
            {"line": line, "kind": kind, "per_step": n / args.steps}
            for (line, kind), n in counter.sync_lines.most_common()
        ]
        record = {"method": args.method, "settings": args.set, "device": "cpu", "warmup": args.warmup, "steps": args.steps,
                  "regions": rows, "sync_lines": sync_lines}  # fmt: skip
        (args.out / f"{args.label}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
