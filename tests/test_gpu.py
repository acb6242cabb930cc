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
from lowmem_crosslora.services.synthetic import ModelSpec, write_adapter, write_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SRC = ModelSpec("llama", 256, 768, 2, 4, 2, 64, vocab=64)
TGT = ModelSpec("qwen2", 320, 896, 2, 5, 1, 64, vocab=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu")
    return {
        "src": write_model(root / "src", SRC, dtype="float32", seed=0, spectrum="gap:32"),
        "tgt": write_model(root / "tgt", TGT, dtype="float32", seed=1, spectrum="gap:32"),
        "ad": write_adapter(root / "ad", SRC, rank=8, alpha=16, seed=2),
        "root": root,
    }


def _deltas(out: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(out / "adapter_model.safetensors"))
    return {k: t[k.replace("lora_A", "lora_B")].double() @ t[k].double() for k in t if ".lora_A." in k}


@pytest.mark.parametrize("case", ["randomized", "full-rank"])
def test_cuda_agrees_with_cpu(pair: dict[str, Path], case: str) -> None:
    """CPU and GPU agree where the answer is unique: rank 32 on weights with a clear gap after index 32
    (randomized on both), and self-transfer at full rank (LAPACK's exact SVD on the CPU, the
    full-width range finder on the GPU), where dW_t = U U^T dW V V^T depends on subspaces only.
    (Across two models at full rank, P_U = U_t U_s^T pairs individual singular vectors, which float
    rounding rotates inside clusters of nearly equal singular values: no tolerance is meaningful.)"""
    tgt, rank = (pair["tgt"], 32) if case == "randomized" else (pair["src"], 4096)
    cpu = transfer(pair["ad"], pair["src"], tgt, pair["root"] / f"cpu-{case}", rank=rank, device="cpu")
    gpu = transfer(pair["ad"], pair["src"], tgt, pair["root"] / f"gpu-{case}", rank=rank, device="cuda")
    assert gpu["summary"]["device"].startswith("cuda")
    assert all(u["device"].startswith("cuda") for u in gpu["units"])
    assert gpu["summary"]["peak_gpu_bytes"] > 0
    if case == "randomized":
        assert {u["method"]["target"] for u in gpu["units"]} == {"randomized"}
    else:
        assert {u["method"]["target"] for u in cpu["units"]} == {"exact"}
        assert {u["method"]["target"] for u in gpu["units"]} == {"full-width"}
    a, b = _deltas(pair["root"] / f"cpu-{case}"), _deltas(pair["root"] / f"gpu-{case}")
    for k in a:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-3 * torch.linalg.norm(a[k]), k
    for uc, ug in zip(cpu["units"], gpu["units"], strict=True):
        assert abs(uc["energy_retained"] - ug["energy_retained"]) < 1e-3


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
    ref = _deltas(pair["root"] / "cpu-randomized") if (pair["root"] / "cpu-randomized").exists() else None
    if ref is not None:
        got = _deltas(pair["root"] / "fallback")
        for k in ref:
            assert torch.linalg.norm(ref[k] - got[k]) <= 1e-3 * torch.linalg.norm(ref[k])


def test_gpu_budget_is_kept_by_blocking(tmp_path: Path) -> None:
    """A GPU budget below one float32 matrix plus the libraries' workspaces: blocked on the GPU."""
    big = ModelSpec("llama", 1024, 8192, 1, 8, 2, 128, vocab=64)  # gate/up/down: 8192 x 1024 x 4 = 32 MiB
    src = write_model(tmp_path / "src", big, dtype="bfloat16", seed=0)
    tgt = write_model(tmp_path / "tgt", big, dtype="bfloat16", seed=1)
    ad = write_adapter(tmp_path / "ad", big, rank=8, alpha=16, seed=2)
    free = transfer(ad, src, tgt, tmp_path / "free", rank=64, device="cuda")
    base = free["summary"]["gpu_baseline_bytes"]  # cuBLAS / cuSOLVER workspaces, held before any matrix
    budget = base + 40 * 2**20  # in core would need 32 MiB x 1.5 (bf16 copy + float32) + panels
    report = transfer(ad, src, tgt, tmp_path / "budget", rank=64, device="cuda", max_gpu_memory=budget)
    modes = {u["mode"]["source"] for u in report["units"]} | {u["mode"]["target"] for u in report["units"]}
    assert "blocked" in modes
    assert all(u["device"].startswith("cuda") for u in report["units"])
    assert report["summary"]["peak_gpu_bytes"] <= budget
    a, b = _deltas(tmp_path / "free"), _deltas(tmp_path / "budget")
    for k in a:  # random Gaussian weights: no gap, but both runs draw the same test matrices
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-2 * torch.linalg.norm(a[k]), k
