"""Synthetic checkpoints and adapters with real config.json layouts and random weights.

Used by `demo` and by bench/: writes a Hugging Face model folder shard by shard (never holding the
whole model), and a PEFT LoRA adapter for it, with no download and no transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lowmem_crosslora.architectures import FAMILIES, ModelDims, module_shape

_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 1024

    def dims(self) -> ModelDims:
        return ModelDims(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.head_dim)


# Shapes of the bench pair (issue 3) and the demo pair.
QWEN25_15B = ModelSpec("qwen2", 1536, 8960, 28, 12, 2, 128, vocab=151936)
LLAMA32_3B = ModelSpec("llama", 3072, 8192, 28, 24, 8, 128, vocab=128256)
DEMO_SOURCE = ModelSpec("llama", 128, 344, 4, 4, 2, 32, vocab=256)
DEMO_TARGET = ModelSpec("qwen2", 192, 512, 6, 6, 2, 32, vocab=256)


def config_for(spec: ModelSpec, dtype: str) -> dict:
    cfg = {
        "architectures": [_ARCH_CLASS[spec.model_type]],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "attention_bias": False,
    }
    if spec.model_type == "qwen2":
        cfg.pop("attention_bias")
    return cfg


def _weight(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, spectrum: str) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    if gen.device.type != "cpu":  # generated on an accelerator, for speed; brought back in the stored dtype
        m, n = shape
        return (torch.randn(m, n, generator=gen, device=gen.device) / math.sqrt(n)).to(dtype).cpu()
    m, n = shape
    if spectrum.startswith("gap:") and min(m, n) <= 2048:
        # K well-separated leading singular values (2.0 down to 1.0), then a tail 1000x smaller:
        # the rank-K subspaces are unique and every SVD method must find the same ones.
        k, K = min(m, n), int(spectrum.split(":")[1])
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
        s = torch.cat([torch.linspace(2.0, 1.0, min(K, k)), 1e-3 * torch.rand(max(k - K, 0), generator=gen)])
        return ((U * s) @ V.T).to(dtype)
    if spectrum == "decaying" and min(m, n) <= 1024:
        # A power-law spectrum with random singular vectors, like trained weights (small sizes only).
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
        s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.7
        return ((U * s) @ V.T).to(dtype)
    return (torch.randn(m, n, generator=gen) / math.sqrt(n)).to(dtype)


def _model_tensors(spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    fam = FAMILIES[spec.model_type]
    dims = spec.dims()
    yield "model.embed_tokens.weight", (spec.vocab, spec.hidden)
    for layer in range(spec.layers):
        pre = f"model.layers.{layer}"
        yield f"{pre}.input_layernorm.weight", (spec.hidden,)
        yield f"{pre}.post_attention_layernorm.weight", (spec.hidden,)
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            yield f"{pre}.{fam.modules[name]}.weight", module_shape(fam, dims, name)
        if spec.model_type == "qwen2":
            for name in ("q", "k", "v"):
                yield f"{pre}.{fam.modules[name]}.bias", (module_shape(fam, dims, name)[0],)
    yield "model.norm.weight", (spec.hidden,)
    yield "lm_head.weight", (spec.vocab, spec.hidden)


def write_model(
    path: Path, spec: ModelSpec, *, dtype: str = "bfloat16", seed: int = 0, shard_bytes: int = 1 << 30, spectrum: str = "gaussian", device: str = "cpu"
) -> Path:
    """Write config.json and safetensors shards (with an index when there is more than one)."""
    path.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    (path / "config.json").write_text(json.dumps(config_for(spec, dtype), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush(final: bool) -> None:
        nonlocal size
        if not shards[-1]:
            return
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        for t in shards[-1]:
            weight_map[t] = name
        files.append(name)
        shards[-1] = {}
        size = 0

    for name, shape in _model_tensors(spec):
        t = _weight(shape, gen, tdtype, spectrum)
        if size and size + t.numel() * t.element_size() > shard_bytes:
            flush(False)
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    flush(True)
    if len(files) == 1:
        (path / files[0]).rename(path / "model.safetensors")
    else:
        total = sum((path / f).stat().st_size for f in files)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_adapter(
    path: Path,
    spec: ModelSpec,
    *,
    rank: int = 16,
    alpha: float = 32,
    modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down"),
    dtype: str = "float32",
    seed: int = 1,
    base: str = "source-model",
) -> Path:
    """A PEFT LoRA adapter folder for a model of `spec`, with non-zero A and B."""
    path.mkdir(parents=True, exist_ok=True)
    fam = FAMILIES[spec.model_type]
    dims = spec.dims()
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.layers):
        for name in modules:
            m, n = module_shape(fam, dims, name)
            pre = f"base_model.model.model.layers.{layer}.{fam.modules[name]}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, n, generator=gen) / math.sqrt(n)).to(getattr(torch, dtype))
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(m, rank, generator=gen) * 0.02).to(getattr(torch, dtype))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": sorted(fam.modules[n].split(".")[-1] for n in modules),
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# The demo tokenizer's entries: 3 specials, printable ASCII, newline and tab, then Latin-1 and Greek
# letters until the model's vocabulary is full (one token per character, every id decodes).
_SPECIALS = ["<unk>", "<s>", "</s>"]


def tokenizer_vocab(size: int) -> list[str]:
    """`size` distinct single-character tokens after the three specials."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + [chr(c) for c in range(0xA1, 0x250)]
    vocab = _SPECIALS + [c for c in chars if c not in ("\xad",)]
    if size > len(vocab):
        raise ValueError(f"no character tokenizer of {size} entries")
    return vocab[:size]


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """A fast tokenizer (tokenizer.json, one token per character, exactly `vocab_size` entries) and its
    tokenizer_config.json, written as JSON: no download and no tokenizers library needed to write it,
    so that `demo --verify` / `--refine` run offline. transformers loads it as PreTrainedTokenizerFast."""
    vocab = tokenizer_vocab(vocab_size)
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    added = [{"id": i, "content": t, **flags} for i, t in enumerate(_SPECIALS)]
    model = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False}
    model.update({"byte_fallback": False, "ignore_merges": False, "vocab": {t: i for i, t in enumerate(vocab)}, "merges": []})
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None, "pre_tokenizer": None}
    doc.update({"post_processor": None, "decoder": {"type": "Fuse"}, "model": model})
    (path / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path
