"""One transfer run, for one adapter or a batch: check every input, plan, open (or resume) each output,
run the unit loop, publish. Used by the transfer command and by refine (its init=transfer).

One base matrix is resident at a time (plus the next one, read ahead while the current one is
factored, when the budget has room for both). Source bases that a later unit needs again (the
'depth' layer map can feed one source layer to several target layers) are kept until last use."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lowmem_crosslora.errors import CrossLoraError, InputError, Interrupted
from lowmem_crosslora.io import runstate
from lowmem_crosslora.io.adapter import Adapter, adapter_fingerprint, check_finite, load_adapter
from lowmem_crosslora.io.checkpoints import open_checkpoint
from lowmem_crosslora.io.gguf_lora import check_out_format, finish_hooks, output_files
from lowmem_crosslora.io.hub import model_name
from lowmem_crosslora.io.partial import ADAPTER_NAME, JOURNAL_NAME, REPORT_NAME, Layout, PartialOutput, journal_fingerprint
from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.io.runstate import check_output_dir, inside, state_dir_for
from lowmem_crosslora.linalg.bases import SvdSettings
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.factoring import Engine, Progress, open_cache
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.options import TransferOptions
from lowmem_crosslora.services.peft_config import adapter_config
from lowmem_crosslora.services.plan import build_plan
from lowmem_crosslora.services.report import build_report
from lowmem_crosslora.services.stop import StopFlag
from lowmem_crosslora.services.units import Task, run_units
from lowmem_crosslora.sysmem import tune_allocator
from lowmem_crosslora.version import __version__


def run_fingerprint(adapter: Adapter, source: CheckpointReader, target: CheckpointReader, opts: TransferOptions) -> str:
    """What a transfer's output depends on: a resumed or skipped output must have been made with the same."""
    payload = {
        "adapter": adapter_fingerprint(adapter),
        "source": source.fingerprint(),
        "target": target.fingerprint(),
        "options": opts.result_key(),
        "version": __version__,  # a release may change results: never mix two in one file
    }
    return runstate.fingerprint(payload)


def run_guarded(pairs: list[tuple[str | Path, str | Path]], source: str | Path, target: str | Path, **kw: Any) -> list[dict[str, Any]]:
    """run_transfers with SIGINT / SIGTERM turned into a stop at the next clean point (Interrupted)."""
    with StopFlag() as stop:
        try:
            return run_transfers(pairs, source, target, stop=stop, **kw)
        except KeyboardInterrupt:  # a second Ctrl-C: the state on disk is crash-safe, so this is resumable too
            raise Interrupted("stopped by SIGINT; finished units are kept") from None


def finished_report(out: Path, fingerprint: str, files: tuple[str, ...] = (ADAPTER_NAME,)) -> dict[str, Any] | None:
    """The report of a finished transfer in `out` made with this fingerprint and holding `files`, or None."""
    try:
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run_fingerprint") != fingerprint or not all((out / f).is_file() for f in files):
        return None
    return report


def _prepare(ad: Adapter, out_path: Path, src: CheckpointReader, tgt: CheckpointReader, opts: TransferOptions, batch: bool, say: Callable[[str], None]) -> Task:
    """Check one adapter and its output, plan it, and open (or resume) its journaled output."""
    plan = build_plan(ad, src, tgt, rank=opts.rank, layer_map=opts.layer_map, dtype=opts.dtype, target_format=opts.target_format)
    check_finite(ad)
    fingerprint = run_fingerprint(ad, src, tgt, opts)
    task = Task(ad, out_path, plan, fingerprint)
    if not opts.force:  # a rerun of a finished transfer (one adapter or a batch) keeps it
        done = finished_report(out_path, fingerprint, output_files(opts.out_format))
        if done is not None:
            say(f"{out_path}: already holds this transfer; kept")
            task.report = done
            return task
    check_output_dir(out_path, [ad.path, src.path, tgt.path], opts.force)
    state = state_dir_for(out_path)
    if state.exists() and opts.resume and not opts.restart:
        detail = " (the adapter, a model's weight files, or an option that changes the result)"
        runstate.refuse_other_run(state, "transfer", journal_fingerprint(out_path), fingerprint, detail)
    return task


