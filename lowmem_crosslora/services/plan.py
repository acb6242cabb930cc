"""The plan: which source module feeds which target module, what is skipped and why, and the
output adapter's layout (names, shapes, dtypes), all from headers alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lowmem_crosslora import dtypes
from lowmem_crosslora.architectures import CANONICAL, Family, fused_rows, module_shape
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.adapter import PEFT_PREFIX, Adapter, LoraModule, restore_gguf_rows
from lowmem_crosslora.io.gguf_lora import LLAMA_CPP_ARCH
from lowmem_crosslora.io.reader import CheckpointReader
from lowmem_crosslora.linalg.fused import Placement, merge
from lowmem_crosslora.services.vllm import uniform_rank_alpha

TARGET_FORMATS = ("peft", "vllm")

LAYER_MAPS = ("index", "depth")


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
    # Where the factors go when the target module is fused or its rank is padded (see fused.py);
    # None: out_a / out_b are whole output tensors of shapes (rank, n') and (m', rank).
    placement: Placement | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("lora")
        d.pop("placement")
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
    # The written adapter_config.json's defaults (the source's, unless --for vllm made them uniform).
    out_rank: int = 8
    out_alpha: float = 8.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False  # a Conv1D (gpt2) target
    target_format: str = "peft"
    warnings: list[str] = field(default_factory=list)

    def layout(self) -> list[tuple[str, str, tuple[int, int]]]:
        """(name, dtype, shape) of every output tensor, sorted by name."""
        entries = set()
        for u in self.units:
            p = u.placement
            if p is None:
                entries.add((u.out_a, self.out_dtype, (u.rank, u.target_shape[1])))
                entries.add((u.out_b, self.out_dtype, (u.target_shape[0], u.rank)))
            else:
                entries.add((p.a_tensor, self.out_dtype, p.a_shape))
                entries.add((p.b_tensor, self.out_dtype, p.b_shape))
        return sorted(entries)

    def regions(self) -> dict[str, tuple[str, tuple[tuple[int, int], ...]]]:
        """Unit outputs that are some rows of an output tensor: region name -> (tensor, row ranges)."""
        out = {}
        for u in self.units:
            p = u.placement
            if p is not None:
                if u.out_a != p.a_tensor:
                    out[u.out_a] = (p.a_tensor, p.a_rows)
                if u.out_b != p.b_tensor:
                    out[u.out_b] = (p.b_tensor, p.b_rows)
        return out


def source_layer_for(target_layer: int, source_layers: int, target_layers: int, layer_map: str) -> int:
    """Which source layer feeds a target layer. 'depth' rounds half up: round(j (Ls-1)/(Lt-1))."""
    if layer_map == "index":
        return target_layer
    if target_layers <= 1:
        return 0
    return int(math.floor(target_layer * (source_layers - 1) / (target_layers - 1) + 0.5))


def _source_units(adapter: Adapter, source: CheckpointReader, skipped: list[dict[str, Any]]) -> dict[tuple[int, str], LoraModule]:
    fam = source.family
    by_path: dict[str, list[str]] = {}
    for name, path in fam.modules.items():
        by_path.setdefault(path, []).append(name)
    patterns = {path: re.compile(rf"^{re.escape(source.layer_prefix)}\.(\d+)\.{re.escape(path)}$") for path in by_path}
    found: dict[tuple[int, str], LoraModule] = {}
    for module_path, lora in sorted(adapter.modules.items()):
        hit = None
        for path, pat in patterns.items():
            m = pat.match(module_path)
            if m:
                hit = (int(m.group(1)), path)
                break
        if hit is None:
            skipped.append({"tensor": module_path, "reason": "not one of the transferable modules (q, k, v, o, gate, up, down)"})
            continue
        layer, path = hit
        if layer >= source.dims.num_layers:
            raise InputError(
                f"adapter: module {module_path} is on layer {layer}, but the source model has {source.dims.num_layers} layers; "
                "is this adapter for this source model?"
            )
        if path in fam.fused:
            # A fused module's LoRA: A is shared, B splits by rows into the parts.
            rows, total = fused_rows(fam, source.dims, path)
            n_cols = source.info(source.weight_name(layer, by_path[path][0])).shape[1]
            if lora.b_shape[0] != total or lora.a_shape[1] != n_cols:
                raise InputError(
                    f"adapter: module {module_path} has A {list(lora.a_shape)} and B {list(lora.b_shape)}, which do not fit the source's "
                    f"fused weight ({total} x {n_cols}); is this adapter for this source model?"
                )
            for name in fam.fused[path].parts:
                found[(layer, name)] = adapter.part(lora, name, tuple(rows[name]))
            continue
        name = by_path[path][0]
        w = source.info(source.weight_name(layer, name))
        m_rows, n_cols = w.shape
        if lora.b_shape[0] != m_rows or lora.a_shape[1] != n_cols:
            raise InputError(
                f"adapter: module {module_path} has A {list(lora.a_shape)} and B {list(lora.b_shape)}, which do not fit the source weight "
                f"{list(w.shape)}; is this adapter for this source model?"
            )
        found[(layer, name)] = lora
    return found


def build_plan(
    adapter: Adapter,
    source: CheckpointReader,
    target: CheckpointReader,
    *,
    rank: int,
    layer_map: str,
    dtype: str | None = None,
    target_format: str = "peft",
) -> Plan:
    """Which (target layer, module) takes which source LoRA module, at which SVD rank, written how.
    `dtype` None: the adapter's own (float32 when its modules differ); see docs/METHOD.md."""
    if target_format not in TARGET_FORMATS:
        raise InputError(f"unknown --for {target_format!r}; choose one of {', '.join(TARGET_FORMATS)}")
    if layer_map not in LAYER_MAPS:
        raise InputError(f"unknown layer map {layer_map!r}; choose one of {', '.join(LAYER_MAPS)}")
    if rank < 1:
        raise InputError(f"--rank must be at least 1 (got {rank})")
    # A LoRA GGUF holds llama's q/k rows in llama.cpp's order: back to Hugging Face's with the source's heads.
    restore_gguf_rows(adapter, source.dims.num_heads, source.dims.num_kv_heads, LLAMA_CPP_ARCH.get(source.family.name))
    skipped: list[dict[str, Any]] = list(adapter.skipped)
    sources = _source_units(adapter, source, skipped)
    if not sources:
        raise InputError("adapter: none of its LoRA modules is a transferable module (q, k, v, o, gate, up, down) of the source model")
    out_dtype = _out_dtype({lora.dtype for lora in sources.values()}, dtype)
    units, used = _map_units(sources, source, target, rank, layer_map)
    skipped += _unmapped(sources, used, target, layer_map)
    if not units:
        raise InputError("nothing to transfer: no adapted module maps onto the target model")

    # adapter_config.json: the source's default r / alpha, with per-module patterns where a module differs,
    # so every module keeps the effective scale it had (fused and padded modules: see place_units).
    tfam = target.family
    warnings = list(adapter.warnings)
    default_rank, default_alpha, use_rslora = adapter.default_rank, adapter.default_alpha, adapter.use_rslora
    uniform_rank: tuple[int, float] | None = None
    if target_format == "vllm":
        uniform_rank = uniform_rank_alpha(units, tfam, adapter, warnings)
    module_rank, module_alpha = place_units(units, target, adapter, uniform_rank)
    if uniform_rank is not None:
        default_rank, default_alpha = uniform_rank
        use_rslora = False
    rank_pattern = {m: r for m, r in module_rank.items() if r != default_rank}
    alpha_pattern = {m: a for m, a in module_alpha.items() if a != default_alpha}
    target_modules, layers_to_transform = _peft_modules(units, tfam, target.dims.num_layers)
    return Plan(
        units,
        skipped,
        layer_map,
        rank,
        out_dtype,
        target_modules,
        layers_to_transform,
        rank_pattern,
        alpha_pattern,
        out_rank=default_rank,
        out_alpha=default_alpha,
        use_rslora=use_rslora,
        fan_in_fan_out=tfam.conv1d,
        target_format=target_format,
        warnings=warnings,
    )


