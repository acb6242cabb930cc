"""Issue 17: one figure for "the smallest budget that works".

--max-memory bounds the whole process, so the figure is the process's baseline (measured in each
process: `plan`'s and a transfer's differ by a few MiB, which the figure's 4 MiB margin covers)
plus the working part, which one function computes (Budget.smallest_working over the run's
matrices, with the bases held at each point and the planner's slack and creep allowance) and which
`plan` and `transfer` name identically. A run at either process's figure finishes, and a run at
0.9x of it is refused with exit 3 and one error line. Real processes, on several shapes: the demo
pair, bench/crash.py's pair, and a `--layer-map depth` transfer in which a source layer feeds
several target layers (so source bases are held across units).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_module

from bench.crash import build_pair
from lowmem_crosslora.services.synthetic import DEMO_SOURCE, DEMO_TARGET, write_adapter, write_model
from lowmem_crosslora.sizes import parse_size

NAMED = re.compile(r"the smallest budget that works is ([0-9.]+ [KMG]iB) for the whole process .*\+ ([0-9.]+ [KMG]iB) working\)")
PLANNED = re.compile(r"\(smallest workable budget ([0-9.]+ [KMG]iB), of which ([0-9.]+ [KMG]iB) working\)")
MARGIN = 4 * 2**20


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    src = write_model(root / "source-llama", DEMO_SOURCE, dtype="float32", seed=0, spectrum="decaying")
    tgt = write_model(root / "target-qwen2", DEMO_TARGET, dtype="float32", seed=1, spectrum="decaying")
    ad = write_adapter(root / "lora-on-llama", DEMO_SOURCE, rank=8, alpha=16, seed=2, base=str(src))
    return {"adapter": ad, "source": src, "target": tgt}


@pytest.fixture(scope="module")
def crash_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = build_pair(tmp_path_factory.mktemp("crash"))
    return {"adapter": root / "adapter", "source": root / "source", "target": root / "target"}


def _inputs(pair: dict[str, Path]) -> list[str]:
    return ["--adapter", str(pair["adapter"]), "--source", str(pair["source"]), "--target", str(pair["target"])]


def _one_error_line(rc: int, err: str) -> str:
    assert rc == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _check_figure(pair: dict[str, Path], extra: list[str], tmp_path: Path) -> None:
    args = _inputs(pair) + extra

    def transfer(budget: str, out: Path) -> tuple[int, str]:
        rc, _, err = run_module(["transfer", *args, "--out", str(out), "--max-memory", budget, "--device", "cpu", "--no-cache", "-q"], timeout=300)
        return rc, err

    # A budget far too small: the refusal names the figure.
    rc, err = transfer("1MB", tmp_path / "tiny")
    line = _one_error_line(rc, err)
    m = NAMED.search(line)
    assert m, line
    named, working = m.group(1), m.group(2)
    assert not (tmp_path / "tiny").exists()

    # `plan` names the same working part, refused at that small budget and with room to spare, and a
    # whole figure within the margin of the transfer's.
    rc, _, err = run_module(["plan", *args, "--max-memory", "1MB", "--device", "cpu"])
    m = NAMED.search(_one_error_line(rc, err))
    assert m and m.group(2) == working, (working, err)
    planned = m.group(1)
    assert abs(parse_size(planned.replace(" ", "")) - parse_size(named.replace(" ", ""))) <= MARGIN, (planned, named)
    rc, out, err = run_module(["plan", *args, "--device", "cpu"])
    assert rc == 0, err
    m = PLANNED.search(out)
    assert m and m.group(2) == working, (working, out)
    assert abs(parse_size(m.group(1).replace(" ", "")) - parse_size(planned.replace(" ", ""))) <= MARGIN, (planned, out)

    # Just below the figure (not only far below it), the refusal names the same working part.
    need = parse_size(named.replace(" ", ""))
    rc, err = transfer(str(int(need * 0.9)), tmp_path / "below")
    line = _one_error_line(rc, err)
    m = NAMED.search(line)
    assert m and m.group(2) == working, (working, line)
    assert not (tmp_path / "below" / "adapter_model.safetensors").exists()

    # At the transfer's figure, and at plan's, the run finishes.
    for i, figure in enumerate((named, planned)):
        rc, err = transfer(figure.replace(" ", ""), tmp_path / f"at-{i}")
        assert rc == 0, (figure, err)
        assert (tmp_path / f"at-{i}" / "adapter_model.safetensors").exists()


def test_demo_pair_figure(demo_pair: dict[str, Path], tmp_path: Path) -> None:
    _check_figure(demo_pair, [], tmp_path)


def test_crash_pair_figure(crash_pair: dict[str, Path], tmp_path: Path) -> None:
    _check_figure(crash_pair, ["--rank", "16"], tmp_path)


def test_depth_map_figure(demo_pair: dict[str, Path], tmp_path: Path) -> None:
    """6 target layers from 4 source layers: source bases held across units count in the figure."""
    _check_figure(demo_pair, ["--layer-map", "depth"], tmp_path)
