"""refine's pure parts: the segments both tokenizations break at and truncation to whole segments,
against a character-by-character reference (hypothesis), and the batch order. No model is loaded."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_crosslora.services.distill import TrainText, batch_norms, segments, truncate
from lowmem_crosslora.services.target_lora import batch_indices

# ---- segments, truncate, batch order --------------------------------------------------------------


@st.composite
def two_tokenizations(draw: Any) -> tuple[int, list[int], int, list[int], list[float]]:
    """A text of n characters read by two tokenizers: each scored range has its own start and token ends
    (character offsets, increasing; a repeated end is a zero-width token, as byte-level tokens of one
    character are), and the source has a change in log-probability per token."""
    n = draw(st.integers(1, 30))
    src_start = draw(st.integers(0, n - 1))
    tgt_start = src_start if draw(st.booleans()) else draw(st.integers(0, n - 1))

    def ends(start: int) -> list[int]:
        e = sorted(draw(st.sets(st.integers(start + 1, n), min_size=1)))
        repeats = draw(st.lists(st.sampled_from(e), max_size=2))
        return sorted(e + repeats)

    src_ends, tgt_ends = ends(src_start), ends(tgt_start)
    delta = draw(st.lists(st.floats(-4, 4, allow_nan=False), min_size=len(src_ends), max_size=len(src_ends)))
    return src_start, src_ends, tgt_start, tgt_ends, delta


def reference_segments(src_start: int, src_ends: list[int], tgt_start: int, tgt_ends: list[int], delta: list[float]) -> tuple[list[int], list[float]]:
    """Character by character: character c (text[c - 1]) belongs to segment j when exactly j shared
    boundaries lie before it and at least one at or after it, counting from where both scored ranges
    first mean the same text (their start when it is shared, else the first shared boundary)."""
    shared = sorted(set(src_ends) & set(tgt_ends))
    lo = src_start if src_start == tgt_start else (shared[0] if shared else math.inf)
    bounds = [b for b in shared if b > lo]

    def char_seg(c: int) -> int:
        return -1 if c <= lo or not bounds or c > bounds[-1] else sum(b < c for b in bounds)

    def token_segs(start: int, ends: list[int]) -> list[int]:
        out, prev = [], start
        for e in ends:
            segs = {char_seg(c) for c in range(prev + 1, e + 1)} or {char_seg(e)}  # a zero-width token: its character's
            assert len(segs) == 1  # no token straddles a shared boundary
            out.append(segs.pop())
            prev = e
        return out

    per_seg = [0.0] * len(bounds)
    for s, d in zip(token_segs(src_start, src_ends), delta, strict=True):
        if s >= 0:
            per_seg[s] += d
    return token_segs(tgt_start, tgt_ends), per_seg


@settings(max_examples=400, deadline=None, database=None)
@given(two_tokenizations())
def test_segments_match_a_character_by_character_reference(case: tuple[int, list[int], int, list[int], list[float]]) -> None:
    src_start, src_ends, tgt_start, tgt_ends, delta = case
    seg, per_seg = segments(*case)
    ref_seg, ref_delta = reference_segments(*case)
    assert seg == ref_seg
    assert per_seg == pytest.approx(ref_delta, abs=1e-9)
    # Segments are numbered in text order, and every one holds at least one target token.
    ids = [s for s in seg if s >= 0]
    assert ids == sorted(ids) and set(ids) == set(range(len(per_seg)))
    shared = sorted(set(src_ends) & set(tgt_ends))
    if shared:
        # The segments add up to the source's change over the text both ranges cover.
        lo = src_start if src_start == tgt_start else shared[0]
        covered = sum(d for e, d in zip(src_ends, delta, strict=True) if lo < e <= shared[-1])
        assert sum(per_seg) == pytest.approx(covered, abs=1e-9)
    else:
        assert seg == [-1] * len(tgt_ends) and per_seg == []


def test_segments_by_hand() -> None:
    d = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2]  # one source token per character of "abcdef"
    # Same start: target "ab" "cde" "f".
    seg, per = segments(0, [1, 2, 3, 4, 5, 6], 0, [2, 5, 6], d)
    assert seg == [0, 1, 2] and per == pytest.approx([0.3, 2.8, 3.2])
    # The target's range starts a character later ("bc" "d" "ef"): segments start at the first shared boundary, 3.
    seg, per = segments(0, [1, 2, 3, 4, 5, 6], 1, [3, 4, 6], d)
    assert seg == [-1, 0, 1] and per == pytest.approx([0.8, 4.8])
    # The source reads on past the target's last token: what lies beyond the last shared boundary is in no segment.
    seg, per = segments(0, [2, 4, 7], 0, [2, 4, 5], [1.0, 2.0, 4.0])
    assert seg == [0, 1, -1] and per == pytest.approx([1.0, 2.0])
    assert segments(0, [1, 3], 0, [2], [1.0, 1.0]) == ([-1], [])


@settings(max_examples=300, deadline=None, database=None)
@given(two_tokenizations(), st.integers(0, 6), st.integers(0, 40))
def test_truncate_keeps_only_whole_segments(case: tuple[int, list[int], int, list[int], list[float]], first: int, max_len: int) -> None:
    seg, per_seg = segments(*case)
    n_all = len(seg)
    t = TrainText(list(range(100, 100 + first + n_all)), first, seg, per_seg, "adapter", 9, [float(-i) for i in range(n_all)])
    c = truncate(t, max_len)
    if len(t.ids) <= max_len:
        assert c is t
        return
    n = max(0, max_len - first)  # scored tokens kept (none when the cut falls inside the prompt)
    assert c.ids == t.ids[:max_len] and c.first == first and len(c.seg) == n and c.base_lp == t.base_lp[:n]
    kept = {s for s in c.seg if s >= 0}
    assert kept == set(range(len(c.delta_s))) and c.delta_s == t.delta_s[: len(c.delta_s)]
    for s in set(seg) - {-1}:
        whole = seg.count(s) == seg[:n].count(s)
        # A segment is kept exactly when all of its tokens are, and then with all of them.
        assert (s in kept) == whole
        if whole:
            assert c.seg.count(s) == seg.count(s)
    assert all(a == b or a == -1 for a, b in zip(c.seg, seg[:n], strict=True))
    # The losses are averaged over the scored tokens the batch still holds.
    other = TrainText([1, 2, 3, 4], 1, [0, 0, 0], [0.5], "adapter", 3)
    assert batch_norms("lm", [c, other], [])["tokens"] == n + 3


def test_batch_indices_are_a_pure_function_and_visit_every_text_once_an_epoch() -> None:
    for n, batch in [(7, 3), (5, 5), (4, 6), (1, 2), (10, 1)]:
        steps = 3 * n + 5
        flat = [i for s in range(steps) for i in batch_indices(n, batch, 0, s, "main")]
        for k in range(len(flat) // n):
            assert sorted(flat[k * n : (k + 1) * n]) == list(range(n)), (n, batch, k)
        # A resumed run draws the batch of step s alone, whatever the global RNG holds.
        torch.manual_seed(1)
        alone = batch_indices(n, batch, 0, 4, "main")
        torch.manual_seed(2)
        assert alone == batch_indices(n, batch, 0, 4, "main") == flat[4 * batch : 5 * batch]
    assert batch_indices(0, 3, 0, 0, "main") == []
    # The seed and the salt pick the order, and each epoch has an order of its own.
    orders = {tuple(batch_indices(20, 20, seed, 0, salt)) for seed in (0, 1) for salt in ("main", "contrast")}
    assert len(orders) == 4
    assert batch_indices(20, 20, 0, 0, "main") != batch_indices(20, 20, 0, 1, "main")


# ---- end to end -----------------------------------------------------------------------------------


def test_excess_weights_spread_each_segments_change_over_its_tokens() -> None:
    """lm-excess: a segment's tokens share |its source change| evenly; tokens outside every segment weigh 0."""
    from lowmem_crosslora.services.distill import TrainText, batch_norms, excess_weights

    t = TrainText(list(range(9)), 2, [0, 0, 1, -1, 2, 2, 2], [0.6, -0.2, 0.03], "adapter", 20)
    w = excess_weights(t)
    assert w == pytest.approx([0.3, 0.3, 0.2, 0.0, 0.01, 0.01, 0.01])
    for g, d in enumerate(t.delta_s):
        assert sum(x for x, s in zip(w, t.seg, strict=True) if s == g) == pytest.approx(abs(d))
    assert batch_norms("lm-excess", [t, t], [])["weight"] == pytest.approx(2 * 0.83)


