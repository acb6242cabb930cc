"""What the command-line modules share: the path option type, option stacking, the progress bar and
warning lines (cli.py and demo.py)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class NonEmptyPath(click.Path):
    """A path option that refuses the empty string (which would otherwise mean the working directory)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path names no file or folder", param, ctx)
        return super().convert(value, param, ctx)


PATH = NonEmptyPath(path_type=Path)


def stack(*decorators: Decorator) -> Decorator:
    """One decorator applying `decorators` so that their options list in the order given."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f

    return decorate


# In a log (stderr not a terminal) progress is a line now and then instead of a redrawn bar.
LOG_EVERY_SECONDS = 30.0
LOG_EVERY_FRACTION = 0.1


def progress_printer(quiet: bool, label: str = "transfer") -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    """A progress callback (done, total, item) and its closer: a bar on a terminal, lines in a log."""
    if quiet:
        return None, lambda: None
    if not sys.stderr.isatty():
        return _log_lines(label), lambda: None
    state: dict[str, Any] = {"bar": None, "last": 0}

    def progress(done: int, total: int, uid: str) -> None:
        if state["bar"] is None:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True, item_show_func=lambda x: x)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.current_item = uid or None
        bar.update(done - state["last"])
        state["last"] = done

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].__exit__(None, None, None)
            state["bar"] = None

    return progress, close


def _log_lines(label: str) -> Callable[[int, int, str], None]:
    """Progress for a log: a line at the start, every tenth of the work or half a minute, and at the
    end, with the time spent and an estimate of the time left."""
    state = {"t0": time.monotonic(), "first": -1, "last_t": 0.0, "last_done": -1}

    def progress(done: int, total: int, uid: str) -> None:
        now = time.monotonic()
        if state["first"] < 0:
            state["first"], state["t0"] = done, now  # units resumed from an interrupted run cost nothing now
        step = max(1, math.ceil(total * LOG_EVERY_FRACTION))
        due = done == total or done - state["last_done"] >= step or now - state["last_t"] >= LOG_EVERY_SECONDS
        if not due or done == state["last_done"]:
            return
        spent, fresh = now - state["t0"], done - state["first"]
        left = f", about {spent / fresh * (total - done):.0f} s left" if 0 < fresh and done < total else ""
        click.echo(f"{label}: {done}/{total} units, {spent:.0f} s{left}", err=True)
        state["last_t"], state["last_done"] = now, done

    return progress


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)