def _out_dtype(lora_dtypes: set[str], dtype: str | None) -> str:
    """The output's tag: --dtype's, else the adapter's (float32 when its modules differ, or for float64)."""
    if dtype is None:
        out_dtype = "F32" if len(lora_dtypes) > 1 else lora_dtypes.pop()
        return "F32" if out_dtype == "F64" else out_dtype
    if dtype not in dtypes.OUTPUT:
        raise InputError(f"unknown --dtype {dtype!r}; choose one of {', '.join(dtypes.OUTPUT)}")
    return dtypes.OUTPUT[dtype]


def _map_units(
    sources: dict[tuple[int, str], LoraModule], source: CheckpointReader, target: CheckpointReader, rank: int, layer_map: str
) -> tuple[list[Unit], set[tuple[int, str]]]:
    """One unit per (target layer, module) whose mapped source layer has a LoRA on that module, in
    layer and canonical module order; and the (source layer, module) keys used."""
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
            if name not in tfam.modules:
                continue  # reported by _unmapped: the target family has no such module
            sw = source.weight_name(sl, name)
            tw = target.weight_name(tl, name)
            tinfo = target.info(tw)
            expected = module_shape(tfam, target.dims, name)
            if tuple(tinfo.shape) != expected:
                raise InputError(f"target: weight {tw} has shape {list(tinfo.shape)} but config.json implies {list(expected)}")
            s_shape = tuple(source.info(sw).shape)
            s_expected = module_shape(source.family, source.dims, name)
            if s_shape != s_expected:
                raise InputError(f"source: weight {sw} has shape {list(s_shape)} but config.json implies {list(s_expected)}")
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
    return units, used