def test_the_pair_loss_is_dpo_on_whole_text_log_ratios_against_the_target_base() -> None:
    """ "pair": -log sigmoid(beta [(log q_L(a) - log q_0(a)) - (log q_L(c) - log q_0(c))]) per (adapter
    text, contrast text) pair, averaged over pairs; computed here by hand from whole-text log-likelihoods."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_crosslora.services.distill import PAIR_BETA, base_token_logprobs, batch_loss, loglik_per_byte

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    g = torch.Generator().manual_seed(1)

    def text(n: int, origin: str) -> TrainText:
        ids = torch.randint(0, 50, (n,), generator=g).tolist()
        return TrainText(ids, 2, [-1] * (n - 2), [], origin, 1)  # nbytes 1: loglik_per_byte is the whole-text sum

    main, contrast = [text(7, "adapter"), text(5, "adapter")], [text(6, "base"), text(9, "base")]
    base_token_logprobs(model, main + contrast, "cpu", 4)
    on = loglik_per_byte(model, main + contrast, "cpu", 4)
    with model.disable_adapter():
        off = loglik_per_byte(model, main + contrast, "cpu", 4)
    ratio = [a - b for a, b in zip(on, off, strict=True)]
    want = sum(-torch.nn.functional.logsigmoid(torch.tensor(PAIR_BETA * (ratio[i] - ratio[2 + i]))).item() for i in range(2)) / 2
    loss, parts = batch_loss(model, "pair", main, contrast, batch_norms("pair", main, contrast), "cpu", 1.0)
    assert loss.item() == pytest.approx(want, rel=1e-4, abs=1e-6) and parts["pair"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert parts["margin"] == pytest.approx(((ratio[0] - ratio[2]) + (ratio[1] - ratio[3])) / 2, rel=1e-4, abs=1e-5)
    loss.backward()  # a step along the gradient widens the margin
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 1e-2 * p.grad
    after, _ = batch_loss(model, "pair", main, contrast, batch_norms("pair", main, contrast), "cpu", 1.0)
    assert after.item() < loss.item()


# ---- the "alm" loss: bounded chunk matching ---------------------------------------------------------


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_alm_loss_matches_a_float64_reference_segment_by_segment(data: Any) -> None:
    """The "alm" loss of one text against a plain float64 sum over segments: the teacher's chunk
    probability exp(min(0, base + delta)), the student's exp(sum of its log-probabilities), their
    binary cross-entropy."""
    from lowmem_crosslora.services.distill import alm_loss

    n = data.draw(st.integers(1, 12))
    nseg = data.draw(st.integers(1, n))
    seg = sorted(data.draw(st.lists(st.integers(-1, nseg - 1), min_size=n, max_size=n)))
    used = sorted({s for s in seg if s >= 0})
    if not used:
        return
    remap = {s: i for i, s in enumerate(used)}  # segments are numbered 0.. in the order they occur
    seg = [remap.get(s, -1) for s in seg]
    lp = data.draw(st.lists(st.floats(-6, -0.01), min_size=n, max_size=n))
    base = data.draw(st.lists(st.floats(-6, -0.01), min_size=n, max_size=n))
    delta = data.draw(st.lists(st.floats(-3, 3), min_size=len(used), max_size=len(used)))
    want = 0.0
    for j, d in enumerate(delta):
        s = math.fsum(v for v, g in zip(lp, seg, strict=True) if g == j)
        b = math.fsum(v for v, g in zip(base, seg, strict=True) if g == j)
        t = math.exp(min(0.0, b + d))
        s = min(s, -1e-6)
        want -= t * s + (1 - t) * math.log(1 - math.exp(s))
    got = alm_loss(torch.tensor(lp, dtype=torch.float64), torch.tensor(base), seg, delta).item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_alm_loss_is_least_where_the_student_matches_the_shifted_teacher() -> None:
    """Whatever the segment, its loss is least where the student's chunk log-probability is the
    teacher's (the base's plus the source's change, at most 0), and has no gradient there."""
    from lowmem_crosslora.services.distill import alm_loss

    for base, d in ((-2.0, 1.0), (-0.5, -1.5), (-4.0, 3.0), (-1.0, 2.5)):
        want = min(0.0, base + d)
        grid = torch.linspace(-8, -1e-3, 4001, dtype=torch.float64)
        losses = torch.stack([alm_loss(g.reshape(1), torch.tensor([base]), [0], [d]) for g in grid])
        best = grid[int(losses.argmin())].item()
        assert best == pytest.approx(min(want, -1e-3), abs=5e-3), (base, d, best)
        if want < -0.01:
            x = torch.tensor([want], dtype=torch.float64, requires_grad=True)
            alm_loss(x, torch.tensor([base]), [0], [d]).backward()
            assert abs(x.grad.item()) < 1e-6


