"""refine: a data-free distillation that makes the target's LoRA do what the adapter does on the source.

The paper's transfer keeps an adapter's energy, not its behaviour, across families (DESIGN.md section
7). refine trains a target LoRA (the source adapter's rank, alpha and modules, placed by the
transfer's planner) on texts only, since token ids do not cross the tokenizer gap:

1. Probe texts (probes.py, shared with verify): seeded samples of source + adapter on neutral
   prompts, seeded samples of the source base as contrast, the user's --texts. With the source
   resident, each text is scored token by token with the adapter off and on; then the source is freed.
2. With only the target resident, a LoRA is trained for a fixed number of steps on one objective
   (distill.py). Batch order is a pure function of (seed, step), the LoRA starts from the transfer or
   from a seeded fresh initialisation, dropout is off: the same seed gives the same adapter.
3. Every step ends with a checkpoint (LoRA weights, AdamW state, losses) written atomically into the
   hidden state folder `.<OUT>.refine-partial/`, next to the probe texts and the initialiser. An
   interrupted run resumes from its last checkpoint and ends with the adapter an uninterrupted run
   would have written (byte for byte on the CPU, with the same thread count).
4. The finished folder (adapter_config.json, adapter_model.safetensors, crosslora_report.json with
   kind "refine", refine_probes.json: the texts it trained on, with their seeds) is renamed into
   place in one step. verify reads refine_probes.json and grades on other seeds."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lowmem_crosslora import hooks
from lowmem_crosslora.errors import BudgetError, InputError, Interrupted
from lowmem_crosslora.io import runstate
from lowmem_crosslora.io.adapter import adapter_fingerprint, check_finite, load_adapter
from lowmem_crosslora.io.partial import ADAPTER_NAME, CONFIG_NAME, REPORT_NAME
from lowmem_crosslora.io.runstate import check_output_dir, write_json
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.distill import (
    TrainShape,
    TrainText,
    base_token_logprobs,
    batch_loss,
    batch_norms,
    choose_shape,
    segments,
    smallest_room,
    truncate,
)
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.options import RefineOptions
from lowmem_crosslora.services.peft_config import adapter_config
from lowmem_crosslora.services.pipeline import run_guarded
from lowmem_crosslora.services.plan import build_plan
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, PROBES_NAME, Probe, read_texts, require_extras, sample_probes, stable_seed
from lowmem_crosslora.services.report import build_refine_report
from lowmem_crosslora.services.scoring import Loader, encode, free, private_weight_params, token_logprobs, vocab_size
from lowmem_crosslora.services.stop import StopFlag
from lowmem_crosslora.sizes import format_size
from lowmem_crosslora.sysmem import host_anon_bytes, tune_allocator
from lowmem_crosslora.version import __version__

CHECKPOINT_NAME = "refine_checkpoint.pt"


STATE_NAME = "refine_state.json"


SHAPE_KEYS = {
    "micro_batch": "micro_batch",
    "max_len": "max_len",
    "checkpointing": "gradient_checkpointing",
    "weights_dtype": "weights_dtype",
    "bytes": "modelled_bytes",
}


Log = Callable[[str], None]


Progress = Callable[[int, int, dict[str, float]], None]


@dataclass
class Prepared:
    """The source's contribution, computed once and kept in the state folder: probe texts and, per
    text, the source's token ends and per-token change in log-probability (adapter on minus off)."""

    probes: list[Probe]
    src_start: list[int]
    src_ends: list[list[int]]
    src_delta: list[list[float]]
    seconds: float
    sample_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "texts": [
                {**p.to_json(), "source_start": s, "source_token_ends": e, "source_token_delta": [round(v, 6) for v in d]}
                for p, s, e, d in zip(self.probes, self.src_start, self.src_ends, self.src_delta, strict=True)
            ],
            "seconds": round(self.seconds, 3),
            **self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Prepared:
        ps, ss, es, ds = [], [], [], []
        for t in obj["texts"]:
            ps.append(Probe(t["prompt"], t["text"], t["seed"], t["origin"]))
            ss.append(int(t["source_start"]))
            es.append([int(v) for v in t["source_token_ends"]])
            ds.append([float(v) for v in t["source_token_delta"]])
        extra = {k: v for k, v in obj.items() if k not in ("texts", "seconds")}
        return cls(ps, ss, es, ds, float(obj.get("seconds", 0.0)), extra=extra)


