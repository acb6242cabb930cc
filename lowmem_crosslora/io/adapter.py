"""A PEFT LoRA adapter folder: its config, its per-module scales and its factors, read lazily."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lowmem_crosslora.dtypes import TAG_TORCH, TORCH_TAG
from lowmem_crosslora.errors import InputError
from lowmem_crosslora.io.config_fields import check_adapter_config, number
from lowmem_crosslora.io.gguf_adapter import read_gguf_adapter, restore_rows
from lowmem_crosslora.io.gguf_model import is_gguf
from lowmem_crosslora.io.hub import resolve
from lowmem_crosslora.io.reader import read_json
from lowmem_crosslora.io.safetensors_model import read_safetensors_header

PEFT_PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<kind>weight|bias)$")


def peft_pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The pattern key PEFT would pick for a module name (first key whose regex ends the name)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


@dataclass
class LoraModule:
    """One adapted linear module of the source: dW = scale * B @ A."""

    module: str  # PEFT module path, e.g. model.layers.3.self_attn.q_proj
    a_name: str
    b_name: str
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    dtype: str


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"tensor": ..., "reason": ...}
    file: Path | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, for the user
    # `<lora_B name>#<part>` -> (lora_B name, rows): one part's rows of a fused module's B
    views: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # a pickled or GGUF adapter, loaded
    # A LoRA GGUF's lora_B names whose rows are in llama.cpp's q/k order ("q"/"k"): put back by the
    # plan once the source's head counts are known (restore_rows).
    permuted_rows: dict[str, str] = field(default_factory=dict)
    _handle: Any = field(default=None, repr=False)

    def part(self, lora: LoraModule, part: str, rows: tuple[tuple[int, int], ...]) -> LoraModule:
        """One part of a fused module's LoRA: the shared A, and B's rows of that part."""
        name = f"{lora.b_name}#{part}"
        self.views[name] = (lora.b_name, tuple(rows))
        m = sum(b - a for a, b in rows)
        return LoraModule(lora.module, lora.a_name, name, lora.rank, lora.alpha, lora.scale, lora.a_shape, (m, lora.b_shape[1]), lora.dtype)

    @property
    def default_rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def default_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scale_for(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def read(self, name: str) -> torch.Tensor:
        """One factor, copied out of the map (adapters are small; the handle is opened once)."""
        assert self.file is not None
        view = self.views.get(name)
        if view is not None:
            whole = self.read(view[0])
            return torch.cat([whole[a:b] for a, b in view[1]], dim=0)
        if self.state is not None:
            return self.state[name].clone()
        try:
            if self._handle is None:
                self._handle = safe_open(str(self.file), framework="pt", device="cpu")
            return self._handle.get_tensor(name).clone()
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"adapter: cannot read tensor {name} from {self.file}: {e}") from None

    def close(self) -> None:
        self._handle = None


def _load_pickled(file: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_model.bin through torch.load(weights_only=True): tensors only, no code runs."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle is bad input
        # torch's own message goes on to explain how to load the file unsafely: never relay that advice.
        raise InputError(
            f"{where}: torch.load(weights_only=True) refused {file.name} ({type(e).__name__}): it is not a plain state dict of "
            "tensors, and is never unpickled with code; convert it to adapter_model.safetensors with the tool that made it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InputError(f"{where}: {file.name} does not hold a state dict of tensors")
    header = {k: {"shape": list(v.shape), "dtype": TORCH_TAG.get(v.dtype, str(v.dtype))} for k, v in state.items()}
    return header, state


def _module_of(name: str) -> str:
    """The module path of a saved tensor name, without PEFT's prefix and the parameter name."""
    module = name.rsplit(".", 1)[0]
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def _in_modules_to_save(module: str, modules_to_save: list[str]) -> bool:
    parts = module.split(".")
    return any(m in parts or module == m or module.endswith("." + m) for m in modules_to_save)


