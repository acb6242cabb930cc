"""Reruns as a user of PEFT and llama.cpp would expect (issue 17, friction): a rerun of a finished
single-adapter transfer keeps it and says so, as a batch rerun does; --restart and --no-resume say
what they throw away."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.crash import KILLED, build_pair, run_child, transfer_command
from lowmem_crosslora.io.partial import ADAPTER_NAME


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pair(tmp_path_factory.mktemp("rerun"))


def test_a_finished_transfer_rerun_is_kept(pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_child(transfer_command(pair, out, "--no-cache"))
    assert first.returncode == 0, first.stderr
    stamp = (out / ADAPTER_NAME).stat().st_mtime_ns
    again = run_child([a for a in transfer_command(pair, out, "--no-cache") if a != "--quiet"])
    assert again.returncode == 0, again.stderr
    assert "already holds this transfer; kept" in again.stderr
    assert (out / ADAPTER_NAME).stat().st_mtime_ns == stamp
    other = run_child(transfer_command(pair, out, "--no-cache", "--seed", "3"))  # another result: refused as before
    assert other.returncode == 2 and "not empty" in other.stderr


@pytest.mark.parametrize("flag", ["--restart", "--no-resume"])
def test_discarding_an_interrupted_run_is_said(pair: Path, tmp_path: Path, flag: str) -> None:
    out = tmp_path / "out"
    assert run_child(transfer_command(pair, out, "--no-cache"), kill="after_unit:2").returncode == KILLED
    p = run_child(transfer_command(pair, out, "--no-cache", flag))  # --quiet: warnings are still printed
    assert p.returncode == 0, p.stderr
    assert f"{flag} discards the interrupted transfer" in p.stderr and "(3 finished units)" in p.stderr


def test_base_model_is_the_absolute_target_path_and_a_self_transfer_is_flagged(pair: Path, tmp_path: Path) -> None:
    import json
    import os

    from bench.crash import command

    rel = os.path.relpath(pair / "target", tmp_path)
    out = tmp_path / "out"
    args = command("transfer", "--adapter", str(pair / "adapter"), "--source", str(pair / "source"), "--target", rel, "--out", str(out))
    p = run_child([*args, "--device", "cpu", "--rank", "8", "--no-cache", "--quiet"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(pair / "target")
    same = command("transfer", "--adapter", str(pair / "adapter"), "--source", str(pair / "source"), "--target", str(pair / "source"))
    p = run_child([*same, "--out", str(tmp_path / "self"), "--device", "cpu", "--rank", "8", "--no-cache", "--quiet"])
    assert p.returncode == 0 and "source and target are the same model" in p.stderr


def test_progress_in_a_log_is_lines_with_the_time_left(pair: Path, tmp_path: Path) -> None:
    """stderr that is not a terminal (a log, CI) gets a progress line now and then, not a bare label."""
    args = [a for a in transfer_command(pair, tmp_path / "out", "--no-cache") if a != "--quiet"]
    p = run_child(args)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("transfer: ")]
    assert lines[0].startswith("transfer: 0/") and lines[-1].split()[1].split("/")[0] == lines[-1].split()[1].split("/")[1]
    assert any("s left" in ln for ln in lines) and len(lines) <= 13