def fingerprint(adapter: Any, src: Checkpoint, tgt: Checkpoint, opts: RefineOptions, user: list[Probe]) -> str:
    payload = {
        "adapter": adapter_fingerprint(adapter),
        "source": src.fingerprint(),
        "target": tgt.fingerprint(),
        "options": opts.result_key(),
        "texts": [p.to_json() for p in user],
        "version": __version__,
    }
    return runstate.fingerprint(payload)


def prepare_source(src: Checkpoint, tok: Any, ad_path: Path, opts: RefineOptions, user: list[Probe], loader: Any, dev: str, say: Log) -> Prepared:
    """Sample probe and contrast texts from the source (adapter on / off), score them token by token
    under both, free the source."""
    from peft import PeftModel


    t0 = time.perf_counter()
    base = loader.load(src, opts.max_new_tokens)
    model = PeftModel.from_pretrained(base, str(ad_path), adapter_name="adapter")
    model.to(dev)
    model.eval()
    prompts = opts.prompts or list(DEFAULT_PROMPTS)
    say(f"sampling {opts.samples} texts from source + adapter and {opts.contrast_samples} from the source base (seed {opts.seed})")
    probes = sample_probes(model, tok, prompts, opts.samples, max_new_tokens=opts.max_new_tokens, seed=opts.seed, origin="adapter", device=dev)
    with model.disable_adapter():
        probes += sample_probes(model, tok, prompts, opts.contrast_samples, max_new_tokens=opts.max_new_tokens, seed=opts.seed, origin="base", device=dev)
    sample_s = time.perf_counter() - t0
    probes += user
    if not any(p.origin in ("adapter", "user") for p in probes):
        raise InputError("no probe texts: every sample ended at once (empty continuations); try other --prompts or pass --texts")
    enc = [encode(tok, p) for p in probes]
    with model.disable_adapter():
        lp_base = token_logprobs(model, enc, dev, vocab_size(src))
    lp_ad = token_logprobs(model, enc, dev, vocab_size(src))
    del model, base
    free()
    delta = [[a - b for a, b in zip(x, y, strict=True)] for x, y in zip(lp_ad, lp_base, strict=True)]
    return Prepared(probes, [e.start for e in enc], [list(e.ends) for e in enc], delta, time.perf_counter() - t0, sample_s)


def target_texts(tok: Any, prep: Prepared) -> list[TrainText]:

    out = []
    for p, s0, se, sd in zip(prep.probes, prep.src_start, prep.src_ends, prep.src_delta, strict=True):
        e = encode(tok, p)
        if e.nbytes == 0 or len(e.ids) - e.first < 1:
            continue
        seg, delta = segments(s0, se, e.start, list(e.ends), sd)
        out.append(TrainText(e.ids, e.first, seg, delta, p.origin, e.nbytes))
    return out


