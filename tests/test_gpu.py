"""The CUDA path (issue 3), opt-in: `pytest -m gpu` on a machine with a CUDA device.

Checks that the GPU transfer agrees with the CPU one, that a CUDA failure in a unit's SVD falls
back to the CPU and says so in the report, and that --max-gpu-memory is kept by blocking.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_crosslora import transfer
from lowmem_crosslora.synthetic import ModelSpec, write_adapter, write_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SRC = ModelSpec("llama", 256, 768, 2, 4, 2, 64, vocab=64)
TGT = ModelSpec("qwen2", 320, 896, 2, 5, 1, 64, vocab=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    return {
        "src": write_model(root / "src", SRC, dtype="float32", seed=0, spectrum="decaying"),
        "tgt": write_model(root / "tgt", TGT, dtype="float32", seed=1, spectrum="decaying"),
        "ad": write_adapter(root / "ad", SRC, rank=8, alpha=16, seed=2),
        "root": root,
    }


def _deltas(out: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(out / "adapter_model.safetensors"))
    return {k: t[k.replace("lora_A", "lora_B")].double() @ t[k].double() for k in t if ".lora_A." in k}


@pytest.mark.parametrize("rank", [320, 32])  # 320: exact SVDs; 32: the randomized path
def test_cuda_agrees_with_cpu(pair: dict[str, Path], rank: int) -> None:
    cpu = transfer(pair["ad"], pair["src"], pair["tgt"], pair["root"] / f"cpu{rank}", rank=rank, device="cpu")
    gpu = transfer(pair["ad"], pair["src"], pair["tgt"], pair["root"] / f"gpu{rank}", rank=rank, device="cuda")
    assert gpu["summary"]["device"].startswith("cuda")
    assert all(u["device"].startswith("cuda") for u in gpu["units"])
    assert gpu["summary"]["peak_gpu_bytes"] > 0
    a, b = _deltas(pair["root"] / f"cpu{rank}"), _deltas(pair["root"] / f"gpu{rank}")
    for k in a:
        # The decaying spectrum has no gap at r, so the randomized path's subspaces differ slightly
        # between generators; the exact path agrees to float error.
        tol = 1e-4 if rank == 320 else 5e-2
        assert torch.linalg.norm(a[k] - b[k]) <= tol * torch.linalg.norm(a[k]), k
    for uc, ug in zip(cpu["units"], gpu["units"]):
        assert abs(uc["energy_retained"] - ug["energy_retained"]) < (1e-4 if rank == 320 else 3e-2)


def test_cuda_failure_falls_back_to_cpu(pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real_qr = torch.linalg.qr

    def failing_qr(a: torch.Tensor, *args: object, **kw: object):  # noqa: ANN202
        if a.is_cuda:
            raise RuntimeError("cusolver error: simulated failure")
        return real_qr(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "qr", failing_qr)
    report = transfer(pair["ad"], pair["src"], pair["tgt"], pair["root"] / "fallback", rank=32, device="cuda")
    assert report["summary"]["fallbacks"], "the fallback must be noted in the report"
    assert any("used the CPU" in f for f in report["summary"]["fallbacks"])
    assert any(u["device"] == "cpu" or "cpu" in u["device"] for u in report["units"])
    monkeypatch.undo()
    ref = _deltas(pair["root"] / "cpu32") if (pair["root"] / "cpu32").exists() else None
    if ref is not None:
        got = _deltas(pair["root"] / "fallback")
        for k in ref:
            assert torch.linalg.norm(ref[k] - got[k]) <= 5e-2 * torch.linalg.norm(ref[k])


def test_gpu_budget_is_kept_by_blocking(pair: dict[str, Path]) -> None:
    budget = 2 * 2**20  # 2 MiB of GPU memory: below one float32 gate matrix (896 x 320 x 4 = 1.1 MiB) plus panels
    report = transfer(pair["ad"], pair["src"], pair["tgt"], pair["root"] / "gpubudget", rank=32, device="cuda", max_gpu_memory=budget)
    modes = {u["mode"]["source"] for u in report["units"]} | {u["mode"]["target"] for u in report["units"]}
    assert "blocked" in modes
    assert report["summary"]["peak_gpu_bytes"] <= budget
