"""A migration on this machine: one (source, target) pair at a time, the pair's transfers through
the batch path (each base matrix read and factored once for all of them), then its refines (whose
initial transfers find the pair's bases in the cache). A batch that fails is redone job by job, so
that a bad adapter fails alone: finished units resume, nothing is computed twice."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lowmem_crosslora.commands.transfer import transfer_batch
from lowmem_crosslora.errors import CrossLoraError
from lowmem_crosslora.io.adapter import load_adapter
from lowmem_crosslora.migrate.jobs import Outcome, outcome, run_job
from lowmem_crosslora.migrate.manifest import Job
from lowmem_crosslora.services.options import MigrateOptions


def by_pair(jobs: list[Job]) -> dict[tuple[str, str], list[Job]]:
    """The jobs grouped by (source, target), in manifest order."""
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.pair, []).append(j)
    return groups


def run_local(jobs: list[Job], opts: MigrateOptions, done: Callable[[Outcome], None], log: Callable[[str], None]) -> dict[str, Any]:
    """Run every job here; `done` receives each outcome as it is known. Returns what the pairs shared."""
    shared: dict[str, Any] = {}
    for (source, target), group in by_pair(jobs).items():
        transfers = [j for j in group if not j.refine]
        log(f"pair {source} -> {target}: {len(transfers)} transfers in one batch, {len(group) - len(transfers)} refines")
        if transfers:
            shared[f"{source} -> {target}"] = _batch(transfers, source, target, opts, done, log)
        for j in group:
            if j.refine:
                done(run_job(j, opts))
    return shared


def _batch(jobs: list[Job], source: str, target: str, opts: MigrateOptions, done: Callable[[Outcome], None], log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ok = []
    for j in jobs:  # an adapter that cannot be read fails alone, before the batch
        try:
            load_adapter(j.adapter).close()
            ok.append(j)
        except CrossLoraError as e:
            done(outcome(j, "failed", 0.0, str(e), e.exit_code))
    jobs = ok
    if not jobs:
        return {"mode": "none"}
    said: list[str] = []
    try:
        reports = transfer_batch([(j.adapter, j.out) for j in jobs], source, target, log=said.append, **opts.job_kwargs())
    except CrossLoraError as e:
        log(f"the batch stopped ({e}); running its {len(jobs)} jobs one by one")
        for j in jobs:
            done(run_job(j, opts))
        return {"mode": "one by one", "reason": str(e)}
    seconds = time.perf_counter() - t0
    kept = {line.split(": already holds this transfer")[0] for line in said if line.endswith("; kept")}
    for j in jobs:  # the batch's time, shared among its jobs
        done(outcome(j, "kept" if j.out in kept else "done", seconds / len(jobs)))
    cache = next((r["summary"].get("cache") for r in reports if r["summary"].get("cache")), None)
    return {"mode": "batch", "jobs": len(jobs), "seconds": round(seconds, 3), "cache": cache}
