"""Progress of long steps that shows on a terminal and in redirected logs alike.

rich's progress bars draw only on a terminal: with ``ns-train ... > log`` or under a job scheduler they print
nothing, and a start-up step that takes minutes (on a shared CPU, the cross-view check slowed 8-10x) looks hung.
``ProgressLog`` draws the bar on a terminal and otherwise logs plain lines: one when the step starts, one at
most every ``every_seconds`` with the count done, the elapsed time and an estimate of what is left, and one when
it ends.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional, TypeVar

from nerfstudio.utils.rich_utils import CONSOLE
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")


class ProgressLog:
    """``with ProgressLog("Teacher features: sam", 43, "images") as progress: ... progress.advance(4)``."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str = "items",
        every_seconds: float = 10.0,
        console: Optional[Console] = None,
    ) -> None:
        """
        Args:
            description: Names the step, e.g. "Cross-view consistency: siglip2".
            total: Number of units of work.
            unit: What a unit is, for the log lines ("views", "images").
            every_seconds: Least time between two progress lines in a log.
            console: Where to write (nerfstudio's console by default).
        """
        self.description, self.total, self.unit = description, int(total), unit
        self.every_seconds = every_seconds
        self.console = console or CONSOLE
        self.done = 0
        self._bar: Optional[Progress] = None
        self._start = self._last = 0.0

    def __enter__(self) -> "ProgressLog":
        self._start = self._last = time.monotonic()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn(f"[bold]{escape(self.description)}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total)
        else:
            self._log(f"{self.total} {self.unit} to do")
        return self

    def advance(self, count: int = 1) -> None:
        """``count`` more units are done."""
        self.done += count
        if self._bar is not None:
            self._bar.advance(self._task, count)
            return
        now = time.monotonic()
        if now - self._last >= self.every_seconds and self.done < self.total:
            self._last = now
            elapsed = now - self._start
            line = f"{self.done}/{self.total} {self.unit}, {elapsed:.0f} s elapsed"
            # nothing done yet (a parallel pool still starting) gives no rate to extrapolate
            if self.done > 0:
                line += f", about {elapsed / self.done * (self.total - self.done):.0f} s left"
            self._log(line)

    def __exit__(self, kind, value, traceback) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, value, traceback)
        elif kind is None:
            self._log(f"{self.done} {self.unit} done in {time.monotonic() - self._start:.1f} s")

    def _log(self, text: str) -> None:
        self.console.log(escape(f"{self.description}: {text}"))


def logged_progress(
    items: Iterable[T], description: str, total: Optional[int] = None, unit: str = "items", **kwargs
) -> Iterator[T]:
    """Yield ``items`` inside a ``ProgressLog`` (one unit each); ``total`` defaults to ``len(items)``."""
    total = len(items) if total is None else total  # type: ignore[arg-type]
    with ProgressLog(description, total, unit, **kwargs) as progress:
        for item in items:
            yield item
            progress.advance()
