"""verify: measure what a transferred adapter carries, without the adapter's training data.

Probe texts (samples of source + adapter on neutral prompts, samples of the source base as neutral
contrast, and the user's --texts) are scored, as log-likelihood per UTF-8 byte (nats/byte, so that
models with different tokenizers compare), under five models: source base, source + adapter,
target base, target + transferred adapter, target + a random control adapter with the same
per-module Frobenius norms as the transferred one. The effect of an adapter on a text is its change
in log-likelihood per byte; effects, their ratios and their differences come with standard errors
over texts (paired: every model scores the same texts).

One model is resident at a time: the source (sample, then score with the adapter off and on), then
the target (score base, transferred and control, switching adapters in place).
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .adapter import Adapter, check_finite, load_adapter
from .checkpoint import Checkpoint
from .errors import BudgetError, InputError
from .probes import DEFAULT_PROMPTS, Probe, prefix_ids, read_texts, require_extras, sample_probes, stable_seed
from .sizes import format_size

CONFIGS = ("source_base", "source_adapter", "target_base", "target_transferred", "target_control")
# z (mean over its standard error) below which a difference is "indistinguishable".
Z_CUTOFF = 2.0
# The log-softmax over the vocabulary is the scoring's working memory: keep a batch's logits below this.
LOGITS_BYTES = 256 * 1024**2
Log = Callable[[str], None]


# ---- statistics ---------------------------------------------------------------------------------


def mean_se(x: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); SE is nan for fewer than 2 values."""
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(x) / n
    if n < 2:
        return m, math.nan
    var = math.fsum((v - m) ** 2 for v in x) / (n - 1)
    return m, math.sqrt(var / n)


def ratio_se(num: list[float], den: list[float]) -> tuple[float, float]:
    """mean(num) / mean(den) for paired samples, with the delta-method standard error
    (var(R) ~ (var(mean num) + R^2 var(mean den) - 2 R cov(mean num, mean den)) / mean(den)^2)."""
    n = len(num)
    if n == 0 or n != len(den):
        return math.nan, math.nan
    mn, md = math.fsum(num) / n, math.fsum(den) / n
    if md == 0:
        return math.nan, math.nan
    r = mn / md
    if n < 2:
        return r, math.nan
    vn = math.fsum((a - mn) ** 2 for a in num) / (n - 1)
    vd = math.fsum((b - md) ** 2 for b in den) / (n - 1)
    cov = math.fsum((a - mn) * (b - md) for a, b in zip(num, den, strict=True)) / (n - 1)
    var = (vn + r * r * vd - 2 * r * cov) / (n * md * md)
    return r, math.sqrt(max(var, 0.0))


def _est(m: float, se: float) -> dict[str, float | None]:
    def c(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 6)

    z = m / se if se and not math.isnan(se) and se > 0 else math.nan
    return {"mean": c(m), "se": c(se), "z": c(z)}


def effects(ll: dict[str, list[float]]) -> dict[str, Any]:
    """Effects (nats/byte) and recovery from per-text log-likelihoods per byte under the five models."""
    d_s = [a - b for a, b in zip(ll["source_adapter"], ll["source_base"], strict=True)]
    d_t = [a - b for a, b in zip(ll["target_transferred"], ll["target_base"], strict=True)]
    d_c = [a - b for a, b in zip(ll["target_control"], ll["target_base"], strict=True)]
    d_tc = [a - b for a, b in zip(d_t, d_c, strict=True)]
    out = {
        "texts": len(d_s),
        "source_effect": _est(*mean_se(d_s)),
        "target_effect": _est(*mean_se(d_t)),
        "control_effect": _est(*mean_se(d_c)),
        "target_minus_control": _est(*mean_se(d_tc)),
        "recovery": _est(*ratio_se(d_t, d_s)),
        "control_recovery": _est(*ratio_se(d_c, d_s)),
        "recovery_above_control": _est(*ratio_se(d_tc, d_s)),
        "mean_loglik_per_byte": {k: round(mean_se(v)[0], 6) for k, v in ll.items()},
    }
    return out


