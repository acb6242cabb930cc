"""The bases command: factor a model's matrices into the basis cache ahead of transfers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowmem_crosslora.architectures import CANONICAL
from lowmem_crosslora.errors import CrossLoraError, InputError
from lowmem_crosslora.io.adapter import load_adapter
from lowmem_crosslora.io.checkpoints import open_checkpoint
from lowmem_crosslora.services.device import resolve_device
from lowmem_crosslora.services.factoring import Engine, MatrixJob, Progress, open_cache
from lowmem_crosslora.services.memory import Budget
from lowmem_crosslora.services.options import BasesOptions
from lowmem_crosslora.services.plan import build_plan
from lowmem_crosslora.services.stop import StopFlag
from lowmem_crosslora.services.units import schedule
from lowmem_crosslora.sysmem import tune_allocator


def precompute_bases(
    model: str | Path,
    rank: int,
    *,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Factor every q, k, v, o, gate, up, down weight of every layer of `model` at
    r = min(rank, m, n) into the basis cache, so that a later transfer only projects.

    Options are BasesOptions' fields (device, cache_dir, cache_limit, seed, oversample, niter,
    exact_ratio, compute_dtype, max_memory, max_gpu_memory). A transfer's r is min(rank, m, n, m', n'):
    exact-SVD entries serve any r up to the stored one; randomized entries serve only the same r (see
    cache.py), that is, a transfer with the same --rank, seed and SVD settings whose other model does
    not clip r further.
    """
    opts = BasesOptions(rank=rank, **options)
    settings = opts.svd_settings()
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    t_start = time.perf_counter()
    tune_allocator()
    ckpt = open_checkpoint(model, "model")
    dev = resolve_device(opts.device)
    ident = ckpt.identity()
    jobs = []
    for layer in range(ckpt.dims.num_layers):
        for name in CANONICAL:
            w = ckpt.weight_name(layer, name)
            if not ckpt.has(w):
                continue
            info = ckpt.info(w)
            if len(info.shape) != 2:
                continue
            m, n = int(info.shape[0]), int(info.shape[1])
            jobs.append(MatrixJob(ckpt, w, (m, n), min(rank, m, n), "model", ident))
    if not jobs:
        raise InputError(f"model {ckpt.path}: none of the weights q, k, v, o, gate, up, down was found")
    methods, cache_stats, phases = _factor_into_cache(jobs, opts, settings, dev, progress, warn)
    return {
        "kind": "bases",
        "model": str(ckpt.path),
        "rank": rank,
        "device": dev,
        "matrices": len(jobs),
        "methods": methods,
        "cache": cache_stats,
        "seconds": round(time.perf_counter() - t_start, 3),
        "phase_seconds": phases,
    }


def precompute_pair(
    adapters: list[str | Path],
    source: str | Path,
    target: str | Path,
    rank: int,
    *,
    layer_map: str = "index",
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Factor into the basis cache exactly the bases that transfers of `adapters` from `source` to
    `target` at `rank` read (each unit's r = min(rank, m, n, m', n'), source and target), each once,
    so that the transfers that follow only project. An adapter that cannot be planned is left out
    and named under "errors" (its own transfer reports it); options as precompute_bases'."""
    opts = BasesOptions(rank=rank, **options)
    settings = opts.svd_settings()
    t_start = time.perf_counter()
    tune_allocator()
    src, tgt = open_checkpoint(source, "source"), open_checkpoint(target, "target")
    dev = resolve_device(opts.device)
    errors: dict[str, str] = {}
    units: dict[str, Any] = {}
    for a in adapters:
        try:
            plan = build_plan(load_adapter(a), src, tgt, rank=rank, layer_map=layer_map)
        except CrossLoraError as e:
            errors[str(a)] = str(e)
            continue
        for u in plan.units:
            units.setdefault(u.uid, u)
    _groups, _order, jobs, _job_group, _last = schedule([(None, u) for u in units.values()], src, tgt)
    methods, cache_stats, phases = _factor_into_cache(jobs, opts, settings, dev, progress, warn) if jobs else ({}, {}, {})
    return {
        "kind": "pair-bases",
        "source": str(src.path),
        "target": str(tgt.path),
        "rank": rank,
        "device": dev,
        "adapters": len(adapters) - len(errors),
        "matrices": len(jobs),
        "methods": methods,
        "cache": cache_stats,
        "errors": errors,
        "seconds": round(time.perf_counter() - t_start, 3),
        "phase_seconds": phases,
    }


def _factor_into_cache(
    jobs: list[MatrixJob], opts: BasesOptions, settings: Any, dev: str, progress: Progress | None, warn: Callable[[str], None] | None
) -> tuple[dict[str, int], dict[str, Any], dict[str, float]]:
    """Run the factoring engine over `jobs` into the basis cache, under the budget: (methods, cache stats, phase seconds)."""
    budget = Budget(opts.max_memory, opts.max_gpu_memory, dev)
    cache = open_cache(opts.cache_dir, opts.cache_limit, warn)
    with StopFlag() as stop:
        engine = Engine(None, settings, budget, dev, opts.seed, stop, prefetch=True, cache=cache, stack=opts.stack)
        for job in jobs:
            m, n = job.shape
            engine.matrices.append((m, n, settings.q_for(job.r, m, n), job.r, job.ckpt.info(job.weight).dtype, 0))
        budget.start()
        methods: dict[str, int] = {}
        try:
            if progress:
                progress(0, len(jobs), "")
            for k, (job, basis, _mplan) in enumerate(engine.run_jobs(jobs), start=1):
                methods[basis.method] = methods.get(basis.method, 0) + 1
                del basis
                if progress:
                    progress(k, len(jobs), job.weight)
        finally:
            engine.close()
            budget.stop()
    return dict(sorted(methods.items())), cache.stats(), {k: round(v, 3) for k, v in engine.phases.items()}