# ---- lm+soft: the sets both vocabularies share, and the soft-label loss ----------------------------


def test_soft_sets_align_by_character_and_keep_only_shared_tokens() -> None:
    from lowmem_crosslora.services.probe_set import soft_sets

    # "ab cd": source tokens "ab" (0-2), " cd" (2-5); target tokens "a" (0-1), "b" (1-2), " c" (2-4), "d" (4-5)
    nxt = [[["ab", 0.5], ["x", 1.0], ["zz", 2.0]], [[" cd", -1.0], [" c", 0.25], [" q", 3.0]]]
    vocab = {"ab": 7, "x": 8, " c": 9, " q": 10, " cd": 11}
    got = soft_sets(0, [2, 5], nxt, 0, [1, 2, 4, 5], vocab)
    # target token 0 starts at 0 (source position 0), token 2 at 2 (source position 1); 1 and 3 start mid-source-token
    assert got == [(0, [7, 8], [0.5, 1.0]), (2, [11, 9, 10], [-1.0, 0.25, 3.0])]
    # fewer than two candidates the target writes: no position
    assert soft_sets(0, [2, 5], nxt, 0, [1, 2, 4, 5], {"ab": 7, " c": 9}) == []
    # the value stored at another index (the "source" teacher's log-probability)
    three = [[[w, d, -d] for w, d in pos] for pos in nxt]
    assert soft_sets(0, [2, 5], three, 0, [1, 2, 4, 5], vocab, 2) == [(0, [7, 8], [-0.5, -1.0]), (2, [11, 9, 10], [1.0, -0.25, -3.0])]
    # A token of no width (the last pieces of a character's bytes share its end) starts mid-character: its
    # position is skipped on either side; the token after it starts at the character's end.
    mid = [["ab", 9.0], [" q", 9.0]]
    assert soft_sets(0, [2, 2, 5], [nxt[0], mid, nxt[1]], 0, [1, 2, 4, 5], vocab) == got
    assert soft_sets(0, [2, 5], nxt, 0, [2, 2, 5], vocab) == [(0, [7, 8], [0.5, 1.0]), (2, [11, 9, 10], [-1.0, 0.25, 3.0])]


