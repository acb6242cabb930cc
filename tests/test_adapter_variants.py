"""The adapters people actually have: target_modules as a regex, layers_to_transform, bias
'lora_only' / 'all', modules_to_save, and a pickled adapter_model.bin (refused unless --allow-pickle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import INPUT_IDS, read_tensors, run_cli, transfer_args

import lowmem_crosslora
from lowmem_crosslora import InputError


def transfer(zoo: Any, ad: Path, src: str, tgt: str, out: Path, **kw: Any) -> tuple[dict[str, Any], list[str]]:
    msgs: list[str] = []
    report = lowmem_crosslora.transfer(ad, zoo.model(src), zoo.model(tgt), out, rank=16, device="cpu", warn=msgs.append, **kw)
    return report, msgs


def peft_logits(model_dir: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = model(input_ids=INPUT_IDS).logits
        pm = PeftModel.from_pretrained(model, adapter)
        return base, pm(input_ids=INPUT_IDS).logits


def test_target_modules_as_a_regex(zoo: Any, tmp_path: Path) -> None:
    ad = zoo.adapter("llama", "regex", target_modules=r".*\.(q_proj|v_proj|down_proj)")
    assert isinstance(json.loads((ad / "adapter_config.json").read_text())["target_modules"], str)
    report, _ = transfer(zoo, ad, "llama", "qwen2", tmp_path / "out")
    assert {u["module"] for u in report["units"]} == {"q", "v", "down"}
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    base, adapted = peft_logits(zoo.model("qwen2"), tmp_path / "out")
    assert (adapted - base).abs().max() > 1e-4


def test_layers_to_transform(zoo: Any, tmp_path: Path) -> None:
    ad = zoo.adapter("llama", "layer1", layers_to_transform=[1])
    report, _ = transfer(zoo, ad, "llama", "phi3", tmp_path / "out")
    assert {u["target_layer"] for u in report["units"]} == {1}
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    names = read_tensors(tmp_path / "out" / "adapter_model.safetensors")
    assert names and all(".layers.1." in n for n in names)
    base, adapted = peft_logits(zoo.model("phi3"), tmp_path / "out")
    assert (adapted - base).abs().max() > 1e-4


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_deltas_are_skipped_with_a_warning(zoo: Any, tmp_path: Path, bias: str) -> None:
    ad = zoo.adapter("qwen2", f"bias-{bias}", bias=bias)  # qwen2's q, k, v have biases
    biases = [n for n in read_tensors(ad / "adapter_model.safetensors") if n.endswith(".bias")]
    assert biases
    report, msgs = transfer(zoo, ad, "qwen2", "llama", tmp_path / "out")
    reasons = {s["tensor"]: s["reason"] for s in report["skipped"]}
    assert all(n in reasons and "bias" in reasons[n] for n in biases)
    assert any("bias" in m and str(len(biases)) in m for m in msgs)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["bias"] == "none"
    assert not [n for n in read_tensors(tmp_path / "out" / "adapter_model.safetensors") if n.endswith(".bias")]
    base, adapted = peft_logits(zoo.model("llama"), tmp_path / "out")
    assert (adapted - base).abs().max() > 1e-4


def test_modules_to_save_are_skipped_with_a_warning(zoo: Any, tmp_path: Path) -> None:
    ad = zoo.adapter("gpt2", "save_lm_head", modules_to_save=["lm_head"])
    report, msgs = transfer(zoo, ad, "gpt2", "qwen2", tmp_path / "out")
    copies = [s for s in report["skipped"] if "lm_head" in s["tensor"]]
    assert copies and all("modules_to_save" in s["reason"] for s in copies)
    assert any("modules_to_save" in m and "lm_head" in m for m in msgs)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None


def pickled_copy(ad: Path, dst: Path) -> Path:
    shutil.copytree(ad, dst)
    torch.save(read_tensors(dst / "adapter_model.safetensors"), dst / "adapter_model.bin")
    (dst / "adapter_model.safetensors").unlink()
    return dst


def test_pickled_adapter_is_refused_unless_allowed(zoo: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = zoo.adapter("phi3")
    pickled = pickled_copy(ad, tmp_path / "pickled")
    with pytest.raises(InputError, match="--allow-pickle"):
        transfer(zoo, pickled, "phi3", "llama", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    inputs = {"adapter": pickled, "source": zoo.model("phi3"), "target": zoo.model("llama")}
    code, _, err = run_cli(transfer_args(inputs, tmp_path / "cli-refused"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--allow-pickle" in err and "Traceback" not in err
    code, _, err = run_cli(transfer_args(inputs, tmp_path / "cli-allowed", "--allow-pickle"), capsys)
    assert code == 0, err
    transfer(zoo, ad, "phi3", "llama", tmp_path / "safetensors")
    a = read_tensors(tmp_path / "cli-allowed" / "adapter_model.safetensors")
    b = read_tensors(tmp_path / "safetensors" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_adapter_that_is_not_a_state_dict_is_one_clear_line(zoo: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = pickled_copy(zoo.adapter("llama"), tmp_path / "bad")
    (bad / "adapter_model.bin").write_bytes(b"not a pickle at all")
    inputs = {"adapter": bad, "source": zoo.model("llama"), "target": zoo.model("qwen2")}
    code, _, err = run_cli(transfer_args(inputs, tmp_path / "out", "--allow-pickle"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weights_only" in err
