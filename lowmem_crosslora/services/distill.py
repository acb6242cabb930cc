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

The vocabulary projection is the memory hog of a small model (Qwen2.5's 151,936 entries x 4 bytes
a token): logits are made, used and dropped a few hundred rows at a time, recomputed for the
backward pass (torch.utils.checkpoint), so no batch ever holds a (tokens x vocabulary) matrix.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lowmem_crosslora.dtypes import name_bytes
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, Probe, sample_probes, stable_seed
from lowmem_crosslora.services.scoring import Loader, encode, free, token_logprobs, vocab_size

OBJECTIVES = ("lm", "delta", "lm+kl")
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
) -> Prepared:
    """Sample probe and contrast texts from the source (adapter on / off; `prompts` None: the built-in
    ones), score them token by token under both, free the source. `holdout` more texts of source +
    adapter are sampled with their own seed (holdout_seed(seed)) and scored as verify does (source
    effect per byte); a held-out text that is also a training text is left out."""
    from peft import PeftModel

    t0 = time.perf_counter()
    base = loader.load(src)
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name="adapter")
    model.to(dev)
    model.eval()
    prompts = prompts or list(DEFAULT_PROMPTS)
    say(f"sampling {samples} texts from source + adapter and {contrast_samples} from the source base (seed {seed})")
    probes = sample_probes(model, tok, prompts, samples, max_new_tokens=max_new_tokens, seed=seed, origin="adapter", device=dev)
    with model.disable_adapter():
        probes += sample_probes(model, tok, prompts, contrast_samples, max_new_tokens=max_new_tokens, seed=seed, origin="base", device=dev)
    held: list[Probe] = []
    if holdout:
        hs = holdout_seed(seed)
        say(f"sampling {holdout} held-out texts from source + adapter (seed {hs}; not trained on)")
        seen = {(p.prompt, p.text) for p in probes + user}
        drawn = sample_probes(model, tok, prompts, holdout, max_new_tokens=max_new_tokens, seed=hs, origin="adapter", device=dev)
        held = [p for p in drawn if (p.prompt, p.text) not in seen]
    sample_s = time.perf_counter() - t0
    probes += user
    if not any(p.origin in ("adapter", "user") for p in probes):
        raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
    enc = [encode(tok, p) for p in probes]
    with model.disable_adapter():
        lp_base = token_logprobs(model, enc, dev, vocab_size(src))
    lp_ad = token_logprobs(model, enc, dev, vocab_size(src))
    held, held_effect = _source_effects(model, tok, held, dev, vocab_size(src))
    del model, base
    free()
    delta = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(lp_ad, lp_base, strict=True)]
    prep = Prepared(probes, [e.start for e in enc], [list(e.ends) for e in enc], delta, time.perf_counter() - t0, sample_s)
    if holdout:
        prep.holdout, prep.holdout_effect, prep.holdout_seed = held, held_effect, holdout_seed(seed)
    return prep


def holdout_seed(seed: int) -> int:
    """The seed of refine's held-out texts: derived from the run's seed, never the one it trains on."""
    return stable_seed(seed, "holdout")


def _source_effects(model: Any, tok: Any, texts: list[Probe], dev: str, vocab: int) -> tuple[list[Probe], list[float]]:
    """The texts that have something to score, each with its source effect in nats per byte:
    log-likelihood per byte with the adapter on minus off (verify's source_adapter - source_base)."""
    if not texts:
        return [], []
    enc = [encode(tok, p) for p in texts]
    with model.disable_adapter():
        lp_base = token_logprobs(model, enc, dev, vocab)
    lp_ad = token_logprobs(model, enc, dev, vocab)
    keep, eff = [], []
    for p, e, a, b in zip(texts, enc, lp_ad, lp_base, strict=True):
        if e.nbytes:
            keep.append(p)
            eff.append(math.fsum(a) / e.nbytes - math.fsum(b) / e.nbytes)
    return keep, eff


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


