"""Real GGUF models (opt-in: `pytest -m realmodels`; fetch them first with `python -m bench.fetch_gguf`).

A LoRA built with peft on SmolLM2-135M-Instruct (loaded through transformers' GGUF loader) is
transferred from the SmolLM2 GGUF to the Qwen2.5-Coder-0.5B-Instruct GGUF; the PEFT output must load
on transformers' Qwen model (from the GGUF) and change its logits, and the LoRA GGUF must read back
with gguf's reader with llama.cpp's names and shapes. Skipped cleanly when the files are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.realmodels

REAL = Path(__file__).resolve().parents[1] / "bench" / "data" / "real"
SMOL = REAL / "smollm2-135m-instruct.gguf"
QWEN = REAL / "qwen2.5-coder-0.5b-instruct.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


@pytest.fixture(scope="module")
def real() -> dict[str, Path]:
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    if not (SMOL.exists() and QWEN.exists()):
        pytest.skip("real GGUF models absent: run python -m bench.fetch_gguf")
    return {"smol": SMOL, "qwen": QWEN}


def load_gguf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_adapter(real: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    model = load_gguf_model(real["smol"])
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    out = tmp_path_factory.mktemp("smol-lora") / "adapter"
    pm.save_pretrained(out)
    return out


def test_smol_gguf_reads_like_transformers(real: dict[str, Path]) -> None:
    """Every q..down weight, q and k included (un-permuted), equals transformers' GGUF loader's."""
    from lowmem_crosslora.io.gguf_model import GGUFCheckpoint

    sd = load_gguf_model(real["smol"]).state_dict()
    ck = GGUFCheckpoint(real["smol"])
    for layer in (0, 17, 29):
        for mod in GGUF_NAMES:
            name = ck.weight_name(layer, mod)
            assert torch.equal(ck.read(name).float(), sd[name]), name


def test_smol_to_qwen_gguf(real: dict[str, Path], smol_adapter: Path, tmp_path: Path) -> None:
    import gguf
    from peft import PeftModel

    import lowmem_crosslora

    out = tmp_path / "lora-on-qwen"
    report = lowmem_crosslora.transfer(smol_adapter, real["smol"], real["qwen"], out, rank=64, device="cpu", use_cache=False, out_format="both")
    assert len(report["units"]) == 24 * 7  # Qwen has 24 layers, SmolLM2 30: layer map 'index'
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_model.gguf").exists()

    qwen = load_gguf_model(real["qwen"])
    ids = torch.tensor([[151644, 872, 198, 7985, 264, 729, 304, 13027, 13, 151645]])
    with torch.no_grad():
        base = qwen(ids).logits
        pm = PeftModel.from_pretrained(qwen, str(out))
        adapted = pm(ids).logits
    assert torch.isfinite(adapted).all()
    assert (adapted - base).abs().max().item() > 1e-3

    reader = gguf.GGUFReader(out / "adapter_model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    base_shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(real["qwen"]).tensors}
    got = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert len(got) == 2 * 24 * 7
    for layer in range(24):
        for gname in GGUF_NAMES.values():
            w = f"blk.{layer}.{gname}.weight"
            ne0, ne1 = base_shapes[w]
            assert got[w + ".lora_a"] == [ne0, 8], w  # ne: [in, rank]
            assert got[w + ".lora_b"] == [8, ne1], w  # ne: [rank, out]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16


def _llama_cpp_logits(model: Path, lora: Path | None, text: bytes) -> tuple[list[int], torch.Tensor]:
    import numpy as np
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora is not None else {}
    llm = Llama(model_path=str(model), n_ctx=128, logits_all=True, verbose=False, n_threads=2, **kw)
    toks = llm.tokenize(text, add_bos=False)
    llm.eval(toks)
    scores = torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))
    del llm
    return toks, scores


@pytest.mark.parametrize("case", ["qwen-target", "llama-target-qk"])
def test_llama_cpp_applies_the_lora_gguf_as_peft_does(real: dict[str, Path], tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp (llama-cpp-python) loads adapter_model.gguf and changes the logits as transformers +
    PEFT change them with adapter_model.safetensors. The llama target with a q/k-only adapter checks
    the lora_b row permutation against a control written without it. (llama.cpp's quantized
    matmuls move the base logits by ~1.5 on SmolLM2, the size of a q/k-only delta, so there the
    correlation is lower: measured 0.62 permuted, -0.26 unpermuted.)"""
    pytest.importorskip("llama_cpp")
    from peft import LoraConfig, PeftModel, get_peft_model

    import lowmem_crosslora

    targets = TARGETS if case == "qwen-target" else ["q_proj", "k_proj"]
    smol = load_gguf_model(real["smol"])
    torch.manual_seed(1)
    pm = get_peft_model(smol, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "ad")
    target = real["qwen"] if case == "qwen-target" else real["smol"]
    out = tmp_path / "out"
    lowmem_crosslora.transfer(tmp_path / "ad", real["smol"], target, out, rank=64, device="cpu", use_cache=False, out_format="both")

    text = b"def fibonacci(n):\n    return n if n < 2 else"
    toks, base_cpp = _llama_cpp_logits(target, None, text)
    _, lora_cpp = _llama_cpp_logits(target, out / "adapter_model.gguf", text)
    hf = load_gguf_model(target)
    ids = torch.tensor([toks])
    with torch.no_grad():
        base_hf = hf(ids).logits[0]
        lora_hf = PeftModel.from_pretrained(hf, str(out))(ids).logits[0]
    d_cpp, d_hf = (lora_cpp - base_cpp).flatten(), (lora_hf - base_hf).flatten()
    corr = float(torch.corrcoef(torch.stack([d_cpp, d_hf]))[0, 1])
    assert d_hf.abs().max() > 0.05, float(d_hf.abs().max())  # the adapter does something
    if case == "qwen-target":
        assert corr > 0.95, corr
        return
    import lowmem_crosslora.io.gguf_lora as gl

    entries = gl.entries_for_file(out / "adapter_model.safetensors", alpha=16)
    monkeypatch.setattr(gl, "PERMUTED", frozenset())
    gl.write_lora_gguf(tmp_path / "unpermuted.gguf", out / "adapter_model.safetensors", entries, arch="llama", alpha=16, num_heads=9, num_kv_heads=3)
    _, wrong = _llama_cpp_logits(target, tmp_path / "unpermuted.gguf", text)
    corr_wrong = float(torch.corrcoef(torch.stack([(wrong - base_cpp).flatten(), d_hf]))[0, 1])
    assert corr > 0.5 and corr > corr_wrong + 0.5, (corr, corr_wrong)
