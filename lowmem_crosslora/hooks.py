"""Named points in long work where a test injects a fault (a SIGKILL, a delay).

Writers call `reached(point, index)` at the moments a crash test wants to stop them: a transfer's
unit half written (mid_write), written but not journaled (before_journal), journaled (after_unit),
its output renamed but not yet moved into place (finish), and a refine step checkpointed
(refine_step). Nothing happens unless a handler is installed, which only tests and benchmarks do
(bench/crash.py runs the CLI with one). Production code never reads the environment for this.
"""

from __future__ import annotations

from collections.abc import Callable

Handler = Callable[[str, int], None]
_handlers: list[Handler] = []


def reached(point: str, index: int) -> None:
    """Run the installed handlers at this point (a no-op when none is installed)."""
    for handler in _handlers:
        handler(point, index)


def install(handler: Handler) -> Callable[[], None]:
    """Install a handler; returns the function that removes it."""
    _handlers.append(handler)
    return lambda: _handlers.remove(handler)