def _unmapped(sources: dict[tuple[int, str], LoraModule], used: set[tuple[int, str]], target: CheckpointReader, layer_map: str) -> list[dict[str, Any]]:
    """The adapter's modules no unit takes, each with the reason."""
    tfam, Lt = target.family, target.dims.num_layers
    skipped: list[dict[str, Any]] = []
    for (sl, name), lora in sorted(sources.items()):
        if name not in tfam.modules:
            skipped.append({"tensor": lora.module, "reason": f"the target family {tfam.name} has no {name} projection"})
            continue
        if (sl, name) not in used:
            reason = (
                f"source layer {sl} is deeper than the target's {Lt} layers (layer map 'index')"
                if layer_map == "index"
                else f"no target layer maps to source layer {sl} (layer map 'depth')"
            )
            skipped.append({"tensor": lora.module, "reason": reason})
    return skipped


def _peft_modules(units: list[Unit], tfam: Family, num_layers: int) -> tuple[list[str], list[int] | None]:
    """PEFT's target_modules and layers_to_transform for the units: short names when every adapted
    layer adapts the same modules and no short name also catches an unadapted module; else full names."""
    modules_by_layer: dict[int, set[str]] = {}
    paths_by_layer: dict[int, set[str]] = {}
    for u in units:
        modules_by_layer.setdefault(u.target_layer, set()).add(tfam.modules[u.module].split(".")[-1])
        paths_by_layer.setdefault(u.target_layer, set()).add(tfam.modules[u.module])
    all_names = sorted({n for s in modules_by_layer.values() for n in s})
    uniform = all(s == set(all_names) for s in modules_by_layer.values())
    # A short name must not also catch a module that is not adapted (gpt2: attn.c_proj and mlp.c_proj).
    adapted_paths = {p for s in paths_by_layer.values() for p in s}
    ambiguous = any(p.split(".")[-1] in all_names and p not in adapted_paths for p in set(tfam.modules.values()))
    layers = sorted(modules_by_layer)
    if uniform and not ambiguous:
        return all_names, (None if layers == list(range(num_layers)) else layers)
    # Different layers adapt different modules: name every module exactly.
    return sorted({u.target_module for u in units}), None


def place_units(units: list[Unit], target: CheckpointReader, adapter: Adapter, uniform: tuple[int, float] | None) -> tuple[dict[str, int], dict[str, float]]:
    """Set each unit's output placement (fused target modules, uniform rank) and return every target
    module's written rank and alpha.

    A fused target module stacks its parts' ranks, R = sum of k_p, and takes the first part's scale s;
    each part's B is multiplied by s_p / s. With `uniform` = (R, alpha), every module is padded to
    rank R and written at alpha's scale. See fused.py."""
    tfam = target.family
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.target_module, []).append(u)
    module_rank: dict[str, int] = {}
    module_alpha: dict[str, float] = {}
    for module, group in groups.items():
        path = tfam.modules[group[0].module]
        layout = tfam.fused.get(path)
        if layout is None and uniform is None:
            module_rank[module] = group[0].rank
            module_alpha[module] = group[0].alpha
            continue
        if layout is not None:
            group.sort(key=lambda u: layout.parts.index(u.module))
            rows, total = fused_rows(tfam, target.dims, path)
        else:
            rows, total = {group[0].module: [(0, group[0].target_shape[0])]}, group[0].target_shape[0]
        stacked = sum(u.rank for u in group)
        if uniform is not None:
            R, alpha = uniform
            scale = alpha / R
        else:
            R, scale = stacked, group[0].lora.scale
            alpha = scale * math.sqrt(R) if adapter.use_rslora else scale * R
            if alpha == int(alpha):
                alpha = float(int(alpha))
        module_rank[module], module_alpha[module] = R, alpha
        n_in = group[0].target_shape[1]
        a_name = f"{PEFT_PREFIX}{module}.lora_A.weight"
        b_name = f"{PEFT_PREFIX}{module}.lora_B.weight"
        covered = {r for u in group for r in rows[u.module]}
        uncovered = [r for part_rows in rows.values() for r in part_rows if r not in covered]
        offset = 0
        for i, u in enumerate(group):
            a_rows = ((offset, R if i == len(group) - 1 else offset + u.rank),)
            b_rows = merge(list(rows[u.module]) + (uncovered if i == 0 else []))
            u.placement = Placement(
                a_tensor=a_name,
                a_shape=(R, n_in),
                a_rows=a_rows,
                a_part=offset,
                b_tensor=b_name,
                b_shape=(total, R),
                b_rows=b_rows,
                b_part=tuple(rows[u.module]),
                b_cols=(offset, offset + u.rank),
                b_scale=u.lora.scale / scale,
            )
            u.out_a, u.out_b = u.placement.a_region, u.placement.b_region
            offset += u.rank
    return module_rank, module_alpha
