"""Concurrent runs: two transfers on one --out (the second is refused with one line naming the first's
process, the first finishes with a lone run's bytes), and two transfers of different adapters sharing
one basis cache at once (both byte-identical to lone runs). Subprocesses through bench/crash.py,
whose LOWMEM_CROSSLORA_TEST_DELAY pause after every journaled unit keeps the first run busy."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from bench import REPO
from bench.crash import SOURCE_SPEC, build_pair, child_env, journal_units, run_child, transfer_command
from lowmem_crosslora.io.partial import ADAPTER_NAME
from lowmem_crosslora.services.synthetic import write_adapter


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_pair(tmp_path_factory.mktemp("lock"))
    write_adapter(root / "adapter2", SOURCE_SPEC, rank=4, alpha=8, seed=3, base=str(root / "source"))
    return root


def command_for(pair: Path, out: Path, adapter: str, *extra: str) -> list[str]:
    """The transfer of PAIR/ADAPTER into OUT."""
    args = transfer_command(pair, out, *extra)
    args[args.index("--adapter") + 1] = str(pair / adapter)
    return args


def start(args: list[str], delay: float) -> subprocess.Popen[str]:
    return subprocess.Popen(args, env=child_env(delay=delay), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lone(pair: Path, out: Path, adapter: str = "adapter") -> bytes:
    p = run_child(command_for(pair, out, adapter, "--no-cache"))
    assert p.returncode == 0, p.stderr
    return (out / ADAPTER_NAME).read_bytes()


def wait_for_units(out: Path, proc: subprocess.Popen[str], n: int = 1, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while len(journal_units(out)) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def test_second_run_on_one_output_is_refused_and_the_first_finishes(pair: Path, tmp_path: Path) -> None:
    ref = lone(pair, tmp_path / "ref")
    out = tmp_path / "out"
    first = start(transfer_command(pair, out, "--no-cache"), delay=0.3)
    try:
        wait_for_units(out, first)
        second = run_child(transfer_command(pair, out, "--no-cache"))
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"process {first.pid}" in lines[0] and "Traceback" not in second.stderr
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / ADAPTER_NAME).read_bytes() == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no lock or state left beside them


def test_two_adapters_share_one_basis_cache_at_once(pair: Path, tmp_path: Path) -> None:
    refs = {name: lone(pair, tmp_path / f"ref-{name}", name) for name in ("adapter", "adapter2")}
    cache = tmp_path / "cache"
    runs = {name: start(command_for(pair, tmp_path / f"out-{name}", name, "--cache-dir", str(cache)), delay=0.05) for name in refs}
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert (tmp_path / f"out-{name}" / ADAPTER_NAME).read_bytes() == refs[name]
