"""verify: measure what a transferred adapter carries, without the adapter's training data.

Probe texts (samples of source + adapter on neutral prompts, samples of the source base as neutral
contrast, and the user's --texts) are scored, as log-likelihood per UTF-8 byte (nats/byte, so that
models with different tokenizers compare), under five models: source base, source + adapter,
target base, target + transferred adapter, target + a random control adapter with the same
per-module Frobenius norms as the transferred one. The effect of an adapter on a text is its change
in log-likelihood per byte; effects, their ratios and their differences come with standard errors
over texts (paired: every model scores the same texts).

One model is resident at a time: the source (sample, then score with the adapter off and on), then
the target (score base, transferred and control, switching adapters in place)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.adapter import Adapter, check_finite, load_adapter, require_folder
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.effects import Z_CUTOFF, adapter_norms, install_control, mean_se, ratio_se
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.options import VerifyOptions
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, PROBES_NAME, Probe, read_texts, require_extras, sample_probes
from lowmem_crosslora.services.report import build_report
from lowmem_crosslora.services.scoring import Loader, encode, free, longest_prompt, longest_sequence, score, vocab_size
from lowmem_crosslora.sysmem import tune_allocator
from lowmem_crosslora.version import __version__

CONFIGS = ("source_base", "source_adapter", "target_base", "target_transferred", "target_control")


Log = Callable[[str], None]


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


def refine_training_set(folder: Path) -> dict[str, Any] | None:
    """What refine trained an adapter folder on (its refine_probes.json): seed, prompts and the
    (prompt, text) pairs, and the held-out texts it chose its step on (their seed and pairs; None and
    empty for a refine without them); None for an adapter that refine did not make."""
    f = Path(folder) / PROBES_NAME
    if not f.exists():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
        held = obj.get("holdout") or {}
        return {
            "seed": int(obj["seed"]),
            "prompts": obj.get("prompts", "built-in"),
            "texts": {(t["prompt"], t["text"]) for t in obj["texts"]},
            "holdout_seed": None if held.get("seed") is None else int(held["seed"]),
            "holdout_texts": {(t["prompt"], t["text"]) for t in held.get("texts", [])},
        }
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{f}: unreadable; it says which texts refine trained this adapter on, so verify cannot choose fresh ones") from None


@dataclass
class Inputs:
    """verify's checked inputs: the models, both adapters, the texts and prompts, the seed to sample with."""

    src: Checkpoint
    tgt: Checkpoint
    adapter: Adapter
    transferred: Adapter
    user: list[Probe]
    prompts: list[str]
    trained: dict[str, Any] | None  # what refine trained `transferred` on (None: not refined)
    seed: int


@dataclass
class Scores:
    """The probe texts and their log-likelihood per byte under each of the five models (CONFIGS)."""

    probes: list[Probe] = field(default_factory=list)
    ll: dict[str, list[float]] = field(default_factory=dict)
    dropped: int = 0  # sampled texts left out because refine trained on them
    phases: dict[str, float] = field(default_factory=dict)


