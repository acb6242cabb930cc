"""`lowmem-crosslora migrate`: run a manifest's jobs here or on Ray, with a line per job as it ends
(also appended to --log), a final table and a JSON summary; exit 4 when some jobs failed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lowmem_crosslora.console import PATH
from lowmem_crosslora.errors import CrossLoraError
from lowmem_crosslora.migrate.cluster import run_ray
from lowmem_crosslora.migrate.jobs import Outcome
from lowmem_crosslora.migrate.local import by_pair, run_local
from lowmem_crosslora.migrate.manifest import read_manifest
from lowmem_crosslora.services.options import MigrateOptions, click_options


class JobsFailed(CrossLoraError):
    """Some jobs of a migration failed (each listed with its error); the others finished."""

    exit_code = 4


def migrate(manifest: str | Path, *, log: Callable[[str], None] | None = None, **options: Any) -> dict[str, Any]:
    """Run every job of `manifest` (MigrateOptions' fields as options); the summary, with one outcome
    per job in manifest order. A job's failure is in its outcome, never raised."""
    opts = MigrateOptions(**options)
    opts.check()
    say = log or (lambda msg: None)
    jobs = read_manifest(Path(manifest))
    t0 = time.perf_counter()
    outcomes: dict[int, Outcome] = {}
    total = len(jobs)

    def done(o: Outcome) -> None:
        outcomes[o["line"]] = o
        failed = sum(1 for x in outcomes.values() if x["status"] == "failed")
        what = o["status"] if o["status"] != "failed" else f"FAILED: {str(o['error']).splitlines()[0]}"
        head = f"[{len(outcomes)}/{total} finished, {failed} failed, {total - len(outcomes)} running or queued, {time.perf_counter() - t0:.0f} s]"
        say(f"{head} line {o['line']} {o['kind']} {o['out']}: {what}")

    where = f"Ray ({opts.ray})" if opts.ray else "this machine"
    say(f"migrating {total} jobs over {len(by_pair(jobs))} (source, target) pairs on {where}")
    shared = run_ray(jobs, opts, done, say) if opts.ray else run_local(jobs, opts, done, say)
    ordered = [outcomes[j.line] for j in jobs]
    counts = {s: sum(1 for o in ordered if o["status"] == s) for s in ("done", "kept", "failed")}
    return {
        "kind": "migrate",
        "manifest": str(manifest),
        "where": "ray" if opts.ray else "local",
        "ray": opts.ray,
        "jobs": ordered,
        **counts,
        "pairs": shared,
        "seconds": round(time.perf_counter() - t0, 3),
        "options": {k: v for k, v in opts.job_kwargs().items() if v is not None},
    }


def table(summary: dict[str, Any]) -> list[str]:
    """The final table: one row per job, then the counts."""
    rows = [
        (str(o["line"]), o["kind"], o["status"], f"{o['seconds']:.1f}", o["out"], (o["error"] or "").splitlines()[0] if o["error"] else "")
        for o in summary["jobs"]
    ]
    heads = ("line", "kind", "status", "s", "output", "error")
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads[:-1])]
    lines = ["  ".join(h.ljust(w[i]) if i < len(w) else h for i, h in enumerate(heads)).rstrip()]
    lines += ["  ".join(c.ljust(w[i]) if i < len(w) else c for i, c in enumerate(r)).rstrip() for r in rows]
    lines.append(
        f"{summary['done']} done, {summary['kept']} kept (already held), {summary['failed']} failed, in {summary['seconds']:.1f} s on {summary['where']}"
    )
    return lines


@click.command("migrate")
@click.option("--manifest", required=True, type=PATH, help="Jobs, one JSON object per line: adapter, source, target, out, and optionally refine (true/false).")
@click_options(MigrateOptions)
@click.option("--log", "log_path", type=PATH, default=None, help="Append a line per job as it ends to this file (as printed on stderr).")
@click.option("--summary", "summary_path", type=PATH, default=None, help="Write the JSON summary to this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary instead of the table.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines; the table (or JSON) and failures only.")
def migrate_command(manifest: Path, log_path: Path | None, summary_path: Path | None, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Move a library of adapters: every job of a manifest, here or on a Ray cluster; resumable."""
    handle = log_path.open("a", encoding="utf-8") if log_path is not None else None

    def say(msg: str) -> None:
        if handle is not None:
            handle.write(msg + "\n")
            handle.flush()
        if not quiet and not as_json:
            click.echo(msg, err=True)

    try:
        summary = migrate(manifest, log=say, **kw)
    finally:
        if handle is not None:
            handle.close()
    if summary_path is not None:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for line in table(summary):
            click.echo(line)
    if summary["failed"]:
        raise JobsFailed(
            f"{summary['failed']} of {len(summary['jobs'])} jobs failed (listed above); run the same command again to retry them, finished jobs are kept"
        )
