"""`--for vllm`: one r and lora_alpha for every module, exactly the same adapter otherwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import INPUT_IDS, read_tensors, run_cli, transfer_args

import lowmem_crosslora

PATTERNED = {"use_rslora": True, "rank_pattern": {"k_proj": 4, "layers.1.mlp.down_proj": 2}, "alpha_pattern": {"v_proj": 32, "o_proj": 8}}


def logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return pm(input_ids=INPUT_IDS).logits


@pytest.mark.parametrize("tgt,rank", [("qwen2", 8), ("phi3", 20)])
def test_vllm_output_is_uniform_and_exact(zoo: Any, tmp_path: Path, tgt: str, rank: int) -> None:
    ad = zoo.adapter("llama", "vllm-patterned", **PATTERNED)
    kw = {"rank": 16, "device": "cpu", "dtype": "float32"}
    lowmem_crosslora.transfer(ad, zoo.model("llama"), zoo.model(tgt), tmp_path / "peft", **kw)
    msgs: list[str] = []
    lowmem_crosslora.transfer(ad, zoo.model("llama"), zoo.model(tgt), tmp_path / "vllm", target_format="vllm", warn=msgs.append, **kw)
    cfg = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["use_rslora"] is False and cfg["modules_to_save"] is None and cfg["bias"] == "none"
    # the source's default scale, alpha / sqrt(r) with rslora: 16 / sqrt(8)
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(16 / 8**0.5)
    t = read_tensors(tmp_path / "vllm" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in t.items() if "lora_A" in k} == {rank}
    assert {v.shape[1] for k, v in t.items() if "lora_B" in k} == {rank}
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["rank_pattern"]  # the ordinary output needed patterns: the rescaling is in play
    a, b = logits(zoo.model(tgt), tmp_path / "peft"), logits(zoo.model(tgt), tmp_path / "vllm")
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert (rank > 16) == any("--max-lora-rank 32" in m for m in msgs)


def test_cli_for_vllm(zoo: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = {"adapter": zoo.adapter("gpt_neox"), "source": zoo.model("gpt_neox"), "target": zoo.model("phi3")}
    code, _, err = run_cli(transfer_args(inputs, tmp_path / "out", "--for", "vllm"), capsys)
    assert code == 0, err
    assert "--max-lora-rank 32" in err  # qkv_proj stacks q, k and v: rank 24
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 24 and cfg["rank_pattern"] == {}
    code, _, err = run_cli(transfer_args(inputs, tmp_path / "bad", "--for", "tgi"), capsys)
    assert code == 2
