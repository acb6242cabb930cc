"""refine: a data-free distillation that makes the target's LoRA do what the adapter does on the source.

The paper's transfer keeps an adapter's energy, not its behaviour (docs/METHOD.md sections 5 and 7,
which this module follows step by step). On texts only, since token ids do not cross tokenizers:
1. probe texts sampled from source + adapter (and the base, and --texts), scored token by token with
   the adapter off and on, plus a held-out split with its own seed (services/probe_set.py);
2. with only the target resident, a LoRA trained for up to --steps steps (services/distill.py), the
   held-out split scored against a random control every few steps to keep the best step and stop
   early (services/holdout.py); the same seed gives the same adapter;
3. a checkpoint after every step in `.<OUT>.refine-partial/`, so an interrupted run resumes to the
   bytes an uninterrupted one writes;
4. the finished folder renamed into place in one step, its report saying plainly whether any step
   beat the control on the held-out texts."""

from __future__ import annotations

import json
import math
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
from lowmem_crosslora.io.adapter import Adapter, adapter_fingerprint, require_folder
from lowmem_crosslora.io.hub import model_name
from lowmem_crosslora.io.partial import ADAPTER_NAME, CONFIG_NAME, REPORT_NAME
from lowmem_crosslora.io.runstate import check_output_dir, write_json
from lowmem_crosslora.io.safetensors_model import Checkpoint
from lowmem_crosslora.services.compute import upcast_model
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.distill import (
    BASE_OBJECTIVES,
    TrainText,
    base_token_logprobs,
    batch_loss,
    batch_norms,
    loglik_per_byte,
    soft_base_logits,
    soft_counts,
    text_vocabulary,
    truncate,
    uses_contrast,
    uses_token_changes,
)
from lowmem_crosslora.services.effects import ControlInPlace, lora_is_nil
from lowmem_crosslora.services.holdout import Holdout, target_held
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.options import RefineOptions
from lowmem_crosslora.services.peft_config import adapter_config
from lowmem_crosslora.services.pipeline import finished_report, run_guarded
from lowmem_crosslora.services.plan import Plan, build_plan
from lowmem_crosslora.services.probe_set import Prepared, prepare_source, score_on_source, target_texts
from lowmem_crosslora.services.probes import DEFAULT_PROMPTS, PROBES_NAME, Probe, read_texts, require_extras, sample_probes, stable_seed
from lowmem_crosslora.services.report import build_report
from lowmem_crosslora.services.scoring import Loader, free, room_left
from lowmem_crosslora.services.stop import StopFlag
from lowmem_crosslora.services.target_lora import attach_lora, batch_indices, lora_config, lora_param_count, peft_tensors, source_adapter
from lowmem_crosslora.services.train_shape import (
    TrainShape,
    enable_checkpointing,
    least_texts,
    least_training,
    load_checkpoint,
    lora_state,
    pick_shape,
    save_checkpoint,
    scoring_batch,
    training_refused,
)
from lowmem_crosslora.sizes import format_size
from lowmem_crosslora.sysmem import tune_allocator
from lowmem_crosslora.version import __version__

CHECKPOINT_NAME = "refine_checkpoint.pt"
ONPOLICY_NAME = "refine_onpolicy.json"  # the on-policy round's texts and the source's changes on them (a candidate)


STATE_NAME = "refine_state.json"


Log = Callable[[str], None]


Progress = Callable[[int, int, dict[str, float]], None]


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


@dataclass
class RefineRun:
    """One refine run's checked inputs, its state folder, and what its steps share."""

    opts: RefineOptions
    src: Checkpoint
    tgt: Checkpoint
    ad: Adapter
    user: list[Probe]
    plan: Plan
    cfg: dict[str, Any]  # the target LoRA's adapter_config (trainable, no dropout)
    dev: str
    out: Path
    fp: str
    state: Path
    say: Log
    stop: StopFlag
    progress: Progress | None
    resumed: bool = False  # the state folder held an interrupted run's work
    kept: dict[str, Any] | None = None  # the report of a finished refine of these very inputs already in `out`
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Training:
    """The target's side of a run: its texts, the memory shape, the checkpoint it resumes from, the
    losses of every step and the training time (a resumed run adds to the interrupted one's), the
    held-out evaluations (None: --holdout 0)."""

    main: list[TrainText]
    contrast: list[TrainText]
    shape: TrainShape
    lora_params: int
    checkpoint: dict[str, Any] | None
    score_batch: int = 1  # texts a pass without gradients takes (train_shape.scoring_batch)
    losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    holdout: Holdout | None = None
    # the on-policy round (opts.onpolicy > 0): what makes it, then its texts and what the report says of it
    round: Callable[[Any], None] | None = None
    onpolicy: list[TrainText] | None = None
    onpolicy_info: dict[str, Any] | None = None
    # the `lm` term's softmax over these ids only (opts.head_subset "texts", a candidate); None: the whole vocabulary
    head_ids: torch.Tensor | None = None


