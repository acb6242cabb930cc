"""A migration on Ray: a task per (source, target) pair computes the pair's bases once into the basis
cache; each job is a task of its own that waits for its pair's and then only projects (or refines),
with its resources declared from the memory model; a worker that dies mid-job is retried by Ray and
the retry resumes the job's partial output. Ray is an optional extra (`[cluster]`); nothing else in
the package imports it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lowmem_crosslora.commands.bases import precompute_pair
from lowmem_crosslora.commands.inspect import plan_summary
from lowmem_crosslora.errors import CrossLoraError, InputError
from lowmem_crosslora.migrate.jobs import Outcome, outcome, run_job
from lowmem_crosslora.migrate.local import by_pair
from lowmem_crosslora.migrate.manifest import Job
from lowmem_crosslora.services.options import MigrateOptions

INSTALL_HINT = "migrate --ray needs Ray: pip install 'lowmem-crosslora[cluster]'"
# A Ray worker holds Ray's own libraries beside Python and torch: declared on top of the tool's figure.
RAY_WORKER_BYTES = 256 * 1024**2
# What a refine of a 0.5B target is held to (issue 16's cost target); declared where no --max-memory is given.
REFINE_BYTES = 2 * 1024**3
RETRIES = 3  # Ray reruns a job whose worker died this many times; each rerun resumes the partial output


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


def pair_bases(adapters: list[str], source: str, target: str, opts: MigrateOptions) -> dict[str, Any]:
    """The pair task: every base the pair's adapters read, factored once into the cache. Never raises
    for an input problem: the jobs report their own."""
    try:
        return precompute_pair(adapters, source, target, opts.rank, layer_map=opts.layer_map, device=opts.device, seed=opts.seed, cache_dir=opts.cache_dir)
    except CrossLoraError as e:
        return {"kind": "pair-bases", "source": source, "target": target, "error": str(e)}


def job_memory(job: Job, opts: MigrateOptions) -> int:
    """Memory to declare for a job: its --max-memory where given; else the transfer's planned peak
    (baseline + working, the figure that picks the budget) or a refine's cost target, plus Ray's own."""
    if opts.max_memory:
        return int(opts.max_memory)
    if job.refine:
        return REFINE_BYTES + RAY_WORKER_BYTES
    try:
        est = plan_summary(job.adapter, job.source, job.target, rank=opts.rank, layer_map=opts.layer_map, device=opts.device)["estimate"]
    except CrossLoraError:
        return RAY_WORKER_BYTES  # the job fails fast on its input and says why
    return int(est["baseline_host_bytes"] + est["peak_working_bytes"]) + RAY_WORKER_BYTES


def connect(address: str, workers: int) -> Any:
    """Ray, started here ('local', --workers CPUs) or joined ('auto' or an address); reused when the
    caller has already started it (as the tests do)."""
    ray = require_ray()
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address == "local":
                ray.init(num_cpus=workers, **kw)
            else:
                ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(f"--ray {address}: cannot start or reach the cluster: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray


def run_ray(jobs: list[Job], opts: MigrateOptions, done: Callable[[Outcome], None], log: Callable[[str], None]) -> dict[str, Any]:
    """Fan the jobs out as Ray tasks; `done` receives each outcome as its task ends (in any order)."""
    ray = connect(opts.ray or "local", opts.workers)
    pair_task = ray.remote(pair_bases).options(num_cpus=1, num_gpus=1 if opts.device.startswith("cuda") else 0, max_retries=RETRIES)
    job_task = ray.remote(run_job)
    gpus = 1 if opts.device.startswith("cuda") else 0  # a job on the GPU holds one (refine trains there)
    pending: dict[Any, Job] = {}
    pair_refs: dict[str, Any] = {}
    for (source, target), group in by_pair(jobs).items():
        adapters = [j.adapter for j in group]
        ref = pair_task.remote(adapters, source, target, opts)
        pair_refs[f"{source} -> {target}"] = ref
        log(f"pair {source} -> {target}: bases task, then {len(group)} job tasks")
        for j in group:
            task = job_task.options(num_cpus=1, num_gpus=gpus, memory=job_memory(j, opts), max_retries=RETRIES, retry_exceptions=False)
            pending[task.remote(j, opts, ref)] = j
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready[0])
        try:
            done(ray.get(ready[0]))
        except ray.exceptions.RayError as e:  # the worker died more often than Ray retries, or Ray itself failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            done(outcome(job, "failed", 0.0, f"Ray: {first}", 1))
    shared: dict[str, Any] = {}
    for key, ref in pair_refs.items():
        try:
            shared[key] = ray.get(ref)
        except ray.exceptions.RayError as e:
            shared[key] = {"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}
    return shared
