"""The memory budget and the out-of-core SVD (issue 3).

- The blocked (out-of-core) range finder gives the in-core result to float tolerance.
- The budget picks in-core or blocked from the numbers, names the smallest working budget when
  nothing fits (exit 3), and stops cleanly, keeping finished units, when the real figure crosses it.
- --max-memory bounds the whole process's private memory, Python and torch included: a transfer run
  under the baseline plus less than one float32 base matrix stays under it, measured from outside
  the process (bench/watch.py samples /proc); a budget the baseline alone fills is refused up front.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import transfer_args
from safetensors.torch import load_file

from bench.watch import run_watched
from lowmem_crosslora import transfer
from lowmem_crosslora.errors import BudgetError
from lowmem_crosslora.linalg.bases import BlockedMatrix, InCoreMatrix, randomized_svd
from lowmem_crosslora.services import memory
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model
from lowmem_crosslora.sizes import format_size, parse_size

# Wide enough that one float32 base matrix (gate/up/down: 6144 x 1024 = 24 MiB) dwarfs the
# working set the blocked path needs at a small rank.
BIG_SRC = ModelSpec("llama", 1024, 6144, 2, 8, 2, 128, vocab=64)
BIG_TGT = ModelSpec("qwen2", 768, 6144, 2, 6, 2, 128, vocab=64)
LARGEST_F32 = 4 * 6144 * 1024


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bigpair")
    src = write_model(root / "src", BIG_SRC, dtype="bfloat16", seed=3)
    tgt = write_model(root / "tgt", BIG_TGT, dtype="bfloat16", seed=4)
    ad = write_adapter(root / "ad", BIG_SRC, rank=8, alpha=16, seed=5)
    return {"source": src, "target": tgt, "adapter": ad, "root": root}


def test_parse_and_format_sizes() -> None:
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("512mib") == 512 * 2**20
    assert parse_size("1048576") == 2**20
    for bad in ("", "lots", "-1GB", "0", "2 parsecs"):
        with pytest.raises(Exception, match="size"):
            parse_size(bad)
    assert format_size(1536 * 2**20) == "1.5 GiB"


@pytest.mark.parametrize("shape", [(700, 300), (300, 700)])
def test_blocked_matches_in_core(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = shape
    W = torch.randn(m, n, generator=g).to(torch.bfloat16)
    dev = torch.device("cpu")
    r, q = 40, 50
    U1, S1, V1 = randomized_svd(InCoreMatrix(W.float()), r, q, 2, 1234, dev, torch.float32)
    reads: list[tuple[int, int]] = []

    def rows(a: int, b: int) -> torch.Tensor:
        reads.append((a, b))
        return W[a:b]

    op = BlockedMatrix(rows, (m, n), 64, dev, torch.float32)
    U2, S2, V2 = randomized_svd(op, r, q, 2, 1234, dev, torch.float32)
    assert max(b - a for a, b in reads) <= 64  # never more than one block widened at a time
    assert op.passes == 2 * 2 + 2
    torch.testing.assert_close(S1, S2, rtol=1e-4, atol=1e-4)
    # Same subspaces and, the seed being the same, the same vectors up to float error.
    torch.testing.assert_close(U1 @ U1.T, U2 @ U2.T, rtol=0, atol=2e-4)
    torch.testing.assert_close(V1 @ V1.T, V2 @ V2.T, rtol=0, atol=2e-4)


def test_budget_picks_in_core_then_blocked_then_refuses() -> None:
    baseline = Budget(device="cpu").baseline
    b = Budget(max_host=baseline + 2 * 2**30, device="cpu")
    p = b.plan_matrix(4096, 2048, 330, 320, "BF16")
    assert p.mode == "in-core" and p.device == "cpu"
    small = Budget(max_host=baseline + parse_size("40MiB"), device="cpu")
    p = small.plan_matrix(4096, 2048, 64, 54, "BF16")
    assert p.mode == "blocked" and 16 <= p.block_rows < 4096
    assert p.host_bytes <= small.host_room()
    tiny = Budget(max_host=parse_size("1MB"), device="cpu")
    with pytest.raises(BudgetError, match="smallest budget that works is .* for the whole process"):
        tiny.plan_matrix(4096, 2048, 330, 320, "BF16")
    # The figure named counts the baseline, and a budget at it plans the matrix.
    need = tiny.smallest_for([(4096, 2048, 330, 320, "BF16", 0)])
    assert need > tiny.baseline
    assert Budget(max_host=need, device="cpu").plan_matrix(4096, 2048, 330, 320, "BF16").mode == "blocked"


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowmem_crosslora", *args], capture_output=True, text=True, timeout=600)


def test_budget_below_one_float32_matrix_holds_for_the_whole_process(big_pair: dict[str, Path]) -> None:
    """--max-memory = the process's baseline + 3/4 of one float32 base matrix: the run blocks its SVDs,
    and the process's private memory, sampled from outside every 2 ms, never goes above the budget."""
    out_small = big_pair["root"] / "out-small"
    out_ref = big_pair["root"] / "out-ref"
    # The reference computes in core (no cache: not from bases a budgeted run left behind).
    r = _run_cli(*transfer_args(big_pair, out_ref, "--no-cache"))
    assert r.returncode == 0, r.stderr
    ref_report = json.loads((out_ref / "crosslora_report.json").read_text())
    assert {u["mode"]["target"] for u in ref_report["units"]} == {"in-core"}
    budget = ref_report["summary"]["baseline_host_bytes"] + int(0.75 * LARGEST_F32)
    w = run_watched([sys.executable, "-m", "lowmem_crosslora", *transfer_args(big_pair, out_small, "--no-cache", "--max-memory", str(budget))], timeout=600)
    assert w.returncode == 0, w.stderr
    assert w.samples > 10
    assert w.peak_private <= budget, (format_size(w.peak_private), format_size(budget))
    report = json.loads((out_small / "crosslora_report.json").read_text())
    s = report["summary"]
    assert s["host_budget_bytes"] == budget
    assert s["peak_host_bytes"] <= budget and s["peak_working_bytes"] == s["peak_host_bytes"] - s["baseline_host_bytes"]
    modes = {u["mode"]["source"] for u in report["units"]} | {u["mode"]["target"] for u in report["units"]}
    assert "blocked" in modes
    a, b = load_file(str(out_small / "adapter_model.safetensors")), load_file(str(out_ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        if ".lora_B." in name:
            continue
        A1, A2 = a[name].double(), b[name].double()
        B1 = a[name.replace("lora_A", "lora_B")].double()
        B2 = b[name.replace("lora_A", "lora_B")].double()
        d1, d2 = B1 @ A1, B2 @ A2
        assert torch.linalg.norm(d1 - d2) <= 2e-3 * torch.linalg.norm(d2)


def test_budget_below_the_baseline_is_refused_naming_the_whole(big_pair: dict[str, Path], tmp_path: Path) -> None:
    """A budget that Python and torch alone fill: exit 3 before any work, naming a figure above the baseline."""
    out = tmp_path / "out"
    r = _run_cli(*transfer_args(big_pair, out, "--max-memory", "64MiB"))
    assert r.returncode == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "leaves no room" in lines[0] and "for the whole process" in lines[0], lines
    named = parse_size(re.search(r"smallest budget that works is ([0-9.]+) ([KMG]iB)", lines[0]).expand(r"\1\2"))
    held = parse_size(re.search(r"\(([0-9.]+) ([KMG]iB) held for Python and torch", lines[0]).expand(r"\1\2"))
    assert named > held > 64 * 2**20
    assert not out.exists()


def test_budget_too_small_exits_3_naming_the_smallest(big_pair: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _run_cli(*transfer_args(big_pair, out, "--max-memory", "1MB"))
    assert r.returncode == 3, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "smallest budget that works is" in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_crossing_the_budget_stops_cleanly_and_keeps_units(big_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the sampled figure crosses the budget mid-run: BudgetError, finished units kept, resume finishes."""
    out = tmp_path / "out"
    real = memory.host_resident
    state = {"units": 0}

    def fake() -> tuple[int, int]:
        anon, f = real()
        return (anon + (1 << 40) if state["units"] >= 3 else anon), f  # a sudden terabyte after 3 units

    def progress(done: int, total: int, uid: str) -> None:
        state["units"] = done

    monkeypatch.setattr(memory, "host_resident", fake)
    with pytest.raises(BudgetError, match="over the --max-memory budget"):
        transfer(big_pair["adapter"], big_pair["source"], big_pair["target"], out, rank=16, device="cpu", max_memory=parse_size("2GB"), progress=progress)
    assert not out.exists()
    monkeypatch.setattr(memory, "host_resident", real)
    report = transfer(big_pair["adapter"], big_pair["source"], big_pair["target"], out, rank=16, device="cpu")
    assert report["summary"]["resumed_units"] > 0
    assert (out / "adapter_model.safetensors").exists()
