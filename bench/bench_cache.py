"""Benchmark: the basis cache and batch transfers (issue 5).

On the same synthetic pair as bench.bench_transfer (bf16, real config layouts, rank 320), each case a
fresh `lowmem-crosslora transfer` process, the page cache warmed the same way before each:

  cold        one adapter, a fresh empty basis cache (the run computes every basis and stores it)
  warm        the same transfer again into a new folder, with the cache the cold run filled
  warm-rehash warm, with the cache's weight-hash memo deleted first (every weight is hashed again)
  batch8      8 adapters (other seeds, ranks and targeted modules) in one run, fresh empty cache
  separate8   the same 8 adapters as 8 cold runs one after another, each with a fresh empty cache

Targets (issue 5): warm <= 5% of cold; batch8 <= 1.3x cold. Prints a table and writes
bench/results/cache-<pair>-<device>.json. Outputs of batch8 are checked byte-identical to
separate8's.

    python -m bench.bench_cache --pair small
    python -m bench.bench_cache --pair 3b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import BENCH
from bench.bench_transfer import PAIRS, ensure_data, measure, mib, warm
from lowmem_crosslora.services.synthetic import write_adapter

ALL = ["q", "k", "v", "o", "gate", "up", "down"]
# Eight adapters as a library of them looks: other ranks, alphas and targeted modules.
EIGHT = [
    (16, 32, ALL),
    (8, 16, ALL),
    (16, 16, ["q", "v"]),
    (32, 64, ALL),
    (4, 8, ["q", "k", "v", "o"]),
    (16, 32, ["gate", "up", "down"]),
    (8, 8, ["q", "k", "v", "o", "gate"]),
    (64, 128, ALL),
]


def ensure_adapters(base: Path, pair: str) -> list[Path]:
    spec = PAIRS[pair][0]
    root = base / "adapters8"
    stamp = root / ".complete"
    if not stamp.exists():
        shutil.rmtree(root, ignore_errors=True)
        for i, (rank, alpha, modules) in enumerate(EIGHT):
            write_adapter(root / f"lora{i}", spec, rank=rank, alpha=alpha, seed=100 + i, base=str(base / "source"), modules=modules)
        stamp.write_text("ok\n")
    return [root / f"lora{i}" for i in range(len(EIGHT))]


def transfer_cmd(src: Path, tgt: Path, adapters: list[Path], out: Path, cache: Path, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "lowmem_crosslora", "transfer", "--source", str(src), "--target", str(tgt), "--out", str(out)]
    for a in adapters:
        cmd += ["--adapter", str(a)]
    return cmd + ["--rank", "320", "--device", device, "--quiet", "--no-resume", "--cache-dir", str(cache)]


def fresh(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            shutil.rmtree(p)


def run_case(cmd: list[str], report: Path) -> dict:
    r = measure(cmd)
    r.pop("stdout", None)
    rep = json.loads(report.read_text())
    s = rep["summary"]
    r.update(internal_s=s["seconds"], phase_seconds=s.get("phase_seconds"), cache=s.get("cache"), peak_working_bytes=s["peak_working_bytes"])
    return r


@dataclass
class Setup:
    """The inputs every case runs on: the pair's models, its adapter, the eight others, and the work folders."""

    src: Path
    tgt: Path
    ad: Path
    eight: list[Path]
    work: Path
    cache: Path
    device: str


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=BENCH / "data")
    p.add_argument("--cases", default="cold,warm,warm-rehash,batch8,separate8")
    p.add_argument("--results", type=Path, default=BENCH / "results")
    return p.parse_args()


def setup(args: argparse.Namespace) -> Setup:
    src, tgt, ad = ensure_data(args.data, args.pair, args.device)
    eight = ensure_adapters(args.data / args.pair, args.pair)
    work = args.data / args.pair / "runs" / "cache-bench"
    work.mkdir(parents=True, exist_ok=True)
    return Setup(src, tgt, ad, eight, work, work / "cache", args.device)


def run_named_case(s: Setup, case: str) -> dict:
    """One case of the table (the page cache already warmed)."""
    work, cache = s.work, s.cache
    if case == "cold":
        fresh(cache, work / "cold")
        return run_case(transfer_cmd(s.src, s.tgt, [s.ad], work / "cold", cache, s.device), work / "cold" / "crosslora_report.json")
    if case in ("warm", "warm-rehash"):
        if not (cache.exists() and any(cache.glob("*.safetensors"))):
            raise SystemExit(f"{case} needs the cold case first (its cache)")
        if case == "warm-rehash":
            shutil.rmtree(cache / "hashes", ignore_errors=True)
        fresh(work / case)
        return run_case(transfer_cmd(s.src, s.tgt, [s.ad], work / case, cache, s.device), work / case / "crosslora_report.json")
    if case == "batch8":
        c = work / "cache-batch8"
        fresh(c, work / "batch8")
        r = run_case(transfer_cmd(s.src, s.tgt, s.eight, work / "batch8", c, s.device), work / "batch8" / s.eight[-1].name / "crosslora_report.json")
        fresh(c)
        return r
    if case == "separate8":
        return run_separate8(s)
    raise SystemExit(f"unknown case {case}")


