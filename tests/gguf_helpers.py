"""Tiny GGUF files for the tests, written with gguf.GGUFWriter from a safetensors model folder the
way llama.cpp's convert_hf_to_gguf.py lays them out (blk.N.* names, q/k rows permuted for llama)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import CANONICAL_TO_NAME

from lowmem_crosslora.io.gguf_model import GGUF_MODULES, permute_rows

HF_MODULES = CANONICAL_TO_NAME  # canonical module -> the llama-style module path


def read_hf(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def write_gguf(model_dir: Path, dest: Path, quant: dict[str, str] | None = None, default: str = "F32") -> Path:
    """Convert a single-file safetensors model folder to GGUF. `quant` maps a canonical module (or
    'q@1' for one layer) to a GGML type name; others get `default`. Returns `dest`."""
    import gguf

    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    tensors = read_hf(model_dir)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(dest), arch)
    w.add_name(model_dir.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if cfg.get("head_dim") and cfg["head_dim"] != cfg["hidden_size"] // heads:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    # A tokenizer-sized string array, as real files have: the header parser must skip it.
    w.add_token_list([f"tok{i}" for i in range(cfg.get("vocab_size", 64))])

    def add(name: str, t: torch.Tensor, tname: str) -> None:
        arr = t.float().numpy()
        if tname == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif tname == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[tname]
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", tensors["model.embed_tokens.weight"], "F32")
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}"
        add(f"blk.{layer}.attn_norm.weight", tensors[f"{pre}.input_layernorm.weight"], "F32")
        add(f"blk.{layer}.ffn_norm.weight", tensors[f"{pre}.post_attention_layernorm.weight"], "F32")
        for mod, gname in GGUF_MODULES.items():
            t = tensors[f"{pre}.{HF_MODULES[mod]}.weight"]
            if arch == "llama" and mod in ("q", "k"):
                t = permute_rows(t, heads if mod == "q" else kv)
            tname = (quant or {}).get(f"{mod}@{layer}") or (quant or {}).get(mod) or default
            add(f"blk.{layer}.{gname}.weight", t, tname)
    add("output_norm.weight", tensors["model.norm.weight"], "F32")
    add("output.weight", tensors["lm_head.weight"], "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def dequantized_folder(model_dir: Path, gguf_file: Path, dest: Path) -> Path:
    """A copy of a safetensors model folder whose q..down weights are the GGUF's dequantized values
    (in Hugging Face order), so that a transfer from either must give the same result."""
    from safetensors.torch import save_file

    from lowmem_crosslora.io.gguf_model import GGUFCheckpoint

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = read_hf(model_dir)
    ck = GGUFCheckpoint(gguf_file)
    for layer in range(ck.dims.num_layers):
        for mod in GGUF_MODULES:
            name = ck.weight_name(layer, mod)
            tensors[name] = ck.read(name).float().contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest
