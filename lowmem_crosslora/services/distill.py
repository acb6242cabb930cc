"""The distillation of `refine`: both sides of its losses, the memory they need, its checkpoints.

Texts cross the tokenizer gap, token ids do not. The source's side of every loss is therefore
computed once, on text, before the target is loaded (prepare_source: the probe texts and the
source's per-token changes, `Prepared`); target_texts carries them over to the target's tokens. The
target's side: a batch of encoded texts goes through the target (LoRA on, gradients on), and each
objective turns the target's token log-probabilities into a loss. After every step the training
state is checkpointed (save_checkpoint / load_checkpoint), so an interrupted run resumes.

Objectives (the benchmark compares them; refine ships the one that measured best):

- "lm": the language-model loss on the texts sampled from source + adapter.
- "delta": match the adapter's *change* in log-likelihood, segment by segment, on the adapter's
  samples and on the source base's samples (contrast). A segment ends where both tokenizations have
  a token boundary at the same character, so a sum of token log-probabilities over it means the
  same thing under both models; the loss is the mean squared difference between the target's
  change (LoRA on minus off) and the source's.
- "lm+kl": "lm" plus a KL term that keeps the target's next-token distributions on the contrast
  texts where the target base has them: KL(target base || target + LoRA), over the whole vocabulary.
- "pair": a preference between an adapter text (sampled from source + adapter) and a contrast text
  (from the source base), both the source's writing, so what they share (the source's surface)
  cancels: -log sigmoid(beta [(log q_L(a) - log q_0(a)) - (log q_L(c) - log q_0(c))]) with q_0 the
  target base, q_L the target with its LoRA, whole-text log-likelihoods in the target's own tokens
  (DPO's loss; no token alignment needed). Bounded: the LoRA gains nothing by pushing either text
  to extremes once the pair is ordered.
- "alm": "delta" with a bounded loss, after approximate likelihood matching (Minixhofer et al.,
  NeurIPS 2025; tokenkit's compute_alm_loss): a segment's teacher probability is the target base's
  shifted by the source adapter's change on it, p* = exp(min(0, log q_0(seg) + delta_s)), and the
  target's own, p = q_L(seg), is matched to it by the binary cross-entropy of the two chunk
  probabilities, -[p* log p + (1 - p*) log(1 - p)]. Its least is at p = p*, as the squared error's is,
  but a segment the teacher finds unlikely (p* near 0) adds little however far its log-ratio is off.

- "lm+soft": "lm" plus soft labels where the two vocabularies share tokens. At a scored token whose
  start is a boundary of both tokenizations, the source's likeliest next tokens (adapter on and off,
  `soft_top` each) that the target's vocabulary writes alike form a set S. The teacher over S is the
  *target base's* own distribution shifted by the source adapter's change in each token's
  log-probability, q(k) ~ q_0(k) exp(delta_k), so it carries the adapter's effect and not the
  source's surface; the loss is KL(teacher || target + LoRA), both renormalized over S (only the
  logits of S are needed: a set's log-sum-exp cancels), averaged over such positions, times
  `soft_weight`. A hard token gives one bit of the adapter's shift a position; the set gives its
  direction over every likely token. With `soft_teacher` "source" the teacher is instead source +
  adapter's own distribution over S (what the hard tokens are sampled from, as a whole distribution).
  A benchmark candidate: the set's rows of the projection (|S| x hidden floats a position, twice with
  the copy kept for the backward pass) are outside the training shape's memory model: 143 KB a token
  on Qwen2.5-0.5B at |S| = 16, 4% of a step's modelled activations (3.4 MB a token), but 63% of a
  checkpointed step's (228 KB a token).

The vocabulary projection is the memory hog of a small model (Qwen2.5's 151,936 entries x 4 bytes
a token): no batch ever holds a (tokens x vocabulary) matrix. A token's log-probability walks the
vocabulary in blocks with all rows at once (services/head_logprob.py); the KL term, which needs
whole distributions, makes them a few rows at a time and recomputes them for the backward pass
(torch.utils.checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lowmem_crosslora.services.head_logprob import head_logprob

OBJECTIVES = ("lm", "delta", "lm+kl", "lm-excess", "pair", "alm", "lm+soft")
# The objectives that train on the source base's texts too (contrast texts); the others never read
# them, so refine does not sample them for those (a third of the source phase at the defaults).
CONTRAST_OBJECTIVES = ("delta", "lm+kl", "pair", "alm")
# The objectives that compare the target with its own base: each text's base log-probabilities are
# computed once before training (base_token_logprobs).
BASE_OBJECTIVES = ("delta", "pair", "alm")


def uses_contrast(objective: str) -> bool:
    """Whether `objective` trains on contrast texts (sampled from the source base)."""
    return objective in CONTRAST_OBJECTIVES


# The objectives whose loss reads the source adapter's per-token changes on the training texts (each
# segment's change, or a token's weight). "lm", "lm+kl" and "pair" train on the texts alone, so refine
# does not score the training texts on the source for them: two forward passes of the source over every
# text, about half the source phase (docs/BENCHMARKS.md, "Three exact savings"). "lm+soft"
# keeps its own scoring (it needs the source's next-token candidates too).
TOKEN_CHANGE_OBJECTIVES = ("delta", "alm", "lm-excess", "lm+soft")


def uses_token_changes(objective: str) -> bool:
    """Whether `objective`'s loss reads the source's per-token changes on the training texts."""
    return objective in TOKEN_CHANGE_OBJECTIVES


# "pair": the inverse temperature of its log-sigmoid (DPO's beta), per nat of a text's log-ratio.
PAIR_BETA = 0.1


# Rows of the vocabulary projection made at a time: their logits, log-softmax and gradients.
LOGIT_CHUNK_BYTES = 48 * 1024**2


Log = Callable[[str], None]


@dataclass
class TrainText:
    """One training text on the target's side, with what the source said about it.

    `ids` are prefix + prompt + text in target tokens; tokens `first` .. end are scored.
    `seg` gives, for each scored token, the index of its segment, or -1 (outside every segment: before
    the first boundary both tokenizations share, or after the last). `delta_s` is the source adapter's
    change in log-likelihood over each segment (nats); `base_lp` the target base's log-probability of
    each scored token (filled in before training, for "delta")."""

    ids: list[int]
    first: int
    seg: list[int]
    delta_s: list[float]
    origin: str
    nbytes: int
    base_lp: list[float] | None = None
    # "lm+soft": (scored token index, target ids, the source adapter's change in each one's
    # log-probability) where the source's next-token candidates there map onto the target's
    # vocabulary; `soft_base` the target base's logits of those ids (filled in before training).
    soft: list[tuple[int, list[int], list[float]]] | None = None
    soft_base: list[list[float]] | None = None


def segments(src_start: int, src_ends: list[int], tgt_start: int, tgt_ends: list[int], src_delta: list[float]) -> tuple[list[int], list[float]]:
    """Segment the target's scored tokens at the character boundaries both tokenizations share, and sum
    the source's per-token changes over each segment. Returns (segment of each target token or -1,
    source change per segment). Both scored ranges must start at the same character for the first
    segment to mean the same text; where they do not, segments start at the first shared boundary."""
    common = sorted(set(src_ends) & set(tgt_ends))
    if not common:
        return [-1] * len(tgt_ends), []
    bounds = common if src_start == tgt_start else common[1:]
    lo = src_start if src_start == tgt_start else common[0]
    # Segment j covers characters (bounds[j-1], bounds[j]] (the first: (lo, bounds[0]]).
    delta = [0.0] * len(bounds)
    j = 0
    for e, d in zip(src_ends, src_delta, strict=True):
        if e <= lo:
            continue
        while j < len(bounds) and bounds[j] < e:
            j += 1
        if j == len(bounds):
            break
        delta[j] += d
    seg = []
    j = 0
    for e in tgt_ends:
        if e <= lo:
            seg.append(-1)
            continue
        while j < len(bounds) and bounds[j] < e:
            j += 1
        seg.append(j if j < len(bounds) else -1)
    return seg, delta


def _causal_parts(model: Any) -> tuple[Any, Any, float | None]:
    """(decoder stack, output projection, final logit soft-cap) of a PEFT-wrapped causal LM."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal.base_model  # transformers: the decoder stack under its base_model_prefix
    head = causal.get_output_embeddings()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    return decoder, head, cap


