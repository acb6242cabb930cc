"""refine's probe set: texts sampled from source + adapter (and the source base), the source's per-token
changes on them, the held-out split, and their tokenization on the target's side (services/distill.py
holds the losses; docs/METHOD.md section 7)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.distill import TrainText, segments
from lowmem_crosslora.services.probe_select import drawn, excess, select
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, USER_TURN_TOKENS, Probe, chat_opening, sample_chat_probes, sample_probes, stable_seed
from lowmem_crosslora.services.scoring import Loader, Log, encode, free, length_batches, longest_prompt, longest_sequence, token_logprobs, vocab_size


@dataclass
class Prepared:
    """The source's contribution, computed once and kept in the state folder: probe texts and, per
    text, the source's token ends and per-token change in log-probability (adapter on minus off;
    None where the objective never reads them, distill.uses_token_changes: not scored at all).
    The held-out texts (never trained on) come with their own seed and, per text, the source effect:
    log-likelihood per byte with the adapter on minus off, as verify measures it."""

    probes: list[Probe]
    src_start: list[int]
    src_ends: list[list[int]]
    src_delta: list[list[float]] | None
    seconds: float
    sample_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    holdout: list[Probe] = field(default_factory=list)
    holdout_effect: list[float] = field(default_factory=list)
    holdout_seed: int | None = None  # None: no held-out texts were asked for
    # "lm+soft": per text, per scored token, the source's likeliest next tokens there (adapter on or
    # off) as text, each with the adapter's change in its log-probability and its log-probability with
    # the adapter on: [[token, change, log-probability], ...]
    src_next: list[list[list[list[Any]]]] | None = None

    def text_deltas(self) -> list[list[float] | None]:
        """Each text's per-token changes, or None for every text where they were not scored."""
        return list(self.src_delta) if self.src_delta is not None else [None] * len(self.probes)

    def to_json(self) -> dict[str, Any]:
        out = {
            "texts": [
                {**p.to_json(), "source_start": s, "source_token_ends": e, **({"source_token_delta": [round(v, 6) for v in d]} if d is not None else {})}
                for p, s, e, d in zip(self.probes, self.src_start, self.src_ends, self.text_deltas(), strict=True)
            ],
            "seconds": round(self.seconds, 3),
            **self.extra,
        }
        if self.src_next is not None:
            for t, nxt in zip(out["texts"], self.src_next, strict=True):
                t["source_next"] = [[[w, *(round(float(v), 5) for v in vals)] for w, *vals in pos] for pos in nxt]
        if self.holdout_seed is not None:
            texts = [{**p.to_json(), "source_effect": round(v, 9)} for p, v in zip(self.holdout, self.holdout_effect, strict=True)]
            out["holdout"] = {"seed": self.holdout_seed, "texts": texts}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Prepared:
        ps, ss, es, ds = [], [], [], []
        for t in obj["texts"]:
            ps.append(Probe(t["prompt"], t["text"], t["seed"], t["origin"]))
            ss.append(int(t["source_start"]))
            es.append([int(v) for v in t["source_token_ends"]])
            if "source_token_delta" in t:
                ds.append([float(v) for v in t["source_token_delta"]])
        scored = len(ds) == len(ps)  # not scored: no text has them (Prepared.src_delta None)
        extra = {k: v for k, v in obj.items() if k not in ("texts", "seconds", "holdout")}
        held = obj.get("holdout")
        hp = [Probe(t["prompt"], t["text"], t["seed"], t["origin"]) for t in held["texts"]] if held else []
        he = [float(t["source_effect"]) for t in held["texts"]] if held else []
        has_next = bool(obj["texts"]) and "source_next" in obj["texts"][0]
        nxt = [[[[str(w), *(float(v) for v in vals)] for w, *vals in pos] for pos in t["source_next"]] for t in obj["texts"]] if has_next else None
        seed = held["seed"] if held else None
        delta = ds if scored else None
        return cls(ps, ss, es, delta, float(obj.get("seconds", 0.0)), extra=extra, holdout=hp, holdout_effect=he, holdout_seed=seed, src_next=nxt)


