"""Run the CLI with a fault installed at a hook point (lowmem_crosslora/hooks.py): how the crash
tests and the resume sweep stop a run at a precise moment. The package itself never reads these
variables; only this runner does.

    LOWMEM_CROSSLORA_TEST_KILL=after_unit:3 python -m bench.crash transfer --adapter ... --out ...

LOWMEM_CROSSLORA_TEST_KILL='point:k' SIGKILLs the process when hook point `point` is reached for
unit (or step) k: mid_write (half of the unit's first tensor written), before_journal (data written
and fsynced, not journaled), after_unit (journaled), finish:0 (adapter renamed inside the state
folder, folder not yet moved into place), refine_step:k (refine's step k checkpointed).
LOWMEM_CROSSLORA_TEST_DELAY=seconds sleeps after every journaled unit, so that a test can send a
signal while the run is surely in its loop.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from lowmem_crosslora import hooks
from lowmem_crosslora.cli import main as cli_main

KILL_VAR = "LOWMEM_CROSSLORA_TEST_KILL"
DELAY_VAR = "LOWMEM_CROSSLORA_TEST_DELAY"


def fault_handler(kill: str | None, delay: float | None) -> hooks.Handler:
    """A hook handler that SIGKILLs this process at `kill` ('point:k') and sleeps `delay` s after each unit."""

    def handler(point: str, index: int) -> None:
        if kill and kill == f"{point}:{index}":
            os.kill(os.getpid(), signal.SIGKILL)
        if delay and point == "after_unit":
            time.sleep(delay)

    return handler


def main(argv: list[str] | None = None) -> None:
    delay = os.environ.get(DELAY_VAR)
    hooks.install(fault_handler(os.environ.get(KILL_VAR), float(delay) if delay else None))
    cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