def load_adapter(path: str | os.PathLike[str], allow_pickle: bool = False) -> Adapter:
    """Read an adapter folder's config and tensor layout (headers only) and check it is a plain LoRA.

    A pickled adapter_model.bin is refused unless `allow_pickle`; then it is read with
    torch.load(weights_only=True), which unpickles tensors and plain containers only."""

    p = resolve(path, "adapter")
    where = f"adapter {p}"
    if not p.exists():
        if p.is_symlink():
            raise InputError(f"{where}: a symbolic link that leads nowhere (dangling, or a loop)")
        raise InputError(f"{where}: no such file or directory")
    if not p.is_dir():
        if is_gguf(p):
            return _load_gguf(p, where)
        raise InputError(f"{where}: expected an adapter folder (adapter_config.json + adapter_model.safetensors) or a llama.cpp LoRA GGUF")
    config = read_json(p / "adapter_config.json", "adapter")
    config_warnings = check_adapter_config(config, where)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(
            f"{where}: peft_type {peft_type} is not supported; only LoRA adapters can be transferred "
            "(`lowmem-crosslora refine` can still carry its behaviour onto the target)"
        )
    if config.get("use_dora"):
        raise InputError(
            f"{where}: DoRA adapters (use_dora=true) are not supported; only plain LoRA can be transferred "
            "(`lowmem-crosslora refine` can still carry its behaviour onto the target)"
        )
    file, header, state = _adapter_file(p, where, allow_pickle)
    adapter = Adapter(p, config, file=file, state=state, warnings=config_warnings)
    modules_to_save = config.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    bias_mode = str(config.get("bias", "none"))
    counts = {"bias": 0, "save": 0, "lora_bias": 0}
    factors = _lora_factors(adapter, header, where, [str(x) for x in modules_to_save], bias_mode, counts)
    _add_modules(adapter, factors, where)
    if not adapter.modules:
        raise InputError(f"{where}: no LoRA factors (lora_A / lora_B) found in {file.name}")
    if counts["bias"]:
        adapter.warnings.append(f"adapter: {counts['bias']} bias tensors (bias={bias_mode!r}) are not transferred; the report lists them as skipped")
    if counts["save"]:
        names = ", ".join(map(str, modules_to_save))
        adapter.warnings.append(f"adapter: {counts['save']} modules_to_save tensors ({names}) are not transferred; the report lists them")
    if counts["lora_bias"]:
        adapter.warnings.append(f"adapter: {counts['lora_bias']} LoRA bias tensors (lora_bias) are not transferred; the report lists them")
    return adapter


def require_folder(path: str | os.PathLike[str], command: str) -> None:
    """verify and refine run adapters through PEFT, which reads folders: refuse a single file (a LoRA GGUF) plainly."""
    p = resolve(path, "adapter")
    if p.is_file():
        raise InputError(
            f"adapter {p}: {command} runs adapters with PEFT, which reads an adapter folder (adapter_config.json + "
            "adapter_model.safetensors), not a single file; a LoRA GGUF can be moved with `transfer` (it writes a PEFT folder)"
        )


def _load_gguf(p: Path, where: str) -> Adapter:
    """A llama.cpp LoRA GGUF as an adapter (io/gguf_adapter.py says how its terms map to PEFT's)."""
    config, header, state, permuted = read_gguf_adapter(p)
    adapter = Adapter(p, config, file=p, state=state, permuted_rows=permuted)
    _add_modules(adapter, _lora_factors(adapter, header, where, [], "none", {"bias": 0, "save": 0, "lora_bias": 0}), where)
    return adapter


def restore_gguf_rows(adapter: Adapter, num_heads: int, num_kv_heads: int, source_arch: str | None) -> None:
    """A GGUF adapter's q/k rows back in Hugging Face order, with the source's head counts (no-op otherwise)."""
    if adapter.state is not None and (adapter.permuted_rows or adapter.config.get("llama_cpp_architecture")):
        restore_rows(adapter.path, adapter.config, adapter.state, adapter.permuted_rows, (num_heads, num_kv_heads), source_arch)
        adapter.permuted_rows = {}


def _adapter_file(p: Path, where: str, allow_pickle: bool) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None]:
    """The adapter's tensor file, its header, and (for a pickled .bin read with --allow-pickle) its tensors."""
    file = p / "adapter_model.safetensors"
    if file.exists():
        return file, read_safetensors_header(file, "adapter"), None
    if not (p / "adapter_model.bin").exists():
        raise InputError(f"{where}: adapter_model.safetensors not found")
    if not allow_pickle:
        raise InputError(
            f"{where}: only a pickled adapter_model.bin found; `transfer` and `plan` read it with --allow-pickle "
            "(torch.load(weights_only=True): tensors only, no code), or convert it to adapter_model.safetensors"
        )
    file = p / "adapter_model.bin"
    header, state = _load_pickled(file, where)
    return file, header, state