def run_verify(
    source: str | Path,
    adapter: str | Path,
    target: str | Path,
    transferred: str | Path,
    *,
    texts: list[Probe] | str | Path | None = None,
    log: Log | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score probe texts under source base, source + adapter, target base, target + transferred and
    target + random control; return the report (schema lowmem-crosslora/report/1, kind "verify").
    Options are VerifyOptions' fields.

    A refined adapter (refine_probes.json in its folder) is graded on fresh texts: `seed` defaults to
    the seed after the one refine sampled its training texts with, the same seed on the same prompts is
    refused, and any sampled text refine trained on is dropped."""
    opts = VerifyOptions(**options)
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    check_options(opts)
    inp = load_inputs(source, adapter, target, transferred, texts, opts)
    dev = resolve_device(opts.device)
    require_extras()
    tune_allocator()
    budget = Budget(opts.max_memory, None, dev)  # after the imports: the libraries are part of the baseline
    budget.start()
    loader = Loader(budget, dev, opts.dtype, say)
    norms = {"source": adapter_norms(inp.adapter), "transferred": adapter_norms(inp.transferred)}
    src_tok, tgt_tok = loader.tokenizer(inp.src), loader.tokenizer(inp.tgt)  # both checked before the long work starts
    scores = Scores()
    try:
        score_source(inp, opts, loader, src_tok, dev, scores, say)
        norms["control"] = score_target(inp, loader, tgt_tok, dev, scores)
    finally:
        budget.stop()
    return build_report(
        "verify",
        adapter=inp.adapter.path,
        source=inp.src,
        target=inp.tgt,
        options=report_options(inp, opts, scores.dropped),
        device=dev,
        seconds=time.perf_counter() - t0,
        phases=scores.phases,
        budget=budget,
        version=__version__,
        transferred=inp.transferred.path,
        sets=text_sets(scores, inp),
        records=text_records(scores),
        norms=norms,
        dtypes=loader.used,
    )


def check_options(opts: VerifyOptions) -> None:
    if opts.samples < 0 or opts.neutral_samples < 0 or opts.max_new_tokens < 1:
        raise InputError("--samples and --neutral-samples must not be negative, --max-new-tokens must be at least 1")
    if opts.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"unknown --dtype {opts.dtype!r}; choose auto, float32, bfloat16 or float16")


def load_inputs(source: str | Path, adapter: str | Path, target: str | Path, transferred: str | Path, texts: Any, opts: VerifyOptions) -> Inputs:
    """Open and check the models and adapters, read the texts, and choose the seed (refused where it
    would grade a refined adapter on the texts it trained on)."""
    src = Checkpoint(source, "source")
    tgt = Checkpoint(target, "target")
    require_folder(adapter, "verify")
    require_folder(transferred, "verify")
    ad = load_adapter(adapter)
    tr = load_adapter(transferred)
    check_adapter_fits(ad, src, "adapter")
    check_adapter_fits(tr, tgt, "transferred adapter")
    check_finite(ad)
    check_finite(tr)
    user = read_texts(texts) if isinstance(texts, (str, Path)) else list(texts or [])
    prompt_list = list(opts.prompts) if opts.prompts else list(DEFAULT_PROMPTS)
    trained = refine_training_set(tr.path)
    seed = opts.seed
    if trained is not None:
        same_prompts = (list(DEFAULT_PROMPTS) if trained["prompts"] == "built-in" else list(trained["prompts"])) == prompt_list
        used = {int(trained["seed"])} | ({trained["holdout_seed"]} if trained["holdout_seed"] is not None else set())
        if seed is None:
            seed = int(trained["seed"]) + 1
            while seed in used:  # never the seed refine chose its step with either
                seed += 1
        elif seed == trained["seed"] and same_prompts:
            raise InputError(
                f"{tr.path} was refined on texts sampled with seed {seed} from these prompts; grading it on them would measure "
                "how well it learned its training texts, not the adapter's behaviour: pass another --seed"
            )
        elif seed == trained["holdout_seed"] and same_prompts:
            raise InputError(
                f"refine chose the step of {tr.path} on held-out texts sampled with seed {seed} from these prompts; grading it on them "
                "would measure the texts its step was picked for, not fresh ones: pass another --seed"
            )
    if opts.samples == 0 and opts.neutral_samples == 0 and not user:
        raise InputError("nothing to score: --samples and --neutral-samples are 0 and no --texts were given")
    return Inputs(src, tgt, ad, tr, user, prompt_list, trained, 0 if seed is None else seed)


def score_source(inp: Inputs, opts: VerifyOptions, loader: Loader, tok: Any, dev: str, scores: Scores, say: Log) -> None:
    """The source: sample with the adapter on (and off, for neutral texts), score with it off and on, free it."""
    from peft import PeftModel

    t = time.perf_counter()
    loader.tokens = longest_sequence(tok, inp.prompts, opts.max_new_tokens, inp.user)
    loader.prompt = longest_prompt(tok, inp.prompts)
    base = loader.load(inp.src)
    shape = loader.shape  # rows sampled together and scoring batches, as the budget allows
    model = PeftModel.from_pretrained(base, str(inp.adapter.path), adapter_name="adapter")
    model.to(dev)
    model.eval()
    scores.phases["load_source"] = time.perf_counter() - t
    t = time.perf_counter()
    kw = {"max_new_tokens": opts.max_new_tokens, "seed": inp.seed, "device": dev, "rows": shape.rows}
    probes = sample_probes(model, tok, inp.prompts, opts.samples, origin="adapter", **kw)
    with model.disable_adapter():
        probes += sample_probes(model, tok, inp.prompts, opts.neutral_samples, origin="base", **kw)
    if inp.trained is not None:
        seen = inp.trained["texts"] | inp.trained["holdout_texts"]
        kept = [p for p in probes if (p.prompt, p.text) not in seen]
        scores.dropped = len(probes) - len(kept)
        probes = kept
    probes += inp.user
    scores.probes = probes
    scores.phases["sample"] = time.perf_counter() - t
    if not probes:
        raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
    say(f"scoring {len(probes)} texts under the source ({opts.samples} sampled with the adapter, {opts.neutral_samples} from the base, {len(inp.user)} given)")
    t = time.perf_counter()
    enc = [encode(tok, p) for p in probes]
    with model.disable_adapter():
        scores.ll["source_base"] = score(model, enc, dev, vocab_size(inp.src), shape.logits_bytes)
    scores.ll["source_adapter"] = score(model, enc, dev, vocab_size(inp.src), shape.logits_bytes)
    scores.phases["score_source"] = time.perf_counter() - t
    del model, base, enc
    free()


def score_target(inp: Inputs, loader: Loader, tok: Any, dev: str, scores: Scores) -> dict[str, float]:
    """The target: score the texts with no adapter, the transferred one and the random control, switching
    adapters in place; free it. Returns the control's norm per module."""
    from peft import PeftModel

    t = time.perf_counter()
    enc = [encode(tok, p) for p in scores.probes]
    loader.tokens = max(len(e.ids) for e in enc)
    base = loader.load(inp.tgt)
    model = PeftModel.from_pretrained(base, str(inp.transferred.path), adapter_name="transferred")
    control_norms = install_control(model, inp.transferred.path, inp.seed)
    model.to(dev)
    model.eval()
    scores.phases["load_target"] = time.perf_counter() - t
    t = time.perf_counter()
    lb = loader.shape.logits_bytes  # scoring batches, as the budget allows
    with model.disable_adapter():
        scores.ll["target_base"] = score(model, enc, dev, vocab_size(inp.tgt), lb)
    model.set_adapter("transferred")
    scores.ll["target_transferred"] = score(model, enc, dev, vocab_size(inp.tgt), lb)
    model.set_adapter("control")
    scores.ll["target_control"] = score(model, enc, dev, vocab_size(inp.tgt), lb)
    scores.phases["score_target"] = time.perf_counter() - t
    del model, base, enc
    free()
    return control_norms


def text_sets(scores: Scores, inp: Inputs) -> dict[str, dict[str, Any]]:
    """Effects and a verdict per set of texts (the adapter's samples, the --texts, the neutral ones)."""
    probes, ll = scores.probes, scores.ll
    # Texts one model could not score (nothing left after the prompt) are left out of every comparison.
    keep = [i for i in range(len(probes)) if all(not math.isnan(ll[c][i]) for c in CONFIGS)]
    sets: dict[str, dict[str, Any]] = {}
    trained = inp.trained
    fresh = f"fresh samples (seed {inp.seed}; refine trained on seed {trained['seed']}'s) " if trained is not None else "samples "
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
    return sets


def text_records(scores: Scores) -> list[dict[str, Any]]:
    """Every scored text with its log-likelihood per byte under each model (None where it had none)."""
    records = []
    for i, p in enumerate(scores.probes):
        rec = p.to_json()
        rec["loglik_per_byte"] = {c: (None if math.isnan(scores.ll[c][i]) else round(scores.ll[c][i], 6)) for c in CONFIGS}
        records.append(rec)
    return records


def report_options(inp: Inputs, opts: VerifyOptions, dropped: int) -> dict[str, Any]:
    """The options as the report states them (the seed chosen, what a refined adapter trained on)."""
    trained = inp.trained
    return {
        "prompts": "built-in" if not opts.prompts else len(inp.prompts),
        "samples": opts.samples,
        "neutral_samples": opts.neutral_samples,
        "texts": len(inp.user),
        "max_new_tokens": opts.max_new_tokens,
        "seed": inp.seed,
        "refined_on": None
        if trained is None
        else {
            "seed": trained["seed"],
            "texts": len(trained["texts"]),
            "holdout_seed": trained["holdout_seed"],
            "holdout_texts": len(trained["holdout_texts"]),
            "dropped_overlaps": dropped,
        },
        "device": opts.device,
        "dtype": opts.dtype,
        "max_memory": opts.max_memory,
    }
