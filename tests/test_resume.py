"""Resumable, crash-safe transfers (issue 4), end to end through the command line.

Every run is `python -m lowmem_crosslora transfer ...` in a subprocess on small synthetic models
(4 layers x 7 modules = 28 units). A run is killed with SIGKILL at precise points through the
test-only hook LOWMEM_CROSSLORA_TEST_KILL='point:k' (mid_write, before_journal, after_unit,
finish) and at random times, then resumed with the same command: the adapter file must be
byte-identical to an uninterrupted run, and the report's resumed_units must account for every unit
the killed run had journaled (so at most the unit in flight is redone). The state folder is also
damaged on purpose (journal lines, the partial file), inputs are changed between runs, writes fail
(a full tmpfs, RLIMIT_FSIZE, a read-only mount) and SIGTERM / SIGINT arrive while the run works.

Each run costs a fresh interpreter (torch's import is most of it), so the default selection keeps a
subset of the sweep (every kill point at least once, first and last unit, one random kill); the
tests marked slow add more points and run only when asked for (`pytest -m slow`, or
LOWMEM_CROSSLORA_SLOW=1). `python -m bench.resume_sweep` runs the full sweep and records the figures.
The runs' helpers (the pair, the command, its environment, timed kills, the journal) are bench/crash.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import REPO
from bench.crash import KILLED, SOURCE_SPEC, build_pair, child_env, journal_check, journal_units, run_child, transfer_command, watch_run
from lowmem_crosslora.io.partial import ADAPTER_NAME, JOURNAL_NAME, PARTIAL_NAME, REPORT_NAME
from lowmem_crosslora.io.runstate import state_dir_for
from lowmem_crosslora.services.synthetic import write_adapter

RANK = 16


# ---- helpers ---------------------------------------------------------------------------------


def assert_nothing_final(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"an interrupted run left files under {out}"


def assert_clean_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode not in (0, None) and p.returncode > 0, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def resumed_units(out: Path) -> int:
    return json.loads((out / REPORT_NAME).read_text())["summary"]["resumed_units"]


def partial_layout(out: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """(data start, tensor name -> absolute byte span) of the partial file's safetensors header."""
    raw = (state_dir_for(out) / PARTIAL_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n
    return start, {k: (start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"}


@dataclass
class Models:
    root: Path
    ref_bytes: bytes
    units: int
    loop_seconds: float  # an uninterrupted run: from the journal's appearance to its removal at the end

    def args(self, out: Path, *extra: str, rank: int = RANK) -> list[str]:
        return transfer_command(self.root, out, *extra, rank=rank)


@dataclass
class KillResult:
    journaled: int  # valid unit lines in the journal after the kill
    resumed: int  # the resumed run's report: units reused
    finished_early: bool = False  # a random kill that came after the run had ended


def resume_and_check(models: Models, out: Path) -> int:
    r = run_child(models.args(out))
    assert r.returncode == 0, r.stderr
    assert (out / ADAPTER_NAME).read_bytes() == models.ref_bytes, "resumed adapter differs from the uninterrupted run"
    assert not state_dir_for(out).exists()
    return resumed_units(out)


def kill_at(models: Models, out: Path, point: str, k: int) -> KillResult:
    p = run_child(models.args(out), kill=f"{point}:{k}")
    assert p.returncode == KILLED, (p.returncode, p.stderr)
    assert_nothing_final(out)
    journaled = len(journal_units(out))
    return KillResult(journaled, resume_and_check(models, out))


def kill_randomly(models: Models, out: Path, rng: random.Random) -> KillResult:
    rc, _, _ = watch_run(models.args(out), out, kill_after=rng.uniform(0, models.loop_seconds))
    if rc == 0 or (rc == KILLED and out.exists() and not state_dir_for(out).exists()):
        # the kill came too late: the run had finished (a kill between the final rename and the
        # exit leaves the complete output, never a partial one)
        assert (out / ADAPTER_NAME).read_bytes() == models.ref_bytes
        return KillResult(models.units, 0, finished_early=True)
    assert rc == KILLED
    assert_nothing_final(out)
    journaled = len(journal_units(out))
    return KillResult(journaled, resume_and_check(models, out))


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("slow") is None:
        return
    # selected by a -m expression that names slow (which "not slow" would have deselected): run
    expr = request.config.getoption("markexpr", "") or ""
    if os.environ.get("LOWMEM_CROSSLORA_SLOW") != "1" and "slow" not in expr:
        pytest.skip("slow kill/resume sweep: run with -m slow or LOWMEM_CROSSLORA_SLOW=1")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = build_pair(tmp_path_factory.mktemp("resume-models"))
    out = root / "reference"
    rc, loop, _ = watch_run(transfer_command(root, out), out)
    assert rc == 0
    units = json.loads((out / REPORT_NAME).read_text())["summary"]["units"]
    assert 20 <= units <= 40
    return Models(root, (out / ADAPTER_NAME).read_bytes(), units, loop)


@pytest.fixture(scope="module")
def half_state(models: Models, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The state folder of a run killed right after unit H = units // 2 was journaled (H + 1 done)."""
    out = tmp_path_factory.mktemp("half") / "out"
    h = models.units // 2
    p = run_child(models.args(out), kill=f"after_unit:{h}")
    assert p.returncode == KILLED, p.stderr
    assert len(journal_units(out)) == h + 1
    return out, h + 1


def copy_state(half: tuple[Path, int], out: Path) -> int:
    shutil.copytree(state_dir_for(half[0]), state_dir_for(out))
    return half[1]


# ---- SIGKILL at precise points, and at random times --------------------------------------------


def _points(ks_of: list[str]) -> list[tuple[str, str]]:
    return [(point, k) for k in ks_of for point in ("mid_write", "before_journal", "after_unit")]


# default: each point once, first, middle and last unit (test_repeated_kills_then_resume adds three
# more); slow: the rest of first / last, and a quarter and three quarters in
DEFAULT_POINTS = [("mid_write", "first"), ("before_journal", "middle"), ("after_unit", "last")]
SLOW_POINTS = [pk for pk in _points(["first", "quarter", "three_quarters", "last"]) if pk not in DEFAULT_POINTS]


def unit_index(models: Models, which: str) -> int:
    n = models.units
    return {"first": 0, "second": 1, "quarter": n // 4, "middle": n // 2, "three_quarters": 3 * n // 4, "second_last": n - 2, "last": n - 1}[which]


def check_precise_kill(models: Models, tmp_path: Path, point: str, which: str) -> None:
    k = unit_index(models, which)
    res = kill_at(models, tmp_path / "out", point, k)
    # after_unit:k -> units 0..k journaled; mid_write / before_journal:k -> unit k was in flight
    expected = k + 1 if point == "after_unit" else k
    assert res.journaled == expected
    assert res.resumed == res.journaled  # nothing journaled is lost: only the unit in flight is redone


@pytest.mark.parametrize(("point", "which"), DEFAULT_POINTS)
def test_sigkill_at_precise_point_resumes_byte_identical(models: Models, tmp_path: Path, point: str, which: str) -> None:
    check_precise_kill(models, tmp_path, point, which)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "which"), SLOW_POINTS)
def test_sigkill_sweep_more_points(models: Models, tmp_path: Path, point: str, which: str) -> None:
    check_precise_kill(models, tmp_path, point, which)


def test_sigkill_while_finishing_resumes(models: Models, tmp_path: Path) -> None:
    """Killed after the adapter was renamed inside the state folder, before the folder moved into place."""
    out = tmp_path / "out"
    res = kill_at(models, out, "finish", 0)
    assert res.resumed == models.units


@pytest.mark.parametrize("seed", [1])
def test_sigkill_at_random_time(models: Models, tmp_path: Path, seed: int) -> None:
    res = kill_randomly(models, tmp_path / "out", random.Random(seed))
    if not res.finished_early:
        assert res.resumed == res.journaled


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2, 3])
def test_sigkill_at_random_time_more(models: Models, tmp_path: Path, seed: int) -> None:
    test_sigkill_at_random_time(models, tmp_path, seed)


def test_repeated_kills_then_resume(models: Models, tmp_path: Path) -> None:
    """Kill, resume and kill again several times: the journal keeps growing, nothing is lost."""
    out = tmp_path / "out"
    n = models.units
    for point, k in (("before_journal", 2), ("mid_write", n // 3), ("after_unit", 2 * n // 3)):
        p = run_child(models.args(out), kill=f"{point}:{k}")
        assert p.returncode == KILLED, p.stderr
        assert_nothing_final(out)
    assert len(journal_units(out)) == 2 * n // 3 + 1
    assert resume_and_check(models, out) == 2 * n // 3 + 1


# ---- a damaged state folder ---------------------------------------------------------------------


def _tamper(lines: list[bytes], i: int, how: str, units: list[dict]) -> None:
    line = lines[i]
    if how == "sha_digit":  # one hex digit of the unit's checksum; the line check no longer holds
        rec = json.loads(line)
        sha = rec["sha256"]
        rec["sha256"] = ("0" if sha[0] != "0" else "1") + sha[1:]
        lines[i] = json.dumps(rec, sort_keys=True).encode()
    elif how == "line_byte":  # one byte in the middle of the line
        b = bytearray(line)
        b[len(b) // 2] ^= 0x01
        lines[i] = bytes(b)
    elif how == "recomputed_check":  # a wrong checksum with a valid line check: the bytes on disk decide
        rec = json.loads(line)
        rec.pop("check")
        rec["sha256"] = hashlib.sha256(b"not these bytes").hexdigest()
        rec["check"] = journal_check(rec)
        lines[i] = json.dumps(rec, sort_keys=True).encode()
    elif how == "claims_other_unit":  # the line names another unit's tensors under its uid
        rec = json.loads(line)
        rec.pop("check")
        other = next(u for u in units if u["uid"] != rec["uid"])
        rec["tensors"], rec["sha256"] = other["tensors"], other["sha256"]
        rec["check"] = journal_check(rec)
        lines[i] = json.dumps(rec, sort_keys=True).encode()
    else:
        raise AssertionError(how)


TAMPERINGS = ["sha_digit", "line_byte", "recomputed_check", "claims_other_unit"]


def test_tampered_journal_lines_are_redone(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    """Four lines damaged four ways in one journal: exactly those four units are redone."""
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    journal = state_dir_for(out) / JOURNAL_NAME
    lines = journal.read_bytes().split(b"\n")
    units = journal_units(out)
    for i, how in zip((2, 4, 6, 8), TAMPERINGS, strict=True):  # line 0 is the header
        _tamper(lines, i, how, units)
    journal.write_bytes(b"\n".join(lines))
    assert len(journal_units(out)) == done - 2  # two kinds break the line check, two keep it valid
    assert resume_and_check(models, out) == done - 4


@pytest.mark.slow
@pytest.mark.parametrize("how", TAMPERINGS)
def test_tampered_journal_line_is_redone(models: Models, half_state: tuple[Path, int], tmp_path: Path, how: str) -> None:
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    journal = state_dir_for(out) / JOURNAL_NAME
    lines = journal.read_bytes().split(b"\n")
    _tamper(lines, 3, how, journal_units(out))
    journal.write_bytes(b"\n".join(lines))
    assert resume_and_check(models, out) == done - 1


def test_torn_last_journal_line_then_more_units(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    """A torn last line is not trusted, and lines appended by the next run are not swallowed by it."""
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    journal = state_dir_for(out) / JOURNAL_NAME
    raw = journal.read_bytes()
    journal.write_bytes(raw[: len(raw) - 40])  # cut into the last unit's line
    assert len(journal_units(out)) == done - 1
    p = run_child(models.args(out), kill=f"after_unit:{done + 2}")
    assert p.returncode == KILLED, p.stderr
    assert len(journal_units(out)) == done + 3
    assert resume_and_check(models, out) == done + 3


@pytest.mark.parametrize("cut", ["mid_data", pytest.param("inside_header", marks=pytest.mark.slow), pytest.param("empty", marks=pytest.mark.slow)])
def test_truncated_partial_file(models: Models, half_state: tuple[Path, int], tmp_path: Path, cut: str) -> None:
    out = tmp_path / "out"
    copy_state(half_state, out)
    partial = state_dir_for(out) / PARTIAL_NAME
    start, spans = partial_layout(out)
    units = journal_units(out)
    ends = sorted(max(spans[t][1] for t in u["tensors"]) for u in units)
    size = {"mid_data": (ends[len(ends) // 2 - 1] + ends[len(ends) // 2]) // 2, "inside_header": start // 2, "empty": 0}[cut]
    os.truncate(partial, size)
    # units whose bytes all lie before the cut survive (their header is rewritten when it was cut)
    survivors = sum(1 for e in ends if e <= size)
    assert (survivors > 0) == (cut == "mid_data")
    assert resume_and_check(models, out) == survivors


def test_corrupted_bytes_in_partial_file(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    """A flipped byte in a journaled unit's data (that unit is redone) and one in the header (rewritten from the plan)."""
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    partial = state_dir_for(out) / PARTIAL_NAME
    start, spans = partial_layout(out)
    units = journal_units(out)
    b, e = spans[units[1]["tensors"][0]]
    b2, e2 = spans[units[5]["tensors"][-1]]
    with open(partial, "r+b") as f:
        for at in ((b + e) // 2, e2 - 1, start // 2):
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x20]))
    assert resume_and_check(models, out) == done - 2


# ---- changed inputs --------------------------------------------------------------------------------


def test_changed_option_refuses_then_restart(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    out = tmp_path / "out"
    copy_state(half_state, out)
    journal_before = (state_dir_for(out) / JOURNAL_NAME).read_bytes()
    for args in (models.args(out, rank=RANK // 2), models.args(out, "--seed", "7")):
        p = run_child(args)
        assert p.returncode == 2
        assert_clean_error(p, "--restart")
        assert_nothing_final(out)
        assert (state_dir_for(out) / JOURNAL_NAME).read_bytes() == journal_before  # refused, and the state is untouched
    p = run_child(models.args(out, "--restart", rank=RANK // 2))
    assert p.returncode == 0, p.stderr
    assert resumed_units(out) == 0
    assert not state_dir_for(out).exists()


def test_changed_inputs_refuse_then_restart(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in ("adapter", "source", "target"):
        shutil.copytree(models.root / name, root / name)  # copy2 keeps mtimes: the same fingerprints
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    args = transfer_command(root, out)

    write_adapter(root / "adapter", SOURCE_SPEC, rank=8, alpha=16, seed=99, base="other")  # rewritten adapter
    p = run_child(args)
    assert p.returncode == 2
    assert_clean_error(p, "--restart")
    for f in (root / "adapter").iterdir():
        shutil.copy2(models.root / "adapter" / f.name, f)

    target_file = root / "target" / "model.safetensors"
    st = target_file.stat()
    os.utime(target_file, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a touched target model
    p = run_child(args)
    assert p.returncode == 2
    assert_clean_error(p, "--restart")
    assert_nothing_final(out)
    assert len(journal_units(out)) == done

    p = run_child(args + ["--restart"])
    assert p.returncode == 0, p.stderr
    assert resumed_units(out) == 0
    assert (out / ADAPTER_NAME).read_bytes() == models.ref_bytes  # same weights, so the same bytes


# ---- writes that fail ---------------------------------------------------------------------------------


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_tmpfs(tmp_path: Path, models: Models):
    """A tmpfs too small for the partial adapter file (holds about a third of it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size_k = max(64, len(models.ref_bytes) // 3 // 1024)
    if not _mount("-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mnt)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_clear_and_resumable(models: Models, small_tmpfs: Path) -> None:
    out = small_tmpfs / "out"
    p = run_child(models.args(out))
    assert p.returncode == 2, p.stderr
    assert_clean_error(p, "cannot write", "disk is full", "resume")
    assert_nothing_final(out)
    journaled = len(journal_units(out))
    assert 0 < journaled < models.units

    # an output that cannot be written at all: same kind of message, state kept
    assert _mount("-o", "remount,ro", str(small_tmpfs))
    p = run_child(models.args(out))
    assert p.returncode == 2, p.stderr
    assert_clean_error(p, "cannot write", "resume")
    assert len(journal_units(out)) == journaled

    assert _mount("-o", f"remount,rw,size={4 * len(models.ref_bytes) // 1024 + 256}k", str(small_tmpfs))
    assert resume_and_check(models, out) == journaled


def _fsize_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_at_start_is_clear(models: Models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = run_child(models.args(out), preexec_fn=_fsize_limit(4096))
    assert p.returncode == 2, p.stderr
    assert_clean_error(p, "cannot write", "file size limit")
    assert_nothing_final(out)


def test_file_size_limit_mid_run_keeps_finished_work(models: Models, half_state: tuple[Path, int], tmp_path: Path) -> None:
    """RLIMIT_FSIZE below the end of the preallocated file: writes past it fail (EFBIG) mid-run."""
    out = tmp_path / "out"
    done = copy_state(half_state, out)
    start, spans = partial_layout(out)
    limit = spans[max(spans, key=lambda k: spans[k][1])][1] - 4096  # inside the last tensor's bytes
    p = run_child(models.args(out), preexec_fn=_fsize_limit(limit))
    assert p.returncode == 2, p.stderr
    assert_clean_error(p, "cannot write", "file size limit")
    assert_nothing_final(out)
    journaled = len(journal_units(out))
    assert done <= journaled < models.units
    assert resume_and_check(models, out) == journaled


# ---- SIGTERM and SIGINT ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_prints_resume_command(models: Models, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    # a test-only pause after each unit keeps the run inside its loop while the signal is on its way
    p = subprocess.Popen(models.args(out), env=child_env(delay=0.05), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while len(journal_units(out)) < 3 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.monotonic()
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert time.monotonic() - t0 < 5, "the run did not stop promptly"
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err
    assert f"stopped by {sig.name}" in err and "to resume, run:" in err, err
    assert_nothing_final(out)
    journaled = len(journal_units(out))
    assert 3 <= journaled < models.units

    # the printed command resumes (run through this interpreter rather than the installed script)
    cmd = shlex.split(err.split("to resume, run:", 1)[1].strip().splitlines()[0])
    assert cmd[0] == "lowmem-crosslora" and "--out" in cmd
    r = run_child([sys.executable, "-m", "lowmem_crosslora", *cmd[1:]])
    assert r.returncode == 0, r.stderr
    assert (out / ADAPTER_NAME).read_bytes() == models.ref_bytes
    assert resumed_units(out) == journaled  # a clean stop loses nothing