def _chunk_rows(vocab: int) -> int:
    return max(8, LOGIT_CHUNK_BYTES // (4 * 4 * vocab))


def token_logprobs_grad(head: Any, cap: float | None, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target token) for each row of hidden states `h` (N x H), with gradients, in chunks whose
    logits are recomputed in the backward pass instead of kept."""

    def piece(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(_logits(head, hc, cap), dim=-1)
        return logp.gather(1, tc.unsqueeze(1)).squeeze(1)

    rows = _chunk_rows(head.weight.shape[0])
    parts = [checkpoint(piece, h[i : i + rows], targets[i : i + rows], use_reentrant=False) for i in range(0, h.shape[0], rows)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


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
    return TrainText(t.ids[:max_len], t.first, seg, t.delta_s[:nseg], t.origin, t.nbytes, base)


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


def batch_loss(
    model: Any, objective: str, main: list[TrainText], contrast: list[TrainText], norm: dict[str, float], device: str, kl_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch, already divided by the whole batch's counts in `norm` (so that
    micro-batches add up to the batch's mean), and its parts (for the progress line)."""
    _decoder, head, cap = _causal_parts(model)
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=device)
    if objective in ("lm", "lm+kl") and main:
        x, mask = _pad(main, device)
        h = hidden(model, x, mask)
        ri, ci, _spans = _scored(main, x)
        lp = token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1])
        nll = -lp.sum() / norm["tokens"]
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
    if objective == "delta":
        texts = main + contrast
        if texts:
            x, mask = _pad(texts, device)
            h = hidden(model, x, mask)
            ri, ci, spans = _scored(texts, x)
            lp = token_logprobs_grad(head, cap, h[ri, ci], x[ri, ci + 1])
            sq = torch.zeros((), device=device)
            for t, (a, b) in zip(texts, spans, strict=True):
                if not t.delta_s:
                    continue
                seg = torch.tensor(t.seg, dtype=torch.long, device=device)
                keep = seg >= 0
                assert t.base_lp is not None, "base_token_logprobs must run before the delta objective"
                change = lp[a:b] - torch.tensor(t.base_lp, dtype=torch.float32, device=device)
                per_seg = torch.zeros(len(t.delta_s), device=device).index_add(0, seg[keep], change[keep])
                sq = sq + ((per_seg - torch.tensor(t.delta_s, dtype=torch.float32, device=device)) ** 2).sum()
            mse = sq / norm["segments"]
            loss = loss + mse
            parts["mse"] = float(mse.detach())
    return loss, parts


def batch_norms(objective: str, main: list[TrainText], contrast: list[TrainText]) -> dict[str, float]:
    """Counts of the whole batch that each loss term is averaged over."""
    # A text cut inside its prompt (shorter than `first`) has no scored tokens left: it counts none.
    tokens = sum(max(0, len(t.ids) - t.first) for t in main)
    ctokens = sum(max(0, len(t.ids) - t.first) for t in contrast)
    segs = sum(len(t.delta_s) for t in main + contrast)
    return {"tokens": max(1, tokens), "contrast_tokens": max(1, ctokens), "segments": max(1, segs)}


# ---- training checkpoints ----------------------------------------------------------------------


def lora_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    path: Path,
    model: Any,
    opt: Any,
    step: int,
    losses: list[dict[str, float]],
    fp: str,
    shape: TrainShape,
    seconds: float,
    extra: dict[str, Any] | None = None,
) -> None:
    """The training state after `step` (LoRA, optimiser, losses, shape, and `extra`: e.g. the held-out
    evaluations and the best step's LoRA), written atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(
            {
                "fingerprint": fp,
                "step": step,
                "lora": lora_state(model),
                "optimizer": opt.state_dict(),
                "losses": losses,
                "shape": shape.to_json(),
                "seconds": seconds,
                **(extra or {}),
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it is readable and was made by the run with fingerprint `fp`, else None."""
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint is redone from the start, never trusted
        return None
    return ck if isinstance(ck, dict) and ck.get("fingerprint") == fp else None


