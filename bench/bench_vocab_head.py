"""What the output projection costs in one refine training step, the vocabulary-blocked log-probability
against the row-chunked one it replaced, and what a softmax restricted to a subset of the vocabulary
would save (issue 16, item 5).

    python -m bench.bench_vocab_head [--targets smollm2-135m,qwen2.5-coder-0.5b] [--compute bfloat16,float32]

For each target and compute dtype, one `lm` training step of refine's shape (8 texts of 96 tokens,
the target's LoRA, gradient checkpointing, logits in recomputed chunks: services/distill.py's
`batch_loss`) is timed whole, then its parts:

- body: the decoder stack forward and backward, the hidden states' gradient a constant;
- head: the whole step minus the body (the vocabulary projection, its log-softmax, their backward),
  as refine computes it (services/head_logprob.py: the vocabulary in blocks, all rows at once);
- head chunked: the same loss the way refine computed it before (a few rows at a time against the
  whole vocabulary, recomputed in the backward pass: `chunked_logprobs` below, kept as the reference);
- head restricted: the same loss with the softmax over a subset of the vocabulary (the batch's own
  tokens plus the K most frequent ids of the texts refine samples, a sampled-softmax bound), timed
  the same way, to show the most such a restriction could save.

Compute dtype "float32" keeps bfloat16 weights and computes in float32 (services/compute.py's
`upcast_model`, the path an AVX2-only CPU takes); "bfloat16" computes in bfloat16 (AMX / AVX512-BF16).
Timings are best of `--reps` after a warm-up, on this machine's threads. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from bench import BENCH
from lowmem_crosslora.services.compute import upcast_model
from lowmem_crosslora.services.distill import (
    LOGIT_CHUNK_BYTES,
    TrainText,
    _causal_parts,
    _logits,
    _pad,
    _scored,
    batch_loss,
    batch_norms,
    hidden,
    token_logprobs_grad,
)
from lowmem_crosslora.services.train_shape import enable_checkpointing


def step_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def chunked_logprobs(head, cap, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """refine's token log-probabilities before services/head_logprob.py: chunks of rows against the
    whole vocabulary, each chunk's logits recomputed in the backward pass."""

    def piece(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(_logits(head, hc, cap), dim=-1).gather(1, tc.unsqueeze(1)).squeeze(1)

    rows = max(8, LOGIT_CHUNK_BYTES // (4 * 4 * head.weight.shape[0]))
    return torch.cat([checkpoint(piece, h[i : i + rows], targets[i : i + rows], use_reentrant=False) for i in range(0, h.shape[0], rows)])


def chunked_loss(model, texts: list[TrainText]) -> torch.Tensor:
    _d, head, cap = _causal_parts(model)
    x, mask = _pad(texts, "cpu")
    h = hidden(model, x, mask)
    ri, ci, _ = _scored(texts, x)
    return -chunked_logprobs(head, cap, h[ri, ci], x[ri, ci + 1]).mean()


def restricted_loss(model, texts: list[TrainText], subset: torch.Tensor) -> torch.Tensor:
    """The `lm` loss with the softmax over `subset` (sorted ids; every label inside it): refine's own
    path for its `head_subset` candidate (services/head_logprob.py with `ids`)."""
    _d, head, cap = _causal_parts(model)
    x, mask = _pad(texts, "cpu")
    h = hidden(model, x, mask)
    ri, ci, _ = _scored(texts, x)
    return -token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1], subset).mean()


def measure(target: Path, compute: str, batch: int, tokens: int, keep: int, reps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.bfloat16)
    if compute == "float32":
        upcast_model(base)
    enable_checkpointing(base)
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=mods, lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    vocab = int(model.get_output_embeddings().weight.shape[0]) if hasattr(model, "get_output_embeddings") else 0
    g = torch.Generator().manual_seed(0)
    # Zipf-like ids (text is dominated by frequent tokens): the subset question depends on it.
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = (1 / ranks) / (1 / ranks).sum()
    ids = torch.multinomial(probs, batch * tokens, replacement=True, generator=g).view(batch, tokens)
    texts = [TrainText(ids[i].tolist(), 1, [-1] * (tokens - 1), [], "adapter", 4 * tokens) for i in range(batch)]
    norm = batch_norms("lm", texts, [])

    def full() -> None:
        loss, _ = batch_loss(model, "lm", texts, [], norm, "cpu", 0.0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def body() -> None:
        x = ids
        h = hidden(model, x, torch.ones_like(x))
        (h.float() * 1e-3).sum().backward()
        model.zero_grad(set_to_none=True)

    subset = torch.unique(torch.cat([ids.flatten(), torch.arange(min(keep, vocab))]))

    def chunked() -> None:
        chunked_loss(model, texts).backward()
        model.zero_grad(set_to_none=True)

    def restricted() -> None:
        restricted_loss(model, texts, subset).backward()
        model.zero_grad(set_to_none=True)

    t_full, t_body, t_chunk, t_restr = (step_seconds(f, reps) for f in (full, body, chunked, restricted))
    return {
        "target": target.name,
        "compute": compute,
        "vocab": vocab,
        "tokens_per_step": batch * tokens,
        "step_s": round(t_full, 3),
        "body_s": round(t_body, 3),
        "head_s": round(t_full - t_body, 3),
        "head_share": round((t_full - t_body) / t_full, 3),
        "chunked_step_s": round(t_chunk, 3),
        "chunked_head_s": round(t_chunk - t_body, 3),
        "blocked_speedup_of_step": round(t_chunk / t_full, 3),
        "restricted_subset": int(subset.numel()),
        "restricted_step_s": round(t_restr, 3),
        "restricted_saves": round(1 - t_restr / t_full, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--targets", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--compute", default="bfloat16,float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--keep", type=int, default=8192, help="the restricted softmax's frequent ids (plus the batch's own)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "vocab-head-cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for t in args.targets.split(","):
        if not (args.data / t / "config.json").exists():
            raise SystemExit(f"{args.data / t} is missing: run `pip install gguf && python -m bench.fetch_models` first")
        for c in args.compute.split(","):
            rows.append(measure(args.data / t, c, args.batch, args.tokens, args.keep, args.reps))
            print(rows[-1], flush=True)
    print("| target | compute | vocabulary | step s | body s | head s (share) | before: step s, head s | restricted softmax: ids, step s, saved |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['target']} | {r['compute']} | {r['vocab']} | {r['step_s']} | {r['body_s']} | {r['head_s']} ({100 * r['head_share']:.0f}%) "
            f"| {r['chunked_step_s']}, {r['chunked_head_s']} "
            f"| {r['restricted_subset']}, {r['restricted_step_s']}, {100 * r['restricted_saves']:.0f}% |"
        )
    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    out = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
