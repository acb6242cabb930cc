"""Per-family weight-name tables, held as data.

Each family maps the canonical module names (q, k, v, o, gate, up, down) to the module's path
inside a decoder layer, names where the layers live in a checkpoint, and says how to read each
module's (out, in) shape from config.json. Adding a family means adding a row, not a branch.

Fused projections (phi3's qkv_proj and gate_up_proj, gpt_neox's query_key_value, gpt2's c_attn)
map several canonical names to one module path; `fused` says how their rows are laid out:
"concat" stacks the parts' rows one after the other ([Q|K|V]), "per_head" interleaves them head by
head ([q_0|k_0|v_0|q_1|...], as GPTNeoXAttention views its output as (heads, 3 * head_dim)).
`conv1d` families (gpt2) store every weight as (in, out): the logical (out, in) matrix is its
transpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lowmem_crosslora.errors import InputError

CANONICAL = ("q", "k", "v", "o", "gate", "up", "down")

# The module paths shared by the llama-style decoder layer (public: the tests' table of llama module paths).
LLAMA_MODULES: Mapping[str, str] = {
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
class FusedLayout:
    """How a fused module's rows split into its parts (canonical names, in storage order)."""

    kind: str  # "concat" or "per_head"
    parts: tuple[str, ...]


# config.json keys of each dimension, tried in order (gpt2 spells them its own way).
_CONFIG_KEYS: Mapping[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd"),
    "intermediate": ("intermediate_size", "n_inner"),
    "num_layers": ("num_hidden_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_head"),
}


@dataclass(frozen=True)
class Family:
    name: str
    modules: Mapping[str, str]
    shapes: Mapping[str, tuple[str, str]]
    layer_prefixes: tuple[str, ...]
    config_section: str | None = None  # e.g. gemma3 keeps the text model under "text_config"
    fused: Mapping[str, FusedLayout] = field(default_factory=dict)  # module path -> layout
    conv1d: bool = False  # weights stored (in, out); PEFT sets fan_in_fan_out
    intermediate_default: int | None = None  # gpt2: n_inner null means this many times hidden

    def fused_layout(self, module: str) -> FusedLayout | None:
        return self.fused.get(self.modules[module])


FAMILIES: dict[str, Family] = {
    name: Family(name, LLAMA_MODULES, _LLAMA_SHAPES, _LLAMA_PREFIXES) for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}
FAMILIES["gemma3"] = Family("gemma3", LLAMA_MODULES, _LLAMA_SHAPES, _LLAMA_PREFIXES, config_section="text_config")
FAMILIES["phi3"] = Family(
    "phi3",
    {**LLAMA_MODULES, "q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj", "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj"},
    _LLAMA_SHAPES,
    _LLAMA_PREFIXES,
    fused={"self_attn.qkv_proj": FusedLayout("concat", ("q", "k", "v")), "mlp.gate_up_proj": FusedLayout("concat", ("gate", "up"))},
)
_NO_GATE_SHAPES = {k: v for k, v in _LLAMA_SHAPES.items() if k != "gate"}
FAMILIES["gpt_neox"] = Family(
    "gpt_neox",
    {
        "q": "attention.query_key_value",
        "k": "attention.query_key_value",
        "v": "attention.query_key_value",
        "o": "attention.dense",
        "up": "mlp.dense_h_to_4h",
        "down": "mlp.dense_4h_to_h",
    },
    _NO_GATE_SHAPES,
    ("gpt_neox.layers", "layers"),
    fused={"attention.query_key_value": FusedLayout("per_head", ("q", "k", "v"))},
)
FAMILIES["gpt2"] = Family(
    "gpt2",
    {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
    _NO_GATE_SHAPES,
    ("transformer.h", "h"),
    fused={"attn.c_attn": FusedLayout("concat", ("q", "k", "v"))},
    conv1d=True,
    intermediate_default=4,
)

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


def check_dims(section: Mapping[str, Any], where: str) -> None:
    """Every dimension config.json gives must be an integer >= 1: "64", 64.0 or true are refused, not coerced."""
    if not isinstance(section, Mapping):
        raise InputError(f"{where}: config.json's model section must be an object, not {type(section).__name__}")
    for k in sorted({k for keys in _CONFIG_KEYS.values() for k in keys} | {"num_key_value_heads", "head_dim"}):
        v = section.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{where}: config.json field {k!r} must be an integer >= 1, not {v!r}"[:300])


def model_dims(config: Mapping[str, Any], family: Family, where: str) -> ModelDims:
    """Read the dimensions that fix every module's shape. head_dim is always read when present."""
    section = config
    if family.config_section:
        section = config.get(family.config_section) or {}
    check_dims(section, where)

    def key(dim: str) -> Any:
        for k in _CONFIG_KEYS[dim]:
            if section.get(k) is not None:
                return section[k]
        if dim == "intermediate" and family.intermediate_default:
            return family.intermediate_default * int(key("hidden"))
        raise KeyError(_CONFIG_KEYS[dim][0])

    try:
        hidden = int(key("hidden"))
        heads = int(key("num_heads"))
        dims = ModelDims(
            hidden=hidden,
            intermediate=int(key("intermediate")),
            num_layers=int(key("num_layers")),
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


def fused_rows(family: Family, dims: ModelDims, path: str) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """Row ranges of each part of a fused module (in the logical out x in matrix), and its total rows."""
    layout = family.fused[path]
    rows: dict[str, list[tuple[int, int]]] = {p: [] for p in layout.parts}
    if layout.kind == "concat":
        start = 0
        for p in layout.parts:
            size = dims.get(family.shapes[p][0])
            rows[p].append((start, start + size))
            start += size
        return rows, start
    if layout.kind == "per_head":
        hd = dims.head_dim
        width = hd * len(layout.parts)
        for h in range(dims.num_heads):
            for i, p in enumerate(layout.parts):
                rows[p].append((h * width + i * hd, h * width + (i + 1) * hd))
        return rows, dims.num_heads * width
    raise AssertionError(f"unknown fused layout {layout.kind}")
