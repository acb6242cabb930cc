"""The PEFT adapter_config.json of an output adapter."""

from __future__ import annotations

from typing import Any

from lowmem_crosslora.io.adapter import Adapter
from lowmem_crosslora.services.plan import Plan


def adapter_config(plan: Plan, ad: Adapter, target_name: str) -> dict[str, Any]:
    """A PEFT LoraConfig for the target: same r, alpha and per-module scales as the source."""
    src = ad.config
    return {
        "alpha_pattern": plan.alpha_pattern,
        "base_model_name_or_path": target_name,
        "bias": "none",
        "fan_in_fan_out": plan.fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": plan.layers_to_transform,
        "lora_alpha": plan.out_alpha if plan.out_alpha != int(plan.out_alpha) else int(plan.out_alpha),
        "lora_dropout": float(src.get("lora_dropout", 0.0) or 0.0),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": plan.out_rank,
        "rank_pattern": plan.rank_pattern,
        "revision": None,
        "target_modules": plan.target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": plan.use_rslora,
    }
