"""The transferred adapter as a llama.cpp LoRA GGUF (`--out-format gguf|both`).

Written when the output is finished, from the finished PEFT tensors in the hidden state folder (so
an interrupted run resumes exactly as a PEFT-only one does), one tensor at a time, in the layout
llama.cpp's convert_lora_to_gguf.py writes and llama_adapter_lora_init reads:

- metadata: general.architecture (the target's llama.cpp architecture), general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha (float32);
- tensors blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a with
  PEFT's lora_A array (rank x in; GGUF ne = [in, rank]) and .lora_b with lora_B (out x rank;
  ne = [rank, out]), in the adapter's dtype (F32, F16 or BF16);
- for llama-family targets (llama.cpp arch "llama": Llama and Mistral), the rows of lora_b of q and
  k permuted as llama.cpp's converter permutes those base weights (LlamaModel.permute).

llama.cpp scales every module by adapter.lora.alpha / rank. Where the PEFT adapter's scale differs
per module (alpha_pattern, rank_pattern with one alpha) or is alpha / sqrt(rank) (rsLoRA), the
difference is folded into lora_b, so that every module keeps the scale it had.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.gguf_model import GGUF_MODULES, permute_rows, require_gguf
from lowmem_crosslora.io.partial import ADAPTER_NAME, CONFIG_NAME
from lowmem_crosslora.io.runstate import replacing

GGUF_NAME = "adapter_model.gguf"
OUT_FORMATS = ("peft", "gguf", "both")
# Hugging Face model_type -> llama.cpp architecture name of a model converted by convert_hf_to_gguf.
LLAMA_CPP_ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}
PERMUTED = frozenset({"llama"})  # llama.cpp architectures whose q/k rows the converter permutes


@dataclass(frozen=True)
class LoraEntry:
    layer: int
    module: str  # canonical
    a_name: str  # PEFT tensor names in the finished adapter file
    b_name: str
    scale: float  # the PEFT scale of this module (alpha / rank, or alpha / sqrt(rank))
    rank: int


def check_out_format(out_format: str, family_name: str) -> None:
    """Refuse an unknown format, a missing gguf package, or a target llama.cpp has no name for, before any work."""
    if out_format not in OUT_FORMATS:
        raise InputError(f"unknown --out-format {out_format!r}; choose one of {', '.join(OUT_FORMATS)}")
    if out_format == "peft":
        return
    require_gguf()
    if family_name not in LLAMA_CPP_ARCH:
        raise InputError(f"--out-format {out_format}: no llama.cpp architecture is known for target family {family_name!r}")


def _numpy(t: torch.Tensor) -> tuple[Any, Any]:
    """(array, raw GGML type or None) for GGUFWriter: BF16 travels as its raw 16-bit words."""
    gguf = require_gguf()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view("uint16"), gguf.GGMLQuantizationType.BF16
    if t.dtype in (torch.float32, torch.float16):
        return t.contiguous().numpy(), None
    return t.float().contiguous().numpy(), None


def write_lora_gguf(
    dest: Path,
    tensors_file: Path,
    entries: list[LoraEntry],
    *,
    arch: str,
    alpha: float,
    num_heads: int,
    num_kv_heads: int,
    name: str | None = None,
) -> None:
    """Write a llama.cpp LoRA GGUF at `dest` (via a temporary file and a rename) from the PEFT
    tensors in the safetensors file `tensors_file`, one tensor in memory at a time."""
    gguf = require_gguf()

    alpha = float(alpha)
    plan: list[tuple[str, str, float, int | None]] = []  # (gguf name, peft name, factor on the rows, heads to permute)
    for e in sorted(entries, key=lambda e: (e.layer, list(GGUF_MODULES).index(e.module))):
        base = f"blk.{e.layer}.{GGUF_MODULES[e.module]}.weight"
        llama_scale = alpha / e.rank if alpha else 1.0
        factor = e.scale / llama_scale
        heads = None
        if arch in PERMUTED and e.module in ("q", "k"):
            heads = num_heads if e.module == "q" else num_kv_heads
        plan.append((base + ".lora_a", e.a_name, 1.0, None))
        plan.append((base + ".lora_b", e.b_name, factor, heads))

    with safe_open(str(tensors_file), framework="pt", device="cpu") as f, replacing(dest) as tmp:

        def load(peft_name: str, factor: float, heads: int | None) -> torch.Tensor:
            t = f.get_tensor(peft_name)
            if factor != 1.0:
                t = (t.float() * factor).to(t.dtype)
            if heads is not None:
                t = permute_rows(t, heads)
            return t

        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            if name:
                writer.add_name(name)
            # Header first (names, shapes, types), then each tensor's bytes in order.
            for gname, pname, _factor, _heads in plan:
                sl = f.get_slice(pname)
                shape = [int(d) for d in sl.get_shape()]
                dtype = sl.get_dtype()
                np_dtype, raw = {"F32": ("float32", None), "F16": ("float16", None), "BF16": ("uint16", gguf.GGMLQuantizationType.BF16)}.get(
                    dtype, ("float32", None)
                )
                nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
                writer.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _gname, pname, factor, heads in plan:
                t = load(pname, factor, heads)
                if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    t = t.float()
                arr, _raw = _numpy(t)
                writer.write_tensor_data(arr)
        finally:
            writer.close()


def entries_for(plan: Any, use_rslora: bool) -> list[LoraEntry]:
    """The LoRA GGUF's entries for a transfer plan (plan.Plan): one per unit."""
    out = []
    for u in plan.units:
        scale = u.alpha / math.sqrt(u.rank) if use_rslora else u.alpha / u.rank
        out.append(LoraEntry(u.target_layer, u.module, u.out_a, u.out_b, scale, u.rank))
    return out


