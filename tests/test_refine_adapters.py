"""refine learns from any adapter the source runs through PEFT (DoRA, IA3, LoHa, LoKr), writing a plain
LoRA on the target; the SVD transfer keeps refusing them, and says that refine can carry them.

Tiny models of tests/helpers.py (a llama source with a character tokenizer, a qwen2 target with a
merge tokenizer); every refine runs two steps on a few short probe texts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import read_tensors, run_cli
from helpers import FAST_REFINE, write_llama, write_qwen2

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowmem_crosslora.commands.refine import run_refine  # noqa: E402
from lowmem_crosslora.errors import InputError  # noqa: E402
from lowmem_crosslora.io.adapter import is_plain_lora, load_behaviour_adapter  # noqa: E402
from lowmem_crosslora.io.safetensors_model import Checkpoint  # noqa: E402

FAST = FAST_REFINE


def peft_config(kind: str) -> Any:
    import peft

    modules = ["q_proj", "o_proj"]
    if kind == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, use_dora=True, init_lora_weights=False, task_type="CAUSAL_LM")
    if kind == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False, task_type="CAUSAL_LM")
    if kind == "loha":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=modules, init_weights=False, task_type="CAUSAL_LM")
    return peft.LoKrConfig(r=4, alpha=8, target_modules=modules, init_weights=False, task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("refine-adapters")
    source, target = write_llama(root / "llama"), write_qwen2(root / "qwen2")
    out = {"root": root, "source": source, "target": target}
    for k, kind in enumerate(("dora", "ia3", "loha", "lokr")):
        torch.manual_seed(20 + k)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(source), peft_config(kind))
        if kind == "ia3":  # IA3 starts as the identity: make it change something
            for n, p in model.named_parameters():
                if "ia3_l" in n:
                    p.data = 1.0 + 0.5 * torch.randn_like(p)
        model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["dora", "ia3", "loha", "lokr"])
def test_reader_names_the_adapted_modules(models: dict[str, Path], kind: str) -> None:
    src = Checkpoint(models["source"], "source")
    assert not is_plain_lora(models[kind])
    ad = load_behaviour_adapter(models[kind], lambda m: tuple(src.info(f"{m}.weight").shape) if src.has(f"{m}.weight") else None)
    leaves = {m.rsplit(".", 1)[-1] for m in ad.modules}
    assert leaves == ({"k_proj", "down_proj"} if kind == "ia3" else {"q_proj", "o_proj"})
    assert {int(m.split(".")[2]) for m in ad.modules} == {0, 1}  # both layers
    for mod in ad.modules.values():
        w = src.info(f"{mod.module}.weight").shape
        assert mod.b_shape[0] == w[0] and mod.a_shape[1] == w[1] and mod.a_shape[0] == mod.b_shape[1] == mod.rank
        assert mod.rank == (8 if kind == "ia3" else 4)
    assert any("plain LoRA" in w for w in ad.warnings)


@pytest.mark.parametrize("kind", ["dora", "ia3", "loha", "lokr"])
def test_refine_writes_a_plain_lora_the_target_loads(models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    report = run_refine(models["source"], models[kind], models["target"], out, cache_dir=str(tmp_path / "cache"), **FAST)
    assert report["kind"] == "refine"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not cfg["use_dora"]
    tensors = read_tensors(out / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["target"]), str(out))
    x = torch.tensor([[1, 40, 50, 60]])
    assert torch.isfinite(model(x).logits).all()


@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_transfer_refuses_and_points_to_refine(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    args = ["transfer", "--adapter", str(models[kind]), "--source", str(models["source"]), "--target", str(models["target"])]
    code, _out, err = run_cli([*args, "--out", str(tmp_path / "out"), "--device", "cpu", "--no-cache"], capsys)
    assert code == 2 and "refine" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_transfer_init_needs_a_plain_lora(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="plain LoRA"):
        run_refine(models["source"], models["loha"], models["target"], tmp_path / "out", init="transfer", **FAST)
    assert not (tmp_path / "out").exists()
