"""Benchmark: the real pair as GGUF in versus safetensors in (issue 7).

SmolLM2-135M-Instruct (llama, GGUF Q4_1/Q8_0) -> Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF
Q5_0/Q6_K/Q4_K/Q8_0), with a rank-16 LoRA on all 7 modules built with peft on SmolLM2 (loaded
through transformers' GGUF loader). The safetensors inputs are the same models saved by
transformers' save_pretrained (dequantized, float32: the very values the GGUF reader gives). Each case runs `lowmem-crosslora transfer`
in a fresh process at rank 320 with a cold (empty) basis cache and the page cache warmed the same
way, sampling private (RssAnon) and mapped-file (RssFile) memory every 10 ms:

  gguf          --source smol.gguf --target qwen.gguf --out-format both
  safetensors   --source smol-st/  --target qwen-st/  (PEFT output)
  gguf-lowmem   as gguf, under --max-memory 40MiB
  st-lowmem     as safetensors, under --max-memory 40MiB
  st-seed1      as safetensors with --seed 1 (a control for the comparison below)

It also reports how close the outputs are: the relative Frobenius difference of B @ A per module,
GGUF in versus safetensors in, split by SVD method. Where both SVDs are exact the inputs' equal
values give equal results; the randomized SVD is seeded from the model's identity (config and
tensor table), which differs between a GGUF and a safetensors copy, so there the difference is
that of two seeds, shown by the st-seed1 control against safetensors.

    python -m bench.fetch_gguf   # once: the two GGUF files into bench/data/real
    python -m bench.bench_gguf   # prepares the adapter and the safetensors copies once, then runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from bench import BENCH, repo_env
from bench.bench_transfer import baseline_private, measure, mib, warm
from bench.fetch_gguf import QWEN, SMOL

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOWMEM = 40 * 2**20


def prepare(real: Path, work: Path) -> dict[str, Path]:
    """The peft adapter on SmolLM2 and safetensors copies of both GGUFs (made once)."""
    from transformers import AutoModelForCausalLM

    paths = {"smol.gguf": real / SMOL, "qwen.gguf": real / QWEN, "smol-st": work / "smol-st", "qwen-st": work / "qwen-st", "adapter": work / "smol-lora"}
    for p in (paths["smol.gguf"], paths["qwen.gguf"]):
        if not p.exists():
            raise SystemExit(f"{p} is missing: run python -m bench.fetch_gguf first")
    stamp = work / ".complete"
    if stamp.exists():
        return paths
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    from peft import LoraConfig, get_peft_model

    for key, st in (("smol.gguf", "smol-st"), ("qwen.gguf", "qwen-st")):
        g = paths[key]
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
        if key == "smol.gguf":
            torch.manual_seed(0)
            cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
            pm = get_peft_model(model, cfg)
            pm.save_pretrained(paths["adapter"])
            model = pm.unload()
        # transformers refuses to save a model it loaded from GGUF (its GGUF "quantizer"); the weights
        # are plain dequantized tensors by then, so drop that marker and save them as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(paths[st])
        del model
    os.sync()
    stamp.write_text("ok\n")
    return paths


def run_case(paths: dict[str, Path], source: str, target: str, out: Path, extra: list[str], threads: int | None = None) -> dict:
    for p in (out, out.parent / f"{out.name}-cache"):
        if p.exists():
            shutil.rmtree(p)
    cmd = [sys.executable, "-m", "lowmem_crosslora", "transfer", "--adapter", str(paths["adapter"]), "--source", str(paths[source])]
    cmd += ["--target", str(paths[target]), "--out", str(out), "--rank", "320", "--device", "cpu", "--quiet", "--no-resume"]
    cmd += ["--cache-dir", str(out.parent / f"{out.name}-cache"), *extra]
    r = measure(cmd, env=repo_env(threads))
    s = json.loads((out / "crosslora_report.json").read_text())["summary"]
    r.pop("stdout", None)
    r.update(internal_s=s["seconds"], peak_working_bytes=s["peak_working_bytes"], budget_bytes=s["host_budget_bytes"])
    r.update(phase_seconds=s.get("phase_seconds"), energy_mean=s["energy_retained"]["mean"])
    return r


def agreement(a: Path, b: Path) -> dict[str, dict[str, float]]:
    """Relative Frobenius difference of the delta B @ A per module between two PEFT outputs, by
    whether both of the module's SVDs were exact or one was randomized."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    units = json.loads((a / "crosslora_report.json").read_text())["units"]
    exact = {u["target_module"] for u in units if set(u["method"].values()) == {"exact"}}
    groups: dict[str, list[float]] = {"exact": [], "randomized": []}
    for k in ta:
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            da, db = ta[kb].double() @ ta[k].double(), tb[kb].double() @ tb[k].double()
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            groups["exact" if module in exact else "randomized"].append(float((da - db).norm() / da.norm()))
    out = {}
    for g, rel in groups.items():
        if rel:
            rel.sort()
            out[g] = {"modules": len(rel), "median": rel[len(rel) // 2], "max": rel[-1]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--cases", default="gguf,safetensors,gguf-lowmem,st-lowmem,st-seed1")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each run (1 gives steadier figures on a shared machine)")
    args = ap.parse_args()
    work = args.real / "prepared"
    paths = prepare(args.real, work)
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    cases = {
        "gguf": ("smol.gguf", "qwen.gguf", ["--out-format", "both"]),
        "safetensors": ("smol-st", "qwen-st", []),
        "gguf-lowmem": ("smol.gguf", "qwen.gguf", ["--max-memory", str(LOWMEM)]),
        "st-lowmem": ("smol-st", "qwen-st", ["--max-memory", str(LOWMEM)]),
        "st-seed1": ("smol-st", "qwen-st", ["--seed", "1"]),
    }
    base = baseline_private()
    rows: dict[str, dict] = {}
    for case in args.cases.split(","):
        src, tgt, extra = cases[case]
        warm([paths[src], paths[tgt], paths["adapter"]])
        rows[case] = run_case(paths, src, tgt, runs / case, extra, args.threads)
        r = rows[case]
        print(f"{case:>12}: {r['wall_s']:6.1f} s wall, private peak {mib(r['peak_private_bytes'])}, mapped files {mib(r['peak_file_bytes'])}", file=sys.stderr)
    result = {
        "pair": "SmolLM2-135M-Instruct (GGUF) -> Qwen2.5-Coder-0.5B-Instruct (GGUF)",
        "rank": 320,
        "lora_rank": 16,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_average": os.getloadavg(), "platform": platform.platform()},
        "torch": torch.__version__,
        "baseline_private_bytes": base,
        "cases": rows,
    }
    if "gguf" in rows and "safetensors" in rows:
        result["agreement_gguf_vs_safetensors"] = agreement(runs / "gguf", runs / "safetensors")
    if "st-seed1" in rows and "safetensors" in rows:
        result["agreement_seed0_vs_seed1_safetensors"] = agreement(runs / "safetensors", runs / "st-seed1")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "gguf-real-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    threads = f", {args.threads} thread(s)" if args.threads else ""
    print(f"\nSmolLM2-135M -> Qwen2.5-Coder-0.5B, rank 320, CPU ({os.cpu_count()} cores{threads}); Python+torch baseline {mib(base)} private")
    print("| case | wall s | peak private | working (budget) | mapped files | read s | svd s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, r in rows.items():
        ph = r.get("phase_seconds") or {}
        working = f"{mib(r['peak_working_bytes'])} ({mib(r['budget_bytes'])})"
        print(
            f"| {case} | {r['wall_s']:.1f} | {mib(r['peak_private_bytes'])} | {working} | {mib(r['peak_file_bytes'])} "
            f"| {ph.get('read', 0):.1f} | {ph.get('svd', 0):.1f} |"
        )
    for key, label in (("agreement_gguf_vs_safetensors", "GGUF in vs safetensors in"), ("agreement_seed0_vs_seed1_safetensors", "seed 0 vs seed 1")):
        for g, a in result.get(key, {}).items():
            print(f"{label}, {g} SVDs: relative difference of B@A median {a['median']:.2e}, max {a['max']:.2e} over {a['modules']} modules")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
