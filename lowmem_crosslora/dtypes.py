"""The one dtype table: the names a user types, the tags safetensors (and our reports) use, torch's
dtypes and their sizes. Every module reads its dtypes from here."""

from __future__ import annotations

import torch

# Bytes per element of every tag a safetensors checkpoint may hold.
TAG_BYTES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The floating-point tags and their torch dtypes.
TAG_TORCH: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
TORCH_TAG: dict[torch.dtype, str] = {v: k for k, v in TAG_TORCH.items()}
# A user's name of a floating-point dtype and its tag.
NAME_TAG: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
TAG_NAME: dict[str, str] = {v: k for k, v in NAME_TAG.items()}
# What an output adapter may be written in (--dtype), and what weights stored plainly (not quantized) use.
OUTPUT: dict[str, str] = {n: NAME_TAG[n] for n in ("float32", "float16", "bfloat16")}
PLAIN: dict[str, torch.dtype] = {t: TAG_TORCH[t] for t in ("F32", "F16", "BF16")}
# What the SVDs compute in (--compute-dtype).
COMPUTE: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


def tag_bytes(tag: str, default: int = 4) -> int:
    """Bytes per element of a tag; `default` for a tag this table does not know (a quantized type)."""
    return TAG_BYTES.get(tag, default)


def name_bytes(name: str) -> int:
    """Bytes per element of a dtype named as a user names it (float32, bfloat16, ...)."""
    return TAG_BYTES[NAME_TAG[name]]
