"""Benchmark: lowmem-crosslora transfer against a naive research script and the floor.

Generates realistic-shape synthetic checkpoints (bf16, random weights, real config.json layouts)
and a rank-16 LoRA on all 7 modules, then measures in one run, each case in a fresh process with
the page cache warmed the same way before it:

  a. ours   `lowmem-crosslora transfer` at rank 320 (default settings)
  b. naive  both state dicts loaded whole, torch.svd_lowrank per module, dense dW (reference.py)
  c. floor  read each needed base tensor once + one torch.svd_lowrank per base matrix (reference.py)
  d. lowmem ours with --max-memory below the size of the largest float32 base matrix

Peak host memory is sampled from /proc/<pid>/status every 10 ms: private (RssAnon, what
--max-memory bounds, with the ~150 MB of Python + torch shown apart) and mapped file pages
(RssFile, reclaimable). Prints a table and writes bench/results/<pair>-<device>.json.

    python -m bench.bench_transfer --pair small            # quick: SmolLM2-135M-shaped <- Qwen2.5-0.5B-shaped
    python -m bench.bench_transfer --pair 3b               # Qwen2.5-1.5B-shaped -> Llama-3.2-3B-shaped
    python -m bench.bench_transfer --pair 3b --device cuda # adds --max-gpu-memory 8GB and 2GB runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench import BENCH, repo_env
from lowmem_crosslora.services.synthetic import LLAMA32_3B, QWEN25_15B, ModelSpec, write_adapter, write_model
from lowmem_crosslora.sysmem import host_resident

QWEN25_05B = ModelSpec("qwen2", 896, 4864, 24, 14, 2, 64, vocab=151936)
SMOLLM2_135M = ModelSpec("llama", 576, 1536, 30, 9, 3, 64, vocab=49152)
PAIRS = {"small": (QWEN25_05B, SMOLLM2_135M), "3b": (QWEN25_15B, LLAMA32_3B)}


def ensure_data(root: Path, pair: str, device: str = "cpu") -> tuple[Path, Path, Path]:
    src_spec, tgt_spec = PAIRS[pair]
    base = root / pair
    src, tgt, ad = base / "source", base / "target", base / "adapter"
    stamp = base / ".complete"
    if not stamp.exists():
        if base.exists():
            shutil.rmtree(base)
        t0 = time.perf_counter()
        gen = "cuda" if device.startswith("cuda") else "cpu"
        write_model(src, src_spec, dtype="bfloat16", seed=0, shard_bytes=2 << 30, device=gen)
        write_model(tgt, tgt_spec, dtype="bfloat16", seed=1, shard_bytes=2 << 30, device=gen)
        write_adapter(ad, src_spec, rank=16, alpha=32, seed=2, base=str(src))
        os.sync()  # let the writeback of the fresh files finish before anything is timed
        stamp.write_text("ok\n")
        print(f"generated {pair} pair in {time.perf_counter() - t0:.0f} s under {base}", file=sys.stderr)
    return src, tgt, ad


def warm(paths: list[Path]) -> None:
    """Read every file once so each case starts with the same (warm) page cache."""
    for p in paths:
        for f in sorted(p.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run cmd (in `env`, by default repo_env()), sampling its private and file-backed resident memory;
    return wall time, peaks, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or repo_env())
    peaks = {"anon": 0, "file": 0}

    def sample() -> None:
        while proc.poll() is None:
            a, f = host_resident(proc.pid)
            peaks["anon"] = max(peaks["anon"], a)
            peaks["file"] = max(peaks["file"], f)
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode == 3:
        raise RuntimeError(err.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_private_bytes": peaks["anon"], "peak_file_bytes": peaks["file"], "stdout": out}


def baseline_private() -> int:
    """Private memory of a bare `python -c 'import lowmem_crosslora'`: the Python + torch share."""
    r = measure([sys.executable, "-c", "import time, lowmem_crosslora, lowmem_crosslora.cli; time.sleep(0.5)"])
    return r["peak_private_bytes"]


def inputs(ad: Path, src: Path, tgt: Path) -> list[str]:
    return ["--adapter", str(ad), "--source", str(src), "--target", str(tgt)]


def ours(src: Path, tgt: Path, ad: Path, out: Path, device: str, extra: list[str]) -> dict:
    """A cold run: a fresh, empty basis cache (the run fills it, as a first run does)."""
    if out.exists():
        shutil.rmtree(out)
    cache = out.parent / f"{out.name}-cache"
    if cache.exists():
        shutil.rmtree(cache)
    extra = ["--cache-dir", str(cache), *extra]
    cmd = [sys.executable, "-m", "lowmem_crosslora", "transfer", *inputs(ad, src, tgt), "--out", str(out), "--rank", "320"]
    r = measure([*cmd, "--device", device, "--quiet", "--no-resume", *extra])
    report = json.loads((out / "crosslora_report.json").read_text())
    s = report["summary"]
    r.update(
        internal_s=s["seconds"],
        peak_working_bytes=s["peak_working_bytes"],
        budget_bytes=s["host_budget_bytes"],
        peak_gpu_bytes=s["peak_gpu_bytes"],
        phase_seconds=s.get("phase_seconds"),
        energy_mean=s["energy_retained"]["mean"],
        modes=sorted({u["mode"]["target"] for u in report["units"]} | {u["mode"]["source"] for u in report["units"]}),
    )
    return r


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def max_energy_diff(a: Path, b: Path) -> float:
    """The largest difference in a unit's energy_retained between two transfers of the same units."""
    ea, eb = ({u["uid"]: u["energy_retained"] for u in json.loads((d / "crosslora_report.json").read_text())["units"]} for d in (a, b))
    return max(abs(ea[k] - eb[k]) for k in ea if ea[k] is not None)


