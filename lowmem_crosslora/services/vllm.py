"""`--for vllm`: an adapter vLLM loads as it is.

vLLM reads one `r` and one `lora_alpha` for the whole adapter (it ignores PEFT's rank_pattern and
alpha_pattern), refuses modules_to_save and biases, and by default serves ranks up to 16
(`--max-lora-rank`). So the output is written with one rank R, the largest any target module needs
(a fused module needs the sum of its parts' ranks), and one alpha: every module of lower rank is
padded with zero rows of A and zero columns of B, which changes nothing in B A, and the ratio of the
module's own scale to the written one is folded into B. The result is exact: each module's
s B A is what the ordinary output would give. Module names are the target's own (vLLM packs
q/k/v and gate/up itself for unfused families, and expects phi3's fused qkv_proj / gate_up_proj
under those names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from lowmem_crosslora.architectures import Family
from lowmem_crosslora.io.adapter import Adapter


class RankedUnit(Protocol):
    """What the rule reads of a plan's unit (services/plan.py's Unit)."""

    module: str
    target_module: str
    rank: int


# The ranks vLLM accepts for --max-lora-rank.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Families whose vLLM model classes have not, as far as we know, declared LoRA support.
NO_VLLM_LORA = ("gpt2", "gpt_neox")


def uniform_rank_alpha(units: Sequence[RankedUnit], family: Family, adapter: Adapter, warnings: list[str]) -> tuple[int, float]:
    """The one (r, lora_alpha) of a vLLM output: r the largest rank a target module needs, alpha
    such that alpha / r is the source adapter's default scale. Appends a warning when r needs
    vLLM's --max-lora-rank."""
    need: dict[str, int] = {}
    for u in units:
        if family.modules[u.module] in family.fused:
            need[u.target_module] = need.get(u.target_module, 0) + u.rank
        else:
            need[u.target_module] = u.rank
    R = max(need.values())
    scale = adapter.scale_for(adapter.default_rank, adapter.default_alpha)
    alpha = scale * R
    if alpha == int(alpha):
        alpha = float(int(alpha))
    if R > VLLM_DEFAULT_MAX_LORA_RANK:
        fit = next((m for m in VLLM_MAX_LORA_RANKS if m >= R), R)
        warnings.append(
            f"vllm: this adapter has rank {R}, above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; start vLLM with --max-lora-rank {fit}"
        )
    if family.name in NO_VLLM_LORA:
        warnings.append(f"vllm: vLLM may not serve LoRA adapters on {family.name} models; check its supported-models table (LoRA column) first")
    return R, alpha