def _lora_factors(
    adapter: Adapter, header: dict[str, Any], where: str, modules_to_save: list[str], bias_mode: str, counts: dict[str, int]
) -> dict[str, dict[str, tuple[str, dict[str, Any]]]]:
    """module -> {"A": (tensor name, header entry), "B": ...}; every other tensor is recorded as skipped
    (with its reason) and counted by kind."""
    factors: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for name, info in sorted(header.items()):
        if name == "__metadata__":
            continue
        m = _FACTOR.match(name)
        if "lora_magnitude_vector" in name:
            raise InputError(f"{where}: tensor {name} is a DoRA magnitude; DoRA adapters are not supported")
        if m is None:
            if "lora_embedding" in name:
                reason = "embedding LoRA is not transferred (vocabularies differ between models)"
            elif _in_modules_to_save(_module_of(name), modules_to_save) or ".modules_to_save." in name:
                reason = "modules_to_save copy: a full weight of the source model, not transferred"
                counts["save"] += 1
            elif name.endswith(".bias"):
                reason = f"bias delta (bias={bias_mode!r}): a trained bias of the source model, not transferred"
                counts["bias"] += 1
            else:
                reason = "not a LoRA factor (a full weight copy); not transferred"
            adapter.skipped.append({"tensor": name, "reason": reason})
            continue
        if m.group("kind") == "bias":
            adapter.skipped.append({"tensor": name, "reason": "LoRA bias (lora_bias) is not transferred"})
            counts["lora_bias"] += 1
            continue
        module = m.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX) :]
        factors.setdefault(module, {})[m.group("which")] = (name, info)
    return factors


