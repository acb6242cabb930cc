"""Probe texts: what stands for an adapter's behaviour when its training data is gone.

Texts cross the tokenizer gap, token ids do not, so a probe is text: a prompt (context, possibly
empty) and a continuation. `sample_probes` draws continuations from whatever model it is given (the
source with its adapter on, or off for neutral contrast texts), seeded per prompt, so the same
prompts, counts and seed give the same texts. `read_prompts` / `read_texts` read the user's own.

transformers and peft are optional (the `[verify]` extra); they are imported lazily, inside the
functions that need them, so the transfer keeps working without them.
"""

from __future__ import annotations

import inspect
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_crosslora.errors import InputError

PROBES_NAME = "refine_probes.json"  # the probe texts refine trained on, kept in its output folder
INSTALL_HINT = "pip install 'lowmem-crosslora[verify]'"

# Neutral openings: no style, no task, no domain the adapter could have been trained on.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The weather this morning",
    "Here is a short story about a village.",
    "My favourite thing about weekends is",
    "The history of the bicycle",
    "Yesterday I went to the market and",
    "A good breakfast",
    "The town library opens at nine.",
    "Some thoughts on learning a new language:",
    "The river runs past the old mill",
    "When the train arrived,",
    "Instructions for planting tomatoes:",
    "Dear Sam,",
    "The museum's newest exhibit",
    "It was the first warm day of spring.",
    "A letter to the editor about parking",
    "Notes from the meeting:",
)


@dataclass(frozen=True)
class Probe:
    """One probe text: `text` continues `prompt` (scored given the prompt); `origin` says where it came from
    ("adapter": sampled with the adapter on, "base": sampled from the base model, "user": --texts)."""

    prompt: str
    text: str
    seed: int | None
    origin: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def require_extras(command: str = "verify") -> None:
    """transformers and peft must be importable; InputError (exit 2) with the install line otherwise."""
    missing = []
    for name in ("transformers", "peft"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"{command} needs {' and '.join(missing)}, which are not installed; install them with: {INSTALL_HINT}")


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from a key (the same on every platform and Python version)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped; a line may be a JSON string to hold newlines."""
    lines = _read_lines(path, "--prompts")
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.startswith('"'):
            try:
                line = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"--prompts {path}: line {i} starts with a quote but is not a JSON string") from None
        prompts.append(str(line))
    if not prompts:
        raise InputError(f"--prompts {path}: no prompts in the file")
    return prompts


def read_texts(path: str | Path) -> list[Probe]:
    """The user's own texts. `.jsonl`: one JSON object a line with "text" (and optionally "prompt"), or a
    JSON string; any other file: plain text, texts separated by blank lines."""
    p = Path(path)
    lines = _read_lines(p, "--texts")
    out: list[Probe] = []
    if p.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"--texts {p}: line {i} is not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"text": obj}
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f'--texts {p}: line {i} must be a JSON string or an object with a "text" string')
            out.append(Probe(str(obj.get("prompt") or ""), obj["text"], None, "user"))
    else:
        block: list[str] = []
        for line in [*lines, ""]:
            if line.strip():
                block.append(line)
            elif block:
                out.append(Probe("", "\n".join(block), None, "user"))
                block = []
    out = [t for t in out if t.text.strip()]
    if not out:
        raise InputError(f"--texts {p}: no texts in the file")
    return out


def _read_lines(path: str | Path, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path}: cannot read it as UTF-8 text ({e})") from None


def prefix_ids(tokenizer: Any) -> list[int]:
    """The token that starts a document for this tokenizer (BOS, else EOS as a separator), or nothing."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return [int(tid)]
    return []


