"""One refine training step on the real 0.5B target in several training shapes (texts per pass, gradient
checkpointing) and both compute paths: what `choose_shape`'s rule and the upcast path's reused scratch
block (services/compute.py `widen`) are based on.

    python -m bench.bench_train_shape [--target qwen2.5-coder-0.5b] [--runs upcast:8c,upcast:4,...] [--steps 3] [--threads 1]

A run is a path and a shape. A shape is the texts per pass, with "c" for gradient checkpointing ("8c": 8 texts a pass,
checkpointed). Each step is refine's own `batch_loss` (the `lm` objective) on 8 texts of 60 target
tokens (10 of prompt), a fresh rank-16 LoRA on all seven projections, AdamW. Paths: "upcast" (bfloat16
weights computing in float32: the path of a CPU without bfloat16 instructions), "bf16" (bfloat16
compute), and "upcast-fresh": the upcast path as it was before the scratch block, every widening a
fresh `.float()` copy (the reference the scratch block is measured against, in the same run). Each
shape and path runs in a process of its own: the median step seconds (after one warm-up step) and the
peak private memory above the loaded model. Prints a table and writes bench/results/train-shape.json.

A run may name the allocator as a third field ("upcast:5:heap"). By default each run sets glibc's
allocator as every command does (`sysmem.tune_allocator`: a block of 256 KiB or more gets its own
mapping and goes back to the OS when freed, so the measured private memory tracks live tensors, at
the price of a page fault per 4 KiB each time a block is reused). "heap" then raises glibc's mapping
threshold to 32 MiB and its trim threshold to 64 MiB, so freed blocks are reused from the heap. Each
row also records the minor page faults and the system CPU seconds of the measured steps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import BENCH, repo_env

LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "task_type": "CAUSAL_LM"}
BATCH, TOKENS, PROMPT = 8, 60, 10


def run_one(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from lowmem_crosslora.services import compute
    from lowmem_crosslora.services.distill import TrainText, batch_loss, batch_norms
    from lowmem_crosslora.services.target_lora import attach_lora
    from lowmem_crosslora.services.train_shape import enable_checkpointing
    from lowmem_crosslora.sysmem import host_anon_bytes, tune_allocator

    if spec.get("allocator") == "heap":  # freed blocks stay in the heap for reuse (the variant measured)
        tune_allocator(32 << 20, 64 << 20)  # glibc's largest mapping threshold
    else:
        tune_allocator()  # as refine does
    path, micro, ckpt = spec["path"], spec["micro"], spec["ckpt"]
    if path == "upcast-fresh":
        compute.widen = lambda block: block.float()  # the code before the scratch block
        import lowmem_crosslora.services.head_logprob as hl

        hl.widen = compute.widen
    base = AutoModelForCausalLM.from_pretrained(spec["target"], dtype=torch.bfloat16)
    if path.startswith("upcast"):
        compute.upcast_model(base)
    if ckpt:
        enable_checkpointing(base)
    model = attach_lora(base, LORA, None, 0)
    model.train()
    g = torch.Generator().manual_seed(0)
    vocab = int(base.config.vocab_size)
    texts = [TrainText(torch.randint(0, vocab, (TOKENS,), generator=g).tolist(), PROMPT, [-1] * (TOKENS - PROMPT), [], "adapter", 200) for _ in range(BATCH)]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    norm = batch_norms("lm", texts, [])
    start = host_anon_bytes()
    peak, stop = [start], [False]

    def watch() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], host_anon_bytes())
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    seconds = []
    for i in range(spec["steps"] + 1):
        if i == 1:  # after the warm-up step
            usage = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        for k in range(0, BATCH, micro):
            loss, _ = batch_loss(model, "lm", texts[k : k + micro], [], norm, "cpu", 0.0)
            loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
    stop[0] = True
    end = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_seconds": [round(s, 2) for s in seconds[1:]],
        "peak_private_above_model_bytes": peak[0] - start,
        "minor_faults_per_step": (end.ru_minflt - usage.ru_minflt) // max(1, spec["steps"]),
        "system_seconds_per_step": round((end.ru_stime - usage.ru_stime) / max(1, spec["steps"]), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=BENCH / "data" / "real")
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--runs", default="upcast-fresh:8c,upcast-fresh:4,upcast:8c,upcast:8,upcast:5,upcast:4,upcast:2,bf16:8c,bf16:4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "train-shape.json")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    target = args.data / args.target
    if not (target / "config.json").exists():
        raise SystemExit(f"no model at {target}: run `python -m bench.fetch_models` first")
    rows = []
    for run in args.runs.split(","):
        path, shape, *alloc = run.split(":")
        allocator = alloc[0] if alloc else "tool"
        if allocator not in ("tool", "heap"):
            raise SystemExit(f"unknown allocator {allocator!r} in {run!r}: tool or heap")
        spec = {"target": str(target), "path": path, "micro": int(shape.rstrip("c")), "ckpt": shape.endswith("c"), "steps": args.steps, "allocator": allocator}
        cmd = [sys.executable, "-m", "bench.bench_train_shape", "--one", json.dumps(spec)]
        p = subprocess.run(cmd, env=repo_env(args.threads), capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{path} {shape} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        row = {"path": path, "shape": shape, "allocator": allocator, "passes": -(-BATCH // spec["micro"]), "checkpointing": spec["ckpt"], **r}
        row["median_step_seconds"] = statistics.median(r["step_seconds"])
        rows.append(row)
        mib = row["peak_private_above_model_bytes"] / 2**20
        print(
            f"{path:13s} {shape:>3s} {allocator:4s}  passes {row['passes']}  step {row['median_step_seconds']:6.2f} s  peak +{mib:6.0f} MiB"
            f"  faults/step {row['minor_faults_per_step']:>9,}  sys s/step {row['system_seconds_per_step']:5.2f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in vars(args).items() if k != "one"}
    args.out.write_text(json.dumps({"args": meta, "batch": BATCH, "tokens": TOKENS, "rows": rows}, indent=1) + "\n")
    print(
        "\n| path | shape | allocator | passes | step s (median) | peak private above the model | minor faults a step | system CPU s a step |"
        "\n|---|---|---|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        mib = r["peak_private_above_model_bytes"] / 2**20
        print(
            f"| {r['path']} | {r['shape']} | {r['allocator']} | {r['passes']} | {r['median_step_seconds']:.2f} | {mib:.0f} MiB"
            f" | {r['minor_faults_per_step']:,} | {r['system_seconds_per_step']:.2f} |"
        )


if __name__ == "__main__":
    main()
