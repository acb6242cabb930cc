"""Issue 17, class 9: --max-memory bounds the whole process, measured from outside it.

verify and refine on the tiny pair, each run as a real process whose private memory (RssAnon of the
process tree, from /proc) is sampled every 2 ms by the test (bench/watch.py). A budget that the
baseline alone fills is refused with exit 3 and one line naming the smallest budget for the whole
process; a run at that very figure finishes and its process never goes above it. (transfer's case,
at the baseline plus less than one float32 base matrix, is in test_memory.py.)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import FAST_REFINE, refine_pair, write_llama, write_lora

from bench.watch import run_watched
from lowmem_crosslora.sizes import format_size, parse_size

pytest.importorskip("transformers")
pytest.importorskip("peft")

NAMED = re.compile(r"raise --max-memory to at least ([0-9.]+) ([KMG]iB)")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lowmem_crosslora import transfer

    m = refine_pair(tmp_path_factory.mktemp("outside"))
    m["transferred"] = m["root"] / "transferred"
    transfer(m["adapter"], m["source"], m["target"], m["transferred"], rank=16, device="cpu", use_cache=False)
    return m


def _named_then_held(args: list[str], out: Path, report: Path) -> None:
    """At 1 MB: exit 3, one line naming the figure, nothing written. At the figure: exit 0, and the
    process tree's private memory, sampled from outside, stays at or under it."""
    w = run_watched([*args, "--max-memory", "1MB"], timeout=600)
    lines = [ln for ln in w.stderr.splitlines() if ln.startswith("error:")]
    assert w.returncode == 3 and len(lines) == 1 and "Traceback" not in w.stderr, w.stderr
    m = NAMED.search(lines[0])
    assert m, lines[0]
    budget = parse_size(m.group(1) + m.group(2))
    assert not out.exists() and not report.exists()

    w = run_watched([*args, "--max-memory", str(budget)], timeout=600)
    assert w.returncode == 0, w.stderr
    assert w.samples > 10
    assert w.peak_private <= budget, (format_size(w.peak_private), format_size(budget))
    s = json.loads(report.read_text())["summary"]
    assert s["host_budget_bytes"] == budget
    assert s["baseline_host_bytes"] < s["peak_host_bytes"] <= budget
    assert s["peak_working_bytes"] == s["peak_host_bytes"] - s["baseline_host_bytes"]


def test_verify_holds_the_whole_process_budget(models: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "verify.json"
    args = [sys.executable, "-m", "lowmem_crosslora", "verify", "--source", str(models["source"]), "--adapter", str(models["adapter"])]
    args += ["--target", str(models["target"]), "--transferred", str(models["transferred"]), "--device", "cpu"]
    args += ["--samples", "8", "--neutral-samples", "4", "--max-new-tokens", "12", "--prompts", str(models["prompts"]), "--report", str(report)]
    _named_then_held(args, tmp_path / "none", report)


def test_refine_holds_the_whole_process_budget(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "refined"
    f = FAST_REFINE
    args = [sys.executable, "-m", "lowmem_crosslora", "refine", "--source", str(models["source"]), "--adapter", str(models["adapter"])]
    args += ["--target", str(models["target"]), "--out", str(out), "--device", "cpu", "--prompts", str(models["prompts"])]
    args += ["--steps", str(f["steps"]), "--batch", str(f["batch"]), "--samples", str(f["samples"])]
    args += ["--contrast-samples", str(f["contrast_samples"]), "--max-new-tokens", str(f["max_new_tokens"])]
    _named_then_held(args, out, out / "crosslora_report.json")


def test_verify_refusal_names_a_figure_for_both_models(tmp_path: Path) -> None:
    """The figure named when the source does not fit also carries what the process keeps into the
    target's turn (texts, scores, tokenizers): a run at it is not refused again at the target."""
    from lowmem_crosslora import transfer

    model = write_llama(tmp_path / "llama")
    adapter = write_lora(model, tmp_path / "lora", seed=10)
    transfer(adapter, model, model, tmp_path / "self", rank=64, device="cpu", use_cache=False)
    report = tmp_path / "v.json"
    args = [sys.executable, "-m", "lowmem_crosslora", "verify", "--source", str(model), "--adapter", str(adapter), "--target", str(model)]
    args += ["--transferred", str(tmp_path / "self"), "--device", "cpu", "--samples", "8", "--neutral-samples", "4", "--max-new-tokens", "12"]
    _named_then_held([*args, "--report", str(report)], tmp_path / "none", report)


def test_a_forked_child_is_not_counted_twice() -> None:
    """The watcher's tree sum: a process holding 200 MB that forks a child (which maps the same pages
    copy-on-write, as before an exec) still reads about 200 MB, not 400; a child that writes its own
    copy of them reads 400."""
    import subprocess
    import time

    import psutil

    from bench.watch import tree_private

    code = (
        "import os, sys, time\n"
        "b = bytearray(200 * 2**20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "if os.fork() == 0:\n"
        "    if sys.argv[1] == 'copy':\n"
        "        for i in range(0, len(b), 4096): b[i] = 2\n"
        "    time.sleep(30); os._exit(0)\n"
        "print('ready', flush=True); time.sleep(30)\n"
    )
    for mode, low, high in (("share", 190, 260), ("copy", 390, 460)):
        p = subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 20
            mib = tree_private(p.pid) / 2**20
            while time.monotonic() < deadline and not (low <= mib <= high):  # the child may still be writing its copy
                time.sleep(0.2)
                mib = tree_private(p.pid) / 2**20
            assert low <= mib <= high, (mode, mib)
        finally:
            for k in psutil.Process(p.pid).children(recursive=True):
                k.kill()
            p.kill()
            p.wait()