def _say_discarded(out: Path, opts: TransferOptions, warn: Callable[[str], None] | None) -> None:
    """--restart and --no-resume throw an interrupted run's finished units away: say so, with how many."""
    state = state_dir_for(out)
    if not state.exists() or (opts.resume and not opts.restart):
        return
    try:
        units = max(0, len((state / JOURNAL_NAME).read_bytes().splitlines()) - 1)
    except OSError:
        units = 0
    flag = "--restart" if opts.restart else "--no-resume"
    _notice(warn, f"{out}: {flag} discards the interrupted transfer in {state} ({units} finished units); starting over")


def _notice(warn: Callable[[str], None] | None, msg: str) -> None:
    """A warning line: through the caller's `warn` (the CLI prints it even with --quiet), else warnings.warn."""
    if warn is not None:
        warn(msg)
    else:
        warnings.warn(msg, UserWarning, stacklevel=5)


def _open_output(task: Task, opts: TransferOptions, say: Callable[[str], None], label: str) -> None:
    plan = task.plan
    expected = {u.uid: [u.out_a, u.out_b] for u in plan.units}
    layout = Layout(plan.layout(), regions=plan.regions())
    partial = PartialOutput(task.out, layout, task.fingerprint, resume=opts.resume and not opts.restart, expected=expected)
    if partial.resumed:
        damaged = len(partial.redone_corrupt) + partial.bad_lines
        say(
            f"{label}resuming: {len(partial.done)} of {len(plan.units)} units already done"
            + (f"; {damaged} damaged journal entries or units are redone" if damaged else "")
            + (f"; repaired: {', '.join(partial.repairs)}" if partial.repairs else "")
        )
    task.partial = partial
    task.records = {uid: rec["record"] for uid, rec in partial.done.items()}
    task.pending = [u for u in plan.units if u.uid not in partial.done]
    task.resumed = len(plan.units) - len(task.pending)


def _plan_tasks(
    pairs: list[tuple[str | Path, str | Path]],
    src: CheckpointReader,
    tgt: CheckpointReader,
    opts: TransferOptions,
    batch: bool,
    say: Callable[[str], None],
    warn: Callable[[str], None] | None,
) -> list[Task]:
    """Every input checked, every output planned, before any work starts; the plans' warnings said."""
    outs = [Path(o) for _, o in pairs]
    seen_out: dict[Path, int] = {}
    for i, o in enumerate(outs):
        key = runstate.resolved(o, "output")
        if key in seen_out:
            raise InputError(f"adapters {seen_out[key] + 1} and {i + 1} would both be written to {o}; give each its own output folder")
        seen_out[key] = i
    tasks: list[Task] = []
    for (adapter, _), out_path in zip(pairs, outs, strict=True):
        ad = load_adapter(adapter, allow_pickle=opts.allow_pickle)
        if batch:
            for o in outs:
                if inside(o, ad.path) or inside(ad.path, o):
                    raise InputError(f"output folder {o} and the adapter {ad.path} lie inside one another; choose folders apart")
        tasks.append(_prepare(ad, out_path, src, tgt, opts, batch, say))
    for t in tasks:  # skipped biases / modules_to_save, a rank vLLM needs --max-lora-rank for
        for msg in t.plan.warnings:
            _notice(warn, f"{t.adapter.path}: {msg}" if batch else msg)
    return tasks


