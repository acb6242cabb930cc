"""The projection against an independent float64 dense reference, the sign-free invariants of
docs/METHOD.md, and unit tests of the bases and layer maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import gapped_matrix, lora_factors, np_bases, np_fix_signs, read_tensors, read_weight
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_crosslora
from lowmem_crosslora.linalg.bases import BlockedMatrix, InCoreMatrix, exact_svd, fix_signs, randomized_svd, scipy_svd, seed_for
from lowmem_crosslora.linalg.projection import frobenius_of_product, project_factors
from lowmem_crosslora.services.plan import source_layer_for

GAP = 8  # the planted spectral gap, and the SVD rank of the transfers below
TOL = 2e-5  # float32 computation, relative to the norm of the compared quantity


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def source_scale(adapter_dir) -> float:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return cfg["lora_alpha"] / cfg["r"]


@pytest.fixture(scope="module")
def gapped_transfer(zoo, tmp_path_factory):
    """llama -> qwen2, both with every module's spectrum gapped after index GAP, at rank GAP."""
    src = zoo.model("llama", gapped=GAP)
    tgt = zoo.model("qwen2", gapped=GAP)
    ad = zoo.adapter("llama", gapped=GAP)
    out = tmp_path_factory.mktemp("math") / "out"
    # exact_ratio 0.3: modules with min(m, n) <= 60 take the exact SVD, larger ones the randomized one
    report = lowmem_crosslora.transfer(ad, src, tgt, out, rank=GAP, device="cpu", exact_ratio=0.3)
    return src, tgt, ad, out, report


def unit_data(unit, src, tgt, ad, out):
    W_s = read_weight(src, unit["source_module"] + ".weight")
    W_t = read_weight(tgt, unit["target_module"] + ".weight")
    A, B = lora_factors(ad, unit["source_module"])
    A_t, B_t = lora_factors(out, unit["target_module"])
    return W_s, W_t, A, B, A_t, B_t


def test_gapped_transfer_covers_exact_and_randomized_paths(gapped_transfer):
    *_, report = gapped_transfer
    methods = {m for u in report["units"] for m in u["method"].values()}
    assert "exact" in methods and any(m.startswith("randomized") for m in methods), methods
    assert all(u["r"] == GAP for u in report["units"])


def test_projection_matches_float64_dense_reference(gapped_transfer):
    src, tgt, ad, out, report = gapped_transfer
    s = source_scale(ad)
    assert len(report["units"]) == 2 * 7
    for unit in report["units"]:
        W_s, W_t, A, B, A_t, B_t = unit_data(unit, src, tgt, ad, out)
        r = unit["r"]
        U_s, _, V_s = np_bases(W_s, r)
        U_t, _, V_t = np_bases(W_t, r)
        dW = s * B @ A
        want = U_t @ U_s.T @ dW @ V_s @ V_t.T
        got = s * B_t @ A_t
        assert got.shape == (W_t.shape[0], W_t.shape[1])
        assert rel_err(got, want) < TOL, (unit["uid"], rel_err(got, want))
        # and each factor on its own, as the method writes them
        assert rel_err(B_t, U_t @ (U_s.T @ B)) < TOL, unit["uid"]
        assert rel_err(A_t, (A @ V_s) @ V_t.T) < TOL, unit["uid"]


def test_singular_values_survive_the_shift(gapped_transfer):
    src, tgt, ad, out, report = gapped_transfer
    for unit in report["units"]:
        W_s, W_t, A, B, A_t, B_t = unit_data(unit, src, tgt, ad, out)
        U_s, _, V_s = np_bases(W_s, unit["r"])
        want = np.linalg.svd(U_s.T @ (B @ A) @ V_s, compute_uv=False)
        got = np.linalg.svd(B_t @ A_t, compute_uv=False)[: len(want)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want[0], err_msg=unit["uid"])


def test_factors_lie_in_the_target_subspaces(gapped_transfer):
    src, tgt, ad, out, report = gapped_transfer
    for unit in report["units"]:
        W_s, W_t, A, B, A_t, B_t = unit_data(unit, src, tgt, ad, out)
        U_t, _, V_t = np_bases(W_t, unit["r"])
        # columns of B_t in span(U_t), rows of A_t in span(V_t)
        assert rel_err(U_t @ (U_t.T @ B_t), B_t) < TOL, unit["uid"]
        assert rel_err((A_t @ V_t) @ V_t.T, A_t) < TOL, unit["uid"]
        # and not trivially so: the complement of span(U_t) is not empty here
        assert U_t.shape[0] > unit["r"]