def reference(mode: str, src: Path, tgt: Path, ad: Path, device: str, out: Path) -> dict:
    r = measure([sys.executable, "-m", "bench.reference", mode, *inputs(ad, src, tgt), "--device", device, "--out", str(out)])
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def largest_f32_matrix(src: Path, tgt: Path) -> int:
    from lowmem_crosslora.io.safetensors_model import Checkpoint

    best = 0
    for p in (src, tgt):
        ck = Checkpoint(p)
        for layer in range(ck.dims.num_layers):
            for mod in ck.family.modules:
                m, n = ck.info(ck.weight_name(layer, mod)).shape
                best = max(best, 4 * m * n)
    return best


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", choices=sorted(PAIRS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=BENCH / "data")
    p.add_argument(
        "--cases",
        default="ours,floor,naive,lowmem",
        help="comma list of ours,floor,naive,lowmem,gpu8,gpu2,read (each weight read once onto the device),"
        "stack (ours with --stack 64), stack2 (the same at --max-gpu-memory 2GB)",
    )
    p.add_argument("--results", type=Path, default=BENCH / "results")
    args = p.parse_args()
    cases = args.cases.split(",")
    if args.device.startswith("cuda") and "gpu8" not in cases:
        cases += ["gpu8", "gpu2"]
    src, tgt, ad = ensure_data(args.data, args.pair, args.device)
    work = args.data / args.pair / "runs"
    work.mkdir(exist_ok=True)
    base = baseline_private()
    largest = largest_f32_matrix(src, tgt)
    rows: dict[str, dict] = {}
    for case in cases:
        warm([src, tgt, ad])
        if case == "ours":
            rows[case] = ours(src, tgt, ad, work / "ours", args.device, [])
        elif case == "lowmem":
            budget = int(0.9 * largest)
            try:
                rows[case] = ours(src, tgt, ad, work / "lowmem", "cpu", ["--max-memory", str(budget)])
            except RuntimeError as e:  # exit 3: at this rank the panels alone outgrow one matrix
                print(f" lowmem: {e}", file=sys.stderr)
                rows[case] = {"wall_s": 0.0, "peak_private_bytes": 0, "peak_file_bytes": 0, "refused": str(e)}
            rows[case]["max_memory_bytes"] = budget
        elif case in ("gpu8", "gpu2"):
            rows[case] = ours(src, tgt, ad, work / case, args.device, ["--max-gpu-memory", "8GB" if case == "gpu8" else "2GB"])
        elif case in ("stack", "stack2"):
            rows[case] = ours(src, tgt, ad, work / case, args.device, ["--stack", "64"] + (["--max-gpu-memory", "2GB"] if case == "stack2" else []))
            if (work / "ours").exists():  # against the unstacked output: bytes, and the energy each unit keeps
                rows[case]["max_abs_diff_vs_ours"] = max_abs_diff(work / "ours", work / case)
                rows[case]["max_energy_diff_vs_ours"] = max_energy_diff(work / "ours", work / case)
        elif case in ("floor", "naive", "read"):
            rows[case] = reference(case, src, tgt, ad, args.device if case != "lowmem" else "cpu", work / f"{case}.safetensors")
        rows[case].pop("stdout", None)
        r = rows[case]
        print(
            f"{case:>7}: {r['wall_s']:7.1f} s wall, private peak {mib(r['peak_private_bytes'])}, mapped files {mib(r['peak_file_bytes'])}"
            + (f", GPU {mib(r['peak_gpu_bytes'])}" if r.get("peak_gpu_bytes") else ""),
            file=sys.stderr,
            flush=True,
        )

    result = {
        "pair": args.pair,
        "device": args.device,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "baseline_private_bytes": base,
        "largest_f32_matrix_bytes": largest,
        "cases": rows,
        "ratios": {},
    }
    if "ours" in rows and "floor" in rows:
        result["ratios"]["ours_over_floor_time"] = rows["ours"]["wall_s"] / rows["floor"]["wall_s"]
    for case in ("ours", "stack"):
        if case in rows and "read" in rows:
            result["ratios"][f"{case}_over_read_time"] = rows[case]["internal_s"] / rows["read"]["seconds"]
    if "ours" in rows and "naive" in rows:
        result["ratios"]["naive_over_ours_private_memory"] = rows["naive"]["peak_private_bytes"] / rows["ours"]["peak_private_bytes"]
        result["ratios"]["ours_over_naive_time"] = rows["ours"]["wall_s"] / rows["naive"]["wall_s"]
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.pair}-{args.device.replace(':', '')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{args.pair} pair on {args.device} ({os.cpu_count()} cores), rank 320; Python+torch baseline {mib(base)} private; "
        f"largest float32 base matrix {mib(largest)}"
    )
    print("| case | wall s | peak private | working (budget) | mapped files | peak GPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, r in rows.items():
        working = f"{mib(r['peak_working_bytes'])} ({mib(r['budget_bytes'])})" if "peak_working_bytes" in r else "-"
        gpu = mib(r["peak_gpu_bytes"]) if r.get("peak_gpu_bytes") else "-"
        print(f"| {case} | {r['wall_s']:.1f} | {mib(r['peak_private_bytes'])} | {working} | {mib(r['peak_file_bytes'])} | {gpu} |")
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
