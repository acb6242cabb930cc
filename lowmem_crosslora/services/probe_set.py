"""refine's probe set: texts sampled from source + adapter (and the source base), the source's per-token
changes on them, the held-out split, and their tokenization on the target's side (services/distill.py
holds the losses; docs/METHOD.md section 7)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.distill import TrainText, segments
from lowmem_crosslora.services.probe_select import drawn, excess, select
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, USER_TURN_TOKENS, Probe, chat_opening, sample_chat_probes, sample_probes, stable_seed
from lowmem_crosslora.services.scoring import Loader, Log, encode, free, longest_sequence, token_logprobs, vocab_size


@dataclass
class Prepared:
    """The source's contribution, computed once and kept in the state folder: probe texts and, per
    text, the source's token ends and per-token change in log-probability (adapter on minus off).
    The held-out texts (never trained on) come with their own seed and, per text, the source effect:
    log-likelihood per byte with the adapter on minus off, as verify measures it."""

    probes: list[Probe]
    src_start: list[int]
    src_ends: list[list[int]]
    src_delta: list[list[float]]
    seconds: float
    sample_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    holdout: list[Probe] = field(default_factory=list)
    holdout_effect: list[float] = field(default_factory=list)
    holdout_seed: int | None = None  # None: no held-out texts were asked for

    def to_json(self) -> dict[str, Any]:
        out = {
            "texts": [
                {**p.to_json(), "source_start": s, "source_token_ends": e, "source_token_delta": [round(v, 6) for v in d]}
                for p, s, e, d in zip(self.probes, self.src_start, self.src_ends, self.src_delta, strict=True)
            ],
            "seconds": round(self.seconds, 3),
            **self.extra,
        }
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
            ds.append([float(v) for v in t["source_token_delta"]])
        extra = {k: v for k, v in obj.items() if k not in ("texts", "seconds", "holdout")}
        held = obj.get("holdout")
        hp = [Probe(t["prompt"], t["text"], t["seed"], t["origin"]) for t in held["texts"]] if held else []
        he = [float(t["source_effect"]) for t in held["texts"]] if held else []
        return cls(ps, ss, es, ds, float(obj.get("seconds", 0.0)), extra=extra, holdout=hp, holdout_effect=he, holdout_seed=held["seed"] if held else None)


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
) -> Prepared:
    """Sample probe and contrast texts from the source (adapter on / off; `prompts` None: the built-in
    ones), score them token by token under both, free the source. `holdout` more texts of source +
    adapter are sampled with their own seed (holdout_seed(seed)) and scored as verify does (source
    effect per byte); a held-out text that is also a training text is left out. `selection`
    "excess" samples twice the adapter's texts (training and held-out alike) and keeps the half that
    shows the adapter most (services/probe_select.py). `chat`: half the adapter's texts are written
    through the source's chat template, its own user turn and its answer (probes.sample_chat_probes),
    where it has one. The report states the set's composition."""
    t0 = time.perf_counter()
    loader.tokens = longest_sequence(tok, prompts or list(DEFAULT_PROMPTS), max_new_tokens, user)
    template = chat_opening(tok) if chat else None
    if template is not None:  # the template's tokens, the user turn the source writes, its answer
        loader.tokens = max(loader.tokens, len(tok("".join(template), add_special_tokens=False)["input_ids"]) + USER_TURN_TOKENS + max_new_tokens)
    base, model = _source_with_adapter(src, adapter, loader, dev)
    prompts = prompts or list(DEFAULT_PROMPTS)
    n_draw = drawn(selection, samples)
    say(f"sampling {n_draw} texts from source + adapter" + (f" and {contrast_samples} from the source base" if contrast_samples else "") + f" (seed {seed})")
    # `amplify` > 0: half of them sampled with the adapter's effect magnified (probes.sample_probes)
    n_amp = n_draw // 2 if amplify else 0
    chats = sample_chat_probes(model, tok, n_draw // 2, max_new_tokens=max_new_tokens, seed=seed, origin="adapter", device=dev) if chat else []
    if chat:
        say(
            f"  {len(chats)} of them written through the source's chat template, user turn and answer"
            if chats
            else "  the source's tokenizer has no chat template: all from the prompts"
        )
    probes = chats + sample_probes(model, tok, prompts, n_draw - n_amp - len(chats), max_new_tokens=max_new_tokens, seed=seed, origin="adapter", device=dev)
    if n_amp:
        say(f"  {n_amp} of them with the adapter's effect amplified (alpha {amplify:g})")
        probes += sample_probes(model, tok, prompts, n_amp, max_new_tokens=max_new_tokens, seed=seed, origin="adapter", device=dev, amplify=amplify)
    with model.disable_adapter():
        probes += sample_probes(model, tok, prompts, contrast_samples, max_new_tokens=max_new_tokens, seed=seed, origin="base", device=dev)
    held: list[Probe] = []
    if holdout:
        hs = holdout_seed(seed)
        say(f"sampling {holdout} held-out texts from source + adapter (seed {hs}; not trained on)")
        seen = {(p.prompt, p.text) for p in probes + user}
        fresh = sample_probes(model, tok, prompts, drawn(selection, holdout), max_new_tokens=max_new_tokens, seed=hs, origin="adapter", device=dev)
        held = [p for p in fresh if (p.prompt, p.text) not in seen]
    sample_s = time.perf_counter() - t0
    probes += user
    if not any(p.origin in ("adapter", "user") for p in probes):
        raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
    enc = [encode(tok, p) for p in probes]
    delta = _token_changes(model, enc, dev, vocab_size(src))
    held, held_effect, held_excess = _source_effects(model, tok, held, dev, vocab_size(src))
    del model, base
    free()
    starts, ends = [e.start for e in enc], [list(e.ends) for e in enc]
    composition: dict[str, Any] = {"rule": selection, **({"amplified": {"alpha": amplify, "sampled": n_amp}} if amplify else {})}
    if chat:
        composition["chat"] = {"sampled": len(chats)}
    if selection == "excess":
        ad_ix = [i for i, p in enumerate(probes) if p.origin == "adapter"]
        chosen, composition["train"] = select([probes[i].text for i in ad_ix], [excess(delta[i]) for i in ad_ix], samples)
        keep = {ad_ix[k] for k in chosen} | {i for i, p in enumerate(probes) if p.origin != "adapter"}
        probes, starts, ends, delta = ([x[i] for i in sorted(keep)] for x in (probes, starts, ends, delta))
        if held:
            chosen, composition["holdout"] = select([p.text for p in held], held_excess, holdout)
            held, held_effect = [held[k] for k in chosen], [held_effect[k] for k in chosen]
    prep = Prepared(
        probes, starts, ends, delta, time.perf_counter() - t0, sample_s, extra={"selection": composition} if selection != "plain" or amplify or chat else {}
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
    delta = _token_changes(model, enc, dev, vocab_size(src))
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


def _on_and_off(model: Any, enc: list[Any], dev: str, vocab: int) -> tuple[list[list[float]], list[list[float]]]:
    """Each encoded text's token log-probabilities with the adapter on, and with it off."""
    with model.disable_adapter():
        lp_base = token_logprobs(model, enc, dev, vocab)
    return token_logprobs(model, enc, dev, vocab), lp_base


def _token_changes(model: Any, enc: list[Any], dev: str, vocab: int) -> list[list[float]]:
    """Each encoded text's per-token change in log-probability, adapter on minus off."""
    return [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(*_on_and_off(model, enc, dev, vocab), strict=True)]


def holdout_seed(seed: int) -> int:
    """The seed of refine's held-out texts: derived from the run's seed, never the one it trains on."""
    return stable_seed(seed, "holdout")


def _source_effects(model: Any, tok: Any, texts: list[Probe], dev: str, vocab: int) -> tuple[list[Probe], list[float], list[float]]:
    """The texts that have something to score, each with its source effect in nats per byte:
    log-likelihood per byte with the adapter on minus off (verify's source_adapter - source_base),
    and its excess (mean |change| per token, probe_select.excess)."""
    if not texts:
        return [], [], []
    enc = [encode(tok, p) for p in texts]
    lp_ad, lp_base = _on_and_off(model, enc, dev, vocab)
    keep, eff, exc = [], [], []
    for p, e, a, b in zip(texts, enc, lp_ad, lp_base, strict=True):
        if e.nbytes:
            keep.append(p)
            eff.append(math.fsum(a) / e.nbytes - math.fsum(b) / e.nbytes)
            exc.append(excess([x - y for x, y in zip(a, b, strict=True)]))
    return keep, eff, exc


def target_texts(tok: Any, prep: Prepared) -> list[TrainText]:
    """The probe texts in the target's tokens, each with the source's changes summed over the segments
    both tokenizations share; texts with nothing to score are left out."""
    out = []
    for p, s0, se, sd in zip(prep.probes, prep.src_start, prep.src_ends, prep.src_delta, strict=True):
        e = encode(tok, p)
        if e.nbytes == 0 or len(e.ids) - e.first < 1:
            continue
        seg, delta = segments(s0, se, e.start, list(e.ends), sd)
        out.append(TrainText(e.ids, e.first, seg, delta, p.origin, e.nbytes))
    return out