def _soft_case(seed: int, positions: int = 5, vocab: int = 40, hidden: int = 12) -> tuple[torch.nn.Linear, torch.Tensor, TrainText]:
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bool(seed % 2))
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        if head.bias is not None:
            head.bias.copy_(torch.randn(vocab, generator=g))
    h = torch.randn(1, positions + 2, hidden, generator=g, dtype=torch.float32)
    soft = []
    for j in range(positions):
        k = 2 + j % 4
        ids = torch.randperm(vocab, generator=g)[:k].tolist()
        soft.append((j, ids, torch.randn(k, generator=g).tolist()))
    base = [torch.randn(len(ids), generator=g).tolist() for _j, ids, _d in soft]
    t = TrainText(list(range(positions + 2)), 1, [-1] * (positions + 1), [], "adapter", 10, soft=soft, soft_base=base)
    return head, h, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_loss_is_kl_of_the_shifted_base_against_the_target_over_each_set(seed: int) -> None:
    from lowmem_crosslora.services.distill import soft_loss

    head, h, t = _soft_case(seed)
    h.requires_grad_(True)
    got = soft_loss(head, None, h, [t], "cpu")
    want = 0.0
    assert t.soft is not None and t.soft_base is not None
    W, b = head.weight.detach().double(), (head.bias.detach().double() if head.bias is not None else None)
    for (j, ids, d), zb in zip(t.soft, t.soft_base, strict=True):
        z = h[0, t.first - 1 + j].detach().double() @ W.T + (b if b is not None else 0)
        s = torch.log_softmax(z[ids], 0)  # the target's distribution renormalized over the set
        q = torch.softmax(torch.tensor(zb, dtype=torch.float64) + torch.tensor(d, dtype=torch.float64), 0)
        want += float((q * (q.log() - s)).sum())
    assert math.isclose(float(got.detach()), want, rel_tol=1e-5, abs_tol=1e-6)
    got.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_soft_loss_is_zero_where_the_target_already_shifts_its_base_by_the_sources_change() -> None:
    from lowmem_crosslora.services.distill import set_logits, soft_loss

    head, h, t = _soft_case(3)
    assert t.soft is not None
    # the teacher's logits: the student's own, less the source's change, as the target base
    for k, (j, ids, d) in enumerate(t.soft):
        z = set_logits(head, None, h[0, t.first - 1 + j][None], torch.tensor([ids]))[0]
        t.soft_base[k] = (z - torch.tensor(d)).tolist()  # type: ignore[index]
    assert abs(float(soft_loss(head, None, h, [t], "cpu"))) < 1e-5
    # a positive loss once the shift is off
    t.soft[0] = (t.soft[0][0], t.soft[0][1], [v + 2.0 * (i % 2) for i, v in enumerate(t.soft[0][2])])
    assert float(soft_loss(head, None, h, [t], "cpu")) > 1e-3