def prepare_source(
    src: Checkpoint,
    tok: Any,
    adapter: Path,
    loader: Loader,
    dev: str,
    say: Log,
    *,
    prompts: list[str] | None,
    samples: int,
    contrast_samples: int,
    max_new_tokens: int,
    seed: int,
    user: list[Probe],
    holdout: int = 0,
    selection: str = "plain",
    amplify: float = 0.0,
    chat: bool = False,
    next_top: int = 0,
    token_changes: bool = True,
) -> Prepared:
    """Sample probe and contrast texts from the source (adapter on / off; `prompts` None: the built-in
    ones), score them token by token under both, free the source. `holdout` more texts of source +
    adapter are sampled with their own seed (holdout_seed(seed)) and scored as verify does (source
    effect per byte); a held-out text that is also a training text is left out. `selection`
    "excess" samples twice the adapter's texts (training and held-out alike) and keeps the half that
    shows the adapter most (services/probe_select.py). `chat`: half the adapter's texts are written
    through the source's chat template, its own user turn and its answer (probes.sample_chat_probes),
    where it has one. `next_top` > 0 ("lm+soft"): at each scored token, the source's `next_top`
    likeliest next tokens with the adapter on and with it off are kept too, as text, with the adapter's
    change in each one's log-probability (_changes_and_next). `token_changes` False: the training texts
    are not scored token by token (the objective never reads it; "excess" and `next_top` score them
    anyway). The report states the set's composition."""
    t0 = time.perf_counter()
    loader.tokens = longest_sequence(tok, prompts or list(DEFAULT_PROMPTS), max_new_tokens, user)
    loader.prompt = longest_prompt(tok, prompts or list(DEFAULT_PROMPTS))
    template = chat_opening(tok) if chat else None
    if template is not None:  # the template's tokens, the user turn the source writes, its answer
        asked = len(tok("".join(template), add_special_tokens=False)["input_ids"]) + USER_TURN_TOKENS
        loader.tokens = max(loader.tokens, asked + max_new_tokens)
        loader.prompt = max(loader.prompt, asked)
    base, model = _source_with_adapter(src, adapter, loader, dev)
    shape = loader.shape  # rows sampled together and scoring batches, as the budget allows
    prompts = prompts or list(DEFAULT_PROMPTS)
    n_draw = drawn(selection, samples)
    say(f"sampling {n_draw} texts from source + adapter" + (f" and {contrast_samples} from the source base" if contrast_samples else "") + f" (seed {seed})")
    # `amplify` > 0: half of them sampled with the adapter's effect magnified (probes.sample_probes)
    n_amp = n_draw // 2 if amplify else 0
    kw = {"max_new_tokens": max_new_tokens, "device": dev, "rows": shape.rows}
    chats = sample_chat_probes(model, tok, n_draw // 2, seed=seed, origin="adapter", **kw) if chat else []
    if chat:
        say(
            f"  {len(chats)} of them written through the source's chat template, user turn and answer"
            if chats
            else "  the source's tokenizer has no chat template: all from the prompts"
        )
    probes = chats + sample_probes(model, tok, prompts, n_draw - n_amp - len(chats), seed=seed, origin="adapter", **kw)
    if n_amp:
        say(f"  {n_amp} of them with the adapter's effect amplified (alpha {amplify:g})")
        probes += sample_probes(model, tok, prompts, n_amp, seed=seed, origin="adapter", amplify=amplify, **kw)
    with model.disable_adapter():
        probes += sample_probes(model, tok, prompts, contrast_samples, seed=seed, origin="base", **kw)
    held: list[Probe] = []
    if holdout:
        hs = holdout_seed(seed)
        say(f"sampling {holdout} held-out texts from source + adapter (seed {hs}; not trained on)")
        seen = {(p.prompt, p.text) for p in probes + user}
        fresh = sample_probes(model, tok, prompts, drawn(selection, holdout), seed=hs, origin="adapter", **kw)
        held = [p for p in fresh if (p.prompt, p.text) not in seen]
    sample_s = time.perf_counter() - t0
    probes += user
    if not any(p.origin in ("adapter", "user") for p in probes):
        raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
    enc = [encode(tok, p) for p in probes]
    nxt: list[list[list[list[Any]]]] | None = None
    delta: list[list[float]] | None = None
    if next_top:
        delta, nxt = _changes_and_next(model, tok, enc, dev, vocab_size(src), next_top, shape.logits_bytes)
    elif token_changes or selection == "excess":
        delta = _token_changes(model, enc, dev, vocab_size(src), shape.logits_bytes)
    held, held_effect, held_excess = _source_effects(model, tok, held, dev, vocab_size(src), shape.logits_bytes)
    del model, base
    free()
    starts, ends = [e.start for e in enc], [list(e.ends) for e in enc]
    composition: dict[str, Any] = {"rule": selection, **({"amplified": {"alpha": amplify, "sampled": n_amp}} if amplify else {})}
    if chat:
        composition["chat"] = {"sampled": len(chats)}
    if selection == "excess":
        assert delta is not None  # scored above for this selection
        ad_ix = [i for i, p in enumerate(probes) if p.origin == "adapter"]
        chosen, composition["train"] = select([probes[i].text for i in ad_ix], [excess(delta[i]) for i in ad_ix], samples)
        keep = {ad_ix[k] for k in chosen} | {i for i, p in enumerate(probes) if p.origin != "adapter"}
        probes, starts, ends = ([x[i] for i in sorted(keep)] for x in (probes, starts, ends))
        delta = [delta[i] for i in sorted(keep)]
        nxt = [nxt[i] for i in sorted(keep)] if nxt is not None else None
        if held:
            chosen, composition["holdout"] = select([p.text for p in held], held_excess, holdout)
            held, held_effect = [held[k] for k in chosen], [held_effect[k] for k in chosen]
    prep = Prepared(
        probes,
        starts,
        ends,
        delta,
        time.perf_counter() - t0,
        sample_s,
        extra={"selection": composition} if selection != "plain" or amplify or chat else {},
        src_next=nxt,
    )
    if holdout:
        prep.holdout, prep.holdout_effect, prep.holdout_seed = held, held_effect, holdout_seed(seed)
    return prep


def score_on_source(src: Checkpoint, tok: Any, adapter: Path, loader: Loader, dev: str, texts: list[Probe], extra: dict[str, Any] | None = None) -> Prepared:
    """Texts written elsewhere (refine's on-policy round: by the target + its LoRA) scored by the source
    token by token with its adapter off and on, as prepare_source scores its own samples; the source is
    loaded for this and freed. Texts with nothing to score are left out."""
    t0 = time.perf_counter()
    enc = [encode(tok, p) for p in texts]
    keep = [i for i, e in enumerate(enc) if e.nbytes and len(e.ends)]
    texts, enc = [texts[i] for i in keep], [enc[i] for i in keep]
    loader.tokens = max([len(e.ids) for e in enc], default=1)
    base, model = _source_with_adapter(src, adapter, loader, dev)
    delta = _token_changes(model, enc, dev, vocab_size(src), loader.shape.logits_bytes)
    del model, base
    free()
    return Prepared(texts, [e.start for e in enc], [list(e.ends) for e in enc], delta, time.perf_counter() - t0, extra=dict(extra or {}))


def _source_with_adapter(src: Checkpoint, adapter: Path, loader: Loader, dev: str) -> tuple[Any, Any]:
    """The source model loaded inside the budget (the base, to free later) and wrapped with its adapter, for inference."""
    from peft import PeftModel

    base = loader.load(src)
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="adapter")
    model.to(dev)
    model.eval()
    return base, model


