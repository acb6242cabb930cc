"""The LoRA refine trains on the target: its PEFT config, attaching it (fresh and seeded, or from the
transfer), its parameter count, its tensors under PEFT's names, and the batch order of its steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.adapter import Adapter, check_all_finite, check_finite, is_plain_lora, load_behaviour_adapter
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.options import RefineOptions
from lowmem_crosslora.services.probes import stable_seed


def batch_indices(n: int, batch: int, seed: int, step: int, salt: str) -> list[int]:
    """The texts of step `step`: epochs of seeded permutations, read `batch` at a time. A pure
    function of its arguments, so a resumed run draws exactly the batches it would have drawn."""
    if n == 0:
        return []
    out = []
    pos = step * batch
    for k in range(pos, pos + batch):
        epoch, i = divmod(k, n)
        g = torch.Generator().manual_seed(stable_seed("refine-batch", salt, seed, epoch))
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def lora_config(cfg: dict[str, Any], opts: RefineOptions) -> dict[str, Any]:
    cfg = dict(cfg)
    cfg["lora_dropout"] = 0.0  # deterministic and resumable: no random masks
    cfg["inference_mode"] = False
    if opts.lora_rank is not None:
        cfg["r"], cfg["rank_pattern"] = opts.lora_rank, {}
    if opts.lora_alpha is not None:
        cfg["lora_alpha"], cfg["alpha_pattern"] = opts.lora_alpha, {}
    return cfg


def attach_lora(base: Any, cfg: dict[str, Any], init_dir: Path | None, seed: int) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_dir is not None:
        model = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
    else:
        keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
        torch.manual_seed(stable_seed("refine-init", seed))
        model = get_peft_model(base, LoraConfig(**keep))
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if "lora_" not in n:
            p.requires_grad_(False)
    return model


def lora_param_count(plan: Any, cfg: dict[str, Any]) -> int:
    """LoRA parameters on the target (an over-estimate for fused targets, whose parts share one A)."""
    n = 0
    for u in plan.units:
        r = cfg["r"] if not cfg.get("rank_pattern") else u.rank
        m, k = u.target_shape
        n += r * (m + k)
    return n


def peft_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved names (base_model.model.<module>.lora_A.weight), float32."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(sd.items())}


def source_adapter(adapter: Any, src: Checkpoint, init: str) -> Adapter:
    """The adapter refine learns from: any type the source runs through PEFT (io/adapter.py's
    BEHAVIOUR_TYPES); only a plain LoRA can start from the SVD transfer (--init transfer)."""
    plain = is_plain_lora(adapter)
    if init == "transfer" and not plain:
        raise InputError("--init transfer starts from the SVD transfer, which moves plain LoRA adapters only; use the default fresh start for this adapter")

    def shape_of(module: str) -> tuple[int, int] | None:
        name = f"{module}.weight"
        if not src.has(name):
            return None
        shape = src.info(name).shape
        return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None

    ad = load_behaviour_adapter(adapter, shape_of)
    if plain:
        check_finite(ad)
    else:
        check_all_finite(ad)
    return ad
