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

The rest of this module is the parent's side, shared by the crash tests (tests/test_resume.py and
others) and the sweep (python -m bench.resume_sweep): the small synthetic pair they kill runs on, the
command line and environment of a killed run, a run killed at a time, and the journal a kill left.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import REPO, repo_env
from lowmem_crosslora import hooks
from lowmem_crosslora.cli import main as cli_main
from lowmem_crosslora.io.partial import JOURNAL_NAME
from lowmem_crosslora.io.runstate import state_dir_for
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model

KILL_VAR = "LOWMEM_CROSSLORA_TEST_KILL"
DELAY_VAR = "LOWMEM_CROSSLORA_TEST_DELAY"
KILLED = -signal.SIGKILL  # the exit status of a run the fault killed


def fault_handler(kill: str | None, delay: float | None) -> hooks.Handler:
    """A hook handler that SIGKILLs this process at `kill` ('point:k') and sleeps `delay` s after each unit."""

    def handler(point: str, index: int) -> None:
        if kill and kill == f"{point}:{index}":
            os.kill(os.getpid(), signal.SIGKILL)
        if delay and point == "after_unit":
            time.sleep(delay)

    return handler


def install_from_env() -> None:
    """Install the fault the environment names (KILL_VAR, DELAY_VAR) in this process: the runner's
    main does it for the CLI, and a Ray worker does it as its `worker_process_setup_hook` (the
    migrate tests slow their jobs down this way, so that a worker can be killed mid-job)."""
    delay = os.environ.get(DELAY_VAR)
    hooks.install(fault_handler(os.environ.get(KILL_VAR), float(delay) if delay else None))


# ---- the parent's side ---------------------------------------------------------------------------

# The small synthetic pair: 4 layers x 7 modules = 28 units.
SOURCE_SPEC = ModelSpec("llama", 64, 176, 4, 2, 1, 32, vocab=64)
TARGET_SPEC = ModelSpec("qwen2", 96, 256, 4, 3, 1, 32, vocab=64)


def build_pair(root: Path) -> Path:
    """ROOT/source, ROOT/target (float32, decaying spectra) and ROOT/adapter (rank 8 on the source)."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root / "source", SOURCE_SPEC, dtype="float32", seed=0, spectrum="decaying")
    write_model(root / "target", TARGET_SPEC, dtype="float32", seed=1, spectrum="decaying")
    write_adapter(root / "adapter", SOURCE_SPEC, rank=8, alpha=16, seed=2, base=str(root / "source"))
    return root


def command(*args: str) -> list[str]:
    """`python -m bench.crash ARGS`: the CLI with the fault the environment names installed."""
    return [sys.executable, "-m", "bench.crash", *args]


def transfer_command(root: Path, out: Path, *extra: str, rank: int = 16) -> list[str]:
    """A quiet CPU transfer of the pair under ROOT (see build_pair) into OUT, through this runner."""
    return command(
        "transfer", "--adapter", str(root / "adapter"), "--source", str(root / "source"), "--target", str(root / "target"),
        "--out", str(out), "--device", "cpu", "--rank", str(rank), "--quiet", *extra,
    )  # fmt: skip


def child_env(kill: str | None = None, delay: float | None = None, threads: int | None = 1) -> dict[str, str]:
    """The environment of a run: this checkout importable, the fault `kill` ('point:k') and the pause
    `delay` set (or cleared), and one OpenMP thread by default. Runs go side by side and torch's
    spinning OpenMP workers make each crawl on a busy machine; the bytes are compared between runs
    with the same setting."""
    env = repo_env(threads)
    env.pop(KILL_VAR, None)
    env.pop(DELAY_VAR, None)
    if kill:
        env[KILL_VAR] = kill
    if delay:
        env[DELAY_VAR] = str(delay)
    return env


def run_child(
    args: list[str], *, kill: str | None = None, preexec_fn: Callable[[], None] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ARGS from the repository root (or `cwd`) in child_env(kill); capture its output as text."""
    return subprocess.run(args, env=child_env(kill), capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn, cwd=cwd or REPO)


def journal_check(record: dict[str, Any]) -> str:
    """The check a journal line carries: the first 16 hex digits of the SHA-256 of the rest of the
    record as compact JSON with sorted keys (the on-disk format, read independently of the package)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def journal_units(out: Path) -> list[dict[str, Any]]:
    """Unit records of OUT's state folder journal whose line check holds (what a resume may reuse)."""
    path = state_dir_for(out) / JOURNAL_NAME
    if not path.exists():
        return []
    units = []
    for line in path.read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "unit":
            check = rec.pop("check", None)
            if journal_check(rec) == check:
                units.append(rec)
    return units


def watch_run(
    args: list[str], out: Path, *, kill_after: float | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, float, str]:
    """Start a run into OUT; once its journal exists, wait `kill_after` seconds and SIGKILL it (None: let it end).

    Returns the exit status, the seconds from the journal's appearance to its removal (the run has
    then written every unit and moved the output into place; only the interpreter's exit is left),
    and the run's stderr."""
    journal = state_dir_for(out) / JOURNAL_NAME
    p = subprocess.Popen(args, env=env or child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while not journal.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        t0 = time.monotonic()
        if kill_after is not None and p.poll() is None:
            time.sleep(kill_after)
            p.send_signal(signal.SIGKILL)
        while kill_after is None and journal.exists() and p.poll() is None:
            time.sleep(0.0005)
        window = time.monotonic() - t0
        _, err = p.communicate(timeout=timeout)
        return p.returncode, window, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---- the runner ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    install_from_env()
    cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
