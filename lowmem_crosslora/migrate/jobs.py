"""One job of a migration, run in this process (locally, or inside a Ray worker): its outcome as a
plain record, never an exception for a job's own failure, so that one job never stops the others."""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

from lowmem_crosslora.commands.refine import run_refine
from lowmem_crosslora.commands.transfer import transfer as run_transfer
from lowmem_crosslora.errors import CrossLoraError, Interrupted
from lowmem_crosslora.migrate.manifest import Job
from lowmem_crosslora.services.options import MigrateOptions

Outcome = dict[str, Any]  # line, kind, out, status (done | kept | failed), seconds, error, exit_code, pid


def outcome(job: Job, status: str, seconds: float, error: str | None = None, exit_code: int = 0) -> Outcome:
    return {
        "line": job.line,
        "kind": job.kind,
        "adapter": job.adapter,
        "out": job.out,
        "status": status,
        "seconds": round(seconds, 3),
        "error": error,
        "exit_code": exit_code,
        "pid": os.getpid(),
    }


def run_job(job: Job, opts: MigrateOptions, *_after: Any) -> Outcome:
    """Transfer (or refine) one job's adapter into its output; a rerun keeps a finished output and an
    interrupted one resumes. `_after`: results this job waited for (on Ray, its pair's bases)."""
    t0 = time.perf_counter()
    said: list[str] = []
    try:
        if job.refine:
            run_refine(job.source, job.adapter, job.target, job.out, log=said.append, **opts.job_kwargs())
        else:
            run_transfer(job.adapter, job.source, job.target, job.out, log=said.append, **opts.job_kwargs())
    except Interrupted:
        raise
    except CrossLoraError as e:
        return outcome(job, "failed", time.perf_counter() - t0, str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - a bug in one job is that job's failure, with its traceback kept
        first = f"unexpected {type(e).__name__}: {e}"
        return outcome(job, "failed", time.perf_counter() - t0, first + "\n" + traceback.format_exc(limit=8), 1)
    kept = any(line.endswith("; kept") for line in said)
    return outcome(job, "kept" if kept else "done", time.perf_counter() - t0)