def collateral(eff: dict[str, Any], what: str) -> str:
    """One line for neutral text: what each adapter does to text it was not meant to change."""
    s, t, c = eff["source_effect"], eff["target_effect"], eff["control_effect"]
    return (
        f"collateral on {what}: the source adapter changes it by {s['mean']:+.4f} nats/byte, the transferred adapter "
        f"by {t['mean']:+.4f}, the random control by {c['mean']:+.4f} (standard errors {s['se'] or 0:.4f}, {t['se'] or 0:.4f}, {c['se'] or 0:.4f})"
    )


def verdict(eff: dict[str, Any], what: str) -> str:
    """One line: how much of the source effect the transferred adapter keeps, against the random control."""
    s, rec, tc = eff["source_effect"], eff["recovery"], eff["target_minus_control"]
    if s["z"] is None or abs(s["z"]) < Z_CUTOFF:
        return (
            f"on {what}: the source adapter itself changes these texts by no more than noise "
            f"({s['mean']:+.4f} nats/byte, z {s['z'] if s['z'] is None else round(s['z'], 1)}); there is no effect to recover"
        )
    keeps = f"keeps {100 * rec['mean']:.0f}% (+/- {100 * (rec['se'] or 0):.0f}) of the source effect"
    z = tc["z"]
    if z is None or abs(z) < Z_CUTOFF:
        zs = "n/a" if z is None else f"{z:+.1f}"
        return f"on {what}: indistinguishable from a random adapter of the same size ({keeps}; the random control differs by {zs} standard errors)"
    # "Above" means beyond the control in the direction of the source effect (which may be negative).
    along = z if s["mean"] > 0 else -z
    side = "above" if along > 0 else "below"
    tail = "" if along > 0 else " (further from the source effect than a random adapter of the same size)"
    return f"on {what}: {keeps}, {abs(z):.0f} standard errors {side} the random control{tail}"


# ---- scoring ------------------------------------------------------------------------------------


@dataclass
class Encoded:
    ids: list[int]  # prefix + prompt + text tokens
    first: int  # index of the first scored token (its log-prob is read at first - 1)
    nbytes: int  # UTF-8 bytes covered by the scored tokens
    start: int = 0  # character (of prompt + text) where the first scored token starts
    ends: tuple[int, ...] = ()  # character where each scored token ends (token boundaries, for segments)


def encode(tokenizer: Any, probe: Probe) -> Encoded:
    """Tokenize prompt + text in one piece (as the model would read it) and find the tokens of the text:
    those that end after the prompt. Their characters (from the first scored token's start) are the bytes."""
    full = probe.prompt + probe.text
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    pre = prefix_ids(tokenizer)
    cut = len(probe.prompt)
    first_tok = next((i for i, (_s, e) in enumerate(offsets) if e > cut), len(ids))
    if not pre and first_tok == 0:
        first_tok = 1  # no start token: the first token has no context and is not scored
    if first_tok >= len(ids):
        return Encoded(pre + ids, len(pre) + len(ids), 0, len(full), ())
    start = offsets[first_tok][0]
    nbytes = len(full[start:].encode("utf-8"))
    ends = tuple(int(e) for _s, e in offsets[first_tok:])
    return Encoded(pre + ids, len(pre) + first_tok, nbytes, int(start), ends)