def run_separate8(s: Setup) -> dict:
    """The eight adapters as eight cold runs, one after another, each with a fresh empty cache."""
    work = s.work
    total = {"wall_s": 0.0, "peak_private_bytes": 0, "peak_file_bytes": 0, "runs": []}
    for a in s.eight:
        c = work / "cache-separate"
        fresh(c, work / "separate8" / a.name)
        warm([s.src, s.tgt, a])
        r = run_case(transfer_cmd(s.src, s.tgt, [a], work / "separate8" / a.name, c, s.device), work / "separate8" / a.name / "crosslora_report.json")
        total["wall_s"] += r["wall_s"]
        total["peak_private_bytes"] = max(total["peak_private_bytes"], r["peak_private_bytes"])
        total["peak_file_bytes"] = max(total["peak_file_bytes"], r["peak_file_bytes"])
        total["runs"].append({"adapter": a.name, "wall_s": r["wall_s"]})
        print(f"  separate {a.name}: {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    fresh(work / "cache-separate")
    return total


def run_cases(s: Setup, cases: list[str]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for case in cases:
        warm([s.src, s.tgt, s.ad, *s.eight])
        rows[case] = run_named_case(s, case)
        r = rows[case]
        print(f"{case:>12}: {r['wall_s']:7.1f} s wall, private peak {mib(r['peak_private_bytes'])}", file=sys.stderr, flush=True)
    return rows


def compare_outputs(s: Setup, rows: dict[str, dict]) -> tuple[bool | None, bool | None]:
    """Whether batch8's outputs are byte-identical to separate8's, and warm's to cold's (None: not both run)."""
    work = s.work
    same = None
    if "batch8" in rows and "separate8" in rows:
        same = all(
            (work / "batch8" / a.name / f).read_bytes() == (work / "separate8" / a.name / f).read_bytes()
            for a in s.eight
            for f in ("adapter_model.safetensors", "adapter_config.json")
        )
    warm_same = None
    if "cold" in rows and "warm" in rows:  # a hit must give the bytes computing gives
        warm_same = all((work / "warm" / f).read_bytes() == (work / "cold" / f).read_bytes() for f in ("adapter_model.safetensors", "adapter_config.json"))
    return same, warm_same


def wall_ratios(rows: dict[str, dict]) -> dict[str, float]:
    ratios = {}
    if "cold" in rows:
        cold = rows["cold"]["wall_s"]
        for k in ("warm", "warm-rehash", "batch8", "separate8"):
            if k in rows:
                ratios[f"{k}_over_cold"] = rows[k]["wall_s"] / cold
    if "batch8" in rows and "separate8" in rows:
        ratios["separate8_over_batch8"] = rows["separate8"]["wall_s"] / rows["batch8"]["wall_s"]
    return ratios


def print_table(args: argparse.Namespace, rows: dict[str, dict], ratios: dict[str, float], same: bool | None, warm_same: bool | None, path: Path) -> None:
    print(f"\n{args.pair} pair on {args.device} ({os.cpu_count()} cores), rank 320, basis cache and batches")
    print("| case | wall s | / cold | peak private | cache hits / stored |")
    print("|---|---:|---:|---:|---:|")
    for case, r in rows.items():
        c = r.get("cache") or {}
        hs = f"{c.get('hits', '-')} / {c.get('stored', '-')}" if c else "-"
        rel = f"{ratios.get(f'{case}_over_cold', 1.0):.3f}" if "cold" in rows else "-"
        print(f"| {case} | {r['wall_s']:.1f} | {rel} | {mib(r['peak_private_bytes'])} | {hs} |")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if warm_same is not None:
        print(f"warm output byte-identical to cold: {warm_same}")
    if same is not None:
        print(f"batch8 outputs byte-identical to separate8: {same}")
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    cases = args.cases.split(",")
    s = setup(args)
    t_all = time.perf_counter()
    rows = run_cases(s, cases)
    same, warm_same = compare_outputs(s, rows)
    ratios = wall_ratios(rows)
    result = {
        "pair": args.pair,
        "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "cases": rows,
        "ratios": ratios,
        "batch8_outputs_identical_to_separate8": same,
        "warm_output_identical_to_cold": warm_same,
        "bench_seconds": round(time.perf_counter() - t_all, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"cache-{args.pair}-{args.device.replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(args, rows, ratios, same, warm_same, path)


if __name__ == "__main__":
    main()