def _on_and_off(model: Any, enc: list[Any], dev: str, vocab: int, logits_bytes: int) -> tuple[list[list[float]], list[list[float]]]:
    """Each encoded text's token log-probabilities with the adapter on, and with it off."""
    with model.disable_adapter():
        lp_base = token_logprobs(model, enc, dev, vocab, logits_bytes)
    return token_logprobs(model, enc, dev, vocab, logits_bytes), lp_base


def _token_changes(model: Any, enc: list[Any], dev: str, vocab: int, logits_bytes: int) -> list[list[float]]:
    """Each encoded text's per-token change in log-probability, adapter on minus off."""
    return [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(*_on_and_off(model, enc, dev, vocab, logits_bytes), strict=True)]


def token_words(tok: Any) -> Callable[[int], str | None]:
    """The text of a token id written alone (after an anchor token, so that a tokenizer which marks a
    word's leading space keeps it: SentencePiece's "\u2581the" is " the"), or None where it is not
    whole text (part of a character's bytes, a special token). Cached per id."""
    anchor = tok("a", add_special_tokens=False)["input_ids"][-1:]
    lead = tok.decode(anchor, clean_up_tokenization_spaces=False)
    special = set(getattr(tok, "all_special_ids", []) or [])
    cache: dict[int, str | None] = {}

    def word(t: int) -> str | None:
        if t not in cache:
            w = tok.decode(anchor + [t], clean_up_tokenization_spaces=False)  # " ." stays " ."
            ok = t not in special and w.startswith(lead) and len(w) > len(lead) and "\ufffd" not in w
            cache[t] = w[len(lead) :] if ok else None
        return cache[t]

    return word