def batch_indices(n: int, batch: int, seed: int, step: int, salt: str) -> list[int]:
    """The texts of step `step`: epochs of seeded permutations, read `batch` at a time. A pure
    function of its arguments, so a resumed run draws exactly the batches it would have drawn."""
    if n == 0:
        return []
    out = []
    pos = step * batch
    for k in range(pos, pos + batch):
        epoch, i = divmod(k, n)
        g = torch.Generator().manual_seed(stable_seed("refine-batch", salt, seed, epoch))
        out.append(int(torch.randperm(n, generator=g)[i]))
    return out


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model: Any, opt: Any, step: int, losses: list[dict[str, float]], fp: str, shape: TrainShape, seconds: float) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(
            {
                "fingerprint": fp,
                "step": step,
                "lora": _lora_state(model),
                "optimizer": opt.state_dict(),
                "losses": losses,
                "shape": shape.to_json(),
                "seconds": seconds,
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fp: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint is redone from the start, never trusted
        return None
    return ck if isinstance(ck, dict) and ck.get("fingerprint") == fp else None


def _lora_config(cfg: dict[str, Any], opts: RefineOptions) -> dict[str, Any]:
    cfg = dict(cfg)
    cfg["lora_dropout"] = 0.0  # deterministic and resumable: no random masks
    cfg["inference_mode"] = False
    if opts.lora_rank is not None:
        cfg["r"], cfg["rank_pattern"] = opts.lora_rank, {}
    if opts.lora_alpha is not None:
        cfg["lora_alpha"], cfg["alpha_pattern"] = opts.lora_alpha, {}
    return cfg


def _attach(base: Any, cfg: dict[str, Any], init_dir: Path | None, seed: int) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_dir is not None:
        model = PeftModel.from_pretrained(base, str(init_dir), is_trainable=True)
    else:
        keep = {k: v for k, v in cfg.items() if k in LoraConfig.__dataclass_fields__}
        torch.manual_seed(stable_seed("refine-init", seed))
        model = get_peft_model(base, LoraConfig(**keep))
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if "lora_" not in n:
            p.requires_grad_(False)
    return model


def run_refine(
    source: str | Path,
    adapter: str | Path,
    target: str | Path,
    out: str | Path,
    *,
    texts: list[Probe] | str | Path | None = None,
    log: Log | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Distil `adapter` (trained on `source`) into a LoRA on `target`, written as a PEFT folder at `out`.
    Options are RefineOptions' fields. Returns the report (kind "refine")."""

    with StopFlag() as stop:
        try:
            return _refine(source, adapter, target, Path(out), texts, log or (lambda m: None), progress, stop, RefineOptions(**options))
        except KeyboardInterrupt:
            raise Interrupted("stopped by SIGINT; the last checkpoint is kept") from None


def _refine(
    source: Any, adapter: Any, target: Any, out: Path, texts: Any, say: Log, progress: Progress | None, stop: Any, opts: RefineOptions
) -> dict[str, Any]:

    t_start = time.perf_counter()
    opts.check()
    src, tgt = Checkpoint(source, "source"), Checkpoint(target, "target")
    ad = load_adapter(adapter)
    check_finite(ad)
    user = read_texts(texts) if isinstance(texts, (str, Path)) else list(texts or [])
    plan = build_plan(ad, src, tgt, rank=opts.rank, layer_map=opts.layer_map)
    cfg = _lora_config(adapter_config(plan, ad, str(tgt.path)), opts)
    dev = resolve_device(opts.device)
    check_output_dir(out, [ad.path, src.path, tgt.path], opts.force)
    require_extras("refine")
    tune_allocator()
    fp = fingerprint(ad, src, tgt, opts, user)
    state = runstate.state_dir_for(out, "refine")
    if runstate.claim(state, fp, opts.restart, "refine", {"options": opts.result_key(), "version": __version__}, state_file=STATE_NAME):
        say(f"resuming the refine in {state}")

    budget = Budget(opts.max_memory, opts.max_gpu_memory, dev)
    loader = Loader(budget, dev, "auto", say)
    src_tok, tgt_tok = loader.tokenizer(src), loader.tokenizer(tgt)  # both checked before the long work
    phases: dict[str, float] = {}
    budget.start()
    try:
        # 1. probe texts and the source's per-token changes (kept: a resumed run never reloads the source)
        probes_file = state / PROBES_NAME
        if probes_file.exists():
            prep = Prepared.from_json(json.loads(probes_file.read_text()))
            say(f"probe texts: {len(prep.probes)} kept from the interrupted run")
        else:
            prep = prepare_source(src, src_tok, ad.path, opts, user, loader, dev, say)
            prep.extra = {"seed": opts.seed, "prompts": opts.prompts or "built-in", "max_new_tokens": opts.max_new_tokens}
            write_json(probes_file, prep.to_json())
            phases["source"] = prep.seconds
            # Train on the values as stored (rounded), as a resumed run reads them back: the same bytes either way.
            prep = Prepared.from_json(json.loads(probes_file.read_text()))
        stop.check()

        # 2. the initialiser: the paper's transfer, or a seeded fresh LoRA
        init_dir = None
        if opts.init == "transfer":
            init_dir = state / "init"
            t = time.perf_counter()
            if not (init_dir / REPORT_NAME).exists():  # a resumed run keeps the finished transfer
                run_guarded(
                    [(ad.path, init_dir)],
                    src.path,
                    tgt.path,
                    batch=False,
                    rank=opts.rank,
                    layer_map=opts.layer_map,
                    device=dev,
                    dtype="float32",
                    max_memory=opts.max_memory,
                    max_gpu_memory=opts.max_gpu_memory,
                    cache_dir=opts.cache_dir,
                    force=True,  # refine's own folder: a resumed run finds the interrupted run's transfer there
                    log=say,
                )
            phases["transfer"] = time.perf_counter() - t

        # 3. the target
        train = [t for t in target_texts(tgt_tok, prep)]
        main = [t for t in train if t.origin in ("adapter", "user")]
        contrast = [t for t in train if t.origin == "base"] if opts.objective != "lm" else []
        longest = min(opts.max_len, max(len(t.ids) for t in main + contrast))

        params = private_weight_params(tgt, "bfloat16") if dev == "cpu" else sum(math.prod(t.shape) for t in tgt.tensors.values())
        lora_params = _lora_param_count(plan, cfg)
        passes = 2 if opts.objective == "lm+kl" else 1
        per_step = opts.batch * (2 if contrast else 1)  # "delta" and "lm+kl" pass main and contrast texts together
        if dev == "cpu":
            room = budget.max_host - max(0, host_anon_bytes() - budget.baseline)
        else:
            room = budget.max_gpu
        # bfloat16 frozen weights (the LoRA itself trains in float32): half the memory, and on CPUs with
        # AMX or AVX512-BF16 about 3x faster than float32 (Qwen2.5-0.5B, 8 x 64 tokens: 3.0 s vs 9.8 s a step).
        dtypes = ("bfloat16",)
        ck_path = state / CHECKPOINT_NAME
        ck = _load_checkpoint(ck_path, fp)
        shape = choose_shape(tgt.config, params, lora_params, room, per_step, longest, passes, dtypes)
        if ck is not None and shape is not None:
            # A resumed run keeps the interrupted run's passes and lengths, so that it sums the same
            # gradients in the same order (the same bytes), whatever the room measured now.
            shape = TrainShape(**{k: ck["shape"][v] for k, v in SHAPE_KEYS.items()})
        if shape is None:
            need = smallest_room(tgt.config, params, lora_params, longest, passes, "bfloat16")
            flag = "--max-memory" if dev == "cpu" else "--max-gpu-memory"
            raise BudgetError(
                f"training a LoRA on the target {tgt.path} needs at least {format_size(need)} of working memory "
                f"(bfloat16 weights, one text at a time, gradient checkpointing); raise {flag} to at least {format_size(need)}"
            )
        main = [truncate(t, shape.max_len) for t in main]
        contrast = [truncate(t, shape.max_len) for t in contrast]
        say(
            f"training on the target: {len(main)} adapter texts"
            + (f", {len(contrast)} contrast texts" if contrast else "")
            + f"; {shape.weights_dtype} weights, {shape.micro_batch} texts per pass, up to {shape.max_len} tokens"
            + (", gradient checkpointing" if shape.checkpointing else "")
            + f" (modelled {format_size(shape.bytes)} of {format_size(int(room))})"
        )
        t = time.perf_counter()
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(tgt.path), dtype=getattr(torch, shape.weights_dtype))
        loader.used["target"] = shape.weights_dtype
        base.to(dev)
        if shape.checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = _attach(base, cfg, init_dir, opts.seed)
        model.to(dev)
        if opts.objective == "delta":
            base_token_logprobs(model, main + contrast, dev, shape.micro_batch)
        phases["load_target"] = time.perf_counter() - t

        trainable = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=0.0)
        losses: list[dict[str, float]] = []
        start, spent = 0, 0.0
        if ck is not None:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for n, v in ck["lora"].items():
                    named[n].copy_(v)
            optim.load_state_dict(ck["optimizer"])
            start, losses, spent = int(ck["step"]), list(ck["losses"]), float(ck.get("seconds", 0.0))
            say(f"resuming at step {start} of {opts.steps}")
        model.train()
        t = time.perf_counter()
        for step in range(start, opts.steps):
            stop.check()
            mi = [main[i] for i in batch_indices(len(main), opts.batch, opts.seed, step, "main")]
            ci = [contrast[i] for i in batch_indices(len(contrast), opts.batch, opts.seed, step, "contrast")] if contrast else []
            norm = batch_norms(opts.objective, mi, ci)
            parts: dict[str, float] = {}
            total = 0.0
            mb = shape.micro_batch if not ci else max(1, shape.micro_batch // 2)
            for k in range(0, max(len(mi), len(ci)), mb):
                loss, p = batch_loss(model, opts.objective, mi[k : k + mb], ci[k : k + mb], norm, dev, opts.kl_weight)
                if loss.requires_grad:
                    loss.backward()
                total += float(loss.detach())
                for key, v in p.items():
                    parts[key] = parts.get(key, 0.0) + v
            optim.step()
            optim.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "loss": round(total, 6), **{k: round(v, 6) for k, v in parts.items()}}
            if not math.isfinite(total):
                raise InputError(f"refine: the loss became {total} at step {step + 1}; try a smaller --lr")
            losses.append(rec)
            _save_checkpoint(ck_path, model, optim, step + 1, losses, fp, shape, spent + time.perf_counter() - t)
            if budget.exceeded:
                raise BudgetError(f"{budget.exceeded}; the checkpoint of step {step + 1} is kept: rerun with a larger budget to resume")
            if progress is not None:
                progress(step + 1, opts.steps, rec)
            hooks.reached("refine_step", step + 1)
        phases["train"] = time.perf_counter() - t
        spent += phases["train"]

        # 4. the output
        lora = _peft_tensors(model)
        del model, base, optim
        free()
    finally:
        budget.stop()

    final = state / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()

    save_file(lora, str(final / ADAPTER_NAME), metadata={"format": "pt"})
    out_cfg = dict(cfg)
    out_cfg["inference_mode"] = True
    write_json(final / CONFIG_NAME, out_cfg)
    shutil.copyfile(probes_file, final / PROBES_NAME)
    train_n = {"adapter": sum(p.origin == "adapter" for p in prep.probes), "base": sum(p.origin == "base" for p in prep.probes), "user": len(user)}
    report = build_refine_report(
        source=src,
        target=tgt,
        adapter=str(ad.path),
        options={**opts.result_key(), "device": opts.device, "max_memory": opts.max_memory, "max_gpu_memory": opts.max_gpu_memory},
        objective=opts.objective,
        init=opts.init,
        probe_set={
            "seed": opts.seed,
            "prompts": opts.prompts or "built-in",
            "file": PROBES_NAME,
            "texts": train_n,
            "trained_on": len(main),
            "contrast": len(contrast),
        },
        losses=losses,
        shape=shape.to_json(),
        modules=len(plan.units),
        lora_params=lora_params,
        dtypes=loader.used,
        device=dev,
        seconds=time.perf_counter() - t_start,
        train_seconds=spent,
        phases=phases,
        budget=budget,
        fingerprint=fp,
        version=__version__,
    )
    write_json(final / REPORT_NAME, report)
    runstate.publish(final, out, force=True)  # a non-empty --out without --force was refused before any work
    shutil.rmtree(state, ignore_errors=True)
    return report


def _lora_param_count(plan: Any, cfg: dict[str, Any]) -> int:
    """LoRA parameters on the target (an over-estimate for fused targets, whose parts share one A)."""
    n = 0
    for u in plan.units:
        r = cfg["r"] if not cfg.get("rank_pattern") else u.rank
        m, k = u.target_shape
        n += r * (m + k)
    return n


def _peft_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The LoRA tensors under PEFT's saved names (base_model.model.<module>.lora_A.weight), float32."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(sd.items())}
