"""phi3, gpt_neox and gpt2 (fused and Conv1D weights) in pairings with llama and qwen2, both ways.

Every transfer is loaded with peft on the target (no missing or unexpected keys, the logits change),
and the sign-free facts of the method are checked per *logical* module (q, k, v, gate, up of a fused
weight each on their own) against an independent float64 computation: the fused layouts are
re-derived here from the models' own conventions (phi3 [Q|K|V] rows, GPT-NeoX's per-head
[q_h|k_h|v_h], GPT-2's Conv1D in x out), not taken from the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import INPUT_IDS, SPECS, read_tensors, read_weight

import lowmem_crosslora

NEW = ("phi3", "gpt_neox", "gpt2")
PAIRS = [(f, o) for f in NEW for o in ("llama", "qwen2")] + [(o, f) for f in NEW for o in ("llama", "qwen2")]
PAIRS += [("phi3", "gpt_neox"), ("gpt_neox", "gpt2"), ("gpt2", "phi3")]

# Where each family keeps its layers, and its modules' paths: fused ones list their parts.
PREFIX = {"phi3": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers"}
PATHS: dict[str, dict[str, tuple[str, ...]]] = {
    "phi3": {"self_attn.qkv_proj": ("q", "k", "v"), "self_attn.o_proj": ("o",), "mlp.gate_up_proj": ("gate", "up"), "mlp.down_proj": ("down",)},
    "gpt_neox": {"attention.query_key_value": ("q", "k", "v"), "attention.dense": ("o",), "mlp.dense_h_to_4h": ("up",), "mlp.dense_4h_to_h": ("down",)},
    "gpt2": {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("up",), "mlp.c_proj": ("down",)},
}
LLAMA_PATHS = {
    "self_attn.q_proj": ("q",),
    "self_attn.k_proj": ("k",),
    "self_attn.v_proj": ("v",),
    "self_attn.o_proj": ("o",),
    "mlp.gate_proj": ("gate",),
    "mlp.up_proj": ("up",),
    "mlp.down_proj": ("down",),
}


def family(name: str) -> str:
    return SPECS[name].family


def paths(name: str) -> dict[str, tuple[str, ...]]:
    return PATHS.get(family(name), LLAMA_PATHS)


def canonical(name: str) -> set[str]:
    return {p for ps in paths(name).values() for p in ps}


def num_layers(name: str) -> int:
    kw = SPECS[name].kwargs
    return int(kw.get("num_hidden_layers", kw.get("n_layer")))


def part_rows(name: str, path: str, total: int) -> dict[str, np.ndarray]:
    """Row indices of each part of a module's (out x in) matrix, from the model's own convention."""
    parts = paths(name)[path]
    if len(parts) == 1:
        return {parts[0]: np.arange(total)}
    kw = SPECS[name].kwargs
    fam = family(name)
    if fam == "gpt_neox":  # GPTNeoXAttention: view(..., heads, 3 * head_size).chunk(3, dim=-1)
        heads = kw["num_attention_heads"]
        hd = total // (3 * heads)
        idx = np.arange(total).reshape(heads, 3, hd)
        return {p: idx[:, i].reshape(-1) for i, p in enumerate(parts)}
    if fam == "phi3" and parts == ("q", "k", "v"):
        hd = kw["hidden_size"] // kw["num_attention_heads"]
        q, kv = kw["num_attention_heads"] * hd, kw["num_key_value_heads"] * hd
        sizes = [q, kv, kv]
    else:  # phi3 gate_up, gpt2 c_attn: equal blocks
        sizes = [total // len(parts)] * len(parts)
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == total
    return {p: np.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(parts)}


def logical_weights(name: str, model_dir: Path, layer: int) -> dict[str, np.ndarray]:
    """Every canonical module's (out x in) float64 weight of one layer."""
    out = {}
    for path in paths(name):
        W = read_weight(model_dir, f"{PREFIX[family(name)]}.{layer}.{path}.weight")
        if family(name) == "gpt2":
            W = W.T  # Conv1D stores (in, out)
        for part, rows in part_rows(name, path, W.shape[0]).items():
            out[part] = W[rows]
    return out


