"""The LoRA the real-model benchmarks train on an adapter's own data (bench_verify, bench_refine).

A rank-16 LoRA (alpha 32) on all seven projections, trained with the causal LM loss on batches of
`batch` texts drawn by a seeded permutation, padded right and masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def attach_lora(model: Any, rank: int = 16, alpha: int = 32) -> Any:
    """`model` wrapped by peft with a fresh LoRA on LORA_MODULES; its trainable weights in float32
    (a bfloat16 base keeps its own dtype)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_MODULES, lora_dropout=0.0, task_type="CAUSAL_LM"))
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return pm


def encode(tok: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (its first `max_tokens`) behind the tokenizer's usual prefix."""
    from lowmem_crosslora.services.probes import prefix_ids

    pre = prefix_ids(tok)
    return [pre + tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]


def train_lm(pm: Any, enc: Sequence[list[int]], steps: int, lr: float, seed: int, batch: int = 8) -> list[float]:
    """`steps` AdamW steps of the LM loss on batches of `enc`; the loss of each step, rounded."""
    import torch

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    pm.train()
    for _ in range(steps):
        idx = torch.randperm(len(enc), generator=g)[:batch].tolist()
        T = max(len(enc[i]) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, : len(enc[i])] = torch.tensor(enc[i])
            mask[r, : len(enc[i])] = 1
        loss = pm(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    return losses