def _logits(head: Any, h: torch.Tensor, cap: float | None) -> torch.Tensor:
    z = head(h).float()
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def text_vocabulary(texts: list[TrainText], device: str) -> torch.Tensor:
    """The distinct token ids of `texts`, sorted: the `head_subset` candidate's softmax ("texts")."""
    ids = sorted({i for t in texts for i in t.ids})
    return torch.tensor(ids, dtype=torch.long, device=device)


def _chunk_rows(vocab: int) -> int:
    return max(8, LOGIT_CHUNK_BYTES // (4 * 4 * vocab))


def token_logprobs_grad(head: Any, cap: float | None, h: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target token) for each row of hidden states `h` (N x H), with gradients: the vocabulary
    walked in blocks with all rows at once (services/head_logprob.py), so each block of the output
    projection is read twice a step however many rows there are, and no (N x vocabulary) matrix is made.
    `ids`: the softmax over that subset of the vocabulary only (the `head_subset` candidate)."""
    return head_logprob(head, cap, h, targets, LOGIT_CHUNK_BYTES, ids)


def kl_to_base(head: Any, cap: float | None, h: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """Sum over rows of KL(base || adapted) between next-token distributions, in recomputed chunks."""

    def piece(hc: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
        lq = torch.log_softmax(_logits(head, hc, cap), dim=-1)
        lp = torch.log_softmax(_logits(head, hb, cap), dim=-1)
        return (lp.exp() * (lp - lq)).sum()

    rows = _chunk_rows(head.weight.shape[0])
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        total = total + checkpoint(piece, h[i : i + rows], h_base[i : i + rows], use_reentrant=False)
    return total


def set_logits(head: Any, cap: float | None, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the ids in each row of `ids` (P x K, -1 pads) for hidden states `h` (P x H), float32,
    with gradients through `h`: only those rows of the output projection, widened (pads: -inf)."""
    pad = ids < 0
    rows = head.weight[ids.clamp(min=0)].float()  # P x K x H
    z = torch.einsum("ph,pkh->pk", h.float(), rows)
    bias = getattr(head, "bias", None)
    if bias is not None:
        z = z + bias[ids.clamp(min=0)].float()
    if cap:
        z = torch.tanh(z / cap) * cap
    return z.masked_fill(pad, -torch.inf)


def _soft_rows(texts: list[TrainText]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[float]], list[tuple[int, int]]]:
    """The soft positions of `texts`, flat: their rows and columns in the hidden-state grid, their ids
    padded with -1 (P x K), their source changes (as lists), and each text's span in the flat list."""
    rows, cols, ids, deltas, spans = [], [], [], [], []
    for r, t in enumerate(texts):
        a = len(rows)
        for j, tid, d in t.soft or []:
            rows.append(r)
            cols.append(t.first - 1 + j)
            ids.append(tid)
            deltas.append(d)
        spans.append((a, len(rows)))
    k = max((len(x) for x in ids), default=1)
    grid = torch.full((len(ids), k), -1, dtype=torch.long)
    for i, x in enumerate(ids):
        grid[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long), grid, deltas, spans


