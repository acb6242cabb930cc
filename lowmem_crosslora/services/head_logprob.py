"""log p(token) through a frozen output projection, one block of the vocabulary at a time.

refine's losses need, for each scored position, the log-probability of one token: log_softmax over
the whole vocabulary (49k to 260k entries), then one entry of it. Made the plain way, every chunk of
rows multiplies by the whole projection: with a large vocabulary and weights stored in bfloat16 but
computed in float32 (services/compute.py's upcast path, the one CPUs without bfloat16 instructions
take) that widens the whole projection again for every chunk of rows, three times a step (forward,
recomputation, backward): 60 GB of memory traffic a step for Qwen2.5's 151,936 x 896 head
(bench/bench_vocab_head.py measures it).

`HeadLogProb` instead walks the vocabulary in blocks with every row at once: the forward pass keeps a
running maximum and sum of exponentials per row (an online log-sum-exp) and picks each row's token
logit from the block that holds it; the backward pass walks the blocks again, recomputing each
block's logits, and adds (one-hot - softmax) @ W_block into the rows' gradient, with the block
widened once for both. So each block of the projection is read (and widened) twice a step, whatever
the number of rows, and no (rows x vocab) matrix ever exists: the working memory is one block of
logits, (rows x block) floats, kept under `block_bytes`. Results equal log_softmax(h @ W.T)[token] up to float rounding (tests/test_head_logprob.py,
against float64).
"""

from __future__ import annotations

from typing import Any

import torch

from lowmem_crosslora.services.compute import UPCAST_BLOCK_BYTES, UpcastLinear, widen


def _block_logits(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cap: float | None, wide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of rows `h` against a block `w` of the projection (soft-capped where the model
    caps them), and the cap's derivative (None without a cap). `wide`: multiply in float32 (`w` is
    widened here unless it is float32 already)."""
    z = (h.float() @ widen(w).T) if wide else (h @ w.T).float()
    if bias is not None:
        z = z + bias.float()
    if cap:
        t = torch.tanh(z / cap)
        return t * cap, 1 - t * t
    return z, None


class HeadLogProb(torch.autograd.Function):
    """Per-row log-probability of `tokens` under log_softmax(h @ W.T + b) (soft-capped), W frozen."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: torch.Tensor, cap: float | None, wide: bool, block: int
    ) -> torch.Tensor:
        rows = h.shape[0]
        run_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=h.device)
        run_sum = torch.zeros(rows, dtype=torch.float32, device=h.device)
        picked = torch.zeros(rows, dtype=torch.float32, device=h.device)
        vocab = weight.shape[0]
        for s in range(0, vocab, block):
            e = min(vocab, s + block)
            z, _ = _block_logits(h, weight[s:e], None if bias is None else bias[s:e], cap, wide)
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
            run_max = new_max
            inside = (tokens >= s) & (tokens < e)
            if bool(inside.any()):
                idx = inside.nonzero().squeeze(1)
                picked[idx] = z[idx, tokens[idx] - s]
            del z
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(h, weight, bias, tokens, lse)
        ctx.cap, ctx.wide, ctx.block = cap, wide, block
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, bias, tokens, lse = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("HeadLogProb is for a frozen output projection")
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        g = grad.float()
        gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        vocab = weight.shape[0]
        for s in range(0, vocab, ctx.block):
            e = min(vocab, s + ctx.block)
            # Widened once for both uses (the block's logits and the gradient): nothing widens in between.
            w = widen(weight[s:e]) if ctx.wide else weight[s:e]
            z, dcap = _block_logits(h, w, None if bias is None else bias[s:e], ctx.cap, ctx.wide)
            dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])  # d(log p_token)/dz_j = onehot_j - softmax_j
            del z
            inside = (tokens >= s) & (tokens < e)
            if bool(inside.any()):
                idx = inside.nonzero().squeeze(1)
                dz[idx, tokens[idx] - s] += g[idx]
            if dcap is not None:
                dz.mul_(dcap)
            gh += (dz @ w) if ctx.wide else (dz.to(w.dtype) @ w).float()
            del dz
        return gh.to(h.dtype), None, None, None, None, None, None


def head_logprob(head: Any, cap: float | None, h: torch.Tensor, tokens: torch.Tensor, block_bytes: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(tokens[i]) for each row of hidden states `h` (N x H) through the output projection
    `head` (an nn.Linear, frozen; UpcastLinear computes in float32), with gradients for `h`. Blocks of
    the vocabulary are sized so that one block's logits and their exponentials, (N x block) float32
    each, stay within `block_bytes`, and a widened block of the projection within UPCAST_BLOCK_BYTES.

    `ids` (sorted, distinct; every token among them): the softmax over those rows of the projection
    only, not the whole vocabulary (a benchmark candidate: it changes the loss, since the tokens left
    out are never pushed down; bench/bench_vocab_head.py times it)."""
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    weight = head.weight
    bias = getattr(head, "bias", None)
    if ids is not None:
        pos = torch.searchsorted(ids, tokens)
        if bool((pos >= len(ids)).any()) or not bool((ids[pos.clamp(max=len(ids) - 1)] == tokens).all()):
            raise ValueError("head_logprob: a token is outside the vocabulary subset `ids`")
        weight, bias, tokens = weight[ids], None if bias is None else bias[ids], pos
    wide = isinstance(head, UpcastLinear) or h.dtype == torch.float32
    block = max(64, block_bytes // (3 * 4 * h.shape[0]))
    if wide and weight.dtype != torch.float32:  # a widened block of the projection stays within the upcast path's block
        block = min(block, max(64, UPCAST_BLOCK_BYTES // (4 * weight.shape[1])))
    return HeadLogProb.apply(h, weight, bias, tokens, cap, wide, block)