def _refine(
    source: Any, adapter: Any, target: Any, out: Path, texts: Any, say: Log, progress: Progress | None, stop: StopFlag, opts: RefineOptions
) -> dict[str, Any]:
    t_start = time.perf_counter()
    run = _open_run(source, adapter, target, out, texts, say, progress, stop, opts)
    if run.kept is not None:
        return run.kept
    budget = Budget(opts.max_memory, opts.max_gpu_memory, run.dev)
    loader = Loader(budget, run.dev, "auto", say)
    try:
        src_tok, tgt_tok = loader.tokenizer(run.src), loader.tokenizer(run.tgt)  # both checked before the long work
        # The training's least need, checked before the source is sampled (minutes) and named by every refusal.
        loader.floor = least_training(run.tgt, lora_param_count(run.plan, run.cfg), run.opts.objective, run.dev)
        room = room_left(budget, run.dev)
        if room is not None and room < loader.floor:
            raise training_refused(run.tgt.path, budget, run.dev, loader.floor)
    except (InputError, BudgetError):
        if not run.resumed:  # a refusal before any work leaves nothing behind
            shutil.rmtree(run.state, ignore_errors=True)
        raise
    budget.start()
    try:
        # 1. probe texts and the source's per-token changes (kept: a resumed run never reloads the source)
        prep = _probe_texts(run, loader, src_tok)
        stop.check()
        # 2. the initialiser: the paper's transfer, or a seeded fresh LoRA
        init_dir = _initialiser(run)
        # 3. the target
        lora, training = _train_target(run, budget, loader, tgt_tok, prep, init_dir, src_tok)
    finally:
        budget.stop()
    # 4. the output
    return _publish(run, prep, lora, training, budget, loader, t_start)


def _open_run(
    source: Any, adapter: Any, target: Any, out: Path, texts: Any, say: Log, progress: Progress | None, stop: StopFlag, opts: RefineOptions
) -> RefineRun:
    """Check every input and the output folder, plan the target's modules, and claim (or resume) the state folder."""
    opts.check()
    src, tgt = Checkpoint(source, "source"), Checkpoint(target, "target")
    require_folder(adapter, "refine")
    ad = source_adapter(adapter, src, opts.init)
    user = read_texts(texts) if isinstance(texts, (str, Path)) else list(texts or [])
    plan = build_plan(ad, src, tgt, rank=opts.rank, layer_map=opts.layer_map)
    cfg = lora_config(adapter_config(plan, ad, model_name(target)), opts)
    dev = resolve_device(opts.device)
    fp = fingerprint(ad, src, tgt, opts, user)
    state = runstate.state_dir_for(out, "refine")
    kept = None if opts.force else finished_report(out, fp)
    if kept is not None:  # a rerun of a finished refine keeps it, as a transfer's rerun does
        say(f"{out}: already holds this refine; kept")
        return RefineRun(opts, src, tgt, ad, user, plan, cfg, dev, out, fp, state, say, stop, progress, kept=kept)
    check_output_dir(out, [ad.path, src.path, tgt.path], opts.force)
    require_extras("refine")
    tune_allocator()
    resumed = runstate.claim(state, fp, opts.restart, "refine", {"options": opts.result_key(), "version": __version__}, state_file=STATE_NAME)
    if resumed:
        say(f"resuming the refine in {state}")
    for line in plan.warnings:  # skipped tensors, and what a non-LoRA adapter becomes on the target
        say(line)
    return RefineRun(opts, src, tgt, ad, user, plan, cfg, dev, out, fp, state, say, stop, progress, resumed)