@torch.no_grad()
def soft_base_logits(model: Any, texts: list[TrainText], device: str, batch: int) -> None:
    """Fill each text's `soft_base`: the target base's logits (LoRA off) of its soft positions' ids."""
    _decoder, head, cap = _causal_parts(model)
    with model.disable_adapter():
        for i in range(0, len(texts), batch):
            part = [t for t in texts[i : i + batch] if t.soft]
            for t in texts[i : i + batch]:
                if not t.soft:
                    t.soft_base = []
            if not part:
                continue
            x, mask = _pad(part, device)
            h = hidden(model, x, mask)
            ri, ci, grid, _d, spans = _soft_rows(part)
            z = set_logits(head, cap, h[ri, ci], grid.to(device)).cpu()
            for t, (a, b) in zip(part, spans, strict=True):
                t.soft_base = [z[p, : len(t.soft[p - a][1])].tolist() for p in range(a, b)]  # type: ignore[index]


def soft_loss(head: Any, cap: float | None, h: torch.Tensor, texts: list[TrainText], device: str) -> torch.Tensor:
    """Sum over the soft positions of `texts` of KL(teacher || target + LoRA) over each position's set:
    teacher = softmax(target base logits + source change), student = softmax(its logits), both over S."""
    ri, ci, grid, deltas, _spans = _soft_rows(texts)
    if not len(ri):
        return h.new_zeros((), dtype=torch.float32)
    teach = torch.full(grid.shape, -torch.inf)
    for p, (t_row, d) in enumerate(zip(_soft_row_base(texts), deltas, strict=True)):
        teach[p, : len(d)] = torch.tensor(t_row, dtype=torch.float32) + torch.tensor(d, dtype=torch.float32)
    q_log = torch.log_softmax(teach.to(device), dim=-1)
    s_log = torch.log_softmax(set_logits(head, cap, h[ri.to(device), ci.to(device)], grid.to(device)), dim=-1)
    q = q_log.exp()
    return torch.where(q > 0, q * (q_log - s_log), torch.zeros_like(q)).sum()


