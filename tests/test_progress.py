"""Progress of long steps survives redirection: plain log lines where no terminal draws a bar."""

from __future__ import annotations

import io

from rich.console import Console

from splatsem_ns.progress import ProgressLog, logged_progress


def _log_console() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, force_terminal=False, width=200), text


def test_redirected_progress_logs_start_periodic_lines_and_end():
    console, text = _log_console()
    with ProgressLog("Cross-view consistency: labels", 4, "views", every_seconds=0.0, console=console) as p:
        for _ in range(4):
            p.advance()
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    assert "Cross-view consistency: labels: 4 views to do" in lines[0]
    assert any("1/4 views" in line and "s elapsed, about" in line for line in lines)
    assert "Cross-view consistency: labels: 4 views done in" in lines[-1]
    assert len(lines) == 5  # start, after 1, 2 and 3, end


def test_no_time_left_is_guessed_before_anything_is_done():
    # A pool of workers reports nothing for its first seconds; a guess from zero items done read "55391 s left".
    console, text = _log_console()
    with ProgressLog("Teacher features", 10, "images", every_seconds=0.0, console=console) as p:
        p.advance(0)
        p.advance(5)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    assert "0/10 images" in lines[1] and "s elapsed" in lines[1] and "left" not in lines[1]
    assert "5/10 images" in lines[2] and "s left" in lines[2]


def test_periodic_lines_are_rate_limited_and_items_pass_through():
    console, text = _log_console()
    items = list(logged_progress(range(50), "Teacher features: sam", unit="images", console=console))
    assert items == list(range(50))
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2, lines  # start and end: 50 quick items are not 50 lines


def test_a_terminal_gets_a_bar_instead_of_lines():
    text = io.StringIO()
    console = Console(file=text, force_terminal=True, width=100)
    assert list(logged_progress(range(3), "Step", console=console)) == [0, 1, 2]
    assert "3 items to do" not in text.getvalue()