def vocabulary_by_text(tok: Any) -> dict[str, int]:
    """Every token of `tok` that is whole text by itself, by that text (token_words); where two ids write
    the same text, the lower id."""
    word = token_words(tok)
    out: dict[str, int] = {}
    for t in range(len(tok)):
        w = word(t)
        if w is not None and w not in out:
            out[w] = t
    return out


def _changes_and_next(
    model: Any, tok: Any, enc: list[Any], dev: str, vocab: int, top: int, logits_bytes: int
) -> tuple[list[list[float]], list[list[list[list[Any]]]]]:
    """Each encoded text's per-token change in log-probability (adapter on minus off, as _token_changes),
    and at each scored token the `top` likeliest tokens there with the adapter on and with it off (their
    union, as the source tokenizer writes each one alone), each with its change in log-probability.
    A token that is not whole text by itself (part of a character's bytes) is left out: only text
    crosses to the target's vocabulary."""
    changes: list[list[float]] = [[] for _ in enc]
    nexts: list[list[list[list[Any]]]] = [[] for _ in enc]
    word = token_words(tok)
    model.eval()
    for idx, x, mask in length_batches(enc, vocab, copies=2, most=8, logits_bytes=logits_bytes):  # two passes' logits at once
        with torch.inference_mode():
            lp_on = model(input_ids=x.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
            lp_on = lp_on - torch.logsumexp(lp_on, dim=-1, keepdim=True)
            with model.disable_adapter():
                lp_off = model(input_ids=x.to(dev), attention_mask=mask.to(dev)).logits[:, :-1].float()
            lp_off = lp_off - torch.logsumexp(lp_off, dim=-1, keepdim=True)
            nxt = x[:, 1:].to(dev).unsqueeze(-1)
            tok_change = (lp_on.gather(2, nxt) - lp_off.gather(2, nxt)).squeeze(-1).double().cpu()
            ids = torch.cat([lp_on.topk(top, dim=-1).indices, lp_off.topk(top, dim=-1).indices], dim=-1)
            id_on = lp_on.gather(2, ids)
            id_change = (id_on - lp_off.gather(2, ids)).cpu()
            id_on = id_on.cpu()
            ids = ids.cpu()
        del lp_on, lp_off
        for row, j in enumerate(idx):
            e = enc[j]
            if not e.nbytes:
                continue
            lo, hi = e.first - 1, len(e.ids) - 1
            changes[j] = tok_change[row, lo:hi].tolist()
            for pos in range(lo, hi):
                seen: dict[str, tuple[float, float]] = {}
                for t, d, a in zip(ids[row, pos].tolist(), id_change[row, pos].tolist(), id_on[row, pos].tolist(), strict=True):
                    w = word(t)
                    if w is not None:
                        seen.setdefault(w, (d, a))
                nexts[j].append([[w, d, a] for w, (d, a) in seen.items()])
    return changes, nexts


def holdout_seed(seed: int) -> int:
    """The seed of refine's held-out texts: derived from the run's seed, never the one it trains on."""
    return stable_seed(seed, "holdout")


def _source_effects(model: Any, tok: Any, texts: list[Probe], dev: str, vocab: int, logits_bytes: int) -> tuple[list[Probe], list[float], list[float]]:
    """The texts that have something to score, each with its source effect in nats per byte:
    log-likelihood per byte with the adapter on minus off (verify's source_adapter - source_base),
    and its excess (mean |change| per token, probe_select.excess)."""
    if not texts:
        return [], [], []
    enc = [encode(tok, p) for p in texts]
    lp_ad, lp_base = _on_and_off(model, enc, dev, vocab, logits_bytes)
    keep, eff, exc = [], [], []
    for p, e, a, b in zip(texts, enc, lp_ad, lp_base, strict=True):
        if e.nbytes:
            keep.append(p)
            eff.append(math.fsum(a) / e.nbytes - math.fsum(b) / e.nbytes)
            exc.append(excess([x - y for x, y in zip(a, b, strict=True)]))
    return keep, eff, exc


def target_texts(tok: Any, prep: Prepared, soft_teacher: str = "shift") -> list[TrainText]:
    """The probe texts in the target's tokens, each with the source's changes summed over the segments
    both tokenizations share; texts with nothing to score are left out."""
    out = []
    vocab = vocabulary_by_text(tok) if prep.src_next is not None else {}
    for k, (p, s0, se, sd) in enumerate(zip(prep.probes, prep.src_start, prep.src_ends, prep.text_deltas(), strict=True)):
        e = encode(tok, p)
        if e.nbytes == 0 or len(e.ids) - e.first < 1:
            continue
        # not scored (an objective that never reads them): no segments
        seg, delta = segments(s0, se, e.start, list(e.ends), sd) if sd is not None else ([-1] * len(e.ends), [])
        nxt = prep.src_next[k] if prep.src_next is not None and p.origin == "adapter" else None
        soft = soft_sets(s0, se, nxt, e.start, list(e.ends), vocab, SOFT_VALUE[soft_teacher]) if nxt is not None else None
        out.append(TrainText(e.ids, e.first, seg, delta, p.origin, e.nbytes, soft=soft))
    return out


# lm+soft's teachers: which of a candidate's stored values ([token, change, log-probability]) its
# teacher logit adds to the target base's ("shift": the change) or stands on alone ("source": the
# source + adapter's own log-probability; services/distill.py).
SOFT_VALUE = {"shift": 1, "source": 2}


def soft_sets(
    src_start: int,
    src_ends: list[int],
    src_next: list[list[list[Any]]],
    tgt_start: int,
    tgt_ends: list[int],
    vocab: dict[str, int],
    value: int = 1,
) -> list[tuple[int, list[int], list[float]]]:
    """The "lm+soft" positions on the target's side: each scored target token that starts where a scored
    source token starts (a boundary of both tokenizations, by character), with the source's next-token
    candidates there that the target's vocabulary writes alike (`vocab`: text -> target id), at least
    two, and each candidate's stored value at index `value` (SOFT_VALUE)."""
    # character -> the source position whose token starts there; a token of no width (a piece of a
    # character's bytes, which byte-level tokenizers give the same end) starts mid-character: never a boundary
    src_at = {c: i for i, (c, e) in enumerate(zip([src_start, *src_ends[:-1]], src_ends, strict=True)) if e > c}
    out = []
    for j, (c, e) in enumerate(zip([tgt_start, *tgt_ends[:-1]], tgt_ends, strict=True)):
        i = src_at.get(c) if e > c else None
        if i is None or i >= len(src_next):
            continue
        ids, deltas, seen = [], [], set()
        for cand in src_next[i]:
            t = vocab.get(cand[0])
            if t is not None and t not in seen:
                seen.add(t)
                ids.append(t)
                deltas.append(float(cand[value]))
        if len(ids) >= 2:
            out.append((j, ids, deltas))
    return out