def _probe_texts(run: RefineRun, loader: Loader, tok: Any) -> Prepared:
    """The probe texts (with the source's per-token changes where the objective reads them): kept from
    an interrupted run, else made now."""
    probes_file = run.state / PROBES_NAME
    if probes_file.exists():
        prep = Prepared.from_json(json.loads(probes_file.read_text()))
        run.say(f"probe texts: {len(prep.probes)} kept from the interrupted run" + (f", {len(prep.holdout)} held out" if prep.holdout_seed is not None else ""))
        return prep
    opts = run.opts
    prep = prepare_source(
        run.src,
        tok,
        run.ad.path,
        loader,
        run.dev,
        run.say,
        prompts=opts.prompts,
        samples=opts.samples,
        contrast_samples=opts.contrast_samples if uses_contrast(opts.objective) else 0,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        user=run.user,
        selection=opts.probe_select,
        amplify=opts.amplify,
        chat=opts.chat,
        holdout=opts.holdout,
        next_top=opts.soft_top if opts.objective == "lm+soft" else 0,
        token_changes=uses_token_changes(opts.objective),
    )
    prep.extra = {**prep.extra, "seed": opts.seed, "prompts": opts.prompts or "built-in", "max_new_tokens": opts.max_new_tokens}
    write_json(probes_file, prep.to_json())
    run.phases["source"] = prep.seconds
    # Train on the values as stored (rounded), as a resumed run reads them back: the same bytes either way.
    return Prepared.from_json(json.loads(probes_file.read_text()))


def _initialiser(run: RefineRun) -> Path | None:
    """The folder of the transfer that initialises the LoRA (made now, or kept from an interrupted run);
    None for a fresh initialisation."""
    if run.opts.init != "transfer":
        return None
    opts, init_dir = run.opts, run.state / "init"
    t = time.perf_counter()
    if not (init_dir / REPORT_NAME).exists():  # a resumed run keeps the finished transfer
        run_guarded(
            [(run.ad.path, init_dir)],
            run.src.path,
            run.tgt.path,
            batch=False,
            rank=opts.rank,
            layer_map=opts.layer_map,
            device=run.dev,
            dtype="float32",
            max_memory=opts.max_memory,
            max_gpu_memory=opts.max_gpu_memory,
            cache_dir=opts.cache_dir,
            force=True,  # refine's own folder: a resumed run finds the interrupted run's transfer there
            log=run.say,
        )
    run.phases["transfer"] = time.perf_counter() - t
    return init_dir


def _train_target(
    run: RefineRun, budget: Budget, loader: Loader, tok: Any, prep: Prepared, init_dir: Path | None, src_tok: Any
) -> tuple[dict[str, torch.Tensor], Training]:
    """Load the target with its LoRA in the shape the budget allows, train it, and free it; returns
    the LoRA's tensors and the training."""
    training = _plan_training(run, budget, tok, prep)
    if run.opts.onpolicy:
        training.round = lambda model: _onpolicy_round(run, loader, src_tok, tok, model, training)
    t = time.perf_counter()
    model = _load_target(run, loader, training, init_dir)
    run.phases["load_target"] = time.perf_counter() - t
    training.holdout = _holdout(run, tok, prep, training)
    _train(run, budget, model, training)
    if training.holdout is not None and training.holdout.best_state is not None:
        with torch.no_grad():  # the best held-out step's LoRA, not the last step's
            named = dict(model.named_parameters())
            for n, v in training.holdout.best_state.items():
                named[n].copy_(v)
    lora = peft_tensors(model)
    del model
    free()
    return lora, training


