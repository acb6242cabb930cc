"""Every transferred adapter loads with peft on the target, changes its logits, and keeps the
source's per-module scale; adapter_config.json and the report say what they must."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import INPUT_IDS, LORA_TARGETS, peft_scale, read_tensors

import lowmem_crosslora

# (source, target, layer map): every family appears, as source or target, and both layer maps.
PAIRS = [
    ("llama", "qwen2", "index"),
    ("qwen2", "llama", "index"),
    ("mistral", "gemma2", "index"),
    ("mistral", "gemma2", "depth"),
    ("gemma", "qwen3", "index"),
    ("qwen3", "gemma3_text", "depth"),
    ("llama", "llama_wide", "index"),
    ("llama", "llama_wide", "depth"),
]
UNIT_FIELDS = {"source_layer", "source_module", "target_layer", "target_module", "source_shape", "target_shape", "r", "energy_retained", "seconds", "device"}


def load_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def lora_modules(peft_model: Any) -> dict[str, Any]:
    """PEFT LoRA layers by module path relative to the base model (model.layers.0.self_attn.q_proj)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "scaling", {}):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def source_scalings(source: Path, adapter: Path) -> dict[str, float]:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(source), adapter)
    return {name: float(mod.scaling["default"]) for name, mod in lora_modules(pm).items()}


class Transfers:
    def __init__(self, zoo: Any, root: Path) -> None:
        self.zoo, self.root, self.cache = zoo, root, {}

    def get(self, src: str, tgt: str, layer_map: str, adapter_key: str = "default", **kw: Any) -> tuple[Path, Path, Path, dict[str, Any]]:
        key = (src, tgt, layer_map, adapter_key, tuple(sorted(kw.items())))
        if key not in self.cache:
            ad = self.zoo.adapter(src, adapter_key, **ADAPTER_VARIANTS[adapter_key])
            out = self.root / "-".join([src, tgt, layer_map, adapter_key, *map(str, kw.values())])
            s, t = self.zoo.model(src), self.zoo.model(tgt)
            report = lowmem_crosslora.transfer(ad, s, t, out, rank=16, device="cpu", layer_map=layer_map, **kw)
            self.cache[key] = (ad, s, t, out, report)
        ad, s, t, out, report = self.cache[key]
        return ad, t, out, report


ADAPTER_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "patterned": {
        "use_rslora": True,
        "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 32, "o_proj": 8},
    },
    "extras": {"target_modules": [*LORA_TARGETS, "lm_head", "embed_tokens"], "modules_to_save": ["model.norm"]},
    "save_lm_head": {"modules_to_save": ["lm_head"]},
}


@pytest.fixture(scope="module")
def transfers(zoo, tmp_path_factory):
    return Transfers(zoo, tmp_path_factory.mktemp("roundtrip"))