def token_logprobs(model: Any, encoded: list[Encoded], device: str, vocab: int) -> list[list[float]]:
    """Log-probability (nats) of each scored token of each encoded text under `model` as it is."""
    import torch

    out: list[list[float]] = [[] for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    i = 0
    model.eval()
    while i < len(order):
        # Texts are sorted by length: the 16th from here bounds the longest a batch could hold.
        longest = len(encoded[order[min(len(order) - 1, i + 15)]].ids)
        batch = max(1, min(16, LOGITS_BYTES // max(1, 8 * longest * vocab)))
        idx = order[i : i + batch]
        T = max(len(encoded[j].ids) for j in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for row, j in enumerate(idx):
            ids = encoded[j].ids
            x[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok = torch.gather(logp, 2, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).double().cpu()
        del logits, logp
        for row, j in enumerate(idx):
            e = encoded[j]
            out[j] = tok[row, e.first - 1 : len(e.ids) - 1].tolist() if e.nbytes else []
        i += batch
    return out


def score(model: Any, encoded: list[Encoded], device: str, vocab: int) -> list[float]:
    """Log-likelihood per byte (nats) of each encoded text under `model` as it is (adapters as set)."""
    per_token = token_logprobs(model, encoded, device, vocab)
    return [math.fsum(lp) / e.nbytes if e.nbytes else math.nan for lp, e in zip(per_token, encoded, strict=True)]


# ---- adapters -----------------------------------------------------------------------------------


def check_adapter_fits(adapter: Adapter, model: Checkpoint, what: str) -> None:
    """Every adapted module must be a linear weight of `model` with the factors' shapes."""
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out", False))
    for mod in adapter.modules.values():
        name = f"{mod.module}.weight"
        if name not in model.tensors:
            raise InputError(
                f"{what} {adapter.path}: module {mod.module} is not a weight of the {model.role} model {model.path}; is this adapter for that model?"
            )
        shape = tuple(model.tensors[name].shape)
        want = (mod.b_shape[0], mod.a_shape[1])
        if fan_in_fan_out:
            want = want[::-1]
        if shape != want:
            raise InputError(
                f"{what} {adapter.path}: module {mod.module} has A {list(mod.a_shape)} and B {list(mod.b_shape)}, "
                f"which do not fit the {model.role} weight {list(shape)}; is this adapter for that model?"
            )


def adapter_norms(adapter: Adapter) -> dict[str, float]:
    """||scale * B @ A||_F per module, from the small k x k Gram matrices (never forming m x n)."""
    out = {}
    for mod in adapter.modules.values():
        A = adapter.read(mod.a_name).double()
        B = adapter.read(mod.b_name).double()
        out[mod.module] = mod.scale * math.sqrt(max(0.0, float(((B.T @ B) * (A @ A.T)).sum())))
    adapter.close()
    return out


def install_control(peft_model: Any, transferred: str | Path, seed: int, name: str = "control", like: str | None = None) -> dict[str, float]:
    """Load `transferred` a second time as adapter `name` and replace its factors by random directions
    (Gaussian A and B, seeded per module) rescaled so that ||s B A||_F equals the transferred module's.
    `like` names the loaded adapter whose norms it takes (default: the other one). Returns the
    control's norm per module."""
    import torch

    peft_model.load_adapter(str(transferred), adapter_name=name)
    norms: dict[str, float] = {}
    for mod_name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        src = like if like is not None else next(k for k in lora_a if k != name)
        A0, B0 = module.lora_A[src].weight, module.lora_B[src].weight
        s = float(module.scaling[name])
        with torch.no_grad():
            want = s * math.sqrt(max(0.0, float(((B0.double().T @ B0.double()) * (A0.double() @ A0.double().T)).sum())))
            short = mod_name.split("base_model.model.", 1)[-1]
            g = torch.Generator().manual_seed(stable_seed("control", seed, short))
            A = torch.randn(A0.shape, generator=g, dtype=torch.float64)
            B = torch.randn(B0.shape, generator=g, dtype=torch.float64)
            have = s * math.sqrt(float(((B.T @ B) * (A @ A.T)).sum()))
            k = math.sqrt(want / have) if have > 0 else 0.0
            module.lora_A[name].weight.copy_((A * k).to(A0.dtype))
            module.lora_B[name].weight.copy_((B * k).to(B0.dtype))
            norms[short] = want
    return norms


# ---- the run ------------------------------------------------------------------------------------


STORED = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def private_weight_params(ckpt: Checkpoint, dtype: str) -> int:
    """Parameters whose copies are private memory once transformers loads the model as `dtype`.
    transformers 5 leaves tensors stored in that very dtype on the safetensors memory map (file-backed
    pages, reclaimable, outside the budget like the transfer's reads); anything converted, or loaded
    by an older transformers, is private."""
    import math

    import transformers

    mapped = int(transformers.__version__.split(".")[0]) >= 5
    return sum(math.prod(t.shape) for t in ckpt.tensors.values() if not (mapped and t.dtype == STORED[dtype]))


def _model_bytes(ckpt: Checkpoint, dtype: str, device: str = "cpu") -> int:
    """Budgeted bytes of the model's weights: private host memory on the CPU, all of them on a GPU."""
    import math

    n = private_weight_params(ckpt, dtype) if device == "cpu" else sum(math.prod(t.shape) for t in ckpt.tensors.values())
    return n * (4 if dtype == "float32" else 2)


def _vocab(ckpt: Checkpoint) -> int:
    return int(ckpt.config.get("vocab_size") or ckpt.config.get("text_config", {}).get("vocab_size") or 32000)


class _Loader:
    """Loads one model at a time inside the budget: float32 where it fits, bfloat16 where only that does."""

    def __init__(self, budget: Any, device: str, dtype: str, log: Log) -> None:
        self.budget, self.device, self.dtype, self.log = budget, device, dtype, log
        self.used: dict[str, str] = {}

    def pick_dtype(self, ckpt: Checkpoint, max_new_tokens: int) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.device != "cpu":
            room = self.budget.max_gpu or float("inf")
        else:
            from .memory import host_anon_bytes

            room = self.budget.max_host - max(0, host_anon_bytes() - self.budget.baseline)
        # Measured on Qwen2.5-0.5B in float32: weights 1.98 GB, peak working 2.9 GiB: the logits and their
        # log-softmax (up to LOGITS_BYTES together), the layers' activations and the loader's slack.
        work = 2 * LOGITS_BYTES + 64 * 1024**2
        for name in ("float32", "bfloat16"):
            if int(1.15 * _model_bytes(ckpt, name, self.device)) + work <= room:
                return name
        need = int(1.15 * _model_bytes(ckpt, "bfloat16", self.device)) + work
        raise BudgetError(
            f"{ckpt.role} model {ckpt.path} needs about {format_size(need)} of working memory to score texts in bfloat16, "
            f"over the budget ({format_size(int(room))} left); raise --max-memory to at least {format_size(need)}"
        )

    def tokenizer(self, ckpt: Checkpoint) -> Any:
        """The model folder's own tokenizer; it must be a fast one (character offsets)."""
        from transformers import AutoTokenizer

        where = f"{ckpt.role} {ckpt.path}"
        if not any((ckpt.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise InputError(f"{where}: no tokenizer in the model folder (tokenizer.json); verify scores text with each model's own tokenizer")
        try:
            tok = AutoTokenizer.from_pretrained(str(ckpt.path))
        except (OSError, ValueError, TypeError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"{where}: cannot load its tokenizer: {first}") from None
        if not getattr(tok, "is_fast", False):
            raise InputError(f"{where}: verify needs a fast tokenizer (tokenizer.json) for character offsets")
        return tok

    def load(self, ckpt: Checkpoint, max_new_tokens: int) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = self.pick_dtype(ckpt, max_new_tokens)
        self.used[ckpt.role] = dtype
        self.log(f"loading {ckpt.role} {ckpt.path} ({dtype}, {self.device})")
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=getattr(torch, dtype))
        model.to(self.device)
        model.eval()
        return model


def refine_training_set(folder: Path) -> dict[str, Any] | None:
    """What refine trained an adapter folder on (its refine_probes.json): seed, prompts and the
    (prompt, text) pairs; None for an adapter that refine did not make."""
    import json

    from .refine import PROBES_NAME

    f = Path(folder) / PROBES_NAME
    if not f.exists():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
        return {"seed": int(obj["seed"]), "prompts": obj.get("prompts", "built-in"), "texts": {(t["prompt"], t["text"]) for t in obj["texts"]}}
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{f}: unreadable; it says which texts refine trained this adapter on, so verify cannot choose fresh ones") from None


def free(*objs: Any) -> None:
    from .memory import release_free_memory

    del objs
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    release_free_memory()


def run_verify(
    source: str | Path,
    adapter: str | Path,
    target: str | Path,
    transferred: str | Path,
    *,
    prompts: list[str] | None = None,
    texts: list[Probe] | str | Path | None = None,
    samples: int = 32,
    neutral_samples: int = 8,
    max_new_tokens: int = 64,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_memory: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Score probe texts under source base, source + adapter, target base, target + transferred and
    target + random control; return the report (schema lowmem-crosslora/report/1, kind "verify").

    A refined adapter (refine_probes.json in its folder) is graded on fresh texts: `seed` defaults to
    the seed after the one refine sampled its training texts with, the same seed on the same prompts is
    refused, and any sampled text refine trained on is dropped."""
    from .engine import resolve_device
    from .memory import Budget, tune_allocator
    from .report import build_verify_report

    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    if samples < 0 or neutral_samples < 0 or max_new_tokens < 1:
        raise InputError("--samples and --neutral-samples must not be negative, --max-new-tokens must be at least 1")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"unknown --dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    src = Checkpoint(source, "source")
    tgt = Checkpoint(target, "target")
    ad = load_adapter(adapter)
    tr = load_adapter(transferred)
    check_adapter_fits(ad, src, "adapter")
    check_adapter_fits(tr, tgt, "transferred adapter")
    check_finite(ad)
    check_finite(tr)
    user = read_texts(texts) if isinstance(texts, (str, Path)) else list(texts or [])
    prompt_list = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    trained = refine_training_set(tr.path)
    if trained is not None:
        same_prompts = (list(DEFAULT_PROMPTS) if trained["prompts"] == "built-in" else list(trained["prompts"])) == prompt_list
        if seed is None:
            seed = int(trained["seed"]) + 1
        elif seed == trained["seed"] and same_prompts:
            raise InputError(
                f"{tr.path} was refined on texts sampled with seed {seed} from these prompts; grading it on them would measure "
                "how well it learned its training texts, not the adapter's behaviour: pass another --seed"
            )
    seed = 0 if seed is None else seed
    if samples == 0 and neutral_samples == 0 and not user:
        raise InputError("nothing to score: --samples and --neutral-samples are 0 and no --texts were given")
    dev = resolve_device(device)
    require_extras()
    tune_allocator()
    from peft import PeftModel

    budget = Budget(max_memory, None, dev)  # after the imports: the libraries are part of the baseline
    budget.start()
    loader = _Loader(budget, dev, dtype, say)
    phases: dict[str, float] = {}
    src_norms, tr_norms = adapter_norms(ad), adapter_norms(tr)
    src_tok, tgt_tok = loader.tokenizer(src), loader.tokenizer(tgt)  # both checked before the long work starts
    try:
        # 1. The source: sample with the adapter on (and off, for neutral texts), score with it off and on.
        t = time.perf_counter()
        base, tok = loader.load(src, max_new_tokens), src_tok
        model = PeftModel.from_pretrained(base, str(ad.path), adapter_name="adapter")
        model.to(dev)
        model.eval()
        phases["load_source"] = time.perf_counter() - t
        t = time.perf_counter()
        probes = sample_probes(model, tok, prompt_list, samples, max_new_tokens=max_new_tokens, seed=seed, origin="adapter", device=dev)
        with model.disable_adapter():
            probes += sample_probes(model, tok, prompt_list, neutral_samples, max_new_tokens=max_new_tokens, seed=seed, origin="base", device=dev)
        dropped = 0
        if trained is not None:
            seen = trained["texts"]
            kept = [p for p in probes if (p.prompt, p.text) not in seen]
            dropped = len(probes) - len(kept)
            probes = kept
        probes += user
        phases["sample"] = time.perf_counter() - t
        if not probes:
            raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
        say(f"scoring {len(probes)} texts under the source ({samples} sampled with the adapter, {neutral_samples} from the base, {len(user)} given)")
        t = time.perf_counter()
        enc = [encode(tok, p) for p in probes]
        ll: dict[str, list[float]] = {}
        with model.disable_adapter():
            ll["source_base"] = score(model, enc, dev, _vocab(src))
        ll["source_adapter"] = score(model, enc, dev, _vocab(src))
        phases["score_source"] = time.perf_counter() - t
        del model, base, tok, enc
        free()

        # 2. The target: base, transferred, control.
        t = time.perf_counter()
        base, tok = loader.load(tgt, max_new_tokens), tgt_tok
        model = PeftModel.from_pretrained(base, str(tr.path), adapter_name="transferred")
        control_norms = install_control(model, tr.path, seed)
        model.to(dev)
        model.eval()
        phases["load_target"] = time.perf_counter() - t
        t = time.perf_counter()
        enc = [encode(tok, p) for p in probes]
        with model.disable_adapter():
            ll["target_base"] = score(model, enc, dev, _vocab(tgt))
        model.set_adapter("transferred")
        ll["target_transferred"] = score(model, enc, dev, _vocab(tgt))
        model.set_adapter("control")
        ll["target_control"] = score(model, enc, dev, _vocab(tgt))
        phases["score_target"] = time.perf_counter() - t
        del model, base, tok, enc
        free()
    finally:
        budget.stop()

    # Texts one model could not score (nothing left after the prompt) are left out of every comparison.
    keep = [i for i in range(len(probes)) if all(not math.isnan(ll[c][i]) for c in CONFIGS)]
    sets: dict[str, dict[str, Any]] = {}
    fresh = f"fresh samples (seed {seed}; refine trained on seed {trained['seed']}'s) " if trained is not None else "samples "
    labels = {
        "adapter": f"{fresh}of source + adapter on neutral prompts",
        "base": "neutral text (samples of the source base on the same prompts)",
        "user": "the texts given with --texts",
    }
    for origin in ("adapter", "user", "base"):
        idx = [i for i in keep if probes[i].origin == origin]
        if not idx:
            continue
        eff = effects({c: [ll[c][i] for i in idx] for c in CONFIGS})
        eff["stands_for"] = labels[origin]
        if len(idx) < 2:
            eff["verdict"] = f"on {labels[origin]}: too few texts ({len(idx)}) for standard errors"
        elif origin == "base":
            eff["verdict"] = collateral(eff, labels[origin])
        else:
            eff["verdict"] = verdict(eff, labels[origin])
        sets[origin] = eff

    records = []
    for i, p in enumerate(probes):
        rec = p.to_json()
        rec["loglik_per_byte"] = {c: (None if math.isnan(ll[c][i]) else round(ll[c][i], 6)) for c in CONFIGS}
        records.append(rec)

    return build_verify_report(
        source=src,
        target=tgt,
        adapter=str(ad.path),
        transferred=str(tr.path),
        options={
            "prompts": "built-in" if not prompts else len(prompt_list),
            "samples": samples,
            "neutral_samples": neutral_samples,
            "texts": len(user),
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "refined_on": None if trained is None else {"seed": trained["seed"], "texts": len(trained["texts"]), "dropped_overlaps": dropped},
            "device": device,
            "dtype": dtype,
            "max_memory": max_memory,
        },
        sets=sets,
        records=records,
        norms={"source": src_norms, "transferred": tr_norms, "control": control_norms},
        dtypes=loader.used,
        device=dev,
        seconds=time.perf_counter() - t0,
        phases=phases,
        budget=budget,
        version=__version__,
    )
