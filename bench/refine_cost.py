"""What one `refine` costs, alone, on both compute paths (issue 16: <= 5 minutes and <= 2 GB per 0.5B
target on a 2-core machine, on every CPU).

    python -m bench.refine_cost [--source smollm2-135m] [--target qwen2.5-coder-0.5b] [--adapter DIR] [--compute auto,float32]
                                [--patience 24] [--set chat=true] [--against REV]

Each run is `run_refine` at the shipped settings and `--max-memory 2GB` in a process of its own
(bench_refine's `--one`), timed by /usr/bin/time (wall seconds, maximum RSS); the report gives the
phases (source sampling and scoring, training) and the peak private memory that --max-memory bounds.
"float32" forces the path of a CPU without bfloat16 instructions (bfloat16 weights computing in
float32), so one machine measures both; "auto" is what refine picks here. Run it on a quiet machine:
it measures seconds. `--patience 24` makes every run train all its steps: the worst case, where the
held-out recovery still rises at the last step. `--against REV` runs each case first with the code of
git revision REV (a detached worktree under the work folder), then with this checkout's, so the two are
timed minutes apart on the same machine: the ratio is what to quote, since a shared machine's speed
drifts more than that between sessions. `--memory-limit none,2GB` runs each refine without a limit,
then inside a memory cgroup of that size that charges the page cache too (bench/memory_limit.py): whether the whole run, mapped weights
included, fits a machine with that much memory, and how much slower it is there. Prints a table and
writes bench/results/refine-cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import BENCH, REPO, repo_env
from bench.bench_refine import parse_overrides
from bench.memory_limit import MemoryLimit, evict
from lowmem_crosslora.services.compute import bf16_speed
from lowmem_crosslora.sizes import parse_size


def worktree(args: argparse.Namespace, rev: str) -> tuple[Path, str]:
    """A detached worktree of `rev` under the work folder (made once, reused), and its short commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True, check=True).stdout.strip()
    tree = args.work / f"rev-{commit}"
    if not (tree / "lowmem_crosslora").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), commit], check=True, capture_output=True)
    return tree, commit


def one(args: argparse.Namespace, compute: str, rev: str | None = None, memory_limit: str | None = None) -> dict:
    extra = parse_overrides(args.set)
    code, commit = worktree(args, rev) if rev else (REPO, None)
    out = args.work / (
        f"cost-{args.source}-{args.target}-{compute}"
        + (f"-patience{args.patience}" if args.patience else "")
        + "".join(f"-{k}{v}" for k, v in extra.items())
        + (f"-max{args.max_memory}" if args.max_memory != "2GB" else "")
        + (f"-limit{memory_limit}" if memory_limit else "")
        + (f"-at-{commit}" if commit else "")
    )
    if out.exists():  # a finished folder would be kept, not timed again
        shutil.rmtree(out)
    spec = {
        "source": str(args.data / args.source),
        "adapter": str(args.adapter),
        "target": str(args.data / args.target),
        "out": str(out),
        "objective": "lm",
        "init": "fresh",
        "seed": 0,
        "max_memory": args.max_memory,
        "cache_dir": str(args.work / "basis-cache"),
        "compute": compute,
        **({"patience": args.patience} if args.patience else {}),
        **extra,
    }
    rss = args.work / f"time-{out.name}.txt"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "bench.bench_refine", "--one", json.dumps(spec)]
    env = repo_env(args.threads)
    if commit:  # the reference's own code first on the path, run from its folder
        env["PYTHONPATH"] = str(code) + os.pathsep + env["PYTHONPATH"]
    limit = MemoryLimit(parse_size(memory_limit), out.name) if memory_limit else None
    if limit:
        evict([args.data / args.source, args.data / args.target, args.adapter])
    try:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code, preexec_fn=limit.enter if limit else None)
        wall = time.perf_counter() - t0
        cgroup = {"memory_limit": memory_limit, "cgroup_peak_bytes": limit.peak(), "oom_kills": limit.oom_kills()} if limit else {}
    finally:
        if limit:
            limit.close()
    if p.returncode:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode
        why = "killed for want of memory in the cgroup" if cgroup.get("oom_kills") else last
        raise SystemExit(f"refine ({compute}) failed: {why}")
    report = json.loads((out / "crosslora_report.json").read_text())
    s = report["summary"]
    return {
        **cgroup,
        "compute": compute,
        "code": commit or "this checkout",
        "patience": args.patience,
        "options": extra,
        "compute_dtype": s["train_shape"]["compute_dtype"],
        "wall_seconds": round(wall, 1),
        "phase_seconds": s["phase_seconds"],
        "steps_run": len(report["refine"]["losses"]),
        "max_rss_bytes": int(rss.read_text().split()[-1]) * 1024,
        "peak_private_bytes": s["peak_host_bytes"],
        "holdout": written_step(report["refine"].get("holdout")),
    }