def entries_for_file(tensors_file: Path, alpha: float | None = None) -> list[LoraEntry]:
    """Entries for every q..down module of a finished PEFT adapter file (uniform scale alpha / rank,
    or 1.0 relative scale when alpha is None): for rewriting an output's GGUF by hand."""

    hf_to_canonical = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    pat = re.compile(r"^base_model\.model\..*\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_A\.weight$")
    out = []
    with safe_open(str(tensors_file), framework="pt") as f:
        for name in f.keys():
            m = pat.match(name)
            if m and m.group(2) in hf_to_canonical:
                rank = int(f.get_slice(name).get_shape()[0])
                scale = alpha / rank if alpha is not None else 1.0
                out.append(LoraEntry(int(m.group(1)), hf_to_canonical[m.group(2)], name, name.replace("lora_A", "lora_B"), scale, rank))
    return out


def output_files(out_format: str) -> tuple[str, ...]:
    """The adapter files a finished output folder holds for this --out-format."""

    return {"peft": (ADAPTER_NAME,), "gguf": (GGUF_NAME,)}.get(out_format, (ADAPTER_NAME, GGUF_NAME))


def finish_hooks(out_format: str, plan: Any, adapter: Any, target: Any) -> tuple[Callable[[Path], None] | None, tuple[str, ...]]:
    """What PartialOutput.finish runs in the state folder before it is moved into place (write the
    GGUF), and which of its files it drops ("gguf": the PEFT files; "peft": a stale GGUF)."""
    if out_format == "peft":
        return None, (GGUF_NAME,)
    fam = target.family.name
    arch = LLAMA_CPP_ARCH[fam]
    entries = entries_for(plan, adapter.use_rslora)
    alpha = float(adapter.default_alpha)
    dims = target.dims
    name = Path(str(target.path)).name

    def write(folder: Path) -> None:

        heads = {"num_heads": dims.num_heads, "num_kv_heads": dims.num_kv_heads}
        write_lora_gguf(folder / GGUF_NAME, folder / ADAPTER_NAME, entries, arch=arch, alpha=alpha, name=name, **heads)

    return write, ((ADAPTER_NAME, CONFIG_NAME) if out_format == "gguf" else ())
