"""Benchmarks and their shared helpers (run from the repository root: python -m bench.NAME)."""

from __future__ import annotations

import os
from pathlib import Path

BENCH = Path(__file__).resolve().parent  # data/ and results/ live here
REPO = BENCH.parent


def repo_env(threads: int | None = None) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH, so that a child `python -m bench.NAME` or
    `python -m lowmem_crosslora` imports it from any folder; `threads` sets OMP / MKL threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env