def counts_per_prompt(n: int, prompts: int) -> list[int]:
    """n samples spread over the prompts in turn (the first n % prompts get one more)."""
    return [n // prompts + (1 if i < n % prompts else 0) for i in range(prompts)]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def sample_probes(
    model: Any,
    tokenizer: Any,
    prompts: list[str] | tuple[str, ...],
    n: int,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    origin: str = "adapter",
    device: str = "cpu",
    top_p: float = 0.95,
    temperature: float = 1.0,
    min_bytes: int = 4,
    rows: int = 48,
    amplify: float = 0.0,
) -> list[Probe]:
    """n continuations sampled from `model` (a transformers or PEFT causal LM, as it is: toggle an adapter
    around the call) on `prompts` in turn (nucleus sampling, `top_p`, `temperature`).

    Continuations are generated `rows` at a time in one batch (left-padded, one KV cache): a small
    model's step is bound by reading its weights, so one pass for many rows is many times faster than
    a pass per prompt. Each row draws its random numbers from its own generator, seeded by (seed,
    origin, prompt index, prompt, sample index), so a text does not depend on which other rows share
    its batch (up to the float rounding of the batch's matrix products). Continuations shorter than
    `min_bytes` (an immediate end of text) are dropped. `amplify` > 0 (a PEFT model with its adapter
    on) samples from logits_A + amplify (logits_A - logits_base), the adapter's effect magnified, its
    rows seeded apart from plain samples' (a candidate of issue 16's, measured in bench_refine.py)."""
    if n <= 0:
        return []
    if not prompts:
        raise InputError("no prompts to sample probe texts from")
    pre = prefix_ids(tokenizer)
    jobs: list[tuple[str, list[int], int]] = []  # (prompt, its ids, row seed)
    for i, (prompt, k) in enumerate(zip(prompts, counts_per_prompt(n, len(prompts)), strict=False)):
        ids = pre + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if k and not ids:
            raise InputError("an empty prompt needs a tokenizer with a BOS or EOS token to start from")
        label = f"{origin}*{amplify:g}" if amplify else origin
        jobs.extend((prompt, ids, stable_seed("probe", seed, label, i, prompt, j)) for j in range(k))
    eos = _eos_ids(model, tokenizer)
    out: list[Probe] = []
    was_training = model.training
    model.eval()
    try:
        for c in range(0, len(jobs), max(1, rows)):
            chunk = jobs[c : c + max(1, rows)]
            for (prompt, _ids, s), row in zip(
                chunk, _sample_rows(model, [j[1] for j in chunk], [j[2] for j in chunk], eos, max_new_tokens, top_p, temperature, device, amplify), strict=True
            ):
                text = tokenizer.decode(row, skip_special_tokens=True)
                if len(text.encode("utf-8")) >= min_bytes:
                    out.append(Probe(prompt, text, s, origin))
    finally:
        model.train(was_training)
    return out


# A user turn the source writes itself (sample_chat_probes) is at most this many tokens.
USER_TURN_TOKENS = 40
_MARK = "\u2063\u2063user-turn\u2063\u2063"  # invisible separators: text no template writes itself


def chat_opening(tokenizer: Any) -> tuple[str, str] | None:
    """The tokenizer's chat template split around a user's message: (text before it, text after it up
    to the assistant's turn), or None where it has no template (or one that does not show the message)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that needs more than one user message, or other roles
        return None
    if not isinstance(text, str) or text.count(_MARK) != 1:
        return None
    before, after = text.split(_MARK)
    return before, after


def sample_chat_probes(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    max_new_tokens: int = 64,
    seed: int = 0,
    origin: str = "adapter",
    device: str = "cpu",
    top_p: float = 0.95,
    temperature: float = 1.0,
    min_bytes: int = 4,
    rows: int = 48,
) -> list[Probe]:
    """n probes whose prompts the model writes itself (the "Magpie" trick): fed only its chat
    template's opening of a user turn, it writes a user's message (up to USER_TURN_TOKENS, to its
    end-of-turn token), then, the message wrapped in the template, answers it. Each probe is the plain
    message (a line) and the plain answer, no template tokens, so the target reads them as any other
    text. Empty where the tokenizer has no chat template. Rows are seeded as sample_probes seeds them."""
    parts = chat_opening(tokenizer)
    if n <= 0 or parts is None:
        return []
    before, after = parts
    opening = tokenizer(before, add_special_tokens=False)["input_ids"]
    eos = _eos_ids(model, tokenizer)
    seeds = [stable_seed("chat", seed, origin, j) for j in range(n)]
    was_training = model.training
    model.eval()
    out: list[Probe] = []
    try:
        step = max(1, rows)
        for c in range(0, n, step):
            chunk = seeds[c : c + step]
            users = [
                tokenizer.decode(r, skip_special_tokens=True).strip()
                for r in _sample_rows(model, [opening] * len(chunk), chunk, eos, USER_TURN_TOKENS, top_p, temperature, device)
            ]
            kept = [(u, s) for u, s in zip(users, chunk, strict=True) if len(u.encode("utf-8")) >= min_bytes]
            if not kept:
                continue
            asks = [tokenizer(before + u + after, add_special_tokens=False)["input_ids"] for u, _ in kept]
            answers = _sample_rows(model, asks, [stable_seed("chat-answer", s) for _, s in kept], eos, max_new_tokens, top_p, temperature, device)
            for (u, s), row in zip(kept, answers, strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                if len(text.encode("utf-8")) >= min_bytes:
                    out.append(Probe(" ".join(u.split()) + "\n", text, s, origin))
    finally:
        model.train(was_training)
    return out


# nucleus_pick sorts only this many of the most probable tokens per row, the whole vocabulary only for
# a row whose top ones hold less than top_p of its mass: sorting 48 rows of a 49k vocabulary was a
# quarter of refine's sampling time (pyinstrument, SmolLM2-135M source).
NUCLEUS_TOP = 1024


def _pick_sorted(sp: torch.Tensor, idx: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Tokens drawn at `u` (rows x 1, uniform) from probabilities `sp` sorted descending (ids `idx`), cut
    to the smallest prefix holding `top_p` of the mass."""
    cum = sp.cumsum(-1)
    sp = sp.masked_fill(cum - sp >= top_p, 0.0)
    cdf = (sp / sp.sum(-1, keepdim=True)).cumsum(-1)
    pick = torch.searchsorted(cdf, u).clamp(max=cdf.shape[1] - 1)
    return idx.gather(1, pick).squeeze(1)