def soft_counts(texts: list[TrainText]) -> dict[str, int]:
    """The report's count of "lm+soft" positions among the scored tokens of `texts`."""
    return {"soft_positions": sum(len(t.soft or []) for t in texts), "scored_tokens": sum(max(0, len(t.ids) - t.first) for t in texts)}


def _soft_row_base(texts: list[TrainText]) -> list[list[float]]:
    out: list[list[float]] = []
    for t in texts:
        assert t.soft is None or t.soft_base is not None, "soft_base_logits must run before the lm+soft objective"
        out.extend(t.soft_base or [])
    return out


def truncate(t: TrainText, max_len: int) -> TrainText:
    """Keep the first `max_len` tokens; segments cut short are dropped whole (their sums would not match)."""
    if len(t.ids) <= max_len:
        return t
    n = max(0, max_len - t.first)  # scored tokens kept
    seg = t.seg[:n]
    cut = t.seg[n] if n < len(t.seg) and t.seg[n] >= 0 else None
    if cut is not None:
        seg = [s if s < cut else -1 for s in seg]
    nseg = max([s for s in seg if s >= 0], default=-1) + 1
    base = t.base_lp[:n] if t.base_lp is not None else None
    keep = [k for k, (j, _ids, _d) in enumerate(t.soft or []) if j < n]
    soft = [t.soft[k] for k in keep] if t.soft is not None else None
    soft_base = [t.soft_base[k] for k in keep] if t.soft is not None and t.soft_base is not None else None
    return TrainText(t.ids[:max_len], t.first, seg, t.delta_s[:nseg], t.origin, t.nbytes, base, soft, soft_base)


def _pad(texts: list[TrainText], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(t.ids) for t in texts)
    x = torch.zeros(len(texts), T, dtype=torch.long)
    mask = torch.zeros(len(texts), T, dtype=torch.long)
    for r, t in enumerate(texts):
        x[r, : len(t.ids)] = torch.tensor(t.ids)
        mask[r, : len(t.ids)] = 1
    return x.to(device), mask.to(device)


def _scored(texts: list[TrainText], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Rows and columns (in the hidden-state grid) that predict scored tokens, the tokens they predict,
    and each text's span in that flat list."""
    rows, cols, spans = [], [], []
    for r, t in enumerate(texts):
        a = len(rows)
        for c in range(t.first - 1, len(t.ids) - 1):
            rows.append(r)
            cols.append(c)
        spans.append((a, len(rows)))
    ri, ci = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    return ri, ci, spans


def hidden(model: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    decoder, _head, _cap = _causal_parts(model)
    return decoder(input_ids=x, attention_mask=mask).last_hidden_state


@torch.no_grad()
def base_token_logprobs(model: Any, texts: list[TrainText], device: str, batch: int) -> None:
    """Fill each text's `base_lp`: the target base's log-probability of its scored tokens (LoRA off)."""
    _decoder, head, cap = _causal_parts(model)
    with model.disable_adapter():
        for i in range(0, len(texts), batch):
            part = texts[i : i + batch]
            x, mask = _pad(part, device)
            h = hidden(model, x, mask)
            ri, ci, spans = _scored(part, x)
            lp = token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1]).double().cpu()
            for t, (a, b) in zip(part, spans, strict=True):
                t.base_lp = lp[a:b].tolist()


