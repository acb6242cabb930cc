"""Byte identity of the tool's outputs across a change that must not change behaviour.

Builds fixed inputs, runs the real commands in fresh processes, and hashes (SHA-256) every output
file whose bytes the options fix (reports hold wall times, so they are left out, and so is the wall time inside refine_probes.json):

  demo     `lowmem-crosslora demo` (its built-in llama -> qwen2 pair and rank-8 LoRA)
  gguf     the demo's adapter transferred with --out-format both (PEFT folder + llama.cpp GGUF)
  batch    three adapters of the demo's source transferred in one batch run
  refine   `refine` on tiny transformers models with tokenizers (llama -> qwen2), a few steps on the CPU
  quick    the quick bench pair (`bench_transfer.py --pair small` shapes) at the default settings

    python -m bench.identity record            # write bench/results/identity.json (--skip keeps a case's record)
    python -m bench.identity check             # exit 1 when any hash differs from the recorded one
    python -m bench.identity check --skip quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import BENCH
from bench.bench_transfer import ensure_data

RESULTS = BENCH / "results" / "identity.json"
HASHED = ("adapter_model.safetensors", "adapter_config.json", "adapter_model.gguf", "refine_probes.json")
CASES = ("demo", "gguf", "batch", "refine", "quick")
# One thread: the tiny refine's float sums then do not depend on how many cores the machine has.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def cli(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "lowmem_crosslora", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")


def content(p: Path) -> bytes:
    """The bytes the options fix: refine_probes.json less its one wall time ("seconds")."""
    if p.name != "refine_probes.json":
        return p.read_bytes()
    doc = json.loads(p.read_text())
    doc.pop("seconds", None)
    return json.dumps(doc, sort_keys=True).encode()


def hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name in HASHED:
            out[str(p.relative_to(folder))] = hashlib.sha256(content(p)).hexdigest()
    if not out:
        raise SystemExit(f"{folder}: no output file to hash")
    return out


def demo_inputs(root: Path) -> Path:
    demo = root / "demo"
    if not demo.exists():
        cli("demo", "--keep", demo, "-q")
    return demo


def case_demo(root: Path) -> dict[str, str]:
    return hashes(demo_inputs(root) / "lora-on-qwen2")


def case_gguf(root: Path) -> dict[str, str]:
    d = demo_inputs(root)
    out = root / "gguf-out"
    cli("transfer", "--adapter", d / "lora-on-llama", "--source", d / "source-llama", "--target", d / "target-qwen2", "--out", out,
        "--rank", "48", "--device", "cpu", "--out-format", "both", "--force", "--no-cache", "-q")  # fmt: skip
    return hashes(out)


def case_batch(root: Path) -> dict[str, str]:
    from lowmem_crosslora.services.synthetic import DEMO_SOURCE, write_adapter

    d = demo_inputs(root)
    adapters = root / "batch-adapters"
    for seed, rank in ((2, 8), (3, 4), (4, 16)):
        write_adapter(adapters / f"lora-{seed}", DEMO_SOURCE, rank=rank, alpha=2 * rank, seed=seed, base=str(d / "source-llama"))
    out = root / "batch-out"
    cli("transfer", "--adapter", adapters, "--source", d / "source-llama", "--target", d / "target-qwen2", "--out", out,
        "--rank", "32", "--device", "cpu", "--cache-dir", root / "batch-cache", "-q")  # fmt: skip
    return hashes(out)


def _char_tokenizer(folder: Path, merges: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)] + ["\n", "\t"] + merges
    vocab += [chr(0xC0 + i) for i in range(128 - len(vocab))]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[(m[0], m[1]) for m in merges], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def case_refine(root: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = {"vocab_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    src, tgt, ad = root / "r-llama", root / "r-qwen2", root / "r-lora"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, tie_word_embeddings=False, initializer_range=0.2, **small)).save_pretrained(src)
    _char_tokenizer(src, [])
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=48, intermediate_size=96, tie_word_embeddings=False, **small)).save_pretrained(tgt)
    _char_tokenizer(tgt, ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd"])
    torch.manual_seed(10)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(src), cfg).save_pretrained(ad)
    prompts = root / "prompts.txt"
    prompts.write_text("The weather\nA story:\n")
    out = root / "refine-out"
    cli("refine", "--source", src, "--adapter", ad, "--target", tgt, "--out", out, "--steps", "3", "--batch", "2", "--samples", "4",
        "--contrast-samples", "2", "--max-new-tokens", "12", "--prompts", prompts, "--device", "cpu", "--cache-dir", root / "refine-cache", "-q")  # fmt: skip
    return hashes(out)


def case_quick(root: Path) -> dict[str, str]:
    src, tgt, ad = ensure_data(WORK / "data", "small")
    out = root / "quick-out"
    cli("transfer", "--adapter", ad, "--source", src, "--target", tgt, "--out", out, "--device", "cpu", "--no-cache", "-q")
    return hashes(out)


# A fixed folder: adapter_config.json names the target's path, so every run must use the same paths.
WORK = Path(tempfile.gettempdir()) / "lowmem-crosslora-identity"


def run(skip: list[str]) -> dict[str, dict[str, str]]:
    got = {}
    shutil.rmtree(WORK / "run", ignore_errors=True)
    root = WORK / "run"
    root.mkdir(parents=True)
    for name in CASES:
        if name in skip:
            continue
        got[name] = globals()[f"case_{name}"](root)
        print(f"{name:<8} " + "  ".join(f"{k}={v[:12]}" for k, v in got[name].items()), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("record", "check"))
    ap.add_argument("--skip", action="append", default=[], choices=CASES, help="leave this case out (repeatable)")
    args = ap.parse_args()
    got = run(args.skip)
    if args.action == "record":  # the cases run replace theirs; the cases skipped keep their record
        old = json.loads(RESULTS.read_text())["cases"] if RESULTS.exists() else {}
        RESULTS.write_text(json.dumps({"torch": torch.__version__, "cases": {**old, **got}}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RESULTS} ({', '.join(got)})")
        return
    want = json.loads(RESULTS.read_text())["cases"]
    bad = [f"{case}: {f}" for case, files in got.items() for f, h in files.items() if want.get(case, {}).get(f) != h]
    bad += [f"{case}: {f} missing" for case, files in got.items() for f in want.get(case, {}) if f not in files]
    if bad:
        print("DIFFERENT:\n  " + "\n  ".join(bad))
        raise SystemExit(1)
    print(f"identical: {', '.join(got)} ({sum(len(v) for v in got.values())} files)")


if __name__ == "__main__":
    main()