def lora_parts(name: str, adapter: Path, layer: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """(A, B rows of the part, module path) of every canonical module of one layer in an adapter."""
    t = tensors if tensors is not None else read_tensors(adapter / "adapter_model.safetensors")
    out = {}
    for path in paths(name):
        module = f"{PREFIX[family(name)]}.{layer}.{path}"
        key = f"base_model.model.{module}.lora_A.weight"
        if key not in t:
            continue
        A = t[key].double().numpy()
        B = t[f"base_model.model.{module}.lora_B.weight"].double().numpy()
        for part, rows in part_rows(name, path, B.shape[0]).items():
            out[part] = (A, B[rows], module)
    return out


def top_bases(W: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    U, _, Vt = np.linalg.svd(W, full_matrices=False)
    return U[:, :r], Vt[:r].T


def load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def scalings(peft_model: Any) -> dict[str, float]:
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): float(mod.scaling["default"])
        for name, mod in peft_model.named_modules()
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "scaling", {})
    }


def peft_load(model_dir: Path, adapter: Path) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """PeftModel on the model; (peft model, base logits, adapted logits). Fails on missing or unexpected keys."""
    from peft import PeftModel

    model = load(model_dir)
    with torch.no_grad():
        base = model(input_ids=INPUT_IDS).logits.float()
    pm = PeftModel.from_pretrained(model, adapter)
    t = read_tensors(adapter / "adapter_model.safetensors")
    # every written factor is a LoRA parameter of the model, and every LoRA parameter was written
    params = {n.replace(".default", "") for n, _ in pm.named_parameters() if ".lora_" in n}
    assert set(t) == params, (sorted(set(t) - params)[:4], sorted(params - set(t))[:4])
    for n, p in pm.named_parameters():
        if ".lora_" in n:
            assert torch.equal(p.detach().cpu(), t[n.replace(".default", "")].to(p.dtype)), n
    with torch.no_grad():
        adapted = pm(input_ids=INPUT_IDS).logits.float()
    return pm, base, adapted


class Runs:
    def __init__(self, zoo: Any, root: Path) -> None:
        self.zoo, self.root, self.done = zoo, root, {}

    def get(self, src: str, tgt: str, key: str = "default", adapter_kw: dict[str, Any] | None = None, **kw: Any) -> tuple[Path, Path, dict[str, Any]]:
        k = (src, tgt, key, tuple(sorted(kw.items())))
        if k not in self.done:
            ad = self.zoo.adapter(src, key, **(adapter_kw or {}))
            out = self.root / "-".join([src, tgt, key, *map(str, kw.values())])
            options = {"rank": 512, "device": "cpu", "exact_ratio": 0.0, "compute_dtype": "float64", **kw}
            report = lowmem_crosslora.transfer(ad, self.zoo.model(src), self.zoo.model(tgt), out, **options)
            self.done[k] = (ad, out, report)
        return self.done[k]