@torch.no_grad()
def loglik_per_byte(model: Any, texts: list[TrainText], device: str, batch: int) -> list[float]:
    """Log-likelihood per byte (nats) of each text's scored tokens under `model` as it is (its adapter as
    set), `batch` texts a pass, logits in chunks: no more memory than a training pass of `batch` texts."""
    _decoder, head, cap = _causal_parts(model)
    out: list[float] = []
    for i in range(0, len(texts), batch):
        part = texts[i : i + batch]
        x, mask = _pad(part, device)
        h = hidden(model, x, mask)
        ri, ci, spans = _scored(part, x)
        lp = token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1]).double().cpu().tolist()
        out.extend(math.fsum(lp[a:b]) / t.nbytes if t.nbytes and b > a else math.nan for t, (a, b) in zip(part, spans, strict=True))
    return out


def excess_weights(t: TrainText) -> list[float]:
    """The "lm-excess" weight of each scored token: the source adapter's change over the token's
    segment, |delta|, spread evenly over the segment's target tokens; 0 outside every segment (where
    the two tokenizations share no boundary). Tokens the adapter does not move barely count."""
    counts: dict[int, int] = {}
    for g in t.seg:
        if g >= 0:
            counts[g] = counts.get(g, 0) + 1
    return [abs(t.delta_s[g]) / counts[g] if g >= 0 else 0.0 for g in t.seg]


def _text_logprobs(
    model: Any, head: Any, cap: float | None, texts: list[TrainText], device: str, ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
    """The target's log-probability of every scored token of `texts` (LoRA as set, with gradients), flat,
    each text's span in it, and the hidden states they came from (for a loss on other tokens)."""
    x, mask = _pad(texts, device)
    h = hidden(model, x, mask)
    ri, ci, spans = _scored(texts, x)
    return token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1], ids), spans, h


def _segment_loss(objective: str, lp: torch.Tensor, t: TrainText, device: str) -> torch.Tensor:
    """One text's "delta" (squared error of the per-segment change) or "alm" (chunk cross-entropy) loss,
    summed over its segments; `lp` its scored tokens' log-probabilities."""
    assert t.base_lp is not None, f"base_token_logprobs must run before the {objective} objective"
    base = torch.tensor(t.base_lp[: len(lp)], dtype=torch.float32, device=device)
    if objective == "alm":
        return alm_loss(lp, base, t.seg[: len(lp)], t.delta_s)
    seg = torch.tensor(t.seg, dtype=torch.long, device=device)
    keep = seg >= 0
    per_seg = torch.zeros(len(t.delta_s), device=device).index_add(0, seg[keep], (lp - base)[keep])
    return ((per_seg - torch.tensor(t.delta_s, dtype=torch.float32, device=device)) ** 2).sum()


