"""nerfstudio's Trainer, made safe to interrupt: nothing is lost on Ctrl-C, SIGTERM or a crash.

nerfstudio 1.1.5's ``ns-train`` catches ``KeyboardInterrupt``, prints its traceback and exits 0, having saved
nothing since the last ``steps_per_save``; a SIGTERM (a cluster's time limit, ``kill``) ends the process at
once. Its ``save_checkpoint`` writes the file in place, so a run killed while saving leaves a truncated newest
checkpoint, which ``--load-dir`` then picks and fails on. This trainer:

- on SIGINT or SIGTERM during training, finishes the current step (densification included, so the state is
  consistent), writes a checkpoint, prints where it is and the command that resumes from it, and exits with
  128 + the signal's number. A second Ctrl-C stops at once, without a checkpoint. Under DistributedDataParallel
  the ranks agree on the stop after every step (one tiny all-reduce), so all stop after the same step;
- also writes a checkpoint whenever ``save_every_minutes`` of wall-clock time passed since the last one, so a
  crash (out of memory, a lost node) costs minutes whatever the step rate;
- writes every checkpoint to a temporary file beside the checkpoint folder and renames it into place, so the
  folder only ever holds whole checkpoints;
- when set-up fails or is interrupted before training starts, removes the run folder if it holds nothing but
  the ``config.yml`` that ``ns-train`` wrote before set-up, and says so.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Type

import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.decorators import check_main_thread
from nerfstudio.utils.rich_utils import CONSOLE

from splatsem_ns.files import write_atomically

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop training with a checkpoint."""


@dataclass
class ChorusTrainerConfig(TrainerConfig):
    """nerfstudio's trainer settings, plus checkpoints on interruption and on a wall-clock schedule."""

    _target: Type = field(default_factory=lambda: ChorusTrainer)
    save_every_minutes: float = 5.0
    """Also write a checkpoint when this many minutes of training passed since the last one (whatever
    ``steps_per_save`` says), so a crash loses minutes rather than the run on a slow machine. 0: off."""


class StartupInterrupted(KeyboardInterrupt):
    """A stop signal during set-up, raised where the set-up was (nothing to save yet)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrainingInterrupted(Exception):
    """Raised after a training step when a stop signal arrived during it."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.step = step
        self.signum = signum