def test_energy_retained_matches_float64(gapped_transfer):
    src, tgt, ad, out, report = gapped_transfer
    values = []
    for unit in report["units"]:
        W_s, W_t, A, B, *_ = unit_data(unit, src, tgt, ad, out)
        U_s, _, V_s = np_bases(W_s, unit["r"])
        dW = B @ A
        want = np.linalg.norm(U_s.T @ dW @ V_s) / np.linalg.norm(dW)
        assert unit["energy_retained"] == pytest.approx(want, abs=1e-5), unit["uid"]
        values.append(want)
    # a random LoRA keeps a small share inside a rank-8 subspace: the figure is measured, not assumed
    assert max(values) < 0.9
    summary = report["summary"]["energy_retained"]
    assert summary["mean"] == pytest.approx(np.mean([u["energy_retained"] for u in report["units"]]), abs=1e-6)


def test_same_model_full_rank_is_a_projection(zoo, tmp_path):
    """source == target at full rank: square modules come back unchanged, others as U U^T dW V V^T."""
    model = zoo.model("llama")
    ad = zoo.adapter("llama")
    out = tmp_path / "out"
    report = lowmem_crosslora.transfer(ad, model, model, out, rank=320, device="cpu")
    s = source_scale(ad)
    seen_square = seen_rect = False
    for unit in report["units"]:
        W, _, A, B, A_t, B_t = unit_data(unit, model, model, ad, out)
        m, n = W.shape
        assert unit["r"] == min(m, n)
        dW = s * B @ A
        got = s * B_t @ A_t
        if m == n:
            seen_square = True
            assert rel_err(got, dW) < TOL, unit["uid"]
            assert unit["energy_retained"] == pytest.approx(1.0, abs=1e-5)
        else:
            seen_rect = True
            U, _, V = np_bases(W, min(m, n))
            want = U @ U.T @ dW @ V @ V.T
            assert rel_err(got, want) < TOL, unit["uid"]
            # a non-square module really loses the part of dW outside W's row or column space
            assert rel_err(want, dW) > 0.1
    assert seen_square and seen_rect


def test_same_model_truncated_is_a_projection(zoo, tmp_path):
    """source == target at the gap rank: the result is U U^T dW V V^T with the rank-r bases."""
    model = zoo.model("llama", gapped=GAP)
    ad = zoo.adapter("llama", gapped=GAP)
    out = tmp_path / "out"
    report = lowmem_crosslora.transfer(ad, model, model, out, rank=GAP, device="cpu")
    s = source_scale(ad)
    for unit in report["units"]:
        W, _, A, B, A_t, B_t = unit_data(unit, model, model, ad, out)
        U, _, V = np_bases(W, GAP)
        dW = s * B @ A
        assert rel_err(s * B_t @ A_t, U @ U.T @ dW @ V @ V.T) < TOL, unit["uid"]


def test_float64_compute_matches_reference_closer(zoo, tmp_path):
    src = zoo.model("llama", gapped=GAP)
    tgt = zoo.model("qwen2", gapped=GAP)
    ad = zoo.adapter("llama", gapped=GAP)
    out = tmp_path / "out"
    report = lowmem_crosslora.transfer(ad, src, tgt, out, rank=GAP, device="cpu", compute_dtype="float64", dtype="float32")
    s = source_scale(ad)
    for unit in report["units"]:
        W_s, W_t, A, B, A_t, B_t = unit_data(unit, src, tgt, ad, out)
        U_s, _, V_s = np_bases(W_s, GAP)
        U_t, _, V_t = np_bases(W_t, GAP)
        want = U_t @ U_s.T @ (s * B @ A) @ V_s @ V_t.T
        assert rel_err(s * B_t @ A_t, want) < 2e-6, unit["uid"]


# ---- bases ---------------------------------------------------------------------------------------