def _plan_training(run: RefineRun, budget: Budget, tok: Any, prep: Prepared) -> Training:
    """The target's training texts, and the memory shape they are trained in (the interrupted run's,
    for a resumed run); BudgetError where not even the smallest shape fits."""
    opts, tgt, dev = run.opts, run.tgt, run.dev
    train = target_texts(tok, prep, opts.soft_teacher)
    main = [t for t in train if t.origin in ("adapter", "user")]
    contrast = [t for t in train if t.origin == "base"] if uses_contrast(opts.objective) else []
    longest = min(opts.max_len, max(len(t.ids) for t in main + contrast))

    lora_params = lora_param_count(run.plan, run.cfg)
    passes = 2 if opts.objective == "lm+kl" else 1
    per_step = opts.batch * (2 if contrast else 1)  # the contrast objectives pass main and contrast texts together
    room = room_left(budget, dev)
    ck = load_checkpoint(run.state / CHECKPOINT_NAME, run.fp)
    shape = pick_shape(tgt, lora_params, room, per_step, longest, passes, dev, least_texts(opts.objective))
    if ck is not None and shape is not None:
        # A resumed run keeps the interrupted run's passes and lengths, so that it sums the same
        # gradients in the same order (the same bytes), whatever the room measured now.
        shape = TrainShape.from_json(ck["shape"])
    if shape is None:
        raise training_refused(tgt.path, budget, dev, least_training(tgt, lora_params, opts.objective, dev, longest))
    main = [truncate(t, shape.max_len) for t in main]
    contrast = [truncate(t, shape.max_len) for t in contrast]
    score = scoring_batch(tgt, lora_params, shape, passes, dev, max(opts.holdout, per_step))
    run.say(
        f"training on the target: {len(main)} adapter texts"
        + (f", {len(contrast)} contrast texts" if contrast else "")
        + f"; {shape.weights_dtype} weights, {shape.micro_batch} texts per pass, up to {shape.max_len} tokens"
        + (", gradient checkpointing" if shape.checkpointing else "")
        + f", {score} texts per pass without gradients"
        + f" (modelled {format_size(shape.bytes)} of {format_size(int(room))})"
        + (f"; computing in {shape.compute_dtype}: {shape.compute}" if shape.compute else "")
    )
    head_ids = text_vocabulary(main, dev) if opts.head_subset == "texts" else None
    if head_ids is not None:
        run.say(f"the lm loss's softmax runs over the {len(head_ids)} token ids of the training texts, not the whole vocabulary")
    return Training(main, contrast, shape, lora_params, ck, score, head_ids=head_ids)


def _load_target(run: RefineRun, loader: Loader, training: Training, init_dir: Path | None) -> Any:
    """The target in the shape's dtype with its LoRA attached (from the transfer or fresh), on the device."""
    from transformers import AutoModelForCausalLM

    shape = training.shape
    base = AutoModelForCausalLM.from_pretrained(str(run.tgt.path), dtype=getattr(torch, shape.weights_dtype))
    loader.used["target"] = shape.weights_dtype
    if shape.upcast:  # bfloat16 weights computing in float32 (before PEFT wraps the layers)
        upcast_model(base)
        loader.used["target_compute"] = shape.compute_dtype
    base.to(run.dev)
    if shape.checkpointing:
        enable_checkpointing(base)
    model = attach_lora(base, run.cfg, init_dir, run.opts.seed)
    model.to(run.dev)
    if run.opts.objective in BASE_OBJECTIVES:
        base_token_logprobs(model, training.main + training.contrast, run.dev, training.score_batch)
    if run.opts.objective == "lm+soft":
        if run.opts.soft_teacher == "shift":
            soft_base_logits(model, training.main, run.dev, training.score_batch)
        else:  # the source + adapter's own log-probabilities are the teacher's logits
            for t in training.main:
                t.soft_base = [[0.0] * len(ids) for _j, ids, _v in t.soft or []]
    return model


def _train(run: RefineRun, budget: Budget, model: Any, training: Training) -> None:
    """The training loop, from the checkpoint's step: a checkpoint after every step, the budget
    checked, progress reported. Fills `training.losses` and `training.seconds`."""
    opts = run.opts
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=0.0)
    start, spent = 0, 0.0
    ck, hold = training.checkpoint, training.holdout
    if ck is not None:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, v in ck["lora"].items():
                named[n].copy_(v)
        optim.load_state_dict(ck["optimizer"])
        start, training.losses, spent = int(ck["step"]), list(ck["losses"]), float(ck.get("seconds", 0.0))
        if hold is not None and ck.get("holdout") is not None:
            hold.restore(ck["holdout"])
        run.say(f"resuming at step {start} of {opts.steps}")
        if training.round is not None and start >= onpolicy_step(opts):
            training.round(model)  # the round's texts, kept in the state folder
    model.train()
    ck_path = run.state / CHECKPOINT_NAME
    t = time.perf_counter()
    if hold is not None and not hold.history:
        _evaluate(run, model, hold, 0, training.score_batch)  # step 0: the initialiser
    for step in range(start, opts.steps):
        if hold is not None and hold.stopped:
            break
        run.stop.check()
        rec = _step(run, model, optim, training, step)
        training.losses.append(rec)
        if hold is not None and ((step + 1) % opts.eval_every == 0 or step + 1 == opts.steps):
            _evaluate(run, model, hold, step + 1, training.score_batch, last=step + 1 == opts.steps)
            if hold.stopped and step + 1 < opts.steps:
                best = f"best: step {hold.best_step}" if hold.best_step is not None else "none beat the random control"
                run.say(f"stopping at step {step + 1} of {opts.steps}: no better held-out step in {hold.patience} evaluations ({best})")
        extra = {"holdout": hold.to_checkpoint()} if hold is not None else None
        save_checkpoint(ck_path, model, optim, step + 1, training.losses, run.fp, training.shape, spent + time.perf_counter() - t, extra)
        if training.round is not None and step + 1 == onpolicy_step(opts) and step + 1 < opts.steps and not (hold is not None and hold.stopped):
            training.round(model)
        if budget.exceeded:
            raise BudgetError(f"{budget.exceeded}; the checkpoint of step {step + 1} is kept: rerun with a larger budget to resume")
        if run.progress is not None:
            run.progress(step + 1, opts.steps, rec)
        hooks.reached("refine_step", step + 1)
    run.phases["train"] = time.perf_counter() - t
    training.seconds = spent + run.phases["train"]


