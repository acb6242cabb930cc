"""A llama.cpp LoRA GGUF read as an adapter (`--adapter file.gguf`).

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and gguf_lora.py writes for
`--out-format gguf`: general.type "adapter", adapter.type "lora", adapter.lora.alpha, and tensors
blk.N.<attn_q|...|ffn_down>.weight.lora_a (PEFT's lora_A, rank x in) and .lora_b (lora_B,
out x rank) in F32, F16 or BF16. llama.cpp scales each module by alpha / its rank (by 1 when alpha
is 0): the adapter read here says the same in PEFT's terms (r, lora_alpha, rank_pattern,
alpha_pattern). For llama.cpp's "llama" architecture the converter permutes the rows of q and k;
those lora_b rows are put back in Hugging Face order once the source model's head counts are known
(`restore_rows`, called by the plan).
"""

from __future__ import annotations

import mmap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowmem_crosslora.architectures import LLAMA_MODULES
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.gguf_model import GGUF_MODULES, read_gguf_header

PEFT_PREFIX = "base_model.model."

HF_MODULE = LLAMA_MODULES  # llama.cpp converts llama-style layers: blk.N.attn_q <-> model.layers.N.self_attn.q_proj
_CANONICAL = {g: c for c, g in GGUF_MODULES.items()}
_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (np.int16, torch.bfloat16)}
PERMUTED_ARCHS = frozenset({"llama"})  # llama.cpp architectures whose q/k rows the converter permutes


def is_lora_gguf(meta: dict[str, Any]) -> bool:
    return meta.get("general.type") == "adapter" and meta.get("adapter.type") == "lora"


def read_gguf_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The LoRA GGUF at `path` in PEFT's terms: (adapter config, safetensors-style header, tensors
    held in memory (adapters are small), lora_B names whose rows are in GGUF q/k order -> "q"/"k")."""
    where = f"adapter {path}"
    meta, tensors = read_gguf_header(path, where)
    if not is_lora_gguf(meta):
        kind = meta.get("general.type") or "model"
        raise InputError(f"{where}: a GGUF {kind}, not a LoRA adapter (general.type 'adapter', adapter.type 'lora')")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"{where}: adapter.lora.alpha must be a finite number >= 0 (got {alpha!r})")
    arch = str(meta.get("general.architecture", ""))
    state: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    permuted: dict[str, str] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for t in tensors:
            name = _peft_name(t.gguf_name, where)
            if t.type_name not in _DTYPES:
                raise InputError(f"{where}: tensor {t.gguf_name} is {t.type_name}; LoRA factors must be F32, F16 or BF16")
            np_dtype, torch_dtype = _DTYPES[t.type_name]
            arr = np.frombuffer(mm, dtype=np_dtype, count=int(np.prod(t.shape)), offset=t.offset).reshape(t.shape).copy()
            tensor = torch.from_numpy(arr)
            state[name] = tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor
            header[name] = {"shape": list(t.shape), "dtype": t.type_name}
            if arch in PERMUTED_ARCHS and name.endswith(".lora_B.weight") and (".q_proj." in name or ".k_proj." in name):
                permuted[name] = "q" if ".q_proj." in name else "k"
    if not state:
        raise InputError(f"{where}: no LoRA tensors (blk.N.<module>.weight.lora_a / lora_b)")
    ranks = {n[len(PEFT_PREFIX) : -len(".lora_A.weight")]: int(h["shape"][0]) for n, h in header.items() if n.endswith(".lora_A.weight")}
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    # llama.cpp: scale alpha / rank per module, or 1 where alpha is 0 (PEFT: lora_alpha = rank).
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": float(alpha) if alpha else float(r),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {} if alpha else {m: float(k) for m, k in ranks.items() if k != r},
        "bias": "none",
        "use_rslora": False,
        "base_model_name_or_path": meta.get("general.name") or None,
        "llama_cpp_architecture": arch,
    }
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{where}: tensor {name} contains NaN or Inf")
    return config, header, state, permuted


def _peft_name(gguf_name: str, where: str) -> str:
    parts = gguf_name.split(".")
    if len(parts) != 5 or parts[0] != "blk" or not parts[1].isdigit() or parts[3] != "weight" or parts[4] not in ("lora_a", "lora_b"):
        raise InputError(f"{where}: tensor {gguf_name} is not a LoRA factor blk.N.<module>.weight.lora_a|lora_b")
    module = _CANONICAL.get(parts[2])
    if module is None:
        raise InputError(f"{where}: tensor {gguf_name}: module {parts[2]} is not one of {', '.join(sorted(_CANONICAL))}")
    which = "A" if parts[4] == "lora_a" else "B"
    return f"{PEFT_PREFIX}model.layers.{int(parts[1])}.{HF_MODULE[module]}.lora_{which}.weight"


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of gguf_model.permute_rows: GGUF q/k row order -> Hugging Face order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def restore_rows(
    path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], permuted: dict[str, str], heads: tuple[int, int], source_arch: str | None
) -> None:
    """Put a llama-architecture GGUF's q/k lora_B rows (`permuted`) back in Hugging Face order, in
    place, with the source's (num_heads, num_kv_heads); refuse a GGUF made for another architecture
    than the source's."""
    arch = config.get("llama_cpp_architecture")
    if arch and source_arch and arch != source_arch:
        raise InputError(f"adapter {path}: a LoRA GGUF for llama.cpp architecture {arch!r}, but the source model is {source_arch!r}")
    for name, which in permuted.items():
        n = heads[0] if which == "q" else heads[1]
        if n < 1 or state[name].shape[0] % (2 * n):
            raise InputError(f"adapter {path}: tensor {name} has {state[name].shape[0]} rows, not a multiple of 2 x {n} heads")
        state[name] = unpermute_rows(state[name], n)
