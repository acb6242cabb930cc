"""SIGINT / SIGTERM set a flag; long work stops at its next clean point."""

from __future__ import annotations

import signal
import threading
from typing import Any

from lowmem_crosslora.errors import Interrupted


class StopFlag:
    """SIGINT / SIGTERM set a flag; the engine stops at the next clean point.

    The engine looks at the flag before every base matrix it factors, after every row block of a
    blocked (out-of-core) SVD pass, and between units; a unit that is written is always journaled
    first. A second SIGINT raises KeyboardInterrupt at once (the state on disk is crash-safe, so
    that is safe too). Re-entrant: a nested `with` of the same flag keeps the outer handlers.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> StopFlag:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old.clear()

    def check(self) -> None:
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            raise Interrupted(f"stopped by {name}; finished units are kept")