def batch_loss(
    model: Any,
    objective: str,
    main: list[TrainText],
    contrast: list[TrainText],
    norm: dict[str, float],
    device: str,
    kl_weight: float,
    soft_weight: float = 1.0,
    head_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, already divided by the whole batch's counts in `norm` (so that
    micro-batches add up to the batch's mean), and its parts (for the progress line). `head_ids`: the
    `lm` term's softmax over that subset of the vocabulary only (the `head_subset` candidate)."""
    _decoder, head, cap = _causal_parts(model)
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=device)
    if objective in ("lm", "lm+kl") and main:
        lp, _spans, _h = _text_logprobs(model, head, cap, main, device, head_ids)
        nll = -lp.sum() / norm["tokens"]
        loss = loss + nll
        parts["nll"] = float(nll.detach())
    if objective == "lm+soft" and main:
        lp, _spans, h = _text_logprobs(model, head, cap, main, device)
        nll = -lp.sum() / norm["tokens"]
        soft = soft_loss(head, cap, h, main, device) / norm["soft"]
        loss = loss + nll + soft_weight * soft
        parts["nll"] = float(nll.detach())
        parts["soft"] = float(soft.detach())
    if objective == "lm-excess" and main:
        lp, spans, _h = _text_logprobs(model, head, cap, main, device)
        w = torch.zeros(len(lp), device=device)
        for t, (a, b) in zip(main, spans, strict=True):
            w[a:b] = torch.tensor(excess_weights(t)[: b - a], dtype=torch.float32, device=device)
        nll = -(w * lp).sum() / norm["weight"]
        loss = loss + nll
        parts["nll"] = float(nll.detach())
    if objective == "lm+kl" and contrast:
        x, mask = _pad(contrast, device)
        h = hidden(model, x, mask)
        with torch.no_grad(), model.disable_adapter():
            hb = hidden(model, x, mask)
        ri, ci, _spans = _scored(contrast, x)
        kl = kl_to_base(head, cap, h[ri, ci], hb[ri, ci]) / norm["contrast_tokens"]
        loss = loss + kl_weight * kl
        parts["kl"] = float(kl.detach())
    if objective == "pair" and main and contrast:
        n = min(len(main), len(contrast))
        texts = main[:n] + contrast[:n]
        lp, spans, _h = _text_logprobs(model, head, cap, texts, device)
        ratio = []
        for t, (a, b) in zip(texts, spans, strict=True):
            assert t.base_lp is not None, "base_token_logprobs must run before the pair objective"
            ratio.append(lp[a:b].sum() - math.fsum(t.base_lp[: b - a]))
        margin = torch.stack(ratio[:n]) - torch.stack(ratio[n:])
        pl = -torch.nn.functional.logsigmoid(PAIR_BETA * margin).sum() / norm["pairs"]
        loss = loss + pl
        parts["pair"] = float(pl.detach())
        parts["margin"] = float(margin.detach().mean()) * n / norm["pairs"]
    if objective in ("delta", "alm") and main + contrast:
        texts = main + contrast
        lp, spans, _h = _text_logprobs(model, head, cap, texts, device)
        total = torch.zeros((), device=device)
        for t, (a, b) in zip(texts, spans, strict=True):
            if t.delta_s:
                total = total + _segment_loss(objective, lp[a:b], t, device)
        term = total / norm["segments"]
        loss = loss + term
        parts["mse" if objective == "delta" else "alm"] = float(term.detach())
    return loss, parts


def alm_loss(lp: torch.Tensor, base_lp: torch.Tensor, seg: list[int], delta_s: list[float]) -> torch.Tensor:
    """The "alm" loss of one text, summed over its segments: the binary cross-entropy between the
    target's chunk probability (its tokens' log-probabilities `lp`, with gradients, summed over each
    segment) and the teacher's, the target base's (`base_lp`) shifted by the source's change `delta_s`."""
    idx = torch.tensor(seg, dtype=torch.long, device=lp.device)
    keep = idx >= 0
    n = len(delta_s)
    student = torch.zeros(n, device=lp.device, dtype=lp.dtype).index_add(0, idx[keep], lp[keep])
    base = torch.zeros(n, device=lp.device, dtype=torch.float32).index_add(0, idx[keep], base_lp[keep])
    teacher = (base + torch.tensor(delta_s, dtype=torch.float32, device=lp.device)).clamp(max=0.0).exp()
    student = student.clamp(max=-1e-6)  # log(1 - p) is finite while p < 1
    return -(teacher * student + (1 - teacher) * torch.log(-torch.expm1(student))).sum()


def batch_norms(objective: str, main: list[TrainText], contrast: list[TrainText]) -> dict[str, float]:
    """Counts of the whole batch that each loss term is averaged over."""
    # A text cut inside its prompt (shorter than `first`) has no scored tokens left: it counts none.
    tokens = sum(max(0, len(t.ids) - t.first) for t in main)
    ctokens = sum(max(0, len(t.ids) - t.first) for t in contrast)
    segs = sum(len(t.delta_s) for t in main + contrast)
    weight = math.fsum(w for t in main for w in excess_weights(t)) if objective == "lm-excess" else 0.0
    pairs = min(len(main), len(contrast))
    soft = sum(len(t.soft or []) for t in main)
    return {
        "tokens": max(1, tokens),
        "contrast_tokens": max(1, ctokens),
        "segments": max(1, segs),
        "weight": max(weight, 1e-9),
        "pairs": max(1, pairs),
        "soft": max(1, soft),
    }
