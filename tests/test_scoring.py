"""Token log-probabilities of encoded texts (services/scoring.py `token_logprobs`) equal the float64
log-softmax of the model's logits at each scored token, whatever the texts' lengths, the batching
(sorted by length, padded at the end) and the first scored token."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_crosslora.services.scoring import Encoded, token_logprobs

VOCAB = 37


class Toy(torch.nn.Module):
    """A causal model whose logits at a position depend on every token up to it (a running sum of
    embeddings): padding at the end must not change any scored position."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Parameter((torch.randn(VOCAB, 8, generator=g) * 2).to(dtype))
        self.out = torch.nn.Parameter((torch.randn(VOCAB, 8, generator=g)).to(dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        h = (self.emb[input_ids] * attention_mask[..., None].to(self.emb.dtype)).cumsum(1)
        return SimpleNamespace(logits=h @ self.out.T)

    def reference(self, ids: list[int]) -> torch.Tensor:
        """float64 log-softmax of this text's logits, the text alone (no batch, no padding)."""
        x = torch.tensor([ids])
        with torch.no_grad():
            z = self(x, torch.ones_like(x)).logits[0].double()
        return torch.log_softmax(z, dim=-1)[:-1].gather(1, x[0, 1:, None]).squeeze(1)


texts = st.lists(
    st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=30).flatmap(lambda ids: st.tuples(st.just(ids), st.integers(1, len(ids) - 1), st.booleans())),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(texts=texts, bf16=st.booleans())
def test_token_logprobs_equal_a_float64_log_softmax(texts: list[tuple[list[int], int, bool]], bf16: bool) -> None:
    model = Toy(torch.bfloat16 if bf16 else torch.float32)
    enc = [Encoded(ids, first, 5 if scored else 0) for ids, first, scored in texts]
    got = token_logprobs(model, enc, "cpu", VOCAB)
    for (ids, first, scored), row in zip(texts, got, strict=True):
        if not scored:
            assert row == []
            continue
        ref = model.reference(ids)[first - 1 :]
        assert len(row) == len(ids) - first
        assert torch.allclose(torch.tensor(row, dtype=torch.float64), ref, atol=1e-5, rtol=1e-5), (row, ref.tolist())
