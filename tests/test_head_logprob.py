"""log p(token) through the output projection in vocabulary blocks (services/head_logprob.py) equals
log_softmax(h @ W.T + b)[token] computed whole in float64, in value and in h's gradient, for every
block size, stored dtype, soft cap and placement of the tokens (block edges included)."""

from __future__ import annotations

import pytest
import torch

from lowmem_crosslora.services.compute import UpcastLinear
from lowmem_crosslora.services.distill import token_logprobs_grad
from lowmem_crosslora.services.head_logprob import HeadLogProb, head_logprob


def reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tokens: torch.Tensor, cap: float | None, g: torch.Tensor):
    h64 = h.detach().double().requires_grad_(True)
    z = h64 @ w.double().T
    if b is not None:
        z = z + b.double()
    if cap:
        z = torch.tanh(z / cap) * cap
    lp = torch.log_softmax(z, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    (lp * g.double()).sum().backward()
    return lp.detach(), h64.grad


@pytest.mark.parametrize("block", [7, 64, 300, 1000])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
def test_blocks_equal_the_whole_softmax_in_float64(block: int, cap: float | None, bias: bool) -> None:
    g = torch.Generator().manual_seed(block + int(cap or 0) * 10 + int(bias))
    rows, hid, vocab = 13, 24, 300
    h = torch.randn(rows, hid, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = torch.randn(vocab, hid, generator=g) / hid**0.5 * 3
    b = torch.randn(vocab, generator=g) if bias else None
    # Tokens at both ends of the vocabulary and at block edges.
    tokens = torch.tensor([0, vocab - 1, min(block, vocab) - 1, min(block, vocab - 1), 1, 2, 150, 299, 64, 63, 7, 6, 100])
    grad = torch.randn(rows, generator=g)
    lp = HeadLogProb.apply(h, w, b, tokens, cap, True, block)
    lp.backward(grad)
    ref, ref_grad = reference(h, w, b, tokens, cap, grad)
    assert torch.allclose(lp.double(), ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(h.grad.double(), ref_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_the_upcast_head_and_the_plain_head_agree_with_float64(stored: torch.dtype) -> None:
    """A bfloat16 head computing in float32 (the path of CPUs without bfloat16 instructions) matches
    float64 on the bfloat16-rounded weights; a float32 head matches it too."""
    g = torch.Generator().manual_seed(3)
    rows, hid, vocab = 40, 32, 5000
    lin = torch.nn.Linear(hid, vocab, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(vocab, hid, generator=g) / hid**0.5)
    lin = lin.to(stored).requires_grad_(False)
    if stored == torch.bfloat16:
        lin.__class__ = UpcastLinear
    h = torch.randn(rows, hid, generator=g).requires_grad_(True)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    grad = torch.ones(rows)
    lp = head_logprob(lin, None, h, tokens, block_bytes=4096)  # small blocks: many of them
    lp.backward(grad)
    ref, ref_grad = reference(h, lin.weight.float(), None, tokens, None, grad)
    assert torch.allclose(lp.double(), ref, atol=5e-5)
    assert torch.allclose(h.grad.double(), ref_grad, atol=5e-5)


def test_a_bfloat16_head_matches_the_head_module_itself() -> None:
    """On the bfloat16 path (no upcast) the logits are the head module's own bfloat16 products widened:
    the blocked result equals log_softmax(head(h).float()) to float32 rounding."""
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(16, 777, bias=False).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(9, 16, generator=g).to(torch.bfloat16)
    tokens = torch.randint(0, 777, (9,), generator=g)
    whole = torch.log_softmax(lin(h).float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(token_logprobs_grad(lin, None, h, tokens), whole, atol=1e-5)


def test_no_rows_and_a_frozen_head() -> None:
    lin = torch.nn.Linear(8, 50, bias=False)
    assert head_logprob(lin, None, torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), 1024).shape == (0,)
    h = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="frozen"):
        head_logprob(lin, None, h, torch.tensor([1, 2, 3]), 1024).sum().backward()


def test_each_block_is_widened_once_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upcast path widens each block of a bfloat16 projection once in the forward pass and once in
    the backward pass (its logits and the gradient share the one widened block), and the gradient
    still equals the float64 reference."""
    import lowmem_crosslora.services.head_logprob as hl

    calls: list[int] = []
    real = hl.widen
    monkeypatch.setattr(hl, "widen", lambda w: (w.dtype != torch.float32 and calls.append(w.shape[0]), real(w))[1])  # copies only
    g = torch.Generator().manual_seed(11)
    rows, hid, vocab, block = 6, 16, 1000, 128
    w = (torch.randn(vocab, hid, generator=g) / hid**0.5).to(torch.bfloat16)
    h = torch.randn(rows, hid, generator=g).requires_grad_(True)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    lp = HeadLogProb.apply(h, w, None, tokens, None, True, block)
    blocks = -(-vocab // block)
    assert len(calls) == blocks
    lp.backward(torch.ones(rows))
    assert len(calls) == 2 * blocks
    ref, ref_grad = reference(h, w.float(), None, tokens, None, torch.ones(rows))
    assert torch.allclose(h.grad.double(), ref_grad, atol=5e-5)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_a_vocabulary_subset_is_the_softmax_over_those_rows_in_float64(stored: torch.dtype, bias: bool) -> None:
    """`ids` (the head_subset candidate): the result and h's gradient equal log_softmax over the subset's
    rows of the projection only, computed whole in float64; with every id it is the full softmax."""
    g = torch.Generator().manual_seed(17 + int(bias))
    rows, hid, vocab = 11, 16, 900
    lin = torch.nn.Linear(hid, vocab, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(vocab, hid, generator=g) / hid**0.5 * 2)
        if bias:
            lin.bias.copy_(torch.randn(vocab, generator=g))
    lin = lin.to(stored).requires_grad_(False)
    if stored == torch.bfloat16:
        lin.__class__ = UpcastLinear
    ids = torch.unique(torch.randint(0, vocab, (200,), generator=g))
    tokens = ids[torch.randint(0, len(ids), (rows,), generator=g)]
    grad = torch.randn(rows, generator=g)
    w, b = lin.weight.float(), (lin.bias.float() if bias else None)
    for subset, ref_w, ref_b, ref_tokens in (
        (ids, w[ids], None if b is None else b[ids], torch.searchsorted(ids, tokens)),
        (torch.arange(vocab), w, b, tokens),
    ):
        h = torch.randn(rows, hid, generator=g).requires_grad_(True)
        lp = head_logprob(lin, None, h, tokens, block_bytes=2048, ids=subset)
        lp.backward(grad)
        ref, ref_grad = reference(h, ref_w, ref_b, ref_tokens, None, grad)
        assert torch.allclose(lp.double(), ref, atol=5e-5)
        assert torch.allclose(h.grad.double(), ref_grad, atol=5e-5)
    # the subset's softmax is over fewer entries, so each token is at least as likely as under the full one
    h = torch.randn(rows, hid, generator=g)
    full = head_logprob(lin, None, h, tokens, 2048)
    part = head_logprob(lin, None, h, tokens, 2048, ids=ids)
    assert bool((part >= full - 1e-6).all()) and bool((part > full + 1e-3).any())


def test_a_token_outside_the_subset_is_refused() -> None:
    lin = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    h = torch.randn(2, 8)
    with pytest.raises(ValueError, match="outside the vocabulary subset"):
        head_logprob(lin, None, h, torch.tensor([3, 7]), 1024, ids=torch.tensor([1, 3, 5]))
    with pytest.raises(ValueError, match="outside the vocabulary subset"):
        head_logprob(lin, None, h, torch.tensor([3, 49]), 1024, ids=torch.tensor([1, 3, 5]))