def check_loads_and_changes_logits(target: Path, out: Path, report: dict[str, Any], source: Path, adapter: Path) -> dict[str, float]:
    """Load `out` on the target with peft and check it; return the loaded scaling of every module."""
    from peft import PeftModel

    model = load_model(target)
    base = logits(model)
    pm = PeftModel.from_pretrained(model, out)
    pm.eval()
    adapted = logits(pm)
    assert torch.isfinite(adapted).all()
    delta = (adapted - base).abs().max().item()
    assert delta > 1e-3 * max(1.0, base.abs().max().item()), f"logits did not change (max |delta| {delta})"
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm), base)

    # exactly the planned modules carry LoRA, with the bytes of the written file
    mods = lora_modules(pm)
    assert set(mods) == {u["target_module"] for u in report["units"]}
    written = read_tensors(out / "adapter_model.safetensors")
    for name, mod in mods.items():
        a = written[f"base_model.model.{name}.lora_A.weight"]
        b = written[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(mod.lora_A["default"].weight.detach().to(a.dtype), a, rtol=0, atol=0)
        torch.testing.assert_close(mod.lora_B["default"].weight.detach().to(b.dtype), b, rtol=0, atol=0)
        assert b.abs().max() > 0

    # every target module has the effective scale its source module had
    src_scale = source_scalings(source, adapter)
    for u in report["units"]:
        got = float(mods[u["target_module"]].scaling["default"])
        assert got == pytest.approx(src_scale[u["source_module"]], rel=1e-12), u["uid"]
        assert mods[u["target_module"]].r["default"] == u["lora_rank"]
    return {name: float(mod.scaling["default"]) for name, mod in mods.items()}


@pytest.mark.parametrize("src,tgt,layer_map", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_transfer_loads_with_peft_and_changes_logits(transfers, zoo, src, tgt, layer_map):
    ad, target, out, report = transfers.get(src, tgt, layer_map)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "crosslora_report.json"]
    check_loads_and_changes_logits(target, out, report, zoo.model(src), ad)


@pytest.mark.parametrize("src,tgt,layer_map", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_adapter_config_and_report(transfers, zoo, src, tgt, layer_map):
    ad, target, out, report = transfers.get(src, tgt, layer_map)
    cfg = json.loads((out / "adapter_config.json").read_text())
    src_cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(target)
    assert cfg["r"] == src_cfg["r"] == 8
    assert cfg["lora_alpha"] == src_cfg["lora_alpha"] == 16
    assert not cfg.get("modules_to_save")
    assert not cfg.get("use_dora")
    names = set(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else {cfg["target_modules"]}
    # target modules in the target's own (unfused) names
    assert names and all(n.split(".")[-1] in LORA_TARGETS for n in names)

    # the report: one entry per unit, with the fields of issue 2 item 7
    on_disk = json.loads((out / "crosslora_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    units = report["units"]
    ls = json.loads((zoo.model(src) / "config.json").read_text())["num_hidden_layers"]
    lt = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    expected_layers = min(ls, lt) if layer_map == "index" else lt
    assert len(units) == 7 * expected_layers
    assert len({u["uid"] for u in units}) == len(units)
    tensors = read_tensors(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(units)
    for u in units:
        assert UNIT_FIELDS <= set(u), UNIT_FIELDS - set(u)
        assert u["device"] == "cpu"
        assert u["r"] == min(16, *u["source_shape"], *u["target_shape"])
        assert 0.0 < u["energy_retained"] <= 1.0 + 1e-6
        assert u["seconds"] >= 0
        assert u["source_module"].endswith(u["target_module"].split(".", 3)[-1])  # same canonical module
        a = tensors[f"base_model.model.{u['target_module']}.lora_A.weight"]
        b = tensors[f"base_model.model.{u['target_module']}.lora_B.weight"]
        assert tuple(a.shape) == (8, u["target_shape"][1])
        assert tuple(b.shape) == (u["target_shape"][0], 8)
        assert a.dtype == b.dtype == torch.float32  # the source adapter's dtype
    # source layers the index map cannot place are skipped with a reason, never silently
    skipped_layers = {s["tensor"] for s in report["skipped"]}
    if layer_map == "index" and ls > lt:
        assert len(skipped_layers) == 7 * (ls - lt)
        assert all("deeper" in s["reason"] for s in report["skipped"])
    elif layer_map == "index" and ls < lt:
        assert cfg.get("layers_to_transform") == list(range(ls))
    assert report["summary"]["units"] == len(units)
    assert report["summary"]["skipped"] == len(report["skipped"])


@pytest.mark.parametrize("tgt,layer_map", [("qwen2", "index"), ("gemma2", "depth")])
def test_rslora_rank_and_alpha_patterns_keep_every_scale(transfers, zoo, tgt, layer_map):
    ad, target, out, report = transfers.get("llama", tgt, layer_map, "patterned")
    src_cfg = json.loads((ad / "adapter_config.json").read_text())
    assert src_cfg["use_rslora"] and src_cfg["rank_pattern"] and src_cfg["alpha_pattern"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    loaded = check_loads_and_changes_logits(target, out, report, zoo.model("llama"), ad)
    # the scale of each target module, from the source's patterns worked out by hand: alpha / sqrt(r)
    for u in report["units"]:
        name = u["source_module"].split(".")[-1]
        r = 2 if u["source_module"].endswith("layers.1.mlp.down_proj") else 4 if name == "q_proj" else 8
        alpha = {"v_proj": 32, "o_proj": 8}.get(name, 16)
        assert u["lora_rank"] == r
        assert loaded[u["target_module"]] == pytest.approx(alpha / math.sqrt(r), rel=1e-12), u["uid"]
        assert loaded[u["target_module"]] == pytest.approx(peft_scale(r, alpha, True), rel=1e-12)
    # the patterns really are in play (not all scales equal)
    assert len({round(v, 9) for v in loaded.values()}) >= 4


def test_lm_head_embedding_and_modules_to_save_are_skipped_with_reasons(transfers, zoo):
    ad, target, out, report = transfers.get("llama", "qwen2", "index", "extras")
    src_tensors = read_tensors(ad / "adapter_model.safetensors")
    extra = [n for n in src_tensors if "lm_head" in n or "embed_tokens" in n or "norm" in n]
    assert any("lm_head.lora_A" in n for n in extra) and any("embed_tokens" in n for n in extra) and any("model.norm" in n for n in extra)
    reasons = {s["tensor"]: s["reason"] for s in report["skipped"]}
    for name in extra:
        hit = [t for t in reasons if t in name or name.startswith("base_model.model." + t)]
        assert hit, f"{name} is not reported as skipped"
        assert all(reasons[t] for t in hit)
    assert any("lm_head" in t and "transferable" in r for t, r in reasons.items())
    assert any("embed" in t and "embedding" in r for t, r in reasons.items())
    out_tensors = read_tensors(out / "adapter_model.safetensors")
    assert not [n for n in out_tensors if "lm_head" in n or "embed" in n or "norm" in n]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save")
    assert all(n.split(".")[-1] in LORA_TARGETS for n in cfg["target_modules"])
    check_loads_and_changes_logits(target, out, report, zoo.model("llama"), ad)


def test_modules_to_save_lm_head_is_skipped(transfers, zoo):
    ad, target, out, report = transfers.get("gemma", "qwen3", "index", "save_lm_head")
    src_tensors = read_tensors(ad / "adapter_model.safetensors")
    copies = [n for n in src_tensors if "lm_head" in n]
    assert copies
    skipped = {s["tensor"] for s in report["skipped"]}
    assert set(copies) <= skipped
    assert all(s["reason"] for s in report["skipped"])
    assert not [n for n in read_tensors(out / "adapter_model.safetensors") if "lm_head" in n]
    check_loads_and_changes_logits(target, out, report, zoo.model("gemma"), ad)


def test_output_dtype_option_and_sharded_target(zoo, tmp_path):
    ad = zoo.adapter("qwen3")
    target = zoo.model("gemma3_text", sharded=True)
    out = tmp_path / "out"
    report = lowmem_crosslora.transfer(ad, zoo.model("qwen3", sharded=True), target, out, rank=16, device="cpu", dtype="bfloat16")
    tensors = read_tensors(out / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    check_loads_and_changes_logits(target, out, report, zoo.model("qwen3"), ad)
