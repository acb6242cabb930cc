"""Per-family weight-name tables, held as data.

Each family maps the canonical module names (q, k, v, o, gate, up, down) to the module's path
inside a decoder layer, names where the layers live in a checkpoint, and says how to read each
module's (out, in) shape from config.json. Adding a family means adding a row, not a branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError

CANONICAL = ("q", "k", "v", "o", "gate", "up", "down")

# The module paths shared by the llama-style decoder layer.
_LLAMA_MODULES: Mapping[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

# (out, in) of each module as names of derived dimensions (see `model_dims`).
_LLAMA_SHAPES: Mapping[str, tuple[str, str]] = {
    "q": ("q_out", "hidden"),
    "k": ("kv_out", "hidden"),
    "v": ("kv_out", "hidden"),
    "o": ("hidden", "q_out"),
    "gate": ("intermediate", "hidden"),
    "up": ("intermediate", "hidden"),
    "down": ("hidden", "intermediate"),
}

# Where decoder layers live in the checkpoint, tried in order against the tensor names.
_LLAMA_PREFIXES = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers")


@dataclass(frozen=True)
class Family:
    name: str
    modules: Mapping[str, str]
    shapes: Mapping[str, tuple[str, str]]
    layer_prefixes: tuple[str, ...]
    config_section: str | None = None  # e.g. gemma3 keeps the text model under "text_config"


FAMILIES: dict[str, Family] = {
    name: Family(name, _LLAMA_MODULES, _LLAMA_SHAPES, _LLAMA_PREFIXES) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}
FAMILIES["gemma3"] = Family("gemma3", _LLAMA_MODULES, _LLAMA_SHAPES, _LLAMA_PREFIXES, config_section="text_config")

SUPPORTED = ", ".join(sorted(FAMILIES))


def family_for(config: Mapping[str, Any], where: str) -> Family:
    """The family of a config.json, or a clear error listing the supported ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise InputError(f"{where}: unsupported architecture {model_type!r}; supported: {SUPPORTED}")
    return FAMILIES[model_type]


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_out(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.num_kv_heads * self.head_dim

    def get(self, name: str) -> int:
        return int(getattr(self, name))


def model_dims(config: Mapping[str, Any], family: Family, where: str) -> ModelDims:
    """Read the dimensions that fix every module's shape. head_dim is always read when present."""
    section = config
    if family.config_section:
        section = config.get(family.config_section) or {}
    try:
        hidden = int(section["hidden_size"])
        heads = int(section["num_attention_heads"])
        dims = ModelDims(
            hidden=hidden,
            intermediate=int(section["intermediate_size"]),
            num_layers=int(section["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(section.get("num_key_value_heads") or heads),
            head_dim=int(section.get("head_dim") or hidden // heads),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: config.json lacks a usable {e} entry") from None
    return dims


def module_shape(family: Family, dims: ModelDims, module: str) -> tuple[int, int]:
    out_name, in_name = family.shapes[module]
    return dims.get(out_name), dims.get(in_name)
