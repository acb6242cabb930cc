"""The plan: which source module feeds which target module, what is skipped and why, and the
output adapter's layout (names, shapes, dtypes), all from headers alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapter import PEFT_PREFIX, Adapter, LoraModule
from .architectures import CANONICAL, module_shape
from .checkpoint import Checkpoint
from .errors import InputError

LAYER_MAPS = ("index", "depth")
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Unit:
    """One unit of work: one (target layer, module)."""

    uid: str
    module: str  # canonical name
    source_layer: int
    target_layer: int
    source_weight: str
    target_weight: str
    source_shape: tuple[int, int]
    target_shape: tuple[int, int]
    source_module: str  # PEFT path of the source module
    target_module: str  # PEFT path of the target module
    rank: int  # LoRA rank k
    alpha: float
    r: int  # SVD rank
    out_a: str
    out_b: str
    lora: LoraModule = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("lora")
        d["source_shape"] = list(self.source_shape)
        d["target_shape"] = list(self.target_shape)
        return d


@dataclass
class Plan:
    units: list[Unit]
    skipped: list[dict[str, Any]]
    layer_map: str
    rank: int
    out_dtype: str  # safetensors dtype tag
    target_modules: list[str]
    layers_to_transform: list[int] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def layout(self) -> list[tuple[str, str, tuple[int, int]]]:
        """(name, dtype, shape) of every output tensor, sorted by name."""
        entries = []
        for u in self.units:
            entries.append((u.out_a, self.out_dtype, (u.rank, u.target_shape[1])))
            entries.append((u.out_b, self.out_dtype, (u.target_shape[0], u.rank)))
        return sorted(entries)


def source_layer_for(target_layer: int, source_layers: int, target_layers: int, layer_map: str) -> int:
    """Which source layer feeds a target layer. 'depth' rounds half up: round(j (Ls-1)/(Lt-1))."""
    if layer_map == "index":
        return target_layer
    if target_layers <= 1:
        return 0
    return int(math.floor(target_layer * (source_layers - 1) / (target_layers - 1) + 0.5))


def _source_units(adapter: Adapter, source: Checkpoint, skipped: list[dict[str, Any]]) -> dict[tuple[int, str], LoraModule]:
    fam = source.family
    patterns = {name: re.compile(rf"^{re.escape(source.layer_prefix)}\.(\d+)\.{re.escape(path)}$") for name, path in fam.modules.items()}
    found: dict[tuple[int, str], LoraModule] = {}
    for module_path, lora in sorted(adapter.modules.items()):
        hit = None
        for name, pat in patterns.items():
            m = pat.match(module_path)
            if m:
                hit = (int(m.group(1)), name)
                break
        if hit is None:
            skipped.append({"tensor": module_path, "reason": "not one of the transferable modules (q, k, v, o, gate, up, down)"})
            continue
        layer, name = hit
        if layer >= source.dims.num_layers:
            raise InputError(
                f"adapter: module {module_path} is on layer {layer}, but the source model has {source.dims.num_layers} layers; "
                "is this adapter for this source model?"
            )
        w = source.info(source.weight_name(layer, name))
        m_rows, n_cols = w.shape
        if lora.b_shape[0] != m_rows or lora.a_shape[1] != n_cols:
            raise InputError(
                f"adapter: module {module_path} has A {list(lora.a_shape)} and B {list(lora.b_shape)}, which do not fit the source weight "
                f"{list(w.shape)}; is this adapter for this source model?"
            )
        found[(layer, name)] = lora
    return found


def build_plan(adapter: Adapter, source: Checkpoint, target: Checkpoint, rank: int = 320, layer_map: str = "index", dtype: str | None = None) -> Plan:
    if layer_map not in LAYER_MAPS:
        raise InputError(f"unknown layer map {layer_map!r}; choose one of {', '.join(LAYER_MAPS)}")
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    skipped: list[dict[str, Any]] = list(adapter.skipped)
    sources = _source_units(adapter, source, skipped)
    if not sources:
        raise InputError("adapter: none of its LoRA modules is a transferable module (q, k, v, o, gate, up, down) of the source model")
    dtypes = {lora.dtype for lora in sources.values()}
    if dtype is None:
        out_dtype = "F32" if len(dtypes) > 1 else dtypes.pop()
        if out_dtype == "F64":
            out_dtype = "F32"
    else:
        if dtype not in DTYPES:
            raise InputError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        out_dtype = DTYPES[dtype]

    Ls, Lt = source.dims.num_layers, target.dims.num_layers
    units: list[Unit] = []
    used: set[tuple[int, str]] = set()
    tfam = target.family
    for tl in range(Lt):
        sl = source_layer_for(tl, Ls, Lt, layer_map)
        for name in CANONICAL:
            lora = sources.get((sl, name))
            if lora is None:
                continue
            sw = source.weight_name(sl, name)
            tw = target.weight_name(tl, name)
            tinfo = target.info(tw)
            expected = module_shape(tfam, target.dims, name)
            if tuple(tinfo.shape) != expected:
                raise InputError(f"target: weight {tw} has shape {list(tinfo.shape)} but config.json implies {list(expected)}")
            s_shape = tuple(source.info(sw).shape)
            t_shape = tuple(tinfo.shape)
            r = min(rank, *s_shape, *t_shape)
            target_module = f"{target.layer_prefix}.{tl}.{tfam.modules[name]}"
            used.add((sl, name))
            units.append(
                Unit(
                    uid=f"{tl}.{name}",
                    module=name,
                    source_layer=sl,
                    target_layer=tl,
                    source_weight=sw,
                    target_weight=tw,
                    source_shape=(int(s_shape[0]), int(s_shape[1])),
                    target_shape=(int(t_shape[0]), int(t_shape[1])),
                    source_module=lora.module,
                    target_module=target_module,
                    rank=lora.rank,
                    alpha=lora.alpha,
                    r=int(r),
                    out_a=f"{PEFT_PREFIX}{target_module}.lora_A.weight",
                    out_b=f"{PEFT_PREFIX}{target_module}.lora_B.weight",
                    lora=lora,
                )
            )
    for (sl, name), lora in sorted(sources.items()):
        if (sl, name) not in used:
            reason = (
                f"source layer {sl} is deeper than the target's {Lt} layers (layer map 'index')"
                if layer_map == "index"
                else f"no target layer maps to source layer {sl} (layer map 'depth')"
            )
            skipped.append({"tensor": lora.module, "reason": reason})
    if not units:
        raise InputError("nothing to transfer: no adapted module maps onto the target model")

    # adapter_config.json: the source's default r / alpha, with per-module patterns where a module differs,
    # so every module keeps the effective scale it had.
    default_rank, default_alpha = adapter.default_rank, adapter.default_alpha
    rank_pattern = {u.target_module: u.rank for u in units if u.rank != default_rank}
    alpha_pattern = {u.target_module: u.alpha for u in units if u.alpha != default_alpha}
    modules_by_layer: dict[int, set[str]] = {}
    for u in units:
        modules_by_layer.setdefault(u.target_layer, set()).add(tfam.modules[u.module].split(".")[-1])
    all_names = sorted({n for s in modules_by_layer.values() for n in s})
    uniform = all(s == set(all_names) for s in modules_by_layer.values())
    layers = sorted(modules_by_layer)
    if uniform:
        target_modules: list[str] = all_names
        layers_to_transform = None if layers == list(range(Lt)) else layers
    else:
        # Different layers adapt different modules: name every module exactly.
        target_modules = sorted(u.target_module for u in units)
        layers_to_transform = None
    return Plan(units, skipped, layer_map, rank, out_dtype, target_modules, layers_to_transform, rank_pattern, alpha_pattern)