def _run(
    todo: list[Task],
    src: CheckpointReader,
    tgt: CheckpointReader,
    opts: TransferOptions,
    settings: SvdSettings,
    budget: Budget,
    device: str,
    stop: StopFlag,
    progress: Progress | None,
    warn: Callable[[str], None] | None,
) -> Engine:
    """The unit loop over the outputs to write, under the budget; then every unit's bytes verified."""
    total = sum(len(t.plan.units) for t in todo)
    done_count = sum(t.resumed for t in todo)
    if progress:
        progress(done_count, total, "")
    with stop:
        cache = open_cache(opts.cache_dir, opts.cache_limit, warn) if opts.use_cache else None
        engine = Engine(todo[0].plan, settings, budget, device, opts.seed, stop, prefetch=opts.prefetch, cache=cache, stack=opts.stack)
        budget.start()
        try:
            run_units(engine, todo, src, tgt, progress, done_count, total)
            for t in todo:
                assert t.partial is not None
                bad = t.partial.verify_all([u.uid for u in t.plan.units])
                if bad:
                    raise CrossLoraError(f"{t.out}: verification failed for units {', '.join(bad[:5])}; rerun to redo them")
        finally:
            engine.close()
            budget.stop()
            for t in todo:
                if t.partial is not None:
                    t.partial.close()
    return engine


def run_transfers(
    pairs: list[tuple[str | Path, str | Path]],
    source: str | Path,
    target: str | Path,
    *,
    stop: StopFlag,
    batch: bool,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    opts = TransferOptions(**options)
    if opts.cache_dir is not None:
        opts.cache_dir = str(opts.cache_dir)
    say = log or (lambda msg: None)
    t_start = time.perf_counter()
    tune_allocator()
    settings = opts.svd_settings()
    src = open_checkpoint(source, "source")
    tgt = open_checkpoint(target, "target")
    check_out_format(opts.out_format, tgt.family.name)
    tasks = _plan_tasks(pairs, src, tgt, opts, batch, say, warn)
    if src.identity() == tgt.identity():
        _notice(warn, "source and target are the same model: the transfer can only truncate the adapter to rank r")
    device = resolve_device(opts.device)
    budget = Budget(opts.max_memory, opts.max_gpu_memory, device)
    stop.check()
    todo = [t for t in tasks if t.report is None]
    with ExitStack() as held:
        for t in todo:  # each output locked before its state is read or written, released when published
            held.callback(runstate.lock_output(t.out, "crosslora", "transfer").release)
            _say_discarded(t.out, opts, warn)
            _open_output(t, opts, say, f"{t.out}: " if batch else "")
        engine = _run(todo, src, tgt, opts, settings, budget, device, stop, progress, warn) if todo else None
        _finish(tasks, todo, engine, src, tgt, model_name(target), opts, device, budget, time.perf_counter() - t_start, batch)
    return [t.report for t in tasks if t.report is not None]


def _finish(
    tasks: list[Task],
    todo: list[Task],
    engine: Engine | None,
    src: CheckpointReader,
    tgt: CheckpointReader,
    target_name: str,
    opts: TransferOptions,
    device: str,
    budget: Budget,
    seconds: float,
    batch: bool,
) -> None:
    """Each written output's report and config beside its adapter, then the folder published."""
    for t in todo:
        assert engine is not None and t.partial is not None
        report = build_report(
            "transfer",
            adapter=t.adapter.path,
            source=src,
            target=tgt,
            options=asdict(opts),
            device=device,
            seconds=seconds,
            phases=engine.phases,
            budget=budget,
            version=__version__,
            plan=t.plan,
            records=[t.records[u.uid] for u in t.plan.units],
            fallbacks=engine.fallbacks,
            resumed_units=t.resumed,
        )
        report["run_fingerprint"] = t.fingerprint
        report["summary"]["cache"] = engine.cache.stats() if engine.cache is not None else None
        if opts.stack > 1:  # how many matrices were factored in stacks, and in how many
            report["summary"]["stacks"] = {"limit": opts.stack, "stacks": len(engine.stacks), "matrices": sum(engine.stacks)}
        if batch:
            report["summary"]["batch"] = {"adapters": len(tasks), "transferred_in_this_run": len(todo)}
        extra, drop = finish_hooks(opts.out_format, t.plan, t.adapter, tgt)
        t.partial.finish(adapter_config(t.plan, t.adapter, target_name), report, opts.force, extra=extra, drop=drop)
        t.report = report