def test_truncate_keeps_the_soft_positions_it_keeps_the_tokens_of() -> None:
    _head, _h, t = _soft_case(4, positions=6)
    cut = truncate(t, t.first + 3)
    assert cut.soft is not None and cut.soft_base is not None
    assert [j for j, _i, _d in cut.soft] == [0, 1, 2] and len(cut.soft_base) == 3
    assert batch_norms("lm+soft", [cut], [])["soft"] == 3


def test_the_probe_file_keeps_the_sources_next_token_sets_as_a_resumed_run_reads_them() -> None:
    from lowmem_crosslora.services.probe_set import Prepared
    from lowmem_crosslora.services.probes import Probe

    nxt = [[[[" A", 0.1234567, -1.5], ["b", -2.0, -0.25]], [[" c", 3.0, -4.0]]]]
    prep = Prepared([Probe("p", "ab", 1, "adapter")], [1], [[2, 3]], [[0.5, -0.5]], 1.0, src_next=nxt)
    back = Prepared.from_json(prep.to_json())
    assert back.src_next == [[[[" A", 0.12346, -1.5], ["b", -2.0, -0.25]], [[" c", 3.0, -4.0]]]]  # rounded as stored
    assert Prepared.from_json(back.to_json()).src_next == back.src_next  # a resumed run reads the same values
    plain = Prepared([Probe("p", "ab", 1, "adapter")], [1], [[2, 3]], [[0.5, -0.5]], 1.0)
    assert "source_next" not in plain.to_json()["texts"][0] and Prepared.from_json(plain.to_json()).src_next is None
