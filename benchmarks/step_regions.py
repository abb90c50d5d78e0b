"""Where a training step's time goes: named regions of the step, timed on the host, and the lines that synchronise.

A Gaussian-splatting step launches hundreds of small kernels, so the host, not the GPU, usually sets its pace.
``StepRegions`` wraps named callables of a live trainer (the data loader, the forward pass, each loss, backward,
the optimizers, densification) with ``torch.profiler.record_function`` and a host-side clock. Host times are
inclusive (a region's time contains the regions called inside it) and taken without synchronising, so they show
what the Python side costs; the profiler's table beside them shows the GPU's share.

``sync_locations`` runs a few steps under ``torch.cuda.set_sync_debug_mode("warn")`` and counts, per source line
of this project, nerfstudio or gsplat, the operations that made the host wait for the GPU.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

WATCHED_PACKAGES = ("splatsem_ns", "nerfstudio", "gsplat", "benchmarks")
"""Source trees whose lines ``sync_locations`` names (the innermost frame in one of them)."""


class StepRegions:
    """Named regions of a training step, each timed on the host while ``recording``."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self.recording = False
        self.order: List[str] = []

    def wrap(self, owner: Any, attribute: str, name: str) -> bool:
        """Replace ``owner.attribute`` (a method, function or module attribute) by a timed copy; False if absent."""
        function = getattr(owner, attribute, None)
        if function is None or not callable(function):
            return False

        def timed(*args, **kwargs):
            with torch.profiler.record_function(f"region: {name}"):
                if not self.recording:
                    return function(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - start
                    self.calls[name] += 1

        setattr(owner, attribute, timed)
        if name not in self.order:
            self.order.append(name)
        return True

    def wrap_all(self, targets: Sequence[Tuple[Any, str, str]]) -> List[str]:
        """``wrap`` each (owner, attribute, name); returns the names that were found."""
        return [
            name
            for owner, attribute, name in targets
            if owner is not None and self.wrap(owner, attribute, name)
        ]

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def markdown(self, steps: int, wall_ms_per_step: float) -> List[str]:
        """A table of host milliseconds per step for each region, against the step's wall time."""
        lines = [
            f"Host time per step by region (inclusive: nested regions count in their parents), over {steps} steps; "
            f"wall time {wall_ms_per_step:.2f} ms/step.",
            "",
            "| region | calls / step | host ms / step | share of wall |",
            "|---|---|---|---|",
        ]
        for name in self.order:
            if name in self.calls:
                ms = 1000 * self.seconds[name] / steps
                lines.append(
                    f"| {name} | {self.calls[name] / steps:.2f} | {ms:.3f} | {ms / wall_ms_per_step:.0%} |"
                )
        return lines


def trainer_regions(trainer) -> List[Tuple[Any, str, str]]:
    """The regions of a nerfstudio trainer's step worth naming (those a method lacks are skipped)."""
    import nerfstudio.models.splatfacto as splatfacto

    pipeline = trainer.pipeline
    model = pipeline.model
    targets: List[Tuple[Any, str, str]] = [
        (trainer, "train_iteration", "iteration (data, forward, losses, backward, optimizers)"),
        (pipeline.datamanager, "next_train", "data: next_train"),
        (model, "get_outputs", "forward: get_outputs"),
        (splatfacto, "rasterization", "forward: gsplat rasterization (splatfacto)"),
        (model, "get_metrics_dict", "metrics: get_metrics_dict"),
        (model, "get_loss_dict", "losses: get_loss_dict"),
        (torch.autograd, "backward", "backward"),
        (trainer.optimizers, "zero_grad_some", "optimizers: zero_grad"),
        (trainer.optimizers, "optimizer_scaler_step_some", "optimizers: step"),
        (trainer.optimizers, "scheduler_step_all", "optimizers: schedulers"),
        (getattr(model, "strategy", None), "step_pre_backward", "densification: pre-backward"),
        (getattr(model, "strategy", None), "step_post_backward", "densification: post-backward"),
    ]
    try:
        import splatsem_ns.models.chorus_splat as chorus

        targets += [
            (chorus, "rasterize_gaussians", "forward: rasterize_gaussians (both passes)"),
            (model, "_render_semantic_latent", "forward: semantic pass"),
            (getattr(model, "semantic_source", None), "forward", "forward: semantic source"),
            (chorus, "depth_l1_loss", "losses: depth"),
            (model, "_voxel_prior_loss", "losses: voxel prior"),
            (model, "_distillation_loss_dict", "losses: distillation"),
            (getattr(model, "finite_watch", None), "record", "losses: finite watch"),
        ]
    except ImportError:
        pass
    return targets


def wrap_callbacks(regions: Any, callbacks: Sequence[Any]) -> None:
    """Time the trainer's callbacks (densification, schedules, checks) as one region per callback function;
    ``regions``: a ``StepRegions``, or anything else with its ``wrap(owner, attribute, name)`` (``step_ops.py``'s
    counter)."""
    for callback in callbacks:
        name = getattr(callback.func, "__qualname__", type(callback.func).__name__)
        regions.wrap(callback, "func", f"callback: {name}")


SYNC_WARNING = "called a synchronizing"
"""What the warning of ``torch.cuda.set_sync_debug_mode("warn")`` says for each sync (its other notices do not)."""


@contextmanager
def watched_syncs(on_sync: Callable[[List[traceback.FrameSummary], str], None]) -> Iterator[None]:
    """Call ``on_sync`` at each host-device synchronisation PyTorch sees meanwhile
    (``torch.cuda.set_sync_debug_mode``) with the watched packages' frames of the Python stack (outermost first) and
    the warning's own ``file:line`` (where the stack has none of them). Syncs inside C++ extensions (gsplat's
    intersection count) do not reach Python's warnings and are not seen. Does nothing without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    original_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 (warnings' signature)
        if SYNC_WARNING in str(message):
            frames = [
                f for f in traceback.extract_stack()[:-1] if any(p in f.filename for p in WATCHED_PACKAGES)
            ]
            on_sync(frames, f"{filename}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = original_show


def frame_name(frame: traceback.FrameSummary) -> str:
    """``package/path.py:line function`` of a stack frame."""
    return f"{_short(frame.filename)}:{frame.lineno} {frame.name}"


@contextmanager
def sync_locations(counter: Counter) -> Iterator[None]:
    """Count each host-device synchronisation by the innermost watched source line that caused it."""

    def count(frames: List[traceback.FrameSummary], origin: str) -> None:
        counter[frame_name(frames[-1]) if frames else origin] += 1

    with watched_syncs(count):
        yield


def sync_markdown(counter: Counter, steps: int) -> List[str]:
    lines = [
        f"Host-device synchronisations per step, by the source line that caused them (over {steps} steps):",
        "",
        "| line | per step |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v / steps:.2f} |" for k, v in counter.most_common(25)]
    return lines


def _short(path: str) -> str:
    for package in WATCHED_PACKAGES:
        index = path.rfind(f"/{package}/")
        if index >= 0:
            return path[index + 1 :]
    return path


def network_regions(trainer) -> List[Tuple[Any, str, str]]:
    """The regions of a feed-forward trainer's step (semantic-splat, chorus-pretrain)."""
    pipeline = trainer.pipeline
    model = pipeline.model
    network = getattr(model, "network", None)
    return [
        (trainer, "train_iteration", "iteration (data, forward, losses, backward, optimizers)"),
        (pipeline.datamanager, "next_train", "data: next_train"),
        (model, "get_outputs", "forward: get_outputs"),
        (model, "predict", "forward: network"),
        *[
            (getattr(network, part, None), "forward", f"forward: network {part}")
            for part in ("backbone", "depth_predictor", "gaussian_head", "semantic_branch", "encoder")
        ],
        (model, "render", "forward: render"),
        (model, "get_metrics_dict", "metrics: get_metrics_dict"),
        (model, "get_loss_dict", "losses: get_loss_dict"),
        (getattr(model, "lpips", None), "forward", "losses: lpips"),
        (torch.autograd, "backward", "backward"),
        (trainer.optimizers, "zero_grad_some", "optimizers: zero_grad"),
        (trainer.optimizers, "optimizer_scaler_step_some", "optimizers: step"),
        (trainer.optimizers, "scheduler_step_all", "optimizers: schedulers"),
    ]


class ProfileWindows:
    """Training callbacks over three consecutive windows of steps: ``steps`` steps from ``start - steps`` timed per
    region (no profiler), ``steps`` steps from ``start`` under torch.profiler, then ``sync_steps`` steps counting
    the synchronisations. ``on_done(self)`` runs after the last window."""

    def __init__(
        self,
        trainer,
        start: int,
        steps: int,
        sync_steps: int,
        regions: StepRegions,
        on_done: Optional[Callable[["ProfileWindows"], None]] = None,
    ) -> None:
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.regions = regions
        self.steps, self.sync_steps = steps, sync_steps
        self.marks: List[float] = []
        self.syncs: Counter = Counter()
        self.done = False
        self._sync_context = None
        timed, profiled, synced = start - steps, start, start + steps

        def before(step: int) -> None:
            if step in (timed, profiled):
                # The steps before the profiled window are timed without the profiler's own overhead.
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())
                regions.recording = step == timed
            if step == profiled:
                self.prof.start()
            elif step == synced:
                self.prof.stop()
                self._sync_context = sync_locations(self.syncs)
                self._sync_context.__enter__()
            elif step == synced + sync_steps and self._sync_context is not None:
                self._sync_context.__exit__(None, None, None)
                self._sync_context = None
                self.done = True
                if on_done is not None:
                    on_done(self)

        trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], before))

    def report(self, title: str) -> str:
        """The regions table, the sync lines and the profiler's operator tables, as text."""
        wall_ms = 1000 * (self.marks[1] - self.marks[0]) / self.steps
        sort_gpu = "self_cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        averages = self.prof.key_averages()
        return (
            "\n".join(
                [
                    title,
                    "",
                    *self.regions.markdown(self.steps, wall_ms),
                    "",
                    *sync_markdown(self.syncs, self.sync_steps),
                    "",
                    "## Operators by GPU time (profiled window)",
                    "",
                    averages.table(sort_by=sort_gpu, row_limit=45),
                    "",
                    "## Operators and regions by host time (profiled window)",
                    "",
                    averages.table(sort_by="cpu_time_total", row_limit=60),
                ]
            )
            + "\n"
        )