@pytest.fixture(scope="module")
def runs(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(zoo, tmp_path_factory.mktemp("families"))


_SCALINGS: dict[tuple[Path, Path], dict[str, float]] = {}


def source_scalings(model_dir: Path, adapter: Path) -> dict[str, float]:
    """PEFT's scaling of every module of a source adapter (loaded once per adapter)."""
    key = (model_dir, adapter)
    if key not in _SCALINGS:
        from peft import PeftModel

        _SCALINGS[key] = scalings(PeftModel.from_pretrained(load(model_dir), adapter))
    return _SCALINGS[key]


def check_invariants(zoo: Any, src: str, tgt: str, ad: Path, out: Path, report: dict[str, Any], pm_tgt: Any) -> int:
    """The sign-free facts per logical module of every unit; returns how many were checked."""
    s_scale, t_scale = source_scalings(zoo.model(src), ad), scalings(pm_tgt)
    out_t = read_tensors(out / "adapter_model.safetensors")
    checked = 0
    for u in report["units"]:
        sl, tl, name = u["source_layer"], u["target_layer"], u["module"]
        Ws = logical_weights(src, zoo.model(src), sl)[name]
        Wt = logical_weights(tgt, zoo.model(tgt), tl)[name]
        r = u["r"]
        assert r == min(*Ws.shape, *Wt.shape)
        Us, Vs = top_bases(Ws, r)
        Ut, Vt = top_bases(Wt, r)
        A, B, smod = lora_parts(src, ad, sl)[name]
        At, Bt, tmod = lora_parts(tgt, out, tl, out_t)[name]
        dWs = s_scale[smod] * B @ A
        dWt = t_scale[tmod] * Bt @ At
        assert dWt.shape == Wt.shape
        # columns of B_t in span(U_t) (the rows of B_t that belong to this part), rows of A_t in span(V_t);
        # for a fused target A_t is shared, so the check is on this part's product dW_t
        assert np.linalg.norm(dWt - Ut @ (Ut.T @ dWt)) <= 1e-6 * np.linalg.norm(dWt)
        assert np.linalg.norm(dWt - (dWt @ Vt) @ Vt.T) <= 1e-6 * np.linalg.norm(dWt)
        sv_t = np.linalg.svd(dWt, compute_uv=False)
        sv_ref = np.linalg.svd(Us.T @ dWs @ Vs, compute_uv=False)
        k = min(len(sv_t), len(sv_ref))
        assert np.allclose(sv_t[:k], sv_ref[:k], rtol=1e-5, atol=1e-6 * sv_ref[0]), (u["uid"], sv_t[:4], sv_ref[:4])
        assert np.all(sv_t[k:] <= 1e-6 * sv_ref[0]) and np.all(sv_ref[k:] <= 1e-6 * sv_ref[0])
        assert sv_ref[0] > 0
        checked += 1
    return checked


@pytest.mark.parametrize("src,tgt", PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_pair_loads_in_peft_and_keeps_the_invariants(zoo: Any, runs: Runs, src: str, tgt: str) -> None:
    ad, out, report = runs.get(src, tgt)
    pm_tgt, base, adapted = peft_load(zoo.model(tgt), out)
    assert torch.isfinite(adapted).all()
    assert (adapted - base).abs().max() > 1e-4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is (family(tgt) == "gpt2")
    # every logical module the two families share, in every target layer with a source layer
    shared = canonical(src) & canonical(tgt)
    depth = min(num_layers(src), num_layers(tgt))
    assert {(u["target_layer"], u["module"]) for u in report["units"]} == {(layer, m) for layer in range(depth) for m in shared}
    if "gate" in canonical(src) - shared:
        assert any("has no gate projection" in s["reason"] for s in report["skipped"])
    assert check_invariants(zoo, src, tgt, ad, out, report, pm_tgt) == len(report["units"])


@pytest.mark.parametrize("name", NEW)
def test_self_transfer_at_full_rank_returns_square_parts_unchanged(zoo: Any, runs: Runs, name: str) -> None:
    ad, out, report = runs.get(name, name)
    pm_tgt, _, _ = peft_load(zoo.model(name), out)
    s_scale, t_scale = source_scalings(zoo.model(name), ad), scalings(pm_tgt)
    out_t = read_tensors(out / "adapter_model.safetensors")
    square = 0
    for layer in range(2):
        W = logical_weights(name, zoo.model(name), layer)
        src_parts, tgt_parts = lora_parts(name, ad, layer), lora_parts(name, out, layer, out_t)
        assert set(src_parts) == set(tgt_parts)
        for part, (A, B, smod) in src_parts.items():
            At, Bt, tmod = tgt_parts[part]
            dW, dWt = s_scale[smod] * B @ A, t_scale[tmod] * Bt @ At
            m, n = W[part].shape
            if m == n:
                assert np.allclose(dWt, dW, rtol=0, atol=1e-6 * np.abs(dW).max()), (layer, part)
                square += 1
            else:  # the projection U U^T dW V V^T
                U, V = top_bases(W[part], min(m, n))
                assert np.allclose(dWt, U @ U.T @ dW @ V @ V.T, atol=1e-6 * np.abs(dW).max()), (layer, part)
    assert square >= 4


def test_fused_target_stacks_ranks_and_keeps_each_parts_scale(zoo: Any, runs: Runs) -> None:
    """A source with per-module ranks and alphas (rslora) onto phi3: qkv_proj gets rank 8 + 4 + 8,
    one scale, and each part's delta keeps the scale the source gave it."""
    kw = {"use_rslora": True, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"v_proj": 32, "up_proj": 4}}
    ad, out, report = runs.get("llama", "phi3", "fused-patterned", adapter_kw=kw)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 8
    assert cfg["rank_pattern"]["model.layers.0.self_attn.qkv_proj"] == 20
    assert cfg["rank_pattern"]["model.layers.1.mlp.gate_up_proj"] == 16
    t = read_tensors(out / "adapter_model.safetensors")
    B = t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    assert B.shape == (128, 20)
    # block diagonal: q rows use columns 0..7, k rows 8..11, v rows 12..19
    assert not B[:64, 8:].any() and not B[64:96, :8].any() and not B[64:96, 12:].any() and not B[96:, :12].any()
    pm_tgt, base, adapted = peft_load(zoo.model("phi3"), out)
    assert (adapted - base).abs().max() > 1e-4
    assert check_invariants(zoo, "llama", "phi3", ad, out, report, pm_tgt) == len(report["units"])


def test_fused_target_with_a_part_not_trained_writes_zero_rows(zoo: Any, runs: Runs) -> None:
    ad, out, report = runs.get("qwen2", "gpt_neox", "qv", adapter_kw={"target_modules": ["q_proj", "v_proj"]})
    t = read_tensors(out / "adapter_model.safetensors")
    B = t["base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_B.weight"]
    rows = part_rows("gpt_neox", "attention.query_key_value", B.shape[0])
    assert B.shape[1] == 16
    assert not B[rows["k"]].any() and B[rows["q"]].any() and B[rows["v"]].any()
    pm_tgt, base, adapted = peft_load(zoo.model("gpt_neox"), out)
    assert (adapted - base).abs().max() > 1e-4
    assert check_invariants(zoo, "qwen2", "gpt_neox", ad, out, report, pm_tgt) == len(report["units"])


def test_gpt2_target_adapting_attention_output_only_names_modules_exactly(zoo: Any, runs: Runs) -> None:
    """attn.c_proj and mlp.c_proj share a short name: with only o adapted, the config must not say c_proj."""
    ad, out, _ = runs.get("llama", "gpt2", "o_only", adapter_kw={"target_modules": ["o_proj"]})
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(m.endswith("attn.c_proj") for m in cfg["target_modules"])
    pm, base, adapted = peft_load(zoo.model("gpt2"), out)
    assert (adapted - base).abs().max() > 1e-5
    assert set(scalings(pm)) == {"transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"}


def test_plan_and_inspect_read_the_new_families(zoo: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import run_cli

    code, out, err = run_cli(["inspect", str(zoo.model("gpt_neox")), "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(
        ["plan", "--adapter", str(zoo.adapter("phi3")), "--source", str(zoo.model("phi3")), "--target", str(zoo.model("gpt2")), "--json", "--device", "cpu"],
        capsys,
    )
    assert code == 0, err
    plan = json.loads(out)
    assert {u["module"] for u in plan["units"]} == {"q", "k", "v", "o", "up", "down"}
    assert any("no gate projection" in s["reason"] for s in plan["skipped"])


def test_killed_fused_target_resumes_byte_identical(zoo: Any, tmp_path: Path) -> None:
    """Units of a fused target write rows of shared tensors (gpt_neox: rows interleaved per head):
    a run killed halfway through writing one keeps the units journaled before it (their regions
    verify) and resumes to the same bytes."""
    from bench.crash import command, run_child

    args = command("transfer", "--adapter", str(zoo.adapter("phi3")), "--source", str(zoo.model("phi3")))
    args += ["--target", str(zoo.model("gpt_neox")), "--rank", "16", "--device", "cpu", "--quiet", "--no-cache"]
    ref = tmp_path / "ref"
    assert run_child([*args, "--out", str(ref)], timeout=300).returncode == 0
    out = tmp_path / "out"
    p = run_child([*args, "--out", str(out)], kill="mid_write:4", timeout=300)
    assert p.returncode == -9 and not out.exists()
    p = run_child([*args, "--out", str(out)], timeout=300)
    assert p.returncode == 0, p.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
    report = json.loads((out / "crosslora_report.json").read_text())
    assert report["summary"]["resumed_units"] == 4


def test_batch_onto_a_fused_target_matches_lone_transfers(zoo: Any, runs: Runs, tmp_path: Path) -> None:
    """Two adapters with different ranks per module onto phi3 in one batch: each output has its own
    stacked layout and is byte-identical to that adapter's lone transfer."""
    from lowmem_crosslora.commands.transfer import transfer_batch

    kw = {"use_rslora": True, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"v_proj": 32, "up_proj": 4}}
    alone = [runs.get("llama", "phi3"), runs.get("llama", "phi3", "fused-patterned", adapter_kw=kw)]
    options = {"rank": 512, "device": "cpu", "exact_ratio": 0.0, "compute_dtype": "float64"}
    pairs = [(ad, tmp_path / f"out{i}") for i, (ad, _, _) in enumerate(alone)]
    transfer_batch(pairs, zoo.model("llama"), zoo.model("phi3"), **options)
    for (_, out), (_, ref, _) in zip(pairs, alone, strict=True):
        assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads((ref / "adapter_config.json").read_text())
