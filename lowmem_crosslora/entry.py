"""The console entry point (`lowmem-crosslora`, `python -m lowmem_crosslora`): a Ctrl-C while Python
is still importing torch and the package ends with one line and exit 130, as one during the work
does, instead of an import traceback or an abort. The command line itself is cli.py."""

from __future__ import annotations

import importlib
import signal
import sys

from lowmem_crosslora.sysmem import tune_allocator


def main() -> None:
    # The allocator is tuned before anything is allocated, so every command's baseline (what
    # --max-memory counts before any work) is measured alike: see services/memory.py.
    tune_allocator()
    # While torch imports, SIGINT only sets a flag: raised inside torch's C++ start-up, a
    # KeyboardInterrupt aborts the process (pybind11 cannot carry it), and elsewhere it is a traceback.
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        cli = importlib.import_module("lowmem_crosslora.cli")  # the heavy imports (torch) happen here
    finally:
        signal.signal(signal.SIGINT, old)
    if caught:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    cli.main()