def _gapped_torch(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(gapped_matrix(m, n, r, np.random.default_rng(seed))).float()


def projector_distance(X: torch.Tensor, Y: torch.Tensor) -> float:
    X, Y = X.double(), Y.double()
    return float(torch.linalg.norm(X @ X.T - Y @ Y.T))


@pytest.mark.parametrize("m,n", [(96, 64), (64, 160), (200, 200)])
@pytest.mark.parametrize("niter", [0, 2])
def test_randomized_svd_finds_the_gapped_subspaces(m, n, niter):
    r = 6
    W = _gapped_torch(m, n, r, seed=m * n + niter)
    U, S, V = randomized_svd(InCoreMatrix(W), r, r + 10, niter, seed=1, device=torch.device("cpu"), dtype=torch.float32)
    Ue, Se, Ve = exact_svd(W, r)
    assert U.shape == (m, r) and V.shape == (n, r) and S.shape == (r,)
    torch.testing.assert_close(S, Se, rtol=1e-5, atol=1e-6)
    # without power iterations the error is of the order of the gap ratio s_{r+1}/s_r (~1e-4 here)
    tol = 2e-3 if niter == 0 else 1e-4
    assert projector_distance(U, Ue) < tol
    assert projector_distance(V, Ve) < tol
    # orthonormal columns
    torch.testing.assert_close(U.T @ U, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(r), atol=1e-5, rtol=0)
    # each vector matches up to sign (distinct singular values)
    Uf, Vf = fix_signs(U, V)
    Uef, Vef = fix_signs(Ue, Ve)
    torch.testing.assert_close(Uf, Uef, atol=tol, rtol=0)
    torch.testing.assert_close(Vf, Vef, atol=tol, rtol=0)


def test_randomized_svd_is_seeded():
    W = torch.randn(80, 60, generator=torch.Generator().manual_seed(3))
    run = lambda seed: randomized_svd(InCoreMatrix(W), 5, 15, 1, seed, torch.device("cpu"), torch.float32)  # noqa: E731
    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_seed_for_is_stable_and_keyed():
    s = seed_for("fp", "w", 8, 0)
    assert s == seed_for("fp", "w", 8, 0)
    assert 0 <= s < 2**63
    assert len({s, seed_for("fp2", "w", 8, 0), seed_for("fp", "w2", 8, 0), seed_for("fp", "w", 9, 0), seed_for("fp", "w", 8, 1)}) == 5


def test_fix_signs_makes_largest_entry_positive():
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 5, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(12, 5, generator=gen))
    flips = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    Uf, Vf = fix_signs(U * flips, V * flips)
    idx = Uf.abs().argmax(dim=0)
    assert bool((Uf[idx, torch.arange(5)] > 0).all())
    # pairs flip together: U diag(s) V^T is unchanged
    S = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    torch.testing.assert_close((Uf * S) @ Vf.T, (U * S) @ V.T)
    # and whatever the input signs, the output is the same
    Ug, Vg = fix_signs(U, V)
    torch.testing.assert_close(Uf, Ug)
    torch.testing.assert_close(Vf, Vg)
    # agrees with the independent numpy convention used by the reference
    Un, Vn = np_fix_signs((U * flips).double().numpy(), (V * flips).double().numpy())
    np.testing.assert_allclose(Uf.double().numpy(), Un, atol=1e-7)
    np.testing.assert_allclose(Vf.double().numpy(), Vn, atol=1e-7)


