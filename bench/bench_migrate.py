"""Migrating a library: 16 adapters over 2 (source, target) pairs of the quick bench shapes (the
`bench_transfer --pair small` models, both directions: Qwen2.5-0.5B-shaped <-> SmolLM2-135M-shaped),
8 adapters each, on this machine, in one run:

  separate         16 `lowmem-crosslora transfer` processes, one after another, --no-cache: every
                   run factors its pair's bases again (what 16 runs of a research script do)
  separate-cache   the same 16 processes sharing one fresh basis cache: the first run of each pair
                   factors, the others read
  migrate          `lowmem-crosslora migrate` on this machine (one batch per pair), fresh cache
  migrate-ray      `lowmem-crosslora migrate --ray local --workers 2`, fresh cache

For each: wall time, seconds spent factoring (the bases' work, summed over the runs' reports), bases
factored and read from the cache, and the ratios to `separate`. Every output is checked
byte-identical to the first case's (Ray's one math thread per task aside: see the JSON's `identical`).

    python -m bench.bench_migrate [--rank 64] [--adapters 8]   # table on stdout, JSON in bench/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import BENCH, repo_env
from bench.bench_transfer import PAIRS, ensure_data
from lowmem_crosslora.services.synthetic import write_adapter

CASES = ("separate", "separate-cache", "migrate", "migrate-ray")


def library(root: Path, n: int) -> tuple[list[dict[str, str]], dict[str, Path]]:
    """The two models of the quick pair and n adapters on each, as migrate jobs (both directions)."""
    src, tgt, _ = ensure_data(BENCH / "data", "small")
    models = {"qwen-shaped": src, "smol-shaped": tgt}
    specs = {"qwen-shaped": PAIRS["small"][0], "smol-shaped": PAIRS["small"][1]}
    jobs = []
    for a, b in (("qwen-shaped", "smol-shaped"), ("smol-shaped", "qwen-shaped")):
        for i in range(n):
            ad = root / "adapters" / f"{a}-{i}"
            if not (ad / "adapter_model.safetensors").exists():
                write_adapter(ad, specs[a], rank=16, alpha=32, seed=100 + i, base=str(models[a]))
            jobs.append({"adapter": str(ad), "source": str(models[a]), "target": str(models[b]), "out": f"{a}-to-{b}-{i}"})
    return jobs, models


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowmem_crosslora", *args]


def run_case(case: str, jobs: list[dict[str, str]], work: Path, rank: int) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cache = work / "cache"
    env = repo_env()
    t0 = time.perf_counter()
    if case.startswith("separate"):
        for j in jobs:
            args = ["transfer", "--adapter", j["adapter"], "--source", j["source"], "--target", j["target"], "--out", str(work / j["out"])]
            args += ["--rank", str(rank), "--device", "cpu", "-q"]
            args += ["--no-cache"] if case == "separate" else ["--cache-dir", str(cache)]
            subprocess.run(cli(*args), check=True, env=env)
    else:
        manifest = work / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({**j, "out": str(work / j["out"])}) + "\n" for j in jobs))
        args = ["migrate", "--manifest", str(manifest), "--rank", str(rank), "--device", "cpu", "--cache-dir", str(cache), "-q"]
        args += ["--summary", str(work / "summary.json")]
        args += ["--ray", "local", "--workers", "2"] if case == "migrate-ray" else []
        subprocess.run(cli(*args), check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    svd = hashing = 0.0
    stored = hits = 0
    factored_in_jobs = 0
    # A batch's reports each carry the whole batch's phase times and cache counts: count one per pair.
    counted = [j for k, j in enumerate(jobs) if case != "migrate" or all((i["source"], i["target"]) != (j["source"], j["target"]) for i in jobs[:k])]
    for j in counted:
        s = json.loads((work / j["out"] / "crosslora_report.json").read_text())["summary"]
        svd += s["phase_seconds"].get("svd", 0.0)
        hashing += s["phase_seconds"].get("hash", 0.0)
        c = s.get("cache") or {}
        stored += c.get("stored", 0)
        hits += c.get("hits", 0)
        factored_in_jobs += c.get("stored", 0) if c else 2 * len(json.loads((work / j["out"] / "crosslora_report.json").read_text())["units"])
    row: dict[str, Any] = {"wall_s": round(wall, 2), "svd_s_in_jobs": round(svd, 2), "hash_s_in_jobs": round(hashing, 2), "bases_read_from_cache": hits}
    row["bases_factored_in_jobs"] = factored_in_jobs
    if case.startswith("migrate"):
        summary = json.loads((work / "summary.json").read_text())
        pairs = [p for p in summary["pairs"].values() if isinstance(p, dict)]
        row["pair_tasks"] = pairs
        row["bases_factored_by_pairs"] = sum(p.get("cache", {}).get("stored", 0) for p in pairs if p.get("kind") == "pair-bases")
        row["svd_s_in_pairs"] = round(sum(p.get("phase_seconds", {}).get("svd", 0.0) for p in pairs if p.get("kind") == "pair-bases"), 2)
        row["failed"] = summary["failed"]
    return row


def digests(jobs: list[dict[str, str]], work: Path) -> dict[str, str]:
    import hashlib

    return {j["out"]: hashlib.sha256((work / j["out"] / "adapter_model.safetensors").read_bytes()).hexdigest()[:16] for j in jobs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64, help="SVD rank of every transfer (64 keeps the 16 cold runs to minutes on 2 cores)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters per pair")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=str(BENCH / "results" / "migrate-small-cpu.json"))
    args = ap.parse_args()
    root = BENCH / "data" / "migrate"
    jobs, _models = library(root, args.adapters)
    rows: dict[str, Any] = {}
    sums: dict[str, dict[str, str]] = {}
    for case in args.cases.split(","):
        print(f"running {case} ...", file=sys.stderr, flush=True)
        rows[case] = run_case(case, jobs, root / "runs" / case, args.rank)
        sums[case] = digests(jobs, root / "runs" / case)
    if "migrate-ray" in rows:
        # Ray runs a one-CPU task with one math thread: its bytes are checked against lone transfers
        # made with one thread (the first job of each pair), float sums depending on the thread count.
        ones = root / "runs" / "lone-1-thread"
        if ones.exists():
            shutil.rmtree(ones)
        firsts = [j for k, j in enumerate(jobs) if all(i["source"] != j["source"] for i in jobs[:k])]
        for j in firsts:
            cmd = ["transfer", "--adapter", j["adapter"], "--source", j["source"], "--target", j["target"], "--out", str(ones / j["out"])]
            subprocess.run(cli(*cmd, "--rank", str(args.rank), "--device", "cpu", "-q", "--no-cache"), check=True, env=repo_env(threads=1))
        lone = digests(firsts, ones)
        rows["migrate-ray"]["identical_to_one_thread_lone_runs"] = all(sums["migrate-ray"][o] == h for o, h in lone.items())
    first = next(iter(sums))
    base = rows.get("separate")
    for case, row in rows.items():
        row["identical_to_" + first] = sums[case] == sums[first]
        if base:
            row["wall_vs_separate"] = round(row["wall_s"] / base["wall_s"], 3)
    result = {
        "pair": "small (both directions)",
        "adapters": len(jobs),
        "rank": args.rank,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "cases": rows,
    }
    heads = ("wall s", "x separate", "svd s (jobs)", "svd s (pairs)", "bases factored", "bases read", "same bytes")
    print(f"{'case':<16} " + " ".join(f"{h:>{max(8, len(h))}}" for h in heads))
    for case, r in rows.items():
        factored = r["bases_factored_in_jobs"] + r.get("bases_factored_by_pairs", 0)
        print(
            f"{case:<16} {r['wall_s']:>8.1f} {r.get('wall_vs_separate', float('nan')):>10.2f} {r['svd_s_in_jobs']:>12.1f} "
            f"{r.get('svd_s_in_pairs', 0.0):>13.1f} {factored:>14} {r['bases_read_from_cache']:>10} {str(r['identical_to_' + first]):>10}"
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