# ---- memory model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainShape:
    """What the budget allows: texts per forward pass, longest text (target tokens), checkpointing."""

    micro_batch: int
    max_len: int
    checkpointing: bool
    weights_dtype: str
    bytes: int  # modelled working memory
    # What the frozen weights compute in ("" = their own dtype) and why (compute.py); float32 compute
    # on bfloat16 weights is the upcast path (one float32 block of a weight alive at a time).
    compute_dtype: str = ""
    compute: str = ""

    @property
    def upcast(self) -> bool:
        return self.compute_dtype == "float32" and self.weights_dtype != "float32"

    def to_json(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "max_len": self.max_len,
            "gradient_checkpointing": self.checkpointing,
            "weights_dtype": self.weights_dtype,
            "modelled_bytes": self.bytes,
            "compute_dtype": self.compute_dtype or self.weights_dtype,
            "compute": self.compute,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainShape:
        return cls(
            obj["micro_batch"],
            obj["max_len"],
            obj["gradient_checkpointing"],
            obj["weights_dtype"],
            obj["modelled_bytes"],
            obj.get("compute_dtype", obj["weights_dtype"]),
            obj.get("compute", ""),
        )


def train_bytes(cfg: dict[str, Any], params: int, lora_params: int, weights_bytes: int, micro: int, seq: int, ckpt: bool, passes: int) -> int:
    """Modelled working memory of one training step on the target.

    Weights (frozen, `weights_bytes` per parameter); LoRA parameters with their gradients and two
    AdamW moments (float32); activations kept for the backward pass, per token and layer: with
    gradient checkpointing only the layer's input (H) plus one layer being recomputed, without it
    every layer's intermediates (about 16 H + 4 I values, attention scores heads x T); the
    vocabulary projection in chunks of LOGIT_CHUNK_BYTES (kept alive twice: forward and recompute);
    `passes` forward passes alive at once (the KL term holds a second, ungraded one's final state)."""
    H = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    inter = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * H)
    L = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    act = 4  # activations of a float32 LoRA path and the upcast norms dominate; bfloat16 halves some
    per_layer_token = (16 * H + 4 * inter) * act + heads * seq * act * 2
    tokens = micro * seq
    if ckpt:
        acts = tokens * (L * H * act + per_layer_token)
    else:
        acts = tokens * L * per_layer_token
    acts *= passes
    return int(params * weights_bytes + 16 * lora_params + acts + 2 * LOGIT_CHUNK_BYTES + 64 * 1024**2)


def choose_shape(
    cfg: dict[str, Any], params: int, lora_params: int, room: int, batch: int, longest: int, passes: int, dtypes: tuple[str, ...], extra: int = 0
) -> TrainShape | None:
    """The fastest shape that fits `room`: the most texts per pass (fewer passes of gradient
    accumulation: the same step), without gradient checkpointing where that fits, else with it; then
    shorter texts (down to 32 tokens). The first of `dtypes` whose weights fit. `extra`: bytes the
    compute path holds besides (the upcast path's float32 blocks, compute.upcast_bytes). None when
    nothing fits."""
    for dt in dtypes:
        wb = name_bytes(dt)
        for seq in _lengths(longest):
            for micro in range(batch, 0, -1):
                for ckpt in (False, True):
                    need = train_bytes(cfg, params, lora_params, wb, micro, seq, ckpt, passes) + extra
                    if need <= room:
                        return TrainShape(micro, seq, ckpt, dt, need)
    return None


def smallest_room(cfg: dict[str, Any], params: int, lora_params: int, longest: int, passes: int, dtype: str, extra: int = 0) -> int:
    size = name_bytes(dtype)
    return train_bytes(cfg, params, lora_params, size, 1, min(longest, 32), True, passes) + extra


def _lengths(longest: int) -> list[int]:
    out = [longest]
    n = longest
    while n > 32:
        n = max(32, n * 3 // 4)
        out.append(n)
    return out