def onpolicy_step(opts: RefineOptions) -> int:
    """The step after which the on-policy round runs: halfway."""
    return max(1, opts.steps // 2)


def _onpolicy_round(run: RefineRun, loader: Loader, src_tok: Any, tok: Any, model: Any, training: Training) -> None:
    """The on-policy round: the target + its LoRA as trained so far writes `opts.onpolicy` texts on the
    prompts (seeded), the source scores them with its adapter off and on (loaded again for this, then
    freed), and they join the training as "delta" texts: the target's change on its own writing matched
    to the source adapter's. Kept in the state folder, so a resumed run neither samples nor loads again."""
    opts, t = run.opts, time.perf_counter()
    path = run.state / ONPOLICY_NAME
    if not path.exists():
        at = onpolicy_step(opts)
        run.say(f"on-policy round at step {at}: the target + LoRA writes {opts.onpolicy} texts, the source scores them")
        seed = stable_seed(opts.seed, "onpolicy")
        prompts = opts.prompts or DEFAULT_PROMPTS
        # sample_probes samples in eval mode and puts the model back in the mode it found it in
        texts = sample_probes(model, tok, prompts, opts.onpolicy, max_new_tokens=opts.max_new_tokens, seed=seed, origin="onpolicy", device=run.dev)
        prep = score_on_source(run.src, src_tok, run.ad.path, loader, run.dev, texts, extra={"at_step": at})
        write_json(path, prep.to_json())
    prep = Prepared.from_json(json.loads(path.read_text()))  # the values as stored, as a resumed run reads them
    texts = [truncate(x, training.shape.max_len) for x in target_texts(tok, prep)]
    info: dict[str, Any] = {}
    if opts.onpolicy_keep:  # best-of-N: the texts the source adapter prefers most, trained on with the LM loss
        texts, info = preferred(texts, opts.onpolicy_keep)
    else:
        base_token_logprobs(model, texts, run.dev, training.score_batch)
    training.onpolicy = texts
    run.phases["onpolicy"] = run.phases.get("onpolicy", 0.0) + time.perf_counter() - t
    training.onpolicy_info = {"texts": len(texts), "at_step": int(prep.extra.get("at_step", onpolicy_step(opts))), "file": ONPOLICY_NAME, **info}


def preferred(texts: list[TrainText], keep: float) -> tuple[list[TrainText], dict[str, Any]]:
    """The share `keep` (at least one) of `texts` that the source adapter prefers most: the highest
    change in log-likelihood per byte over their segments (ties: the earlier text), in their order."""
    score = [math.fsum(t.delta_s) / t.nbytes if t.nbytes else -math.inf for t in texts]
    n = max(1, math.ceil(keep * len(texts))) if texts else 0
    chosen = sorted(sorted(range(len(texts)), key=lambda i: (-score[i], i))[:n])
    dropped = [i for i in range(len(texts)) if i not in set(chosen)]

    def mean(ix: list[int]) -> float | None:
        return math.fsum(score[i] for i in ix) / len(ix) if ix else None

    return [texts[i] for i in chosen], {"kept": len(chosen), "sampled": len(texts), "kept_preference": mean(chosen), "dropped_preference": mean(dropped)}


def _holdout(run: RefineRun, tok: Any, prep: Prepared, training: Training) -> Holdout | None:
    """The held-out split on the target's side (None: --holdout 0), cut to the training shape's length."""
    if prep.holdout_seed is None:
        return None
    texts, source = target_held(tok, prep.holdout, prep.holdout_effect, training.shape.max_len)
    return Holdout(texts, source, prep.holdout_seed, run.opts.patience)


def _evaluate(run: RefineRun, model: Any, hold: Holdout, step: int, batch: int, last: bool = False) -> None:
    """Score the held-out texts with the LoRA as it is (and the target base, the first time), and with
    its random control where that decides now (services/holdout.py: deferred, the control of the step
    about to be chosen, once); record the evaluation, keeping the LoRA's state where it is the best (or
    the candidate) so far. `last`: the last step's evaluation."""
    if not hold.texts:
        return
    t = time.perf_counter()
    model.eval()
    if hold.base is None:
        with model.disable_adapter():
            hold.base = loglik_per_byte(model, hold.texts, run.dev, batch)
    control: list[float] | None
    if lora_is_nil(model):  # a fresh LoRA (B = 0) and its control (the same norms) add exactly nothing
        lora = control = list(hold.base)
    else:
        lora = loglik_per_byte(model, hold.texts, run.dev, batch)
        control = None
        if hold.needs_control(lora):
            with ControlInPlace(model, hold.seed):
                control = loglik_per_byte(model, hold.texts, run.dev, batch)
    rec = hold.record(step, lora, control, lambda: lora_state(model))
    r = rec["recovery"]
    vs = "control not scored: below the best" if not hold.deferred else "control scored when chosen"
    if control is not None:
        vs = _versus_control(rec)
    top = hold.best is not None and hold.history[hold.best] is rec
    top = top or (hold.candidate is not None and hold.history[hold.candidate] is rec)
    run.say(f"held out, step {step}: recovery {'n/a' if r is None else f'{100 * r:.0f}%'} ({vs})" + (" best so far" if top else ""))
    due = hold.due(last)
    if due is not None:
        _resolve(run, model, hold, due, batch)
    model.train()
    run.phases["holdout"] = run.phases.get("holdout", 0.0) + time.perf_counter() - t  # within "train"


def _resolve(run: RefineRun, model: Any, hold: Holdout, step: int, batch: int) -> None:
    """Score the candidate's control (step `step`, its state in `hold.best_state`) and settle it; the
    LoRA is put back as it was, bit for bit."""
    assert hold.best_state is not None
    named = dict(model.named_parameters())
    now = lora_state(model) if hold.history[-1]["step"] != step else None
    with torch.no_grad():
        if now is not None:
            for n, v in hold.best_state.items():
                named[n].copy_(v)
        with ControlInPlace(model, hold.seed):
            control = loglik_per_byte(model, hold.texts, run.dev, batch)
        if now is not None:
            for n, v in now.items():
                named[n].copy_(v)
    rec = hold.resolve(control)
    what = f"held out, step {step} against its control: {_versus_control(rec)}"
    run.say(what + ("" if rec["beats_control"] else ": not above it; from here each step's control is scored as it comes"))


def _versus_control(rec: dict[str, Any]) -> str:
    """An evaluation's control recovery and z, as the run log prints them."""
    c, z = rec["control_recovery"], rec["z"]
    return f"control {'n/a' if c is None else f'{100 * c:.0f}%'}, z {'n/a' if z is None else f'{z:+.1f}'}"


def _step(run: RefineRun, model: Any, optim: Any, training: Training, step: int) -> dict[str, float]:
    """One optimiser step on step `step`'s batch, in passes of at most the shape's micro-batch whose
    gradients add up; returns the step's losses."""
    opts, main, contrast = run.opts, training.main, training.contrast
    mi = [main[i] for i in batch_indices(len(main), opts.batch, opts.seed, step, "main")]
    ci = [contrast[i] for i in batch_indices(len(contrast), opts.batch, opts.seed, step, "contrast")] if contrast else []
    norm = batch_norms(opts.objective, mi, ci)
    parts: dict[str, float] = {}
    total = 0.0
    mb = training.shape.micro_batch if not ci else max(1, training.shape.micro_batch // 2)
    if not ci:  # passes of texts of like lengths: less padding (7% of the tokens against 11% at the defaults), the same sum
        mi = sorted(mi, key=lambda t: len(t.ids))
    for k in range(0, max(len(mi), len(ci)), mb):
        loss, p = batch_loss(model, opts.objective, mi[k : k + mb], ci[k : k + mb], norm, run.dev, opts.kl_weight, opts.soft_weight, training.head_ids)
        if loss.requires_grad:
            loss.backward()
        total += float(loss.detach())
        for key, v in p.items():
            parts[key] = parts.get(key, 0.0) + v
    if training.onpolicy:  # after the on-policy round: "delta" (or, best-of-N, "lm") on a batch of the target's own texts
        oi = [training.onpolicy[i] for i in batch_indices(len(training.onpolicy), opts.batch, opts.seed, step, "onpolicy")]
        obj, key, name = ("lm", "nll", "onpolicy_nll") if opts.onpolicy_keep else ("delta", "mse", "onpolicy_mse")
        onorm = batch_norms(obj, oi, [])
        for k in range(0, len(oi), training.shape.micro_batch):
            loss, p = batch_loss(model, obj, oi[k : k + training.shape.micro_batch], [], onorm, run.dev, opts.kl_weight)
            loss = opts.onpolicy_weight * loss
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
            parts[name] = parts.get(name, 0.0) + p.get(key, 0.0)
    optim.step()
    optim.zero_grad(set_to_none=True)
    rec = {"step": step + 1, "loss": round(total, 6), **{k: round(v, 6) for k, v in parts.items()}}
    if not math.isfinite(total):
        raise InputError(f"refine: the loss became {total} at step {step + 1}; try a smaller --lr")
    return rec


def _publish(
    run: RefineRun, prep: Prepared, lora: dict[str, torch.Tensor], training: Training, budget: Budget, loader: Loader, t_start: float
) -> dict[str, Any]:
    """Write the finished folder (adapter, config, probe texts, report) in the state folder, rename it
    into place, drop the state folder; returns the report."""
    final = run.state / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()

    save_file(lora, str(final / ADAPTER_NAME), metadata={"format": "pt"})
    out_cfg = dict(run.cfg)
    out_cfg["inference_mode"] = True
    write_json(final / CONFIG_NAME, out_cfg)
    shutil.copyfile(run.state / PROBES_NAME, final / PROBES_NAME)
    if (run.state / ONPOLICY_NAME).exists():
        shutil.copyfile(run.state / ONPOLICY_NAME, final / ONPOLICY_NAME)
    report = _report(run, prep, training, budget, loader, time.perf_counter() - t_start)
    write_json(final / REPORT_NAME, report)
    runstate.publish(final, run.out, force=True)  # a non-empty --out without --force was refused before any work
    shutil.rmtree(run.state, ignore_errors=True)
    return report


def _report(run: RefineRun, prep: Prepared, training: Training, budget: Budget, loader: Loader, seconds: float) -> dict[str, Any]:
    opts = run.opts
    train_n = {"adapter": sum(p.origin == "adapter" for p in prep.probes), "base": sum(p.origin == "base" for p in prep.probes), "user": len(run.user)}
    return build_report(
        "refine",
        adapter=run.ad.path,
        source=run.src,
        target=run.tgt,
        options={**opts.result_key(), "device": opts.device, "max_memory": opts.max_memory, "max_gpu_memory": opts.max_gpu_memory},
        device=run.dev,
        seconds=seconds,
        phases=run.phases,
        budget=budget,
        version=__version__,
        objective=opts.objective,
        init=opts.init,
        probe_set={
            "seed": opts.seed,
            "prompts": opts.prompts or "built-in",
            "file": PROBES_NAME,
            "texts": train_n,
            "trained_on": len(training.main),
            "contrast": len(training.contrast),
            **({"selection": prep.extra["selection"]} if "selection" in prep.extra else {}),
            **({"onpolicy": training.onpolicy_info} if training.onpolicy_info else {}),
            # lm+soft: the scored tokens where both vocabularies share at least two of the source's candidates
            **(soft_counts(training.main) if opts.objective == "lm+soft" else {}),
        },
        losses=training.losses,
        holdout=None if training.holdout is None else training.holdout.report(opts.holdout, opts.eval_every, len(training.losses), opts.steps),
        shape={**training.shape.to_json(), "score_batch": training.score_batch},
        modules=len(run.plan.units),
        lora_params=training.lora_params,
        dtypes=loader.used,
        train_seconds=training.seconds,
        fingerprint=run.fp,
    )
