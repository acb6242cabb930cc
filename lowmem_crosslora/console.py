"""What the command-line modules share: the path option type, option stacking, the progress bar and
warning lines (cli.py and demo.py)."""

from __future__ import annotations

import sys
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


def progress_printer(quiet: bool, label: str = "transfer") -> tuple[Callable[[int, int, str], None] | None, Callable[[], None]]:
    if quiet:
        return None, lambda: None
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


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)