def _by_probability(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values` and their `ids` ordered by value, descending, equal values by id, ascending (a total
    order: the same whatever order they came in)."""
    by_id = ids.argsort(dim=-1)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = values.sort(dim=-1, descending=True, stable=True).indices
    return values.gather(1, order), ids.gather(1, order)


def nucleus_pick(probs: torch.Tensor, top_p: float, u: torch.Tensor, top: int = NUCLEUS_TOP) -> torch.Tensor:
    """Nucleus (top-p) sampling of one token per row of `probs` at uniforms `u` (rows x 1), over the row
    ordered by probability, equal probabilities by token id (bfloat16 logits tie often; an unstable
    sort would break ties as it happens to). From the row's `top` most probable tokens where the
    nucleus ends strictly above the least of them (no other token can be in it, nor change its order),
    from the whole row elsewhere: the same draw either way, up to the rounding of the normalising sum.
    Where most rows need the whole row (a flat model), it sorts them all in place of copies: no more
    memory than sorting every row, which the sampling memory model (scoring.inference_bytes) counts."""
    rows, k = probs.shape[0], min(top, probs.shape[-1])
    if k < probs.shape[-1]:
        sp, idx = _by_probability(*probs.topk(k, dim=-1))
        cum = sp.cumsum(-1)
        last = (cum - sp < top_p).sum(-1, keepdim=True).clamp(max=k) - 1  # the nucleus's last position
        # a margin over top_p: a row near the edge takes the whole sort rather than trust a rounding
        wide = ((cum[:, -1] < top_p + 1e-4) | (sp.gather(1, last).squeeze(1) <= sp[:, -1])).nonzero().flatten()
        if 2 * len(wide) <= rows:
            tok = _pick_sorted(sp, idx, top_p, u)
            del sp, idx, cum
            if len(wide):
                sw, iw = probs[wide].sort(dim=-1, descending=True, stable=True)
                tok[wide] = _pick_sorted(sw, iw, top_p, u[wide])
            return tok
        del sp, idx, cum
    sp, idx = probs.sort(dim=-1, descending=True, stable=True)
    return _pick_sorted(sp, idx, top_p, u)


def _sample_rows(
    model: Any, prompts: list[list[int]], seeds: list[int], eos: set[int], steps: int, top_p: float, temperature: float, device: str, amplify: float = 0.0
) -> list[list[int]]:
    """Sample `steps` tokens after each prompt (token ids), a row each, with the KV cache; a row stops at
    an end-of-text token (not returned)."""

    B, T = len(prompts), max(len(p) for p in prompts)
    x = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for r, p in enumerate(prompts):
        x[r, T - len(p) :] = torch.tensor(p)
        mask[r, T - len(p) :] = 1
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    x, mask, pos = x.to(device), mask.to(device), pos.to(device)
    done = torch.zeros(B, dtype=torch.bool)
    rows: list[list[int]] = [[] for _ in range(B)]
    eos_t = torch.tensor(sorted(eos), dtype=torch.long) if eos else None
    # transformers 5 names the KV cache argument `cache` (older releases: past_key_values).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    with torch.inference_mode():
        # Logits of every prompt position (rows x prompt x vocabulary, once): logits_to_keep=1 would save
        # them but, measured on a PEFT-wrapped bfloat16 Qwen2.5-0.5B, turns 0.5 s into 22 s and 5 GB.
        res = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True)
        past = _cache_of(res)
        res_b = past_b = None
        if amplify:  # the base's logits beside, with a cache of their own
            with model.disable_adapter():
                res_b = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True)
            past_b = _cache_of(res_b)
        nxt_pos = pos[:, -1:] + 1
        for _step in range(steps):
            logits = res.logits[:, -1].float().cpu()
            if res_b is not None:
                logits = logits + amplify * (logits - res_b.logits[:, -1].float().cpu())
            probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
            u = torch.tensor([float(torch.rand((), generator=g, dtype=torch.float64)) for g in gens], dtype=probs.dtype).unsqueeze(1)
            tok = nucleus_pick(probs, top_p, u)
            for r in range(B):
                if done[r]:
                    continue
                t = int(tok[r])
                if eos_t is not None and t in eos:
                    done[r] = True
                else:
                    rows[r].append(t)
            if bool(done.all()) or _step == steps - 1:  # the last token drawn needs no forward pass after it
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            res = model(input_ids=tok.unsqueeze(1).to(device), attention_mask=mask, position_ids=nxt_pos, use_cache=True, **{cache_arg: past})
            past = _cache_of(res)
            if res_b is not None:
                with model.disable_adapter():
                    res_b = model(input_ids=tok.unsqueeze(1).to(device), attention_mask=mask, position_ids=nxt_pos, use_cache=True, **{cache_arg: past_b})
                past_b = _cache_of(res_b)
            nxt_pos = nxt_pos + 1
    return rows


def _cache_of(res: Any) -> Any:
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values