@pytest.mark.parametrize("block_rows", [1, 7, 16, 500])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_matrix_matches_in_core(block_rows, transposed):
    gen = torch.Generator().manual_seed(block_rows)
    stored = torch.randn(53, 37, generator=gen).to(torch.bfloat16)
    W = stored.float().T if transposed else stored.float()
    m, n = W.shape
    op = BlockedMatrix(lambda a, b: stored[a:b], tuple(stored.shape), block_rows, torch.device("cpu"), torch.float32, transposed=transposed)
    assert op.shape == (m, n)
    X = torch.randn(n, 5, generator=gen)
    Y = torch.randn(m, 4, generator=gen)
    torch.testing.assert_close(op.matmul(X), W @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.rmatmul(Y), W.T @ Y, rtol=1e-5, atol=1e-5)
    r, q = 5, 15
    Ub, Sb, Vb = randomized_svd(op, r, q, 2, 11, torch.device("cpu"), torch.float32)
    Ui, Si, Vi = randomized_svd(InCoreMatrix(W), r, q, 2, 11, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(Sb, Si, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((Ub * Sb) @ Vb.T, (Ui * Si) @ Vi.T, rtol=1e-4, atol=1e-4)
    Ub, Vb = fix_signs(Ub, Vb)
    Ui, Vi = fix_signs(Ui, Vi)
    torch.testing.assert_close(Ub, Ui, rtol=1e-3, atol=1e-4)


def test_blocked_matrix_reads_in_blocks_and_checks():
    stored = torch.randn(40, 10)
    calls: list[tuple[int, int]] = []
    checks = []

    def reader(a: int, b: int) -> torch.Tensor:
        calls.append((a, b))
        return stored[a:b]

    op = BlockedMatrix(reader, (40, 10), 16, torch.device("cpu"), torch.float32, check=lambda: checks.append(1))
    op.matmul(torch.randn(10, 3))
    assert calls == [(0, 16), (16, 32), (32, 40)]
    assert len(checks) == 3 and op.passes == 1


def test_scipy_fallback_agrees_with_torch():
    W = _gapped_torch(50, 30, 4, seed=5)
    U1, S1, V1 = exact_svd(W.double(), 4)
    U2, S2, V2 = scipy_svd(W.double().numpy(), 4)
    torch.testing.assert_close(S1, S2)
    U1, V1 = fix_signs(U1, V1)
    U2, V2 = fix_signs(U2, V2)
    torch.testing.assert_close(U1, U2)
    torch.testing.assert_close(V1, V2)


def test_frobenius_of_product_without_forming_it():
    gen = torch.Generator().manual_seed(2)
    B, A = torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    assert frobenius_of_product(B, A) == pytest.approx(float(torch.linalg.norm(B.double() @ A.double())), rel=1e-10)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    mt=st.integers(2, 24),
    nt=st.integers(2, 24),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_project_factors_property(m, n, mt, nt, k, seed, data):
    r = data.draw(st.integers(1, min(m, n, mt, nt)))
    gen = torch.Generator().manual_seed(seed)
    U_s, V_s, U_t, V_t = _orthonormal(m, r, gen), _orthonormal(n, r, gen), _orthonormal(mt, r, gen), _orthonormal(nt, r, gen)
    A, B = torch.randn(k, n, generator=gen, dtype=torch.float64), torch.randn(m, k, generator=gen, dtype=torch.float64)
    p = project_factors(A, B, U_s, V_s, U_t, V_t)
    assert p.A.shape == (k, nt) and p.B.shape == (mt, k)
    dW = B @ A
    torch.testing.assert_close(p.B @ p.A, U_t @ U_s.T @ dW @ V_s @ V_t.T)
    inner = torch.linalg.norm(U_s.T @ dW @ V_s) / torch.linalg.norm(dW)
    assert p.energy_retained == pytest.approx(float(inner), rel=1e-9, abs=1e-12)
    assert 0.0 <= p.energy_retained <= 1.0 + 1e-9
    # the shifted update has the norm of the retained part
    assert float(torch.linalg.norm(p.B @ p.A)) == pytest.approx(float(inner * torch.linalg.norm(dW)), rel=1e-9, abs=1e-12)


def test_project_factors_zero_update_has_no_energy():
    U = torch.eye(4)[:, :2]
    p = project_factors(torch.zeros(2, 4), torch.zeros(4, 2), U, U, U, U)
    assert p.energy_retained is None
    assert not p.A.any() and not p.B.any()


# ---- layer maps ----------------------------------------------------------------------------------


def test_index_layer_map_is_identity():
    assert [source_layer_for(j, 30, 24, "index") for j in range(24)] == list(range(24))
    assert [source_layer_for(j, 3, 5, "index") for j in range(5)] == list(range(5))


@pytest.mark.parametrize(
    "ls,lt,want",
    [
        (3, 2, [0, 2]),
        (2, 3, [0, 1, 1]),  # round half up: 0.5 -> 1
        (3, 4, [0, 1, 1, 2]),
        (5, 3, [0, 2, 4]),
        (4, 1, [0]),
        (30, 24, [int(np.floor(j * 29 / 23 + 0.5)) for j in range(24)]),
    ],
)
def test_depth_layer_map(ls, lt, want):
    assert [source_layer_for(j, ls, lt, "depth") for j in range(lt)] == want


@settings(max_examples=100, deadline=None)
@given(ls=st.integers(1, 80), lt=st.integers(2, 80))
def test_depth_layer_map_properties(ls, lt):
    m = [source_layer_for(j, ls, lt, "depth") for j in range(lt)]
    assert m[0] == 0 and m[-1] == ls - 1
    assert all(0 <= x < ls for x in m)
    assert all(a <= b for a, b in zip(m[:-1], m[1:], strict=True))
    # nearest source layer to the proportional position
    for j, x in enumerate(m):
        assert abs(x - j * (ls - 1) / (lt - 1)) <= 0.5 + 1e-9


def test_depth_transfer_uses_the_mapped_source_layers(zoo, tmp_path):
    """llama (3 layers) -> llama_wide (4 layers) with the depth map: target layer j takes source round(j*2/3)."""
    ad = zoo.adapter("llama")
    report = lowmem_crosslora.transfer(ad, zoo.model("llama"), zoo.model("llama_wide"), tmp_path / "out", rank=16, device="cpu", layer_map="depth")
    by_target = {}
    for u in report["units"]:
        by_target.setdefault(u["target_layer"], set()).add(u["source_layer"])
        assert u["source_module"].startswith(f"model.layers.{u['source_layer']}.")
        assert u["target_module"].startswith(f"model.layers.{u['target_layer']}.")
    assert by_target == {0: {0}, 1: {1}, 2: {1}, 3: {2}}
    t = read_tensors(tmp_path / "out" / "adapter_model.safetensors")
    assert len(t) == 2 * 7 * 4