class ChorusTrainer(Trainer):
    """See the module docstring."""

    config: ChorusTrainerConfig

    def __init__(self, config: ChorusTrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, local_rank, world_size)
        self._stop_signal: Optional[int] = None
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ set-up
    def setup(self, test_mode="val") -> None:
        try:
            with _signals(_raise_startup_interrupted):
                super().setup(test_mode)
        except KeyboardInterrupt as err:
            removed = self._remove_config_only_run_folder()
            CONSOLE.print(
                "[bold yellow]Interrupted during start-up, before training began: there is no checkpoint to "
                "save. Teacher features extracted so far stay cached, and the next run resumes the extraction."
                + (f" Removed {removed}, which held only its config.yml." if removed else ""),
                soft_wrap=True,
            )
            raise SystemExit(128 + getattr(err, "signum", signal.SIGINT)) from None
        except Exception:
            removed = self._remove_config_only_run_folder()
            if removed:
                CONSOLE.print(
                    f"[bold red]Set-up failed: removed {removed}, which held only its config.yml.",
                    soft_wrap=True,
                )
            raise
        self.callbacks.append(
            TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self._after_iteration)
        )

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()
        self._rebind_gaussian_optimizers()

    def _rebind_gaussian_optimizers(self) -> None:
        """Point each per-Gaussian optimizer at the model's parameter of its name again, with the state it loaded.

        splatfacto's ``load_state_dict`` replaces every Gaussian parameter by a new tensor of the checkpoint's size,
        but nerfstudio built the optimizers around the old tensors before loading. Left so, a resumed run steps
        tensors the model no longer uses: its Gaussians stay where the checkpoint left them until densification
        happens to rebind an optimizer, and past the last densification step they never train again.
        """
        params = getattr(self.pipeline.model, "gauss_params", None)
        if params is None:  # a network (semantic-splat, chorus-pretrain): its weights are loaded in place
            return
        for name, param in params.items():
            optimizer = self.optimizers.optimizers.get(name)
            if optimizer is None or optimizer.param_groups[0]["params"][0] is param:
                continue
            group = optimizer.param_groups[0]
            stale = group["params"][0]
            group["params"] = [param]
            if stale in optimizer.state:
                optimizer.state[param] = optimizer.state.pop(stale)
            self.optimizers.parameters[name] = [param]  # what gradient clipping reads

    @check_main_thread
    def _remove_config_only_run_folder(self) -> Optional[Path]:
        """Delete the run folder (and the empty folders above it, up to the output folder) when it holds nothing
        but ``config.yml``: ``ns-train`` writes that before set-up, and a run that never started should not leave
        a folder that looks like one. Returns the folder removed, if any."""
        base = self.base_dir
        if not base.is_dir() or [p.name for p in base.iterdir()] != ["config.yml"]:
            return None
        (base / "config.yml").unlink()
        stop = Path(self.config.output_dir).resolve()
        for folder in (base, *base.parents):
            if not folder.resolve().is_relative_to(stop):
                break
            try:
                folder.rmdir()  # empty folders only
            except OSError:
                break
        return base

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        # ``max_num_iterations`` is the run's total: a resumed run stops where the uninterrupted one would have
        # (nerfstudio's loop would run that many more steps after the checkpoint).
        total = self.config.max_num_iterations
        if self._start_step >= total:
            CONSOLE.print(f"Nothing to train: the checkpoint is at step {self._start_step - 1} of {total}.")
            return
        self.config.max_num_iterations = total - self._start_step
        try:
            with _signals(self._on_stop_signal):
                super().train()
        except TrainingInterrupted as stop:
            self.save_checkpoint(stop.step)
            self._print_resume(stop, total)
            raise SystemExit(128 + stop.signum) from None
        except KeyboardInterrupt:
            if self.training_state == "completed":  # Ctrl-C in the viewer after training: a normal exit
                return
            latest = sorted(self.checkpoint_dir.glob("step-*.ckpt")) if self.checkpoint_dir.is_dir() else []
            CONSOLE.print(
                f"[bold red]Stopped at once during step {self.step}, without a checkpoint."
                + (f" The latest checkpoint is {latest[-1]}." if latest else " There is no checkpoint yet."),
                soft_wrap=True,
            )
            raise SystemExit(128 + signal.SIGINT) from None
        finally:
            self.config.max_num_iterations = total

    def _on_stop_signal(self, signum: int, frame) -> None:
        """First signal: stop after the current step with a checkpoint. Again, or after training: stop now."""
        if self._stop_signal is not None or self.training_state == "completed":
            raise KeyboardInterrupt
        self._stop_signal = signum
        # Printed from a signal handler: keep it to one plain write.
        CONSOLE.print(
            f"[bold yellow]{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(Ctrl-C again stops at once, without one)."
        )

    def _after_iteration(self, step: int) -> None:
        """After each step's callbacks (densification included): stop on a signal, or save on the clock."""
        signum = self._agreed_stop_signal()
        if signum is not None:
            raise TrainingInterrupted(step, signum)
        minutes = self.config.save_every_minutes
        if minutes > 0 and time.monotonic() - self._last_save >= 60.0 * minutes:
            self.save_checkpoint(step)

    def _agreed_stop_signal(self) -> Optional[int]:
        """This process's stop signal; under DistributedDataParallel the ranks agree first (the largest signal of
        any rank), so that all of them stop after the same step: a rank that ran one more step would wait forever
        for the others in its gradient all-reduce."""
        if self.world_size <= 1 or not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            return self._stop_signal
        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def _print_resume(self, stop: TrainingInterrupted, total: int) -> None:
        checkpoint = self.checkpoint_dir / f"step-{stop.step:09d}.ckpt"
        CONSOLE.print(
            f"[bold yellow]Training stopped by {signal.Signals(stop.signum).name} after step {stop.step}.[/]\n"
            f"Checkpoint: {checkpoint}\n"
            f"Resume from it (training continues to step {total}) with:\n"
            f"  {resume_command(self.checkpoint_dir)}",
            soft_wrap=True,  # a command that can be copied whole
            highlight=False,
        )

    # ------------------------------------------------------------------ checkpoints
    @check_main_thread
    def save_checkpoint(self, step: int) -> None:
        """nerfstudio's checkpoint (same content and name), written atomically: to a temporary file beside the
        checkpoint folder, renamed into place, and only then are older checkpoints deleted. The temporary lives
        outside the folder because ``--load-dir`` parses the step from every file name in it."""
        check_finite = getattr(self.pipeline.model, "check_finite", None)
        if check_finite is not None:  # never replace the last good checkpoint with NaNs
            check_finite()
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"step-{step:09d}.ckpt"
        pipeline = self.pipeline.module if hasattr(self.pipeline, "module") else self.pipeline
        state = {
            "step": step,
            "pipeline": pipeline.state_dict(),
            "optimizers": {k: v.state_dict() for (k, v) in self.optimizers.optimizers.items()},
            "schedulers": {k: v.state_dict() for (k, v) in self.optimizers.schedulers.items()},
            "scalers": self.grad_scaler.state_dict(),
        }
        write_atomically(path, lambda stream: torch.save(state, stream), folder=self.checkpoint_dir.parent)
        if self.config.save_only_latest_checkpoint:
            for old in self.checkpoint_dir.glob("*.ckpt"):
                if old != path:
                    old.unlink()
        self._last_save = time.monotonic()


def resume_command(checkpoint_dir: Path, argv: Optional[list] = None) -> str:
    """The ``ns-train`` command line that continues this run from ``checkpoint_dir``: the command that started
    it (any earlier ``--load-dir`` dropped) plus ``--load-dir``. ``argv`` defaults to ``sys.argv``."""
    argv = list(sys.argv if argv is None else argv)
    args: list = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--load-dir", "--load_dir"):
            skip = True
            continue
        if arg.startswith(("--load-dir=", "--load_dir=")):
            continue
        args.append(arg)
    program = Path(argv[0]).name if argv else "ns-train"
    # nerfstudio replaces the whole config (--load-dir included) with the file given to --load-config.
    if (
        program != "ns-train"
        or not args
        or any(a.startswith(("--load-config", "--load_config")) for a in args)
    ):
        return f"ns-train chorus-splat --data <same data> <same options> --load-dir {shlex.quote(str(checkpoint_dir))}"
    return shlex.join(["ns-train", *args, "--load-dir", str(checkpoint_dir)])


def _raise_startup_interrupted(signum: int, frame) -> None:
    raise StartupInterrupted(signum)


@contextmanager
def _signals(handler: Callable) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block (main thread only: Python's rule for handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