def _add_modules(adapter: Adapter, factors: dict[str, dict[str, tuple[str, dict[str, Any]]]], where: str) -> None:
    """Check each module's pair of factors against each other and the config's ranks; add the modules."""
    rank_pattern = dict(adapter.config.get("rank_pattern") or {})
    alpha_pattern = dict(adapter.config.get("alpha_pattern") or {})
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "B" not in parts else "lora_A"
            raise InputError(f"{where}: module {module} has no {missing} tensor")
        (a_name, a_info), (b_name, b_info) = parts["A"], parts["B"]
        a_shape, b_shape = tuple(a_info["shape"]), tuple(b_info["shape"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise InputError(f"{where}: module {module} has factors of shapes A {list(a_shape)} and B {list(b_shape)}, which do not multiply")
        if a_info["dtype"] not in TAG_TORCH:
            raise InputError(f"{where}: tensor {a_name} has dtype {a_info['dtype']}; expected a float type")
        rank = int(a_shape[0])
        rkey = peft_pattern_key(rank_pattern, module)
        cfg_rank = int(rank_pattern[rkey]) if rkey is not None else adapter.default_rank
        if cfg_rank != rank:
            raise InputError(f"{where}: module {module} has rank {rank} in its tensors but {cfg_rank} in adapter_config.json")
        akey = peft_pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[akey]) if akey is not None else adapter.default_alpha
        adapter.modules[module] = LoraModule(
            module=module,
            a_name=a_name,
            b_name=b_name,
            rank=rank,
            alpha=alpha,
            scale=adapter.scale_for(rank, alpha),
            a_shape=(int(a_shape[0]), int(a_shape[1])),
            b_shape=(int(b_shape[0]), int(b_shape[1])),
            dtype=str(a_info["dtype"]),
        )


# The PEFT types whose behaviour refine can learn (the source runs them through PEFT itself; refine
# needs only which modules they adapt, and writes a plain LoRA on the target).
BEHAVIOUR_TYPES = ("LORA", "IA3", "LOHA", "LOKR")
# Rank and alpha of the target LoRA for a type that has none (IA3): PEFT's LoraConfig defaults.
DEFAULT_BEHAVIOUR_RANK, DEFAULT_BEHAVIOUR_ALPHA = 8, 8.0
_PEFT_PARAM = re.compile(r"^(?P<module>.+?)\.(?P<param>lora_[A-Za-z]+(?:_[A-Za-z]+)*|ia3_l|hada_[a-z0-9_]+|lokr_[a-z0-9_]+)(?:\..+)?$")
ShapeOf = Callable[[str], "tuple[int, int] | None"]


def is_plain_lora(path: str | os.PathLike[str]) -> bool:
    """Whether the adapter folder holds a plain LoRA (what the SVD transfer moves)."""
    config = read_json(resolve(path, "adapter") / "adapter_config.json", "adapter")
    return str(config.get("peft_type", "LORA")).upper() == "LORA" and not config.get("use_dora")


def load_behaviour_adapter(path: str | os.PathLike[str], shape_of: ShapeOf) -> Adapter:
    """An adapter refine learns from: a plain LoRA as load_adapter reads it; any other type refine
    takes (BEHAVIOUR_TYPES, DoRA included) as the modules it adapts, each a placeholder LoRA module
    (no factors to read) of the rank and alpha the target LoRA gets: the config's `r` and
    `lora_alpha` (`alpha` for LoHa / LoKr), or PEFT's LoRA defaults where the type has none (IA3).
    `shape_of(module)` is the source weight's (rows, columns), None when the source has no such
    linear weight (the module is then skipped with its reason)."""
    if is_plain_lora(path):
        return load_adapter(path)
    p = resolve(path, "adapter")
    where = f"adapter {p}"
    config = read_json(p / "adapter_config.json", "adapter")
    check_adapter_config(config, where)
    if "alpha" in config:
        number(config, "alpha", f"{where}: adapter_config.json")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in BEHAVIOUR_TYPES:
        raise InputError(f"{where}: peft_type {peft_type} is not one refine learns from; it takes {', '.join(BEHAVIOUR_TYPES)} (DoRA included)")
    file, header, state = _adapter_file(p, where, allow_pickle=False)
    rank = int(config.get("r") or DEFAULT_BEHAVIOUR_RANK)
    alpha = float(config.get("lora_alpha", config.get("alpha", DEFAULT_BEHAVIOUR_ALPHA if "r" not in config else rank)))
    plain = {"r": rank, "lora_alpha": alpha, "use_rslora": bool(config.get("use_rslora", False)), "rank_pattern": {}, "alpha_pattern": {}}
    adapter = Adapter(p, {**config, **plain}, file=file, state=state)
    found: dict[str, str] = {}
    for name, info in sorted(header.items()):
        if name == "__metadata__":
            continue
        m = _PEFT_PARAM.match(name)
        if m is None:
            adapter.skipped.append({"tensor": name, "reason": f"not a {peft_type} parameter of a module; not learned from"})
            continue
        module = m.group("module")
        found.setdefault(module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module, str(info["dtype"]))
    for module, dtype in found.items():
        shape = shape_of(module)
        if shape is None:
            adapter.skipped.append({"tensor": module, "reason": "the source has no linear weight under this module's name"})
            continue
        rows, cols = shape
        scale = adapter.scale_for(rank, alpha)
        adapter.modules[module] = LoraModule(module, "", "", rank, alpha, scale, (rank, cols), (rows, rank), dtype if dtype in TAG_TORCH else "F32")
    if not adapter.modules:
        raise InputError(f"{where}: no module of the source model is adapted by its {peft_type} tensors")
    adapter.warnings.append(
        f"adapter: a {peft_type}{' (DoRA)' if config.get('use_dora') else ''} adapter: refine learns its behaviour into a plain LoRA "
        f"of rank {rank}, alpha {alpha:g} on the target"
    )
    return adapter


def check_all_finite(adapter: Adapter) -> None:
    """Every tensor of the adapter's file must be finite (for adapters whose factors are not LoRA's)."""
    assert adapter.file is not None
    tensors = adapter.state
    try:
        if tensors is None:
            with safe_open(str(adapter.file), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise InputError(f"adapter: cannot read {adapter.file}: {e}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"adapter {adapter.path}: tensor {name} contains NaN or Inf")


def check_finite(adapter: Adapter) -> None:
    """Every LoRA factor must be finite: NaN or Inf would poison the projection silently."""
    assert adapter.file is not None
    if adapter.state is not None:
        for mod in adapter.modules.values():
            for name in (mod.a_name, mod.b_name):
                if not torch.isfinite(adapter.read(name)).all():
                    raise InputError(f"adapter {adapter.path}: tensor {name} contains NaN or Inf")
        return
    try:
        with safe_open(str(adapter.file), framework="pt", device="cpu") as f:
            for mod in adapter.modules.values():
                for name in (mod.a_name, mod.b_name):
                    if not torch.isfinite(f.get_tensor(name)).all():
                        raise InputError(f"adapter {adapter.path}: tensor {name} contains NaN or Inf")
    except (SafetensorError, OSError) as e:
        raise InputError(f"adapter: cannot read {adapter.file}: {e}") from None


def adapter_fingerprint(adapter: Adapter) -> str:
    """Content hash of the adapter's config and weights (adapters are small: hash every byte)."""

    h = hashlib.sha256()
    if adapter.path.is_file():  # a LoRA GGUF: its derived config, then every byte of the file
        h.update(json.dumps(adapter.config, sort_keys=True).encode())
    else:
        h.update((adapter.path / "adapter_config.json").read_bytes())
    assert adapter.file is not None
    with open(adapter.file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]