def written_step(holdout: dict | None) -> dict | None:
    """The step refine wrote and its held-out figures (recovery, its SE, z above the control), from
    the report's `refine.holdout`; None where the run held nothing out."""
    if not holdout:
        return None
    step = holdout.get("written_step")
    ev = next((e for e in holdout.get("evaluations", []) if e["step"] == step), None)
    return {
        "written_step": step,
        "carries_behaviour": holdout.get("carries_behaviour"),
        "recovery": ev and ev["recovery"],
        "recovery_se": ev and ev["recovery_se"],
        "z": ev and ev["z"],
        "history": {e["step"]: e["recovery"] for e in holdout.get("evaluations", []) if e["step"]},
    }


def holdout_text(h: dict | None) -> str:
    """A row's written step as "8 (117% +/- 26, z 4.9)", or "-"."""
    if not h or h.get("recovery") is None:
        return "-"
    z = f", z {h['z']:.1f}" if h.get("z") is not None else ""
    return f"{h['written_step']} ({100 * h['recovery']:.0f}% +/- {100 * h['recovery_se']:.0f}{z})"


def cgroup_text(row: dict) -> str:
    """The memory limit a row ran under, with the cgroup's peak (page cache included), or "none"."""
    if not row.get("memory_limit"):
        return "none"
    peak = row.get("cgroup_peak_bytes")
    return row["memory_limit"] + (f" ({peak / 1e9:.2f} GB)" if peak else "")


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--adapter", type=Path, default=None, help="[default: bench_refine's caps LoRA on the source, human texts]")
    ap.add_argument("--compute", default="auto,float32")
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--patience", type=int, default=None, help="refine's --patience [default: refine's]; 24 runs every step (the worst case)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a refine option for every run, e.g. chat=true (a benchmark candidate's)")
    ap.add_argument("--memory-limit", default=None, metavar="SIZE", help="memory cgroup sizes, page cache included (Linux, root), each timed; none: no limit")
    ap.add_argument("--against", default=None, metavar="REV", help="also time the code of this git revision, just before each run of ours")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "refine-cost.json")
    args = ap.parse_args()
    args.data = args.data.resolve()  # absolute: a reference revision runs from its own folder
    args.work = args.data / "refine-bench" / "cost"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.adapter is None:
        args.adapter = args.data / "refine-bench" / "human" / "caps" / f"caps-lora-{args.source}"
    args.adapter = args.adapter.resolve()
    if not (args.adapter / "adapter_config.json").exists():
        raise SystemExit(f"{args.adapter} is missing: run `python -m bench.bench_refine --cases smol-qwen:caps` first, or pass --adapter")
    rows = []
    limits = [None if x == "none" else x for x in (args.memory_limit or "none").split(",")]
    for c in args.compute.split(","):
        for lim in limits:
            if args.against:
                rows.append(one(args, c, args.against, lim))
            rows.append(one(args, c, None, lim))
        if args.against:  # ours over the reference's, timed minutes apart
            ref, ours = rows[-2], rows[-1]
            ours["ratio_to_reference"] = {"wall": round(ours["wall_seconds"] / ref["wall_seconds"], 3)}
            for k, v in ours["phase_seconds"].items():
                if ref["phase_seconds"].get(k):
                    ours["ratio_to_reference"][k] = round(v / ref["phase_seconds"][k], 3)
    print(
        "| code | compute | dtype | patience | memory limit (cgroup peak) | wall s | source s | train s | steps "
        "| step written (held-out recovery, z) | max RSS | peak private | / reference |"
    )
    print("|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        ph = r["phase_seconds"]
        opts = "".join(f" {k}={v}" for k, v in r["options"].items())
        ratio = r.get("ratio_to_reference", {}).get("wall")
        print(
            f"| {r['code']} | {r['compute']}{opts} | {r['compute_dtype']} | {r['patience'] or 'default'} | {cgroup_text(r)} | {r['wall_seconds']} "
            f"| {ph.get('source', 0):.0f} | {ph.get('train', 0):.0f} | {r['steps_run']} | {holdout_text(r.get('holdout'))} "
            f"| {r['max_rss_bytes'] / 1e9:.2f} GB | {r['peak_private_bytes'] / 1e9:.2f} GB | {ratio if ratio else ''} |"
        )
    machine = {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_average": os.getloadavg(), "bfloat16": bf16_speed("cpu").reason}
    out = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
