"""Stacks of same-shape base matrices factored together (--stack, issue 18): each basis equals the
one-at-a-time basis to rounding (same seed per matrix), a stacked transfer writes what an unstacked one
writes, the budget bounds the stack, and a stack that fails falls back to one matrix at a time."""

from __future__ import annotations

import pytest
import torch

import lowmem_crosslora
from lowmem_crosslora.linalg.bases import InCoreMatrix, fix_signs, randomized_svd, randomized_svd_stack
from lowmem_crosslora.services import factoring


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (40, 40), (30, 12)])
@pytest.mark.parametrize("niter", [0, 2])
def test_a_stack_equals_each_matrix_factored_alone(shape: tuple[int, int], niter: int) -> None:
    m, n = shape
    g = torch.Generator().manual_seed(m * n + niter)
    W = torch.randn(5, m, n, generator=g)
    seeds = [101, 7, 2**40 + 3, 0, 55]
    r, q = 6, 16  # q >= min(m, n) for (30, 12): the full-width path
    stacked = randomized_svd_stack(W, r, q, niter, seeds, torch.device("cpu"), torch.float32)
    for i, (Us, Ss, Vs) in enumerate(stacked):
        U, S, V = randomized_svd(InCoreMatrix(W[i]), r, q, niter, seeds[i], torch.device("cpu"), torch.float32)
        U, V = fix_signs(U, V)
        Us, Vs = fix_signs(Us, Vs)
        assert torch.allclose(S, Ss, rtol=1e-5, atol=1e-5)
        assert torch.allclose(U, Us, atol=1e-4) and torch.allclose(V, Vs, atol=1e-4)


def test_a_stack_needs_a_seed_per_matrix() -> None:
    with pytest.raises(ValueError, match="seeds"):
        randomized_svd_stack(torch.zeros(3, 4, 4), 2, 3, 0, [1, 2], torch.device("cpu"), torch.float32)


def _transfer(zoo, tmp_path, name: str, **kw):
    src, tgt = zoo.model("llama"), zoo.model("qwen2")
    ad = zoo.adapter("llama")
    out = tmp_path / name
    # rank 4 against the tiny models' widths keeps q well below min(m, n): the randomized path (exact
    # SVD, chosen on the CPU near full width, is never stacked)
    report = lowmem_crosslora.transfer(ad, src, tgt, out, rank=4, oversample=2, device="cpu", use_cache=False, **kw)
    return report, {k: v for k, v in _tensors(out).items()}


def _tensors(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_a_stacked_transfer_writes_what_an_unstacked_one_writes(zoo, tmp_path) -> None:
    plain, a = _transfer(zoo, tmp_path, "plain")
    stacked, b = _transfer(zoo, tmp_path, "stacked", stack=8)
    st = stacked["summary"]["stacks"]
    assert st["limit"] == 8 and st["stacks"] >= 1 and st["matrices"] >= 2 * st["stacks"]
    assert "stacks" not in plain["summary"]
    assert a.keys() == b.keys()
    for k in a:
        # batched and one-at-a-time kernels round differently (2.7e-6 on entries up to 0.29 measured on
        # an AVX2 CPU): the tolerance is relative to the factor's scale, far below a wrong basis's error
        scale = float(a[k].float().abs().max())
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-4 * scale), k
    # the same stacked run again: the same bytes
    _, c = _transfer(zoo, tmp_path, "stacked-again", stack=8)
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_the_budget_bounds_a_stack(zoo, tmp_path, monkeypatch) -> None:
    """A stack grows only while Budget.stack_fits says it fits: refused at every size, nothing is
    stacked, and the output is the unstacked one."""
    from lowmem_crosslora.services.memory import Budget

    sizes: list[int] = []

    def refuse(self, m, n, q, r, dtype, k, retained, device):
        sizes.append(k)
        return False

    monkeypatch.setattr(Budget, "stack_fits", refuse)
    report, b = _transfer(zoo, tmp_path, "bounded", stack=8)
    assert sizes and set(sizes) == {2}
    assert report["summary"]["stacks"] == {"limit": 8, "stacks": 0, "matrices": 0}
    _, a = _transfer(zoo, tmp_path, "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_stack_falls_back_to_one_matrix_at_a_time(zoo, tmp_path, monkeypatch) -> None:
    def broken(*args, **kw):
        raise RuntimeError("batched QR failed on this device")

    monkeypatch.setattr(factoring, "randomized_svd_stack", broken)
    report, b = _transfer(zoo, tmp_path, "fallback", stack=4)
    assert report["summary"]["stacks"]["stacks"] == 0
    assert any("a stack of" in f and "factored one at a time" in f for f in report["summary"]["fallbacks"])
    _, a = _transfer(zoo, tmp_path, "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stack_must_be_positive(zoo, tmp_path) -> None:
    with pytest.raises(lowmem_crosslora.errors.InputError, match="--stack"):
        _transfer(zoo, tmp_path, "bad", stack=0)
